"""Dimple: a discrete-diffusion multimodal LLM (arXiv 2505.16990) on transformers 5.x.

The vision tower and the decoder layers are transformers' own Qwen2.5-VL modules, loaded under Dimple's parameter
names. What is Dimple's own lives here: the image projector, the bidirectional attention mask (with an identity term
so padded rows never see an empty row), the multimodal RoPE index without video time scaling, and the glue.
Generation (`diffusion_generate`, and `generate` as autoregressive decoding) comes from `generation_utils.py`; the
input checks the doors run once (re-exported here) from `input_checks_dimple.py`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, PreTrainedModel, Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLTextModel

try:
    from .configuration_dimple import DimpleConfig, DimpleVisionConfig
    from .generation_utils import DimpleGenerationConfig, DimpleGenerationMixin
    from .input_checks_dimple import (
        check_attention_mask_values, check_grid, check_input_shapes, check_prompt, check_token_ids, check_vision_pair,
        check_visual_inputs, values_checked_at_the_door,
    )  # fmt: skip
    from .transformers_compat import (
        ACT2FN, CACHE_NAME, MULTIMODAL_OUTPUTS, BaseModelOutputWithPooling, CausalLMOutputBase, cache_kwarg,
        output_cache, warn_old_cache_name,
    )
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from configuration_dimple import DimpleConfig, DimpleVisionConfig
    from generation_utils import DimpleGenerationConfig, DimpleGenerationMixin
    from input_checks_dimple import (
        check_attention_mask_values, check_grid, check_input_shapes, check_prompt, check_token_ids, check_vision_pair,
        check_visual_inputs, values_checked_at_the_door,
    )  # fmt: skip
    from transformers_compat import (
        ACT2FN, CACHE_NAME, MULTIMODAL_OUTPUTS, BaseModelOutputWithPooling, CausalLMOutputBase, cache_kwarg,
        output_cache, warn_old_cache_name,
    )


@dataclass
class DimpleCausalLMOutputWithPast(CausalLMOutputBase):
    """
    transformers' causal-LM output (`loss`, `logits`, the key/value cache, `hidden_states`, `attentions`; the cache
    field is `cache` from transformers 5.24 on, `past_key_values` before) plus Dimple's `rope_deltas`. From 5.24 on
    it is the multimodal output, with the vision tower's `image_outputs` / `video_outputs` (None when the call encoded
    no image / video), as native vision-language models return them.

    Args:
        loss: shifted next-token cross-entropy over `labels != -100` (position i predicts token i + 1).
        logits: `[batch, kept positions, vocab]`; position i scores the token at i + 1.
        rope_deltas: `[batch, 1]`, multimodal-RoPE position minus sequence index for tokens after the last image.
    """

    rope_deltas: torch.LongTensor | None = None


class DimpleImageProjector(nn.Module):
    """Linear -> activation -> Linear, applied after the vision merger (which already outputs the LM width)."""

    def __init__(self, config: DimpleConfig):
        super().__init__()
        in_features = config.vision_config.out_hidden_size
        self.linear_1 = nn.Linear(in_features, config.hidden_size, bias=True)
        self.act = ACT2FN[config.hidden_act]
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class DimplePreTrainedModel(PreTrainedModel):
    config_class = DimpleConfig
    config: DimpleConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # The forward has no data-dependent branch and no host sync once a sequence's first pass is done, so a decoding
    # step compiles whole (static cache, `compile_config`); transformers' compile tests run for the model.
    _can_compile_fullgraph = True
    # The stock `_init_weights` recomputes both rotary `inv_freq` tables (LM: theta 1e6, dim 128; ViT: theta 1e4,
    # dim 40), which `from_pretrained` otherwise leaves as uninitialised memory after building on the meta device.


@dataclass(frozen=True)
class VisionKind:
    """One kind of visual input (images, videos): its input names, placeholder token id and name in messages."""

    pixels: str
    grid: str
    features: str
    token_id: int
    name: str


def attention_mask_4d(
    attention_mask: torch.Tensor, query_positions: torch.Tensor, bidirectional: bool
) -> torch.Tensor:
    """Boolean `[B, 1, q, k]` mask (True = may attend) from a 2-D 0/1 padding mask over all keys.

    Real tokens see every real token (bidirectional) or every earlier real token (causal). Every query also sees
    itself, so a padded row is never empty: that keeps SDPA free of NaN in both modes.
    """
    keys = attention_mask.bool()
    queries = keys[:, query_positions]
    key_index = torch.arange(keys.shape[1], device=keys.device)
    visible = queries[:, :, None] & keys[:, None, :]
    if not bidirectional:
        visible &= key_index[None, None, :] <= query_positions[None, :, None]
    visible |= key_index[None, None, :] == query_positions[None, :, None]
    return visible[:, None]


def vision_token_positions(
    grid_thw: torch.Tensor, merge_size: int, start: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """(t, h, w) M-RoPE indices of one image/video block, offset by `start`; also returns the next free index."""
    t, h, w = (int(v) for v in grid_thw)
    h, w = h // merge_size, w // merge_size
    grid = torch.stack(
        torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    ).reshape(3, -1)
    positions = grid.to(device) + start
    return positions, int(positions.max()) + 1


class DimpleForConditionalGeneration(DimplePreTrainedModel, DimpleGenerationMixin):
    """Dimple: vision tower (`visual`), projector (`img_projector`), bidirectional decoder (`model`), `lm_head`.

    Outputs logits at every kept position; the logit at position i scores the token at i + 1 (Dream's AR
    initialisation). `generate` decodes as the generation config's `decoding` says (diffusion for the checkpoints
    this package writes); `diffusion_generate` always decodes by diffusion.
    """

    _tied_weights_keys = {}
    # `PreTrainedModel.__init__` builds `self.generation_config` from this class; `adjust_generation_fn` loads the
    # checkpoint's `generation_config.json` as one too.
    generation_config_class = DimpleGenerationConfig

    def __init__(self, config: DimpleConfig):
        config.check_pad_token_in_vocabulary()  # else a bare AssertionError from the embedding
        super().__init__(config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.img_projector = DimpleImageProjector(config)
        # Constructed directly (not `_from_config`) so the decoder shares this config object.
        self.model = Qwen2_5_VLTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.set_attention_kind(config.full_attn_mask)
        self.post_init()

    def set_attention_kind(self, bidirectional: bool) -> None:
        """Bidirectional (diffusion, the default) or causal (autoregressive) attention, set in the config and every
        decoder layer together: once here at construction (DiffusionGemma sets it in `__init__`), and by a training
        stage that changes it. The sdpa/eager masks follow `config.full_attn_mask`, flash kernels the layers'
        `is_causal`; change the kind through this method so the two agree."""
        self.config.full_attn_mask = bool(bidirectional)
        for layer in self.model.layers:
            layer.self_attn.is_causal = not bidirectional

    @property
    def vision_kinds(self) -> tuple[VisionKind, VisionKind]:
        """Images, then videos: the names each goes by (written here once)."""
        return (
            VisionKind("pixel_values", "image_grid_thw", "image_features", self.config.image_token_id, "image"),
            VisionKind("pixel_values_videos", "video_grid_thw", "video_features", self.config.video_token_id, "video"),
        )

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # ----------------------------------------------------------------------------------------------- vision

    def _encode_visual(
        self, pixel_values, grid_thw, kind: VisionKind, return_dict: bool | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        check_visual_inputs(pixel_values, grid_thw, kind.pixels, kind.grid, self.config.vision_config)
        pixel_values = pixel_values.to(self.visual.dtype)
        vision = self.visual(pixel_values, grid_thw=grid_thw, return_dict=True, **kwargs)
        features = self.img_projector(vision.pooler_output.to(self.lm_head.weight.dtype))
        sizes = (grid_thw.prod(-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        vision.pooler_output = torch.split(features, sizes)
        return vision if self._returns_dict(return_dict) else vision.to_tuple()

    def _returns_dict(self, return_dict: bool | None) -> bool:
        """The argument when given, else `config.return_dict` (transformers' rule for every output)."""
        return return_dict if return_dict is not None else self.config.return_dict

    def get_image_features(self, pixel_values, image_grid_thw, **kwargs) -> BaseModelOutputWithPooling | tuple:
        """Vision tower + projector, as transformers' Qwen2.5-VL returns them.

        `pooler_output` is a tuple with one `[t*h*w/4, hidden_size]` tensor of projected features per image (in
        `<|image_pad|>` order); `last_hidden_state` (and `hidden_states` / `attentions` when requested through
        `output_hidden_states` / `output_attentions`) are the vision tower's. With `return_dict=False` (argument, or
        else `config.return_dict`) the same fields come as a tuple.
        """
        return self._encode_visual(pixel_values, image_grid_thw, self.vision_kinds[0], **kwargs)

    def get_video_features(self, pixel_values_videos, video_grid_thw, **kwargs) -> BaseModelOutputWithPooling | tuple:
        """Videos go through the same tower and projector as images (frames paired by `temporal_patch_size`)."""
        return self._encode_visual(pixel_values_videos, video_grid_thw, self.vision_kinds[1], **kwargs)

    def check_token_ids(self, ids: torch.Tensor, name: str) -> None:
        """Every id must index the embedding (see `input_checks_dimple.check_token_ids`)."""
        check_token_ids(ids, self.get_input_embeddings().num_embeddings, name)

    def check_vision_pairs(self, visual: dict) -> None:
        """Pixels and grids come in pairs (a grid alone would give M-RoPE positions to an image never encoded)."""
        for kind in self.vision_kinds:
            check_vision_pair(kind.pixels, visual.get(kind.pixels), kind.grid, visual.get(kind.grid))

    def check_prompt_inputs(self, input_ids, attention_mask, visual: dict) -> None:
        """The checks of a user's prompt, made once where it comes in (`generate`, `diffusion_generate`): a 0/1 mask,
        and pixels for every vision block (see `input_checks_dimple.check_prompt`)."""
        check_prompt(input_ids, attention_mask, visual, self.vision_kinds, self.config.vision_start_token_id)

    def placeholder_ids(self, inputs_embeds: torch.Tensor) -> torch.LongTensor:
        """Where `inputs_embeds` holds the embeddings of the vision special tokens: their ids there, -1 elsewhere.

        Lets images and M-RoPE positions work from `inputs_embeds` alone (as transformers' Qwen2.5-VL finds its
        placeholders): `<|vision_start|>`, `<|image_pad|>` and `<|video_pad|>` are told apart by their embedding rows.
        """
        special = [self.config.vision_start_token_id, self.config.image_token_id, self.config.video_token_id]
        table = self.get_input_embeddings()(torch.tensor(special, device=inputs_embeds.device))
        ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        for token_id, row in zip(special, table):
            ids = ids.masked_fill((inputs_embeds == row.to(inputs_embeds.dtype)).all(-1), token_id)
        return ids

    def merge_visual_features(self, embeds, placeholders, features, token_id, name):
        """Write `features` (rows in order) into the `token_id` placeholder slots of `embeds` (batch-major order)."""
        slots = placeholders == token_id
        count = int(slots.sum())
        if count != features.shape[0]:
            raise ValueError(
                f"The prompt holds {count} {name} placeholder tokens (id {token_id}) but the {name}s give "
                f"{features.shape[0]} feature rows. Build the prompt and the pixels with the processor, which expands "
                f"each placeholder to t*h*w/{self.config.vision_config.spatial_merge_size ** 2} copies."
            )
        return embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))

    # ------------------------------------------------------------------------------------------- positions

    def get_rope_index(
        self,
        input_ids: torch.LongTensor,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Multimodal RoPE positions `[3, B, S]` and `rope_deltas` `[B, 1]` (Qwen2-VL rules, no video time scaling).

        Text gets the same index in all three components; an image block gets (t, h, w) grid indices offset by the
        text before it, and text after it continues from the block's largest index + 1. Padding gets position 1.
        Grids are consumed in order across the whole batch. `rope_deltas` = (largest position + 1) - S, so a token
        appended at sequence index j later sits at j + delta.
        """
        batch, length = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        if image_grid_thw is None and video_grid_thw is None:
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            deltas = positions.max(-1, keepdim=True).values + 1 - length
            return positions[None].expand(3, -1, -1).clone(), deltas

        merge = self.config.vision_config.spatial_merge_size
        grids = {}  # placeholders of a kind without a grid are text, as in `forward`
        for kind, grid in zip(self.vision_kinds, (image_grid_thw, video_grid_thw)):
            if grid is not None:
                check_grid(grid, kind.grid, merge, still_images=kind.name == "image")
                grids[kind.token_id] = iter(grid)
        positions = torch.ones(3, batch, length, dtype=torch.long, device=device)
        deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
        for b in range(batch):
            real = attention_mask[b] == 1
            ids = input_ids[b][real].tolist()
            chunks, cursor, start = [], 0, 0
            starts = [i + 1 for i, tok in enumerate(ids[:-1]) if tok == self.config.vision_start_token_id]
            for block_start in starts:
                kind = ids[block_start]
                if kind not in grids:
                    continue
                try:
                    grid = next(grids[kind])
                except StopIteration:
                    name = next(k.grid for k in self.vision_kinds if k.token_id == kind)
                    raise ValueError(f"The prompts hold more vision blocks than `{name}` has rows.") from None
                text = block_start - cursor
                chunks.append(torch.arange(text, device=device).expand(3, -1) + start)
                block, start = vision_token_positions(grid, merge, start + text, device)
                chunks.append(block)
                cursor = block_start + block.shape[1]
            chunks.append(torch.arange(len(ids) - cursor, device=device).expand(3, -1) + start)
            row = torch.cat(chunks, dim=1)
            if row.shape[1] != len(ids):
                raise ValueError(
                    f"Sample {b}: the vision placeholder runs do not match their grids "
                    f"({row.shape[1]} positions for {len(ids)} tokens)."
                )
            positions[:, b, real] = row
            deltas[b] = int(row.max()) + 1 - length
        return positions, deltas

    # --------------------------------------------------------------------------------------------- forward

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, past_length, first_pass: bool):
        """Shapes always (no host sync); values (ids inside the vocabulary, a 0/1 mask) at a sequence's first pass
        only, outside compiled code and outside a door's call: `generate` and `diffusion_generate` checked the prompt,
        and their loops feed back what the model produced, so no pass of a loop waits on these reads (without a cache,
        every pass of a loop is a first pass)."""
        check_input_shapes(input_ids, inputs_embeds, attention_mask, past_length)
        if first_pass and not torch.compiler.is_compiling() and not values_checked_at_the_door():
            if input_ids is not None:
                self.check_token_ids(input_ids, "input_ids")
            check_attention_mask_values(attention_mask)

    @property
    def _takes_2d_mask(self) -> bool:
        """Flash kernels take the 2-D padding mask (or None) and unpad themselves; sdpa and eager take a 4-D mask."""
        return (self.config._attn_implementation or "").startswith("flash_attention")

    def _decoder_mask(self, attention_mask, batch, key_length, query_positions, sequence_ids, dtype, device):
        """The mask in the form the configured attention implementation wants, over `key_length` keys (a static
        cache's whole length: its slots past the current tokens are masked)."""
        if self._takes_2d_mask:
            if sequence_ids is not None:
                raise ValueError(
                    "Packed sequences (position_ids restarting at 0) need the sdpa or eager attention here; load the "
                    "model with attn_implementation='sdpa', or pad the batch instead of packing it."
                )
            return attention_mask
        if attention_mask is not None and attention_mask.ndim == 4:
            mask = attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
        else:
            mask = attention_mask_4d(
                padding_mask(attention_mask, batch, key_length, query_positions), query_positions,
                self.config.full_attn_mask,
            )  # fmt: skip
        if sequence_ids is not None:  # packed sequences see only themselves
            mask = mask & (sequence_ids[:, None, :, None] == sequence_ids[:, None, None, :])
        if self.config._attn_implementation == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask

    def sequence_mask(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Boolean `[B, 1, S, S]` mask (the configured attention kind) of a whole sequence from its 2-D 0/1 mask, for
        callers that run the same sequence many times (diffusion decoding builds it once per call and passes row
        slices to every pass); None where the attention takes the 2-D mask itself (flash kernels)."""
        if self._takes_2d_mask:
            return None
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        return attention_mask_4d(attention_mask, positions, self.config.full_attn_mask)

    def _embed_inputs(self, input_ids, inputs_embeds=None, vision_flags=None, **visual):
        """Token embeddings with the image/video features in their placeholder slots, the placeholder layout
        (`input_ids`, or the ids recovered from `inputs_embeds` when vision inputs need it; else None), and the vision
        tower's output per kind encoded in this call (`{"image": ..., "video": ...}`).

        `visual`: `pixel_values` / `image_grid_thw` / `image_features` and the video counterparts (None = absent).
        `vision_flags`: `output_attentions` / `output_hidden_states` for the vision tower.
        """
        placeholders = input_ids
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        elif any(value is not None for value in visual.values()):
            placeholders = self.placeholder_ids(inputs_embeds)
        encoded = {}
        for kind in self.vision_kinds:
            features = visual.get(kind.features)
            if visual.get(kind.pixels) is not None and features is None:
                encoded[kind.name] = self._encode_visual(
                    visual[kind.pixels], visual.get(kind.grid), kind, return_dict=True, **(vision_flags or {})
                )
                features = torch.cat(encoded[kind.name].pooler_output)
            if features is not None:
                inputs_embeds = self.merge_visual_features(inputs_embeds, placeholders, features, kind.token_id, kind.name)
        return inputs_embeds, placeholders, encoded

    def embed_prompt(self, input_ids: torch.LongTensor, **visual) -> torch.Tensor:
        """Token embeddings of `input_ids` with the image/video features in their placeholder slots (each image
        encoded once): what diffusion decoding runs every step from, instead of re-encoding the images."""
        return self._embed_inputs(input_ids, **visual)[0]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        rope_deltas: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> DimpleCausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`[B, S]`): token ids; `<|image_pad|>` / `<|video_pad|>` slots receive the vision features.
            attention_mask (`[B, past + S]` of 0/1, or a 4-D mask used as given): defaults to all ones.
            position_ids (`[3, B, S]` M-RoPE positions, or `[B, S]` for text): computed with `get_rope_index` when
                omitted (with a non-empty cache: sequence index + `rope_deltas`; the current tokens follow the cached
                ones). Without `attention_mask`, positions that restart at 0 inside a row mark packed sequences
                (padding-free batches, e.g. `DataCollatorWithFlattening`): each attends only to itself.
            cache (`Cache`): keys/values of earlier tokens (dynamic or static); `past_key_values=` is the same
                argument under its name before transformers 5.24 (from 5.24 on it warns, as native models do).
            inputs_embeds (`[B, S, H]`): instead of `input_ids`; vision placeholders are found by their embeddings.
            pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw: processor outputs.
            image_features / video_features: precomputed projected features (`torch.cat` of `get_image_features(
                ...).pooler_output`), which skip the vision tower.
            labels (`[B, S]`): next-token targets (-100 = ignored), or `shift_labels` already aligned with the logits
                (context parallelism). The loss is the summed cross-entropy of `logits[:, i]` against
                `labels[:, i + 1]`, divided by `num_items_in_batch` (the Trainer passes the count over the
                gradient-accumulation window) or else by the number of scored tokens. A batch with no scored token
                gives loss 0, never NaN. With diffusion-masked inputs and labels kept only on masked slots this same
                loss is the diffusion objective.
            logits_to_keep (`int` or 1-D `LongTensor`): compute logits for the last k positions only (0 = all) or
                for the given sequence indices.
            output_attentions / output_hidden_states: per-layer outputs; default to the config's flags.
        """
        if past_key_values is not None:
            warn_old_cache_name(f"{type(self).__name__}.forward")
        cache = cache if cache is not None else past_key_values
        # A static cache counts its tokens in a tensor (read without a host sync below); a first pass starts from an
        # empty dynamic cache, an unused static one (int 0 until it is first written), or none.
        past_length = cache.get_seq_length() if cache is not None else 0
        first_pass = isinstance(past_length, int) and past_length == 0
        self._check_inputs(input_ids, inputs_embeds, attention_mask, past_length, first_pass)
        # Output flags are passed only when set, so transformers falls back to the config's.
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        flags = {name: value for name, value in flags.items() if value is not None}
        inputs_embeds, placeholders, encoded = self._embed_inputs(
            input_ids, inputs_embeds, vision_flags=flags, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            image_features=image_features, pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
            video_features=video_features,
        )  # fmt: skip
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        # Absolute indices of the current tokens: they follow the cached ones.
        query_positions = torch.arange(length, device=device) + past_length
        key_length = cache.get_mask_sizes(length, 0)[0] if cache is not None else length
        sequence_ids = None
        if position_ids is None:
            position_ids, rope_deltas = self._default_positions(
                placeholders, image_grid_thw, video_grid_thw, attention_mask, rope_deltas, query_positions, batch,
                past_length,
            )  # fmt: skip
        else:
            position_ids = position_ids[None].expand(3, -1, -1) if position_ids.ndim == 2 else position_ids
            # Packing is looked for only without a mask and without cached tokens, as in transformers' masking_utils
            # (`_preprocess_mask_arguments`, 5.25): DataCollatorWithFlattening gives position_ids and no mask, while
            # decoding loops pass a mask with their positions, so no pass of theirs waits on the host for it.
            if attention_mask is None and first_pass and key_length == length:
                sequence_ids = packed_sequence_ids(position_ids)
        mask = self._decoder_mask(
            attention_mask, batch, key_length, query_positions, sequence_ids, inputs_embeds.dtype, device
        )

        decoder_out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask={"full_attention": mask},
            position_ids=position_ids,
            use_cache=use_cache,
            return_dict=True,  # the decoder shares this config: `config.return_dict=False` would give it a tuple
            **flags,
            **cache_kwarg(cache),
            **kwargs,
        )
        hidden = decoder_out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep.to(device)]
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.next_token_loss(logits, labels, num_items_in_batch, shift_labels)

        output = DimpleCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **cache_kwarg(output_cache(decoder_out)),
            hidden_states=decoder_out.hidden_states,
            attentions=decoder_out.attentions,
            rope_deltas=rope_deltas,
            **({"image_outputs": encoded.get("image"), "video_outputs": encoded.get("video")} if MULTIMODAL_OUTPUTS else {}),
        )
        return output if self._returns_dict(return_dict) else output.to_tuple()

    def _default_positions(
        self, placeholders, image_grid_thw, video_grid_thw, attention_mask, rope_deltas, query_positions, batch,
        past_length,
    ):
        mask_2d = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        if is_empty(past_length):
            if placeholders is None:  # inputs_embeds without vision inputs: text positions
                placeholders = torch.zeros(batch, len(query_positions), dtype=torch.long, device=query_positions.device)
            return self.get_rope_index(placeholders, image_grid_thw, video_grid_thw, mask_2d)
        if rope_deltas is None:
            raise ValueError(
                "With a non-empty cache, pass `rope_deltas` (returned by the first forward) or `position_ids`: "
                "positions after an image depend on the image grid, which the cache does not record. (`generate` "
                "computes them itself.)"
            )
        positions = query_positions[None, :] + rope_deltas.to(query_positions.device)
        return positions[None].expand(3, batch, -1), rope_deltas

    def next_token_loss(self, logits, labels, num_items_in_batch=None, shift_labels=None):
        """transformers' causal-LM loss: summed CE(logits[:, i], labels[:, i + 1]) over scored tokens / item count.

        The count defaults to the number of scored tokens, at least 1, so a batch with nothing scored gives 0, never
        NaN. With `shift_labels` (already aligned with the logits) `labels` is not needed.
        """
        if shift_labels is None:
            labels = labels[:, -logits.shape[1] :]  # the positions `logits_to_keep` kept
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        shift_labels = shift_labels.to(logits.device).contiguous()
        if num_items_in_batch is None:
            num_items_in_batch = (shift_labels != -100).sum().clamp(min=1)
        elif torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(logits.device).clamp(min=1)
        else:
            num_items_in_batch = max(num_items_in_batch, 1)
        return self.loss_function(
            logits, None, self.config.vocab_size, num_items_in_batch=num_items_in_batch, shift_labels=shift_labels
        )

    # ------------------------------------------------------------------------- autoregressive `generate`
    # `generate` itself is DimpleGenerationMixin's (its docstring: bidirectional attention and the cache). The stock
    # loop decodes left to right once it has Dimple's M-RoPE positions: computed over the whole prompt (images
    # included) before the first step, sliced to the uncached tokens at every step, extended by one per new token.

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        """`[3, B, S]` M-RoPE positions of the whole prompt (a continued chat included), from ids or embeddings."""
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[1] == 0:
            input_ids = inputs_tensor
        if input_ids.ndim == 3:  # inputs_embeds
            input_ids = self.placeholder_ids(input_ids)
        positions, _ = self.get_rope_index(
            input_ids, model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw"),
            model_kwargs.get("attention_mask"),
        )  # fmt: skip
        return positions

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        """The stock inputs, with only the images whose placeholders are not cached yet (a continued chat)."""
        inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        cache = inputs.get(CACHE_NAME)
        if cache is None or all(inputs.get(kind.pixels) is None for kind in self.vision_kinds):
            return inputs  # the stock loop passes pixels only to the first pass of a call
        past_length = cache.get_seq_length()
        if is_empty(past_length):
            return inputs
        for kind in self.vision_kinds:
            if inputs.get(kind.pixels) is not None and inputs.get(kind.grid) is not None:
                inputs[kind.pixels], inputs[kind.grid] = self._uncached_visual_inputs(
                    input_ids, inputs[kind.pixels], inputs[kind.grid], kind.token_id, past_length
                )
        return inputs

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, **kwargs):
        """The mask of each decoding step with a compileable (static) cache, which transformers builds before the
        (compiled) forward: Dimple's boolean `[B, 1, q, cache length]` mask, bidirectional or causal as configured,
        instead of the stock causal mask mapping. Flash kernels take the 2-D mask."""
        if self._takes_2d_mask:
            return attention_mask
        cache = kwargs[CACHE_NAME]
        batch, length = inputs_embeds.shape[:2]
        query_positions = torch.arange(length, device=inputs_embeds.device) + cache.get_seq_length()
        keys = padding_mask(attention_mask, batch, cache.get_mask_sizes(length, 0)[0], query_positions)
        return attention_mask_4d(keys, query_positions, self.config.full_attn_mask)

    def _uncached_visual_inputs(self, input_ids, pixels, grid, token_id, past_length):
        """The patch rows and grid rows of the vision blocks that start at or after `past_length`."""
        rows, starts = self.vision_block_starts(input_ids, token_id, grid.shape[0])
        keep = starts >= past_length
        if bool(keep.all()):
            return pixels, grid
        if not bool(keep.any()):
            return None, None
        patches = pixels.split(grid.prod(-1).tolist())
        return torch.cat([p for p, k in zip(patches, keep.tolist()) if k]), grid[keep]

    def vision_block_starts(self, input_ids, token_id, expected: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, index of the first placeholder) of every vision block, in the order their grids are consumed."""
        starts = (input_ids[:, :-1] == self.config.vision_start_token_id) & (input_ids[:, 1:] == token_id)
        rows, columns = starts.nonzero(as_tuple=True)
        if len(rows) != expected:
            raise ValueError(f"The prompts hold {len(rows)} vision blocks but the grid has {expected} rows.")
        return rows, columns + 1

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Repeat each prompt's own images with it (the stock version would interleave single patch rows)."""
        visual = {}
        placeholders = input_ids
        if (input_ids is None or input_ids.shape[1] == 0) and model_kwargs.get("inputs_embeds") is not None:
            placeholders = self.placeholder_ids(model_kwargs["inputs_embeds"])  # prompt given as embeddings only
        if expand_size > 1 and placeholders is not None:
            for kind in self.vision_kinds:
                if model_kwargs.get(kind.pixels) is not None and model_kwargs.get(kind.grid) is not None:
                    visual[kind.pixels], visual[kind.grid] = self._repeat_visual_per_prompt(
                        placeholders, model_kwargs.pop(kind.pixels), model_kwargs.pop(kind.grid), kind.token_id,
                        expand_size,
                    )  # fmt: skip
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(visual)
        return input_ids, model_kwargs

    def _repeat_visual_per_prompt(self, input_ids, pixels, grid, token_id, times):
        """Group the patch rows and grids by prompt, then repeat each prompt's group `times` times."""
        rows, _ = self.vision_block_starts(input_ids, token_id, grid.shape[0])
        per_prompt = torch.bincount(rows, minlength=input_ids.shape[0]).tolist()
        grids = grid.split(per_prompt)
        patches = pixels.split([int(g.prod(-1).sum()) for g in grids])
        return (
            torch.cat([p for p in patches for _ in range(times)]),
            torch.cat([g for g in grids for _ in range(times)]),
        )


