"""Serve a Dimple folder with transformers' own server, diffusion decoding behind every request:

    python -m serve_dimple checkpoints/dimple-shapes [transformers serve options, e.g. --port 8000]

This is `transformers serve` (its FastAPI app, OpenAI-compatible `/v1/chat/completions` with images, SSE streaming,
its model loading and processes), started with two of its classes replaced by Dimple's subclasses
(`transformers_compat.install_serve_classes`; the overrides are listed in `transformers_compat.SERVE_HOOKS`):

- `DimpleServeLoader` loads the folder's remote-code class, which serve would look up in the `transformers`
  namespace, and reports a vision-language model so image parts reach the processor;
- `DimpleChatCompletionHandler` maps each request to Dimple's settings (`DimpleRequest`, validated with Dimple's
  messages, a 400 when wrong or when the answer does not fit the model's positions) and generates through
  `generate_answer`: `model.generate` with the request's settings as keyword arguments (`stop` as `stop_strings`),
  the answer returned without its pad slots and, when streaming, the committed answer prefix sent as it grows
  (`CommittedPrefixStreamer`).

What a request means here (docs/serving.md): the checkpoint's answer length unless `max_tokens` sets the number of
answer slots; `temperature`, `top_p`, `seed` and Dimple's own settings (the `generation_config` field) per request;
`stop` ends the answer before the first stop string; `finish_reason` is `length` when the answer fills every slot;
`usage.completion_tokens` counts answer tokens.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, set_seed

import transformers_compat
from generation_utils import DimpleGenerationConfig, answer_length_without_template, check_fits

SERVE = transformers_compat.serve_internals()

# The request's `generation_config` may set these Dimple settings (docs/serving.md); the others would change what a
# response is (several sequences, a dict, autoregressive decoding) or the special ids.
REQUEST_SETTINGS = (
    "max_new_tokens", "steps", "eps", "alg", "alg_temp", "alg_p_threshold", "use_original_confidence",
    "decoding_pipeline", "cache_refresh_interval", "compile_step", "temperature", "top_p", "top_k", "use_cache",
)  # fmt: skip
# OpenAI fields that serve would map to autoregressive logits processors: diffusion decoding has no equivalent.
UNSUPPORTED_FIELDS = ("frequency_penalty", "logit_bias")


@dataclass(repr=False)
class DimpleRequest:
    """What one chat request generates with: the settings it sets (keyword arguments of `generate`, validated with
    the checkpoint's settings in `settings`), its seed and its stop strings."""

    settings: DimpleGenerationConfig
    overrides: dict = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def max_new_tokens(self) -> int | None:
        """The number of answer slots (serve's `finish_reason` compares the answer's length with it)."""
        return self.settings.max_new_tokens

    def __repr__(self) -> str:  # serve logs each request's settings on one line
        return f"DimpleRequest({self.overrides}, seed={self.seed}, stop={list(self.stop)})"


# --------------------------------------------------------------------------------------------- the request


def request_from_body(body: dict, checkpoint_settings) -> DimpleRequest:
    """The checkpoint's settings, then the request's `generation_config`, then its OpenAI fields. Raises
    `ValueError` / `TypeError` with the reason (the handler answers 400)."""
    unsupported = sorted(name for name in UNSUPPORTED_FIELDS if body.get(name) is not None)
    if unsupported:
        raise ValueError(f"{unsupported} have no equivalent in diffusion decoding; leave them out.")
    overrides = requested_settings(body.get("generation_config"))
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            overrides[name] = body[name]
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins, as in serve
        if body.get(name) is not None:
            overrides["max_new_tokens"] = body[name]
    settings = DimpleGenerationConfig.from_dict(checkpoint_settings.to_dict())
    settings.update(**overrides)  # validates: Dimple's own messages
    return DimpleRequest(settings, overrides, seed=request_seed(body.get("seed")), stop=stop_strings(body.get("stop")))


def requested_settings(generation_config) -> dict:
    """The request's `generation_config` field: a JSON object (as a string, as serve documents it, or an object)."""
    if generation_config is None:
        return {}
    if isinstance(generation_config, str):
        try:
            generation_config = json.loads(generation_config)
        except json.JSONDecodeError as error:
            raise ValueError(f"`generation_config` must be a JSON object: {error}.") from None
    if not isinstance(generation_config, dict):
        raise TypeError(f"`generation_config` must be a JSON object, got {type(generation_config).__name__}.")
    unknown = sorted(set(generation_config) - set(REQUEST_SETTINGS))
    if unknown:
        raise ValueError(f"`generation_config` cannot set {unknown} here; a request may set {list(REQUEST_SETTINGS)}.")
    return dict(generation_config)


def request_seed(seed) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"`seed` must be an integer, got {seed!r}.")
    return seed


