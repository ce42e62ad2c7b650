"""examples/finetune.py as a user meets it: data checked before the model loads, stage options, the attention each
stage's output decodes with, an output folder ready to push and a LoRA adapter that loads on its own."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import REPO_ROOT, make_tiny_model
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
    load_samples,
    load_training_data,
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


def test_command_line_is_training_arguments_with_the_stage_defaults(tmp_path):
    script = load_finetune_script()
    base = ["--model", "m", "--data", "d.json", "--output_dir", "o"]
    dimple, training = script.parse_args(base + ["--stage", "ar", "--lora"])
    assert dimple.lora is True and training.learning_rate == LORA_LEARNING_RATE
    for stage in ("align", "ar", "diffusion"):
        expected = stage_training_arguments(stage, "o", per_device_train_batch_size=1, logging_steps=10)
        _, training = script.parse_args(base + ["--stage", stage])
        assert training.to_dict() == expected.to_dict(), stage
    # a value given on the command line wins over the stage's default; TrainingArguments' own options pass through
    _, training = script.parse_args(base + ["--stage", "diffusion", "--learning_rate", "3e-4", "--max_grad_norm",
                                            "0.5", "--bf16", "false", "--hub_model_id", "me/m"])  # fmt: skip
    assert (training.learning_rate, training.max_grad_norm, training.hub_model_id) == (3e-4, 0.5, "me/m")
    assert training.remove_unused_columns is False
    parse = script.parse_args
    resume = [parse(base + ["--stage", "ar", "--resume_from_checkpoint", value])[1].resume_from_checkpoint
              for value in ("True", "false", "o/checkpoint-2")]  # fmt: skip
    assert [script.checkpoint_or_last(value) for value in resume] == [True, None, "o/checkpoint-2"]
    assert parse(base + ["--stage", "ar", "--ddp_find_unused_parameters", "false"])[1].ddp_find_unused_parameters is False
    with pytest.raises(SystemExit):
        parse(base + ["--stage", "ar", "--ddp_find_unused_parameters", "maybe"])
    with pytest.raises(SystemExit):
        parse(base + ["--stage", "pretrain"])


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


# ----------------------------------------------------------------------- issue 30: lengths, encodings, formats, seeds

POSITIONS = 64  # the tiny base model's max_position_embeddings in these tests


@pytest.fixture
def light_finetune(monkeypatch, processor):
    """The script, with the model's loading replaced by a failure: the processor (here the word-level one, so that
    token counts are words) and the config are light and load for the length checks, the model must not."""
    script = load_finetune_script()

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before every sample was measured")

    monkeypatch.setattr(script, "AutoModel", SimpleNamespace(from_pretrained=refuse))
    monkeypatch.setattr(script, "AutoProcessor", SimpleNamespace(from_pretrained=lambda *args, **kwargs: processor))
    return script


def write_base(processor, folder, positions=POSITIONS):
    make_tiny_model(max_position_embeddings=positions).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def words(count):
    return " ".join(["red", "square", "and", "blue", "circle"] * (count // 5) + ["cat"] * (count % 5))


def twenty_rows(bad: dict):
    """20 good samples with an image; `bad` maps a 0-based row to a replacement (line = row + 1)."""
    rows = [sample_row(f"{number % 3}.png") for number in range(20)]
    for row, sample in bad.items():
        rows[row] = sample
    return rows


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_samples_longer_than_the_models_positions_are_listed_before_the_model_loads(
    light_finetune, processor, tmp_path
):
    base, images = write_base(processor, tmp_path / "base"), write_images(tmp_path / "images")
    two_images = {"messages": [{"role": "user", "content": "<image>Name the color ?"},
                               {"role": "assistant", "content": words(40)},
                               {"role": "user", "content": "and <image> ?"}, {"role": "assistant", "content": "red"}],
                  "images": ["0.png", "1.png"]}  # fmt: skip
    rows = twenty_rows({13: sample_row(answer=words(60)), 16: two_images})
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    args = ["--model", str(base), "--data", str(data), "--image_folder", str(images), "--stage", "diffusion",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(ValueError) as error:
        light_finetune.main(args)  # --max_length defaults to the model's 64 positions
    message = str(error.value)
    assert message.startswith(f"2 of 20 sample(s) are longer than max_length={POSITIONS}:\n")
    # the long answer: prompt (system, question, 4 image tokens, header) + 60 words + 1 pad
    assert re.search(rf"{data}, line 14 \(sample 13\): \d+ tokens \(images expanded, each answer with one pad\) > "
                     rf"max_length=64; the cut would remove answer 1 \(\d+ of 61 tokens\)\n", message)  # fmt: skip
    # the second image falls beyond the cut: named, not dropped
    assert re.search(rf"{data}, line 17 \(sample 16\): .* image 2 \(all 6 of 6 tokens\), answer 2 \(all 2 of 2", message)
    assert "or pass truncate_answers=True (--truncate_answers)" in message

    with pytest.raises(ValueError, match=f"max_length=128 exceeds the model's {POSITIONS} positions"):
        light_finetune.main(args + ["--max_length", "128"])


def test_truncate_answers_cuts_only_answer_ends_and_says_how_many(light_finetune, processor, tmp_path, caplog):
    base, images = write_base(processor, tmp_path / "base"), write_images(tmp_path / "images")
    two_images = {"messages": [{"role": "user", "content": "<image>Name the color ?"},
                               {"role": "assistant", "content": words(40)},
                               {"role": "user", "content": "and <image> ?"}, {"role": "assistant", "content": "red"}],
                  "images": ["0.png", "1.png"]}  # fmt: skip
    args = ["--model", str(base), "--image_folder", str(images), "--stage", "diffusion", "--output_dir",
            str(tmp_path / "out"), "--truncate_answers"]  # fmt: skip
    refused = write_jsonl(tmp_path / "refused.jsonl", twenty_rows({13: sample_row(answer=words(60)), 16: two_images}))
    with pytest.raises(ValueError, match=r"1 of 20 sample\(s\) are longer .*\n  .*line 17 \(sample 16\).*\n"
                                         r"These cuts would reach past the last answer"):  # fmt: skip
        light_finetune.main(args + ["--data", str(refused)])

    accepted = write_jsonl(tmp_path / "data.jsonl", twenty_rows({13: sample_row(answer=words(60))}))
    with pytest.raises(AssertionError, match="the model loaded"):  # every check passed: the model is next
        light_finetune.main(args + ["--data", str(accepted)])
    assert "truncate_answers: the last answer of 1 of 20 sample(s) is cut at max_length=64" in caplog.text
    assert f"{accepted}, line 14 (sample 13)" in caplog.text
    # What trains: the first 64 tokens, the image whole, the answer cut at its end.
    from training_dimple import DimpleDataCollator as Collator

    collator = Collator(processor, max_length=POSITIONS, truncate_answers=True, image_folder=images)
    batch = collator([load_samples(accepted)[13]])
    full = Collator(processor, image_folder=images)([load_samples(accepted)[13]])
    assert batch["input_ids"].shape == (1, POSITIONS)
    assert batch["input_ids"][0].tolist() == full["input_ids"][0, :POSITIONS].tolist()
    assert torch.equal(batch["pixel_values"], full["pixel_values"])


def test_latin1_and_utf16_files_are_named_with_the_fix_before_the_model_loads(finetune, tmp_path):
    write_images(tmp_path / "images")
    rows = [json.dumps(row) for row in twenty_rows({})]
    rows[13] = rows[13].replace("red square", "caf\u00e9")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes("\n".join(rows).encode("latin-1"))
    offset = latin1.read_bytes().index(b"\xe9")
    with pytest.raises(ValueError, match=rf"latin1.jsonl, line 14: byte 0xe9 at byte offset {offset} is not UTF-8 "
                                         r".*Save it as UTF-8, e.g. `iconv -f WINDOWS-1252 -t UTF-8"):  # fmt: skip
        run_on(finetune, latin1, image_folder=tmp_path / "images")
    utf16 = tmp_path / "notepad.jsonl"
    utf16.write_bytes("\n".join(rows).encode("utf-16"))  # with its byte-order mark, as Notepad writes it
    with pytest.raises(ValueError, match=r"notepad.jsonl is UTF-16-encoded \(it starts with a UTF-16 byte-order mark"
                                         r".*Save it as UTF-8"):  # fmt: skip
        run_on(finetune, utf16, image_folder=tmp_path / "images")


def collated(processor, dataset, images):
    from training_dimple import DimpleDataCollator as Collator

    collator = Collator(processor, answer_padding="fixed", fixed_answer_length=4, image_folder=images)
    return collator([dataset[index] for index in range(len(dataset))])


def assert_same_batches(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_utf8_bom_and_upper_case_suffix_train_the_same_samples(processor, tmp_path):
    images = write_images(tmp_path / "images")
    plain = write_jsonl(tmp_path / "plain.jsonl", twenty_rows({}))
    bom = tmp_path / "train.JSONL"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    expected = load_training_data(plain, images)
    got = load_training_data(bom, images)
    assert got.samples == expected.samples and got.locations[13] == f"{bom}, line 14"
    assert_same_batches(collated(processor, got, images), collated(processor, expected, images))


def test_transformers_chat_content_parts_train_as_markers(processor, tmp_path):
    images = write_images(tmp_path / "images")
    markers = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": "<image>Name the color ?"},
                            {"role": "assistant", "content": "red square"},
                            {"role": "user", "content": "and <image> ?"}, {"role": "assistant", "content": "blue"}],
               "images": ["0.png", "1.png"]}  # fmt: skip
    parts = {"messages": [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
                          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name the color ?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "red square"}]},
                          {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "image"},
                                                       {"type": "text", "text": " ?"}]},
                          {"role": "assistant", "content": "blue"}],
             "images": ["0.png", "1.png"]}  # fmt: skip
    inline = json.loads(json.dumps(parts).replace('{"type": "image"}', '{"type": "image", "path": "%s"}'))
    inline["messages"][1]["content"][0]["path"] = "0.png"
    inline["messages"][3]["content"][1]["path"] = "1.png"
    del inline["images"]
    expected = collated(processor, load_training_data([markers], images), images)
    for sample in (parts, inline):
        assert_same_batches(collated(processor, load_training_data([sample], images), images), expected)
    bad = {**parts, "messages": [{"role": "user", "content": [{"type": "audio"}]}, parts["messages"][2]]}
    with pytest.raises(ValueError, match=r"Sample 0, message 0, part 0: a content part is \{'type': 'text'"):
        load_training_data([bad], images)


def test_parquet_csv_and_save_to_disk_folders_train_the_same_samples(processor, tmp_path):
    datasets = pytest.importorskip("datasets")
    images = write_images(tmp_path / "images")
    rows = twenty_rows({})
    expected = load_training_data(write_jsonl(tmp_path / "data.jsonl", rows), images)
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "data.PARQUET"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved_dict"))
    flat = [{"image": row["images"][0], "question": "Name the color ?", "answer": "red square"} for row in rows]
    datasets.Dataset.from_list(flat).to_csv(str(tmp_path / "data.csv"))
    for source in ("data.PARQUET", "saved", "saved_dict", "data.csv"):
        got = load_training_data(tmp_path / source, images)
        assert got.samples == expected.samples, source
        assert got.locations[13].endswith(", row 13"), got.locations[13]
        assert_same_batches(collated(processor, got, images), collated(processor, expected, images))


def test_tables_without_the_columns_or_without_datasets_are_refused_with_the_fix(finetune, tmp_path, monkeypatch):
    (tmp_path / "data.csv").write_text("prompt,reply\nName it,red\n")
    with pytest.raises(ValueError, match=r"data.csv: a table of training data needs a 'messages' column .* the "
                                         r"columns question, answer .* it has prompt, reply"):  # fmt: skip
        run_on(finetune, tmp_path / "data.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=r"folder is a folder but not a `datasets.save_to_disk` folder"):
        run_on(finetune, tmp_path / "folder")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"data.csv: reading it needs the `datasets` package \(`pip install datasets`\)"
                                         r"; or convert it to JSON Lines"):  # fmt: skip
        run_on(finetune, tmp_path / "data.csv")


def lora_run(base, data, images, output_dir):
    return finetune_cli(base, data, images, output_dir, "diffusion", "--lora", "--lora_r", "4", "--save_steps", "5",
                        "--learning_rate", "1e-2", "--seed", "3")  # fmt: skip


def saved_tensors(folder):
    from safetensors.torch import load_file

    return {path.name: load_file(path) for path in sorted(folder.glob("*.safetensors"))}


def assert_bit_identical(first, second):
    assert first.keys() == second.keys() and first
    for name in first:
        assert first[name].keys() == second[name].keys()
        for key in first[name]:
            assert torch.equal(first[name][key], second[name][key]), (name, key)


def test_two_lora_runs_with_the_same_seed_save_bit_identical_adapters(processor, tmp_path):
    base, data, images = write_finetune_inputs(processor, tmp_path)
    script = load_finetune_script()
    for run in ("one", "two"):  # in one process
        script.main(lora_run(base, data, images, tmp_path / run))
    # and in a process of its own, with this process's thread count (CPU reductions round by how they are split)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    script_path = str(REPO_ROOT / "examples" / "finetune.py")
    result = subprocess.run([sys.executable, script_path, *lora_run(base, data, images, tmp_path / "three")],
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for folder in ("lora_adapter", "final"):
        one = saved_tensors(tmp_path / "one" / folder)
        assert_bit_identical(one, saved_tensors(tmp_path / "two" / folder))
        assert_bit_identical(one, saved_tensors(tmp_path / "three" / folder))
    other_seed = lora_run(base, data, images, tmp_path / "four")
    script.main(other_seed[:-1] + ["4"])
    adapter = saved_tensors(tmp_path / "one" / "lora_adapter")["adapter_model.safetensors"]
    changed = saved_tensors(tmp_path / "four" / "lora_adapter")["adapter_model.safetensors"]
    assert any(not torch.equal(adapter[key], changed[key]) for key in adapter)  # the seed matters


def machine_paths(*folders):
    """Absolute paths of this machine a pushed file must not hold: the folders given, home, the repository."""
    paths = {str(folder.resolve()) for folder in folders} | {str(Path.home()), str(REPO_ROOT)}
    return sorted(path for path in paths if path not in ("/", ""))


def test_output_folders_hold_no_local_path_a_hub_name_and_usual_permissions(processor, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    write_finetune_inputs(processor, work)
    monkeypatch.chdir(work)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    load_finetune_script().main(finetune_cli("base", "data.jsonl", "images", "my-run", "diffusion", "--lora",
                                             "--lora_r", "4", "--save_steps", "5"))  # fmt: skip
    umask = os.umask(0)
    os.umask(umask)
    forbidden = machine_paths(tmp_path, work, work / "base")
    for folder in (work / "my-run" / "final", work / "my-run" / "lora_adapter"):
        files = [path for path in folder.rglob("*") if path.is_file()]
        assert any(path.name.endswith(".safetensors") for path in files)
        for path in files:
            content = path.read_bytes()
            for local in forbidden:
                assert local.encode() not in content, (path, local)
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path, oct(path.stat().st_mode))
    card = (work / "my-run" / "final" / "README.md").read_text()
    assert card.count("# my-run\n") == 1 and 'from_pretrained("my-run"' in card and "final" not in card.split("##")[0]
    adapter_card = (work / "my-run" / "lora_adapter" / "README.md").read_text()
    assert "# my-run-lora\n" in adapter_card and 'AutoPeftModel.from_pretrained("my-run-lora"' in adapter_card
    adapter_config = json.loads((work / "my-run" / "lora_adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] is None  # a local base: no path, and the run said so


def test_hub_model_id_names_the_card(processor, tmp_path):
    base, data, images = write_finetune_inputs(processor, tmp_path)
    load_finetune_script().main(finetune_cli(base, data, images, tmp_path / "out", "ar", "--save_steps", "5",
                                             "--hub_model_id", "me/my-dimple", "--base_model_id", "org/dimple-base"))  # fmt: skip
    card = (tmp_path / "out" / "final" / "README.md").read_text()
    assert "# me/my-dimple\n" in card and 'AutoModelForImageTextToText.from_pretrained("me/my-dimple"' in card
    assert "base_model: org/dimple-base" in card and "| base model | org/dimple-base |" in card
