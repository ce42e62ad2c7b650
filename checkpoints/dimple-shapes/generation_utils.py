"""Diffusion generation for Dimple: `diffusion_generate` (masked-diffusion decoding), its settings and streamer.

`diffusion_generate` appends N `<|mask|>` slots to the prompt and fills them over several forward passes. Each pass
scores every answer slot; a *pipeline* decides which masked slots are committed:

- `dim` (Dimple's confident decoding): with a threshold `alg_p_threshold` = gamma, commit every masked slot whose
  confidence is above gamma; when none is, commit k slots from a time schedule re-anchored to the share of masks
  still left; the last allowed step commits everything; decoding stops as soon as no mask is left.
- `dream` (Dream v0's sampler): a fixed schedule, k = int(M * (1 - s/t)) slots per step (M masks left, t > s two
  consecutive points of `linspace(1, eps, steps + 1)`), everything at the last step.

`alg` says how slots are ranked: `origin` (random), `origin-ratio` (each slot with the schedule's probability, dim
only), `autoregressive` (leftmost first), `maskgit_plus` (token probability), `topk_margin` (top-1 minus top-2
probability) or `entropy` (negative entropy). All the rules follow the reference description of the released model
(spec section 5); the deviations from upstream are listed in `DimpleGenerationMixin.diffusion_generate`.

One step of it is [`denoising_step`]: for the whole batch at once, a schedule (`SCHEDULES[decoding_pipeline]`)
says how many slots each row commits and the ranking of `ALGORITHMS[alg]` (one record per algorithm) which ones.
[`whole_denoising_pass`] (step 0, refreshes) and, with the prefill cache, [`cached_denoising_pass`] are forward +
step, each compiled as one graph by `compile_step=True`.
The autoregressive
`generate` plumbing (M-RoPE positions, per-prompt images) lives in `modeling_dimple.py` next to `get_rope_index`.
"""

import copy
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig, GenerationMixin, TopKLogitsWarper

try:
    from .transformers_compat import BaseStreamer, ModelOutput, cache_kwarg
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from transformers_compat import BaseStreamer, ModelOutput, cache_kwarg

PIPELINES = ("dim", "dream")
# What `generate` runs: `diffusion` is `diffusion_generate`, `autoregressive` the standard left-to-right loop.
DECODINGS = ("diffusion", "autoregressive")
VISUAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
SPECIAL_IDS = ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")
# The settings only `diffusion_generate` has, with their defaults: the one place a new setting is declared.
DIFFUSION_DEFAULTS = dict(
    steps=512, eps=1e-3, alg="origin", alg_temp=None, alg_p_threshold=None, use_original_confidence=True,
    decoding_pipeline="dim", cache_refresh_interval=0, compile_step=False, output_history=False, mask_token_id=None,
    decoding="autoregressive",
)  # fmt: skip
# Standard `GenerationConfig` settings that diffusion decoding reads, with the values it gives them when they are
# unset (None). Only `diffusion_generate` applies them: the config itself leaves them unset, so the autoregressive
# `generate` keeps transformers' own defaults. Any other standard setting (`num_beams`, `do_sample`, ...) belongs to
# `generate` and is rejected by `diffusion_generate`.
SHARED_DEFAULTS = dict(
    temperature=0.0, max_length=20, use_cache=False, num_return_sequences=1, return_dict_in_generate=False,
    max_new_tokens=None, top_p=None, top_k=None, pad_token_id=None, bos_token_id=None, eos_token_id=None,
)  # fmt: skip
DIFFUSION_ONLY_ARGUMENTS = (*DIFFUSION_DEFAULTS, "response_template", "generation_tokens_hook_func",
                            "generation_logits_hook_func")  # fmt: skip
UPSTREAM_DEFAULT_MAX_LENGTH = SHARED_DEFAULTS["max_length"]
MAX_STEPS = 1_000_000  # the time grid is materialised: 10^9 steps would be a 4 GB tensor and a loop that never ends
# The released README's chat settings (reference §5.12), with the top-k 50 that every released run had implicitly.
RELEASED_CHAT_SETTINGS = dict(
    max_new_tokens=64, steps=64, temperature=0.2, top_p=0.95, top_k=50, alg="origin", alg_p_threshold=0.95,
    use_original_confidence=True, decoding_pipeline="dim", use_cache=True, decoding="diffusion",
)


def is_diffusion_setting(name: str) -> bool:
    return name in DIFFUSION_DEFAULTS or name in SHARED_DEFAULTS


