"""The Gradio demo (`app.py`): streamed canvases, refusals, Stop, seed, GIF, queue, the API and a real browser.

Needs the optional app dependencies (`pip install -r requirements-app.txt`) and is skipped without gradio; the browser
test also needs Playwright and a system Chromium (`apt-get install chromium`) and is skipped without them. Set
`APP_SCREENSHOT=docs/app-canvas.png` to refresh the README's screenshot of the canvas mid-decoding.
"""

import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the server under test
gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import app  # noqa: E402
from gradio_client.utils import QueueError, Status  # noqa: E402
from shapes.task import random_scene, render  # noqa: E402

# Threshold off and 8 steps for 32 slots: 4 slots per step, so every decoding shows intermediate canvases.
SETTINGS = dict(threshold=0.0, steps=8, answer_length=32, pipeline="dim", alg="maskgit_plus", use_cache=True)
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


@pytest.fixture(scope="module")
def dimple():
    return app.load(app.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("app") / "scene.png"
    render(random_scene(random.Random(7))).save(path)
    return path


@pytest.fixture(scope="module")
def not_an_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("app") / "not-an-image.png"
    path.write_text("a text file with an image's name")
    return path


@pytest.fixture(scope="module")
def server(dimple):
    model, processor = dimple
    demo = app.build_demo(model, processor, frame_seconds=FRAME_SECONDS)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def reference(
    dimple, image, question, template="", threshold=0.0, steps=8, answer_length=32, temperature=0.0, seed=0, **settings
):
    """The answer of `diffusion_generate` called directly, with the settings the page sends."""
    model, processor = dimple
    torch.manual_seed(seed)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    options = dict(alg_p_threshold=threshold or None, steps=steps, max_new_tokens=answer_length)
    options.update(decoding_pipeline=settings["pipeline"], alg=settings["alg"], use_cache=settings["use_cache"])
    options.update(temperature=temperature)
    if template:
        options.update(response_template=processor.encode_response_template(template), max_new_tokens=None)
    output = model.diffusion_generate(**inputs, **options, return_dict_in_generate=True)
    answer = output.sequences[0, inputs["input_ids"].shape[1] :]
    return processor.post_process_answer(answer, skip_special_tokens=True), int(output.num_forward_passes[0])


def stream(dimple, image, question, **overrides):
    model, processor = dimple
    settings = app.Settings(**{**SETTINGS, **overrides})
    items = list(app.stream_decoding(model, processor, image, question, settings))
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
    assert app.canvas_segments(tokenizer, canvas, previous, start, mask) == [
        ("Color", app.FIXED),
        (" red", app.DONE),
        (" circle", app.NEW),
        (app.BLANK_TEXT, app.BLANK),
    ]
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert app.canvas_segments(tokenizer, [end], [mask], [mask], mask) == [(app.END_TEXT, app.NEW)]


def test_stream_fills_the_canvas_and_ends_with_diffusion_generates_answer(dimple, scene):
    from PIL import Image

    image = Image.open(scene).convert("RGB")
    question = "Describe the image."
    canvases, result = stream(dimple, image, question)
    expected, passes = reference(dimple, image, question, **SETTINGS)
    assert result.answer == expected
    assert result.passes == passes == len(canvases) - 1 == 8
    assert set(categories(canvases[0])) == {app.BLANK}
    blanks = [categories(canvas).count(app.BLANK) for canvas in canvases]
    assert blanks == sorted(blanks, reverse=True) and blanks[-1] == 0
    # Each step highlights exactly the slots it committed.
    assert [categories(canvas).count(app.NEW) for canvas in canvases[1:]] == result.tokens_per_step
    assert "".join(t for t in texts(canvases[-1]) if t != app.END_TEXT) == expected


def test_template_tokens_stand_fixed_from_the_first_canvas(dimple, scene):
    from PIL import Image

    image = Image.open(scene).convert("RGB")
    question, template = "What are the color and shape of the object on the left?", "Color:<|mask|> Shape:<|mask|>"
    canvases, result = stream(dimple, image, question, template=template)
    assert result.answer == reference(dimple, image, question, template, **SETTINGS)[0]
    assert categories(canvases[0]) == [app.FIXED, app.FIXED, app.BLANK, app.FIXED, app.FIXED, app.BLANK]
    assert all(categories(canvas)[:2] == [app.FIXED, app.FIXED] for canvas in canvases)
    assert result.answer.startswith("Color:") and " Shape:" in result.answer


# ------------------------------------------------------------------------------ the API (gradio_client)


def test_two_concurrent_clients_get_their_own_answers_and_canvases(server, dimple, scene):
    from PIL import Image

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
            assert all(text == end or text == app.BLANK_TEXT for text, end in zip(texts(canvas), final))
    assert results[0][1] != results[1][1]


def test_replay_returns_this_sessions_own_steps(server, scene):
    client = gradio_client.Client(server, verbose=False)
    job = client.submit(*api_args(scene, "Describe the image."), api_name="/answer")
    final_canvas, _, _, replay_slider, _ = job.result(timeout=300)
    assert (replay_slider["maximum"], replay_slider["value"], replay_slider["interactive"]) == (8, 8, True)
    assert set(categories(client.predict(0, api_name="/replay"))) == {app.BLANK}
    assert client.predict(8, api_name="/replay") == final_canvas
    assert client.predict(3, api_name="/replay") == job.outputs()[3][0]


@pytest.mark.parametrize(
    "image, question, template, change, message",
    [
        (None, "How many shapes?", "", {}, "Upload an image"),
        ("not an image", "How many shapes?", "", {}, "not-an-image.png is not an image this demo can read"),
        ("scene", "", "", {}, "Type a question"),
        ("scene", " \n\t", "", {}, "Type a question"),
        ("scene", "How many shapes?", "", dict(answer_length=None), "Answer length is empty"),
        ("scene", "How many shapes?", "", dict(steps=None), "Steps is empty"),
        ("scene", "How many shapes?", "Color:<|mask|>*0", {}, "Invalid slot '<|mask|>*0'"),
        ("scene", "How many shapes?", "", dict(steps=0), "Value 0 is less than minimum value 1"),
        ("scene", "How many shapes?", "", dict(answer_length=1024), "greater than maximum value"),
        (
            "scene",
            "How many shapes?",
            "",
            dict(pipeline="dream", alg="origin-ratio"),
            "does not exist in the dream pipeline",
        ),
    ],
)
def test_bad_input_gets_a_message_that_expires_and_the_app_keeps_serving(
    server, scene, not_an_image, image, question, template, change, message
):
    client = gradio_client.Client(server, verbose=False)
    image = {"scene": scene, "not an image": not_an_image}.get(image)
    with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(message)) as error:
        client.predict(*api_args(image, question, template, **change), api_name="/answer")
    assert error.value.duration is not None  # a toast that never expires covers the canvas of later answers
    _, answer, _, _, _ = client.predict(*api_args(scene, "How many shapes are there?"), api_name="/answer")
    assert answer


