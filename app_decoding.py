"""One request's decoding for the demo: the prompt, the answer length checked against the model's positions, and
`diffusion_generate` on a thread with a `CanvasCapture` streamer, whose canvases come back as the page's slots, then
a `Result`. Needs the model and torch; not Gradio.
"""

import queue
import threading
import time
from dataclasses import dataclass

import torch
from PIL import Image

from app_canvas import canvas_segments
from transformers_compat import BaseStreamer

MAX_SLOTS = 1024  # keeps one request from holding the only model for minutes; the package checks the lower bounds
SMALLEST_IMAGE = 28  # pixels: the smallest side the Qwen2-VL image processor accepts (patch 14 x merge 2)


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