def stop_strings(stop) -> tuple[str, ...]:
    """OpenAI's `stop`: one string or a list of them."""
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(text, str) and text for text in stop):
        raise TypeError(f"`stop` must be a non-empty string or a list of them, got {stop!r}.")
    return tuple(stop)


def fitted_request(request: DimpleRequest, prompt_length: int, model_config) -> DimpleRequest:
    """The request with its number of answer slots fixed for this prompt; `ValueError` when they do not fit."""
    max_positions = getattr(model_config, "max_position_embeddings", None)
    slots = answer_length_without_template(request.settings, prompt_length, max_positions)
    try:
        check_fits(prompt_length, slots, max_positions)
    except ValueError as error:
        raise ValueError(f"{error} Through this API: send a smaller `max_tokens`.") from None
    request.settings.max_new_tokens = request.overrides["max_new_tokens"] = slots
    return request


# ---------------------------------------------------------------------------------------------- the answer


def settled_answer(processor, committed: list[int], stop: tuple[str, ...]) -> list[int]:
    """The part of the final answer that a committed prefix (the slots left of the first mask) already fixes: the
    processor's answer (`answer_ids`) without the trailing end tokens and the tail that could begin a stop string,
    which wait for the slots after them."""
    return before_possible_stop(processor, processor.answer_ids(committed), stop)


def before_possible_stop(processor, ids: list[int], stop: tuple[str, ...]) -> list[int]:
    """The tokens before the first stop string, and before a tail that is the start of one (the text may go on).
    A token that reaches into it is held back too. The text is decoded as `generate`'s `stop_strings` decode it
    (special tokens kept), so nothing sent is cut later."""
    if not stop:
        return ids
    text = processor.decode(ids)
    starts = [text.find(word) for word in stop if word in text]
    starts += [
        start for word in stop for start in range(max(0, len(text) - len(word) + 1), len(text))
        if word.startswith(text[start:])
    ]  # fmt: skip
    if not starts:
        return ids
    cut, kept = min(starts), 0
    while kept < len(ids) and len(processor.decode(ids[: kept + 1])) <= cut:
        kept += 1
    return ids[:kept]


class CommittedPrefixStreamer:
    """Between diffusion decoding and serve's token streamer: after each step, the answer tokens the committed
    prefix settles (`settled_answer`) that were not sent yet; at the end, the rest of the answer (`answer_ids` of the
    final slots, which `generate` already cut at a stop string). A committed slot never changes, so what is sent is
    never taken back, and the tokens sent add up to the non-streaming answer. Drafts (slots committed right of a
    mask) are not sent: an OpenAI delta can only append text."""

    def __init__(self, streamer, processor, request: DimpleRequest):
        self.streamer, self.processor, self.request = streamer, processor, request
        self.mask_token_id = processor.mask_token_id  # a folder's generation config may leave it to config.json
        self.prompt_seen = False
        self.sent: list[int] = []

    def put(self, value: torch.Tensor):
        if not self.prompt_seen:  # transformers' protocol: the prompt first, which serve's streamers skip
            self.prompt_seen = True
            self.streamer.put(value)
            return
        self.send(self.processor.answer_ids(value[0].tolist()))

    def put_draft(self, value: torch.Tensor):
        slots = value[0].tolist()
        committed = slots[: slots.index(self.mask_token_id)] if self.mask_token_id in slots else slots
        self.send(settled_answer(self.processor, committed, self.request.stop))

    def end(self):
        self.streamer.end()

    def send(self, answer: list[int]):
        new = answer[len(self.sent) :]
        if new:
            self.streamer.put(torch.tensor(new))
            self.sent = answer


def generate_answer(model, processor, inputs, request: DimpleRequest, streamer=None) -> list[int]:
    """One request's answer tokens, by diffusion; runs where serve runs `generate` (its inference thread, or the
    model's process from 5.25, which calls it with serve's `streamer` when the request streams)."""
    if request.seed is not None:
        set_seed(request.seed)  # here, right before decoding: requests run one at a time on this thread
    inputs = {name: value.to(model.device) if hasattr(value, "to") else value for name, value in inputs.items()}
    prefix_streamer = None if streamer is None else CommittedPrefixStreamer(streamer, processor, request)
    stop = {"stop_strings": list(request.stop), "tokenizer": processor} if request.stop else {}
    sequences = model.generate(**inputs, **request.overrides, **stop, decoding="diffusion", streamer=prefix_streamer)
    return processor.answer_ids(sequences[0, inputs["input_ids"].shape[-1] :].tolist())