def test_an_empty_template_and_answer_length_uses_the_template(server, scene):
    # The template sets the length, so an empty "Answer length" is no error then.
    client = gradio_client.Client(server, verbose=False)
    args = api_args(scene, "What are the color and shape of the object on the left?", "Color:<|mask|> Shape:<|mask|>")
    _, answer, _, _, _ = client.predict(*args[:4], None, *args[5:], api_name="/answer")
    assert answer.startswith("Color:")


def test_answer_length_is_bounded_by_the_positions_the_prompt_leaves(dimple):
    from PIL import Image

    model, processor = dimple
    positions = model.config.max_position_embeddings
    limit = app.longest_answer(model, processor)
    assert limit < positions
    # The shortest prompt (smallest image, one character) with the longest answer fills every position exactly.
    smallest = Image.new("RGB", (app.SMALLEST_IMAGE, app.SMALLEST_IMAGE), "white")
    canvases, result = stream(dimple, smallest, "?", answer_length=limit, steps=1)
    assert len(canvases[-1]) == limit and result.passes == 1
    with pytest.raises(
        ValueError, match=f"of the model's {positions} positions, which leaves room for at most {limit} "
    ):
        stream(dimple, smallest, "?", answer_length=limit + 1, steps=1)
    # A longer prompt leaves fewer slots; the page names its field and the longest answer that fits.
    with pytest.raises(ValueError, match=f"Answer length {limit} does not fit") as error:
        stream(dimple, smallest, "Describe the image. " * 8, answer_length=limit, steps=1)
    assert int(re.search(r"at most (\d+) answer slots", str(error.value)).group(1)) < limit


