"""The demo's pictures of a decoding (`app_canvas.py`): what a stopped canvas says, and the steps' GIF (slots in place,
the question, the legend) and its name. Pillow only: these run without gradio or the model."""

import re

import numpy as np
from PIL import Image

from app_canvas import BLANK, BLANK_TEXT, COLOR_MAP, DONE, END_TEXT, NEW, gif_name, steps_gif, stopped_note


def rgb(code: str) -> tuple:
    return tuple(int(code[i : i + 2], 16) for i in (1, 3, 5))


def test_stopped_decodings_say_why_the_answer_is_empty():
    padding = [(END_TEXT, DONE), (END_TEXT, NEW), (BLANK_TEXT, BLANK)]
    assert "all end-of-answer padding" in stopped_note([padding])
    assert "before any slot was committed" in stopped_note([[(BLANK_TEXT, BLANK)] * 3])
    assert "before the answer was complete" in stopped_note([[(" red", DONE)] + padding])


# ------------------------------------------------------------------------------ the GIF of the steps


def test_gif_keeps_every_slot_in_place_and_carries_the_question_and_a_legend(tmp_path):
    # The first slot widens from "_" to a long token: chips that re-wrap per frame would move every later slot.
    blank = [(BLANK_TEXT, BLANK)] * 30
    widened = [(" a long token", NEW)] + blank[1:]
    path = steps_gif([blank, widened], tmp_path / "steps.gif", "How many shapes are there?")
    with Image.open(path) as picture:
        first = np.asarray(picture.convert("RGB"))
        picture.seek(1)
        second = np.asarray(picture.convert("RGB"))
    blank_colour = np.all(first == rgb(COLOR_MAP[BLANK]), axis=-1)
    still_blank = np.all(second == rgb(COLOR_MAP[BLANK]), axis=-1)
    assert still_blank.sum() > 0 and not (still_blank & ~blank_colour).any()  # no blank slot moved
    # The legend shows every category in every frame, even those no slot has yet.
    for frame in (first, second):
        colours = {tuple(colour) for colour in frame.reshape(-1, 3)}
        assert {rgb(code) for code in COLOR_MAP.values()} <= colours
    # The question's line sits above the slots: the same frames without it are shorter.
    untitled = steps_gif([blank, widened], tmp_path / "untitled.gif")
    assert Image.open(untitled).height < Image.open(path).height


def test_gif_name_describes_the_question_and_the_steps():
    assert gif_name("Describe the image.", 8) == "dimple-describe-the-image-8-steps.gif"
    assert gif_name("¿?", 3) == "dimple-answer-3-steps.gif"
    assert re.fullmatch(r"dimple-[a-z0-9-]+-1-steps\.gif", gif_name("x" * 500, 1))