# --------------------------------------------------------------------------------------- serve's classes


def serve_model_repo(model_id: str) -> tuple[str, str | None]:
    """serve's name of a model (`repo@revision`, or a local folder) -> (repo, revision)."""
    if os.path.exists(model_id):
        return model_id, None
    repo, _, revision = model_id.partition("@")
    return repo, revision or None


def dimple_class_reference(config) -> str | None:
    """`module.Class` of a Dimple config's remote model class, None for any other model."""
    if getattr(config, "model_type", None) != "dimple":
        return None
    auto_map = getattr(config, "auto_map", None) or {}
    return auto_map.get("AutoModelForImageTextToText") or auto_map.get("AutoModel")


class DimpleServeLoader(SERVE.loader_class):
    """serve's model loader (`ModelManager` up to 5.24, `ModelLoader` from 5.25), taught Dimple's remote class."""

    def _load_model(self, model_id, *args, **kwargs):
        repo, revision = serve_model_repo(model_id)
        config = AutoConfig.from_pretrained(repo, revision=revision, trust_remote_code=self.trust_remote_code)
        reference = dimple_class_reference(config)
        if reference is not None:
            model_class = transformers_compat.remote_class(reference, repo, revision)
            transformers_compat.make_class_visible_to_serve(config.architectures[0], model_class)
        return super()._load_model(model_id, *args, **kwargs)

    @staticmethod
    def get_model_modality(model_or_config, processor=None):
        """A Dimple model is a vision-language model (serve asks with the model up to 5.24, its config from 5.25)."""
        config = getattr(model_or_config, "config", model_or_config)
        if dimple_class_reference(config) is not None:
            return SERVE.Modality.VLM
        return SERVE.loader_class.get_model_modality(model_or_config, processor)


class InProcessAnswers:
    """Up to 5.24: serve's generation manager of the model (its inference thread), generating Dimple's answers."""

    def __init__(self, manager):
        self.manager = manager

    async def generate_non_streaming(self, model, processor, inputs, request, request_id=None):
        ids = await self.manager.async_submit(generate_answer, model, processor, inputs, request)
        return processor.decode(ids, skip_special_tokens=True), inputs["input_ids"].shape[-1], ids

    def generate_streaming(self, model, processor, inputs, request, request_id=None, response_parser=None):
        import asyncio

        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        streamer = SERVE.DirectStreamer(processor.tokenizer._tokenizer, loop, queue, response_parser=response_parser)

        def run():  # as serve's own streaming run: a cancelled stream ends, an error is sent as one
            try:
                generate_answer(model, processor, inputs, request, streamer)
            except SERVE.GenerationCancelled:
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as error:
                loop.call_soon_threadsafe(queue.put_nowait, SERVE.StreamError(str(error)))

        self.manager.submit(run)
        return queue, streamer


