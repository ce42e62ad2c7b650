"""Watch Dimple think: a Gradio demo that streams the denoising canvas after every step.

    pip install -r requirements-app.txt
    python app.py                       # the shapes Dimple shipped in this repository, on CPU
    python app.py --model PATH          # any Dimple checkpoint (GPU and bfloat16 when available)

Upload an image (or draw a shapes scene, or pick an example), ask a question (Enter answers), and watch the answer
canvas: undecided slots are blanks, the slots committed in the latest step are highlighted, and the fixed tokens of a
response template stand from the start. Then the answer, forward passes, tokens per pass and time; a slider replays
the finished decoding and the steps download as an animated GIF. "Stop" ends a decoding at its next step, or a request
still waiting in the queue before it starts. A confident checkpoint (the shapes model at γ 0.9) fills its whole answer
in one pass; "Watch it think" turns γ off and sets a schedule of a few slots per step, so the canvas fills visibly.

The page's settings are the generation config's own fields (`alg_p_threshold`, `steps`, `max_new_tokens`, ...): the
page shows them as the model's resolver gives them, and hands them to `diffusion_generate(..., streamer=...)` as
keyword arguments, which resolves them the same way. A `CanvasCapture` streamer hands each step's canvas from the
decoding thread to the page. Every request is checked before it joins the queue (Gradio's `validator`): a problem is
shown on the field it concerns, in the page and to API clients alike. Gradio's queue runs one decoding at a time on
the one model and holds a bounded number of waiting requests; every request has its own streamer and its own frames,
so concurrent users never see each other's canvases.
"""

import argparse
import collections
import math
import queue
import random
import re
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

REPO_ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))

from generation_utils import ALGORITHMS, PIPELINES, RELEASED_CHAT_SETTINGS, resolve_generation_settings  # noqa: E402
from image_processing_dimple import read_image  # noqa: E402
from modeling_dimple import DimpleForConditionalGeneration  # noqa: E402
from processing_dimple import DimpleProcessor  # noqa: E402
from shapes.task import ATTRIBUTES_TEMPLATE, random_scene, render  # noqa: E402
from transformers_compat import BaseStreamer  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "checkpoints" / "dimple-shapes"
# Every slot gets a category: Gradio's HighlightedText keeps a slot's old colour when its category becomes None.
BLANK, NEW, DONE, FIXED = "undecided", "committed in this step", "committed earlier", "template (fixed)"
COLOR_MAP = {BLANK: "#d4d4d8", NEW: "#fb923c", DONE: "#bbf7d0", FIXED: "#93c5fd"}
BLANK_TEXT = "_"
END_TEXT = "∅"  # a slot filled with end-of-answer padding (it decodes to nothing)
MAX_SLOTS = 1024  # keeps one request from holding the only model for minutes; the package checks the lower bounds
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb bound; the model sees far fewer pixels anyway
DEFAULT_QUESTION = "Describe the image."
ERROR_SECONDS = 8  # error toasts expire, so they never cover the canvas of a later answer
QUEUE_SIZE = 16  # requests waiting for the one model; more are refused with Gradio's "queue is full"
WATCH_SLOTS_PER_STEP = 4  # "Watch it think": a fixed schedule of this many slots per step
SEED_RANGE = 2**31  # an empty seed field draws one from [0, SEED_RANGE)
SMALLEST_IMAGE = 28  # pixels: the smallest side the Qwen2-VL image processor accepts (patch 14 x merge 2)
TEMPERATURE_RANGE = (0.0, 2.0)
GIF_WIDTH, GIF_FONT_SIZE, GIF_FRAME_MS, GIF_LAST_FRAME_MS = 640, 16, 500, 2500
# (shapes scene seed, question, response template, button label) per example.
EXAMPLES = (
    (7, "Describe the image.", "", "Describe the image."),
    (11, "What color is the shape on the left?", "", "What color is the shape on the left?"),
    (3, "How many shapes are there?", "", "How many shapes are there?"),
    (5, "What are the color and shape of the object on the left?", ATTRIBUTES_TEMPLATE, "Color and shape (template)"),
)
# The page's decoding fields, by the generation config's own names, in the order of the `/answer` inputs (the
# temperature follows the template there).
PAGE_SETTINGS = ("alg_p_threshold", "steps", "max_new_tokens", "decoding_pipeline", "alg", "use_cache", "temperature")
# The `/answer` inputs, in order (the names of `answer`'s parameters), and the label each has on the page.
LABELS = {
    "image": "Image",
    "question": "Question",
    "alg_p_threshold": "Threshold γ",
    "steps": "Steps",
    "max_new_tokens": "Answer length",
    "decoding_pipeline": "Pipeline",
    "alg": "Algorithm",
    "use_cache": "Prefill cache",
    "response_template": "Response template",
    "temperature": "Temperature",
    "seed": "Seed",
}
CSS = """
#outputs.stale { opacity: 0.45; transition: opacity 0.2s; }
#image-note p { margin: 0; padding: 4px 8px; border-radius: 4px; color: #1e40af; background: #eff6ff; }
/* Gradio paints a refused field red; these messages are guidance (what to do), so they look like a hint, as does
   the note under the image. */
div.validation-error { color: #1e40af !important; background: #eff6ff !important; border-color: #93c5fd !important; }
input.validation-error, textarea.validation-error { border-color: #60a5fa !important; }
/* The image's message covers its toolbar: clicks pass through it (Remove, Upload), except on its own close button. */
#image div.validation-error { pointer-events: none; }
#image div.validation-error button { pointer-events: auto; }
@media (max-width: 640px) {
  #intro { font-size: 0.85em; }
  #image { height: 170px !important; }
}
"""
# Inputs edited after an answer: the outputs (about the previous inputs) fade until the next answer starts.
DIM_OUTPUTS = "() => document.getElementById('outputs')?.classList.add('stale')"
# A stopped decoding has no answer text: the Answer box says why (as its placeholder; the API gets "" as the answer).
STOPPED_NOTE_IN_ANSWER = """(summary) => {
  const box = document.querySelector('#answer textarea');
  if (box) box.placeholder = summary.startsWith('stopped') ? summary.replace(/^[^:]*: /, '') : '';
}"""
UNDIM_OUTPUTS = "() => document.getElementById('outputs')?.classList.remove('stale')"


