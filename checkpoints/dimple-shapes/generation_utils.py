"""Diffusion generation for Dimple: how a call runs. Its settings (`DimpleGenerationConfig` and the one resolver,
`resolve_generation_settings`), the canvas (prompt + N `<|mask|>` slots), the prompt cache, the decode loop of
`diffusion_generate`, and the mixin that gives the model `generate` (diffusion or autoregressive, as the generation
config selects), plus the streamer that shows whole-batch canvases.

How a slot is chosen (sampling, schedules, rankings, the `Algorithm` records, one `denoising_step`) is
`denoising_dimple.py`; its public names are re-exported here. [`whole_denoising_pass`] (step 0, refreshes) and,
with the prefill cache, [`cached_denoising_pass`] are forward + step, each compiled as one graph by
`compile_step=True`. The model side of the autoregressive `generate`
(M-RoPE positions, per-prompt images, masks for a static cache) lives in `modeling_dimple.py`.

The mixin asks the model for: `get_rope_index`, `embed_prompt` (token embeddings with the vision features in place),
`check_prompt_inputs`, `check_token_ids`, `check_vision_pairs`, its input/output embeddings, and `forward`.
"""

import copy
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, GenerationMixin, StoppingCriteriaList

try:
    from .denoising_dimple import (
        ALGORITHMS,
        BOTH_SCHEDULES,
        PIPELINES,
        SCHEDULES,
        Algorithm,
        StepInputs,
        StepRules,
        StepState,
        denoising_step,
        dim_schedule,
        dream_schedule,
        leftmost_first,
        most_confident,
        random_order,
        rank_of_each_slot,
        reanchored_fallback,
        sample_tokens,
        sampling_logits,
        schedule_can_commit,
        step_randomness,
        top_p_logits,
    )
    from .transformers_compat import BaseStreamer, ModelOutput, cache_kwarg, standard_generation_defaults
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from denoising_dimple import (
        ALGORITHMS,
        BOTH_SCHEDULES,
        PIPELINES,
        SCHEDULES,
        Algorithm,
        StepInputs,
        StepRules,
        StepState,
        denoising_step,
        dim_schedule,
        dream_schedule,
        leftmost_first,
        most_confident,
        random_order,
        rank_of_each_slot,
        reanchored_fallback,
        sample_tokens,
        sampling_logits,
        schedule_can_commit,
        step_randomness,
        top_p_logits,
    )
    from transformers_compat import BaseStreamer, ModelOutput, cache_kwarg, standard_generation_defaults

# What `generate` runs: `diffusion` is `diffusion_generate`, `autoregressive` the standard left-to-right loop.
DECODINGS = ("diffusion", "autoregressive")
VISUAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
MODEL_INPUTS = (*VISUAL_INPUTS, "input_ids", "attention_mask", "position_ids", "inputs_embeds")
SPECIAL_IDS = ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")
# Every setting diffusion decoding reads, with the value it takes when neither the call, the `generation_config`
# argument nor `model.generation_config` sets it: the one place a setting and its default are declared. The config
# leaves all of them unset (None), so resolution can tell "unset" from "set", and the autoregressive `generate`
# keeps transformers' own defaults for the standard ones. Special ids unset everywhere come from config.json.
DIFFUSION_DEFAULTS = dict(
    steps=512, eps=1e-3, alg="origin", alg_temp=None, alg_p_threshold=None, use_original_confidence=True,
    decoding_pipeline="dim", cache_refresh_interval=0, compile_step=False, output_history=False, mask_token_id=None,
    decoding="autoregressive",
    temperature=0.0, max_new_tokens=None, max_length=None, top_p=None, top_k=None, use_cache=False,
    num_return_sequences=1, return_dict_in_generate=False, output_scores=False, output_logits=False,
    stop_strings=None, do_sample=None, pad_token_id=None, bos_token_id=None, eos_token_id=None,
)  # fmt: skip
STANDARD_SETTINGS = frozenset(
    name for name in GenerationConfig().__dict__ if not name.startswith("_") and name != "transformers_version"
)
# The settings that are Dimple's own (the rest are `GenerationConfig` fields).
DIMPLE_SETTINGS = tuple(name for name in DIFFUSION_DEFAULTS if name not in STANDARD_SETTINGS)
DIFFUSION_ONLY_ARGUMENTS = (*DIMPLE_SETTINGS, "response_template", "generation_tokens_hook_func",
                            "generation_logits_hook_func")  # fmt: skip
