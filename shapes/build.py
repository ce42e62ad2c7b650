"""Assemble the small Dimple for the shapes task: tokenizer, processor, config, fresh model, generation defaults.

The tokenizer is Dimple's own (a Qwen2 byte-level BPE built by `build_dimple_tokenizer`, so every Dimple special
token, the chat template and left padding come with it), with merges learnt on the task's text: every task word is
one token and anything else still encodes byte by byte.
"""

import json
import sys
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from configuration_dimple import DimpleConfig  # noqa: E402
from generation_utils import DimpleGenerationConfig  # noqa: E402
from image_processing_dimple import DimpleImageProcessor  # noqa: E402
from modeling_dimple import DimpleForConditionalGeneration  # noqa: E402
import processing_dimple  # noqa: E402
from processing_dimple import DimpleProcessor, build_dimple_tokenizer  # noqa: E402
from shapes.task import IMAGE_SIZE, corpus  # noqa: E402
from transformers_compat import PRETOKENIZE_REGEX  # noqa: E402

MAX_NEW_TOKENS = 32  # the longest answer is 26 tokens

# A few million parameters with the real architecture: windowed + full ViT blocks, GQA decoder, M-RoPE.
VISION = dict(
    depth=2,
    hidden_size=96,
    intermediate_size=192,
    num_heads=4,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
    initializer_range=0.1,
)
DECODER = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    mrope_section=[4, 6, 6],  # sums to head_dim / 2 = 16
    rope_theta=10000.0,
    max_position_embeddings=512,
    # Dimple's 0.02 suits width 3584; at width 96-192 a fresh model barely uses the image for hundreds of steps
    # (measured here: no progress on colour questions in 800 steps), while 0.1 learns within a hundred.
    initializer_range=0.1,
)


def learn_merges(texts: list[str], folder: Path) -> tuple[Path, Path]:
    """Byte-level BPE merges over the task text, with the Qwen2 pre-tokenizer; writes vocab.json + merges.txt."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # A generous budget: merging stops by itself once every word is a single token.
    trainer = trainers.BpeTrainer(
        vocab_size=2000, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    vocab_file, merges_file = tokenizer.model.save(str(folder))
    return Path(vocab_file), Path(merges_file)


def build_tokenizer():
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = learn_merges(corpus(), Path(folder))
        return build_dimple_tokenizer(vocab_file, merges_file, model_max_length=512)


def build_processor(tokenizer=None) -> DimpleProcessor:
    # min = max = 84 x 84: the task's images keep their size, 9 vision tokens each.
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = DimpleImageProcessor(min_pixels=pixels, max_pixels=pixels)
    return DimpleProcessor(image_processor=image_processor, tokenizer=tokenizer or build_tokenizer())


def special_ids(tokenizer) -> dict:
    tokens = dict(
        pad_token_id=processing_dimple.PAD_TOKEN,
        bos_token_id=processing_dimple.BOS_TOKEN,
        eos_token_id=processing_dimple.EOS_TOKEN,
        mask_token_id=processing_dimple.MASK_TOKEN,
        image_token_id=processing_dimple.IMAGE_TOKEN,
        video_token_id=processing_dimple.VIDEO_TOKEN,
        vision_start_token_id=processing_dimple.VISION_START_TOKEN,
        vision_end_token_id=processing_dimple.VISION_END_TOKEN,
        vision_token_id=processing_dimple.VISION_PAD_TOKEN,
    )
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}


def build_config(tokenizer, **decoder_overrides) -> DimpleConfig:
    vocab_size = -(-len(tokenizer) // 64) * 64  # embedding rows padded to a multiple of 64, like Qwen's
    vision = dict(VISION, out_hidden_size=DECODER["hidden_size"])
    decoder = {**DECODER, **decoder_overrides}
    return DimpleConfig(vocab_size=vocab_size, vision_config=vision, **decoder, **special_ids(tokenizer))


def build_model(config: DimpleConfig) -> DimpleForConditionalGeneration:
    return DimpleForConditionalGeneration(config)


def generation_config(config: DimpleConfig) -> DimpleGenerationConfig:
    """Defaults for this model: greedy confident decoding with the prefill cache, one step per slot at most."""
    return DimpleGenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        steps=MAX_NEW_TOKENS,
        temperature=0.0,
        alg="maskgit_plus",
        alg_p_threshold=0.9,
        decoding_pipeline="dim",
        use_cache=True,
        mask_token_id=config.mask_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        # Answers end with `<|endoftext|>` (the pad id) or `<|im_end|>`: `generate` stops at either.
        eos_token_id=[config.pad_token_id, config.eos_token_id],
        decoding="diffusion",
    )


def describe_model(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    parts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    return f"{total / 1e6:.2f} M parameters ({json.dumps({k: round(v / 1e6, 3) for k, v in parts.items()})})"