def test_watch_it_think_shows_the_denoising_that_the_checkpoints_settings_skip(server, scene, dimple):
    client = gradio_client.Client(server, verbose=False)
    model, _ = dimple
    # The checkpoint's own settings (γ 0.9) fill the whole answer in the first pass, and the page says so.
    threshold, steps, length, pipeline, alg, _, _ = client.predict(api_name="/checkpoint_settings")
    assert (threshold, steps, length) == (model.generation_config.alg_p_threshold, 32, 32)
    checkpoint = dict(threshold=threshold, steps=steps, answer_length=length, pipeline=pipeline, alg=alg)
    job = client.submit(*api_args(scene, "Describe the image.", **checkpoint), api_name="/answer")
    _, _, summary, _, _ = job.result(timeout=300)
    assert summary.startswith("forward passes: 1 ") and "Watch it think" in summary
    # One click: γ off, 4 slots per step; the canvas then passes through 8 partly blank stages.
    assert client.predict(32, api_name="/watch") == (0.0, 8, 32)
    watch = dict(threshold=0.0, steps=8, answer_length=32, pipeline=pipeline, alg=alg)
    job = client.submit(*api_args(scene, "Describe the image.", **watch), api_name="/answer")
    _, _, summary, _, _ = job.result(timeout=300)
    assert summary.startswith("forward passes: 8 ") and "Watch it think" not in summary
    blanks = [categories(output[0]).count(app.BLANK) for output in job.outputs()[:-1]]
    assert blanks[0] == 32 and sum(0 < count < 32 for count in blanks) == 7


def test_temperature_and_seed_reproduce_diffusion_generate(server, scene, dimple):
    from PIL import Image

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


def test_steps_download_as_an_animated_gif_with_one_frame_per_canvas(server, scene):
    from PIL import Image

    client = gradio_client.Client(server, verbose=False)
    job = client.submit(*api_args(scene, "Describe the image."), api_name="/answer")
    *_, gif = job.result(timeout=300)
    with Image.open(gif) as picture:
        assert picture.format == "GIF" and picture.is_animated
        assert picture.n_frames == len(job.outputs()) - 1 == 9  # the empty canvas, then 8 steps
        assert picture.info["loop"] == 0


def test_gif_frames_share_one_size_and_show_each_slot_colour(dimple, tmp_path):
    from PIL import Image

    short = [("_", app.BLANK)] * 3
    long = [(" a long token", app.NEW), ("Color", app.FIXED)] * 20
    path = app.steps_gif([short, long], tmp_path / "steps.gif")
    with Image.open(path) as picture:
        assert picture.n_frames == 2
        first = picture.convert("RGB")
        picture.seek(1)
        second = picture.convert("RGB")
    assert first.size == second.size
    colours = lambda frame: {colour for _, colour in frame.getcolors(1 << 16)}  # noqa: E731
    hex_to_rgb = lambda code: tuple(int(code[i : i + 2], 16) for i in (1, 3, 5))  # noqa: E731
    assert hex_to_rgb(app.COLOR_MAP[app.BLANK]) in colours(first)
    assert {hex_to_rgb(app.COLOR_MAP[app.NEW]), hex_to_rgb(app.COLOR_MAP[app.FIXED])} <= colours(second)


def test_stop_ends_the_running_decoding_and_keeps_its_steps(server, scene):
    client = gradio_client.Client(server, verbose=False)
    # 32 steps of one slot: about 8 s of canvases at FRAME_SECONDS each, time enough to press Stop.
    job = client.submit(*api_args(scene, "Describe the image.", steps=32), api_name="/answer")
    while len(job.outputs()) < 3:
        time.sleep(0.05)
    client.predict(api_name="/stop")
    final_canvas, answer, summary, replay_slider, _ = job.result(timeout=300)
    stopped_at = int(re.fullmatch(r"stopped after step (\d+)", summary).group(1))
    assert 1 <= stopped_at < 32 and answer == ""
    assert categories(final_canvas).count(app.BLANK) > 0
    assert (replay_slider["maximum"], replay_slider["interactive"]) == (stopped_at, True)
    # The next answer of this session runs in full.
    _, answer, summary, _, _ = client.predict(*api_args(scene, "Describe the image."), api_name="/answer")
    assert answer and summary.startswith("forward passes: 8 ")


