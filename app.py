"""Watch Dimple think: a Gradio demo that streams the denoising canvas after every step.

    pip install -r requirements-app.txt
    python app.py                       # the shapes Dimple shipped in this repository, on CPU
    python app.py --model PATH          # any Dimple checkpoint (GPU and bfloat16 when available)

Upload an image (or draw a shapes scene, or pick an example), ask a question, and watch the answer canvas: undecided
slots are blanks, the slots committed in the latest step are highlighted, and the fixed tokens of a response template
stand from the start. Then the answer, forward passes, tokens per pass and time; a slider replays the finished
decoding and the steps download as an animated GIF. "Stop" ends a decoding at its next step. A confident checkpoint
(the shapes model at γ 0.9) fills its whole answer in one pass; "Watch it think" turns γ off and sets a schedule of a
few slots per step, so the canvas fills visibly.

The page talks to the package only through `diffusion_generate(..., streamer=...)`: a `CanvasCapture` streamer
hands each step's canvas from the decoding thread to the page. Gradio's queue runs one decoding at a time on the one
model and holds a bounded number of waiting requests; every request has its own streamer and its own frames, so
concurrent users never see each other's canvases.
"""

import argparse
import copy
import hashlib
import math
import queue
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

REPO_ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))

from examples.demo import (  # noqa: E402
    DEFAULT_MODEL,
    SHAPES_QUESTIONS,
    SHAPES_TEMPLATE,
    decoding_options,
    figure_font,
    load,
)
from generation_utils import ALGORITHMS, PIPELINES  # noqa: E402
from shapes.task import random_scene, render  # noqa: E402
from transformers_compat import BaseStreamer  # noqa: E402

# Every slot gets a category: Gradio's HighlightedText keeps a slot's old colour when its category becomes None.
BLANK, NEW, DONE, FIXED = "undecided", "committed in this step", "committed earlier", "template (fixed)"
COLOR_MAP = {BLANK: "#d4d4d8", NEW: "#fb923c", DONE: "#bbf7d0", FIXED: "#93c5fd"}
BLANK_TEXT = "_"
END_TEXT = "∅"  # a slot filled with end-of-answer padding (it decodes to nothing)
MAX_SLOTS = 1024  # keeps one request from holding the only model for minutes; the package checks the lower bounds
DEFAULT_QUESTION = "Describe the image."
ERROR_SECONDS = 8  # error toasts expire, so they never cover the canvas of a later answer
QUEUE_SIZE = 16  # requests waiting for the one model; more are refused with Gradio's "queue is full"
WATCH_SLOTS_PER_STEP = 4  # "Watch it think": a fixed schedule of this many slots per step
SEED_RANGE = 2**31  # an empty seed field draws one from [0, SEED_RANGE)
SMALLEST_IMAGE = 28  # pixels: the smallest side the Qwen2-VL image processor accepts (patch 14 x merge 2)
GIF_WIDTH, GIF_FONT_SIZE, GIF_FRAME_MS, GIF_LAST_FRAME_MS = 640, 16, 500, 2500
EXAMPLE_SEEDS = (7, 11, 3, 5)  # shapes scenes for the examples, one per question


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


@dataclass
class Settings:
    """The page's decoding controls, as `diffusion_generate` keywords (and the seed of the torch RNG)."""

    threshold: float  # 0 turns confident decoding off
    steps: int | None
    answer_length: int | None
    pipeline: str
    alg: str
    use_cache: bool
    template: str = ""
    temperature: float = 0.0
    seed: int | None = 0
    extra: dict = field(default_factory=dict)  # the checkpoint's other settings (top-p, top-k, ...)

    def options(self, processor) -> dict:
        options = dict(
            self.extra,
            steps=self.steps,
            max_new_tokens=self.answer_length,
            alg_p_threshold=self.threshold or None,
            decoding_pipeline=self.pipeline,
            alg=self.alg,
            use_cache=self.use_cache,
            temperature=self.temperature,
        )
        if self.template.strip():
            # The template fixes the answer length.
            options.update(response_template=processor.encode_response_template(self.template), max_new_tokens=None)
        return options


def check_request(image, question, settings: Settings, defaults: Settings):
    """The page's own refusals: empty fields, which `diffusion_generate` would otherwise fill with its defaults."""
    if image is None:
        raise ValueError("Upload an image (or press “Draw a shapes scene”): Dimple answers questions about an image.")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("Type a question: the question box is empty.")
    if settings.steps is None:
        raise ValueError(f"Steps is empty: enter the number of denoising steps (the checkpoint's is {defaults.steps}).")
    if settings.answer_length is None and not settings.template.strip():
        raise ValueError(
            "Answer length is empty: enter the number of answer slots (the checkpoint's is "
            f"{defaults.answer_length}), or give a response template, which sets the length."
        )


