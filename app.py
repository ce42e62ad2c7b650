"""Watch Dimple think: a Gradio demo that streams the denoising canvas after every step.

    pip install -r requirements-app.txt
    python app.py                       # the shapes Dimple shipped in this repository, on CPU
    python app.py --model PATH          # any Dimple checkpoint (GPU and bfloat16 when available)

Upload an image (or draw a shapes scene), ask a question, and watch the answer canvas: undecided slots are blanks,
the slots committed in the latest step are highlighted, and the fixed tokens of a response template stand from the
start. Then the answer, forward passes, tokens per pass and time; a slider replays the finished decoding.

The page talks to the package only through `diffusion_generate(..., streamer=...)`: a streamer hands each step's
canvas from the decoding thread to the page. Gradio's queue runs one decoding at a time on the one model; every
request has its own streamer and its own frames, so concurrent users never see each other's canvases.
"""

import argparse
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

REPO_ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))

from examples.demo import DEFAULT_MODEL, decoding_options, load  # noqa: E402
from generation_utils import DimpleGenerationConfig  # noqa: E402
from shapes.task import random_scene, render  # noqa: E402
from transformers_compat import BaseStreamer  # noqa: E402

# Every slot gets a category: Gradio's HighlightedText keeps a slot's old colour when its category becomes None.
BLANK, NEW, DONE, FIXED = "undecided", "committed in this step", "committed earlier", "template (fixed)"
COLOR_MAP = {BLANK: "#d4d4d8", NEW: "#fb923c", DONE: "#bbf7d0", FIXED: "#93c5fd"}
BLANK_TEXT = "_"
END_TEXT = "∅"  # a slot filled with end-of-answer padding (it decodes to nothing)
PIPELINES = ("dim", "dream")
ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy", "autoregressive", "origin-ratio")
MAX_SLOTS = 1024  # keeps one request from holding the only model for minutes; the package checks the lower bounds
DEFAULT_QUESTION = "Describe the image."


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


class CanvasQueue(BaseStreamer):
    """Hands each step's canvas from the decoding thread to the page (TextIteratorStreamer's idea, for canvases).

    Setting `cancelled` stops the decoding at its next step: `put` raises, which ends `diffusion_generate`.
    """

    def __init__(self):
        self.items = queue.Queue()
        self.cancelled = threading.Event()

    def put(self, value):
        if self.cancelled.is_set():
            raise DecodingCancelled()
        self.items.put(("canvas", value[0].tolist()))

    def end(self):
        pass


class DecodingCancelled(Exception):
    """The page stopped listening (the user left or pressed stop)."""


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


@dataclass
class Settings:
    """The page's decoding controls, as `diffusion_generate` keywords."""

    threshold: float  # 0 turns confident decoding off
    steps: int | None
    answer_length: int | None
    pipeline: str
    alg: str
    use_cache: bool
    template: str = ""
    extra: dict = field(default_factory=dict)  # the checkpoint's other settings (temperature, top-p, ...)

    def options(self, processor) -> dict:
        options = dict(
            self.extra,
            steps=self.steps,
            max_new_tokens=self.answer_length,
            alg_p_threshold=self.threshold or None,
            decoding_pipeline=self.pipeline,
            alg=self.alg,
            use_cache=self.use_cache,
        )
        if self.template.strip():
            # The template fixes the answer length.
            options.update(response_template=processor.encode_response_template(self.template), max_new_tokens=None)
        return options


def stream_decoding(model, processor, image, question: str, settings: Settings):
    """Yield the canvas segments after every step (the empty canvas first), then a final `Result`.

    Bad input raises the package's `ValueError` / `TypeError` before the first yield or from the decoding thread.
    """
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")
    inputs = inputs.to(model.device)
    options = settings.options(processor)
    streamer = CanvasQueue()
    worker = threading.Thread(target=decode, args=(model, processor, inputs, options, streamer), daemon=True)
    worker.start()
    try:
        yield from canvases(processor, streamer, options.get("response_template"))
    finally:
        streamer.cancelled.set()
        worker.join()


def decode(model, processor, inputs, options, streamer: CanvasQueue):
    """The decoding thread: run `diffusion_generate` and queue its result or its error."""
    try:
        start = time.perf_counter()
        output = model.diffusion_generate(**inputs, **options, streamer=streamer, return_dict_in_generate=True)
        seconds = time.perf_counter() - start
        prompt_length = inputs["input_ids"].shape[1]
        answer = processor.post_process_answer(output.sequences[0, prompt_length:], skip_special_tokens=True)
        tokens = output.tokens_per_step[0].tolist() if output.tokens_per_step is not None else []
        streamer.items.put(("result", Result(answer, int(output.num_forward_passes[0]), tokens, seconds)))
    except Exception as error:  # handed to the page, which shows it
        streamer.items.put(("error", error))


def canvases(processor, streamer: CanvasQueue, template: list[int] | None):
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
        if start is None:  # the answer length is known once the first canvas arrives
            start = previous = template or [mask_id] * len(item)
            yield canvas_segments(processor.tokenizer, start, start, start, mask_id)
        yield canvas_segments(processor.tokenizer, item, previous, start, mask_id)
        previous = item


# ----------------------------------------------------------------------------------------------- the page


