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

This file is the page: its layout, its events and per-session Stop. The rest has no Gradio in it: how a request is
read and checked (`app_requests.py`), how it decodes (`app_decoding.py`), and how its canvas and GIF are drawn
(`app_canvas.py`, Pillow only).
"""

import argparse
import collections
import math
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import torch

REPO_ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))

from app_canvas import BLANK_TEXT, COLOR_MAP, END_TEXT, gif_name, steps_gif, stopped_note  # noqa: E402
from app_decoding import (  # noqa: E402
    MAX_SLOTS,
    CanvasCapture,
    DecodingCancelled,
    Result,
    longest_answer,
    stream_decoding,
)
from app_requests import (  # noqa: E402
    LABELS,
    PAGE_SETTINGS,
    SEED_RANGE,
    TEMPERATURE_RANGE,
    Checks,
    checkpoint_base,
    field_values,
    number_problem,
    number_value,
    read_leniently,
    read_upload,
    resolve_settings,
)
from generation_utils import ALGORITHMS, PIPELINES  # noqa: E402
from modeling_dimple import DimpleForConditionalGeneration  # noqa: E402
from processing_dimple import DimpleProcessor  # noqa: E402
from shapes.task import ATTRIBUTES_TEMPLATE, random_scene, render  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "checkpoints" / "dimple-shapes"
DEFAULT_QUESTION = "Describe the image."
ERROR_SECONDS = 8  # error toasts expire, so they never cover the canvas of a later answer
QUEUE_SIZE = 16  # requests waiting for the one model; more are refused with Gradio's "queue is full"
WATCH_SLOTS_PER_STEP = 4  # "Watch it think": a fixed schedule of this many slots per step
# (shapes scene seed, question, response template, button label) per example.
EXAMPLES = (
    (7, "Describe the image.", "", "Describe the image."),
    (11, "What color is the shape on the left?", "", "What color is the shape on the left?"),
    (3, "How many shapes are there?", "", "How many shapes are there?"),
    (5, "What are the color and shape of the object on the left?", ATTRIBUTES_TEMPLATE, "Color and shape (template)"),
)
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


# --------------------------------------------------------------------------------------------------- sessions


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