class DimpleGenerationConfig(GenerationConfig):
    r"""
    Settings of [`DimpleGenerationMixin.diffusion_generate`], saved and loaded as `generation_config.json`.

    The model declares it as its `generation_config_class`, so `model.generation_config` is one (built from
    `config.json`, or loaded from the checkpoint's `generation_config.json`). `diffusion_generate` resolves its
    settings as transformers' `generate` does: a copy of the `generation_config` argument (else of
    `model.generation_config`), updated with the keyword arguments. Standard settings it reads that are still unset
    get the diffusion defaults below, and special ids missing there come from the model's `config.json` (the released
    `generation_config.json` has no `mask_token_id`; config.json has 151666). The config itself leaves the standard
    settings unset, so the autoregressive `generate` keeps transformers' defaults.

    The released code instead built its settings from the model config and, under transformers 4.46, silently
    inherited the legacy attributes `temperature=1.0` and `top_k=50` whenever a caller omitted them: every published
    run filtered with **top-k 50**. These defaults do not do that. To reproduce a released run, pass `top_k=50` (and
    `temperature=1.0` if the run did not set a temperature), e.g. the README chat:
    `temperature=0.2, top_p=0.95, top_k=50, alg="origin", alg_p_threshold=0.95, steps=N, max_new_tokens=N`.

    Args:
        decoding (`str`, defaults to `"autoregressive"`): what `model.generate` runs: `"diffusion"` (this
            decoding, as `diffusion_generate`) or `"autoregressive"` (transformers' left-to-right loop). Checkpoints
            this package writes select `"diffusion"`; `generate(..., decoding="autoregressive")` switches one call.
            `diffusion_generate` ignores it.
        max_new_tokens (`int`, *optional*): N, the number of answer slots. Without it (and without a
            `response_template`) the answer has `max_length - prompt_length` slots, or 20 when `max_length` is left
            at its default (the upstream rule).
        max_length (`int`, defaults to 20): total length (prompt + answer) when `max_new_tokens` is not set.
        steps (`int`, defaults to 512): the most denoising iterations (one forward pass each). Usually steps = N.
        eps (`float`, defaults to 1e-3): end of the time grid `linspace(1, eps, steps + 1)`.
        alg (`str`, defaults to `"origin"`): slot ranking, one of `origin`, `origin-ratio` (dim only),
            `autoregressive`, `maskgit_plus`, `topk_margin`, `entropy`.
        alg_temp (`float`, *optional*): if > 0, the confidence algorithms *sample* their k slots from
            `softmax(confidence / alg_temp)` instead of taking the top k.
        alg_p_threshold (`float`, *optional*): gamma in (0, 1], the confident-decoding threshold of the dim pipeline
            (a slot is committed when its confidence is strictly greater). `None` disables it.
        use_original_confidence (`bool`, defaults to `True`): confidence from the raw softmax, before temperature,
            top-p and top-k; `False` uses the filtered distribution. The dream pipeline always uses the filtered one.
        decoding_pipeline (`str`, defaults to `"dim"`): `dim` (confident decoding) or `dream` (fixed schedule).
        temperature (`float`, defaults to 0.0): > 0 samples the tokens from the tempered distribution; 0 takes the
            argmax.
        top_p (`float`, *optional*): nucleus filter in (0, 1] (the top-1 token is always kept).
        top_k (`int`, *optional*): keep the k largest logits (0 or `None`: off).
        use_cache (`bool`, defaults to `False`): prefix KV cache ("prefilling"): the prompt keys/values are computed
            once at step 0 and reused; later steps run only the answer plus the last prompt token.
        cache_refresh_interval (`int`, defaults to 0): with `use_cache`, recompute the whole sequence (and the cached
            prompt) every k steps, so the prompt sees the current answer; 0 never refreshes (the released behaviour).
        compile_step (`bool`, defaults to `False`): with `use_cache`, run each pass (the first, whole-sequence
            pass and each cached step: the forward, then the slot selection) as one `torch.compile(fullgraph=True)`
            graph; on CUDA with `mode="reduce-overhead"`, which captures it as a CUDA graph and replays it. Same
            tokens as the eager passes; removes the Python and launch overhead that dominates small steps. The first
            call of a new shape compiles (tens of seconds). A `generation_logits_hook_func` runs the eager passes.
        num_return_sequences (`int`, defaults to 1): answers per prompt. Needs a random decoder: temperature > 0, a
            random `alg` (`origin`, `origin-ratio`) or `alg_temp` > 0 with a confidence algorithm.
        output_history (`bool`, defaults to `False`): with `return_dict_in_generate`, keep the sequences after each
            step.
        return_dict_in_generate (`bool`, defaults to `False`): return a [`DimpleDiffusionOutput`] instead of the
            sequences tensor.
        mask_token_id, pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special ids; only the mask id
            and the pad id (filler of short templates) are used. EOS stops nothing in diffusion decoding.
    """

    def __init__(self, **kwargs):
        for name, default in DIFFUSION_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        super().__init__(**kwargs)

    def fill_diffusion_defaults(self, model_config) -> "DimpleGenerationConfig":
        """Give the unset standard settings their diffusion values, and the missing special ids config.json's."""
        for name, default in SHARED_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, getattr(model_config, name, None) if name in SPECIAL_IDS else default)
        if self.mask_token_id is None:
            self.mask_token_id = getattr(model_config, "mask_token_id", None)
        return self

    @classmethod
    def from_model_config(cls, model_config) -> "DimpleGenerationConfig":
        """Class defaults plus the special ids of the model config; legacy generation attributes are not inherited."""
        values = model_config if isinstance(model_config, dict) else model_config.to_dict()
        return cls(**{name: values[name] for name in SPECIAL_IDS if values.get(name) is not None})

    def to_diff_dict(self) -> dict:
        """Only the values that differ from *these* class defaults (transformers diffs against its own defaults),
        so a saved `generation_config.json` does not list every diffusion default."""
        defaults = DimpleGenerationConfig().to_dict()
        return {
            key: value
            for key, value in super().to_diff_dict().items()
            if key == "transformers_version" or key not in defaults or value != defaults[key]
        }

    @property
    def random_slots(self) -> bool:
        """Whether slots are chosen with the RNG: a random `alg`, or `alg_temp` > 0 with a confidence algorithm."""
        algorithm = ALGORITHMS[self.alg]
        return algorithm.random or (algorithm.by_confidence and self.alg_temp is not None and self.alg_temp > 0)

    @property
    def is_random(self) -> bool:
        """Whether two runs can differ: sampled tokens or randomly chosen slots."""
        return (self.temperature or 0) > 0 or self.random_slots

    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None):
        """Raise a `ValueError` naming the first invalid setting; warn about combinations that have no effect.

        transformers' generic checks are not run: they treat temperature/top-p/top-k as sampling-only flags, while
        here temperature > 0 is what samples and top-p/top-k also shape confidences at temperature 0. With `strict`
        (used by `save_pretrained` on a modified config), the warnings are raised as errors.
        """
        self._check_values()
        for message in self._ineffective_combinations():
            if strict:
                raise ValueError(message)
            warnings.warn(message, UserWarning, stacklevel=2)

    def _check_values(self):
        def fail(name, expected):
            raise ValueError(f"`{name}` must be {expected}, got {getattr(self, name)!r}.")

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("temperature", "top_p", "alg_temp", "alg_p_threshold", "eps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}.")
            if value is not None and math.isnan(value):
                fail(name, "a number, not NaN")
        if not is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            fail("steps", f"an integer in [1, {MAX_STEPS}] (the most denoising iterations; usually max_new_tokens)")
        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens) or self.max_new_tokens <= 0):
            fail("max_new_tokens", "a positive integer")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length <= 0):
            fail("max_length", "a positive integer")
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            fail("eps", "in (0, 1)")
        if self.alg not in ALGORITHMS:
            fail("alg", f"one of {tuple(ALGORITHMS)}")
        if self.decoding not in DECODINGS:
            fail("decoding", f"one of {DECODINGS}")
        if self.decoding_pipeline not in PIPELINES:
            fail("decoding_pipeline", f"one of {PIPELINES}")
        if self.decoding_pipeline not in ALGORITHMS[self.alg].slot_counts:
            pipelines = " or ".join(f'decoding_pipeline="{name}"' for name in ALGORITHMS[self.alg].slot_counts)
            raise ValueError(
                f'`alg="{self.alg}"` does not exist in the {self.decoding_pipeline} pipeline; use {pipelines}.'
            )
        if self.alg_p_threshold is not None and not 0 < self.alg_p_threshold <= 1:
            fail("alg_p_threshold", "in (0, 1], or None to disable confident decoding")
        if self.alg_temp is not None and self.alg_temp < 0:
            fail("alg_temp", ">= 0")
        if self.temperature is not None and self.temperature < 0:
            fail("temperature", ">= 0 (0 takes the argmax)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1], or None to disable it (a tiny value such as 0.01 keeps only the top-1 token)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 0):
            fail("top_k", "a non-negative integer (0 or None disables it)")
        if not is_int(self.cache_refresh_interval) or self.cache_refresh_interval < 0:
            fail("cache_refresh_interval", "an integer >= 0 (0 never refreshes)")
        if self.compile_step and not self.use_cache:
            raise ValueError("`compile_step=True` compiles the cached step: it needs `use_cache=True`.")
        if self.num_return_sequences is not None and (
            not is_int(self.num_return_sequences) or self.num_return_sequences < 1
        ):
            fail("num_return_sequences", "an integer >= 1")
        if (self.num_return_sequences or 1) > 1 and not self.is_random:
            raise ValueError(
                f"`num_return_sequences={self.num_return_sequences}` would return identical answers: decoding is "
                f'deterministic with temperature 0 and alg="{self.alg}". Set temperature > 0, use a random `alg` '
                "(origin, origin-ratio), or alg_temp > 0 with a confidence algorithm."
            )

    def _ineffective_combinations(self) -> list[str]:
        messages = []
        if self.alg_p_threshold is not None and self.alg == "entropy" and self.decoding_pipeline == "dim":
            messages.append(
                '`alg="entropy"` scores slots by negative entropy (always <= 0), so `alg_p_threshold` never fires '
                "except in the final flush."
            )
        if self.alg_p_threshold is not None and self.decoding_pipeline == "dream":
            messages.append("`alg_p_threshold` is ignored by the dream pipeline (it has no confident decoding).")
        if self.alg_temp and not ALGORITHMS[self.alg].by_confidence:
            ranked = tuple(name for name, algorithm in ALGORITHMS.items() if algorithm.by_confidence)
            messages.append(f'`alg_temp` only affects {ranked}; it is ignored with alg="{self.alg}".')
        if self.cache_refresh_interval and not self.use_cache:
            messages.append("`cache_refresh_interval` has no effect without `use_cache=True`.")
        return messages


@dataclass
class DimpleDiffusionOutput(ModelOutput):
    """
    Output of [`DimpleGenerationMixin.diffusion_generate`] with `return_dict_in_generate=True`.

    Args:
        sequences (`torch.LongTensor` of shape `[B, P + N]`): the prompt exactly as given, then the N answer slots.
        history (`tuple[torch.LongTensor]`, *optional*): with `output_history`, `sequences` after each step run.
        num_forward_passes (`torch.LongTensor` of shape `[B]`): forward passes each row took, i.e. the steps that
            started while it still had a mask.
        tokens_per_step (`torch.LongTensor` of shape `[B, steps run]`): slots each row committed at each step (0 after
            the row finished).
    """

    sequences: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None
    num_forward_passes: torch.LongTensor | None = None
    tokens_per_step: torch.LongTensor | None = None


class DiffusionTextStreamer(BaseStreamer):
    """
    Prints every row of the batch after every diffusion step, with still-masked slots shown as `placeholder`.

    For what transformers' `TextDiffusionStreamer` does not do (batches, masks shown as `_`). It follows the same
    protocol: `put(prompt)` first (skipped), `put_draft(canvas)` after each step with the `[batch, N]` answer canvas
    (undecided slots hold the mask id), `put(answer)` once with the final answer, then `end()`. Each canvas replaces
    the previous text. The latest texts are in `self.texts` (`self.final` once the answer is put); override
    `on_canvas` to send them elsewhere (a UI, a log).

    Args:
        tokenizer: decodes the committed tokens.
        mask_token_id (`int`, *optional*): defaults to the tokenizer's `<|mask|>` id.
        placeholder (`str`, defaults to `"_"`): shown for each masked slot.
        decode_kwargs: passed to `tokenizer.decode` (default `skip_special_tokens=True`).
    """

    def __init__(self, tokenizer, mask_token_id: int | None = None, placeholder: str = "_", **decode_kwargs):
        self.tokenizer = tokenizer
        if mask_token_id is None:
            mask_token_id = getattr(tokenizer, "mask_token_id", None)
        if mask_token_id is None:
            mask_token_id = tokenizer.convert_tokens_to_ids("<|mask|>")
        if mask_token_id is None:
            raise ValueError("Pass `mask_token_id`: the tokenizer has no `<|mask|>` token.")
        self.mask_token_id = mask_token_id
        self.placeholder = placeholder
        self.decode_kwargs = {"skip_special_tokens": True, **decode_kwargs}
        self.texts: list[str] = []
        self.steps = 0
        self.prompt_seen = False
        self.final = False
        self.finished = False

    def render(self, token_ids: list[int]) -> str:
        """Decode runs of committed tokens together (so multi-byte characters survive); masks become placeholders."""
        pieces, run = [], []
        for token in token_ids + [None]:
            if token is not None and token != self.mask_token_id:
                run.append(token)
                continue
            if run:
                pieces.append(self.tokenizer.decode(run, **self.decode_kwargs))
                run = []
            if token is not None:
                pieces.append(self.placeholder)
        return "".join(pieces)

    def put_draft(self, value: torch.Tensor):
        self.steps += 1
        self._show(value)

    def put(self, value: torch.Tensor):
        """The prompt (first call, skipped), then the final answer."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.final = True
        self._show(value)

    def end(self):
        self.finished = True

    def _show(self, value: torch.Tensor):
        canvas = value.reshape(-1, value.shape[-1])
        self.texts = [self.render(row) for row in canvas.tolist()]
        self.on_canvas(self.texts, self.steps)

    def on_canvas(self, texts: list[str], step: int):
        label = "answer" if self.final else f"step {step}"
        for row, text in enumerate(texts):
            prefix = f"[{label}]" if len(texts) == 1 else f"[{label}, row {row}]"
            print(f"{prefix} {text}", flush=True)


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
    if temperature and temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k:
        # transformers' filter, bit-identical here: -inf and the dtype's minimum both get probability 0.
        logits = TopKLogitsWarper(top_k)(None, logits)
    probs = F.softmax(logits, dim=-1)
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


# ------------------------------------------------------------------------------------------------ input set-up


@dataclass
class DiffusionBatch:
    """What stays fixed during one `diffusion_generate` call (internal layout: prompts left-aligned)."""

    x: torch.LongTensor  # [B, S] prompt (P columns) then the N answer slots; updated in place
    attention_mask: torch.LongTensor  # [B, S]; 0 on prompt padding and on the filler slots of short templates
    position_ids: torch.LongTensor  # [3, B, S] multimodal RoPE positions
    prompt_embeds: torch.Tensor  # [B, P, H] prompt embeddings with the vision features in place
    prompt: torch.LongTensor  # [B, P] the prompt as the caller gave it, returned unchanged
    aligned_prompt: torch.LongTensor  # [B, P] the left-aligned prompt, which hooks must leave unchanged
    # [B, 1, S, S] decoder mask of the whole sequence, built once per call (None: the attention takes the 2-D mask)
    decoder_mask: torch.Tensor | None = None

    @property
    def prompt_length(self) -> int:
        return self.prompt.shape[1]

    @property
    def answer(self) -> torch.LongTensor:
        return self.x[:, self.prompt_length :]

    def sequences(self) -> torch.LongTensor:
        return torch.cat([self.prompt, self.answer], dim=1)


def left_align(input_ids: torch.LongTensor, attention_mask: torch.Tensor):
    """Move padding to the left of each row (a no-op for left-padded input): the cache needs one prompt end."""
    order = torch.argsort(attention_mask.long(), dim=1, stable=True)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def template_rows(response_template, batch_size: int) -> list[list[int]]:
    """One list of ids per row from a shared list, per-row lists or tensors, or a 1-D/2-D LongTensor."""
    if isinstance(response_template, torch.Tensor):
        if response_template.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"`response_template` must hold token ids, got a {response_template.dtype} tensor.")
        response_template = response_template.tolist()
    if not isinstance(response_template, (list, tuple)) or not response_template:
        raise TypeError(
            "`response_template` must be a non-empty list of token ids, a list of such lists (one per row), or a "
            f"LongTensor; got {type(response_template).__name__}."
        )
    if isinstance(response_template[0], torch.Tensor):
        response_template = [row.tolist() for row in response_template]
    per_row = isinstance(response_template[0], (list, tuple))
    rows = response_template if per_row else [response_template] * batch_size
    if len(rows) != batch_size:
        raise ValueError(f"`response_template` has {len(rows)} rows for a batch of {batch_size} prompts.")
    for row in rows:
        if not row or not all(isinstance(token, int) and not isinstance(token, bool) for token in row):
            raise TypeError("`response_template` rows must be non-empty lists of integer token ids.")
    return [list(row) for row in rows]


def answer_canvas(response_template, batch_size, answer_length, config, device):
    """The N answer slots of each row ([B, N] ids and [B, N] attention) from the template or from N masks.

    Rows with shorter templates are right-padded with `pad_token_id` filler slots that no token attends to, so a
    row decodes as it would alone; the fillers are returned as they are (pad ids).
    """
    if response_template is None:
        canvas = torch.full((batch_size, answer_length), config.mask_token_id, dtype=torch.long, device=device)
        return canvas, torch.ones_like(canvas)
    rows = template_rows(response_template, batch_size)
    width = max(len(row) for row in rows)
    if config.max_new_tokens is not None and width > config.max_new_tokens:
        raise ValueError(
            f"`response_template` has {width} slots but `max_new_tokens` is {config.max_new_tokens}; the template "
            "sets the answer length, so drop `max_new_tokens` or shorten the template."
        )
    if any(config.mask_token_id not in row for row in rows):
        raise ValueError(
            f"Every `response_template` row needs at least one mask slot (id {config.mask_token_id}); a row without "
            "one has nothing to decode."
        )
    if width > min(len(row) for row in rows) and config.pad_token_id is None:
        raise ValueError("Per-row templates of different lengths need a `pad_token_id` for the filler slots.")
    canvas = torch.tensor([row + [config.pad_token_id] * (width - len(row)) for row in rows], device=device)
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    return canvas, attention


def answer_length_without_template(config, prompt_length: int, max_length_passed: bool, max_positions) -> int:
    """`max_new_tokens`, else `max_length - P`; an untouched default `max_length` (20) means 20 new slots."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    total = config.max_length
    if not max_length_passed and config.max_length == UPSTREAM_DEFAULT_MAX_LENGTH:
        total = prompt_length + UPSTREAM_DEFAULT_MAX_LENGTH
        total = min(total, max_positions) if max_positions else total
    if total <= prompt_length:
        raise ValueError(
            f"The prompt has {prompt_length} tokens but the total length is {total}; set `max_new_tokens`."
        )
    return total - prompt_length


def check_fits(prompt_length: int, answer_length: int, max_positions: int | None):
    if max_positions and prompt_length + answer_length > max_positions:
        raise ValueError(
            f"The prompt ({prompt_length} tokens) plus the answer ({answer_length} slots) exceed the model's "
            f"{max_positions} positions (config.max_position_embeddings); lower `max_new_tokens` or shorten the template."
        )


def check_hook_output(name: str, value, expected: torch.Tensor):
    if not isinstance(value, torch.Tensor) or value.shape != expected.shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must return a tensor of shape {tuple(expected.shape)}, got {got}.")
    if value.dtype.is_floating_point != expected.dtype.is_floating_point:
        raise TypeError(f"`{name}` must return a {expected.dtype} tensor, got {value.dtype}.")
    if value.dtype.is_floating_point and bool(torch.isnan(value).any()):
        raise ValueError(f"`{name}` returned NaN logits; mask tokens out with -inf instead.")
    return value.to(expected.device)


class PrefixCache(DynamicCache):
    """The cached prompt prefix, read-only: each cached step attends to [prefix | its own fresh keys/values].

    Nothing is appended (so nothing needs cropping after a step), and every cached step sees tensors of the same
    shapes, which is what a compiled step (and on CUDA its captured graph) needs.
    """

    @classmethod
    def from_cache(cls, cache: DynamicCache, length: int) -> "PrefixCache":
        return cls(ddp_cache_data=[(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v, *_ in cache])

    def refill(self, cache: DynamicCache):
        """New prefix keys/values (a cache refresh), written in place."""
        for layer, (keys, values, *_) in zip(self.layers, cache):
            layer.keys.copy_(keys[:, :, : layer.keys.shape[-2]])
            layer.values.copy_(values[:, :, : layer.values.shape[-2]])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def whole_denoising_pass(model, batch, cache: DynamicCache | None, answer, inputs: StepInputs):
    """A whole step (step 0, a cache refresh, every step without the cache): the prompt from its embeddings and the
    N answer slots, the prompt's keys/values kept in `cache` when one is given, then [`denoising_step`]. Returns
    (new answer, slots committed per row, answer logits)."""
    logits = model._score_answer(batch, answer, 0, cache)
    answer, committed = denoising_step(answer, logits, inputs)
    return answer, committed, logits


def cached_denoising_pass(model, batch, prefix: PrefixCache, answer, inputs: StepInputs):
    """A whole cached step: the last prompt token and the N answer slots against the cached prompt prefix (spec
    5.8), then [`denoising_step`]. Returns (new answer, slots committed per row, answer logits).

    All cached steps of a call have the same shapes (N + 1 queries, P - 1 cached keys), so this function compiles
    once per call shape (`compile_step=True`).
    """
    logits = model._score_answer(batch, answer, batch.prompt_length - 1, prefix)
    answer, committed = denoising_step(answer, logits, inputs)
    return answer, committed, logits


@dataclass(frozen=True)
class DenoisingPasses:
    """The two kinds of pass a call runs: `whole` (`whole_denoising_pass`) and `cached` (`cached_denoising_pass`)."""

    whole: Callable
    cached: Callable
    compiled: bool = False

    def for_one_call(self) -> "DenoisingPasses":
        """Compiled passes whose guards are evaluated at their first call in this `diffusion_generate` call only."""
        if not self.compiled:
            return self
        return DenoisingPasses(GuardsCheckedOnce(self.whole), GuardsCheckedOnce(self.cached), compiled=True)


EAGER_PASSES = DenoisingPasses(whole_denoising_pass, cached_denoising_pass)


@functools.cache
def compiled_passes(device_type: str) -> DenoisingPasses:
    """`compile_step=True`: both passes under `torch.compile(fullgraph=True)`, one graph each per call shape. On CUDA
    with `mode="reduce-overhead"`: CUDA graphs, captured and replayed by torch. Elsewhere the graph's kernels are
    called from inductor's C++ wrapper instead of its Python one (per-call Python overhead is much of a small step).
    The same option and code path everywhere; only the backend's settings differ."""
    settings = {"mode": "reduce-overhead"} if device_type == "cuda" else {"options": {"cpp_wrapper": True}}
    return DenoisingPasses(
        torch.compile(whole_denoising_pass, fullgraph=True, **settings),
        torch.compile(cached_denoising_pass, fullgraph=True, **settings),
        compiled=True,
    )


class GuardsCheckedOnce:
    """A compiled pass that checks its guards (the conditions under which the compiled graph is valid) at its first
    call only. Within one `diffusion_generate` call every pass of a kind gets the same objects, settings and shapes
    (only tensor values change, in place), so the checks that follow could only repeat the first one's answer; on a
    small model they cost about as much as the graph itself. The next call starts with a new wrapper."""

    def __init__(self, compiled: Callable):
        self.compiled, self.checked = compiled, False

    def __call__(self, *args):
        if not self.checked:
            self.checked = True
            return self.compiled(*args)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self.compiled(*args)


def step_randomness(answer: torch.LongTensor, rules: StepRules, vocab_size: int):
    """This step's random numbers, drawn outside the step: uniform draws per slot and Exp(1) noise per token."""
    draws = torch.rand(answer.shape, device=answer.device) if rules.random_slots else torch.zeros_like(answer).float()
    sampling = rules.temperature > 0
    return draws, torch.empty(*answer.shape, vocab_size, device=answer.device).exponential_() if sampling else None


# ------------------------------------------------------------------------------------------------------- mixin


class DimpleGenerationMixin(GenerationMixin):
    """`diffusion_generate` for Dimple (the autoregressive `generate` plumbing lives in `modeling_dimple.py`)."""

    @torch.no_grad()
    def diffusion_generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        response_template=None,
        streamer: BaseStreamer | None = None,
        generation_tokens_hook_func=None,
        generation_logits_hook_func=None,
        **kwargs,
    ) -> DimpleDiffusionOutput | torch.LongTensor:
        r"""
        Answer by masked diffusion: append N `<|mask|>` slots to each prompt and fill them over at most `steps`
        forward passes (see the module docstring for the pipelines and algorithms).

        Args:
            inputs (`torch.LongTensor` of shape `[B, P]`): prompt ids (also accepted as `input_ids=`). Left or right
                padding both work; mask tokens inside the prompt are rejected.
            generation_config ([`GenerationConfig`], *optional*): overrides `model.generation_config`; keyword
                arguments override both (see [`DimpleGenerationConfig`] for every setting and the resolution order).
            attention_mask (`torch.Tensor` of shape `[B, P]`, *optional*): 1 for real tokens; defaults to all ones.
            response_template (*optional*): structure prior, one list of ids for every row, one list per row, or a
                LongTensor (`processor.encode_response_template` builds them). Slots holding the mask id are decoded;
                every other id is fixed and never overwritten. The template sets the answer length exactly (N = its
                length; shorter rows get pad filler slots that nothing attends to); an answer slot placed first is
                filled first when confident.
            streamer (`BaseStreamer`, *optional*): transformers' diffusion protocol (DiffusionGemma's): `put(prompt)`
                first, then `put_draft(canvas)` after every step when the streamer has that method (the `[B, N]`
                answer canvas, masked slots holding the mask id), `put(answer)` once with the final `[B, N]` answer,
                and `end()`. `TextStreamer`, `TextIteratorStreamer` and `TextDiffusionStreamer` work as they are (batch
                size 1); [`DiffusionTextStreamer`] shows whole-batch canvases.
            generation_tokens_hook_func (`callable`, *optional*): `(step, x, logits) -> x`, called once before the
                loop as `(None, x, None)` and after every step. `x` is always the full `[B, P + N]` sequence (with or
                without the cache, prompts left-aligned) and the hook must return a LongTensor of that shape with the
                prompt unchanged.
            generation_logits_hook_func (`callable`, *optional*): `(step, x, logits) -> logits`, called before slots
                are chosen. `logits` is `[B, N, V]`: row j scores answer slot j (already shifted, so right-aligned
                edits such as `logits[:, -k:]` act on the last k slots, as with the released hooks).
            kwargs: any [`DimpleGenerationConfig`] setting, and the vision inputs `pixel_values` / `image_grid_thw`
                (and `pixel_values_videos` / `video_grid_thw`). Images are encoded once per call.

        Returns:
            `torch.LongTensor` `[B * num_return_sequences, P + N]` (the prompt as given, then the answer), or a
            [`DimpleDiffusionOutput`] with `return_dict_in_generate=True`. Nothing is cut at EOS: strip trailing
            `<|endoftext|>`, `<|im_end|>` and leftover masks when decoding.

        Intended deviations from the released implementation (identical results at batch size 1 otherwise):
            - batching is per sample: each row has its own mask count, schedule, threshold decision, slot choice and
              stop; upstream pooled these over the batch, so one confident row could stall the others;
            - the dim fallback no longer raises when almost no mask is left (it commits what is left);
            - `autoregressive` flushes the remaining masks at the last step, like every other algorithm;
            - ties between confidences are broken by position (leftmost first) instead of `torch.topk`'s order;
            - random choices use one uniform draw per slot (lowest first; Gumbel top-k with `alg_temp`) and tokens are
              sampled as argmax(p / Exp(1) noise): upstream's laws, other random streams than its `randperm`,
              `multinomial` and `Categorical`;
            - the dream pipeline also stops once no mask is left (the sequences are the same, the history shorter);
            - the hooks always see `[B, P + N]` tokens and `[B, N, V]` answer logits, with or without the cache;
            - images are encoded once per call; logits are computed only at the N positions that score answer slots;
            - `attention_mask` defaults to all ones, `num_return_sequences` works with images, right padding works,
              masks in the prompt are an error, and `streamer` is supported.
        """
        if streamer is not None and not all(callable(getattr(streamer, name, None)) for name in ("put", "end")):
            raise TypeError(f"`streamer` needs `put(tokens)` and `end()` methods (a BaseStreamer), got {streamer!r}.")
        draft = getattr(streamer, "put_draft", None) if streamer is not None else None
        max_length_passed = "max_length" in kwargs
        if inputs is not None and kwargs.get("input_ids") is not None:
            raise ValueError("Pass the prompt once, as `inputs` or as `input_ids`, not both.")
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        config, visual = self._diffusion_settings(generation_config, kwargs)
        self.check_prompt_inputs(input_ids, attention_mask, visual)
        batch = self._diffusion_batch(input_ids, attention_mask, response_template, config, visual, max_length_passed)
        if generation_tokens_hook_func is not None:
            batch.x = self._checked_tokens(generation_tokens_hook_func(None, batch.x, None), batch)
        if streamer is not None:
            streamer.put(batch.prompt.cpu())  # transformers' protocol: the prompt first, as `generate` does

        rules = StepRules.from_config(config)
        total_masks = (batch.answer == config.mask_token_id).sum(1)  # per row, after the structure-prior hook
        timesteps = torch.linspace(1, config.eps, config.steps + 1, device=batch.x.device)
        step_index = torch.arange(config.steps, device=batch.x.device)
        passes = (compiled_passes(self.device.type) if config.compile_step else EAGER_PASSES).for_one_call()
        hooked = generation_logits_hook_func is not None or generation_tokens_hook_func is not None
        history, committed_per_step = [], []
        forward_passes = torch.zeros_like(total_masks)
        prefix = None
        for step in range(config.steps):
            active = (batch.answer == config.mask_token_id).any(1)
            if not active.any():
                break
            draws, noise = step_randomness(batch.answer, rules, self.get_output_embeddings().out_features)
            inputs = StepInputs(step_index[step], total_masks, timesteps, draws, rules, noise)
            if hooked or schedule_can_commit(batch.answer, inputs):
                answer, committed, logits, prefix = self._denoising_pass(
                    batch, prefix, step, inputs, config, passes, generation_logits_hook_func
                )
                batch.answer.copy_(answer)
                forward_passes += active.long()
            else:  # no forward pass without effect
                committed, logits = torch.zeros_like(total_masks), None
            committed_per_step.append(committed.clone())
            if generation_tokens_hook_func is not None:
                batch.x = self._checked_tokens(generation_tokens_hook_func(step, batch.x, logits), batch)
            if config.output_history and config.return_dict_in_generate:
                history.append(batch.sequences())
            if callable(draft):
                draft(batch.answer.cpu())
        if streamer is not None:
            streamer.put(batch.answer.cpu())  # the final answer, once
            streamer.end()

        sequences = batch.sequences()
        if not config.return_dict_in_generate:
            return sequences
        return DimpleDiffusionOutput(
            sequences=sequences,
            history=tuple(history) if config.output_history else None,
            num_forward_passes=forward_passes,
            tokens_per_step=torch.stack(committed_per_step, dim=1) if committed_per_step else None,
        )

    def _denoising_pass(self, batch, prefix, step: int, inputs: StepInputs, config, passes, logits_hook):
        """One step: the forward pass (whole sequence, or the answer against the cached prompt, decided here once)
        and [`denoising_step`]. Returns (new answer, slots committed per row, answer logits, prefix cache)."""
        whole = prefix is None or self._runs_whole_sequence(step, config) or logits_hook is not None
        if passes.compiled and self.device.type == "cuda" and logits_hook is None:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        if not whole:
            return (*passes.cached(self, batch, prefix, batch.answer, inputs), prefix)
        if logits_hook is None:  # forward and step as one (compiled) pass
            cache = DynamicCache(config=self.config) if config.use_cache else None
            answer, committed, logits = passes.whole(self, batch, cache, batch.answer, inputs)
            return answer, committed, logits, self._kept_prefix(batch, cache, prefix)
        logits, prefix = self._answer_logits(batch, prefix, step, config)
        if logits_hook is not None:
            logits = check_hook_output("generation_logits_hook_func", logits_hook(step, batch.x, logits), logits)
        return (*denoising_step(batch.answer, logits, inputs), logits, prefix)

    def _diffusion_settings(self, generation_config, kwargs) -> tuple[DimpleGenerationConfig, dict]:
        """A copy of `generation_config` (else `model.generation_config`) updated with `kwargs`, as `generate` does;
        unset settings get the diffusion defaults and config.json's ids.

        `GenerationConfig.update` validates and hands back the keyword arguments that are not settings, which must be
        vision inputs.
        """
        source = generation_config if generation_config is not None else self.generation_config
        if not isinstance(source, GenerationConfig):
            raise TypeError(f"`generation_config` must be a GenerationConfig, got {type(source).__name__}.")
        config = (
            copy.deepcopy(source)
            if isinstance(source, DimpleGenerationConfig)
            else DimpleGenerationConfig.from_dict(source.to_dict())  # a plain one: its diffusion keys carried over
        )
        unused = config.update(**kwargs)
        ignored = sorted(k for k in kwargs if k not in unused and not is_diffusion_setting(k))
        if ignored:
            raise TypeError(f"{ignored} are settings of `generate`; diffusion_generate does not use them.")
        config.fill_diffusion_defaults(self.config)  # no new check: `update` validated unset values as these defaults
        if config.mask_token_id is None:
            raise ValueError("No `mask_token_id` in the generation settings or in the model config.")

        for name in ("position_ids", "inputs_embeds"):
            if unused.get(name) is not None:
                raise ValueError(f"`{name}` is not supported by diffusion_generate: pass `input_ids` (and images).")
        unknown = sorted(set(unused) - set(VISUAL_INPUTS) - {"position_ids", "inputs_embeds"})
        if unknown:
            raise TypeError(f"diffusion_generate got unknown arguments {unknown} (neither settings nor model inputs).")
        visual = {k: v for k, v in unused.items() if k in VISUAL_INPUTS and v is not None}
        return config, {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in visual.items()}

    def _diffusion_batch(
        self, input_ids, attention_mask, response_template, config, visual, max_length_passed
    ) -> DiffusionBatch:
        if input_ids is None:
            raise ValueError("Pass the prompt ids as `inputs` (or `input_ids=`).")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point:
            raise TypeError(f"`inputs` must be a LongTensor of token ids, got {type(input_ids).__name__}.")
        device = self.device
        input_ids = (input_ids[None] if input_ids.ndim == 1 else input_ids).to(device)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"`inputs` must be [batch, prompt_length] with at least one token, got {tuple(input_ids.shape)}."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must be 2-D with the prompt's shape {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}."
            )
        if ((input_ids == config.mask_token_id) & (attention_mask == 1)).any():
            raise ValueError(
                f"The prompt contains the mask token (id {config.mask_token_id}). Masks belong in the answer: put "
                "fixed and masked slots in `response_template` instead."
            )
        if not (attention_mask == 1).any(1).all():
            raise ValueError("Every prompt needs at least one real token (a row of `attention_mask` is all zeros).")
        vocab_size = self.get_input_embeddings().num_embeddings
        self.check_token_ids(input_ids, "inputs")
        for name in ("mask_token_id", "pad_token_id"):
            value = getattr(config, name)
            if value is not None and not 0 <= value < vocab_size:
                raise ValueError(
                    f"`{name}` is {value}, outside the model's vocabulary [0, {vocab_size}): the tokenizer and the "
                    "model do not match, or the setting is wrong."
                )

        prompt, prompt_mask = left_align(input_ids, attention_mask)
        batch_size, prompt_length = prompt.shape
        length, max_positions = None, getattr(self.config, "max_position_embeddings", None)
        if response_template is None:
            length = answer_length_without_template(config, prompt_length, max_length_passed, max_positions)
            check_fits(prompt_length, length, max_positions)  # before the canvas is allocated
        canvas, canvas_mask = answer_canvas(response_template, batch_size, length, config, device)
        check_fits(prompt_length, canvas.shape[1], max_positions)
        self.check_token_ids(canvas, "response_template")
        x = torch.cat([prompt, canvas], dim=1)
        full_mask = torch.cat([prompt_mask, canvas_mask], dim=1)
        position_ids, _ = self.get_rope_index(
            x, visual.get("image_grid_thw"), visual.get("video_grid_thw"), attention_mask=full_mask
        )
        batch = DiffusionBatch(
            x=x,
            attention_mask=full_mask,
            position_ids=position_ids,
            prompt_embeds=self._prompt_embeddings(prompt, visual),
            prompt=input_ids,
            aligned_prompt=prompt.clone(),
            decoder_mask=self.sequence_mask(full_mask),
        )
        return self._repeat_rows(batch, config.num_return_sequences)

    def _prompt_embeddings(self, prompt, visual) -> torch.Tensor:
        """Token embeddings with the image/video features in their placeholder slots (images encoded once a call)."""
        self.check_vision_pairs(visual)
        return self._embed_inputs(prompt, **visual)[0]

    @staticmethod
    def _repeat_rows(batch: DiffusionBatch, times: int) -> DiffusionBatch:
        """`num_return_sequences`: each prompt (with its images, already encoded) repeated on consecutive rows."""
        if times == 1:
            return batch
        return DiffusionBatch(
            x=batch.x.repeat_interleave(times, 0),
            attention_mask=batch.attention_mask.repeat_interleave(times, 0),
            position_ids=batch.position_ids.repeat_interleave(times, 1),
            prompt_embeds=batch.prompt_embeds.repeat_interleave(times, 0),
            prompt=batch.prompt.repeat_interleave(times, 0),
            aligned_prompt=batch.aligned_prompt.repeat_interleave(times, 0),
            decoder_mask=None if batch.decoder_mask is None else batch.decoder_mask.repeat_interleave(times, 0),
        )

    def _checked_tokens(self, x, batch: DiffusionBatch) -> torch.LongTensor:
        x = check_hook_output("generation_tokens_hook_func", x, batch.x)
        self.check_token_ids(x, "generation_tokens_hook_func's output")
        if not torch.equal(x[:, : batch.prompt_length], batch.aligned_prompt):
            raise ValueError("`generation_tokens_hook_func` changed the prompt; it may only edit the answer slots.")
        return x.long()

    @staticmethod
    def _runs_whole_sequence(step: int, config) -> bool:
        """Without the cache every step; with it (spec 5.8) step 0 and, with `cache_refresh_interval` k, every k-th
        (and the first step run at all, when the schedule skipped the earlier ones)."""
        refresh = config.cache_refresh_interval
        return not config.use_cache or step == 0 or (refresh > 0 and step % refresh == 0)

    def _answer_logits(self, batch: DiffusionBatch, prefix: PrefixCache | None, step: int, config):
        """Logits `[B, N, V]` scoring the N answer slots (the output at position i predicts token i + 1), and the
        prompt prefix cache for the cached steps (kept from step 0, refilled at each refresh)."""
        if prefix is not None and not self._runs_whole_sequence(step, config):
            return self._score_answer(batch, batch.answer, batch.prompt_length - 1, prefix), prefix
        cache = DynamicCache(config=self.config) if config.use_cache else None
        logits = self._score_answer(batch, batch.answer, start=0, cache=cache)
        return logits, self._kept_prefix(batch, cache, prefix)

    @staticmethod
    def _kept_prefix(batch: DiffusionBatch, cache: DynamicCache | None, prefix: PrefixCache | None):
        """The prompt prefix the cached steps attend to, from a whole pass's cache: new at step 0, refilled in place
        at each refresh (its tensors keep their addresses, as CUDA graphs need); None without the cache."""
        if cache is None:
            return None
        if prefix is None:
            return PrefixCache.from_cache(cache, batch.prompt_length - 1)
        prefix.refill(cache)
        return prefix

    def _score_answer(self, batch: DiffusionBatch, answer, start: int, cache) -> torch.Tensor:
        """Run tokens `start:` (prompt part from the precomputed embeddings) and score the N answer slots only."""
        prompt_length, total = batch.prompt_length, batch.x.shape[1]
        embeds = torch.cat([batch.prompt_embeds[:, start:], self.get_input_embeddings()(answer)], dim=1)
        device = embeds.device
        mask = batch.attention_mask if batch.decoder_mask is None else batch.decoder_mask[:, :, start:]
        return self(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=batch.position_ids[:, :, start:],
            use_cache=cache is not None,
            **cache_kwarg(cache),
            logits_to_keep=torch.arange(prompt_length - 1 - start, total - 1 - start, device=device),
            return_dict=True,
        ).logits


__all__ = [
    "DimpleGenerationConfig",
    "DimpleGenerationMixin",
    "DimpleDiffusionOutput",
    "DiffusionTextStreamer",
    "sample_tokens",
]
