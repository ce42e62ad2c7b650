"""Shared fixtures: tiny random Dimple models built from the repository's own modules (no downloads)."""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from configuration_dimple import DimpleConfig  # noqa: E402
from modeling_dimple import DimpleForConditionalGeneration  # noqa: E402

# Special ids of the tiny configs: the real ones (151643...) would need a 152k-row embedding.
TINY_IDS = dict(
    vocab_size=256,
    pad_token_id=250,
    bos_token_id=None,
    eos_token_id=None,
    vision_start_token_id=243,
    vision_end_token_id=244,
    vision_token_id=245,
    image_token_id=246,
    video_token_id=247,
    mask_token_id=255,
)
TEXT_VOCAB = 240  # ids below this are ordinary text tokens in tiny-model tests
PATCH_DIM = 3 * 2 * 14 * 14


def make_tiny_config(**overrides) -> DimpleConfig:
    """A 2-layer decoder and 2-block ViT with the real architecture (GQA, M-RoPE, window + full ViT attention)."""
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[1]
    )
    vision.update(overrides.pop("vision_config", {}))
    values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=[1, 1, 2],
        rope_theta=1e6,
        max_position_embeddings=4096,
        vision_config=vision,
        **TINY_IDS,
    )
    values.update(overrides)
    return DimpleConfig(**values)


def make_tiny_model(seed: int = 0, **overrides) -> DimpleForConditionalGeneration:
    torch.manual_seed(seed)
    return DimpleForConditionalGeneration(make_tiny_config(**overrides)).eval()


def random_pixels(grids, seed: int = 0):
    """Random `pixel_values` and `image_grid_thw` for images with the given (t, h, w) patch grids."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids, dtype=torch.long)
    pixels = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=generator)
    return pixels, grid


def image_block(config: DimpleConfig, grid) -> list[int]:
    """`<|vision_start|>`, t*h*w/4 `<|image_pad|>`, `<|vision_end|>` for one image."""
    t, h, w = grid
    count = t * h * w // config.vision_config.spatial_merge_size**2
    return [config.vision_start_token_id] + [config.image_token_id] * count + [config.vision_end_token_id]


def left_pad(rows, pad_id):
    """Left-pad lists of ids into (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.fixture
def tiny_config():
    return make_tiny_config()


@pytest.fixture
def tiny_model():
    return make_tiny_model()
