"""What a request to the demo holds and whether it can run, without Gradio: the page's fields as the generation
config's settings (and back), the upload read as the package reads images, and the checks run before a request joins
the queue, whose messages name the field and what to enter instead.
"""

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from app_decoding import check_answer_fits, decoding_options, prompt_inputs
from generation_utils import ALGORITHMS, PIPELINES, RELEASED_CHAT_SETTINGS, resolve_generation_settings
from image_processing_dimple import read_image

MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb bound; the model sees far fewer pixels anyway
SEED_RANGE = 2**31  # an empty seed field draws one from [0, SEED_RANGE)
TEMPERATURE_RANGE = (0.0, 2.0)
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
