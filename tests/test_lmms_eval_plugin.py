"""The lmms-eval plugin (`integrations/lmms_eval`): registration, settings, and the shapes task end to end.

Skipped unless lmms-eval and the plugin are installed (`pip install -r requirements-eval.txt`, see README).
"""

import json
import os
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
from lmms_eval_dimple.model import PUBLISHED_SETTINGS, Dimple, generation_settings  # noqa: E402

from shapes.evaluate import answer_batch, decoding_settings, load  # noqa: E402
from shapes.task import heldout_examples  # noqa: E402

CHECKPOINT = REPO_ROOT / "checkpoints" / "dimple-shapes"
TASK_FOLDER = REPO_ROOT / "shapes" / "lmms_eval_task"
QUESTIONS = 24


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


def run_lmms_eval(task_folder, output, launcher=()):
    command = [
        *launcher, "-m", "lmms_eval", "--model", "dimple", "--model_args", f"pretrained={CHECKPOINT}",
        "--batch_size", "8", "--tasks", "shapes_vqa", "--include_path", str(task_folder), "--log_samples",
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
    results, answers, _ = run_lmms_eval(task_folder, tmp_path / "one", [sys.executable])
    texts, correct = direct_answers
    assert [answers[doc_id] for doc_id in range(QUESTIONS)] == texts
    assert results["exact_match,none"] == pytest.approx(sum(correct) / QUESTIONS)


def test_two_processes_each_score_half_and_agree_with_one(task_folder, direct_answers, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    results, answers, log = run_lmms_eval(task_folder, tmp_path / "two", torchrun)
    texts, correct = direct_answers
    assert [answers[doc_id] for doc_id in range(QUESTIONS)] == texts
    assert results["exact_match,none"] == pytest.approx(sum(correct) / QUESTIONS)
    for rank in (0, 1):  # the plugin logs each process's share
        assert f"Dimple rank {rank}/2: {QUESTIONS // 2} questions" in log
