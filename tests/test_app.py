"""The Gradio demo (`app.py` and the `app_*.py` modules it uses): streamed canvases, refusals, Stop, seed, GIF,
queue, the API and a real browser (the pure drawing of the canvas and the GIF: test_app_canvas.py).

Needs the optional app dependencies (`pip install -r requirements-app.txt`) and is skipped without gradio; the browser
tests also need Playwright and a system Chromium (`apt-get install chromium`) and are skipped without them. Set
`APP_SCREENSHOTS=docs` to refresh docs/web-demo.md's screenshots (desktop and a 390 px phone, mid-decoding and
finished) and the README's (app-canvas.png).
"""

import os
import random
import re
import shutil
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the server under test
gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import app  # noqa: E402
from app_canvas import BLANK, BLANK_TEXT, DONE, END_TEXT, FIXED, NEW, canvas_segments  # noqa: E402
from app_decoding import SMALLEST_IMAGE, longest_answer, stream_decoding  # noqa: E402
from app_requests import (  # noqa: E402
    RELEASED_CHAT_SETTINGS,
    checkpoint_base,
    field_values,
    page_settings,
    resolve_settings,
)
from gradio_client.exceptions import ValidationError  # noqa: E402
from gradio_client.utils import QueueError, Status  # noqa: E402
from shapes.task import random_scene, render  # noqa: E402

