"""Surviving transformers releases: the version gate, the cache's name, and the released weights on this code."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import REPO_ROOT, make_tiny_config, make_tiny_model
from fixtures_tokenizer import write_released_style_folder

import transformers_compat
from generation_utils import RELEASED_CHAT_SETTINGS, DimpleGenerationConfig
from tools.assemble_checkpoint import REMOTE_CODE_FILES, assemble
from transformers_compat import NEWEST_TESTED, OLDEST_SUPPORTED, check_transformers_version

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


@pytest.mark.parametrize("version", ["5.25.0", "5.25.0.dev0", "6.0.0"])
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
            first = model(input_ids=ids[:, :5], use_cache=True, **{name: DynamicCache()})
            cache = transformers_compat.output_cache(first)
            rest = model(input_ids=ids[:, 5:], use_cache=True, rope_deltas=first.rope_deltas, **{name: cache})
            torch.testing.assert_close(rest.logits, expected)
            assert cache.get_seq_length() == 9
    assert transformers_compat.CACHE_NAME in type(first).__dataclass_fields__


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
    assert run.stderr == ""


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