def test_the_queue_refuses_requests_beyond_its_size(dimple, scene):
    model, processor = dimple
    demo = app.build_demo(model, processor, frame_seconds=FRAME_SECONDS, queue_size=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
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
    }""" % (app.BLANK_TEXT, blank_share)


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no system Chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server)
        yield page
        browser.close()


def ask_in_page(page, scene, question, template=""):
    page.locator("#image input[type=file]").set_input_files(str(scene))
    page.locator("#question textarea").fill(question)
    page.locator("#template textarea").fill(template)
    page.locator("#threshold input[type=number]").fill(str(SETTINGS["threshold"]))
    page.locator("#steps input").fill(str(SETTINGS["steps"]))
    page.locator("#run").click()


def test_browser_streams_the_canvas_and_shows_diffusion_generates_answer(page, dimple, scene, tmp_path):
    from PIL import Image

    question = "Describe the image."
    ask_in_page(page, scene, question)
    page.wait_for_function(mid_decoding(1.0), timeout=120_000)
    page.wait_for_function("() => document.querySelector('#answer textarea').value !== ''", timeout=120_000)
    expected = reference(dimple, Image.open(scene).convert("RGB"), question, **SETTINGS)[0]
    assert page.locator("#answer textarea").input_value() == expected
    assert page.locator("#stats textarea").input_value().startswith("forward passes: 8 ")
    # The replay slider brings back step 6 of 8: the picture for the README, stable while it is taken.
    page.locator("#replay input[type=number]").fill("6")
    page.locator("#replay input[type=number]").press("Enter")
    page.wait_for_function(mid_decoding(1.0), timeout=30_000)
    page.wait_for_timeout(500)  # let the chips' colour transitions finish
    page.screenshot(path=os.environ.get("APP_SCREENSHOT", tmp_path / "app-canvas.png"), full_page=True)


def test_browser_shows_the_template_error_and_keeps_serving(page, scene):
    ask_in_page(page, scene, "What is the color of the shape on the left?", template="Color:<|mask|>*0")
    error = page.get_by_text("Invalid slot '<|mask|>*0' in a response template", exact=False)
    error.first.wait_for(timeout=60_000)
    page.locator("#template textarea").fill("Color:<|mask|> Shape:<|mask|>")
    page.locator("#run").click()
    page.wait_for_function(
        "() => document.querySelector('#answer textarea').value.startsWith('Color:')", timeout=120_000
    )


def test_browser_refuses_a_non_image_upload_with_a_message_that_expires(page, not_an_image, scene):
    page.locator("#image input[type=file]").set_input_files(str(not_an_image))
    toast = page.get_by_text("not-an-image.png is not an image this demo can read", exact=False).first
    toast.wait_for(timeout=60_000)
    toast.wait_for(state="detached", timeout=(app.ERROR_SECONDS + 30) * 1000)
    # An image uploaded next is answered as usual.
    page.locator("#image button[aria-label='Remove Image']").click()
    ask_in_page(page, scene, "How many shapes are there?")
    page.wait_for_function("() => document.querySelector('#answer textarea').value !== ''", timeout=120_000)


def test_browser_examples_and_watch_it_think_fill_the_fields(page):
    page.get_by_text("How many shapes are there?").first.click()
    page.wait_for_function(
        "() => document.querySelector('#question textarea').value === 'How many shapes are there?'", timeout=30_000
    )
    page.locator("#answer_length input").fill("40")
    page.locator("#watch").click()
    page.wait_for_function("() => document.querySelector('#steps input').value === '10'", timeout=30_000)
    assert float(page.locator("#threshold input[type=number]").input_value()) == 0
