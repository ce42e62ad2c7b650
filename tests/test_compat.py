"""Surviving transformers releases: the version gate, the cache's name, and the released weights on this code."""

import collections
import functools
import importlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from transformers import pipeline
from conftest import REPO_ROOT, make_tiny_config, make_tiny_model
from fixtures_tokenizer import write_released_style_folder

import transformers_compat
from generation_utils import RELEASED_CHAT_SETTINGS, DimpleGenerationConfig
from tools.assemble_checkpoint import REMOTE_CODE_FILES, assemble
from transformers_compat import NEWEST_TESTED, OLDEST_SUPPORTED, check_transformers_version, next_minor

# ------------------------------------------------------------------------------------------- version gate


def test_too_old_transformers_gets_an_import_error_naming_both_versions():
    with pytest.raises(ImportError) as error:
        check_transformers_version("5.22.2")
    assert "5.22.2" in str(error.value) and OLDEST_SUPPORTED in str(error.value)


@pytest.mark.parametrize("version", [OLDEST_SUPPORTED, "5.23.1", f"{NEWEST_TESTED}.0", f"{NEWEST_TESTED}.9"])
def test_supported_versions_pass_silently(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version(version)


@pytest.mark.parametrize("version", [f"{next_minor(NEWEST_TESTED)}.0", f"{next_minor(NEWEST_TESTED)}.0.dev0", "6.0.0"])
def test_newer_than_tested_warns_once_and_still_loads(version):
    with pytest.warns(UserWarning, match="tested with transformers") as record:
        check_transformers_version(version)
    assert len(record) == 1 and version in str(record[0].message)


def test_importing_the_package_under_a_too_old_transformers_fails_first_with_the_clear_error():
    # Simulate an old release: the package's first import must refuse it before anything else breaks.
    script = textwrap.dedent(
        f"""
        import importlib.metadata, sys
        real_version = importlib.metadata.version
        importlib.metadata.version = lambda name: "5.22.0" if name == "transformers" else real_version(name)
        sys.path.insert(0, {str(REPO_ROOT)!r})
        try:
            import modeling_dimple
        except ImportError as error:
            print("IMPORT-ERROR", error)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"IMPORT-ERROR Dimple needs transformers>={OLDEST_SUPPORTED}, but 5.22.0 is installed" in run.stdout


REMOTE_CODE_UNDER_OLD_RELEASE = textwrap.dedent(
    """
    import importlib.metadata, sys
    import transformers
    real_version = importlib.metadata.version
    importlib.metadata.version = lambda name: "5.22.0" if name == "transformers" else real_version(name)
    loader = getattr(transformers, sys.argv[2])
    try:
        loader.from_pretrained(sys.argv[1], trust_remote_code=True)
    except ImportError as error:
        print("IMPORT-ERROR", error)
    """
)


@pytest.mark.parametrize("loader", ["AutoConfig", "AutoModel", "AutoProcessor"])
def test_remote_code_under_a_too_old_transformers_fails_with_the_packages_message(tmp_path, loader):
    # Loaded as remote code the modules import their siblings relatively; the version check's ImportError must
    # come through those imports instead of turning into "No module named 'configuration_dimple'".
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    folder = REPO_ROOT / "checkpoints" / "dimple-shapes"
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_UNDER_OLD_RELEASE, str(folder), loader],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,  # no Dimple module on the import path
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"IMPORT-ERROR Dimple needs transformers>={OLDEST_SUPPORTED}, but 5.22.0 is installed" in run.stdout


def test_requirements_cap_transformers_below_the_next_untested_minor():
    major, minor = (int(part) for part in NEWEST_TESTED.split("."))
    oldest = ".".join(OLDEST_SUPPORTED.split(".")[:2])
    requirement = f"transformers>={oldest},<{major}.{minor + 1}"
    assert requirement in (REPO_ROOT / "requirements.txt").read_text().split()


# ------------------------------------------------------------------------------------------- cache's name


def test_forward_takes_the_cache_under_either_name_and_returns_it_under_this_releases_name():
    from transformers import DynamicCache

    model = make_tiny_model(full_attn_mask=False)  # causal: a cached continuation equals the full forward
    ids = torch.arange(3, 12)[None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, 5:]
        for name in ("cache", "past_key_values"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                first = model(input_ids=ids[:, :5], use_cache=True, **{name: DynamicCache()})
            cache = transformers_compat.output_cache(first)
            rest = model(input_ids=ids[:, 5:], use_cache=True, rope_deltas=first.rope_deltas, **{name: cache})
            torch.testing.assert_close(rest.logits, expected)
            assert cache.get_seq_length() == 9
            # The old name warns as native models' forward does, where the release has renamed it (>= 5.24).
            deprecated = [w for w in caught if "`past_key_values` is deprecated" in str(w.message)]
            assert len(deprecated) == (name == "past_key_values" and transformers_compat.CACHE_NAME == "cache")
    assert transformers_compat.CACHE_NAME in type(first).__dataclass_fields__


def test_the_packages_own_decoding_never_warns_about_the_cache_name(tiny_model):
    ids = torch.arange(3, 12)[None]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is deprecated.*")
        tiny_model.generate(input_ids=ids, max_new_tokens=3, decoding="autoregressive", do_sample=False)
        tiny_model.generate(input_ids=ids, max_new_tokens=3, decoding="autoregressive", cache_implementation="static")
        tiny_model.diffusion_generate(input_ids=ids, max_new_tokens=4, steps=4, use_cache=True)


def test_trainer_evaluation_drops_the_cache_under_the_name_this_release_returns_it():
    from transformers import Cache

    model = make_tiny_model()
    with torch.no_grad():
        output = model(input_ids=torch.arange(3, 12)[None], use_cache=True)
    caches = {name for name, value in output.items() if isinstance(value, Cache)}
    assert caches and caches <= set(model.config.keys_to_ignore_at_inference)


def test_no_transformers_internal_is_imported_outside_the_compat_module():
    """Every private transformers import is in transformers_compat.py, the list a new release is checked against."""
    offenders = []
    for path in [*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("shapes/*.py"), *REPO_ROOT.glob("examples/*.py"),
                 *REPO_ROOT.glob("tools/*.py"), *REPO_ROOT.glob("bench/*.py")]:  # fmt: skip
        if path.name == "transformers_compat.py":
            continue
        for line in path.read_text().splitlines():
            if line.strip().startswith(("from transformers.", "import transformers.")):
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {line.strip()}")
    assert not offenders, offenders


# ---------------------------------------------------------------------------- released weights, this code

LOAD_SCRIPT = textwrap.dedent(
    """
    import inspect, json, sys, torch
    from transformers import AutoModel, AutoProcessor
    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, 12)[None]).logits
    print("RESULT" + json.dumps({
        "model_class": type(model).__name__,
        "model_source": inspect.getsource(sys.modules[type(model).__module__]),
        "processor_class": type(processor).__name__,
        "processor_source": inspect.getsource(sys.modules[type(processor).__module__]),
        "mask_id": processor.mask_token_id,
        "logits": logits.flatten().tolist(),
    }))
    """
)

UPSTREAM_CODE = 'raise ImportError("upstream Dimple code: needs transformers 4.46.2")\n'


def write_released_checkpoint(folder, model):
    """Released-style files: weights, a 4.46-era config and generation config, tokenizer files, and old code."""
    write_released_style_folder(folder)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    config.update(
        architectures=["DimpleModel"],
        auto_map={"AutoConfig": "configuration_dimple.DimpleConfig", "AutoModel": "modeling_dimple.DimpleModel"},
        torch_dtype="float32",
        transformers_version="4.46.2",
    )
    config["vision_config"]["model_type"] = "dimple"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "pad_token_id": 250, "transformers_version": "4.46.2"})
    )
    for name in (*REMOTE_CODE_FILES, "tokenization_dimple.py"):
        (folder / name).write_text(UPSTREAM_CODE)
    return folder


def test_assembled_folder_runs_this_packages_code_on_released_style_weights(tmp_path):
    model = make_tiny_model()
    released = write_released_checkpoint(tmp_path / "released", model)
    folder = assemble(released, tmp_path / "assembled")
    assert not (folder / "tokenization_dimple.py").exists()
    for name in REMOTE_CODE_FILES:
        assert (folder / name).read_text() == (REPO_ROOT / name).read_text(), name

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(folder)], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.split("RESULT", 1)[1])
    assert result["model_class"] == "DimpleForConditionalGeneration"
    assert result["model_source"] == (REPO_ROOT / "modeling_dimple.py").read_text()
    assert result["processor_class"] == "DimpleProcessor"
    assert result["processor_source"] == (REPO_ROOT / "processing_dimple.py").read_text()
    assert result["mask_id"] == 151666
    with torch.no_grad():
        expected = model(input_ids=torch.arange(3, 12)[None]).logits.flatten()
    assert torch.equal(torch.tensor(result["logits"]), expected)
    settings = DimpleGenerationConfig.from_pretrained(folder)
    assert {name: getattr(settings, name) for name in RELEASED_CHAT_SETTINGS} == RELEASED_CHAT_SETTINGS
    assert settings.mask_token_id == make_tiny_config().mask_token_id


SILENT_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    from transformers import AutoProcessor
    sys.path.insert(0, sys.argv[2])
    from processing_dimple import DimpleProcessor
    print("IMPORTED", file=sys.stderr, flush=True)  # what optional packages log on import (torchao) comes before
    folder = sys.argv[1]
    for processor in (
        DimpleProcessor.from_pretrained(folder),
        DimpleProcessor.from_pretrained(folder, trust_remote_code=True),
        AutoProcessor.from_pretrained(folder, trust_remote_code=True),
    ):
        print("LOADED", type(processor).__name__, processor.mask_token_id)
    """
)


