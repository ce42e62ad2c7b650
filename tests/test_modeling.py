"""Model core: configuration, state-dict layout, loading, attention semantics, M-RoPE, input errors."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import (
    REPO_ROOT,
    TEXT_VOCAB,
    image_block,
    left_pad,
    make_tiny_config,
    make_tiny_model,
    random_pixels,
)

from configuration_dimple import DimpleConfig, DimpleVisionConfig
from modeling_dimple import DimpleForConditionalGeneration, DimpleModel

# ----------------------------------------------------------------------------------------------- config


def released_config() -> DimpleConfig:
    return DimpleConfig.from_pretrained(REPO_ROOT)


def test_released_config_values():
    config = released_config()
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (152064, 3584, 18944)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (28, 28, 4)
    assert config.rope_parameters["rope_theta"] == 1e6
    assert config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert config.dtype == torch.bfloat16
    assert (config.mask_token_id, config.pad_token_id, config.image_token_id) == (151666, 151643, 151655)
    assert config.full_attn_mask is True and config.tie_word_embeddings is False
    vision = config.vision_config
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.out_hidden_size) == (32, 1280, 16, 3584)
    assert vision.fullatt_block_indexes == [7, 15, 23, 31]


def test_class_defaults_are_upstream_values():
    config = DimpleConfig()
    assert config.rope_parameters["rope_theta"] == 10000.0  # not the released 1e6: the class default upstream
    assert (config.vocab_size, config.hidden_size, config.num_key_value_heads) == (151936, 4096, 32)
    assert config.use_cache is False and config.sliding_window is None


def test_partial_vision_dict_is_completed_from_dimple_defaults():
    # The released file stores only the keys that differ from the vision defaults, tagged with model_type "dimple".
    config = DimpleConfig(vision_config={"model_type": "dimple", "in_chans": 3, "spatial_patch_size": 14})
    vision = config.vision_config
    assert isinstance(vision, DimpleVisionConfig)
    assert vision.hidden_size == 1280  # Qwen2.5-VL's own class would give 3584
    assert vision.tokens_per_second == 2 and vision.depth == 32 and vision.initializer_range == 0.02


def test_vision_config_as_instance_dict_or_none():
    instance = DimpleVisionConfig(depth=3)
    assert DimpleConfig(vision_config=instance).vision_config.depth == 3
    assert DimpleConfig(vision_config={"depth": 4}).vision_config.depth == 4
    assert DimpleConfig(vision_config=None).vision_config.depth == 32


def test_invalid_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="mrope_section"):
        make_tiny_config(mrope_section=[16, 24, 24])
    with pytest.raises(ValueError, match="num_heads"):
        DimpleVisionConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        make_tiny_config(num_key_value_heads=3)


@pytest.mark.parametrize("vocab_size, pad_token_id", [(250, 250), (200, 250), (256, -1)])
def test_pad_token_outside_the_vocabulary_is_refused_when_a_model_is_built(vocab_size, pad_token_id):
    # The embedding would fail with a bare AssertionError ("Padding_idx must be within num_embeddings"). The config
    # alone may hold it: transformers' tests set the pad id of such a config before building a model.
    config = make_tiny_config(vocab_size=vocab_size, pad_token_id=pad_token_id)
    message = f"pad_token_id \\({pad_token_id}\\) must be in \\[0, vocab_size = {vocab_size}\\)"
    with pytest.raises(ValueError, match=message):
        DimpleForConditionalGeneration(config)
    config.pad_token_id = 0
    assert DimpleForConditionalGeneration(config).get_input_embeddings().padding_idx == 0


# ------------------------------------------------------------------------------------------ state dict


def spec_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every key and shape of the released checkpoint, written out from the reference's section 2."""
    H, V, L, nH, nKV, hd, I = 3584, 152064, 28, 28, 4, 128, 18944
    Hv, Iv, Dv, Hm, Ho = 1280, 3420, 32, 5120, 3584
    shapes = {"visual.patch_embed.proj.weight": (Hv, 3, 2, 14, 14)}
    for i in range(Dv):
        b = f"visual.blocks.{i}."
        shapes.update({
            b + "norm1.weight": (Hv,), b + "norm2.weight": (Hv,),
            b + "attn.qkv.weight": (3 * Hv, Hv), b + "attn.qkv.bias": (3 * Hv,),
            b + "attn.proj.weight": (Hv, Hv), b + "attn.proj.bias": (Hv,),
            b + "mlp.gate_proj.weight": (Iv, Hv), b + "mlp.gate_proj.bias": (Iv,),
            b + "mlp.up_proj.weight": (Iv, Hv), b + "mlp.up_proj.bias": (Iv,),
            b + "mlp.down_proj.weight": (Hv, Iv), b + "mlp.down_proj.bias": (Hv,),
        })  # fmt: skip
    shapes.update({
        "visual.merger.ln_q.weight": (Hv,),
        "visual.merger.mlp.0.weight": (Hm, Hm), "visual.merger.mlp.0.bias": (Hm,),
        "visual.merger.mlp.2.weight": (Ho, Hm), "visual.merger.mlp.2.bias": (Ho,),
        "img_projector.linear_1.weight": (H, Ho), "img_projector.linear_1.bias": (H,),
        "img_projector.linear_2.weight": (H, H), "img_projector.linear_2.bias": (H,),
        "model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H),
    })  # fmt: skip
    for i in range(L):
        b = f"model.layers.{i}."
        shapes.update({
            b + "self_attn.q_proj.weight": (nH * hd, H), b + "self_attn.q_proj.bias": (nH * hd,),
            b + "self_attn.k_proj.weight": (nKV * hd, H), b + "self_attn.k_proj.bias": (nKV * hd,),
            b + "self_attn.v_proj.weight": (nKV * hd, H), b + "self_attn.v_proj.bias": (nKV * hd,),
            b + "self_attn.o_proj.weight": (H, nH * hd),
            b + "mlp.gate_proj.weight": (I, H), b + "mlp.up_proj.weight": (I, H), b + "mlp.down_proj.weight": (H, I),
            b + "input_layernorm.weight": (H,), b + "post_attention_layernorm.weight": (H,),
        })  # fmt: skip
    return shapes


