"""Diffusion generation for Dimple: how a call runs. The canvas (prompt + N `<|mask|>` slots), what stops a row and
what is kept of each step, the decode loop of `diffusion_generate`, and the mixin that gives the model `generate`
(diffusion or autoregressive, as the generation config selects).

The settings a call reads (`DimpleGenerationConfig`, `DIFFUSION_DEFAULTS` and the one resolver,
`resolve_generation_settings`) are `generation_config_dimple.py`; how a slot is chosen (sampling, schedules,
rankings, the `Algorithm` records, one `denoising_step`) is `denoising_dimple.py`; the streamer that shows
whole-batch canvases (`DiffusionTextStreamer`) is `streaming_dimple.py`; the forward passes a step runs (the whole
pass, the cached pass against the prompt cache) and how `compile_step` compiles them are `passes_dimple.py`. Their
public names are re-exported here. The model side of the autoregressive `generate`
(M-RoPE positions, per-prompt images, masks for a static cache) lives in `modeling_dimple.py`.

The mixin asks the model for: `get_rope_index`, `embed_prompt` (token embeddings with the vision features in place),
`check_prompt_inputs`, `check_token_ids`, `check_vision_pairs`, its input/output embeddings, and `forward`.
"""

from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, GenerationMixin, StoppingCriteriaList

try:
    from .denoising_dimple import (
        ALGORITHMS, BOTH_SCHEDULES, PIPELINES, SCHEDULES, Algorithm, StepInputs, StepRules, StepState, denoising_step,
        dim_schedule, dream_schedule, leftmost_first, most_confident, random_order, rank_of_each_slot,
        reanchored_fallback, sample_tokens, sampling_logits, schedule_can_commit, step_randomness, top_p_logits,
    )  # fmt: skip
    from .generation_config_dimple import (
        DECODINGS, DIFFUSION_DEFAULTS, DIFFUSION_ONLY_ARGUMENTS, DIMPLE_SETTINGS, MAX_STEPS, MODEL_INPUTS,
        NO_DIFFUSION_COUNTERPART, RELEASED_CHAT_SETTINGS, SPECIAL_IDS, STANDARD_SETTINGS, VISUAL_INPUTS,
        DimpleGenerationConfig, read_standard_settings, resolve_generation_settings,
    )  # fmt: skip
    from .input_checks_dimple import inputs_checked_at_the_door
    from .passes_dimple import (
        EAGER_PASSES, DenoisingPasses, PrefixCache, cached_denoising_pass, compiled_passes, whole_denoising_pass,
    )  # fmt: skip
    from .streaming_dimple import DiffusionTextStreamer
    from .transformers_compat import BaseStreamer, ModelOutput, cache_kwarg
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from denoising_dimple import (
        ALGORITHMS, BOTH_SCHEDULES, PIPELINES, SCHEDULES, Algorithm, StepInputs, StepRules, StepState, denoising_step,
        dim_schedule, dream_schedule, leftmost_first, most_confident, random_order, rank_of_each_slot,
        reanchored_fallback, sample_tokens, sampling_logits, schedule_can_commit, step_randomness, top_p_logits,
    )  # fmt: skip
    from generation_config_dimple import (
        DECODINGS, DIFFUSION_DEFAULTS, DIFFUSION_ONLY_ARGUMENTS, DIMPLE_SETTINGS, MAX_STEPS, MODEL_INPUTS,
        NO_DIFFUSION_COUNTERPART, RELEASED_CHAT_SETTINGS, SPECIAL_IDS, STANDARD_SETTINGS, VISUAL_INPUTS,
        DimpleGenerationConfig, read_standard_settings, resolve_generation_settings,
    )  # fmt: skip
    from input_checks_dimple import inputs_checked_at_the_door
    from passes_dimple import (
        EAGER_PASSES, DenoisingPasses, PrefixCache, cached_denoising_pass, compiled_passes, whole_denoising_pass,
    )  # fmt: skip
    from streaming_dimple import DiffusionTextStreamer
    from transformers_compat import BaseStreamer, ModelOutput, cache_kwarg

# Answer slots when neither `max_new_tokens` nor `max_length` is set (upstream: an untouched `max_length=20` meant 20
# new slots, not 20 in total).
DEFAULT_ANSWER_SLOTS = 20


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

    @inputs_checked_at_the_door
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
        if isinstance(prompt, torch.Tensor):
            self.check_token_ids(prompt, "input_ids")  # here, not at every pass (`inputs_checked_at_the_door`)
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

    @inputs_checked_at_the_door
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
        mode = None if config.compile_step is True else config.compile_step  # True: the device's default
        passes = (compiled_passes(self.device.type, mode) if config.compile_step else EAGER_PASSES).for_one_call(self)
        hooked = generation_logits_hook_func is not None or generation_tokens_hook_func is not None
        returns_dict = config.return_dict_in_generate
        keeps_scores = returns_dict and (config.output_scores or config.output_logits)
        commit_scores = CommitScores(batch.answer, rules) if keeps_scores else None  # [B, N, V] work each step
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