def test_the_processor_loads_with_and_without_trust_remote_code_without_a_question_or_a_log_line(tmp_path):
    # The class loaded directly used to ask "Do you wish to run the custom code? [y/N]" (AutoTokenizer saw the
    # folder's remote code) and log two lines about the Dimple config; stdin is closed, so a question fails it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, "-W", "ignore:Dimple was tested:UserWarning", "-c", SILENT_LOAD_SCRIPT]
    folder = REPO_ROOT / "checkpoints" / "dimple-shapes"
    run = subprocess.run(
        [*command, str(folder), str(REPO_ROOT)],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == ["LOADED DimpleProcessor 429"] * 3  # the shipped small vocabulary
    assert run.stderr.split("IMPORTED\n", 1)[1] == ""  # loading itself logs nothing


def test_assembling_without_weights_says_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No \\*.safetensors weights"):
        assemble(tmp_path / "empty", tmp_path / "out")


# ------------------------------------------------------------------------------ same results on every release


def test_outputs_match_the_recording_from_the_oldest_supported_release():
    """Logits, diffusion answers and training losses of the shipped checkpoint equal `tools/reference_outputs.json`,
    recorded with transformers 5.23.0 (and torch 2.13.0 on the CPU); CI runs this on both ends of the range."""
    from tools.reference_outputs import compute, differences

    reference = json.loads((REPO_ROOT / "tools" / "reference_outputs.json").read_text())
    assert reference["transformers"] == OLDEST_SUPPORTED
    assert differences(reference, compute()) == []


# ------------------------------------------------------------------------------------ overridden hooks


PACKAGE_MODULES = ("configuration_dimple", "generation_config_dimple", "generation_utils", "image_processing_dimple",
                   "modeling_dimple", "passes_dimple", "processing_dimple", "streaming_dimple", "training_dimple")  # fmt: skip


def overrides_of_transformers_methods(module_names=PACKAGE_MODULES) -> set[str]:
    """`module.Class.method` of every method a Dimple class defines over a method of a transformers base class."""
    found = set()
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module_name:
                continue
            bases = [base for base in cls.__mro__[1:] if base.__module__.startswith("transformers.")]
            for name, value in vars(cls).items():
                method = getattr(value, "__func__", value)
                if inspect.isfunction(method) and not name.startswith("__") and any(name in vars(b) for b in bases):
                    found.add(f"{module_name}.{cls.__qualname__}.{name}")
    return found


def test_every_override_of_a_transformers_method_is_listed_beside_the_imported_internals():
    listed = set(transformers_compat.OVERRIDDEN_HOOKS) | set(transformers_compat.OWN_ENTRY_POINTS)
    assert overrides_of_transformers_methods() == listed


def spy_on_hooks(monkeypatch, hooks=transformers_compat.OVERRIDDEN_HOOKS) -> collections.Counter:
    """Wrap every listed hook so that a call from transformers' code is counted (calls from Dimple's own code or
    the test are not); `functools.wraps` keeps the signature transformers inspects."""
    calls = collections.Counter()
    for hook in hooks:
        module_name, class_name, name = hook.split(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        value = vars(cls)[name]
        method = getattr(value, "__func__", value)

        def counted(*args, _method=method, _hook=hook, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            calls[_hook] += caller.startswith("transformers.")
            return _method(*args, **kwargs)

        counted = functools.wraps(method)(counted)
        kind = type(value) if isinstance(value, (classmethod, staticmethod)) else None
        monkeypatch.setattr(cls, name, kind(counted) if kind else counted)
    return calls


def test_transformers_still_calls_every_hook_the_package_overrides(monkeypatch, tmp_path):
    import numpy as np

    from generation_utils import DimpleGenerationConfig
    from shapes.task import make_examples, render
    from tools.reference_outputs import load, prompts
    from training_dimple import build_trainer, stage_training_arguments

    calls = spy_on_hooks(monkeypatch)
    model, processor = load()
    examples = make_examples(seed=1, count=2)
    inputs = prompts(processor, examples)
    ar = dict(decoding="autoregressive", do_sample=True, num_return_sequences=2, use_cache=True)
    out = model.generate(**inputs, max_new_tokens=2, **ar)  # the shipped checkpoint selects diffusion: switched
    assert out.shape[0] == 4  # each prompt twice, with its own image
    chat = [{"role": "user", "content": [{"type": "image", "image": render(examples[0].scene)},
                                         {"type": "text", "text": examples[0].question}]}]  # fmt: skip
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    pipe(text=chat, max_new_tokens=4, generate_kwargs={"steps": 4})
    cached = dict(decoding_pipeline="dim", alg="maskgit_plus", alg_p_threshold=0.999, use_cache=True)
    model.diffusion_generate(**inputs, max_new_tokens=16, steps=16, **cached)  # several cached steps
    frames = np.stack([np.asarray(render(example.scene)) for example in examples])
    processor(text=["<|vision_start|><|video_pad|><|vision_end|>Hi"], videos=[frames], return_tensors="pt")
    processor.save_pretrained(tmp_path / "saved")
    DimpleGenerationConfig(steps=8).save_pretrained(tmp_path / "saved")
    samples = [
        {"messages": [{"role": "user", "content": "<image>" + e.question}, {"role": "assistant", "content": e.answer}],
         "images": [render(e.scene)]}
        for e in examples
    ]  # fmt: skip
    args = stage_training_arguments(
        "diffusion", str(tmp_path / "train"), max_steps=1, per_device_train_batch_size=2, save_strategy="steps",
        save_steps=1, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    build_trainer(model, processor, samples, "diffusion", args).train()
    model.resize_token_embeddings(model.config.vocab_size + 8)
    assert [hook for hook in transformers_compat.OVERRIDDEN_HOOKS if not calls[hook]] == []


# ------------------------------------------------------------------------------- transformers serve's hooks


def serve_hooks_of_this_release(serve_dimple) -> list[str]:
    """The listed serve hooks this release has: `_build_generation_config` up to 5.24, `_build_generation_kwargs`
    from 5.25 (the handler defines the one its release calls)."""
    return [hook for hook in transformers_compat.SERVE_HOOKS if hasattr(getattr(serve_dimple, hook.split(".")[1]),
                                                                        hook.split(".")[2])]  # fmt: skip


def test_every_override_of_a_transformers_serve_method_is_listed():
    serve_dimple = pytest.importorskip("serve_dimple", reason="serving extras: requirements-serve.txt")
    assert overrides_of_transformers_methods(["serve_dimple"]) == set(serve_hooks_of_this_release(serve_dimple))
    other_release = set(transformers_compat.SERVE_HOOKS) - set(serve_hooks_of_this_release(serve_dimple))
    assert len(other_release) == 1 and not any(hasattr(serve_dimple.SERVE.chat_handler_class, hook.split(".")[2])
                                               for hook in other_release)  # fmt: skip


def test_transformers_serve_still_calls_every_serving_hook(monkeypatch):
    """serve's own code, in this process: its loader loads the shipped folder, its chat handler answers a request
    with an image, plain and streamed (from 5.25 through a model process it starts)."""
    import asyncio
    import base64
    import io

    from shapes.task import make_examples, render

    serve_dimple = pytest.importorskip("serve_dimple", reason="serving extras: requirements-serve.txt")
    serve = serve_dimple.SERVE
    hooks = serve_hooks_of_this_release(serve_dimple)
    calls = spy_on_hooks(monkeypatch, hooks)
    # what `install_serve_classes` does, undone after the test
    monkeypatch.setattr(sys.modules[serve.loader_class.__module__], serve.loader_class.__name__,
                        serve_dimple.DimpleServeLoader)  # fmt: skip
    folder = str(REPO_ROOT / "checkpoints" / "dimple-shapes")
    if serve.model_process:
        loader = serve_dimple.DimpleServeLoader(trust_remote_code=True)
        loader.load_model_and_processor(folder)  # what the model's process does first
        manager = serve.ModelManager(loader, serve.GenerationState(), force_model=folder)
    else:
        manager = serve_dimple.DimpleServeLoader(trust_remote_code=True, force_model=folder)
    handler = serve_dimple.DimpleChatCompletionHandler(model_manager=manager, generation_state=serve.GenerationState())
    example = make_examples(seed=7, count=1)[0]
    png = io.BytesIO()
    render(example.scene).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    body = {"model": folder, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": example.question}]}]}  # fmt: skip

    async def ask():
        plain = await handler.handle_request(dict(body), "plain")
        stream = await handler.handle_request({**body, "stream": True}, "stream")
        return plain, [chunk async for chunk in stream.body_iterator]

    try:
        plain, chunks = asyncio.run(ask())
    finally:
        manager.shutdown()
    answer = json.loads(plain.body)["choices"][0]["message"]["content"]
    streamed = "".join(
        json.loads(chunk[len("data: "):])["choices"][0]["delta"].get("content", "")
        for chunk in "".join(chunks).split("\n\n") if chunk.startswith("data: {") and '"choices":[{' in chunk
    )  # fmt: skip
    assert answer and streamed == answer
    assert [hook for hook in hooks if not calls[hook]] == []