def test_released_config_state_dict_matches_spec_exactly():
    with torch.device("meta"):
        model = DimpleForConditionalGeneration(released_config())
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = spec_state_dict_shapes()
    assert len(expected) == 733
    assert actual == expected
    assert sum(p.numel() for p in model.parameters()) == 8_317_863_936


def test_tiny_state_dict_has_the_same_key_pattern(tiny_model):
    def pattern(key):
        return ".".join("N" if part.isdigit() else part for part in key.split("."))

    released = {pattern(k) for k in spec_state_dict_shapes()}
    assert {pattern(k) for k in tiny_model.state_dict()} == released


# --------------------------------------------------------------------------------------------- forward


def text_ids(seed, length):
    return torch.randint(0, TEXT_VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def test_bidirectional_by_default_and_causal_when_disabled():
    for full, should_change in ((True, True), (False, False)):
        model = make_tiny_model(full_attn_mask=full)
        ids = text_ids(0, 8)
        edited = ids.clone()
        edited[0, -1] = (edited[0, -1] + 1) % TEXT_VOCAB
        with torch.no_grad():
            before = model(input_ids=ids).logits[0, :-1]
            after = model(input_ids=edited).logits[0, :-1]
        assert (not torch.allclose(before, after, atol=1e-6)) == should_change


@pytest.mark.parametrize("full_attn_mask", [True, False])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_left_padding_invariance_text(full_attn_mask, impl):
    model = make_tiny_model(full_attn_mask=full_attn_mask)
    model.set_attn_implementation(impl)
    rows = [text_ids(1, 9)[0].tolist(), text_ids(2, 4)[0].tolist(), text_ids(3, 6)[0].tolist()]
    ids, mask = left_pad(rows, model.config.pad_token_id)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        assert torch.isfinite(batched).all()  # padded rows see themselves: never NaN
        for b, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(batched[b, -len(row) :], alone, atol=1e-5, rtol=0)


def test_left_padding_invariance_with_images_of_different_sizes(tiny_model):
    config = tiny_model.config
    grids = [[1, 4, 4], [1, 4, 8], [1, 8, 4]]
    rows = [
        [5, 6] + image_block(config, grids[0]) + [7, 8, 9],
        [10] + image_block(config, grids[1]) + [11],
        [12, 13, 14, 15] + image_block(config, grids[2]) + [16, 17],
    ]
    pixels, grid = random_pixels(grids)
    ids, mask = left_pad(rows, config.pad_token_id)
    patches = grid.prod(-1).tolist()
    with torch.no_grad():
        batched = tiny_model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
        offset = 0
        for b, row in enumerate(rows):
            alone = tiny_model(
                input_ids=torch.tensor([row]),
                pixel_values=pixels[offset : offset + patches[b]],
                image_grid_thw=grid[b : b + 1],
            )
            offset += patches[b]
            torch.testing.assert_close(batched.logits[b, -len(row) :], alone.logits[0], atol=1e-5, rtol=0)
            assert batched.rope_deltas[b] == alone.rope_deltas[0] - (ids.shape[1] - len(row))


def test_images_change_the_output(tiny_model):
    config = tiny_model.config
    row = torch.tensor([[5] + image_block(config, [1, 4, 4]) + [6]])
    with torch.no_grad():
        one = tiny_model(input_ids=row, pixel_values=random_pixels([[1, 4, 4]], seed=0)[0],
                         image_grid_thw=torch.tensor([[1, 4, 4]])).logits  # fmt: skip
        two = tiny_model(input_ids=row, pixel_values=random_pixels([[1, 4, 4]], seed=1)[0],
                         image_grid_thw=torch.tensor([[1, 4, 4]])).logits  # fmt: skip
    assert not torch.allclose(one[0, -1], two[0, -1])


def test_video_input_runs_through_the_vision_tower(tiny_model):
    config = tiny_model.config
    grid = [2, 4, 4]  # two temporal patches (four frames)
    pixels, grid_t = random_pixels([grid])
    count = 2 * 4 * 4 // 4
    ids = torch.tensor([[5, config.vision_start_token_id] + [config.video_token_id] * count + [config.vision_end_token_id]])
    with torch.no_grad():
        out = tiny_model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid_t)
    assert out.logits.shape == (1, ids.shape[1], config.vocab_size)
    positions, _ = tiny_model.get_rope_index(ids, video_grid_thw=grid_t)
    assert positions[0, 0, 2:10].tolist() == [2] * 4 + [3] * 4  # temporal index advances per temporal patch