# Threshold off and 8 steps for 32 slots: 4 slots per step, so every decoding shows intermediate canvases. The
# generation config's own names, in the order of the page's inputs after the question.
SETTINGS = dict(
    alg_p_threshold=0.0, steps=8, max_new_tokens=32, decoding_pipeline="dim", alg="maskgit_plus", use_cache=True
)
# The page's inputs after the template, with their values in these tests.
SAMPLING = dict(temperature=0.0, seed=0)
FRAME_SECONDS = 0.25  # each streamed canvas stays long enough for the browser to see it
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def dimple():
    return app.load(app.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Uploads a visitor might try: a scene, its 8-bit greyscale and 16-bit greyscale versions, an animated GIF, a
    text file, PNGs whose headers claim 40000 x 40000 pixels (a decompression bomb, refused by Pillow on opening) and
    10000 x 10000 (beyond Pillow's warning bound), and a PNG cut in half."""
    folder = tmp_path_factory.mktemp("app")
    scene = render(random_scene(random.Random(7)))
    scene.save(folder / "scene.png")
    grey = scene.convert("L")
    grey.save(folder / "grey-8bit.png")
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(folder / "grey-16bit.png")  # 255 -> 65535
    other = render(random_scene(random.Random(11)))
    scene.save(folder / "animated.gif", save_all=True, append_images=[other], duration=200, loop=0)
    (folder / "not-an-image.png").write_text("a text file with an image's name")
    (folder / "bomb.png").write_bytes(png_header(40_000, 40_000))
    (folder / "large.png").write_bytes(png_header(10_000, 10_000))
    whole = (folder / "scene.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return folder


def png_header(width: int, height: int) -> bytes:
    """A small PNG file whose header declares a greyscale picture of this size (Pillow checks the size on opening)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def scene(files):
    return files / "scene.png"


@pytest.fixture(scope="module")
def server(dimple):
    model, processor = dimple
    demo = app.build_demo(model, processor, frame_seconds=FRAME_SECONDS)
    _, url, _ = app.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def reference(dimple, image, question, template="", temperature=0.0, seed=0, **settings):
    """The answer of `diffusion_generate` called directly, with the settings the page sends."""
    model, processor = dimple
    torch.manual_seed(seed)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    options = dict(settings, alg_p_threshold=settings["alg_p_threshold"] or None, temperature=temperature)
    if template:
        options.update(response_template=processor.encode_response_template(template), max_new_tokens=None)
    output = model.diffusion_generate(**inputs, **options, return_dict_in_generate=True)
    answer = output.sequences[0, inputs["input_ids"].shape[1] :]
    return processor.post_process_answer(answer, skip_special_tokens=True), int(output.num_forward_passes[0])


def stream(dimple, image, question, template="", **overrides):
    model, processor = dimple
    settings = page_settings(**{**SETTINGS, **overrides}, temperature=0.0)
    items = list(stream_decoding(model, processor, image, question, settings, template))
    return items[:-1], items[-1]


def api_args(image, question, template="", **overrides):
    """The `/answer` endpoint's arguments, in the order of the page's inputs (SETTINGS, the template, SAMPLING)."""
    settings = {name: overrides.get(name, value) for name, value in SETTINGS.items()}
    sampling = {name: overrides.get(name, value) for name, value in SAMPLING.items()}
    image = image and gradio_client.handle_file(str(image))
    return (image, question, *settings.values(), template, *sampling.values())


def categories(canvas) -> list:
    """Category per slot, from the page's (text, category) pairs or the API's {token, class_or_confidence}."""
    return [item["class_or_confidence"] if isinstance(item, dict) else item[1] for item in canvas]


def texts(canvas) -> list[str]:
    return [item["token"] if isinstance(item, dict) else item[0] for item in canvas]


# --------------------------------------------------------------------------------------- the canvas itself


def test_canvas_shows_blanks_new_fixed_and_earlier_slots(dimple):
    _, processor = dimple
    tokenizer, mask = processor.tokenizer, processor.mask_token_id
    [fixed], [early], [late] = (tokenizer.encode(word) for word in ("Color", " red", " circle"))
    start = [fixed, mask, mask, mask]
    previous = [fixed, early, mask, mask]
    canvas = [fixed, early, late, mask]
    assert canvas_segments(tokenizer, canvas, previous, start, mask) == [
        ("Color", FIXED),
        (" red", DONE),
        (" circle", NEW),
        (BLANK_TEXT, BLANK),
    ]
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert canvas_segments(tokenizer, [end], [mask], [mask], mask) == [(END_TEXT, NEW)]


def test_stream_fills_the_canvas_and_ends_with_diffusion_generates_answer(dimple, scene):
    image = Image.open(scene).convert("RGB")
    question = "Describe the image."
    canvases, result = stream(dimple, image, question)
    expected, passes = reference(dimple, image, question, **SETTINGS)
    assert result.answer == expected
    assert result.passes == passes == len(canvases) - 1 == 8
    assert set(categories(canvases[0])) == {BLANK}
    blanks = [categories(canvas).count(BLANK) for canvas in canvases]
    assert blanks == sorted(blanks, reverse=True) and blanks[-1] == 0
    # Each step highlights exactly the slots it committed.
    assert [categories(canvas).count(NEW) for canvas in canvases[1:]] == result.tokens_per_step
    assert "".join(t for t in texts(canvases[-1]) if t != END_TEXT) == expected


def test_template_tokens_stand_fixed_from_the_first_canvas(dimple, scene):
    image = Image.open(scene).convert("RGB")
    question, template = "What are the color and shape of the object on the left?", "Color:<|mask|> Shape:<|mask|>"
    canvases, result = stream(dimple, image, question, template)
    assert result.answer == reference(dimple, image, question, template, **SETTINGS)[0]
    assert categories(canvases[0]) == [FIXED, FIXED, BLANK, FIXED, FIXED, BLANK]
    assert all(categories(canvas)[:2] == [FIXED, FIXED] for canvas in canvases)
    assert result.answer.startswith("Color:") and " Shape:" in result.answer


def test_page_defaults_are_the_checkpoints_settings_through_the_models_resolver(dimple):
    model, _ = dimple
    config = model.generation_config
    defaults = field_values(resolve_settings(model, checkpoint_base(model)))
    assert (defaults["alg_p_threshold"], defaults["steps"], defaults["max_new_tokens"], defaults["alg"]) == (
        config.alg_p_threshold, config.steps, config.max_new_tokens, config.alg
    )  # fmt: skip
    # A checkpoint whose generation config does not select diffusion (the released 7B) starts from the released
    # chat settings, by the generation config's own names.
    config.decoding = "autoregressive"
    try:
        base = checkpoint_base(model)
        resolved = resolve_settings(model, base)
    finally:
        config.decoding = "diffusion"
    assert base == RELEASED_CHAT_SETTINGS
    assert (resolved.steps, resolved.top_k, resolved.alg, resolved.alg_p_threshold) == (64, 50, "origin", 0.95)


# --------------------------------------------------------------------------------------- the GIF of the steps


def test_steps_download_as_an_animated_gif_with_a_stable_descriptive_name(server, scene):
    client = gradio_client.Client(server, verbose=False)
    names = []
    for _ in range(2):
        job = client.submit(*api_args(scene, "Describe the image."), api_name="/answer")
        *_, gif = job.result(timeout=300)
        names.append(Path(gif).name)
        with Image.open(gif) as picture:
            assert picture.format == "GIF" and picture.is_animated
            assert picture.n_frames == len(job.outputs()) - 1 == 9  # the empty canvas, then 8 steps
            assert picture.info["loop"] == 0
    assert names == ["dimple-describe-the-image-8-steps.gif"] * 2


# ------------------------------------------------------------------------------ the API (gradio_client)


def test_two_concurrent_clients_get_their_own_answers_and_canvases(server, dimple, scene):
    questions = ["Describe the image.", "How many shapes are there?"]
    clients = [gradio_client.Client(server, verbose=False) for _ in questions]
    jobs = [client.submit(*api_args(scene, q), api_name="/answer") for client, q in zip(clients, questions)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job.result(timeout=300), jobs))
    image = Image.open(scene).convert("RGB")
    for question, job, (final_canvas, answer, summary, _, _) in zip(questions, jobs, results):
        assert answer == reference(dimple, image, question, **SETTINGS)[0]
        assert summary.startswith("forward passes: 8 ")
        # Every canvas this client saw is a stage of its own answer: no slot ever showed another request's token.
        final = texts(final_canvas)
        for canvas, *_ in job.outputs()[:-1]:
            assert all(text == end or text == BLANK_TEXT for text, end in zip(texts(canvas), final))
    assert results[0][1] != results[1][1]


def test_replay_returns_this_sessions_own_steps(server, scene):
    client = gradio_client.Client(server, verbose=False)
    job = client.submit(*api_args(scene, "Describe the image."), api_name="/answer")
    final_canvas, _, _, replay_slider, _ = job.result(timeout=300)
    assert (replay_slider["maximum"], replay_slider["value"], replay_slider["interactive"]) == (8, 8, True)
    assert set(categories(client.predict(0, api_name="/replay"))) == {BLANK}
    assert client.predict(8, api_name="/replay") == final_canvas
    assert client.predict(3, api_name="/replay") == job.outputs()[3][0]


LONG_QUESTION = "How many shapes are there? " * 1852  # 50,004 characters


@pytest.mark.parametrize(
    "image, question, template, change, field, message",
    [
        (None, "How many shapes?", "", {}, "image", "Upload an image"),
        ("not-an-image.png", "How many shapes?", "", {}, "image", "not-an-image.png is not an image this demo can"),
        ("bomb.png", "How many shapes?", "", {}, "image", "bomb.png is too large"),
        ("large.png", "How many shapes?", "", {}, "image", "large.png is too large (10000 × 10000 pixels)"),
        ("truncated.png", "How many shapes?", "", {}, "image", "truncated.png is cut short or damaged"),
        ("scene.png", "", "", {}, "question", "Type a question"),
        ("scene.png", " \n\t", "", {}, "question", "Type a question"),
        ("scene.png", LONG_QUESTION, "", {}, "question", "The question is too long: it takes"),
        ("scene.png", "How many shapes?", "", dict(max_new_tokens=None), "max_new_tokens", "Answer length is empty"),
        ("scene.png", "How many shapes?", "", dict(steps=None), "steps", "Steps is empty"),
        ("scene.png", "How many shapes?", "Color:<|mask|>*0", {}, "response_template", "Invalid slot '<|mask|>*0'"),
        ("scene.png", "How many shapes?", "", dict(steps=0), "steps", "Steps must be from 1 to 481; got 0"),
        ("scene.png", "How many shapes?", "", dict(steps="eight"), "steps", "Steps must be a whole number"),
        ("scene.png", "How many shapes?", "", dict(max_new_tokens="many"), "max_new_tokens", "Answer length must be"),
        ("scene.png", "How many shapes?", "", dict(max_new_tokens=1024), "max_new_tokens", "got 1024"),
        ("scene.png", "How many shapes?", "", dict(alg_p_threshold="high"), "alg_p_threshold", "Threshold γ must"),
        ("scene.png", "How many shapes?", "", dict(temperature="hot"), "temperature", "Temperature must be a number"),
        ("scene.png", "How many shapes?", "", dict(seed="lucky"), "seed", "Seed must be a whole number"),
        ("scene.png", "How many shapes?", "", dict(alg="best"), "alg", "Algorithm must be one of"),
        (
            "scene.png",
            "Describe the image. " * 20,
            "",
            dict(max_new_tokens=481),
            "max_new_tokens",
            "Answer length 481 does not fit",
        ),
        (
            "scene.png",
            "How many shapes?",
            "",
            dict(decoding_pipeline="dream", alg="origin-ratio"),
            "alg",
            "does not exist in the dream pipeline",
        ),
    ],
)
def test_bad_input_is_refused_on_its_field_before_it_joins_the_queue(
    server, files, image, question, template, change, field, message
):
    client = gradio_client.Client(server, verbose=False)
    image = image and files / image
    with pytest.raises(ValidationError) as error:
        client.predict(*api_args(image, question, template, **change), api_name="/answer")
    # One problem, on its field, with what to do: "- steps: Steps must be from 1 to 481; got 0. ...".
    [line] = str(error.value).splitlines()[1:]
    assert line.startswith(f"- {field}: ") and message in line
    assert "answer slots" not in line or "at most -" not in line  # never a negative count


def test_every_field_with_a_problem_is_named_at_once(server):
    client = gradio_client.Client(server, verbose=False)
    with pytest.raises(ValidationError) as error:
        client.predict(*api_args(None, "", "Color:<|mask|>*0"), api_name="/answer")
    fields = [line.split(":")[0] for line in str(error.value).splitlines()[1:]]
    assert fields == ["- image", "- question", "- response_template"]


def test_the_app_keeps_serving_after_refusals_and_reads_numbers_sent_as_text(server, scene):
    client = gradio_client.Client(server, verbose=False)
    for steps in (0, "eight", None):
        with pytest.raises(ValidationError):
            client.predict(*api_args(scene, "How many shapes are there?", steps=steps), api_name="/answer")
    expected = client.predict(*api_args(scene, "How many shapes are there?"), api_name="/answer")[1]
    as_text = dict(steps="8.0", max_new_tokens="32", alg_p_threshold="0", temperature="0", seed="0")
    _, answer, summary, _, _ = client.predict(*api_args(scene, "How many shapes are there?", **as_text),
                                              api_name="/answer")  # fmt: skip
    assert answer == expected and summary.startswith("forward passes: 8 ")


def test_a_16_bit_greyscale_upload_answers_as_its_8_bit_version(server, dimple, files):
    client = gradio_client.Client(server, verbose=False)
    question = "Describe the image."
    results = [client.predict(*api_args(files / name, question), api_name="/answer") for name in
               ("grey-8bit.png", "grey-16bit.png")]  # fmt: skip
    assert results[0][:2] == results[1][:2]
    expected = reference(dimple, Image.open(files / "grey-8bit.png").convert("RGB"), question, **SETTINGS)[0]
    assert results[1][1] == expected


def test_an_animated_gif_is_answered_about_its_first_frame_and_says_so(server, dimple, files, scene):
    client = gradio_client.Client(server, verbose=False)
    question = "Describe the image."
    _, answer, summary, _, _ = client.predict(*api_args(files / "animated.gif", question), api_name="/answer")
    assert summary.endswith("about the first of the GIF's 2 frames")
    assert answer == reference(dimple, Image.open(scene).convert("RGB"), question, **SETTINGS)[0]


def test_an_empty_template_and_answer_length_uses_the_template(server, scene):
    # The template sets the length, so an empty "Answer length" is no error then.
    client = gradio_client.Client(server, verbose=False)
    question = "What are the color and shape of the object on the left?"
    args = api_args(scene, question, "Color:<|mask|> Shape:<|mask|>", max_new_tokens=None)
    _, answer, _, _, _ = client.predict(*args, api_name="/answer")
    assert answer.startswith("Color:")


def test_answer_length_is_bounded_by_the_positions_the_prompt_leaves(dimple):
    model, processor = dimple
    positions = model.config.max_position_embeddings
    limit = longest_answer(model, processor)
    assert limit < positions
    # The shortest prompt (smallest image, one character) with the longest answer fills every position exactly.
    smallest = Image.new("RGB", (SMALLEST_IMAGE, SMALLEST_IMAGE), "white")
    canvases, result = stream(dimple, smallest, "?", max_new_tokens=limit, steps=1)
    assert len(canvases[-1]) == limit and result.passes == 1
    leaves = f"of the model's {positions} positions, which leaves room for at most {limit} "
    with pytest.raises(ValueError, match=leaves):
        stream(dimple, smallest, "?", max_new_tokens=limit + 1, steps=1)
    # A longer prompt leaves fewer slots; the page names its field and the longest answer that fits.
    with pytest.raises(ValueError, match=f"Answer length {limit} does not fit") as error:
        stream(dimple, smallest, "Describe the image. " * 8, max_new_tokens=limit, steps=1)
    assert 0 < int(re.search(r"at most (\d+) answer slots", str(error.value)).group(1)) < limit
    # A prompt that leaves no slot at all is the question's fault, not the answer length's.
    with pytest.raises(ValueError, match="The question is too long") as error:
        stream(dimple, smallest, LONG_QUESTION, steps=1)
    assert "answer slots" not in str(error.value)


def test_watch_it_think_shows_the_denoising_that_the_checkpoints_settings_skip(server, scene, dimple):
    client = gradio_client.Client(server, verbose=False)
    model, _ = dimple
    # The checkpoint's own settings (γ 0.9) fill the whole answer in the first pass, and the page says so.
    threshold, steps, length, pipeline, alg, use_cache, _ = client.predict(api_name="/checkpoint_settings")
    assert (threshold, steps, length) == (model.generation_config.alg_p_threshold, 32, 32)
    checkpoint = dict(
        alg_p_threshold=threshold, steps=steps, max_new_tokens=length, decoding_pipeline=pipeline, alg=alg
    )
    job = client.submit(*api_args(scene, "Describe the image.", **checkpoint), api_name="/answer")
    _, _, summary, _, _ = job.result(timeout=300)
    assert summary.startswith("forward passes: 1 ") and "Watch it think" in summary
    # One click: γ off, 4 slots per step; the canvas then passes through 8 partly blank stages.
    assert client.predict(32, api_name="/watch") == (0.0, 8, 32)
    watch = dict(checkpoint, alg_p_threshold=0.0, steps=8)
    job = client.submit(*api_args(scene, "Describe the image.", **watch), api_name="/answer")
    _, _, summary, _, _ = job.result(timeout=300)
    assert summary.startswith("forward passes: 8 ") and "Watch it think" not in summary
    blanks = [categories(output[0]).count(BLANK) for output in job.outputs()[:-1]]
    assert blanks[0] == 32 and sum(0 < count < 32 for count in blanks) == 7


def test_temperature_and_seed_reproduce_diffusion_generate(server, scene, dimple):
    client = gradio_client.Client(server, verbose=False)
    image = Image.open(scene).convert("RGB")
    question = "Describe the image."
    sampled = dict(SETTINGS, alg="origin", temperature=1.5)
    for seed in (1, 2):
        _, answer, summary, _, _ = client.predict(*api_args(scene, question, **sampled, seed=seed), api_name="/answer")
        assert answer == reference(dimple, image, question, seed=seed, **sampled)[0]
        assert summary.endswith(f"seed: {seed}")
    # An empty seed draws one and reports it, so the answer can be reproduced.
    _, answer, summary, _, _ = client.predict(*api_args(scene, question, **sampled, seed=None), api_name="/answer")
    drawn = int(summary.rsplit("seed: ", 1)[1])
    assert answer == reference(dimple, image, question, seed=drawn, **sampled)[0]


def test_stop_ends_the_running_decoding_and_keeps_its_steps(server, scene):
    client = gradio_client.Client(server, verbose=False)
    # 32 steps of one slot: about 8 s of canvases at FRAME_SECONDS each, time enough to press Stop.
    job = client.submit(*api_args(scene, "Describe the image.", steps=32), api_name="/answer")
    while len(job.outputs()) < 3:
        time.sleep(0.05)
    client.predict(api_name="/stop")
    final_canvas, answer, summary, replay_slider, _ = job.result(timeout=300)
    stopped_at = int(re.match(r"stopped after step (\d+): Stopped ", summary).group(1))
    assert 1 <= stopped_at < 32 and answer == ""
    assert categories(final_canvas).count(BLANK) > 0
    assert (replay_slider["maximum"], replay_slider["interactive"]) == (stopped_at, True)
    # The next answer of this session runs in full: the Stop does not linger.
    _, answer, summary, _, _ = client.predict(*api_args(scene, "Describe the image."), api_name="/answer")
    assert answer and summary.startswith("forward passes: 8 ")


def test_stop_cancels_a_request_still_waiting_in_the_queue(server, scene):
    busy, waiting = (gradio_client.Client(server, verbose=False) for _ in range(2))
    running = busy.submit(*api_args(scene, "Describe the image.", steps=32), api_name="/answer")
    while not running.outputs():  # streaming canvases: it has left the queue
        time.sleep(0.05)
    queued = waiting.submit(*api_args(scene, "How many shapes are there?"), api_name="/answer")
    while queued.status().code != Status.IN_QUEUE:
        time.sleep(0.05)
    waiting.predict(api_name="/stop")
    canvas, answer, summary, _, gif = queued.result(timeout=300)
    assert summary.startswith("stopped while waiting in the queue") and answer == "" and canvas is None
    assert gif is None and running.result(timeout=300)[1]  # the other session's decoding ran in full


def test_the_queue_refuses_requests_beyond_its_size(dimple, scene):
    model, processor = dimple
    demo = app.build_demo(model, processor, frame_seconds=FRAME_SECONDS, queue_size=1)
    _, url, _ = app.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        clients = [gradio_client.Client(url, verbose=False) for _ in range(3)]
        running = clients[0].submit(*api_args(scene, "Describe the image.", steps=32), api_name="/answer")
        while not running.outputs():  # streaming canvases: it has left the queue
            time.sleep(0.05)
        waiting = clients[1].submit(*api_args(scene, "How many shapes are there?"), api_name="/answer")
        while waiting.status().code != Status.IN_QUEUE:
            time.sleep(0.05)
        with pytest.raises(QueueError, match="Queue is full"):
            clients[2].predict(*api_args(scene, "Describe the image."), api_name="/answer")
        assert running.result(timeout=300)[1] and waiting.result(timeout=300)[1]
    finally:
        demo.close()


# ------------------------------------------------------------------------------------------- the browser


def mid_decoding(blank_share: float) -> str:
    """A page condition: the canvas shows committed slots and blanks, with fewer than `blank_share` of slots blank."""
    return """() => {
        const slots = [...document.querySelectorAll('#canvas .token .text')].map(node => node.textContent);
        const blanks = slots.filter(text => text === '%s').length;
        return blanks > 0 && blanks < slots.length * %s;
    }""" % (BLANK_TEXT, blank_share)


ANSWERED = "() => document.querySelector('#answer textarea').value !== ''"


@pytest.fixture(scope="module")
def browser(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no system Chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def open_page(browser, server, viewport):
    page = browser.new_page(viewport=viewport)
    page.goto(server)
    page.locator("#run").wait_for()
    return page


@pytest.fixture(scope="module")
def page(browser, server):
    page = open_page(browser, server, DESKTOP)
    yield page
    page.close()


@pytest.fixture(scope="module")
def phone(browser, server):
    page = open_page(browser, server, PHONE)
    yield page
    page.close()


def ask_in_page(page, image, question, template="", submit="click"):
    page.locator("#image input[type=file]").set_input_files(str(image))
    page.locator("#image img").wait_for(timeout=30_000)  # uploaded and shown
    page.locator("#question textarea").fill(question)
    page.locator("#template textarea").fill(template)
    page.locator("#threshold input[type=number]").fill(str(SETTINGS["alg_p_threshold"]))
    page.locator("#steps input").fill(str(SETTINGS["steps"]))
    if submit == "click":
        page.locator("#run").click()
    else:
        page.locator("#question textarea").press("Enter")


def screenshot(page, name: str, tmp_path, full_page=False):
    """Save a screenshot of the first view (or the whole page): into APP_SCREENSHOTS (docs/) when set, else a
    scratch folder."""
    folder = Path(os.environ.get("APP_SCREENSHOTS", tmp_path))
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(400)  # let the chips' colour transitions finish
    page.screenshot(path=folder / name, full_page=full_page)


def field_message(page, field: str) -> str:
    return page.locator(f"#{field} .validation-error").first.inner_text(timeout=30_000)


def test_browser_first_view_on_a_desktop(page):
    # The examples are above the fold, "Watch it think" is one line, and there is no empty GIF box before a run.
    examples = page.locator("#examples").bounding_box()
    assert examples["y"] + examples["height"] <= DESKTOP["height"]
    watch_lines = page.locator("#watch").evaluate(
        "button => { const range = document.createRange(); range.selectNodeContents(button);"
        " return new Set([...range.getClientRects()].map(rect => Math.round(rect.top))).size; }"
    )
    assert watch_lines == 1
    assert not page.locator("#gif").is_visible()


def test_browser_streams_the_canvas_and_shows_diffusion_generates_answer(page, dimple, scene, tmp_path):
    question = "Describe the image."
    ask_in_page(page, scene, question)
    page.wait_for_function(mid_decoding(0.6), timeout=120_000)
    screenshot(page, "app-desktop-decoding.png", tmp_path)
    page.wait_for_function(ANSWERED, timeout=120_000)
    expected = reference(dimple, Image.open(scene).convert("RGB"), question, **SETTINGS)[0]
    assert page.locator("#answer textarea").input_value() == expected
    assert page.locator("#stats textarea").input_value().startswith("forward passes: 8 ")
    assert page.locator("#gif").is_visible()
    assert "dimple-describe-the-image-8-steps.gif" in page.locator("#gif").inner_text().replace("\n", "")
    screenshot(page, "app-desktop-finished.png", tmp_path)
    # The replay slider brings back step 6 of 8 beside the final answer: the README's picture.
    page.locator("#replay input[type=number]").fill("6")
    page.locator("#replay input[type=number]").press("Enter")
    page.wait_for_function(mid_decoding(1.0), timeout=30_000)
    screenshot(page, "app-canvas.png", tmp_path)


def test_browser_new_inputs_clear_or_dim_the_previous_answer(page, files):
    assert page.locator("#answer textarea").input_value()  # the previous test's answer
    page.locator("#question textarea").fill("How many shapes are there?")
    page.locator("#question textarea").press("End")  # typing: the outputs fade until the next answer
    page.locator("#question textarea").type("!")
    page.wait_for_function("() => document.getElementById('outputs').classList.contains('stale')", timeout=30_000)
    page.locator("#image button[aria-label='Remove Image']").click()
    page.locator("#image input[type=file]").set_input_files(str(files / "grey-8bit.png"))
    page.wait_for_function("() => document.querySelector('#answer textarea').value === ''", timeout=30_000)
    assert page.locator("#canvas .token").count() == 0 and not page.locator("#gif").is_visible()
    assert "stale" not in page.locator("#outputs").get_attribute("class")


def test_browser_enter_in_the_question_box_answers(page, scene):
    ask_in_page(page, scene, "How many shapes are there?", submit="enter")
    page.wait_for_function(ANSWERED, timeout=120_000)


def test_browser_refusals_are_guidance_on_their_field_with_no_error_badges(page, files, scene):
    page.locator("#steps input").fill("0")
    page.locator("#run").click()
    message = field_message(page, "steps")
    assert message.startswith("Steps must be from 1 to 481; got 0")
    colour = page.locator("#steps div.validation-error").evaluate("node => getComputedStyle(node).color")
    assert colour == "rgb(30, 64, 175)"  # the hint's blue, not the error red
    assert "Error" not in page.locator("#outputs").inner_text()
    page.locator("#steps input").fill("8")
    # Files Pillow refuses: the message shows under the image at upload, and on it at "Answer".
    for name, expected in (("bomb.png", "bomb.png is too large"), ("truncated.png", "cut short or damaged")):
        page.locator("#image button[aria-label='Remove Image']").click()
        page.locator("#image input[type=file]").set_input_files(str(files / name))
        page.locator("#image-note", has_text=expected).wait_for(timeout=60_000)
        page.locator("#run").click()
        page.locator("#image .validation-error", has_text=expected).wait_for(timeout=60_000)
        assert "Error" not in page.locator("#outputs").inner_text()
    page.locator("#image button[aria-label='Remove Image']").click()
    ask_in_page(page, scene, "How many shapes are there?")
    page.wait_for_function(ANSWERED, timeout=120_000)


def test_browser_a_file_that_is_no_image_gets_its_message_at_upload(browser, server, files):
    fresh = open_page(browser, server, DESKTOP)
    try:
        fresh.locator("#image input[type=file]").set_input_files(str(files / "not-an-image.png"))
        fresh.locator("#image-note", has_text="not-an-image.png is not an image this demo").wait_for(timeout=60_000)
        assert "Error" not in fresh.locator("body").inner_text()
    finally:
        fresh.close()


def test_browser_template_refusal_names_the_template_and_the_next_answer_works(page, scene):
    ask_in_page(page, scene, "What is the color of the shape on the left?", template="Color:<|mask|>*0")
    assert "Invalid slot '<|mask|>*0'" in field_message(page, "template")
    page.locator("#template textarea").fill("Color:<|mask|> Shape:<|mask|>")
    page.locator("#run").click()
    page.wait_for_function(
        "() => document.querySelector('#answer textarea').value.startsWith('Color:')", timeout=120_000
    )


def test_browser_an_animated_gif_says_it_answers_about_the_first_frame(page, files):
    page.locator("#image button[aria-label='Remove Image']").click()
    page.locator("#image input[type=file]").set_input_files(str(files / "animated.gif"))
    page.locator("#image-note", has_text="2 frames): Dimple sees one picture; it answers about the first frame").wait_for(
        timeout=60_000
    )


def test_browser_stop_cancels_a_queued_request_and_says_so(page, server, scene):
    busy = gradio_client.Client(server, verbose=False)
    running = busy.submit(*api_args(scene, "Describe the image.", steps=32), api_name="/answer")
    while not running.outputs():
        time.sleep(0.05)
    ask_in_page(page, scene, "How many shapes are there?")
    page.wait_for_timeout(500)
    page.locator("#stop").click()
    page.wait_for_function(
        "() => document.querySelector('#stats textarea').value.startsWith('stopped while waiting in the queue')",
        timeout=120_000,
    )
    assert running.result(timeout=300)[1]
    assert "nothing was decoded" in page.locator("#answer textarea").get_attribute("placeholder")


def test_browser_examples_and_watch_it_think_fill_the_fields(page):
    page.get_by_text("How many shapes are there?", exact=True).first.click()
    page.wait_for_function(
        "() => document.querySelector('#question textarea').value === 'How many shapes are there?'", timeout=30_000
    )
    page.locator("#answer_length input").fill("40")
    page.locator("#watch").click()
    page.wait_for_function("() => document.querySelector('#steps input').value === '10'", timeout=30_000)
    assert float(page.locator("#threshold input[type=number]").input_value()) == 0


def test_browser_phone_shows_the_canvas_beside_image_and_question(phone, dimple, scene, tmp_path):
    # 390 px wide: the canvas follows the image, question and buttons, before the settings, inside the first view.
    canvas, settings = phone.locator("#canvas").bounding_box(), phone.locator("#settings").bounding_box()
    assert canvas["y"] < PHONE["height"] - 100 and canvas["y"] < settings["y"]
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing cut at the side
    for example in phone.locator("#examples button").all():
        box = example.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    ask_in_page(phone, scene, "Describe the image.")
    phone.wait_for_function(mid_decoding(0.6), timeout=120_000)
    phone.evaluate("window.scrollTo(0, 0)")
    assert phone.locator("#canvas .token").first.is_visible()
    screenshot(phone, "app-phone-decoding.png", tmp_path)
    phone.wait_for_function(ANSWERED, timeout=120_000)
    screenshot(phone, "app-phone-finished.png", tmp_path, full_page=True)  # the answer, GIF, examples, settings
