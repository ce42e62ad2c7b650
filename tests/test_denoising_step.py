"""The pure pieces of one denoising step, with planted logits and no model: schedules, rankings, the re-anchored
fallback, the slot ranks and `denoising_step` itself."""

import math

import pytest
import torch

from generation_utils import (
    ALGORITHMS,
    DimpleGenerationConfig,
    StepInputs,
    StepRules,
    StepState,
    denoising_step,
    dim_schedule,
    dream_schedule,
    rank_of_each_slot,
    reanchored_fallback,
)

MASK = 9
VOCAB = 10


def rules(**settings) -> StepRules:
    config = DimpleGenerationConfig(mask_token_id=MASK, steps=settings.pop("steps", 4), **settings)
    return StepRules.from_config(config)


def logits_for(tokens, probabilities):
    """[1, N, V] logits whose softmax gives each slot's token the planted probability (the rest spread evenly)."""
    logits = torch.zeros(1, len(tokens), VOCAB)
    for slot, (token, p) in enumerate(zip(tokens, probabilities)):
        rest = (1 - p) / (VOCAB - 1)
        logits[0, slot] = math.log(rest)
        logits[0, slot, token] = math.log(p)
    return logits


def inputs(step_rules, answer, step=0, total=None, draws=None):
    n = answer.shape[1]
    return StepInputs(
        step=torch.tensor(step),
        total_masks=torch.tensor([total if total is not None else n]),
        timesteps=torch.linspace(1, step_rules.eps, step_rules.steps + 1),
        draws=draws if draws is not None else torch.zeros(answer.shape),
        rules=step_rules,
    )


def test_rank_of_each_slot_orders_masked_slots_ties_leftmost():
    score = torch.tensor([[0.5, 0.9, 0.5, 1.0]])
    masked = torch.tensor([[True, True, True, False]])
    # slot 1 first; slots 0 and 2 tie, the leftmost goes first; the unmasked slot last
    assert rank_of_each_slot(score, masked).tolist() == [[1, 0, 2, 3]]


def test_reanchored_fallback_counts_from_the_share_of_masks_left():
    timesteps = torch.linspace(1, 1e-3, 5)  # 1, 0.75025, 0.5005, 0.25075, 0.001
    # 4 of 8 masks left (r = 0.5): the first grid point below r is 0.25075: k = int(4 * (1 - 0.25075 / 0.5)) = 1
    count, s, ratio = reanchored_fallback(torch.tensor([4]), torch.tensor([8]), torch.tensor(0), timesteps)
    assert (count.tolist(), ratio.tolist()) == ([1], [0.5]) and s.tolist() == pytest.approx([0.25075])
    # 6 of 8 left (r = 0.75): 0.5005 is the first point below r: k = int(6 * (1 - 0.5005 / 0.75)) = 1; at 0.25075, 3
    count, s, _ = reanchored_fallback(torch.tensor([6]), torch.tensor([8]), torch.tensor(2), timesteps)
    assert count.tolist() == [3] and s.tolist() == pytest.approx([0.25075])  # step 2: no earlier point than index 3
    # all masks left at the last usable step: the grid's end commits everything
    count, s, _ = reanchored_fallback(torch.tensor([3]), torch.tensor([3]), torch.tensor(3), timesteps)
    assert count.tolist() == [3] and s.tolist() == pytest.approx([1e-3])


def state_of(masked, confidence, step, step_rules, total=None, draws=None):
    masked = torch.tensor([masked])
    return StepState(
        masked=masked,
        confidence=torch.tensor([confidence]),
        draws=draws if draws is not None else torch.zeros(masked.shape),
        total_masks=torch.tensor([total if total is not None else masked.shape[1]]),
        step=torch.tensor(step),
        timesteps=torch.linspace(1, step_rules.eps, step_rules.steps + 1),
    )