def test_precomputed_image_features_equal_pixel_path(tiny_model):
    config = tiny_model.config
    pixels, grid = random_pixels([[1, 4, 8]])
    ids = torch.tensor([[5] + image_block(config, [1, 4, 8]) + [6]])
    with torch.no_grad():
        direct = tiny_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
        features = torch.cat(tiny_model.get_image_features(pixels, grid).pooler_output)  # one tensor per image
        reused = tiny_model(input_ids=ids, image_features=features, image_grid_thw=grid).logits
    assert features.shape == (8, config.hidden_size)
    torch.testing.assert_close(direct, reused)


def test_logits_to_keep(tiny_model):
    ids = text_ids(4, 10)
    with torch.no_grad():
        full = tiny_model(input_ids=ids)
        last3 = tiny_model(input_ids=ids, logits_to_keep=3).logits
        picked = tiny_model(input_ids=ids, logits_to_keep=torch.tensor([0, 4])).logits
    torch.testing.assert_close(last3, full.logits[:, -3:])
    torch.testing.assert_close(picked, full.logits[:, [0, 4]])


def test_cached_suffix_matches_full_forward_in_causal_mode():
    """Causal attention makes prefix K/V exact, so prefix + cached suffix equals one full forward."""
    from transformers import DynamicCache

    model = make_tiny_model(full_attn_mask=False)
    ids = text_ids(5, 9)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = DynamicCache()
        first = model(input_ids=ids[:, :6], cache=cache, use_cache=True)
        rest = model(input_ids=ids[:, 6:], cache=cache, use_cache=True, rope_deltas=first.rope_deltas)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=0)