# Answer slots when neither `max_new_tokens` nor `max_length` is set (upstream: an untouched `max_length=20` meant 20
# new slots, not 20 in total).
DEFAULT_ANSWER_SLOTS = 20
MAX_STEPS = 1_000_000  # the time grid is materialised: 10^9 steps would be a 4 GB tensor and a loop that never ends
# The released README's chat settings (reference §5.12), with the top-k 50 that every released run had implicitly.
RELEASED_CHAT_SETTINGS = dict(
    max_new_tokens=64, steps=64, temperature=0.2, top_p=0.95, top_k=50, alg="origin", alg_p_threshold=0.95,
    use_original_confidence=True, decoding_pipeline="dim", use_cache=True, decoding="diffusion",
)
# Standard settings diffusion decoding has no counterpart for, and what to use instead when one is set.
NO_DIFFUSION_COUNTERPART = {
    "num_beams": "diffusion commits slots in parallel and has no beams; for several answers per prompt use "
    "`num_return_sequences` with temperature > 0",
    "cache_implementation": "diffusion decoding caches the prompt itself: `use_cache=True`",
    "compile_config": "`compile_step=True` compiles the cached diffusion step",
    "max_time": "a `stopping_criteria` (e.g. `MaxTimeCriteria`), which diffusion asks after every step",
}


class DimpleGenerationConfig(GenerationConfig):
    r"""
    Settings of [`DimpleGenerationMixin.diffusion_generate`], saved and loaded as `generation_config.json`.

    The model declares it as its `generation_config_class`, so `model.generation_config` is one (built from
    `config.json`, or loaded from the checkpoint's `generation_config.json`). Every setting defaults to unset (None),
    and [`resolve_generation_settings`] resolves them as transformers' `generate` does (`_prepare_generation_config`):
    the call's keyword arguments, then the fields the `generation_config` argument sets, then
    `model.generation_config`, then the diffusion defaults below (`DIFFUSION_DEFAULTS`); special ids still unset come
    from the model's `config.json` (the released `generation_config.json` has no `mask_token_id`; config.json has
    151666). The autoregressive `generate` keeps transformers' own defaults for the standard settings.

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
            `response_template`) the answer has `max_length - prompt_length` slots, or 20 when `max_length` is not
            set either (the upstream rule).
        max_length (`int`, *optional*): total length (prompt + answer) when `max_new_tokens` is not set.
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
        output_scores, output_logits (`bool`, defaults to `False`): with `return_dict_in_generate`, return for every
            answer slot its scores (the logits after temperature, top-p and top-k: softmax gives the distribution its
            token was drawn from) and its raw logits, each taken at the step the slot was committed.
        stop_strings (`str` or `list[str]`, *optional*): the answer ends before the first occurrence of any of them
            (checked after every step on each row's committed left part; the row then stops); the slots from the
            token where the string starts are set to `pad_token_id`. Needs `tokenizer=` in the call.
        do_sample (`bool`, *optional*): transformers' switch: `False` takes the argmax token (temperature 0, as
            greedy decoding does); `True` needs temperature > 0.
        num_beams (`int`, *optional*): only 1; diffusion has no beam search.
        mask_token_id, pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special ids; only the mask id
            and the pad id (filler of short templates) are used. EOS stops nothing in diffusion decoding.
    """

    def __init__(self, **kwargs):
        for name in DIMPLE_SETTINGS:
            setattr(self, name, kwargs.pop(name, None))
        super().__init__(**kwargs)

    def fill_diffusion_defaults(self, model_config) -> "DimpleGenerationConfig":
        """The last step of resolution: unset settings get their diffusion defaults, unset special ids config.json's."""
        for name, default in DIFFUSION_DEFAULTS.items():
            if getattr(self, name, None) is None:
                setattr(self, name, getattr(model_config, name, None) if name in SPECIAL_IDS else default)
        return self

    def with_defaults(self) -> "DimpleGenerationConfig":
        """A copy whose unset settings hold their diffusion defaults (what they resolve to if nothing sets them)."""
        resolved = copy.copy(self)
        for name, default in DIFFUSION_DEFAULTS.items():
            if getattr(resolved, name, None) is None:
                setattr(resolved, name, default)
        return resolved

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
        resolved = self.with_defaults()  # an unset setting is checked as the default it resolves to
        resolved._check_values()
        for message in resolved._ineffective_combinations():
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
        extras = [name for name in ("output_scores", "output_logits", "output_history") if getattr(self, name)]
        if extras and not self.return_dict_in_generate:
            messages.append(f"{extras} are returned only with `return_dict_in_generate=True`.")
        return messages


