"""examples/finetune.py as a user meets it: data checked before the model loads, stage options, the attention each
stage's output decodes with, an output folder ready to push and a LoRA adapter that loads on its own."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import make_tiny_model
from PIL import Image
from test_distributed_training import write_finetune_inputs
from test_training import load_finetune_script, processor, tiny_logits, toy_samples  # noqa: F401 (fixture)
from transformers import AutoModel

from generation_utils import DimpleGenerationConfig
from training_dimple import (
    LORA_LEARNING_RATE,
    DimpleDataCollator,
    check_base_model_id,
    hub_reference,
    remove_machine_local_keys,
    stage_training_arguments,
)

# ------------------------------------------------------------------------------------------ data before the model


@pytest.fixture
def finetune(monkeypatch):
    """The script, with model and processor loading replaced by a failure: a data error must come first."""
    script = load_finetune_script()

    def refuse(*args, **kwargs):
        raise AssertionError("the model or processor loaded before the data was checked")

    monkeypatch.setattr(script, "AutoModel", SimpleNamespace(from_pretrained=refuse))
    monkeypatch.setattr(script, "AutoProcessor", SimpleNamespace(from_pretrained=refuse))
    return script


def sample_row(image="0.png", answer="red square"):
    return {"messages": [{"role": "user", "content": "<image>Name the color ?"},
                         {"role": "assistant", "content": answer}], "images": [image]}  # fmt: skip


def write_images(folder, count=3):
    folder.mkdir(exist_ok=True)
    for number in range(count):
        Image.new("RGB", (56, 56), (200, 30 * number, 30)).save(folder / f"{number}.png")
    return folder


def run_on(finetune, data, *extra, image_folder=None):
    args = ["--model", "unused", "--data", str(data), "--stage", "diffusion", "--output_dir", str(data.parent / "o")]
    args += ["--image_folder", str(image_folder)] if image_folder else []
    finetune.main(args + list(extra))


def test_missing_and_corrupt_images_are_listed_together_before_the_model_loads(finetune, tmp_path):
    images = write_images(tmp_path / "images")
    png = (images / "0.png").read_bytes()
    (images / "cut.png").write_bytes(png[: len(png) // 2])  # a truncated PNG: opens, fails to decode
    (images / "text.png").write_bytes(b"not a png")
    rows = [sample_row("0.png"), sample_row("gone.png"), sample_row("1.png"), sample_row("cut.png"),
            sample_row("text.png")]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError) as error:
        run_on(finetune, data, image_folder=images)
    message = str(error.value)
    assert message.startswith("3 of 5 training image(s) cannot be used:")
    assert f"{data}, line 2 (sample 1), image 0 ('gone.png'): no such file {images / 'gone.png'}" in message
    assert f"{data}, line 4 (sample 3), image 0 ('cut.png'): cannot be read" in message
    assert f"{data}, line 5 (sample 4), image 0 ('text.png'): cannot be read" in message
    assert f"Relative image paths start at image_folder={str(images)!r} (--image_folder)" in message


def test_missing_images_without_image_folder_point_to_the_flag(finetune, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([sample_row("0.png")]))
    with pytest.raises(ValueError, match=r"data.json \(sample 0\), image 0 \('0.png'\): no such file") as error:
        run_on(finetune, data)
    assert "pass image_folder (--image_folder in examples/finetune.py)" in str(error.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("data.json", '[{"messages": [', r"data.json, line 1 column 16: invalid JSON \(Expecting value\); a \.json "
         r"file holds one JSON list of samples"),
        ("data.json", json.dumps(sample_row()) + "\n" + json.dumps(sample_row()),
         r"data.json, line 2 column 1: invalid JSON \(Extra data\); the file holds several JSON values, one sample "
         r"per line: rename it to \.jsonl"),
        ("data.json", json.dumps(sample_row()), r"data.json: expected a JSON list of samples, got a dict"),
        ("data.jsonl", json.dumps(sample_row()) + "\n\n{'messages': 1}\n",
         r"data.jsonl, line 3: invalid JSON \(Expecting property name enclosed in double quotes, column 2\)"),
        ("data.jsonl", "", r"data.jsonl holds no samples"),
        ("data.jsonl", "\n  \n", r"data.jsonl holds no samples"),
        ("data.json", "[]", r"data.json holds no samples"),
        ("data.txt", "a,b", r"data.txt: training data must be a \.json file .*, a \.jsonl file .*\.parquet, \.csv"),
        ("data.jsonl", json.dumps(sample_row()) + "\n" + json.dumps({**sample_row(), "images": []}),
         r"data.jsonl, line 2: Sample 1: 1 <image> marker\(s\) but 0 image\(s\)"),
        ("data.jsonl", json.dumps({**sample_row(), "id": "q7", "messages": [
            {"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>Name it"},
            {"role": "assistant", "content": "red"}]}),
         r"data.jsonl, line 1: Sample 0 \(id 'q7'\), message 0: the text holds <\|vision_start\|>, <\|vision_end\|>, "
         r"<\|image_pad\|>"),
    ],
)  # fmt: skip
def test_malformed_or_empty_data_files_are_named_before_the_model_loads(finetune, tmp_path, name, content, message):
    write_images(tmp_path / "images")
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        run_on(finetune, tmp_path / name, image_folder=tmp_path / "images")


def test_missing_data_file_is_named(finetune, tmp_path):
    with pytest.raises(ValueError, match=r"gone.jsonl: no such training data file; check the path \(--data"):
        run_on(finetune, tmp_path / "gone.jsonl")


# ------------------------------------------------------------------------------------------------ stage options


def test_dual_masking_is_refused_outside_the_diffusion_stage(finetune, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([sample_row()]))
    for stage in ("ar", "align"):
        with pytest.raises(ValueError, match=f"dual applies to the diffusion stage only; the '{stage}' stage"):
            finetune.main(["--model", "m", "--data", str(data), "--stage", stage, "--output_dir", str(tmp_path),
                           "--mask_strategy", "dual"])  # fmt: skip


def test_command_line_reads_resume_flag_as_a_bool_and_ddp_flag(tmp_path):
    script = load_finetune_script()
    parse = script.parse_args
    base = ["--model", "m", "--data", "d.json", "--stage", "ar", "--output_dir", "o"]
    lora = script.training_overrides(parse(base + ["--lora"]))
    assert stage_training_arguments("ar", str(tmp_path), **lora).learning_rate == LORA_LEARNING_RATE
    assert parse(base + ["--resume_from_checkpoint", "True"]).resume_from_checkpoint is True
    assert parse(base + ["--resume_from_checkpoint", "false"]).resume_from_checkpoint is None
    assert parse(base + ["--resume_from_checkpoint", "o/checkpoint-2"]).resume_from_checkpoint == "o/checkpoint-2"
    assert parse(base + ["--ddp_find_unused_parameters", "false"]).ddp_find_unused_parameters is False
    with pytest.raises(SystemExit):
        parse(base + ["--ddp_find_unused_parameters", "maybe"])


def test_lora_learning_rate_and_unused_parameter_defaults(tmp_path):
    assert stage_training_arguments("diffusion", str(tmp_path), lora=True).learning_rate == LORA_LEARNING_RATE
    assert stage_training_arguments("ar", str(tmp_path), lora=True, learning_rate=3e-4).learning_rate == 3e-4
    assert stage_training_arguments("diffusion", str(tmp_path)).learning_rate == 5e-6
    # The projector gets no gradient from a batch without images; the diffusion stage uses every trained weight.
    unused = {stage: stage_training_arguments(stage, str(tmp_path)).ddp_find_unused_parameters
              for stage in ("align", "ar", "diffusion")}  # fmt: skip
    assert unused == {"align": True, "ar": True, "diffusion": False}


# ------------------------------------------------------------------------------------------------------ outputs


def finetune_cli(base, data, images, output_dir, stage, *extra):
    return [
        "--model", str(base), "--data", str(data), "--image_folder", str(images), "--stage", stage,
        "--output_dir", str(output_dir), "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "4",
        *extra,
    ]  # fmt: skip


def test_output_folder_is_ready_to_push_and_resume_true_takes_the_last_checkpoint(
    processor, tmp_path, monkeypatch
):
    base, data, images = write_finetune_inputs(processor, tmp_path)
    # What HF_HUB_OFFLINE=1 does: the loaded tokenizer remembers local_files_only=True, and would save it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    script, out = load_finetune_script(), tmp_path / "out"
    trainer = script.main(finetune_cli(base, data, images, out, "ar", "--learning_rate", "1e-2"))
    assert trainer.processor.tokenizer.init_kwargs.get("local_files_only") is True

    final = out / "final"
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "final"]
    assert not any(path.name.startswith("checkpoint") or path.suffix in (".pt", ".bin") for path in final.rglob("*"))
    for folder in (final, out / "checkpoint-2"):
        for path in folder.glob("*.json"):
            assert "local_files_only" not in path.read_text(), path
    card = (final / "README.md").read_text()
    assert "license: apache-2.0" in card and "library_name: transformers" in card
    # a local folder is neither a Hub link nor written down
    assert "| base model | a local folder (its Hub id was not given: --base_model_id) |" in card
    assert "base_model:" not in card and str(base) not in card
    for fact in ("| stage | ar |", "| decodes with | causal attention (full_attn_mask=False) |",
                 "| training samples | 8 |", "| optimizer steps | 2 |", "| learning rate | 0.01 |"):  # fmt: skip
        assert fact in card, fact
    reloaded = AutoModel.from_pretrained(final, trust_remote_code=True, dtype=torch.float32)
    torch.testing.assert_close(tiny_logits(reloaded, processor), tiny_logits(trainer.model, processor))

    first_history = trainer.state.log_history
    resumed = script.main(finetune_cli(base, data, images, out, "ar", "--learning_rate", "1e-2", "--max_steps", "3",
                                       "--resume_from_checkpoint", "True"))  # fmt: skip
    assert resumed.state.global_step == 3 and (out / "checkpoint-3").is_dir()
    losses = [entry for entry in resumed.state.log_history if "loss" in entry]
    assert losses[:2] == [entry for entry in first_history if "loss" in entry]  # steps 1-2 come from checkpoint-2


def test_remove_machine_local_keys_keeps_everything_else(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"local_files_only": True, "cache_dir": "/c", "a": 1}))
    (tmp_path / "config.json").write_text(json.dumps({"b": [1, 2]}))
    before = (tmp_path / "config.json").stat().st_mtime_ns
    remove_machine_local_keys(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"a": 1}
    assert (tmp_path / "config.json").stat().st_mtime_ns == before


def test_only_hub_ids_are_recorded_as_the_base_model(tmp_path, monkeypatch):
    (tmp_path / "org" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_reference("org/base") is None  # a local folder: never written into files meant for the Hub
    assert hub_reference(str(tmp_path / "org" / "base")) is None
    assert hub_reference("/nowhere/model") is None  # an absolute path, even a missing one
    assert hub_reference("org/model") == "org/model"  # no such folder: a Hub id, as given
    assert hub_reference("") is None
    assert check_base_model_id("org/model") == "org/model"
    with pytest.raises(ValueError, match="is a local path; give the base model's Hub id"):
        check_base_model_id(str(tmp_path / "org" / "base"))


@pytest.mark.parametrize(
    "stage, extra, saved_full_attention",
    [
        ("align", [], True),  # keeps the input model's bidirectional attention
        ("align", ["--output_attention", "causal"], False),
        ("ar", [], False),
        ("ar", ["--output_attention", "input"], True),
        ("diffusion", [], True),
    ],
)
def test_each_stage_states_and_saves_the_attention_its_output_decodes_with(
    processor, tmp_path, caplog, stage, extra, saved_full_attention
):
    base, data, images = write_finetune_inputs(processor, tmp_path)
    assert json.loads((base / "config.json").read_text())["full_attn_mask"] is True
    script = load_finetune_script()
    script.main(finetune_cli(base, data, images, tmp_path / "out", stage, "--save_steps", "5", *extra))
    final = tmp_path / "out" / "final"
    assert json.loads((final / "config.json").read_text())["full_attn_mask"] is saved_full_attention
    attention = "bidirectional" if saved_full_attention else "causal"
    assert f"The saved model decodes with {attention} attention" in caplog.text
    assert f"| decodes with | {attention} attention (full_attn_mask={saved_full_attention}) |" in (
        final / "README.md"
    ).read_text()
    generation = DimpleGenerationConfig.from_pretrained(final)  # the file omits settings equal to the defaults
    assert generation.decoding == ("diffusion" if saved_full_attention else "autoregressive")
    assert generation.eos_token_id == processor.tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])


# ------------------------------------------------------------------------------------------------------ adapter

ADAPTER_LOGITS = """
import sys, torch
from peft import AutoPeftModel
model = AutoPeftModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
batch = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(**batch).logits, sys.argv[3])
"""


def put_in_hub_cache(folder, repo_id, cache):
    """`folder` as the cached snapshot of Hub model `repo_id`: what `from_pretrained(repo_id)` finds offline."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_lora_adapter_loads_on_its_own_from_another_folder_and_matches_the_merged_model(
    processor, tmp_path, monkeypatch
):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    write_finetune_inputs(processor, work)
    put_in_hub_cache(work / "base", "me/tiny-dimple", tmp_path / "hub")
    monkeypatch.chdir(work)  # the base model is given as a relative path, the way users type it
    trainer = load_finetune_script().main(
        finetune_cli("base", "data.jsonl", "images", "out", "diffusion", "--lora", "--lora_r", "4", "--lora_dropout",
                     "0", "--save_steps", "5", "--learning_rate", "1e-2", "--base_model_id", "me/tiny-dimple")
    )  # fmt: skip
    adapter = work / "out" / "lora_adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "me/tiny-dimple"
    assert config["auto_mapping"] == {"base_model_class": "AutoModel", "parent_library": "transformers"}
    assert not (adapter / "training_args.bin").exists()
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "base_model: me/tiny-dimple" in card and "| LoRA | r=4," in card
    assert "# out-lora" in card and 'AutoPeftModel.from_pretrained("out-lora"' in card

    merged = AutoModel.from_pretrained(work / "out" / "final", trust_remote_code=True, dtype=torch.float32)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    batch = DimpleDataCollator(processor, answer_padding="fixed", fixed_answer_length=4)(toy_samples()[:2])
    torch.save({key: batch[key] for key in keys}, tmp_path / "batch.pt")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", ADAPTER_LOGITS, str(adapter), str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")],
        cwd=elsewhere, env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(tmp_path / "hub")},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    adapter_logits = torch.load(tmp_path / "logits.pt")
    merged_logits = tiny_logits(merged, processor)
    base_logits = tiny_logits(make_tiny_model(), processor)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # the adapter changed something
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-5, rtol=1e-5)
