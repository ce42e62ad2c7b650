"""The settings of Dimple's diffusion decoding: what a call can set, what each setting defaults to, and how one
call's settings are resolved.

[`DimpleGenerationConfig`] is saved and loaded as `generation_config.json` and owns the checks of every setting
(`validate`); `DIFFUSION_DEFAULTS` is the one table of settings and their defaults; [`resolve_generation_settings`]
is the one resolver (the call's keyword arguments, the `generation_config` argument, `model.generation_config`, the
defaults), used by `diffusion_generate` and by the web demo; `read_standard_settings` reads transformers' standard
settings as diffusion does. `RELEASED_CHAT_SETTINGS` are the released README's chat settings.

Only settings live here, no tensors: the call that reads them is `generation_utils.py` (which re-exports every name
of this module), the step they parametrise `denoising_dimple.py`.
"""

import copy
import math
import warnings

from transformers import GenerationConfig

try:
    from .denoising_dimple import ALGORITHMS, PIPELINES
    from .transformers_compat import standard_generation_defaults
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from denoising_dimple import ALGORITHMS, PIPELINES
    from transformers_compat import standard_generation_defaults

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
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
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
        compile_step (`bool` or `str`, defaults to `False`): with `use_cache`, run each pass (the first,
            whole-sequence pass and each cached step: the forward, then the slot selection) as one
            `torch.compile(fullgraph=True)` graph; on CUDA with `mode="reduce-overhead"`, which captures it as a CUDA
            graph and replays it. A torch.compile mode name instead of `True` picks the mode (on a CPU,
            "max-autotune" also freezes the weights and tunes the matrix products: minutes of compiling, a packed
            copy of the linear weights per graph; see docs/decoding.md). Same tokens as the eager passes; removes
            the Python and launch overhead that dominates small steps. The first call of a new shape compiles (tens
            of seconds). A `generation_logits_hook_func` runs the eager passes.
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
        if not (self.compile_step is None or isinstance(self.compile_step, bool) or self.compile_step in COMPILE_MODES):
            fail("compile_step", f"True, False or a torch.compile mode ({', '.join(map(repr, COMPILE_MODES))})")
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


__all__ = [
    "DIFFUSION_DEFAULTS",
    "RELEASED_CHAT_SETTINGS",
    "DimpleGenerationConfig",
    "read_standard_settings",
    "resolve_generation_settings",
]
