"""The input checks of Dimple's doors: what a user passes is checked once, where it comes in.

The doors are `generate` and `diffusion_generate` (the prompt, its mask and images, once a call), `forward`'s first
pass of a sequence when `forward` is called directly (a training step, a hand-written loop), and the vision tower's
entry (pixels against their grid, once per encoded image). Checks of values (ids inside the vocabulary, a 0/1 mask,
finite pixels) read tensors on the host, so they never run in a decoding loop's passes: a door marks its call with
`inputs_checked_at_the_door`, and `forward` skips them inside it. Errors are `ValueError` / `TypeError` naming the fix.
"""

import contextvars
import functools

import torch

# Set while a door's call runs: every forward pass inside it gets inputs the door checked (or the model produced).
_CHECKED_AT_THE_DOOR = contextvars.ContextVar("dimple_inputs_checked_at_the_door", default=False)


def inputs_checked_at_the_door(door):
    """Decorate a door that checks its inputs' values itself: `forward` then skips its own value checks for the whole
    call. Without a cache every pass of a loop is a first pass, and each would otherwise wait on the host."""

    @functools.wraps(door)
    def checked_door(*args, **kwargs):
        token = _CHECKED_AT_THE_DOOR.set(True)
        try:
            return door(*args, **kwargs)
        finally:
            _CHECKED_AT_THE_DOOR.reset(token)

    return checked_door


def values_checked_at_the_door() -> bool:
    """Whether this forward pass runs inside a door's call (see `inputs_checked_at_the_door`)."""
    return _CHECKED_AT_THE_DOOR.get()


def check_token_ids(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    """Ids outside [0, vocab_size) would index past the embedding (an IndexError, or a device-side assert on GPU)."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer token ids, got a {ids.dtype} tensor.")
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"`{name}` holds token id {bad}, outside the model's vocabulary [0, {vocab_size}). The tokenizer and the "
            "model do not match (compare len(tokenizer) with config.vocab_size), or the ids were built by hand."
        )


def check_attention_mask_values(attention_mask) -> None:
    """A 2-D mask marks tokens 1 (real) or 0 (padding); other values would be read as "real" and change the answer.

    4-D masks are used as given (additive float masks hold other values by design).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 or attention_mask.dtype == torch.bool:
        return
    stray = attention_mask[(attention_mask != 0) & (attention_mask != 1)]
    if stray.numel():
        raise ValueError(
            f"`attention_mask` must hold only 1 (real token) and 0 (padding); got {sorted(set(stray.tolist()))[:5]}. "
            "Pass the mask the processor or tokenizer returned."
        )


def check_input_shapes(input_ids, inputs_embeds, attention_mask, past_length) -> None:
    """`forward`'s every pass (no host sync): exactly one of ids / embeddings, and a tensor mask, 2-D over every
    cached and current token or 4-D (used as given)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
    batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"`attention_mask` must be a tensor (2-D of 0/1, or a 4-D mask), got {type(attention_mask).__name__}."
        )
    if attention_mask is None or attention_mask.ndim == 4:
        return
    if attention_mask.ndim != 2:
        raise ValueError(
            f"`attention_mask` must be 2-D [batch, keys] of 0/1 or a 4-D mask, got shape {tuple(attention_mask.shape)}."
        )
    if isinstance(past_length, int) and attention_mask.shape != (batch, past_length + length):
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected ({batch}, {past_length + length}): "
            "one row per sample and one column per cached and current token."
        )


def check_prompt(input_ids, attention_mask, visual: dict, kinds, vision_start_token_id: int) -> None:
    """The checks of a user's prompt at `generate` / `diffusion_generate` (`kinds`: the model's `vision_kinds`).

    `forward` embeds placeholder ids without pixels as text, as transformers' Qwen2.5-VL does. A vision block
    (`<|vision_start|>` then a placeholder) is what the processor writes for an image or video, so one without pixels
    means they were forgotten; a lone placeholder id (a sampled token, say) stays text.
    """
    check_attention_mask_values(attention_mask)
    if visual.get("inputs_embeds") is not None:
        return  # the model reads these embeddings, not the ids' (which need no pixels then)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point:
        return  # embeddings, or a wrong type that the entry point itself reports
    for kind in kinds:
        given = any(visual.get(key) is not None for key in (kind.pixels, kind.grid, kind.features))
        blocks = (input_ids[..., :-1] == vision_start_token_id) & (input_ids[..., 1:] == kind.token_id)
        if not given and bool(blocks.any()):
            raise ValueError(
                f"The prompt holds {kind.name} placeholder tokens (id {kind.token_id}) but no `{kind.pixels}` was "
                f"given; pass the processor's `{kind.pixels}` and `{kind.grid}` with the prompt."
            )


def check_vision_pair(pixels_name: str, pixels, grid_name: str, grid) -> None:
    """Pixels and their grid come together (the grid says how the patch rows form images)."""
    if (pixels is None) != (grid is None):
        given, missing = (pixels_name, grid_name) if pixels is not None else (grid_name, pixels_name)
        raise ValueError(f"`{given}` was given without `{missing}`; pass both (the processor returns both).")


def check_visual_inputs(pixel_values, grid_thw, name: str, grid_name: str, vision_config) -> None:
    """Pixels and grid must describe each other: the processor's output, checked before the vision tower runs."""
    check_vision_pair(name, pixel_values, grid_name, grid_thw)
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
        raise TypeError(
            f"`{name}` must be a float torch.Tensor (the processor's `return_tensors='pt'`), got "
            f"{type(pixel_values).__name__}{'' if not isinstance(pixel_values, torch.Tensor) else f' {pixel_values.dtype}'}."
        )
    check_grid(grid_thw, grid_name, vision_config.spatial_merge_size, still_images=name == "pixel_values")
    width = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
    patches = int(grid_thw.prod(-1).sum())
    if pixel_values.shape != (patches, width):
        raise ValueError(
            f"`{name}` has shape {tuple(pixel_values.shape)}, but `{grid_name}` describes {patches} patches of "
            f"{width} values (channels * temporal_patch_size * patch_size**2): expected ({patches}, {width}). Pass "
            "the pixels and the grid the processor returned together."
        )
    if not bool(torch.isfinite(pixel_values).all()):
        raise ValueError(f"`{name}` holds NaN or infinite values; check the image loading and normalisation.")


def check_grid(grid_thw, grid_name: str, merge: int, still_images: bool) -> None:
    """A grid must be integer (t, h, w) rows of positive patch counts, h and w whole merge blocks, t = 1 for images."""
    if not isinstance(grid_thw, torch.Tensor) or grid_thw.dtype.is_floating_point or grid_thw.dtype == torch.bool:
        raise TypeError(f"`{grid_name}` must be an integer torch.Tensor of (t, h, w) rows, got {grid_thw!r}.")
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or (grid_thw < 1).any() or (grid_thw[:, 1:] % merge).any():
        raise ValueError(
            f"`{grid_name}` must be [images, 3] rows of positive (t, h, w) patch counts with h and w multiples of "
            f"{merge}; got {grid_thw.tolist()}. Pass the grid the processor returned with these pixels."
        )
    if still_images and (grid_thw[:, 0] != 1).any():
        raise ValueError(f"`{grid_name}` rows of still images have t = 1; got {grid_thw.tolist()}.")


__all__ = [
    "check_attention_mask_values",
    "check_grid",
    "check_input_shapes",
    "check_prompt",
    "check_token_ids",
    "check_vision_pair",
    "check_visual_inputs",
    "inputs_checked_at_the_door",
    "values_checked_at_the_door",
]
