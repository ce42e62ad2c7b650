"""The shipped small Dimple (`checkpoints/dimple-shapes`): offline loading, accuracy, structure priors, training."""

import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from shapes.task import (
    ATTRIBUTES_TEMPLATE,
    COLORS,
    SHAPES,
    Example,
    Scene,
    Shape,
    heldout_examples,
    messages,
    needs_binding,
    render,
    train_examples,
    validation_examples,
)
from tools.assemble_checkpoint import REMOTE_CODE_FILES

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "dimple-shapes"


@pytest.fixture(scope="module")
def shapes_dimple():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    return model, processor


def ask(model, processor, examples, **options):
    prompts = [processor.apply_chat_template(messages(e), add_generation_prompt=True) for e in examples]
    inputs = processor(text=prompts, images=[render(e.scene) for e in examples], padding="longest", return_tensors="pt")
    with torch.inference_mode():
        output = model.diffusion_generate(**inputs, **options, return_dict_in_generate=True)
    return processor.post_process_answer(output.sequences[:, inputs["input_ids"].shape[1] :]), output


def test_heldout_split_is_disjoint_from_training_and_validation():
    heldout = {e.key() for e in heldout_examples(500)}
    assert len(heldout) == 500
    assert not heldout & {e.key() for e in train_examples(2000)}
    assert not heldout & {e.key() for e in validation_examples(500)}
    assert heldout_examples(5) == heldout_examples(5)  # deterministic from the seed


def test_binding_questions_are_those_where_reading_another_shape_is_wrong():
    circle, square = Shape("circle", "red", 0, 20, 14, 14), Shape("square", "blue", 2, 20, 70, 14)
    red_square = Shape("square", "red", 2, 20, 70, 14)
    two, same_color = Scene((circle, square)), Scene((circle, red_square))
    assert needs_binding(Example(two, "color", "What color is the circle?", "red", circle))
    assert not needs_binding(Example(same_color, "color", "What color is the circle?", "red", circle))
    assert needs_binding(Example(same_color, "position", "Where is the circle?", "on the left", circle))
    assert not needs_binding(Example(two, "color", "What color is the shape on the left?", "red"))
    assert not needs_binding(Example(Scene((circle,)), "position", "Where is the circle?", "on the left", circle))
    assert 0.1 < sum(map(needs_binding, heldout_examples(500))) / 500 < 0.3


def test_checkpoint_answers_heldout_questions(shapes_dimple):
    """Issue 6's bar: >= 95 % exact match on 50 held-out questions (the checkpoint: 49/50 here, 96.2 % on all 500)."""
    model, processor = shapes_dimple
    examples = heldout_examples(50)
    answers, _ = ask(model, processor, examples)  # the checkpoint's own settings: confident decoding
    correct = sum(a == e.answer for a, e in zip(answers, examples))
    assert correct >= 48, [(e.question, e.answer, a) for a, e in zip(answers, examples) if a != e.answer]
    by_kind = {}
    for answer, example in zip(answers, examples):
        by_kind.setdefault(example.kind, []).append(answer == example.answer)
    # Learnt almost perfectly on the full held-out set (count 96 %, attributes 100 %, descriptions 99 %).
    for kind in ("count", "attributes", "description"):
        assert all(by_kind[kind]), kind


def test_confident_decoding_commits_several_tokens_per_pass(shapes_dimple):
    model, processor = shapes_dimple
    assert model.generation_config.alg_p_threshold == 0.9 and model.generation_config.use_cache
    examples = heldout_examples(50)
    answers, output = ask(model, processor, examples)
    produced = sum(len(processor.tokenizer.encode(a)) for a in answers)
    assert output.num_forward_passes.sum() / produced <= 0.5
    # Answers end where the model says (pads), not at N: the slots after a one-word answer hold no words.
    short = [a for a, e in zip(answers, examples) if e.kind in ("color", "shape", "count")]
    assert all(len(processor.tokenizer.encode(a)) == 1 for a in short), short


def test_structure_prior_fixes_the_format(shapes_dimple):
    model, processor = shapes_dimple
    examples = [e for e in heldout_examples(200) if e.kind == "attributes"][:8]
    template = processor.encode_response_template(ATTRIBUTES_TEMPLATE)
    answers, _ = ask(model, processor, examples, response_template=template, max_new_tokens=None)
    pattern = re.compile(rf"Color: ({'|'.join(COLORS)}) Shape: ({'|'.join(SHAPES)})")
    for answer in answers:
        assert pattern.fullmatch(answer), answer


def test_training_script_smoke_run(tmp_path):
    from shapes.train import main

    main(["--smoke", "--output", str(tmp_path / "smoke")])
    model = AutoModel.from_pretrained(tmp_path / "smoke", trust_remote_code=True)
    assert model.generation_config.max_new_tokens == model.generation_config.steps
    assert (tmp_path / "smoke" / "tokenizer.json").exists()


def test_binding_probe_runs_a_variant(capsys):
    from shapes.probes.binding_probe import main

    main(["--steps", "2", "--every", "2", "--layers", "2", "--key-value-heads", "6"])
    report = re.fullmatch(r"step 2: loss [\d.]+, binding ([\d.]+)%, vision norm \d+, \d+ s\n", capsys.readouterr().out)
    assert report and 0 <= float(report.group(1)) <= 100


def test_inspect_binding_reads_the_shipped_vision_tokens(capsys):
    from shapes.probes.inspect_binding import main

    main(["--questions", "1500", "--threads", "1"])
    out = capsys.readouterr().out
    # The shipped model's vision tokens carry each shape's kind, colour and column linearly (measured: 100 %).
    readout = re.search(r"layer 0: ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)%", out)
    assert readout and min(float(score) for score in readout.groups()) >= 95
    assert len(re.findall(r"layer \d, head \d: named shape [\d.]+, each other shape [\d.]+", out)) == 4


@pytest.mark.parametrize("module", REMOTE_CODE_FILES)  # the one list of remote-code modules
def test_checkpoint_code_is_the_repository_code(module):
    """The checkpoint carries copies of the remote code; they must not drift from the package (copy them on change)."""
    repo_root = CHECKPOINT.parents[1]
    assert (CHECKPOINT / module).read_text() == (repo_root / module).read_text()
