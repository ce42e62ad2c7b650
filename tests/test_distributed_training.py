"""Multi-process fine-tuning run for real (2 CPU processes, gloo), resumed runs, and the launcher's warning.

`DIMPLE_TWO_PROCESS_RUNS=N` repeats the two-process LoRA run N times (default 1): the abort it used to end with
("terminate called without an active exception") came in a few runs out of dozens.
"""

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT, make_tiny_model
from safetensors.torch import load_file
from test_training import load_finetune_script, processor, text_sample, toy_samples  # noqa: F401 (fixture)

from training_dimple import DimpleDataCollator, build_trainer, stage_training_arguments, warn_if_single_process


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TWO_PROCESS_RUNS = int(os.environ.get("DIMPLE_TWO_PROCESS_RUNS", "1"))


def write_finetune_inputs(processor, folder):
    """A tiny model, its processor and 8 samples (6 with an image) as files, the way finetune.py reads them."""
    base, images = folder / "base", folder / "images"
    make_tiny_model().save_pretrained(base)
    processor.save_pretrained(base)
    images.mkdir()
    rows = []
    for number, sample in enumerate(toy_samples()):
        sample["images"][0].save(images / f"{number}.png")
        rows.append({**sample, "images": [f"{number}.png"]})
    rows += [text_sample("a red square and a blue circle"), text_sample("green cat")]
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    return base, data, images


def finetune_args(base, data, images, output_dir, per_device_batch):
    # Global batch 4 = per-device batch x 2 accumulation steps x processes; 2 steps = one epoch of 8 samples.
    return [
        "--model", str(base), "--data", str(data), "--image_folder", str(images), "--stage", "diffusion",
        "--mask_strategy", "dual", "--output_dir", str(output_dir), "--max_steps", "2", "--save_steps", "2",
        "--logging_steps", "1", "--per_device_train_batch_size", str(per_device_batch),
        "--gradient_accumulation_steps", "2", "--optim", "sgd", "--learning_rate", "1.0", "--max_grad_norm", "0",
        "--warmup_steps", "0",
    ]  # fmt: skip


def logged_losses(output_dir):
    history = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    return [(entry["epoch"], entry["loss"]) for entry in history if "loss" in entry]


needs_deepspeed = pytest.mark.skipif(not importlib.util.find_spec("deepspeed"), reason="deepspeed absent")