def is_empty(past_length) -> bool:
    """Whether no token is cached. A static cache counts in a tensor: read eagerly (one host sync, outside the
    decoding loop, which passes `position_ids`), and taken as non-empty inside compiled code."""
    if isinstance(past_length, torch.Tensor):
        return not torch.compiler.is_compiling() and bool(past_length == 0)
    return past_length == 0


def padding_mask(attention_mask, batch: int, key_length: int, query_positions: torch.Tensor) -> torch.Tensor:
    """The 2-D 0/1 mask over all `key_length` keys: the given one (default: every cached and current token real),
    zero-padded on the right, where a static cache keeps its unused slots."""
    if attention_mask is None:
        keys = torch.arange(key_length, device=query_positions.device) <= query_positions[-1]
        return keys[None].expand(batch, -1)
    attention_mask = attention_mask.to(query_positions.device)
    if key_length > attention_mask.shape[1]:
        attention_mask = F.pad(attention_mask.long(), (0, key_length - attention_mask.shape[1]))
    return attention_mask


def packed_sequence_ids(position_ids: torch.LongTensor) -> torch.LongTensor | None:
    """`[B, S]` index of the packed sequence each token belongs to, or None when no row restarts its positions.

    A sequence starts where all three M-RoPE components are 0 (text positions restarting at 0; an image block starts
    at (0, 0, 0) only when it opens a sequence). Needs one host sync, so compiled code must not pack.
    """
    starts = (position_ids == 0).all(0)
    starts[:, 0] = False
    if torch.compiler.is_compiling() or not bool(starts.any()):
        return None
    return starts.long().cumsum(-1)


# The released checkpoint's config.json names `modeling_dimple.DimpleModel` in its auto_map.
DimpleModel = DimpleForConditionalGeneration

DimpleConfig.register_for_auto_class()
DimpleForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "DimpleConfig",
    "DimpleVisionConfig",
    "DimplePreTrainedModel",
    "DimpleForConditionalGeneration",
    "DimpleModel",
    "DimpleImageProjector",
]