def prompt_inputs(processor, image, question: str):
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    return processor(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")


def check_answer_fits(model, prompt_length: int, settings: Settings):
    """Name the page's field and the longest answer this prompt leaves room for (a template is checked by the
    package, whose message names the template)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None or settings.template.strip() or settings.answer_length is None:
        return
    if prompt_length + settings.answer_length > positions:
        raise ValueError(
            f"Answer length {settings.answer_length} does not fit: this prompt takes {prompt_length} of the model's "
            f"{positions} positions, which leaves room for at most {positions - prompt_length} answer slots."
        )


def longest_answer(model, processor) -> int:
    """The most answer slots any prompt leaves room for: the positions left after the shortest prompt (the smallest
    image and a one-character question), and at most MAX_SLOTS."""
    positions = getattr(model.config, "max_position_embeddings", None) or MAX_SLOTS
    shortest = prompt_inputs(processor, Image.new("RGB", (SMALLEST_IMAGE, SMALLEST_IMAGE)), "?")["input_ids"]
    return min(MAX_SLOTS, positions - shortest.shape[1])


def stream_decoding(model, processor, image, question: str, settings: Settings, streamer: CanvasCapture = None):
    """Yield the canvas segments after every step (the empty canvas first), then a final `Result`.

    Bad input raises the package's `ValueError` / `TypeError` before the first yield or from the decoding thread;
    setting `streamer.cancelled` makes the next item a `DecodingCancelled`.
    """
    inputs = prompt_inputs(processor, image, question)
    check_answer_fits(model, inputs["input_ids"].shape[1], settings)
    inputs = inputs.to(model.device)
    options = settings.options(processor)
    streamer = streamer or CanvasCapture()
    worker = threading.Thread(
        target=decode, args=(model, processor, inputs, options, settings.seed, streamer), daemon=True
    )
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


# --------------------------------------------------------------------------------------------- the GIF


def chip_layout(segments: list, font, width: int, top: int) -> tuple[list, int]:
    """Slot chips wrapped into lines as the page shows them: ((x, y, w, text, category), ...) and the bottom edge."""
    pad, gap, height = 4, 3, GIF_FONT_SIZE + 10
    x, y, chips = gap, top, []
    for text, category in segments:
        w = int(font.getlength(text)) + 2 * pad
        if x > gap and x + w > width - gap:
            x, y = gap, y + height + gap
        chips.append((x, y, w, text, category))
        x += w + gap
    return chips, y + height + gap


def steps_gif(frames: list[list], path) -> Path:
    """The canvases of one decoding as an animated GIF (one frame per canvas, the last one held longer)."""
    font = figure_font(GIF_FONT_SIZE)
    top = GIF_FONT_SIZE + 12  # the caption line
    layouts = [chip_layout(segments, font, GIF_WIDTH, top) for segments in frames]
    height = max(bottom for _, bottom in layouts)  # GIF frames share one size
    pictures = []
    for index, (chips, _) in enumerate(layouts):
        picture = Image.new("RGB", (GIF_WIDTH, height), "white")
        draw = ImageDraw.Draw(picture)
        draw.text((4, 4), "start" if index == 0 else f"step {index} of {len(frames) - 1}", fill="black", font=font)
        for x, y, w, text, category in chips:
            draw.rounded_rectangle((x, y, x + w, y + GIF_FONT_SIZE + 10), radius=4, fill=COLOR_MAP[category])
            draw.text((x + 4, y + 4), text, fill="black", font=font)
        pictures.append(picture)
    durations = [GIF_FRAME_MS] * (len(pictures) - 1) + [GIF_LAST_FRAME_MS]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return Path(path)


# ----------------------------------------------------------------------------------------------- the page


def default_settings(model) -> Settings:
    """The checkpoint's own diffusion settings, else the released chat settings (as `examples/demo.py` runs)."""
    extra = decoding_options(model)
    config = copy.deepcopy(model.generation_config)  # a DimpleGenerationConfig: the model declares its class
    config.update(**extra)
    config.fill_diffusion_defaults(model.config)
    for name in ("steps", "max_new_tokens", "alg_p_threshold", "decoding_pipeline", "alg", "use_cache", "temperature"):
        extra.pop(name, None)
    return Settings(
        threshold=config.alg_p_threshold or 0.0,
        steps=config.steps,
        answer_length=config.max_new_tokens or 64,
        pipeline=config.decoding_pipeline,
        alg=config.alg,
        use_cache=bool(config.use_cache),
        temperature=config.temperature or 0.0,
        extra=extra,
    )


def watch_settings(answer_length: int | None, defaults: Settings) -> tuple[float, int, int]:
    """The "Watch it think" preset, (γ, steps, length): γ off, a schedule of WATCH_SLOTS_PER_STEP slots per step."""
    length = int(answer_length or defaults.answer_length)
    return 0.0, max(1, math.ceil(length / WATCH_SLOTS_PER_STEP)), length


def refuse_unreadable_files(image: gr.Image) -> gr.Image:
    """Make `image` answer a file PIL cannot read with a message instead of a bare "Error" badge.

    Wrapped on the instance: a subclass of a Gradio component makes Gradio write a `.pyi` file beside this module.
    """
    preprocess = image.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except UnidentifiedImageError as error:
            name = getattr(payload, "orig_name", None) or "The upload"
            raise gr.Error(
                f"{name} is not an image this demo can read; upload a PNG, JPEG, WebP or GIF picture.",
                duration=ERROR_SECONDS,
                print_exception=False,
            ) from error

    image.preprocess = checked
    return image


def draw_scene():
    return render(random_scene(random.Random()))


def example_rows(folder: Path) -> list[list]:
    """[image file, question, template] per example: shapes scenes with the questions of `examples/demo.py`."""
    questions = [(question, "") for question in SHAPES_QUESTIONS] + [SHAPES_TEMPLATE]
    rows = []
    for seed, (question, template) in zip(EXAMPLE_SEEDS, questions):
        path = folder / f"scene-{seed}.png"
        render(random_scene(random.Random(seed))).save(path)
        rows.append([str(path), question, template])
    return rows


def build_demo(model, processor, frame_seconds: float = 0.1, queue_size: int = QUEUE_SIZE) -> gr.Blocks:
    """The page. `frame_seconds`: each streamed canvas stays at least this long, so fast decodings stay watchable;
    `queue_size`: the most requests waiting for the model."""
    defaults = default_settings(model)
    slot_limit = longest_answer(model, processor)
    files = Path(tempfile.mkdtemp(prefix="dimple-demo-"))  # example scenes and each session's latest GIF
    running: dict[str, CanvasCapture] = {}  # session -> its decoding's streamer, for Stop

    def finished(frames, answer_text, summary, session):
        """The last canvas, the answer, the summary, the frames, the replay slider over them, the GIF."""
        if not frames:
            return None, answer_text, summary, frames, gr.Slider(interactive=False), None
        replay = gr.Slider(minimum=0, maximum=len(frames) - 1, value=len(frames) - 1, interactive=True)
        # The client names its session: hash it rather than trust it in a file name.
        name = hashlib.sha256(session.encode()).hexdigest()[:16]
        return frames[-1], answer_text, summary, frames, replay, str(steps_gif(frames, files / f"{name}.gif"))

    def answer(
        image, question, threshold, steps, answer_length, pipeline, alg, use_cache, template, temperature, seed,
        request: gr.Request,
    ):  # fmt: skip
        seed = random.randrange(SEED_RANGE) if seed is None else int(seed)
        settings = Settings(
            threshold, steps, answer_length, pipeline, alg, use_cache, template or "", temperature, seed, defaults.extra
        )
        session, streamer = request.session_hash, CanvasCapture()
        running[session] = streamer
        frames, shown = [], 0.0
        try:
            check_request(image, question, settings, defaults)
            for item in stream_decoding(model, processor, image, question, settings, streamer):
                if isinstance(item, Result):
                    summary = f"{item.summary()} · seed: {seed}"
                    if item.passes == 1 and len(frames) > 1:
                        summary += " · the whole answer came in one pass: press “Watch it think” to see the steps"
                    yield finished(frames, item.answer, summary, session)
                    return
                time.sleep(max(0.0, shown + frame_seconds - time.perf_counter()))
                shown = time.perf_counter()
                frames.append(item)
                yield item, "", f"step {len(frames) - 1}", frames, gr.Slider(interactive=False), None
        except DecodingCancelled:
            yield finished(frames, "", f"stopped after step {max(0, len(frames) - 1)}", session)
        except (ValueError, TypeError) as error:  # the package's and the page's bad-input errors; others are bugs
            raise gr.Error(str(error), duration=ERROR_SECONDS, print_exception=False) from error
        finally:
            if running.get(session) is streamer:
                del running[session]

    def stop(request: gr.Request):
        streamer = running.get(request.session_hash)
        if streamer is not None:
            streamer.cancelled.set()

    def replay(step, frames):
        return frames[int(step)] if frames else None

    def watch(answer_length):
        return watch_settings(answer_length, defaults)

    def checkpoint_settings():
        return (
            defaults.threshold, defaults.steps, defaults.answer_length, defaults.pipeline, defaults.alg,
            defaults.use_cache, defaults.temperature,
        )  # fmt: skip

    with gr.Blocks(title="Dimple: watch it think", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# Dimple: watch it think\n"
            "A discrete-diffusion VLM answers by filling a canvas of masked slots, several per forward pass. "
            f"Blanks ({BLANK_TEXT}) are undecided slots; orange marks the slots committed in this step, green those "
            f"committed earlier, blue the fixed tokens of your response template; {END_TEXT} is end-of-answer padding. "
            "A confident model fills the whole answer in one pass: press **Watch it think** to see the steps."
        )
        with gr.Row():
            with gr.Column():
                image = refuse_unreadable_files(gr.Image(type="pil", label="Image", elem_id="image", height=240))
                scene = gr.Button("Draw a shapes scene")
                question = gr.Textbox(DEFAULT_QUESTION, label="Question", elem_id="question")
                template = gr.Textbox(
                    "",
                    label="Response template (optional)",
                    placeholder="Color:<|mask|> Shape:<|mask|>",
                    info="Plain text stays fixed, <|mask|> is one slot, <|mask|>*N is N slots; sets the length.",
                    elem_id="template",
                )
                with gr.Row():
                    run = gr.Button("Answer", variant="primary", elem_id="run")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Row():
                    watch_button = gr.Button(
                        f"Watch it think (γ off, {WATCH_SLOTS_PER_STEP} slots per step)", elem_id="watch"
                    )
                    reset = gr.Button("Checkpoint's settings", elem_id="reset")
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
                            defaults.steps, precision=0, minimum=1, maximum=slot_limit, label="Steps", elem_id="steps"
                        )
                        answer_length = gr.Number(
                            defaults.answer_length,
                            precision=0,
                            minimum=1,
                            maximum=slot_limit,
                            label="Answer length (slots)",
                            info=f"At most {slot_limit}: the model's positions minus the shortest prompt.",
                            elem_id="answer_length",
                        )
                    with gr.Row():
                        temperature = gr.Slider(
                            0,
                            2,
                            defaults.temperature,
                            step=0.05,
                            label="Temperature (0: argmax)",
                            elem_id="temperature",
                        )
                        seed = gr.Number(
                            defaults.seed, precision=0, minimum=0, maximum=SEED_RANGE - 1, label="Seed (empty: random)",
                            elem_id="seed",
                        )  # fmt: skip
                    with gr.Row():
                        pipeline = gr.Radio(PIPELINES, value=defaults.pipeline, label="Pipeline")
                        alg = gr.Dropdown(list(ALGORITHMS), value=defaults.alg, label="Algorithm")
                    use_cache = gr.Checkbox(defaults.use_cache, label="Prefill cache")
            with gr.Column():
                canvas = gr.HighlightedText(
                    label="Canvas", color_map=COLOR_MAP, show_legend=True, show_inline_category=False, elem_id="canvas"
                )
                step = gr.Slider(0, 1, 0, step=1, label="Replay step", interactive=False, elem_id="replay")
                answer_box = gr.Textbox(label="Answer", elem_id="answer")
                stats = gr.Textbox(label="Decoding", elem_id="stats")
                gif = gr.File(label="The steps as an animated GIF", elem_id="gif")
        gr.Examples(example_rows(files), [image, question, template], cache_examples=False)
        frames = gr.State([])

        # Events that read no model bypass the queue: they never wait behind decodings, nor meet a full queue (Stop).
        scene.click(draw_scene, None, image, api_name="scene", queue=False)
        # Reading the upload at once: a file that is no image gets its message now, not at "Answer".
        image.upload(lambda _: None, image, None, api_visibility="private", concurrency_limit=None)
        run.click(
            answer,
            [image, question, threshold, steps, answer_length, pipeline, alg, use_cache, template, temperature, seed],
            [canvas, answer_box, stats, frames, step, gif],
            api_name="answer",
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
    demo.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