def test_eager_matches_sdpa_and_returns_attentions(tiny_model):
    config = tiny_model.config
    pixels, grid = random_pixels([[1, 4, 4]])
    ids, mask = left_pad([[5] + image_block(config, [1, 4, 4]) + [6], [7, 8]], config.pad_token_id)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
    with torch.no_grad():
        sdpa = tiny_model(**inputs).logits
        tiny_model.set_attn_implementation("eager")
        eager = tiny_model(**inputs, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(eager.logits, sdpa, atol=1e-5, rtol=0)
    assert len(eager.attentions) == config.num_hidden_layers
    assert len(eager.hidden_states) == config.num_hidden_layers + 1
    # Real tokens give zero weight to padding; padded rows attend only to themselves.
    weights = eager.attentions[0][1]
    assert weights[:, -2:, : ids.shape[1] - 2].abs().max() == 0
    assert torch.allclose(weights[:, 0, 0], torch.ones(()))


def test_get_rope_index_worked_example(tiny_model):
    """[A, VS, I, I, I, I, VE, Z] with one 2x2 merged image (spec 3.6), plus a left-padded copy."""
    c = tiny_model.config
    row = [1, c.vision_start_token_id] + [c.image_token_id] * 4 + [c.vision_end_token_id, 2]
    ids, mask = left_pad([row, [3, 4]], c.pad_token_id)
    grid = torch.tensor([[1, 4, 4]])
    positions, deltas = tiny_model.get_rope_index(ids, grid, attention_mask=mask)
    assert positions[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 4, 5],
        [0, 1, 2, 2, 3, 3, 4, 5],
        [0, 1, 2, 3, 2, 3, 4, 5],
    ]
    assert positions[:, 1].tolist() == [[1] * 6 + [0, 1]] * 3  # padding sits at 1
    assert deltas.tolist() == [[-2], [2 - 8]]


def test_forward_computes_rope_positions_itself(tiny_model):
    config = tiny_model.config
    pixels, grid = random_pixels([[1, 8, 4]])
    ids = torch.tensor([[5] + image_block(config, [1, 8, 4]) + [6, 7]])
    with torch.no_grad():
        implicit = tiny_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
        positions, deltas = tiny_model.get_rope_index(ids, grid)
        explicit = tiny_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, position_ids=positions)
        flat = tiny_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                          position_ids=torch.arange(ids.shape[1])[None, None].expand(3, 1, -1))  # fmt: skip
    torch.testing.assert_close(implicit.logits, explicit.logits)
    assert not torch.allclose(implicit.logits, flat.logits)
    assert torch.equal(implicit.rope_deltas, deltas)


def test_next_token_loss_and_empty_batch(tiny_model):
    ids = text_ids(6, 8)
    labels = ids.clone()
    labels[:, :3] = -100
    out = tiny_model(input_ids=ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    empty = tiny_model(input_ids=ids, labels=torch.full_like(ids, -100))
    assert empty.loss.item() == 0.0
    empty.loss.backward()  # a valid graph, not NaN


# ------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_raise_clear_errors(tiny_model):
    config = tiny_model.config
    pixels, grid = random_pixels([[1, 4, 4]])
    ids = torch.tensor([[5] + image_block(config, [1, 4, 4]) + [6]])
    too_few = torch.tensor([[5, config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]])
    with pytest.raises(ValueError, match="placeholder tokens"):
        tiny_model(input_ids=too_few, pixel_values=pixels, image_grid_thw=grid)
    with pytest.raises(ValueError, match="image_grid_thw"):
        tiny_model(input_ids=ids, pixel_values=pixels)
    with pytest.raises(ValueError, match="expected \\(1, 8\\)"):
        tiny_model(input_ids=ids, attention_mask=torch.ones(2, ids.shape[1]))
    with pytest.raises(ValueError, match="2-D"):
        tiny_model(input_ids=ids, attention_mask=torch.ones(1, 1, ids.shape[1]))
    with pytest.raises(ValueError, match="patches"):
        tiny_model(input_ids=ids, pixel_values=pixels[:-1], image_grid_thw=grid)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model()
    with pytest.raises(ValueError, match="attn_implementation"):
        DimpleForConditionalGeneration._from_config(make_tiny_config(), attn_implementation="bogus")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(input_ids=torch.tensor([[5, 300, 6]])), ValueError, "token id 300, outside the model's vocabulary"),
        (dict(input_ids=torch.tensor([[5, -1, 6]])), ValueError, "token id -1"),
        (dict(input_ids=torch.tensor([[5.0, 6.0]])), TypeError, "integer token ids"),
        (dict(image_grid_thw=torch.tensor([[0, 4, 4]])), ValueError, "positive"),
        (dict(image_grid_thw=torch.tensor([[1, -4, -4]])), ValueError, "positive"),
        (dict(image_grid_thw=torch.tensor([[1.0, 4.0, 4.0]])), TypeError, "integer torch.Tensor"),
        (dict(image_grid_thw=torch.tensor([[1, 1, 16]])), ValueError, "multiples of 2"),
        (dict(image_grid_thw=torch.tensor([[4, 2, 2]])), ValueError, "t = 1"),
        (dict(pixel_values=torch.randn(16, 100)), ValueError, "expected \\(16, 1176\\)"),
        (dict(pixel_values=torch.full((16, 1176), float("nan"))), ValueError, "NaN"),
        (dict(pixel_values=np.zeros((16, 1176), dtype=np.float32)), TypeError, "float torch.Tensor"),
    ],
)
def test_malformed_model_inputs_raise_before_any_work(tiny_model, change, error, match):
    config = tiny_model.config
    pixels, grid = random_pixels([[1, 4, 4]])
    inputs = dict(input_ids=torch.tensor([[5] + image_block(config, [1, 4, 4]) + [6]]), pixel_values=pixels,
                  image_grid_thw=grid)  # fmt: skip
    inputs.update(change)
    calls = []
    hook = tiny_model.visual.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(error, match=match):
            tiny_model(**inputs)
    finally:
        hook.remove()
    if "image_grid_thw" in change or "pixel_values" in change:
        assert calls == []  # checked before the vision tower runs


