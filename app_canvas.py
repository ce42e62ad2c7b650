"""The demo's pictures of a decoding, pure (Pillow only: no model, torch or Gradio): each step's canvas as (text,
category) slots for the page's highlighted text, what a stopped decoding's canvas says, and the steps as an animated
GIF whose slots keep their places from frame to frame.
"""

import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Every slot gets a category: Gradio's HighlightedText keeps a slot's old colour when its category becomes None.
BLANK, NEW, DONE, FIXED = "undecided", "committed in this step", "committed earlier", "template (fixed)"
COLOR_MAP = {BLANK: "#d4d4d8", NEW: "#fb923c", DONE: "#bbf7d0", FIXED: "#93c5fd"}
BLANK_TEXT = "_"
END_TEXT = "∅"  # a slot filled with end-of-answer padding (it decodes to nothing)
GIF_WIDTH, GIF_FONT_SIZE, GIF_FRAME_MS, GIF_LAST_FRAME_MS = 640, 16, 500, 2500


# ------------------------------------------------------------------------------------------------- the canvas


def canvas_segments(tokenizer, canvas: list[int], previous: list[int], start: list[int], mask_id: int) -> list:
    """(text, category) per slot: blank while masked, then new in the step that commits it; template tokens fixed."""
    segments = []
    for token, before, initial in zip(canvas, previous, start):
        if token == mask_id:
            segments.append((BLANK_TEXT, BLANK))
            continue
        text = tokenizer.decode([token], skip_special_tokens=True) or END_TEXT
        if initial != mask_id:
            segments.append((text, FIXED))
        else:
            segments.append((text, NEW if before == mask_id else DONE))
    return segments


def stopped_note(frames: list[list]) -> str:
    """Why a stopped decoding has no answer text (or only part of one)."""
    committed = [text for text, category in (frames[-1] if frames else []) if category in (NEW, DONE)]
    if not committed:
        return "Stopped before any slot was committed: there is no answer yet. Press Answer to ask again."
    if all(text == END_TEXT for text in committed):
        return (
            f"Stopped with no answer text: the {len(committed)} slots committed so far are all end-of-answer padding "
            f"({END_TEXT}), which the answer ends with. Press Answer to let the decoding finish."
        )
    return "Stopped before the answer was complete: the canvas shows the slots committed so far."


# --------------------------------------------------------------------------------------------- the GIF


def figure_font(size: int):
    """A monospace font when the system has one (so the slots line up), else Pillow's built-in font."""
    try:
        return ImageFont.truetype("DejaVuSansMono.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def wrapped(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and font.getlength(f"{line} {word}") > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def chip_layout(widths: list[int], width: int, top: int) -> tuple[list, int]:
    """Slots wrapped into lines once, by their widest text over all frames, so no slot moves between frames:
    (x, y, w) per slot and the bottom edge."""
    gap, height = 3, GIF_FONT_SIZE + 10
    x, y, boxes = gap, top, []
    for w in widths:
        if x > gap and x + w > width - gap:
            x, y = gap, y + height + gap
        boxes.append((x, y, w))
        x += w + gap
    return boxes, y + height + gap


def draw_chip(draw, box, text, category, font):
    x, y, w = box
    draw.rounded_rectangle((x, y, x + w, y + GIF_FONT_SIZE + 10), radius=4, fill=COLOR_MAP[category])
    draw.text((x + (w - font.getlength(text)) / 2, y + 4), text, fill="black", font=font)  # centred in its slot


def steps_gif(frames: list[list], path, question: str = "") -> Path:
    """The canvases of one decoding as an animated GIF: the question, then per frame the step and the slots (each in
    one place throughout), then the colour legend; the last frame is held longer."""
    font = figure_font(GIF_FONT_SIZE)
    line = GIF_FONT_SIZE + 6
    title = wrapped(f"Q: {question}", font, GIF_WIDTH - 8)[:3] if question else []
    slots = max(len(segments) for segments in frames)
    widths = [
        max(int(font.getlength(segments[i][0])) + 8 for segments in frames if i < len(segments)) for i in range(slots)
    ]
    step_top = 4 + line * len(title)
    boxes, bottom = chip_layout(widths, GIF_WIDTH, step_top + line)
    legend_boxes, height = chip_layout([int(font.getlength(name)) + 8 for name in COLOR_MAP], GIF_WIDTH, bottom + 4)
    pictures = []
    for index, segments in enumerate(frames):
        picture = Image.new("RGB", (GIF_WIDTH, height), "white")
        draw = ImageDraw.Draw(picture)
        for row, text in enumerate(title):
            draw.text((4, 4 + row * line), text, fill="black", font=font)
        caption = "start" if index == 0 else f"step {index} of {len(frames) - 1}"
        draw.text((4, step_top), caption, fill="#52525b", font=font)
        for box, (text, category) in zip(boxes, segments):
            draw_chip(draw, box, text, category, font)
        for box, category in zip(legend_boxes, COLOR_MAP):
            draw_chip(draw, box, category, category, font)
        pictures.append(picture)
    durations = [GIF_FRAME_MS] * (len(pictures) - 1) + [GIF_LAST_FRAME_MS]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return Path(path)


def gif_name(question: str, steps: int) -> str:
    """A descriptive name that stays the same for the same question and step count: dimple-<question>-<n>-steps.gif."""
    words = re.sub(r"[^a-z0-9]+", "-", question.lower()).strip("-")[:48].rstrip("-") or "answer"
    return f"dimple-{words}-{steps}-steps.gif"