# ------------------------------------------------------------------------------------------- settings


def resolve_settings(model, settings: dict):
    """The `DimpleGenerationConfig` a decoding with these keyword arguments runs with, by the package's resolver (the
    one `generate` and `diffusion_generate` use: the call's settings over the checkpoint's generation config, then the
    diffusion defaults). Raises the package's `ValueError` / `TypeError` for a bad setting."""
    config, _ = resolve_generation_settings(model, **settings)
    return config


def checkpoint_base(model) -> dict:
    """What the page adds to a checkpoint whose generation config does not select diffusion decoding (the released
    Dimple-7B): the released chat settings (top-p, top-k, ...), as `examples/demo.py` runs it."""
    return {} if model.generation_config.decoding == "diffusion" else dict(RELEASED_CHAT_SETTINGS)


def page_settings(**fields) -> dict:
    """The page's decoding fields as `diffusion_generate` keywords: the threshold slider's 0 is "off" (None)."""
    return dict(fields, alg_p_threshold=fields["alg_p_threshold"] or None)


def field_values(config) -> dict:
    """A resolved config as the page's fields show it (the threshold slider's "off" is 0)."""
    values = {name: getattr(config, name) for name in PAGE_SETTINGS}
    values.update(alg_p_threshold=config.alg_p_threshold or 0.0, temperature=config.temperature or 0.0)
    values.update(max_new_tokens=config.max_new_tokens or 64, use_cache=bool(config.use_cache))
    return values


# ------------------------------------------------------------------------------------------------ images


class Unread:
    """An input value Gradio could not read (an image Pillow refuses, text in a number field): handed to the
    validator, which names the field, instead of failing before it with a message that names none."""

    def __init__(self, payload, error: Exception):
        self.payload, self.error = payload, error

    def __repr__(self):
        return repr(self.payload)


def read_leniently(component):
    """Make `component` hand an `Unread` to the functions instead of raising while reading a value.

    Wrapped on the instance: a subclass of a Gradio component makes Gradio write a `.pyi` file beside this module.
    """
    preprocess = component.preprocess

    def lenient(payload):
        try:
            return preprocess(payload)
        except Exception as error:  # any reading failure is the validator's to explain
            return Unread(payload, error)

    component.preprocess = lenient
    return component


@dataclass
class Upload:
    image: Image.Image  # the first frame, as the model reads it
    frames: int  # frames in the file (an animated GIF has several)

    def note(self) -> str:
        if self.frames == 1:
            return ""
        return f"An animated image ({self.frames} frames): Dimple sees one picture; it answers about the first frame."


def upload_name(value) -> str:
    if isinstance(value, Unread):
        return getattr(value.payload, "orig_name", None) or "The upload"
    return Path(value).name