def resolve_generation_settings(
    model, generation_config: GenerationConfig | None = None, **kwargs
) -> tuple[DimpleGenerationConfig, dict]:
    """The settings a diffusion call decodes with, resolved as transformers' `generate` resolves them.

    The same steps as `GenerationMixin._prepare_generation_config`, with the same `GenerationConfig.update` calls: a
    copy of `generation_config` (else of `model.generation_config`); its unset fields filled from
    `model.generation_config` (`update(..., defaults_only=True, allow_custom_entries=True)`); the keyword arguments
    on top (`update(**kwargs)`, which validates and hands back what is not a setting); then the diffusion defaults for
    what is still unset (after the keyword arguments, so an explicit `None` means "the default", not a broken value).
    So `GenerationConfig(max_new_tokens=16)` changes the length and keeps the checkpoint's algorithm, threshold and
    cache. Standard settings are then read as diffusion reads them (`do_sample=False` takes the argmax); one that
    asks for something diffusion cannot do raises a `ValueError` naming it.

    Args:
        model: a Dimple model (its `generation_config` and, for special ids, its `config`).
        generation_config ([`GenerationConfig`], *optional*): a plain one or a [`DimpleGenerationConfig`].
        kwargs: settings, and model inputs (`pixel_values`, ...), which are handed back.

    Returns:
        `(config, model_inputs)`: a validated [`DimpleGenerationConfig`] with every setting diffusion reads set, and
        the keyword arguments that are model inputs. A name that is neither raises a `TypeError`.
    """
    source = generation_config if generation_config is not None else model.generation_config
    if not isinstance(source, GenerationConfig):
        raise TypeError(f"`generation_config` must be a GenerationConfig, got {type(source).__name__}.")
    if isinstance(source, DimpleGenerationConfig):
        config = copy.deepcopy(source)
    else:  # a plain one: its fields (and any diffusion keys it carries) in Dimple's class
        config = DimpleGenerationConfig.from_dict(source.to_dict())
    config.update(**model.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    model_inputs = config.update(**kwargs)
    config.fill_diffusion_defaults(model.config)
    unknown = sorted(set(model_inputs) - set(MODEL_INPUTS))
    if unknown:
        raise TypeError(f"Unknown arguments {unknown}: neither generation settings nor model inputs.")
    read_standard_settings(config)
    if config.mask_token_id is None:
        raise ValueError("No `mask_token_id` in the generation settings or in the model config.")
    config._check_values()  # again: `do_sample` may have changed the temperature
    return config, model_inputs


def read_standard_settings(config: DimpleGenerationConfig):
    """Read transformers' standard settings as diffusion decoding does, in place.

    `do_sample=False` takes the argmax (temperature 0, greedy); `do_sample=True` needs temperature > 0;
    `num_beams` must be 1. Any other standard setting must be unset or at its neutral value (`False`, or what
    `generate` fills in when nothing sets it): one that asks for something (a repetition penalty, a static cache,
    attentions) would otherwise be silently ignored, so it raises naming the setting and what to use instead.
    """
    if config.do_sample is False:
        config.temperature = 0.0
    elif config.do_sample and not config.temperature > 0:
        raise ValueError(
            "`do_sample=True` asks for sampling but the temperature is 0: set `temperature` > 0 (diffusion samples "
            "the tokens exactly when temperature > 0)."
        )
    neutral = standard_generation_defaults()
    asked = {
        name: value
        for name, value in vars(config).items()
        if name in STANDARD_SETTINGS and name not in DIFFUSION_DEFAULTS
        if value is not None and value is not False and value != neutral.get(name)
    }
    if asked:
        name, value = next(iter(asked.items()))
        instead = NO_DIFFUSION_COUNTERPART.get(name, 'drop it, or pass `decoding="autoregressive"` to `generate`')
        raise ValueError(
            f"{sorted(asked)} ask for autoregressive decoding, which diffusion decoding cannot honour "
            f"(`{name}={value!r}`: {instead})."
        )


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
        scores (`tuple[torch.FloatTensor]`, *optional*): with `output_scores`, one `[B, V]` tensor per answer slot
            (as `generate` gives one per new token): the slot's logits after temperature, top-p and top-k at the step
            it was committed, so `softmax` is the distribution its token was drawn from (and
            `model.compute_transition_scores(sequences, scores, normalize_logits=True)` its log-probability). A slot
            never decoded (a fixed template token, a filler, a mask left by a stop) holds 0 at its token and -inf
            elsewhere.
        logits (`tuple[torch.FloatTensor]`, *optional*): with `output_logits`, the same for the raw logits.
    """

    sequences: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None
    num_forward_passes: torch.LongTensor | None = None
    tokens_per_step: torch.LongTensor | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None


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


def answer_length_without_template(config, prompt_length: int, max_positions) -> int:
    """`max_new_tokens`, else `max_length - P`, else `DEFAULT_ANSWER_SLOTS` new slots (within the positions)."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if config.max_length is None:
        total = prompt_length + DEFAULT_ANSWER_SLOTS
        total = min(total, max_positions) if max_positions else total
    else:
        total = config.max_length
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
    logits = model.score_answer_slots(batch, answer, 0, cache)
    answer, committed = denoising_step(answer, logits, inputs)
    return answer, committed, logits


def cached_denoising_pass(model, batch, prefix: PrefixCache, answer, inputs: StepInputs):
    """A whole cached step: the last prompt token and the N answer slots against the cached prompt prefix (spec
    5.8), then [`denoising_step`]. Returns (new answer, slots committed per row, answer logits).

    All cached steps of a call have the same shapes (N + 1 queries, P - 1 cached keys), so this function compiles
    once per call shape (`compile_step=True`).
    """
    logits = model.score_answer_slots(batch, answer, batch.prompt_length - 1, prefix)
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


class CommitScores:
    """Per answer slot, the scores and raw logits of the step that committed it (`output_scores`/`output_logits`).

    Slots never decoded keep a one-hot at their token (0 there, -inf elsewhere): the prior fixed them.
    """

    def __init__(self, answer: torch.LongTensor, rules: StepRules):
        self.rules = rules
        self.answer = answer.clone()
        self.sampled = self.raw = None  # [B, N, V], allocated with the first logits (their dtype and vocabulary)

    def record(self, before: torch.LongTensor, after: torch.LongTensor, logits: torch.Tensor):
        if self.sampled is None:
            one_hot = torch.full(logits.shape, -float("inf"), dtype=logits.dtype, device=logits.device)
            self.sampled = one_hot.scatter_(-1, self.answer[..., None], 0.0)
            self.raw = self.sampled.clone()
        mask_id = self.rules.mask_token_id
        committed = ((before == mask_id) & (after != mask_id))[..., None]
        rules = self.rules
        scores = sampling_logits(logits, rules.temperature, rules.top_p, rules.top_k)
        self.sampled = torch.where(committed, scores, self.sampled)
        self.raw = torch.where(committed, logits, self.raw)

    def scores(self) -> tuple[torch.Tensor, ...] | None:
        return None if self.sampled is None else tuple(self.sampled.unbind(1))

    def logits(self) -> tuple[torch.Tensor, ...] | None:
        return None if self.raw is None else tuple(self.raw.unbind(1))


@dataclass
class AnswerStops:
    """What ends a row before its last mask: `stop_strings` (decoded with the call's tokenizer) and the caller's
    `stopping_criteria`, both asked after every step."""

    stop_strings: tuple[str, ...] = ()
    tokenizer: object = None
    criteria: StoppingCriteriaList | None = None
    fill_id: int | None = None  # what the slots after a stop string become
    mask_id: int | None = None

    @classmethod
    def from_arguments(cls, config: DimpleGenerationConfig, tokenizer, stopping_criteria) -> "AnswerStops":
        strings = config.stop_strings
        strings = (strings,) if isinstance(strings, str) else tuple(strings or ())
        if not all(isinstance(string, str) and string for string in strings):
            raise TypeError(f"`stop_strings` must be a non-empty string or a list of them, got {strings!r}.")
        if strings and tokenizer is None:
            raise ValueError("`stop_strings` needs the tokenizer to read the answer: pass `tokenizer=` as well.")
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        fill_id = config.pad_token_id if config.pad_token_id is not None else eos
        if strings and fill_id is None:
            raise ValueError("`stop_strings` fill the answer after the stop with `pad_token_id`: set it.")
        if stopping_criteria is not None and not isinstance(stopping_criteria, StoppingCriteriaList):
            if not isinstance(stopping_criteria, (list, tuple)) or not all(map(callable, stopping_criteria)):
                raise TypeError(
                    "`stopping_criteria` must be a StoppingCriteriaList or a list of StoppingCriteria, got "
                    f"{type(stopping_criteria).__name__}."
                )
            stopping_criteria = StoppingCriteriaList(stopping_criteria)
        return cls(strings, tokenizer, stopping_criteria or None, fill_id, config.mask_token_id)

    def ask(self, batch: "DiffusionBatch", finished: torch.Tensor) -> torch.Tensor:
        """Rows finished after this step; a stop string's row is cut in place."""
        if self.stop_strings:
            finished = finished | self._cut_at_stop_strings(batch, finished)
        if self.criteria is not None:
            done = self.criteria(batch.sequences(), None)
            finished = finished | torch.as_tensor(done, device=finished.device).bool().expand_as(finished)
        return finished

    def _cut_at_stop_strings(self, batch: "DiffusionBatch", finished: torch.Tensor) -> torch.Tensor:
        mask_id = self.mask_id
        cut_rows = torch.zeros_like(finished)
        for row, (tokens, done) in enumerate(zip(batch.answer.tolist(), finished.tolist())):
            committed = tokens[: tokens.index(mask_id)] if mask_id in tokens else tokens
            cut = None if done else self._first_stop(committed)
            if cut is not None:
                batch.answer[row, cut:] = self.fill_id
                cut_rows[row] = True
        return cut_rows

    def _first_stop(self, tokens: list[int]) -> int | None:
        """Index of the first token that reaches into the first stop string of `tokens`' text, or None."""
        text = self.tokenizer.decode(tokens)
        starts = [text.find(string) for string in self.stop_strings if string in text]
        if not starts:
            return None
        start = min(starts)
        return next(cut for cut in range(len(tokens)) if len(self.tokenizer.decode(tokens[: cut + 1])) > start)


# ------------------------------------------------------------------------------------------------------- mixin


class DimpleGenerationMixin(GenerationMixin):
    """`generate` (the decoding the generation config selects), `diffusion_generate` and its loop, for Dimple; the
    model side of the autoregressive loop (M-RoPE positions, per-prompt images) is in `modeling_dimple.py`."""

    def generate(self, inputs=None, generation_config=None, decoding: str | None = None, **kwargs):
        """Answer with the decoding the generation config selects, as transformers' own diffusion LMs do.

        `decoding="diffusion"` (the checkpoints this package writes) runs [`~DimpleGenerationMixin.diffusion_generate`]
        with the same arguments, outputs and streamer protocol; `"autoregressive"` (the default of a plain config)
        runs the stock left-to-right `GenerationMixin.generate` (greedy, sampling, `max_new_tokens`, `eos_token_id`,
        streamers, `num_return_sequences` with images). The keyword `decoding` overrides the config for one call;
        otherwise the `generation_config` argument's setting, then `model.generation_config`'s, decides.

        With the default bidirectional attention (`config.full_attn_mask=True`), autoregressive `use_cache=False`
        re-runs the whole sequence each step (every token sees every other), while `use_cache=True` reuses
        keys/values computed before later tokens existed, so the two can differ after the first new token. With
        causal attention they agree.
        """
        decoding = self.selected_decoding(generation_config, decoding)
        if decoding == "diffusion":
            return self.diffusion_generate(inputs, generation_config, **kwargs)
        misplaced = sorted(set(kwargs) & set(DIFFUSION_ONLY_ARGUMENTS))
        if misplaced:
            raise TypeError(
                f"{misplaced} are diffusion settings; this `generate` call decodes autoregressively (pass "
                '`decoding="diffusion"` or call `diffusion_generate`).'
            )
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        self.check_prompt_inputs(prompt, kwargs.get("attention_mask"), kwargs)
        return super().generate(inputs, generation_config, **kwargs)

    def adjust_generation_fn(self, generation_config, *args, **kwargs):
        """`from_pretrained`'s generation config, as a `DimpleGenerationConfig`: transformers 5.23-5.25 load
        `generation_config.json` as a plain `GenerationConfig` (DiffusionGemma overrides this hook for the same
        reason); the diffusion settings in it are carried over and validated."""
        super().adjust_generation_fn(generation_config, *args, **kwargs)
        if not isinstance(self.generation_config, self.generation_config_class):
            self.generation_config = self.generation_config_class.from_dict(self.generation_config.to_dict())

    def selected_decoding(self, generation_config=None, decoding: str | None = None) -> str:
        """`decoding` if given, else the `generation_config` argument's, else `model.generation_config`'s setting."""
        for source in (generation_config, self.generation_config):
            if decoding is None and source is not None:
                decoding = getattr(source, "decoding", None)
        decoding = decoding or "autoregressive"
        if decoding not in DECODINGS:
            raise ValueError(f"`decoding` must be one of {DECODINGS}, got {decoding!r}.")
        return decoding

    @torch.no_grad()
    def diffusion_generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        response_template=None,
        streamer: BaseStreamer | None = None,
        tokenizer=None,
        stopping_criteria=None,
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
            tokenizer (*optional*): decodes the committed answer for `stop_strings` (transformers' argument).
            stopping_criteria (`StoppingCriteriaList` or a list of `StoppingCriteria`, *optional*): asked after every
                step with the current `[B, P + N]` sequences (undecided slots hold the mask id) and `scores=None`; a
                row they answer `True` for stops there (its undecided slots keep the mask id), so a server can cancel.
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
            [`DimpleDiffusionOutput`] with `return_dict_in_generate=True` (with `output_scores` / `output_logits`,
            the scores and logits of each answer slot at the step it was committed). Nothing is cut at EOS: strip
            trailing `<|endoftext|>`, `<|im_end|>` and leftover masks when decoding.

        Identical to the released implementation at batch size 1 with the same settings, except for the intended
        deviations listed in docs/differences.md (per-row batching, leftmost tie-breaking, other random streams, ...).
        """
        # 1. Validate at the door: settings, stops, inputs; the canvas (prompt + N masks) and the prompt embeddings.
        if streamer is not None and not all(callable(getattr(streamer, name, None)) for name in ("put", "end")):
            raise TypeError(f"`streamer` needs `put(tokens)` and `end()` methods (a BaseStreamer), got {streamer!r}.")
        draft = getattr(streamer, "put_draft", None) if streamer is not None else None
        if inputs is not None and kwargs.get("input_ids") is not None:
            raise ValueError("Pass the prompt once, as `inputs` or as `input_ids`, not both.")
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        config, model_inputs = resolve_generation_settings(self, generation_config, **kwargs)
        visual = self._visual_inputs(model_inputs)
        stops = AnswerStops.from_arguments(config, tokenizer, stopping_criteria)
        self.check_prompt_inputs(input_ids, attention_mask, visual)
        batch = self._diffusion_batch(input_ids, attention_mask, response_template, config, visual)
        if generation_tokens_hook_func is not None:
            batch.x = self._checked_tokens(generation_tokens_hook_func(None, batch.x, None), batch)
        if streamer is not None:
            streamer.put(batch.prompt.cpu())  # transformers' protocol: the prompt first, as `generate` does

        # 2. What every step reads.
        rules = StepRules.from_config(config)
        total_masks = (batch.answer == config.mask_token_id).sum(1)  # per row, after the structure-prior hook
        timesteps = torch.linspace(1, config.eps, config.steps + 1, device=batch.x.device)
        step_index = torch.arange(config.steps, device=batch.x.device)
        passes = (compiled_passes(self.device.type) if config.compile_step else EAGER_PASSES).for_one_call()
        hooked = generation_logits_hook_func is not None or generation_tokens_hook_func is not None
        returns_dict = config.return_dict_in_generate
        commit_scores = CommitScores(batch.answer, rules) if returns_dict else None
        history, committed_per_step = [], []
        forward_passes = torch.zeros_like(total_masks)
        finished = torch.zeros_like(total_masks, dtype=torch.bool)  # stopped early by a stop string or criterion
        prefix = None

        # 3. The loop: each step, (a) stop when no row has a mask left, (b) draw the step's randomness, (c) run the
        #    forward pass and the denoising step (unless the schedule commits nothing anywhere), (d) keep what the
        #    outputs need, (e) call the hooks and the streamer, (f) ask the stops.
        for step in range(config.steps):
            active = (batch.answer == config.mask_token_id).any(1) & ~finished
            if not active.any():
                break
            draws, noise = step_randomness(batch.answer, rules, self.get_output_embeddings().out_features)
            inputs = StepInputs(step_index[step], total_masks, timesteps, draws, rules, noise)
            if hooked or schedule_can_commit(batch.answer, inputs):
                answer, committed, logits, prefix = self._denoising_pass(
                    batch, prefix, step, inputs, config, passes, generation_logits_hook_func
                )
                answer = torch.where(finished[:, None], batch.answer, answer)  # a stopped row stays as it stopped
                committed = torch.where(finished, 0, committed)
                if commit_scores is not None:
                    commit_scores.record(batch.answer, answer, logits)
                batch.answer.copy_(answer)
                forward_passes += active.long()
            else:  # no forward pass without effect
                committed, logits = torch.zeros_like(total_masks), None
            committed_per_step.append(committed.clone())
            if generation_tokens_hook_func is not None:
                batch.x = self._checked_tokens(generation_tokens_hook_func(step, batch.x, logits), batch)
            if config.output_history and returns_dict:
                history.append(batch.sequences())
            if callable(draft):
                draft(batch.answer.cpu())
            finished = stops.ask(batch, finished)

        # 4. The answer: to the streamer once, then returned.
        if streamer is not None:
            streamer.put(batch.answer.cpu())
            streamer.end()
        sequences = batch.sequences()
        if not returns_dict:
            return sequences
        return DimpleDiffusionOutput(
            sequences=sequences,
            history=tuple(history) if config.output_history else None,
            num_forward_passes=forward_passes,
            tokens_per_step=torch.stack(committed_per_step, dim=1) if committed_per_step else None,
            scores=commit_scores.scores() if config.output_scores else None,
            logits=commit_scores.logits() if config.output_logits else None,
        )

    def _denoising_pass(self, batch, prefix, step: int, inputs: StepInputs, config, passes, logits_hook):
        """One step: the forward pass and [`denoising_step`]. Returns (new answer, slots committed per row, answer
        logits, prefix cache).

        The one place that decides which forward runs: the answer against the cached prompt (spec 5.8), or the whole
        sequence (no cache yet, no cache at all, or a refresh), which fills or refills the prompt cache. Without a
        logits hook, forward and step run as one pass (compiled by `compile_step`).
        """
        cached = prefix is not None and not self._runs_whole_sequence(step, config)
        if logits_hook is None:
            if passes.compiled and self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
            if cached:
                return (*passes.cached(self, batch, prefix, batch.answer, inputs), prefix)
            cache = DynamicCache(config=self.config) if config.use_cache else None
            answer, committed, logits = passes.whole(self, batch, cache, batch.answer, inputs)
            return answer, committed, logits, self._kept_prefix(batch, cache, prefix)
        if cached:
            logits = self.score_answer_slots(batch, batch.answer, batch.prompt_length - 1, prefix)
        else:
            logits, prefix = self._whole_sequence_logits(batch, prefix, config)
        logits = check_hook_output("generation_logits_hook_func", logits_hook(step, batch.x, logits), logits)
        return (*denoising_step(batch.answer, logits, inputs), logits, prefix)

    def _visual_inputs(self, model_inputs: dict) -> dict:
        """The vision inputs among the model inputs, on the model's device; the others are not diffusion's."""
        for name in ("position_ids", "inputs_embeds"):
            if model_inputs.get(name) is not None:
                raise ValueError(f"`{name}` is not supported by diffusion_generate: pass `input_ids` (and images).")
        visual = {k: v for k, v in model_inputs.items() if k in VISUAL_INPUTS and v is not None}
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in visual.items()}

    def _diffusion_batch(
        self, input_ids, attention_mask, response_template, config, visual
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
            length = answer_length_without_template(config, prompt_length, max_positions)
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
        return self.embed_prompt(prompt, **visual)

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

    def _whole_sequence_logits(self, batch: DiffusionBatch, prefix: PrefixCache | None, config):
        """The answer logits from the whole sequence, and the prompt cache it leaves (made at the first such pass,
        refilled in place at a refresh; None without `use_cache`)."""
        cache = DynamicCache(config=self.config) if config.use_cache else None
        logits = self.score_answer_slots(batch, batch.answer, start=0, cache=cache)
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

    def score_answer_slots(self, batch: DiffusionBatch, answer, start: int, cache) -> torch.Tensor:
        """Logits `[B, N, V]` scoring the N answer slots (the output at position i predicts token i + 1): run tokens
        `start:` (the prompt part from the precomputed embeddings) against `cache`."""
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
