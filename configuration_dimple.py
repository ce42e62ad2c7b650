"""Configuration classes for Dimple, a discrete-diffusion multimodal LLM (arXiv 2505.16990).

Dimple = the Qwen2.5-VL-7B vision tower + a two-layer MLP projector + the Dream-v0-7B decoder (Qwen2.5-7B shaped,
bidirectional attention, multimodal RoPE). Both classes build on transformers' Qwen2.5-VL configs, whose decoder and
vision tower Dimple reuses unchanged.
"""

# Importing the compat module checks the installed transformers version, before anything else can fail on a release
# this package does not support (this is the first Dimple module a loader imports).
try:
    from .transformers_compat import CACHE_NAME
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from transformers_compat import CACHE_NAME

from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig  # noqa: E402


class DimpleVisionConfig(Qwen2_5_VLVisionConfig):
    r"""
    Vision tower configuration. Every default is the Dimple-7B (= Qwen2.5-VL-7B) value.

    The released `config.json` stores the nested vision config as a diff against these defaults, so absent keys
    must be filled from here and never from another class (Qwen2.5-VL's own class defaults `hidden_size` to 3584).
    Unknown legacy keys (`spatial_patch_size`, `in_chans`, ...) are accepted and ignored.

    Args:
        depth (`int`, defaults to 32): number of ViT blocks.
        hidden_size (`int`, defaults to 1280): ViT width (head_dim = hidden_size / num_heads = 80).
        hidden_act (`str`, defaults to `"silu"`): activation of the ViT SwiGLU MLP.
        intermediate_size (`int`, defaults to 3420): ViT MLP inner width.
        num_heads (`int`, defaults to 16): ViT attention heads.
        in_channels (`int`, defaults to 3): image channels.
        patch_size (`int`, defaults to 14): spatial patch size in pixels.
        spatial_merge_size (`int`, defaults to 2): 2x2 patches merge into one LLM token.
        temporal_patch_size (`int`, defaults to 2): frames per temporal patch (a still image is duplicated).
        tokens_per_second (`int`, defaults to 2): stored for compatibility, unused.
        window_size (`int`, defaults to 112): window-attention size in pixels.
        out_hidden_size (`int`, defaults to 3584): merger output width (= the LM hidden size).
        fullatt_block_indexes (`list[int]`, defaults to `[7, 15, 23, 31]`): blocks with full per-image attention.
        initializer_range (`float`, defaults to 0.02): std of the normal initialiser.
    """

    model_type = "dimple_vision"
    base_config_key = "vision_config"

    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: list[int] | tuple[int, ...] = (7, 15, 23, 31)
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # Released checkpoints tag the nested dict with the parent's model_type; it carries no information.
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        self.fullatt_block_indexes = list(self.fullatt_block_indexes)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision_config.hidden_size ({self.hidden_size}) must be divisible by vision_config.num_heads "
                f"({self.num_heads})."
            )


# The Auto classes that load this package's classes from a saved folder (`trust_remote_code=True`): those
# transformers registers Qwen2.5-VL under (AutoModel, AutoModelForImageTextToText), so pipelines find the model.
AUTO_MAP = {
    "AutoConfig": "configuration_dimple.DimpleConfig",
    "AutoModel": "modeling_dimple.DimpleForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_dimple.DimpleForConditionalGeneration",
}


class DimpleConfig(Qwen2_5_VLTextConfig):
    r"""
    Configuration of [`DimpleForConditionalGeneration`]. Class defaults follow the upstream code; the released
    Dimple-7B values (vocab 152064, hidden 3584, 28 layers, 28 heads, 4 KV heads, rope_theta 1e6) are in the
    repository's `config.json`.

    Decoder fields (`vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads`,
    `num_key_value_heads`, `hidden_act`, `max_position_embeddings`, `rms_norm_eps`, `rope_theta`/`rope_scaling`,
    `attention_dropout`, ...) mean what they mean for Qwen2. Dimple's own fields:

    Args:
        vision_config (`dict` or `DimpleVisionConfig`, *optional*): the vision tower; `None` gives the 7B tower and a
            partial dict is completed from the [`DimpleVisionConfig`] defaults.
        mrope_section (`list[int]`, defaults to `[16, 24, 24]`): (t, h, w) split of the rotary frequency pairs.
        full_attn_mask (`bool`, defaults to `True`): bidirectional attention (inference and diffusion training);
            `False` gives causal attention (the autoregressive training stages).
        mask_token_id (`int`, defaults to 151666): `<|mask|>`, the diffusion mask token.
        image_token_id / video_token_id (`int`): `<|image_pad|>` / `<|video_pad|>` placeholders.
        vision_start_token_id / vision_end_token_id / vision_token_id (`int`): `<|vision_start|>`,
            `<|vision_end|>`, `<|vision_pad|>`.
    """

    model_type = "dimple"
    sub_configs_defaults = {"vision_config": DimpleVisionConfig}
    keys_to_ignore_at_inference = [CACHE_NAME]  # the output's cache field, which Trainer's evaluation drops
    default_theta = 10000.0

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    tie_word_embeddings: bool = False
    use_sliding_window: bool | None = False
    sliding_window: int | None = 4096
    max_window_layers: int | None = 28
    attention_dropout: float | int | None = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = 151643

    vision_config: dict | DimpleVisionConfig | None = None
    mrope_section: list[int] | tuple[int, ...] = (16, 24, 24)
    full_attn_mask: bool = True
    mask_token_id: int = 151666
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654

    def __post_init__(self, **kwargs):
        self.mrope_section = list(self.mrope_section)
        super().__post_init__(**kwargs)
        # Every saved config names this package's classes (a released config names upstream's `DimpleModel`).
        self.auto_map = {**(getattr(self, "auto_map", None) or {}), **AUTO_MAP}
        # The decoder's rotary module reads the split from rope_parameters.
        self.rope_parameters["mrope_section"] = self.mrope_section
        head_dim = self.hidden_size // self.num_attention_heads
        if 2 * sum(self.mrope_section) != head_dim:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {head_dim // 2} "
                f"(hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads} / 2)."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )

    def check_pad_token_in_vocabulary(self) -> None:
        """The embedding keeps row `pad_token_id` for padding, so it must be one of the `vocab_size` rows.

        Checked when a model is built from the config, not in `__post_init__`: transformers' own tests build configs
        with a small vocabulary and the default pad id, then set the pad id before building a model.
        """
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id ({self.pad_token_id}) must be in [0, vocab_size = {self.vocab_size}); raise vocab_size "
                "to cover the tokenizer (len(tokenizer)) or set pad_token_id to the tokenizer's pad id."
            )

    @property
    def text_config(self):
        # Generation utilities (`DynamicCache(config=...)`) look for the decoder's config here.
        return self


__all__ = ["AUTO_MAP", "DimpleConfig", "DimpleVisionConfig"]