def read_upload(value) -> Upload:
    """The image file the page holds (a path), or a `ValueError` that says what to upload instead."""
    name = upload_name(value)
    if isinstance(value, Unread) and isinstance(value.error, Image.DecompressionBombError):
        raise ValueError(too_large(name))
    if isinstance(value, Unread) and isinstance(value.error, UnidentifiedImageError):
        raise ValueError(not_an_image(name))
    if isinstance(value, Unread):
        raise ValueError(f"{name} could not be read ({type(value.error).__name__}: {value.error}); upload it again.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the size
            with Image.open(value) as picture:
                if picture.width * picture.height > MAX_PIXELS:
                    raise ValueError(too_large(name, picture.size))
                frames = getattr(picture, "n_frames", 1)
                picture.load()  # reads the first frame to its end: a cut file fails here
            # The package's reader, as inference and fine-tuning read images (16-bit greyscale to 8 bits, EXIF, ...).
            return Upload(read_image(value), frames)
    except Image.DecompressionBombError as error:
        raise ValueError(too_large(name)) from error
    except UnidentifiedImageError as error:
        raise ValueError(not_an_image(name)) from error
    except (OSError, SyntaxError) as error:  # Pillow's errors for a cut or damaged file
        raise ValueError(
            f"{name} is cut short or damaged (Pillow: {error}); upload the complete file, or save it again."
        ) from error


def not_an_image(name: str) -> str:
    return f"{name} is not an image this demo can read; upload a PNG, JPEG, WebP or GIF picture."


def too_large(name: str, size: tuple[int, int] | None = None) -> str:
    dimensions = f" ({size[0]} × {size[1]} pixels)" if size else ""
    return (
        f"{name} is too large{dimensions}: this demo reads pictures of at most {MAX_PIXELS / 1e6:.0f} million pixels "
        "(Pillow's guard against decompression bombs). Upload a smaller copy: the model sees at most a few hundred "
        "thousand pixels anyway."
    )


# ------------------------------------------------------------------------------------------------ the canvas


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


class CanvasCapture(BaseStreamer):
    """The page's streamer: it hands each step's canvas (`put_draft`, transformers' diffusion streamer protocol) from
    the decoding thread to the page, and stops the decoding once `cancelled` is set.
    """

    def __init__(self):
        self.items = queue.Queue()
        self.cancelled = threading.Event()

    def put(self, value):
        pass  # the prompt, then the final answer: the answer reaches the page as the result

    def put_draft(self, value):
        if self.cancelled.is_set():
            raise DecodingCancelled()  # raised inside `diffusion_generate`, which ends it at this step
        self.items.put(("canvas", value[0].tolist()))

    def end(self):
        pass


class DecodingCancelled(Exception):
    """The page stopped listening (the user pressed Stop or left)."""


@dataclass
class Result:
    answer: str
    passes: int
    tokens_per_step: list[int]
    seconds: float

    def summary(self) -> str:
        committed = sum(self.tokens_per_step)
        per_pass = committed / self.passes if self.passes else 0.0
        return (
            f"forward passes: {self.passes} · tokens per pass: {per_pass:.2f} "
            f"({', '.join(map(str, self.tokens_per_step))}) · time: {self.seconds:.2f} s"
        )


def prompt_inputs(processor, image, question: str):
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    return processor(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")


def check_answer_fits(model, processor, prompt_length: int, question: str, settings: dict, template: str):
    """Name what does not fit in the model's positions: the question when the prompt alone leaves no answer slot,
    else the answer length, with the longest answer this prompt leaves room for (a template is checked by the
    package, whose message names the template)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return
    if prompt_length >= positions:
        question_tokens = len(processor.tokenizer.encode(question))
        others = prompt_length - question_tokens
        raise ValueError(
            f"The question is too long: it takes {question_tokens} of the model's {positions} positions, and the "
            f"image and chat template take {others} more. Shorten it to well under {positions - others} tokens "
            f"(about {(positions - others) * len(question) // max(question_tokens, 1)} characters here), leaving room "
            "for the answer."
        )
    length = settings.get("max_new_tokens")
    if template.strip() or length is None or prompt_length + length <= positions:
        return
    raise ValueError(
        f"Answer length {length} does not fit: this prompt takes {prompt_length} of the model's {positions} "
        f"positions, which leaves room for at most {positions - prompt_length} answer slots. Lower the answer length "
        "or shorten the question."
    )


def longest_answer(model, processor) -> int:
    """The most answer slots any prompt leaves room for: the positions left after the shortest prompt (the smallest
    image and a one-character question), and at most MAX_SLOTS."""
    positions = getattr(model.config, "max_position_embeddings", None) or MAX_SLOTS
    shortest = prompt_inputs(processor, Image.new("RGB", (SMALLEST_IMAGE, SMALLEST_IMAGE)), "?")["input_ids"]
    return min(MAX_SLOTS, positions - shortest.shape[1])


def decoding_options(processor, settings: dict, template: str) -> dict:
    """`diffusion_generate` keywords: the settings, and the encoded template, which fixes the answer length."""
    if not template.strip():
        return dict(settings)
    return dict(settings, response_template=processor.encode_response_template(template), max_new_tokens=None)


def stream_decoding(
    model, processor, image, question: str, settings: dict, template: str = "", seed: int | None = 0, streamer=None
):
    """Yield the canvas segments after every step (the empty canvas first), then a final `Result`.

    `settings` are `diffusion_generate` keyword arguments (the generation config's field names). Bad input raises
    the package's `ValueError` / `TypeError` before the first yield or from the decoding thread; setting
    `streamer.cancelled` makes the next item a `DecodingCancelled`.
    """
    inputs = prompt_inputs(processor, image, question)
    check_answer_fits(model, processor, inputs["input_ids"].shape[1], question, settings, template)
    inputs = inputs.to(model.device)
    options = decoding_options(processor, settings, template)
    streamer = streamer or CanvasCapture()
    worker = threading.Thread(target=decode, args=(model, processor, inputs, options, seed, streamer), daemon=True)
    worker.start()
    try:
        yield from canvases(processor, streamer, options.get("response_template"))
    finally:
        streamer.cancelled.set()
        worker.join()


def decode(model, processor, inputs, options, seed: int | None, streamer: CanvasCapture):
    """The decoding thread: run `diffusion_generate` and queue its result or its error."""
    try:
        if seed is not None:
            # The queue runs one decoding at a time, so the process-wide generator serves this request only.
            torch.manual_seed(seed)
        start = time.perf_counter()
        output = model.diffusion_generate(**inputs, **options, streamer=streamer, return_dict_in_generate=True)
        seconds = time.perf_counter() - start
        prompt_length = inputs["input_ids"].shape[1]
        answer = processor.post_process_answer(output.sequences[0, prompt_length:], skip_special_tokens=True)
        tokens = output.tokens_per_step[0].tolist() if output.tokens_per_step is not None else []
        streamer.items.put(("result", Result(answer, int(output.num_forward_passes[0]), tokens, seconds)))
    except Exception as error:  # handed to the page, which shows it
        streamer.items.put(("error", error))


def canvases(processor, streamer: CanvasCapture, template: list[int] | None):
    """The starting canvas (the template, or all blanks), then the canvas after each step, then the `Result`."""
    mask_id = processor.mask_token_id
    start = None
    while True:
        kind, item = streamer.items.get()
        if kind == "error":
            raise item
        if kind == "result":
            yield item
            return
        if streamer.cancelled.is_set():  # canvases already queued are not shown after Stop
            raise DecodingCancelled()
        if start is None:  # the answer length is known once the first canvas arrives
            start = previous = template or [mask_id] * len(item)
            yield canvas_segments(processor.tokenizer, start, start, start, mask_id)
        yield canvas_segments(processor.tokenizer, item, previous, start, mask_id)
        previous = item


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


# ----------------------------------------------------------------------------------------------- checks


def number_value(value):
    """A number field's value as a number (API clients may send "8"), None when empty; other values unchanged."""
    value = value.payload if isinstance(value, Unread) else value
    if value == "":
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def number_problem(label: str, value, low, high, whole: bool, empty: str | None = None) -> str | None:
    """What is wrong with a number field's value (None when nothing), naming the field and the accepted range."""
    kind = "a whole number" if whole else "a number"
    value = number_value(value)
    if value is None:
        return empty
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{label} must be {kind} from {low} to {high}; got {value!r}."
    if whole and value != int(value):
        return f"{label} must be a whole number from {low} to {high}; got {value}."
    if not low <= value <= high:
        return f"{label} must be from {low} to {high}; got {value:g}. Enter a value in that range."
    return None


class Checks:
    """The page's checks of one request, by input: run before it joins the queue (Gradio shows each message on
    its field), and again by `answer` for the values it uses."""

    def __init__(self, model, processor, base: dict, defaults: dict, slot_limit: int):
        self.model, self.processor, self.base = model, processor, base
        self.defaults, self.slot_limit = defaults, slot_limit

    def problems(self, values: dict) -> dict:
        """{input name: message} for every input with a problem; empty when the request can run."""
        problems = {}
        upload = self._image(values["image"], problems)
        question = values["question"]
        if not isinstance(question, str) or not question.strip():
            problems["question"] = "Type a question: the question box is empty."
        self._numbers(values, problems)
        if set(problems) - {"image", "question"}:
            return problems  # the settings below need every field readable
        template = values["response_template"] or ""
        settings = self.settings(values)
        try:
            resolve_settings(self.model, settings)
            options = decoding_options(self.processor, settings, template)
        except (ValueError, TypeError) as error:
            problems[self._field_of(str(error), template)] = str(error)
            return problems
        if not problems:
            prompt = prompt_inputs(self.processor, upload.image, question)["input_ids"].shape[1]
            try:
                check_answer_fits(self.model, self.processor, prompt, question, options, template)
            except ValueError as error:
                field = "question" if str(error).startswith("The question") else "max_new_tokens"
                problems[field] = str(error)
        return problems

    def settings(self, values: dict) -> dict:
        """The request's `diffusion_generate` keywords: the page's fields over the checkpoint's base settings."""
        fields = {name: values[name] for name in PAGE_SETTINGS}
        for name in ("alg_p_threshold", "temperature"):
            fields[name] = number_value(fields[name])
        for name in ("steps", "max_new_tokens"):
            fields[name] = None if number_value(fields[name]) is None else int(number_value(fields[name]))
        return dict(self.base, **page_settings(**fields))

    def _image(self, value, problems: dict) -> Upload | None:
        if value is None:
            problems["image"] = (
                "Upload an image, press “Draw a scene”, or pick an example: Dimple answers questions about "
                "an image."
            )
            return None
        try:
            return read_upload(value)
        except ValueError as error:
            problems["image"] = str(error)
            return None

    def _numbers(self, values: dict, problems: dict):
        template = (values["response_template"] or "").strip()
        fields = {
            "alg_p_threshold": (0, 1, False, "Threshold γ is empty: enter 0 (off) to 1."),
            "steps": (1, self.slot_limit, True, f"Steps is empty: enter the number of denoising steps (the "
                      f"checkpoint's is {self.defaults['steps']})."),
            "max_new_tokens": (1, self.slot_limit, True, None if template else (
                "Answer length is empty: enter the number of answer slots (the checkpoint's is "
                f"{self.defaults['max_new_tokens']}), or give a response template, which sets the length.")),
            "temperature": (*TEMPERATURE_RANGE, False, "Temperature is empty: enter 0 (argmax) to 2."),
            "seed": (0, SEED_RANGE - 1, True, None),
        }  # fmt: skip
        for name, (low, high, whole, empty) in fields.items():
            problem = number_problem(LABELS[name], values[name], low, high, whole, empty)
            if problem:
                problems[name] = problem
        for name, choices in (("decoding_pipeline", PIPELINES), ("alg", tuple(ALGORITHMS))):
            if values[name] not in choices or isinstance(values[name], Unread):
                problems[name] = f"{LABELS[name]} must be one of {', '.join(choices)}; got {values[name]!r}."
        if not isinstance(values["use_cache"], bool):
            problems["use_cache"] = f"Prefill cache must be true or false; got {values['use_cache']!r}."
        if not isinstance(values["response_template"], (str, type(None))):
            problems["response_template"] = "Response template must be text."

    @staticmethod
    def _field_of(message: str, template: str) -> str:
        """The input a package message concerns: the template's, or the setting it names in backticks."""
        if template.strip() and "template" in message:
            return "response_template"
        for name in LABELS:
            if f"`{name}`" in message:
                return name
        return "alg"


class Sessions:
    """Per browser session (or API client): the running decoding's streamer, the times its queued requests were
    accepted, and the time of its last Stop, so that Stop ends the running decoding and cancels queued ones."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: dict[str, CanvasCapture] = {}
        self.accepted: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.stopped: dict[str, float] = {}

    def accept(self, session: str):
        with self.lock:
            self.accepted[session].append(time.monotonic())

    def start(self, session: str, streamer: CanvasCapture) -> bool:
        """Register the request leaving the queue; False when Stop was pressed after it was accepted."""
        with self.lock:
            waiting = self.accepted.get(session)
            accepted = waiting.popleft() if waiting else time.monotonic()
            stopped = self.stopped.get(session, -math.inf) >= accepted
            if not waiting:
                self.accepted.pop(session, None)
                self.stopped.pop(session, None)
            if not stopped:
                self.running[session] = streamer
            return not stopped

    def finish(self, session: str, streamer: CanvasCapture):
        with self.lock:
            if self.running.get(session) is streamer:
                del self.running[session]

    def stop(self, session: str):
        with self.lock:
            if session in self.running:
                self.running[session].cancelled.set()
            if session in self.accepted:
                self.stopped[session] = time.monotonic()


# ----------------------------------------------------------------------------------------------- the page


def watch_settings(answer_length, defaults: dict) -> tuple[float, int, int]:
    """The "Watch it think" preset, (γ, steps, length): γ off, a schedule of WATCH_SLOTS_PER_STEP slots per step."""
    valid = number_problem("", answer_length, 1, MAX_SLOTS, True, "empty") is None
    length = int(number_value(answer_length)) if valid else defaults["max_new_tokens"]
    return 0.0, max(1, math.ceil(length / WATCH_SLOTS_PER_STEP)), length


def draw_scene():
    return render(random_scene(random.Random()))


def example_rows(folder: Path) -> list[list]:
    """[image file, question, template] per example: shapes scenes drawn from their seeds."""
    rows = []
    for seed, question, template, _ in EXAMPLES:
        path = folder / f"scene-{seed}.png"
        render(random_scene(random.Random(seed))).save(path)
        rows.append([str(path), question, template])
    return rows


def load(model_id):
    """The repository's own classes (they also load the released 7B checkpoint); bf16 on a GPU, fp32 on CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = DimpleForConditionalGeneration.from_pretrained(model_id, dtype=dtype).to(device).eval()
    # trust_remote_code only lets the tokenizer lookup read the checkpoint's config.json; the code is this repo's.
    processor = DimpleProcessor.from_pretrained(model_id, trust_remote_code=True)
    return model, processor


def build_demo(model, processor, frame_seconds: float = 0.1, queue_size: int = QUEUE_SIZE) -> gr.Blocks:
    """The page. `frame_seconds`: each streamed canvas stays at least this long, so fast decodings stay watchable;
    `queue_size`: the most requests waiting for the model."""
    base = checkpoint_base(model)
    defaults = field_values(resolve_settings(model, base))
    slot_limit = longest_answer(model, processor)
    checks = Checks(model, processor, base, defaults, slot_limit)
    files = Path(tempfile.mkdtemp(prefix="dimple-demo-"))  # example scenes and each session's latest GIF
    sessions = Sessions()
    names = list(LABELS)

    def validate(
        image, question, alg_p_threshold, steps, max_new_tokens, decoding_pipeline, alg, use_cache,
        response_template, temperature, seed, request: gr.Request,
    ):  # fmt: skip
        """Gradio's validator: each problem on its own field; an accepted request is noted for Stop."""
        values = dict(zip(names, (image, question, alg_p_threshold, steps, max_new_tokens, decoding_pipeline, alg,
                                  use_cache, response_template, temperature, seed)))  # fmt: skip
        problems = checks.problems(values)
        if not problems:
            sessions.accept(request.session_hash)
        return [gr.validate(name not in problems, problems.get(name, "")) for name in names]

    def finished(frames, answer_text, summary, session, question):
        """The last canvas, the answer, the summary, the frames, the replay slider over them, the GIF (and its box)."""
        if not frames:
            return None, answer_text, summary, frames, gr.Slider(interactive=False), None, gr.Column(visible=False)
        replay = gr.Slider(minimum=0, maximum=len(frames) - 1, value=len(frames) - 1, interactive=True)
        folder = files / re.sub(r"[^0-9a-zA-Z]", "", session)[:32]  # the session names itself: keep only [0-9a-z]
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.gif"):  # one GIF per session: its latest decoding
            old.unlink()
        gif = steps_gif(frames, folder / gif_name(question, len(frames) - 1), question)
        return frames[-1], answer_text, summary, frames, replay, str(gif), gr.Column(visible=True)

    def answer(
        image, question, alg_p_threshold, steps, max_new_tokens, decoding_pipeline, alg, use_cache,
        response_template, temperature, seed, request: gr.Request,
    ):  # fmt: skip
        values = dict(zip(names, (image, question, alg_p_threshold, steps, max_new_tokens, decoding_pipeline, alg,
                                  use_cache, response_template, temperature, seed)))  # fmt: skip
        session, streamer = request.session_hash, CanvasCapture()
        if not sessions.start(session, streamer):
            summary = "stopped while waiting in the queue: nothing was decoded. Press Answer to ask again."
            yield finished([], "", summary, session, question)
            return
        frames, shown = [], 0.0
        try:
            problems = checks.problems(values)  # the validator ran on these values; a change since is named here
            if problems:
                raise ValueError(" ".join(problems.values()))
            upload = read_upload(image)
            seed = number_value(seed)
            seed = random.randrange(SEED_RANGE) if seed is None else int(seed)
            settings = checks.settings(values)
            template = response_template or ""
            for item in stream_decoding(model, processor, upload.image, question, settings, template, seed, streamer):
                if isinstance(item, Result):
                    summary = f"{item.summary()} · seed: {seed}"
                    if item.passes == 1 and len(frames) > 1:
                        summary += " · the whole answer came in one pass: press “Watch it think” to see the steps"
                    if upload.frames > 1:
                        summary += f" · about the first of the GIF's {upload.frames} frames"
                    yield finished(frames, item.answer, summary, session, question)
                    return
                time.sleep(max(0.0, shown + frame_seconds - time.perf_counter()))
                shown = time.perf_counter()
                frames.append(item)
                hidden = gr.Column(visible=False)
                yield item, "", f"step {len(frames) - 1}", frames, gr.Slider(interactive=False), None, hidden
        except DecodingCancelled:
            summary = f"stopped after step {max(0, len(frames) - 1)}: {stopped_note(frames)}"
            yield finished(frames, "", summary, session, question)
        except (ValueError, TypeError) as error:  # the package's bad-input errors the checks missed; others are bugs
            raise gr.Error(str(error), duration=ERROR_SECONDS, print_exception=False) from error
        finally:
            sessions.finish(session, streamer)

    def stop(request: gr.Request):
        sessions.stop(request.session_hash)

    def replay(step, frames):
        return frames[int(step)] if frames else None

    def watch(max_new_tokens):
        return watch_settings(max_new_tokens, defaults)

    def checkpoint_settings():
        return tuple(defaults[name] for name in PAGE_SETTINGS)

    def new_image(image):
        """Another image (upload, example, scene, removal): clear the outputs about the previous one, and say under
        the image what the model will see of this one, or what to upload instead."""
        cleared = (None, "", "", [], gr.Slider(0, 1, 0, interactive=False), None, gr.Column(visible=False))
        try:
            note = read_upload(image).note() if image is not None else ""
        except ValueError as error:
            note = str(error)
        return *cleared, note

    with gr.Blocks(title="Dimple: watch it think", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "## Dimple: watch it think\n"
            "A discrete-diffusion VLM answers by filling a canvas of masked slots, several per forward pass "
            f"({BLANK_TEXT}: undecided, {END_TEXT}: end-of-answer padding).",
            elem_id="intro",
        )
        with gr.Row(equal_height=False):
            with gr.Column(min_width=320):
                # A file path, read by the app: Gradio's own reading would clip 16-bit pictures and fail on bad files.
                image = read_leniently(
                    gr.Image(type="filepath", image_mode=None, label="Image", elem_id="image", height=210)
                )
                image_note = gr.Markdown("", elem_id="image-note")
                question = gr.Textbox(DEFAULT_QUESTION, label="Question (Enter answers)", elem_id="question")
                template = gr.Textbox(
                    "",
                    label="Response template (optional)",
                    placeholder="Color:<|mask|> Shape:<|mask|>  (<|mask|>*N: N slots; sets the length)",
                    elem_id="template",
                )
                with gr.Row():
                    run = gr.Button("Answer", variant="primary", elem_id="run", min_width=100)
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop", min_width=100)
                with gr.Row():
                    watch_button = gr.Button("Watch it think", elem_id="watch", size="sm", min_width=90)
                    reset = gr.Button("Checkpoint's settings", elem_id="reset", size="sm", min_width=90)
                    scene = gr.Button("Draw a scene", elem_id="scene", size="sm", min_width=90)
            with gr.Column(min_width=320, elem_id="outputs"):
                canvas = gr.HighlightedText(
                    label="Canvas", color_map=COLOR_MAP, show_legend=True, show_inline_category=False, elem_id="canvas"
                )
                answer_box = gr.Textbox(label="Answer", elem_id="answer")
                stats = gr.Textbox(
                    label="Decoding",
                    elem_id="stats",
                    placeholder=f"A confident model fills its whole answer in one pass: “Watch it think” turns the "
                    f"threshold γ off and commits {WATCH_SLOTS_PER_STEP} slots per step, so the canvas fills visibly.",
                )
                step = gr.Slider(0, 1, 0, step=1, label="Replay step", interactive=False, elem_id="replay")
                with gr.Column(visible=False, elem_id="gif-box") as gif_box:  # no empty file box before a run
                    gif = gr.File(label="The steps as an animated GIF", elem_id="gif")
                rows = example_rows(files)
                gr.Examples(
                    rows,
                    [image, question, template],
                    example_labels=[label for *_, label in EXAMPLES],
                    cache_examples=False,
                    label="Examples (shapes scenes)",
                    elem_id="examples",
                )
        with gr.Accordion("Decoding settings", open=True, elem_id="settings"):
            with gr.Row():
                threshold = read_leniently(
                    gr.Slider(0, 1, defaults["alg_p_threshold"], step=0.01, label="Threshold γ (0: off)",
                              elem_id="threshold")
                )  # fmt: skip
                temperature = read_leniently(
                    gr.Slider(*TEMPERATURE_RANGE, defaults["temperature"], step=0.05, label="Temperature (0: argmax)",
                              elem_id="temperature")
                )  # fmt: skip
            with gr.Row():
                steps = read_leniently(
                    gr.Number(defaults["steps"], precision=0, minimum=1, maximum=slot_limit, label="Steps",
                              elem_id="steps")
                )  # fmt: skip
                answer_length = read_leniently(
                    gr.Number(defaults["max_new_tokens"], precision=0, minimum=1, maximum=slot_limit,
                              label="Answer length (slots)", elem_id="answer_length",
                              info=f"At most {slot_limit}: the model's positions minus the shortest prompt.")
                )  # fmt: skip
                seed = read_leniently(
                    gr.Number(0, precision=0, minimum=0, maximum=SEED_RANGE - 1, label="Seed (empty: random)",
                              elem_id="seed")
                )  # fmt: skip
            with gr.Row():
                pipeline = read_leniently(
                    gr.Radio(list(PIPELINES), value=defaults["decoding_pipeline"], label="Pipeline",
                             elem_id="pipeline")
                )  # fmt: skip
                alg = read_leniently(
                    gr.Dropdown(list(ALGORITHMS), value=defaults["alg"], label="Algorithm", elem_id="alg")
                )
                use_cache = gr.Checkbox(defaults["use_cache"], label="Prefill cache", elem_id="use_cache")
        frames = gr.State([])

        inputs = [
            image, question, threshold, steps, answer_length, pipeline, alg, use_cache, template, temperature, seed,
        ]  # fmt: skip
        outputs = [canvas, answer_box, stats, frames, step, gif, gif_box]
        # Events that read no model bypass the queue: they never wait behind decodings, nor meet a full queue (Stop).
        scene.click(draw_scene, None, image, api_name="scene", queue=False)
        # Reading the image at once: a file that is no image gets its message now, not at "Answer".
        image.change(new_image, image, [*outputs, image_note], api_visibility="private", queue=False)
        for field in (question, template):
            field.input(None, js=DIM_OUTPUTS)
        gr.on([run.click, question.submit, image.change], None, js=UNDIM_OUTPUTS)
        stats.change(None, stats, None, js=STOPPED_NOTE_IN_ANSWER)
        gr.on(
            [run.click, question.submit],
            answer,
            inputs,
            outputs,
            api_name="answer",
            validator=validate,
        )
        stop_button.click(stop, None, None, api_name="stop", queue=False)
        watch_button.click(watch, answer_length, [threshold, steps, answer_length], api_name="watch", queue=False)
        reset.click(
            checkpoint_settings,
            None,
            [threshold, steps, answer_length, pipeline, alg, use_cache, temperature],
            api_name="checkpoint_settings",
            queue=False,
        )
        step.input(replay, [step, frames], canvas, api_name="replay", queue=False)
    # One model instance: decode one request at a time, in arrival order; each has its own streamer and frames.
    return demo.queue(max_size=queue_size, default_concurrency_limit=1)


def launch(demo: gr.Blocks, **kwargs):
    """Serve the page with its stylesheet (Gradio takes page CSS at launch)."""
    return demo.launch(css=CSS, **kwargs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="Checkpoint folder or Hub id.")
    parser.add_argument("--host", help="Address to serve on (default: Gradio's, 127.0.0.1).")
    parser.add_argument("--port", type=int, help="Port (default: Gradio's, 7860 or the next free one).")
    parser.add_argument("--frame-seconds", type=float, default=0.1, help="Shortest time each streamed canvas shows.")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="Most requests waiting for the model.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, processor = load(args.model)
    demo = build_demo(model, processor, args.frame_seconds, args.queue_size)
    launch(demo, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