def test_dim_schedule_threshold_fires_else_falls_back_and_flushes_last():
    step_rules = rules(alg="maskgit_plus", alg_p_threshold=0.8, decoding_pipeline="dim")
    fired = state_of([True] * 4, [0.9, 0.85, 0.1, 0.2], 0, step_rules)
    count, by_confidence = dim_schedule(fired, step_rules)
    assert (count.tolist(), by_confidence.tolist()) == ([2], [True])
    quiet = state_of([True] * 4, [0.1] * 4, 0, step_rules)
    count, by_confidence = dim_schedule(quiet, step_rules)
    # fallback: at s = 0.75 int(4 * 0.25) = 0 slots, so the next point, s = 0.5, gives int(4 * 0.5) = 1
    assert (count.tolist(), by_confidence.tolist()) == ([1], [False])
    last = state_of([True] * 4, [0.1] * 4, 3, step_rules)
    assert dim_schedule(last, step_rules)[0].tolist() == [4]


def test_dream_schedule_counts_by_the_time_grid():
    step_rules = rules(alg="maskgit_plus", decoding_pipeline="dream")
    counts = [dream_schedule(state_of([True] * 8, [0.5] * 8, step, step_rules), step_rules)[0].item()
              for step in range(4)]  # fmt: skip
    # k = int(8 * (1 - s / t)) on linspace(1, 1e-3, 5); the last step commits everything left
    grid = [1, 0.75025, 0.5005, 0.25075]
    assert counts == [*(int(8 * (1 - s / t)) for t, s in zip(grid, grid[1:])), 8]


def test_dream_origin_commits_the_slots_whose_draw_is_below_the_ratio():
    step_rules = rules(alg="origin", decoding_pipeline="dream")
    draws = torch.tensor([[0.1, 0.3, 0.2, 0.9]])  # ratio 1 - 0.75/1 ~ 0.25 at step 0
    state = state_of([True] * 4, [0.5] * 4, 0, step_rules, draws=draws)
    assert dream_schedule(state, step_rules)[0].tolist() == [2]


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_each_ranking_orders_the_planted_slots(name):
    algorithm = ALGORITHMS[name]
    pipeline = next(iter(algorithm.slot_counts))
    step_rules = rules(alg=name, decoding_pipeline=pipeline)
    draws = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    state = state_of([True] * 4, [0.2, 0.9, 0.5, 0.7], 0, step_rules, draws=draws)
    order = rank_of_each_slot(algorithm.ranking(state, step_rules), state.masked).tolist()
    expected = {"random": [3, 0, 2, 1], "leftmost": [0, 1, 2, 3], "confidence": [3, 0, 2, 1]}
    kind = "random" if algorithm.random else "confidence" if algorithm.by_confidence else "leftmost"
    assert order == [expected[kind]]


def test_denoising_step_commits_the_confident_slots_and_keeps_the_rest_masked():
    step_rules = rules(alg="maskgit_plus", alg_p_threshold=0.8)
    answer = torch.tensor([[MASK, MASK, 3, MASK]])  # slot 2 is fixed
    logits = logits_for([1, 2, 4, 5], [0.95, 0.3, 0.99, 0.9])
    new, committed = denoising_step(answer, logits, inputs(step_rules, answer, total=3))
    assert new.tolist() == [[1, MASK, 3, 5]] and committed.tolist() == [2]


def test_denoising_step_by_margin_and_entropy_picks_by_its_own_score():
    answer = torch.full((1, 3), MASK)
    logits = torch.full((1, 3, VOCAB), -10.0)
    logits[0, 0, :2] = torch.tensor([2.0, 1.9])  # confident but close to a second choice: low margin
    logits[0, 1, 0] = 1.0  # one clear choice among a flat rest: large margin, low entropy
    logits[0, 2, :] = 0.0  # flat: high entropy
    for name in ("topk_margin", "entropy"):
        step_rules = rules(alg=name, steps=3)
        new, committed = denoising_step(answer, logits, inputs(step_rules, answer))
        assert committed.tolist() == [1] and new[0, 1] != MASK, name


def test_a_finished_row_is_left_as_it_is():
    step_rules = rules(alg="maskgit_plus", alg_p_threshold=0.5)
    answer = torch.tensor([[1, 2, 3]])
    new, committed = denoising_step(answer, logits_for([4, 4, 4], [0.99] * 3), inputs(step_rules, answer, total=3))
    assert new.tolist() == [[1, 2, 3]] and committed.tolist() == [0]