def default_settings(model) -> Settings:
    """The checkpoint's own diffusion settings, else the released chat settings (as `examples/demo.py` runs)."""
    extra = decoding_options(model)
    config = DimpleGenerationConfig(**{**model.generation_config.to_diff_dict(), **extra})
    for name in ("steps", "max_new_tokens", "alg_p_threshold", "decoding_pipeline", "alg", "use_cache"):
        extra.pop(name, None)
    return Settings(
        threshold=config.alg_p_threshold or 0.0,
        steps=config.steps,
        answer_length=config.max_new_tokens or 64,
        pipeline=config.decoding_pipeline,
        alg=config.alg,
        use_cache=bool(config.use_cache),
        extra=extra,
    )


def draw_scene():
    return render(random_scene(random.Random()))


def build_demo(model, processor, frame_seconds: float = 0.1) -> gr.Blocks:
    """The page. `frame_seconds`: each streamed canvas stays at least this long, so fast decodings stay watchable."""
    defaults = default_settings(model)

    def answer(image, question, threshold, steps, answer_length, pipeline, alg, use_cache, template):
        settings = Settings(threshold, steps, answer_length, pipeline, alg, use_cache, template or "", defaults.extra)
        frames, shown = [], 0.0
        try:
            for item in stream_decoding(model, processor, image, question, settings):
                if isinstance(item, Result):
                    replay = gr.Slider(minimum=0, maximum=len(frames) - 1, value=len(frames) - 1, interactive=True)
                    yield frames[-1], item.answer, item.summary(), frames, replay
                    return
                time.sleep(max(0.0, shown + frame_seconds - time.perf_counter()))
                shown = time.perf_counter()
                frames.append(item)
                yield item, "", f"step {len(frames) - 1}", frames, gr.Slider(interactive=False)
        except (ValueError, TypeError) as error:  # the package's bad-input errors; anything else is a bug
            raise gr.Error(str(error), duration=None, print_exception=False) from error

    def replay(step, frames):
        return frames[int(step)] if frames else None

    with gr.Blocks(title="Dimple: watch it think") as demo:
        gr.Markdown(
            "# Dimple: watch it think\n"
            "A discrete-diffusion VLM answers by filling a canvas of masked slots, several per forward pass. "
            f"Blanks ({BLANK_TEXT}) are undecided slots; orange marks the slots committed in this step, green those "
            f"committed earlier, blue the fixed tokens of your response template; {END_TEXT} is end-of-answer padding."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", elem_id="image", height=240)
                scene = gr.Button("Draw a shapes scene")
                question = gr.Textbox(DEFAULT_QUESTION, label="Question", elem_id="question")
                template = gr.Textbox(
                    "",
                    label="Response template (optional)",
                    placeholder="Color:<|mask|> Shape:<|mask|>",
                    info="Plain text stays fixed, <|mask|> is one slot, <|mask|>*N is N slots; sets the length.",
                    elem_id="template",
                )
                with gr.Accordion("Decoding", open=True):
                    threshold = gr.Slider(
                        0,
                        1,
                        defaults.threshold,
                        step=0.01,
                        label="Threshold γ (0: off, fixed schedule only)",
                        elem_id="threshold",
                    )
                    with gr.Row():
                        steps = gr.Number(
                            defaults.steps, precision=0, maximum=MAX_SLOTS, label="Steps", elem_id="steps"
                        )
                        answer_length = gr.Number(
                            defaults.answer_length, precision=0, maximum=MAX_SLOTS, label="Answer length (slots)"
                        )
                    with gr.Row():
                        pipeline = gr.Radio(PIPELINES, value=defaults.pipeline, label="Pipeline")
                        alg = gr.Dropdown(ALGORITHMS, value=defaults.alg, label="Algorithm")
                    use_cache = gr.Checkbox(defaults.use_cache, label="Prefill cache")
                run = gr.Button("Answer", variant="primary", elem_id="run")
            with gr.Column():
                canvas = gr.HighlightedText(
                    label="Canvas", color_map=COLOR_MAP, show_legend=True, show_inline_category=False, elem_id="canvas"
                )
                step = gr.Slider(0, 1, 0, step=1, label="Replay step", interactive=False, elem_id="replay")
                answer_box = gr.Textbox(label="Answer", elem_id="answer")
                stats = gr.Textbox(label="Decoding", elem_id="stats")
        frames = gr.State([])

        # Drawing a scene and replaying read no model, so they need not wait behind other users' decodings.
        scene.click(draw_scene, None, image, api_name="scene", concurrency_limit=None)
        run.click(
            answer,
            [image, question, threshold, steps, answer_length, pipeline, alg, use_cache, template],
            [canvas, answer_box, stats, frames, step],
            api_name="answer",
        )
        step.input(replay, [step, frames], canvas, api_name="replay", concurrency_limit=None)
    # One model instance: decode one request at a time, in arrival order; each has its own streamer and frames.
    return demo.queue(default_concurrency_limit=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="Checkpoint folder or Hub id.")
    parser.add_argument("--host", help="Address to serve on (default: Gradio's, 127.0.0.1).")
    parser.add_argument("--port", type=int, help="Port (default: Gradio's, 7860 or the next free one).")
    parser.add_argument("--frame-seconds", type=float, default=0.1, help="Shortest time each streamed canvas shows.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, processor = load(args.model)
    build_demo(model, processor, args.frame_seconds).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
