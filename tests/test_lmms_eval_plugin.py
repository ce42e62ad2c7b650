"""The lmms-eval plugin (`integrations/lmms_eval`): registration, settings, and the shapes task end to end.

Skipped unless lmms-eval and the plugin are installed (`pip install -r requirements-eval.txt`, see README).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")
if "dimple" not in {entry.name for entry in entry_points(group="lmms_eval.models")}:
    pytest.skip("the lmms-eval-dimple plugin is not installed", allow_module_level=True)

from conftest import REPO_ROOT  # noqa: E402
from lmms_eval_dimple.model import (  # noqa: E402
    AUTO_START_BATCH_SIZE,
    PUBLISHED_SETTINGS,
    Dimple,
    generation_settings,
    overridden_model_args,
    resolve_batch_size,
)

from shapes.evaluate import answer_batch, decoding_settings, load  # noqa: E402
from shapes.task import heldout_examples, render  # noqa: E402

CHECKPOINT = REPO_ROOT / "checkpoints" / "dimple-shapes"
TASK_FOLDER = REPO_ROOT / "shapes" / "lmms_eval_task"
QUESTIONS = 24
PASSES_LOG = re.compile(r"(\d+) questions, (\d+) forward passes for (\d+) answer tokens")


def test_lmms_eval_finds_the_dimple_model_through_its_entry_point():
    from lmms_eval.models import get_model

    assert get_model("dimple") is Dimple


def test_settings_resolve_published_then_model_args_then_request():
    settings, stops = generation_settings({}, {"until": ["\n\n"], "do_sample": False, "num_beams": 1})
    assert settings == {**PUBLISHED_SETTINGS, "temperature": 0.0, "steps": PUBLISHED_SETTINGS["max_new_tokens"]}
    assert stops == ["\n\n"]
    # steps follow max_new_tokens unless given; the request overrides --model_args.
    settings, _ = generation_settings({"alg": "entropy", "max_new_tokens": 16}, {"max_new_tokens": 64})
    assert (settings["alg"], settings["max_new_tokens"], settings["steps"]) == ("entropy", 64, 64)
    settings, stops = generation_settings({"steps": 4, "top_k": "None"}, {"max_new_tokens": 64, "until": "###"})
    assert (settings["steps"], settings["top_k"], stops) == (4, None, ["###"])
    with pytest.raises(ValueError, match="num_beams"):
        generation_settings({}, {"num_beams": 4})


def test_a_model_arg_that_the_task_sets_otherwise_is_named_with_the_value_that_wins():
    [message] = overridden_model_args({"alg": "entropy", "steps": 8}, {"alg": "maskgit_plus", "steps": 8})
    assert "--model_args alg='entropy' is overridden" in message and "alg='maskgit_plus'" in message
    assert "the task's value is used" in message
    [message] = overridden_model_args({"temperature": 0.2}, {"do_sample": False})
    assert "temperature=0.2" in message and "temperature=0.0 (from do_sample: false)" in message
    assert overridden_model_args({"top_k": "None"}, {"top_k": None, "until": ["x"]}) == []


def test_batch_size_auto_starts_at_the_cap_on_a_gpu_and_is_one_on_cpu():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_batch_size("auto", None, gpu) == AUTO_START_BATCH_SIZE
    assert resolve_batch_size("auto:4", 16, gpu) == 16
    assert resolve_batch_size("auto", 16, cpu) == 1
    assert resolve_batch_size("8", None, cpu) == resolve_batch_size(8, None, gpu) == 8
    for bad in ("0", "eight", -1, 2.5, None):
        with pytest.raises(ValueError, match="batch_size must be a positive integer, 'auto' or 'auto:N'"):
            resolve_batch_size(bad, None, cpu)


def test_out_of_memory_halves_an_auto_batch_and_changes_no_answer(monkeypatch):
    examples = heldout_examples(5)
    contexts = [example.question for example in examples]
    visuals = [[render(example.scene)] for example in examples]
    settings, _ = generation_settings({}, {"max_new_tokens": 16, "alg_p_threshold": None})
    lm = Dimple(pretrained=str(CHECKPOINT), device="cpu")
    one_by_one = [lm.answer([c], [v], settings)[0] for c, v in zip(contexts, visuals)]

    generate, batches = lm.model.diffusion_generate, []

    def at_most_two_rows(input_ids, **kwargs):  # a device that holds two rows
        batches.append(len(input_ids))
        if len(input_ids) > 2:
            raise torch.OutOfMemoryError("planted: more than two rows")
        return generate(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(lm.model, "diffusion_generate", at_most_two_rows)
    lm.auto_batch_size, lm.batch_size_per_device = True, 4
    assert lm.answer_in_fitting_batches(contexts, visuals, settings, [False] * 5) == one_by_one
    assert batches == [4, 2, 2, 1] and lm.batch_size_per_device == 2
    lm.auto_batch_size, lm.batch_size_per_device = False, 4  # a batch size the user chose is not changed
    with pytest.raises(torch.OutOfMemoryError):
        lm.answer_in_fitting_batches(contexts, visuals, settings, [False] * 5)


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """The shapes_vqa task with its data written by its own script (the first QUESTIONS held-out questions)."""
    folder = tmp_path_factory.mktemp("task")
    for name in ("shapes_vqa.yaml", "utils.py"):
        shutil.copy(TASK_FOLDER / name, folder / name)
    script = TASK_FOLDER / "write_data.py"
    output = folder / "data" / "heldout.parquet"
    subprocess.run([sys.executable, script, "--questions", str(QUESTIONS), "--output", output], check=True)
    return folder


def run_lmms_eval(task_folder, output, launcher=(), batch_size="8", model_args=""):
    command = [
        *launcher, "-m", "lmms_eval", "--model", "dimple", "--model_args", f"pretrained={CHECKPOINT}{model_args}",
        "--batch_size", batch_size, "--tasks", "shapes_vqa", "--include_path", str(task_folder), "--log_samples",
        "--output_path", str(output),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    [results] = Path(output).rglob("*_results.json")
    [samples] = Path(output).rglob("*_samples_shapes_vqa.jsonl")
    answers = {}
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        response = sample["filtered_resps"]  # lmms-eval logs one response per doc, bare or in a list
        answers[sample["doc_id"]] = response[0] if isinstance(response, list) else response
    return json.loads(results.read_text())["results"]["shapes_vqa"], answers, run.stdout + run.stderr


@pytest.fixture(scope="module")
def direct_answers():
    """The same questions answered by `shapes/evaluate.py`'s code path with the checkpoint's decoding."""
    model, processor = load(CHECKPOINT)
    setting = next(s for s in decoding_settings(32) if s.name == "confident-0.9")
    examples = heldout_examples(QUESTIONS)
    with torch.inference_mode():
        texts = answer_batch(model, processor, examples, setting.options)["texts"]
    return texts, [text == example.answer for text, example in zip(texts, examples)]


def test_lmms_eval_on_the_shapes_task_matches_direct_evaluation(task_folder, direct_answers, tmp_path):
    # --batch_size auto on CPU runs batch size 1; the task's alg (maskgit_plus) wins over --model_args alg=entropy.
    results, answers, log = run_lmms_eval(
        task_folder, tmp_path / "one", [sys.executable], batch_size="auto", model_args=",alg=entropy"
    )
    texts, correct = direct_answers
    assert [answers[doc_id] for doc_id in range(QUESTIONS)] == texts
    assert results["exact_match,none"] == pytest.approx(sum(correct) / QUESTIONS)
    assert "--batch_size auto on CPU" in log and "using batch size 1" in log
    assert log.count("--model_args alg='entropy' is overridden") == 1 and "alg='maskgit_plus'" in log


def test_two_processes_each_score_half_and_agree_with_one(task_folder, direct_answers, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    results, answers, log = run_lmms_eval(task_folder, tmp_path / "two", torchrun)
    texts, correct = direct_answers
    assert [answers[doc_id] for doc_id in range(QUESTIONS)] == texts
    assert results["exact_match,none"] == pytest.approx(sum(correct) / QUESTIONS)
    shares = [PASSES_LOG.search(log[log.index(f"Dimple rank {rank}/2: ") :]).groups() for rank in (0, 1)]
    assert [int(questions) for questions, _, _ in shares] == [QUESTIONS // 2] * 2  # each process's share
    # Rank 0 logs all processes together, once.
    [combined] = re.findall(r"Dimple, all 2 processes: (.*)", log)
    questions, passes, tokens = map(int, PASSES_LOG.search(combined).groups())
    assert questions == QUESTIONS
    assert (passes, tokens) == tuple(sum(int(share[i]) for share in shares) for i in (1, 2))