class ModelProcessAnswers:
    """From 5.25: a model's `EngineClient`, generating Dimple's answers in the model's process."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):  # processor, model_id, model_config: the engine's
        return getattr(self.engine, name)

    async def generate_non_streaming(self, inputs, generation_kwargs):
        ids = await self.engine.submit(generate_answer, dict(inputs), generation_kwargs["request"])
        return self.engine.processor.decode(ids, skip_special_tokens=True), SERVE.prompt_length(inputs), ids

    def generate_streaming(self, inputs, generation_kwargs, response_parser=None):
        return self.engine.submit_streaming(generate_answer, dict(inputs), generation_kwargs["request"])


def dimple_request(body: dict, checkpoint_settings) -> DimpleRequest:
    """`request_from_body`, its errors as HTTP 400 with Dimple's message (serve's own errors would be 500s)."""
    from fastapi import HTTPException

    try:
        return request_from_body(body, checkpoint_settings)
    except (ValueError, TypeError) as error:
        raise HTTPException(status_code=400, detail=str(error)) from None


def fit_or_400(request: DimpleRequest, inputs, model_config) -> DimpleRequest:
    from fastapi import HTTPException

    try:
        return fitted_request(request, inputs["input_ids"].shape[-1], model_config)
    except ValueError as error:
        raise HTTPException(status_code=400, detail=str(error)) from None


class DimpleChatCompletionHandler(SERVE.chat_handler_class):
    """serve's `/v1/chat/completions` handler with Dimple's request mapping and answers; the rest (messages to
    processor inputs, SSE chunks, usage, errors) is serve's."""

    if SERVE.model_process:  # 5.25: settings travel as `generate` keyword arguments to the model's process

        def _build_generation_kwargs(self, body, model_generation_config):
            request = dimple_request(body, model_generation_config)
            return {"max_new_tokens": request.max_new_tokens, "request": request}

        def _streaming(self, request_id, engine, inputs, generation_kwargs, tools=None, stream_options=None):
            self._fit(engine, inputs, generation_kwargs)
            answers = ModelProcessAnswers(engine)
            return super()._streaming(request_id, answers, inputs, generation_kwargs, tools, stream_options)

        async def _non_streaming(self, request_id, engine, inputs, generation_kwargs, tools=None):
            self._fit(engine, inputs, generation_kwargs)
            answers = ModelProcessAnswers(engine)
            return await super()._non_streaming(request_id, answers, inputs, generation_kwargs, tools=tools)

        @staticmethod
        def _fit(engine, inputs, generation_kwargs):
            request = fit_or_400(generation_kwargs["request"], inputs, engine.model_config)
            generation_kwargs["max_new_tokens"] = request.max_new_tokens  # what serve's finish_reason compares

    else:  # up to 5.24: a generation config object, generated in this process

        def _build_generation_config(self, body, model_generation_config, use_cb=False):
            return dimple_request(body, model_generation_config)  # read by serve as `gen_config.max_new_tokens`

        def _streaming(self, request_id, model, processor, model_id, inputs, gen_config, gen_manager, tools=None):
            request = fit_or_400(gen_config, inputs, model.config)
            answers = InProcessAnswers(gen_manager)
            return super()._streaming(request_id, model, processor, model_id, inputs, request, answers, tools)

        async def _non_streaming(
            self, request_id, model, processor, model_id, inputs, gen_config, gen_manager, tools=None
        ):
            request = fit_or_400(gen_config, inputs, model.config)
            answers = InProcessAnswers(gen_manager)
            return await super()._non_streaming(
                request_id, model, processor, model_id, inputs, request, answers, tools=tools
            )


# ----------------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def running_server(folder: str, *options: str, host: str = "127.0.0.1", port: int | None = None, log=None,
                   env: dict | None = None, timeout: float = 300):  # fmt: skip
    """`python -m serve_dimple folder --host host --port port *options` in a subprocess, for scripts and tests:
    yields the base URL once `/health` answers, and stops the server on exit. `port=None` takes a free one; the
    server's output goes to `log` (a path), else is discarded; `env` adds environment variables."""
    if port is None:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    command = [sys.executable, "-m", "serve_dimple", folder, "--host", host, "--port", str(port), *options]
    with open(log or os.devnull, "w") as output:  # a file: a full pipe would block the server
        cwd = os.path.dirname(os.path.abspath(__file__))  # where `-m serve_dimple` is found
        environment = {**os.environ, **(env or {})}
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=cwd, env=environment)
    url = f"http://{host}:{port}"
    try:
        wait_until_healthy(url, server, timeout)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"The server exited with status {server.returncode} before answering (see its log).")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"No healthy server at {url} after {timeout} s.")


USAGE = "usage: python -m serve_dimple FOLDER [transformers serve options]  (python -m serve_dimple --help)"


def main(argv: list[str] | None = None) -> None:
    """`transformers serve FOLDER --trust-remote-code [options]` with Dimple's classes installed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\n" + USAGE + "\n\ntransformers serve's options:\n")
        SERVE.cli(["serve", "--help"])
    if argv[0].startswith("-"):
        raise SystemExit(USAGE)
    transformers_compat.install_serve_classes(DimpleServeLoader, DimpleChatCompletionHandler)
    options = argv[1:] if "--trust-remote-code" in argv else [*argv[1:], "--trust-remote-code"]
    SERVE.cli(["serve", argv[0], *options])


if __name__ == "__main__":
    # Run through the module's own name, so the classes and `generate_answer` pickle as `serve_dimple.*` for 5.25's
    # model process (it imports them by that name), not as `__main__.*`.
    from serve_dimple import main as serve_main

    serve_main()
