"""A transformers user's habits get Dimple's answer (issue 28): their `GenerationConfig`, the standard `generate`
arguments, settings through the pipeline. Each test makes the user's exact call on the shipped checkpoint and, where
the call used to return a wrong answer, compares it with the right one."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, StoppingCriteria, pipeline

from conftest import REPO_ROOT, make_tiny_model
from generation_utils import DIFFUSION_DEFAULTS, DimpleGenerationConfig, resolve_generation_settings
from shapes.task import heldout_examples, messages, render

SHIPPED = REPO_ROOT / "checkpoints" / "dimple-shapes"
DESCRIPTION = 7  # held-out example 7 asks "Describe the image." (a 25-token answer)


@pytest.fixture(scope="module")
def pipe():
    return pipeline("image-text-to-text", model=str(SHIPPED), trust_remote_code=True, dtype=torch.float32)


@pytest.fixture(scope="module")
def model(pipe):
    return pipe.model


@pytest.fixture(scope="module")
def processor(pipe):
    return pipe.processor


@pytest.fixture(scope="module")
def examples():
    return heldout_examples(12)


def chat(example):
    turn = messages(example)[0]
    content = [{"type": "image", "image": render(example.scene)} if part["type"] == "image" else part
               for part in turn["content"]]  # fmt: skip
    return [{"role": "user", "content": content}]


def inputs_of(processor, example):
    prompt = processor.apply_chat_template(messages(example), add_generation_prompt=True)
    return processor(text=[prompt], images=[render(example.scene)], return_tensors="pt")


def answer_text(processor, inputs, sequences) -> str:
    return processor.post_process_answer(sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------ row 1: the user's own GenerationConfig


def test_a_passed_generation_config_keeps_the_checkpoints_settings(model, processor, examples):
    inputs = inputs_of(processor, examples[DESCRIPTION])
    out = model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=16), return_dict_in_generate=True)
    # the right answer: the checkpoint's algorithm, threshold and cache with 16 slots
    right = model.generate(**inputs, max_new_tokens=16, return_dict_in_generate=True)
    assert torch.equal(out.sequences, right.sequences) and out.sequences.shape[1] == inputs["input_ids"].shape[1] + 16
    assert out.num_forward_passes.tolist() == right.num_forward_passes.tolist() == [1]  # not 16 (random order)
    text = answer_text(processor, inputs, out.sequences)
    assert len(text) > 40 and examples[DESCRIPTION].answer.startswith(text)  # right, and cut at 16 tokens
    direct = model.diffusion_generate(**inputs, generation_config=GenerationConfig(max_new_tokens=16))
    assert torch.equal(direct, right.sequences)


def test_a_generation_config_through_the_pipelines_generate_kwargs(pipe, processor, model, examples):
    example = examples[DESCRIPTION]
    config = GenerationConfig(max_new_tokens=16)
    text = pipe(text=chat(example), return_full_text=False, generate_kwargs={"generation_config": config})
    inputs = inputs_of(processor, example)
    assert text[0]["generated_text"] == answer_text(processor, inputs, model.generate(**inputs, max_new_tokens=16))


def test_settings_resolve_call_then_passed_config_then_model_config_then_defaults():
    model = make_tiny_model()
    model.generation_config = DimpleGenerationConfig(steps=7, alg="maskgit_plus", alg_p_threshold=0.8, top_k=5)
    passed = DimpleGenerationConfig(steps=9, use_cache=True)
    config, model_inputs = resolve_generation_settings(model, passed, alg_p_threshold=0.6, pixel_values=None)
    assert (config.alg_p_threshold, config.steps, config.use_cache) == (0.6, 9, True)  # the call, then passed
    assert (config.alg, config.top_k) == ("maskgit_plus", 5)  # then the model's generation config
    assert (config.decoding_pipeline, config.eps, config.temperature) == ("dim", 1e-3, 0.0)  # then the defaults
    assert config.mask_token_id == model.config.mask_token_id  # special ids: config.json
    assert model_inputs == {"pixel_values": None}
    plain, _ = resolve_generation_settings(model, GenerationConfig(max_new_tokens=3))
    assert (plain.max_new_tokens, plain.steps, plain.alg, plain.top_k) == (3, 7, "maskgit_plus", 5)
    # an explicit None in the call means "unset": the default, not a broken value
    assert resolve_generation_settings(model, steps=None)[0].steps == DIFFUSION_DEFAULTS["steps"]
    with pytest.raises(TypeError, match="alg_threshold"):
        resolve_generation_settings(model, alg_threshold=0.9)


# -------------------------------------------------- row 2: standard arguments whose values agree with diffusion


def test_do_sample_false_and_one_beam_are_the_greedy_diffusion_answer(model, processor, examples):
    inputs = inputs_of(processor, examples[DESCRIPTION])
    right = model.generate(**inputs)
    assert torch.equal(model.generate(**inputs, do_sample=False), right)
    assert torch.equal(model.generate(**inputs, num_beams=1), right)
    # do_sample=False is greedy as in transformers: a temperature from anywhere else no longer samples
    assert torch.equal(model.generate(**inputs, temperature=5.0, do_sample=False), right)
    sampled = model.generate(**inputs, do_sample=True, temperature=0.7, num_return_sequences=2)
    assert sampled.shape[0] == 2


@pytest.mark.parametrize(
    "settings, names",
    [
        (dict(num_beams=4), "num_return_sequences"),
        (dict(do_sample=True), "temperature"),
        (dict(repetition_penalty=1.2), "repetition_penalty"),
        (dict(cache_implementation="static"), "use_cache=True"),
        (dict(output_attentions=True), "output_attentions"),
    ],
)
def test_autoregressive_only_settings_raise_naming_them(model, processor, examples, settings, names):
    inputs = inputs_of(processor, examples[0])
    with pytest.raises(ValueError, match=names):
        model.generate(**inputs, **settings)
    with pytest.raises(ValueError, match=names):
        model.generate(**inputs, generation_config=GenerationConfig(**settings))


# ---------------------------------------------------------------- row 3: scores of the committed tokens


def commit_steps(history, prompt_length, mask_id) -> torch.Tensor:
    """For each answer slot of row 0, the step that committed it."""
    answers = torch.stack([sequences[0, prompt_length:] for sequences in history])  # [steps, N]
    return (answers != mask_id).long().argmax(0)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.5, top_p=0.9)], ids=["greedy", "sampled"])
def test_output_scores_give_each_token_its_probability_at_its_commit_step(model, processor, examples, sampling):
    gamma = model.generation_config.alg_p_threshold
    mask_id = model.generation_config.mask_token_id
    by_confidence_seen = 0
    for example in examples:
        inputs = inputs_of(processor, example)
        prompt_length = inputs["input_ids"].shape[1]
        seen = []  # the logits of every step, recorded by the hook (the whole-sequence path: use_cache=False)

        def hook(step, x, logits, seen=seen):
            seen.append(logits.clone())
            return logits

        torch.manual_seed(0)
        out = model.generate(**inputs, **sampling, use_cache=False, return_dict_in_generate=True, output_scores=True,
                             output_logits=True, output_history=True, generation_logits_hook_func=hook)  # fmt: skip
        answer = out.sequences[0, prompt_length:]
        assert len(out.scores) == len(out.logits) == answer.shape[0]
        steps = commit_steps(out.history, prompt_length, mask_id)
        confidences = {}  # step -> the raw probability of each token it committed (what the threshold compared)
        for slot, (token, step) in enumerate(zip(answer.tolist(), steps.tolist())):
            logits = seen[step][0, slot]
            assert torch.equal(out.logits[slot][0], logits)  # the raw logits of the step that committed it
            confidence = F.softmax(logits, -1)[token]
            confidences.setdefault(step, []).append(float(confidence))
            if confidence > gamma:  # committed by confidence
                by_confidence_seen += 1
                assert F.softmax(out.scores[slot][0], -1)[token] >= gamma, (example.question, slot)
        for step, committed in confidences.items():  # a step commits by the threshold or by the fallback, not both
            if step < model.generation_config.steps - 1:
                assert all(c > gamma for c in committed) or all(c <= gamma for c in committed)
        if not sampling:  # at temperature 0 the score is the logits themselves: the token is their argmax
            assert all(torch.equal(score, logit) for score, logit in zip(out.scores, out.logits))
            assert [int(score[0].argmax()) for score in out.scores] == answer.tolist()
    assert by_confidence_seen > 0


def test_transition_scores_are_the_answer_tokens_log_probabilities(model, processor, examples):
    inputs = inputs_of(processor, examples[DESCRIPTION])
    out = model.generate(**inputs, return_dict_in_generate=True, output_scores=True)
    transition = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    answer = out.sequences[0, inputs["input_ids"].shape[1]:]
    expected = torch.stack([F.log_softmax(score[0], -1)[token] for score, token in zip(out.scores, answer)])
    assert torch.allclose(transition[0], expected, atol=1e-5)  # log_softmax over a reshaped batch: rounding
    assert (transition.exp() > model.generation_config.alg_p_threshold).all()  # one pass, all by confidence
    with pytest.warns(UserWarning, match="return_dict_in_generate=True"):  # as transformers: said, not dropped
        model.generate(**inputs, output_scores=True)


# ------------------------------------------------------------- row 4: tokenizer, stopping criteria, stop strings


def test_stop_strings_end_the_answer_before_the_first_one(model, processor, examples):
    inputs = inputs_of(processor, examples[DESCRIPTION])
    full = answer_text(processor, inputs, model.generate(**inputs))
    for stop in (":", " circle", "."):
        out = model.generate(**inputs, stop_strings=stop, tokenizer=processor.tokenizer)
        assert answer_text(processor, inputs, out) == full[: full.index(stop)]
    with pytest.raises(ValueError, match="tokenizer="):
        model.generate(**inputs, stop_strings=[":"])


def test_the_pipelines_stop_sequence_is_a_stop_string(pipe, examples):
    example = examples[DESCRIPTION]
    full = pipe(text=chat(example), return_full_text=False)[0]["generated_text"]
    stopped = pipe(text=chat(example), return_full_text=False, stop_sequence=" on")[0]["generated_text"]
    assert stopped == full[: full.index(" on")] and example.answer.startswith(stopped + " on")


class CancelAfter(StoppingCriteria):
    """What a server does when its client goes away: stop every row after `steps` steps."""

    def __init__(self, steps):
        self.steps, self.calls = steps, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), self.calls >= self.steps, dtype=torch.bool)


def test_stopping_criteria_are_asked_after_each_step(model, processor, examples):
    inputs = inputs_of(processor, examples[DESCRIPTION])
    schedule = dict(alg_p_threshold=None, return_dict_in_generate=True)  # one slot per step for 32 steps
    full = model.generate(**inputs, **schedule, output_history=True)
    cancel = CancelAfter(3)
    out = model.generate(**inputs, **schedule, stopping_criteria=[cancel], tokenizer=processor.tokenizer)
    assert cancel.calls == 3 and out.num_forward_passes.tolist() == [3]
    assert torch.equal(out.sequences, full.history[2])  # the canvas after three steps; the rest still masked


# ------------------------------------------------------------------- row 6: settings given to the pipeline


def test_a_dimple_setting_given_to_the_pipeline_call_says_how_to_pass_it(pipe, examples):
    with pytest.raises(ValueError, match=r"generate_kwargs=\{'steps': 8\}"):
        pipe(text=chat(examples[0]), steps=8)
    with pytest.raises(ValueError, match=r"generate_kwargs=\{'temperature': 0.5\}"):
        pipe(text=chat(examples[0]), temperature=0.5)


class DraftCounter:
    """A streamer that counts the denoising steps (one draft each)."""

    def __init__(self):
        self.drafts = 0

    def put(self, value):
        pass

    def put_draft(self, value):
        self.drafts += 1

    def end(self):
        pass


def test_a_dimple_setting_given_to_pipeline_says_how_to_pass_it_and_generate_kwargs_reach_decoding(
    model, processor, examples
):
    with pytest.raises(ValueError, match="generate_kwargs"):
        pipeline("image-text-to-text", model=str(SHIPPED), trust_remote_code=True, steps=8)(text=chat(examples[0]))
    counter = DraftCounter()
    settings = dict(steps=8, alg_p_threshold=None, max_new_tokens=16)  # 8 steps of 2 slots (the checkpoint: 1 step)
    built = pipeline("image-text-to-text", model=str(SHIPPED), trust_remote_code=True,
                     generate_kwargs={**settings, "streamer": counter})  # fmt: skip
    example = examples[DESCRIPTION]
    inputs = inputs_of(processor, example)
    right = answer_text(processor, inputs, model.generate(**inputs, **settings))
    assert built(text=chat(example), return_full_text=False)[0]["generated_text"] == right
    assert counter.drafts == 8


# ---------------------------------------------------------------------------- row 10: cards


def test_save_pretrained_writes_no_card_as_the_readme_says(tmp_path):
    make_tiny_model().save_pretrained(tmp_path)
    assert not (tmp_path / "README.md").exists()
    assert "a plain `model.save_pretrained(folder)` writes none" in (REPO_ROOT / "README.md").read_text()