@pytest.mark.parametrize(
    "deepspeed",
    [None, pytest.param("zero1.json", marks=needs_deepspeed), pytest.param("zero2.json", marks=needs_deepspeed)],
)
def test_two_processes_train_exactly_like_one_with_the_same_global_batch(processor, tmp_path, deepspeed):
    base, data, images = write_finetune_inputs(processor, tmp_path)
    torchrun = TORCHRUN + ["--master_port", "29517"]
    two_args = finetune_args(base, data, images, tmp_path / "two", 1)
    if deepspeed:  # DeepSpeed runs on CPU with its own CPU accelerator
        two_args += ["--deepspeed", str(REPO_ROOT / "examples" / "configs" / deepspeed)]
    two = subprocess.run(
        torchrun + [str(REPO_ROOT / "examples" / "finetune.py"), *two_args],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    load_finetune_script().main(finetune_args(base, data, images, tmp_path / "one", 2))

    one_losses, two_losses = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    # Both runs finish the epoch in 2 steps: a 2-process run that silently trained alone would be at epoch 0.5.
    assert [epoch for epoch, _ in one_losses] == [epoch for epoch, _ in two_losses] == [0.5, 1.0]
    assert [loss for _, loss in two_losses] == pytest.approx([loss for _, loss in one_losses], rel=1e-5)
    initial = load_file(base / "model.safetensors")
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert any(not torch.equal(one[name], initial[name]) for name in one)
    for name, weight in one.items():
        torch.testing.assert_close(two[name], weight, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("repetition", range(TWO_PROCESS_RUNS))
def test_two_process_lora_runs_end_cleanly_and_repeat_bit_for_bit(processor, tmp_path, repetition):
    base, data, images = write_finetune_inputs(processor, tmp_path)
    for name in ("one", "two"):
        args = finetune_args(base, data, images, tmp_path / name, 1) + ["--lora", "--lora_r", "4"]
        run = subprocess.run(
            TORCHRUN + ["--master_port", "29518", str(REPO_ROOT / "examples" / "finetune.py"), *args],
            env=ENV, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        assert "terminate called" not in run.stderr
    for saved in ("lora_adapter/adapter_model.safetensors", "final/model.safetensors"):
        one, two = load_file(tmp_path / "one" / saved), load_file(tmp_path / "two" / saved)
        assert one.keys() == two.keys()
        for key, weight in one.items():
            assert torch.equal(weight, two[key]), (saved, key)


# Rank 0 keeps working after rank 1 is done, as it does while it merges and saves the final model.
SLOW_RANK_0 = """
import time, torch, torch.distributed as dist
from training_dimple import end_distributed_run
dist.init_process_group("gloo")
dist.all_reduce(torch.ones(3))
if dist.get_rank() == 0:
    time.sleep(1)
end_distributed_run()
assert not dist.is_initialized()
"""


def test_processes_wait_for_a_slow_rank_0_and_exit_cleanly(tmp_path):
    script = tmp_path / "slow_rank_0.py"
    script.write_text(SLOW_RANK_0)
    for attempt in range(4):  # without end_distributed_run, 2 of 8 such runs aborted in rank 1
        run = subprocess.run(
            TORCHRUN + ["--master_port", "29519", str(script)], env={**ENV, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0 and "terminate called" not in run.stderr, (attempt, run.stderr[-3000:])


def record_batches(monkeypatch):
    """Every batch any DimpleDataCollator returns, in order."""
    batches, collate = [], DimpleDataCollator.__call__

    def recording(self, features):
        batch = collate(self, features)
        indices = [feature["sample_index"] for feature in features]
        batches.append({"indices": indices, **{key: batch[key] for key in ("input_ids", "labels")}})
        return batch

    monkeypatch.setattr(DimpleDataCollator, "__call__", recording)
    return batches


def test_resumed_run_draws_the_same_masks_as_an_uninterrupted_one(processor, tmp_path, monkeypatch):
    # 6 samples, batch 2: 3 steps per epoch; checkpoint 2 is inside epoch 0, checkpoint 4 inside epoch 1.
    def run(resume=None):
        args = stage_training_arguments(
            "diffusion", str(tmp_path / "run"), max_steps=5, save_steps=2, per_device_train_batch_size=2,
            learning_rate=1e-2, warmup_steps=0,
        )  # fmt: skip
        batches = record_batches(monkeypatch)
        build_trainer(make_tiny_model(), processor, toy_samples(), "diffusion", args).train(
            resume_from_checkpoint=resume
        )
        return batches

    uninterrupted = run()
    for checkpoint, done in (("checkpoint-2", 2), ("checkpoint-4", 4)):
        resumed = run(str(tmp_path / "run" / checkpoint))
        for step, batch in enumerate(uninterrupted[done:5]):
            for key in batch:
                assert torch.equal(torch.as_tensor(resumed[step][key]), torch.as_tensor(batch[key])), (checkpoint, key)

    # The epoch reaches the collator: a sample of step 4 (epoch 1) was drawn differently in epoch 0.
    def scored(batch):  # per sample: its scored positions and tokens, whatever the batch's padded width
        return {
            index: [(p, int(t)) for p, t in enumerate(row) if t != -100]
            for index, row in zip(batch["indices"], batch["labels"])
        }

    first_epoch = {index: row for batch in uninterrupted[:3] for index, row in scored(batch).items()}
    assert all(row != first_epoch[index] for index, row in scored(uninterrupted[3]).items())


def test_each_epoch_draws_new_masks_for_the_same_sample(processor):
    collator = DimpleDataCollator(processor, objective="diffusion", seed=0)
    sample = [{**text_sample("a red square and a blue circle and a green cat"), "sample_index": 3}]
    first = collator(sample)["input_ids"]
    assert torch.equal(collator(sample)["input_ids"], first)  # a function of (seed, index, epoch)
    collator.set_epoch(1)
    assert not torch.equal(collator(sample)["input_ids"], first)


def test_warns_when_a_multi_process_launch_trains_in_one_process(monkeypatch, caplog):
    alone, together = SimpleNamespace(world_size=1), SimpleNamespace(world_size=2)
    # What `accelerate launch --cpu --num_processes 2` leaves: a rendezvous address but no WORLD_SIZE / RANK.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert warn_if_single_process(alone)
    assert "torchrun --nproc_per_node" in caplog.text
    monkeypatch.delenv("MASTER_ADDR")
    assert not warn_if_single_process(alone)
    # What torchrun leaves in each process; TrainingArguments(use_cpu=False) without a GPU gives world size 1.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert warn_if_single_process(alone)
    assert not warn_if_single_process(together)
