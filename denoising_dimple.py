"""The denoising step of Dimple's diffusion decoding: pure tensor functions, compiled whole by `compile_step=True`.

Each forward pass scores every answer slot; a *pipeline* decides which masked slots are committed:

- `dim` (Dimple's confident decoding): with a threshold `alg_p_threshold` = gamma, commit every masked slot whose
  confidence is above gamma; when none is, commit k slots from a time schedule re-anchored to the share of masks
  still left; the last allowed step commits everything; decoding stops as soon as no mask is left.
- `dream` (Dream v0's sampler): a fixed schedule, k = int(M * (1 - s/t)) slots per step (M masks left, t > s two
  consecutive points of `linspace(1, eps, steps + 1)`), everything at the last step.

`alg` says how slots are ranked: `origin` (random), `origin-ratio` (each slot with the schedule's probability, dim
only), `autoregressive` (leftmost first), `maskgit_plus` (token probability), `topk_margin` (top-1 minus top-2
probability) or `entropy` (negative entropy). All the rules follow the reference description of the released model
(spec section 5); the deviations from upstream are listed in docs/differences.md.

One step is [`denoising_step`]: for the whole batch at once, a schedule (`SCHEDULES[decoding_pipeline]`) says how
many slots each row commits and the ranking of `ALGORITHMS[alg]` (one record per algorithm) which ones. Everything
here is a function of its tensor inputs (random draws come in as arguments): no model, no host sync, no
data-dependent shape. The call around it (canvas, cache, loop) is `generation_utils.py`, its settings
`generation_config_dimple.py`.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import TopKLogitsWarper

PIPELINES = ("dim", "dream")


# ----------------------------------------------------------------------------------------------------- sampling


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p`; the top-1 token always stays.

    Hand-written rather than transformers' `TopPLogitsWarper`: the warper sums the tail in ascending order, which
    rounds differently at the boundary and so is not bit-identical to the released rule kept here.
    """
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], dim=-1)  # keep the crossing token
    remove = torch.zeros_like(remove).scatter(-1, sorted_indices, remove)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def sampling_logits(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None
) -> torch.Tensor:
    """The logits tokens are drawn from: divided by the temperature (when > 0), then top-p and top-k filtered."""
    if temperature and temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k:
        # transformers' filter, bit-identical here: -inf and the dtype's minimum both get probability 0.
        logits = TopKLogitsWarper(top_k)(None, logits)
    return logits


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    confidence: str = "probability",
    use_original_confidence: bool = False,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick a token for each slot of `logits` [..., V] and score it; returns (confidence [...], tokens [...]).

    Tokens: sampled from the tempered, top-p/top-k filtered distribution p when temperature > 0, else argmax of p.
    Sampling is argmax(p / noise) with `noise` ~ Exp(1) of the logits' shape (drawn here when not given), which
    picks token i with probability p_i without a host sync. Confidence, from p or, with `use_original_confidence`,
    from the unfiltered softmax: "probability" of the chosen token, "margin" (top-1 minus top-2 probability) or
    "entropy" (sum p log p, i.e. minus the entropy). All in the logits' dtype, like the released code.
    """
    raw_probs = F.softmax(logits, dim=-1) if use_original_confidence else None
    probs = F.softmax(sampling_logits(logits, temperature, top_p, top_k), dim=-1)
    if temperature and temperature > 0:
        noise = torch.empty_like(probs).exponential_() if noise is None else noise
        tokens = (probs / noise).argmax(dim=-1)
    else:
        tokens = probs.argmax(dim=-1)
    scored = raw_probs if use_original_confidence else probs
    if confidence == "margin":
        top2 = torch.topk(scored, 2, dim=-1).values
        return top2[..., 0] - top2[..., 1], tokens
    if confidence == "entropy":
        return (scored * torch.log(scored + 1e-10)).sum(dim=-1), tokens
    return scored.gather(-1, tokens[..., None]).squeeze(-1), tokens


# ------------------------------------------------------------------------------------------- one denoising step
# A step decides, for every row at once, how many masked slots it commits (the schedule of the pipeline) and which
# ones (the ranking of `alg`): `chosen = masked & (rank < count[:, None])`. Per-row quantities are tensors and
# random draws come in as arguments, so the step has no host sync and no data-dependent shape and compiles whole.


@dataclass(frozen=True)
class StepRules:
    """The settings one denoising step reads; fixed during a call (a compiled step specialises on them)."""

    decoding_pipeline: str
    alg: str
    alg_temp: float | None
    alg_p_threshold: float | None
    temperature: float
    top_p: float | None
    top_k: int | None
    use_original_confidence: bool
    eps: float
    steps: int
    mask_token_id: int
    random_slots: bool  # the step reads its uniform draws
    slot_count: str  # how the schedule counts this algorithm's slots: "schedule", "ratio" or "one" (see `Algorithm`)

    @classmethod
    def from_config(cls, config: "DimpleGenerationConfig") -> "StepRules":
        config = config.with_defaults()  # unset settings as the defaults they resolve to
        values = {name: getattr(config, name) for name in cls.__dataclass_fields__ if name != "slot_count"}
        values["slot_count"] = ALGORITHMS[config.alg].slot_counts[config.decoding_pipeline]
        values["temperature"] = values["temperature"] or 0.0
        # Dream's sampler always scores slots on the filtered distribution.
        values["use_original_confidence"] = config.use_original_confidence and config.decoding_pipeline == "dim"
        return cls(**values)


@dataclass
class StepState:
    """What a schedule or ranking may read about the current step; every field is a tensor."""

    masked: torch.Tensor  # [B, N] slots still holding the mask
    confidence: torch.Tensor  # [B, N] score of each slot's candidate token
    draws: torch.Tensor  # [B, N] uniform draws in [0, 1), one per slot (zeros when the rules use no randomness)
    total_masks: torch.Tensor  # [B] masks each row started with
    step: torch.Tensor  # 0-d index of this step
    timesteps: torch.Tensor  # [steps + 1] linspace(1, eps, steps + 1)

    @property
    def remaining(self) -> torch.Tensor:
        return self.masked.sum(1)


@dataclass(frozen=True)
class StepInputs:
    """What one denoising step reads besides the canvas and its logits."""

    step: torch.Tensor  # 0-d index of this step
    total_masks: torch.LongTensor  # [B] masks each row started with
    timesteps: torch.Tensor  # [steps + 1] linspace(1, eps, steps + 1)
    draws: torch.Tensor  # [B, N] uniform numbers for the random rankings and schedules
    rules: StepRules
    noise: torch.Tensor | None = None  # [B, N, V] Exp(1) numbers for sampling tokens (temperature > 0)


def denoising_step(
    answer: torch.LongTensor, logits: torch.Tensor, inputs: StepInputs
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """One denoising step for the whole batch.

    The answer canvas `[B, N]` and its logits `[B, N, V]` give the new canvas and the number of slots each row
    committed; a row without a mask is left as it is.
    """
    rules = inputs.rules
    algorithm = ALGORITHMS[rules.alg]
    masked = answer == rules.mask_token_id
    sampling = (rules.temperature, rules.top_p, rules.top_k, algorithm.confidence, rules.use_original_confidence)
    confidence, tokens = sample_tokens(logits, *sampling, inputs.noise)
    state = StepState(masked, confidence, inputs.draws, inputs.total_masks, inputs.step, inputs.timesteps)
    count, by_confidence = SCHEDULES[rules.decoding_pipeline](state, rules)
    score = torch.where(by_confidence[:, None], confidence, algorithm.ranking(state, rules))
    chosen = masked & (rank_of_each_slot(score, masked) < count[:, None])
    return torch.where(chosen, tokens, answer), chosen.sum(1)


def schedule_can_commit(answer: torch.LongTensor, inputs: StepInputs) -> bool:
    """Whether some row may commit a slot this step, decided before the forward pass.

    Only the threshold of confident decoding reads the logits; every other count (dream's schedule, a ratio's draws,
    the fallback) is known in advance, so a step whose count is 0 for every row commits nothing and is not run.
    """
    rules = inputs.rules
    if rules.decoding_pipeline == "dim" and (rules.alg_p_threshold is not None or rules.slot_count != "ratio"):
        return True  # the threshold may fire, or the fallback commits at least one slot
    masked = answer == rules.mask_token_id
    no_confidence = torch.full(masked.shape, -float("inf"), device=answer.device)
    state = StepState(masked, no_confidence, inputs.draws, inputs.total_masks, inputs.step, inputs.timesteps)
    count, _ = SCHEDULES[rules.decoding_pipeline](state, rules)
    return bool((count > 0).any())


def rank_of_each_slot(score: torch.Tensor, masked: torch.Tensor) -> torch.LongTensor:
    """0 for the best masked slot of a row, 1 for the next...; ties go to the leftmost slot, unmasked slots last."""
    floor = torch.finfo(score.dtype).min
    keyed = torch.where(masked, score.clamp_min(floor), torch.full_like(score, -float("inf")))
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
    positions = torch.arange(score.shape[1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


# Schedules: how many slots each row commits, and whether the choice follows the confidence instead of the ranking.
# A step that ends a row's schedule (the last allowed step) commits everything left; `autoregressive` commits one
# slot per step; a ratio (`origin-ratio`, Dream's `origin`) commits each slot whose draw is below the ratio, and its
# random ranking (lowest draw first) then picks exactly those slots.


def dim_schedule(state: StepState, rules: StepRules) -> tuple[torch.LongTensor, torch.Tensor]:
    """Confident decoding: every masked slot above the threshold; otherwise the re-anchored fallback count."""
    remaining = state.remaining
    count, s, ratio = reanchored_fallback(remaining, state.total_masks, state.step, state.timesteps)
    if rules.slot_count == "ratio":
        share = torch.where(s > rules.eps, 1 - s / ratio, torch.ones_like(s))
        count = (state.masked & (state.draws < share[:, None])).sum(1)
    elif rules.slot_count == "one":
        count = torch.ones_like(remaining)
    last_step = state.step == rules.steps - 1
    count = torch.where(last_step, remaining, count)
    if rules.alg_p_threshold is None:
        return count, torch.zeros_like(remaining, dtype=torch.bool)
    passed = state.masked & ((state.confidence > rules.alg_p_threshold) | last_step)
    fired = passed.any(1)
    return torch.where(fired, passed.sum(1), count), fired


def reanchored_fallback(remaining, total_masks, step, timesteps):
    """Dim fallback per row: how many slots to commit, re-anchoring the time grid to the share of masks left.

    r = masks left / masks at the start. Starting at the first grid point below r (and after the current step), take
    the first point s for which k = int(c * (1 - s / r)) >= 1; at the grid's end (s = eps) k is every mask left.
    Returns (k, s, r), each `[B]`. When no grid point is below r (only possible with > 1/eps masks), the schedule is
    over and every mask left is committed (upstream raised a ValueError here).
    """
    ratio = remaining.float() / total_masks.float()
    grid = timesteps[None, :]
    end = timesteps.shape[0] - 1
    below = grid < ratio[:, None]
    first_below = torch.where(below.any(1), below.int().argmax(1), end)
    start = torch.maximum(first_below, step + 1)
    counts = (remaining[:, None].float() * (1 - grid / ratio[:, None])).long()  # int(): truncation
    index = torch.arange(end + 1, device=timesteps.device)
    usable = (index >= start[:, None]) & (index < end) & (counts >= 1)
    found = usable.any(1)
    first = usable.int().argmax(1)
    count = torch.where(found, counts.gather(1, first[:, None]).squeeze(1), remaining)
    s = torch.where(found, timesteps[first], timesteps[end])
    return count, s, ratio


def dream_schedule(state: StepState, rules: StepRules) -> tuple[torch.LongTensor, torch.Tensor]:
    """Dream v0: k = int(c * (1 - s / t)) between t = timesteps[step] and s = timesteps[step + 1]."""
    remaining = state.remaining
    here = state.step[None]  # a 1-element index: a 0-d one would read the step on the host
    t, s = state.timesteps[here], state.timesteps[here + 1]
    count = (remaining.float() * (1 - s / t)).long()
    if rules.slot_count == "ratio":
        count = (state.masked & (state.draws < 1 - s / t)).sum(1)
    elif rules.slot_count == "one":
        count = torch.ones_like(remaining)
    count = torch.where(state.step == rules.steps - 1, remaining, count)
    return count, torch.zeros_like(remaining, dtype=torch.bool)


SCHEDULES = {"dim": dim_schedule, "dream": dream_schedule}


# Rankings: a score per slot, higher first.


def random_order(state: StepState, rules: StepRules) -> torch.Tensor:
    """Lowest draw first: a uniformly random order of the masked slots."""
    return -state.draws


def leftmost_first(state: StepState, rules: StepRules) -> torch.Tensor:
    return -torch.arange(state.masked.shape[1], device=state.masked.device).float().expand(state.masked.shape)


def most_confident(state: StepState, rules: StepRules) -> torch.Tensor:
    """Highest confidence first; with `alg_temp` > 0, an order drawn from softmax(confidence / alg_temp) (the
    Gumbel top-k trick: the same law as drawing slots one after another without replacement)."""
    if rules.alg_temp is None or rules.alg_temp <= 0:
        return state.confidence
    gumbel = -torch.log(-torch.log(state.draws.clamp_min(torch.finfo(state.draws.dtype).tiny)))
    return state.confidence.float() / rules.alg_temp + gumbel


@dataclass(frozen=True)
class Algorithm:
    """Everything an `alg` means, in one place.

    Args:
        confidence: what `sample_tokens` scores each slot's token by (`probability`, `margin` or `entropy`); the
            threshold of confident decoding compares it.
        ranking: which masked slots go first (a score per slot, higher first).
        slot_counts: for each pipeline the algorithm exists in, how that pipeline's schedule counts the slots of a
            step: `schedule` (its own count), `ratio` (each slot with the schedule's probability, drawn) or `one`.
        random: whether the slots are chosen with the RNG.
        by_confidence: whether the ranking follows the confidence (so `alg_temp` > 0 samples the order).
    """

    confidence: str
    ranking: Callable[[StepState, StepRules], torch.Tensor]
    slot_counts: Mapping[str, str]
    random: bool = False
    by_confidence: bool = False


BOTH_SCHEDULES = {"dim": "schedule", "dream": "schedule"}
ALGORITHMS = {
    "origin": Algorithm("probability", random_order, {"dim": "schedule", "dream": "ratio"}, random=True),
    "origin-ratio": Algorithm("probability", random_order, {"dim": "ratio"}, random=True),
    "autoregressive": Algorithm("probability", leftmost_first, {"dim": "one", "dream": "one"}),
    "maskgit_plus": Algorithm("probability", most_confident, BOTH_SCHEDULES, by_confidence=True),
    "topk_margin": Algorithm("margin", most_confident, BOTH_SCHEDULES, by_confidence=True),
    "entropy": Algorithm("entropy", most_confident, BOTH_SCHEDULES, by_confidence=True),
}


def step_randomness(answer: torch.LongTensor, rules: StepRules, vocab_size: int):
    """This step's random numbers, drawn outside the step: uniform draws per slot and Exp(1) noise per token."""
    draws = torch.rand(answer.shape, device=answer.device) if rules.random_slots else torch.zeros_like(answer).float()
    sampling = rules.temperature > 0
    return draws, torch.empty(*answer.shape, vocab_size, device=answer.device).exponential_() if sampling else None