@pytest.mark.parametrize("mask", [[1, 2, 1, 1], [1, 0.5, 1, 1], [-1, 1, 1, 1]], ids=["two", "half", "minus-one"])
@pytest.mark.parametrize("entry", ["forward", "generate", "diffusion_generate"])
def test_attention_mask_values_other_than_0_and_1_are_refused(tiny_model, entry, mask):
    ids = torch.tensor([[5, 6, 7, 8]])
    call = tiny_model if entry == "forward" else getattr(tiny_model, entry)
    options = {} if entry == "forward" else dict(max_new_tokens=2)
    with pytest.raises(ValueError, match="`attention_mask` must hold only 1 \\(real token\\) and 0 \\(padding\\)"):
        call(input_ids=ids, attention_mask=torch.tensor([mask]), **options)


def test_boolean_and_float_0_1_attention_masks_are_accepted(tiny_model):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        reference = tiny_model(input_ids=ids[:, 1:]).logits[:, -1]
        for mask in (torch.tensor([[False, True, True, True]]), torch.tensor([[0.0, 1.0, 1.0, 1.0]])):
            torch.testing.assert_close(tiny_model(input_ids=ids, attention_mask=mask).logits[:, -1], reference)


@pytest.mark.parametrize("grid", [[[0, 4, 4]], [[1, -4, -4]], [[1, 0, 4]]], ids=["zero-t", "negative", "zero-h"])
@pytest.mark.parametrize("entry", ["get_rope_index", "forward_with_features", "generate", "diffusion_generate"])
def test_non_positive_grids_are_refused_where_positions_are_computed_first(tiny_model, entry, grid):
    # These paths reach `get_rope_index` before the vision tower checks the grid.
    config = tiny_model.config
    pixels, _ = random_pixels([[1, 4, 4]])
    ids = torch.tensor([[5] + image_block(config, [1, 4, 4]) + [6]])
    grid = torch.tensor(grid)
    features = torch.zeros(4, 32)
    calls = {
        "get_rope_index": lambda: tiny_model.get_rope_index(ids, grid),
        "forward_with_features": lambda: tiny_model(input_ids=ids, image_features=features, image_grid_thw=grid),
        "generate": lambda: tiny_model.generate(ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=2),
        "diffusion_generate": lambda: tiny_model.diffusion_generate(
            ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=2, steps=2
        ),
    }
    with pytest.raises(ValueError, match="`image_grid_thw` must be \\[images, 3\\] rows of positive"):
        calls[entry]()


# ----------------------------------------------------------------------------------- save and reload

RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModel
    results = {}
    for name in sys.argv[1:]:
        model = AutoModel.from_pretrained(name, trust_remote_code=True).eval()
        ids = torch.arange(3, 12)[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        results[name] = {
            "class": type(model).__name__,
            "dtype": str(model.dtype),
            "logits": logits.float().flatten().tolist(),
            "inv_freq": model.model.rotary_emb.inv_freq.tolist(),
            "vision_inv_freq": model.visual.rotary_pos_emb.inv_freq.tolist(),
        }
    print("RESULT" + json.dumps(results))
    """
)


def child_env_for_identical_sums() -> dict:
    """What a child process needs to sum in this process's order: a float sum's rounding depends on the threads that
    split it and on the CPU kernels (AVX2, AVX-512...) torch picked, so bit-identity holds only when both match."""
    env = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    # USE_HUB_KERNELS: without the `kernels` package, transformers >= 5.25 loads only with USE_HUB_KERNELS=NO.
    env.update({name: os.environ[name] for name in ("ATEN_CPU_CAPABILITY", "USE_HUB_KERNELS") if name in os.environ})
    return env


def test_save_and_reload_in_a_fresh_offline_process(tmp_path):
    model = make_tiny_model()
    plain, legacy, bf16 = tmp_path / "plain", tmp_path / "legacy", tmp_path / "bf16"
    model.save_pretrained(plain)
    model.save_pretrained(legacy)
    config = json.loads((legacy / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_dimple.DimpleForConditionalGeneration"
    # The released checkpoint names the old class in its auto_map and stores a diff-style vision config.
    config["auto_map"]["AutoModel"] = "modeling_dimple.DimpleModel"
    config["architectures"] = ["DimpleModel"]
    (legacy / "config.json").write_text(json.dumps(config))
    make_tiny_model().to(torch.bfloat16).save_pretrained(bf16)

    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **child_env_for_identical_sums()}
    run = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(plain), str(legacy), str(bf16)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.split("RESULT", 1)[1])

    ids = torch.arange(3, 12)[None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits.flatten()
        expected_bf16 = model.to(torch.bfloat16)(input_ids=ids).logits.float().flatten()
    assert torch.equal(torch.tensor(results[str(plain)]["logits"]), expected)  # bit-identical
    assert torch.equal(torch.tensor(results[str(legacy)]["logits"]), expected)
    assert results[str(legacy)]["class"] == "DimpleForConditionalGeneration"
    assert results[str(bf16)]["dtype"] == "torch.bfloat16"
    # bf16 CPU kernels may accumulate in another order across processes: compare at bf16 resolution.
    torch.testing.assert_close(torch.tensor(results[str(bf16)]["logits"]), expected_bf16, atol=2e-3, rtol=1e-2)
    # Rotary tables are recomputed after meta-device construction (LM: theta 1e6, head_dim 8; ViT: theta 1e4).
    lm_dim, vit_dim = 8, 8 // 2
    assert results[str(plain)]["inv_freq"] == pytest.approx((1e6 ** (-torch.arange(0, lm_dim, 2) / lm_dim)).tolist())
    assert results[str(plain)]["vision_inv_freq"] == pytest.approx(
        (1e4 ** (-torch.arange(0, vit_dim, 2) / vit_dim)).tolist()
    )


def test_dimple_model_alias():
    assert DimpleModel is DimpleForConditionalGeneration


def test_device_map_auto_offload_splits_the_model(tmp_path):
    from transformers import AutoModel

    model = make_tiny_model()
    model.save_pretrained(tmp_path / "m")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    split = AutoModel.from_pretrained(
        tmp_path / "m", trust_remote_code=True, device_map="auto",
        max_memory={"cpu": size // 2}, offload_folder=str(tmp_path / "offload"),
    )  # fmt: skip
    assert {"cpu", "disk"} <= set(split.hf_device_map.values())
    ids = text_ids(7, 6)
    with torch.no_grad():
        torch.testing.assert_close(split(input_ids=ids).logits, model(input_ids=ids).logits)


# ----------------------------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_bf16_sdpa_matches_fp32_on_gpu():
    model = make_tiny_model(hidden_size=256, intermediate_size=512, num_attention_heads=4, mrope_section=[8, 12, 12])
    model = model.cuda()
    ids = text_ids(8, 64).cuda()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        low = model.to(torch.bfloat16)(input_ids=ids).logits.float()
    assert (low - reference).abs().max() < 0.05 * reference.abs().max()
