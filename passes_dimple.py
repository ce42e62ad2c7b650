"""The forward passes of a diffusion call and how they compile: the read-only prompt cache the cached steps attend
to, the whole pass (step 0, refreshes, every step without the cache) and the cached pass, each the forward and
[`denoising_step`] in one function, and `compile_step`'s compiled versions of both.

torch's own machinery throughout: `torch.compile(fullgraph=True)` (CUDA graphs on a GPU; inductor's C++ wrapper on a
CPU, with freezing for "max-autotune"), `torch.compiler.set_stance` to skip guards a call already checked,
`torch.compiler.reset` when frozen weights went stale. The model side is one public method, `score_answer_slots`.
torch internals used: `torch._inductor.config.patch(freezing=...)`, `torch._inductor.list_mode_options`,
`torch._dynamo.exc.FailOnRecompileLimitHit` and `torch._dynamo.config.recompile_limit`.
"""

import functools
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._inductor.config as inductor_config
from transformers import DynamicCache
from transformers import logging

try:
    from .denoising_dimple import StepInputs, denoising_step
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from denoising_dimple import StepInputs, denoising_step

logger = logging.get_logger(__name__)


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
    frozen_weights: bool = False

    def for_one_call(self, model) -> "DenoisingPasses":
        """Compiled passes whose guards are evaluated at their first call in this `diffusion_generate` call only."""
        if not self.compiled:
            return self
        if self.frozen_weights:
            FROZEN_WEIGHTS.check(model)
        whole = GuardsCheckedOnce(self.whole, whole_denoising_pass, self.frozen_weights)
        cached = GuardsCheckedOnce(self.cached, cached_denoising_pass, self.frozen_weights)
        return DenoisingPasses(whole, cached, compiled=True)


EAGER_PASSES = DenoisingPasses(whole_denoising_pass, cached_denoising_pass)


@functools.cache
def compiled_passes(device_type: str, mode: str | None = None) -> DenoisingPasses:
    """`compile_step`: both passes under `torch.compile(fullgraph=True)`, one graph each per combination of settings
    and shapes. On CUDA with `mode` (default "reduce-overhead": CUDA graphs, captured and replayed by torch).
    Elsewhere with `mode`'s inductor options and the C++ wrapper (per-call Python overhead is much of a small step);
    "max-autotune" there also freezes the weights (they become constants, which inductor's own GEMM kernels need to
    prepack them) and times those kernels against the library's. The same option and code path everywhere; only the
    backend's settings differ."""
    if device_type == "cuda":
        settings, frozen = {"mode": mode or "reduce-overhead"}, False
    else:  # torch.compile takes a mode or options, not both: the mode as its options
        options = torch._inductor.list_mode_options(mode) if mode else {}
        settings, frozen = {"options": {**options, "cpp_wrapper": True}}, bool(options.get("max_autotune"))
    return DenoisingPasses(
        torch.compile(whole_denoising_pass, fullgraph=True, **settings),
        torch.compile(cached_denoising_pass, fullgraph=True, **settings),
        compiled=True,
        frozen_weights=frozen,
    )


class FrozenWeights:
    """Keeps frozen compiled passes true to the weights. A graph compiled with inductor's freezing holds the weights'
    values; a model with other parameter objects fails the graph's guards and compiles its own, but weights changed in
    place (`load_state_dict`, an optimizer step, `param.copy_`) would silently keep the old values. Each tensor's
    version counter counts its in-place changes: when a model's counters moved since its last compiled call, compiled
    code is dropped (`torch.compiler.reset`) and compiles again. Writes through `.data` bypass the counters; after
    those, call `torch.compiler.reset()` yourself."""

    def __init__(self):
        self.seen = weakref.WeakKeyDictionary()  # model -> its weights' version counters at its last compiled call

    @staticmethod
    def versions(model) -> tuple[int, ...]:
        return tuple(tensor._version for tensor in itertools.chain(model.parameters(), model.buffers()))

    def check(self, model):
        versions, seen = self.versions(model), self.seen.get(model)
        if seen is not None and seen != versions:
            logger.warning(
                "compile_step: the weights changed in place since the last compiled call; compiling again (frozen "
                "compiled passes hold the weights as constants)."
            )
            torch.compiler.reset()
        self.seen[model] = versions


FROZEN_WEIGHTS = FrozenWeights()


class GuardsCheckedOnce:
    """A compiled pass that checks its guards (the conditions under which the compiled graph is valid) at its first
    call only. Within one `diffusion_generate` call every pass of a kind gets the same objects, settings and shapes
    (only tensor values change, in place), so the checks that follow could only repeat the first one's answer; on a
    small model they cost about as much as the graph itself. The next call starts with a new wrapper.

    Only the first call can compile, so only it sets inductor's `freezing` switch (torch reads it while it traces, not
    from `torch.compile`'s options), and only it can meet torch's recompile limit: `fullgraph=True` then raises
    instead of running eagerly, so this call's passes run the eager function, with a warning."""

    def __init__(self, compiled: Callable, eager: Callable, frozen_weights: bool):
        self.compiled, self.eager, self.frozen_weights, self.checked = compiled, eager, frozen_weights, False

    def __call__(self, *args):
        if not self.checked:
            self.checked = True
            try:
                with inductor_config.patch(freezing=self.frozen_weights):
                    return self.compiled(*args)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                logger.warning_once(RECOMPILE_LIMIT_MESSAGE.format(torch._dynamo.config.recompile_limit))
                self.compiled = self.eager
        if self.compiled is self.eager:
            return self.eager(*args)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self.compiled(*args)


RECOMPILE_LIMIT_MESSAGE = (
    "compile_step: torch.compile's recompile limit ({}, torch._dynamo.config.recompile_limit) is reached for a Dimple "
    "denoising pass, so this call runs it eagerly. Each combination of decoding settings (steps, alg_p_threshold, "
    "temperature, ...), batch shape and model compiles a graph of its own: keep the settings of compiled calls fixed, "
    "raise the limit, or call torch.compiler.reset()."
)
