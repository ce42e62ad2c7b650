"""`python -m serve_dimple`: transformers' own server with Dimple's diffusion decoding, through the `openai` client.

One server per module (a subprocess on a free loopback port, the shipped checkpoint); every served answer is compared
with `model.generate`'s answer for the same image and question, computed here with the same settings.
"""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REPO_ROOT
from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed

from shapes.task import heldout_examples, make_examples, render

openai = pytest.importorskip("openai", reason="serving extras: pip install -r requirements-serve.txt")

FOLDER = "checkpoints/dimple-shapes"  # as given on the command line: the name requests use
CHECKPOINT_SLOTS = 32  # the shipped generation_config.json's max_new_tokens


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    from serve_dimple import running_server

    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("modules"))}
    try:
        with running_server(FOLDER, log=log, env=env) as url:
            yield url
    except (RuntimeError, TimeoutError) as error:
        raise RuntimeError(f"{error}\n{log.read_text()[-3000:]}") from None


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def library():
    model = AutoModelForImageTextToText.from_pretrained(REPO_ROOT / FOLDER, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(REPO_ROOT / FOLDER, trust_remote_code=True)
    return model, processor


# Held-out questions: drawn from a seed of their own, none of them an (image, question) pair of the test set.
TEST_SET_KEYS = frozenset(example.key() for example in heldout_examples())
QUESTIONS = make_examples(seed=29_029, count=20, exclude=TEST_SET_KEYS)


def image_url(example) -> str:
    buffer = io.BytesIO()
    render(example.scene).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(example) -> list[dict]:
    """The OpenAI chat message: the image as a base64 data URL, then the question (the task's order)."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(example)}},
                                         {"type": "text", "text": example.question}]}]  # fmt: skip


def library_answer(library, example, seed: int | None = None, **settings) -> tuple[str, list[int]]:
    """`model.generate`'s answer (text, answer token ids) for the example, with the checkpoint's settings and
    `settings`."""
    model, processor = library
    messages = [{"role": "user", "content": [{"type": "image", "image": render(example.scene)},
                                             {"type": "text", "text": example.question}]}]  # fmt: skip
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    if seed is not None:
        set_seed(seed)
    with torch.no_grad():
        output = model.generate(**inputs, **settings)
    answer = output[0, inputs["input_ids"].shape[1] :]
    return processor.post_process_answer(answer, skip_special_tokens=True), processor.answer_ids(answer.tolist())


def streamed(client, example, **request) -> tuple[str, list[str], list]:
    """The streamed text, its content deltas, and all the chunks."""
    chunks = list(
        client.chat.completions.create(
            model=FOLDER, messages=chat(example), stream=True, stream_options={"include_usage": True}, **request
        )
    )
    deltas = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    return "".join(deltas), deltas, chunks


def finish_reason_of(chunks) -> str:
    return next(chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason)


def status_and_detail(call) -> tuple[int, str]:
    with pytest.raises(openai.APIStatusError) as error:
        call()
    return error.value.status_code, json.dumps(error.value.response.json())


# ---------------------------------------------------------------------------------------------- answers


def test_twenty_held_out_image_questions_get_generates_answer_streaming_and_not(client, library):
    latencies = []
    for example in QUESTIONS:
        expected, answer_ids = library_answer(library, example)
        answer_tokens = len(answer_ids)
        start = time.perf_counter()
        response = client.chat.completions.create(model=FOLDER, messages=chat(example))
        latencies.append(time.perf_counter() - start)
        choice = response.choices[0]
        assert choice.message.content == expected, example.question
        assert response.usage.completion_tokens == answer_tokens  # answer tokens, not the 32 slots
        assert choice.finish_reason == ("length" if answer_tokens == CHECKPOINT_SLOTS else "stop")

        text, _, chunks = streamed(client, example)
        assert text == expected, example.question
        assert chunks[-1].usage.completion_tokens == answer_tokens
        assert finish_reason_of(chunks) == choice.finish_reason
    print(f"non-streaming latency per request: median {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms")


def test_the_answer_streams_as_the_committed_prefix_grows(client, library):
    # One slot per step, leftmost first: the committed prefix grows by a token each step.
    one_by_one = {"alg": "autoregressive", "alg_p_threshold": None}
    example = next(example for example in QUESTIONS if len(example.answer.split()) >= 3)
    expected, answer_ids = library_answer(library, example, **one_by_one)
    text, deltas, chunks = streamed(client, example, extra_body={"generation_config": json.dumps(one_by_one)})
    assert text == expected
    assert chunks[-1].usage.completion_tokens == len(answer_ids)
    assert all(deltas)  # every delta appends text; none is taken back


def test_stop_ends_the_answer_before_the_stop_string(client, library):
    example = next(example for example in QUESTIONS if len(library_answer(library, example)[0].split()) >= 3)
    full, answer_ids = library_answer(library, example)
    stop = " " + full.split()[1]
    expected = full[: full.index(stop)]
    decode = library[1].decode
    kept = next(k for k in range(len(answer_ids)) if decode(answer_ids[:k], skip_special_tokens=True) == expected)
    response = client.chat.completions.create(model=FOLDER, messages=chat(example), stop=[stop, "never there"])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == kept
    text, _, chunks = streamed(client, example, stop=stop)
    assert text == expected and finish_reason_of(chunks) == "stop"


def test_max_tokens_sets_the_number_of_answer_slots(client, library):
    example = next(example for example in QUESTIONS if len(library_answer(library, example)[0].split()) >= 2)
    reasons = []
    for slots in (1, 64):  # fewer than the checkpoint's 32, and more
        expected, answer_ids = library_answer(library, example, max_new_tokens=slots)
        response = client.chat.completions.create(model=FOLDER, messages=chat(example), max_tokens=slots)
        assert response.choices[0].message.content == expected
        assert response.usage.completion_tokens == len(answer_ids)
        assert response.choices[0].finish_reason == ("length" if len(answer_ids) == slots else "stop")
        reasons.append(response.choices[0].finish_reason)
    assert reasons == ["length", "stop"]  # one slot holds the first word of the answer; 64 hold all of it


def test_temperature_top_p_and_seed_reproduce_generates_sampled_answer(client, library):
    sampled = dict(temperature=3.0, top_p=0.9)  # hot enough that the answer depends on the random numbers
    answers = set()
    for example in QUESTIONS[:4]:
        for seed in (1, 2):
            expected, _ = library_answer(library, example, seed=seed, **sampled)
            for _ in range(2):
                response = client.chat.completions.create(model=FOLDER, messages=chat(example), seed=seed, **sampled)
                assert response.choices[0].message.content == expected
            answers.add(expected)
    assert len(answers) > 4  # the seeds gave different samples


# ------------------------------------------------------------------------------------- without a server


def prompt_inputs(processor, example):
    messages = [{"role": "user", "content": [{"type": "image", "image": render(example.scene)},
                                             {"type": "text", "text": example.question}]}]  # fmt: skip
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


class RecordingStreamer:
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_the_prefix_streamer_sends_each_settled_token_once_and_they_add_up_to_the_answer(library):
    from serve_dimple import fitted_request, generate_answer, request_from_body

    model, processor = library
    one_by_one = {"alg": "autoregressive", "alg_p_threshold": None}
    example = next(example for example in QUESTIONS if len(example.answer.split()) >= 3)
    inputs = prompt_inputs(processor, example)
    request = request_from_body({"generation_config": json.dumps(one_by_one)}, model.generation_config)
    fitted_request(request, inputs["input_ids"].shape[1], model.config)
    streamer = RecordingStreamer()
    answer = generate_answer(model, processor, dict(inputs), request, streamer)
    prompt, *deltas = streamer.puts
    assert prompt == inputs["input_ids"].tolist() and streamer.ended
    assert len(deltas) == len(answer) >= 3 and all(len(delta) == 1 for delta in deltas)  # a token per step
    assert [token for delta in deltas for token in delta] == answer == library_answer(library, example, **one_by_one)[1]


def test_the_prefix_streamer_stops_at_the_first_mask_when_the_generation_config_names_no_mask_id(library):
    # The released 7B's generation_config.json has no mask_token_id (config.json has it).
    from transformers import GenerationConfig

    from serve_dimple import CommittedPrefixStreamer, request_from_body

    processor = library[1]
    request = request_from_body({}, GenerationConfig(max_new_tokens=4))
    words = processor.tokenizer("on the right")["input_ids"]
    streamer = RecordingStreamer()
    prefix_streamer = CommittedPrefixStreamer(streamer, processor, request)
    prefix_streamer.put(torch.tensor([[1, 2]]))  # the prompt
    prefix_streamer.put_draft(torch.tensor([[words[0], processor.mask_token_id, words[2], words[1]]]))
    prefix_streamer.put(torch.tensor([[words[0], words[1], words[2], words[1]]]))
    assert streamer.puts == [[[1, 2]], words[:1], [words[1], words[2], words[1]]]


def test_a_tail_that_could_begin_a_stop_string_waits_for_the_next_slots(library):
    from serve_dimple import before_possible_stop

    processor = library[1]
    ids = processor.tokenizer("on the right")["input_ids"]
    assert before_possible_stop(processor, ids, ("left",)) == ids  # no stop string can start in it
    assert processor.decode(before_possible_stop(processor, ids[:2], ("the left",))) == "on"  # "the" waits
    assert before_possible_stop(processor, ids, ("the left",)) == ids[:2]  # the last "t" may begin "the left"
    assert processor.decode(before_possible_stop(processor, ids, (" right",))) == "on the"  # a stop string in it


def test_a_request_keeps_the_checkpoints_answer_length_unless_max_tokens_sets_it(library):
    # serve itself raises `max_new_tokens` to at least 1024: 32 + 1024 positions do not fit a 512-position model.
    from serve_dimple import fitted_request, request_from_body

    model, _ = library
    for body, slots in (({}, CHECKPOINT_SLOTS), ({"max_tokens": 7}, 7), ({"max_completion_tokens": 9}, 9)):
        request = fitted_request(request_from_body(body, model.generation_config), 40, model.config)
        assert request.max_new_tokens == slots
    body = {"temperature": 0.5, "top_p": 0.8, "seed": 3, "stop": "x", "generation_config": '{"steps": 4}'}
    request = request_from_body(body, model.generation_config)
    settings = request.settings
    assert (settings.temperature, settings.top_p, settings.steps) == (0.5, 0.8, 4)
    assert (request.seed, request.stop) == (3, ("x",))
    assert request.overrides == {"temperature": 0.5, "top_p": 0.8, "steps": 4}
    assert settings.alg == model.generation_config.alg


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"alg": "best"}, "`alg` must be one of"),
        ({"steps": 0}, "`steps` must be an integer in [1,"),
        ({"top_p": 1.5}, "`top_p` must be in (0, 1]"),
        ({"num_beams": 4}, "cannot set ['num_beams']"),
    ],
)
def test_a_bad_dimple_setting_is_a_400_with_dimples_message(client, setting, message):
    extra = {"generation_config": json.dumps(setting)}
    for stream in (False, True):
        status, detail = status_and_detail(
            lambda stream=stream: client.chat.completions.create(
                model=FOLDER, messages=chat(QUESTIONS[0]), extra_body=extra, stream=stream
            )
        )
        assert status == 400 and message in json.loads(detail)["detail"]


def test_a_negative_temperature_is_a_400_naming_it(client):
    status, detail = status_and_detail(
        lambda: client.chat.completions.create(model=FOLDER, messages=chat(QUESTIONS[0]), temperature=-1)
    )
    assert status == 400 and "`temperature` must be >= 0" in detail


def test_an_answer_that_does_not_fit_the_positions_is_a_400(client):
    for stream in (False, True):
        status, detail = status_and_detail(
            lambda stream=stream: client.chat.completions.create(
                model=FOLDER, messages=chat(QUESTIONS[0]), max_tokens=600, stream=stream
            )
        )
        assert status == 400 and "exceed the model's 512 positions" in detail and "max_tokens" in detail


# ------------------------------------------------------------------------------------------ concurrency


def test_eight_concurrent_clients_each_get_their_own_answer(server_url, library):
    examples = QUESTIONS[:8]
    expected = [library_answer(library, example)[0] for example in examples]

    def ask(index: int) -> str:
        client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=120)
        if index % 2:
            return streamed(client, examples[index])[0]
        return client.chat.completions.create(model=FOLDER, messages=chat(examples[index])).choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == expected
