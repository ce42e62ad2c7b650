"""What transformers' common model and generation tests expect of a model, checked on Dimple.

Cache reuse across calls (multi-turn chat, assisted decoding), `inputs_embeds`, the feature-extraction API, the
config's output flags, packed (padding-free) sequences and `shift_labels`.
"""

import collections
import functools

import pytest
import torch
from conftest import TEXT_VOCAB, image_block, left_pad, make_tiny_model, random_pixels

from transformers_compat import MULTIMODAL_OUTPUTS, BaseModelOutputWithPooling, cache_kwarg, output_cache

GRID = (1, 4, 6)  # one image: 24 patches, 6 placeholder tokens


def text(start, count):
    return [(start + 7 * i) % TEXT_VOCAB for i in range(count)]


def image_prompt(config):
    return text(1, 5) + image_block(config, GRID) + text(40, 4)


def greedy(model, ids, **kwargs):
    settings = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
    return model.generate(ids, **{**settings, **kwargs})


# ---------------------------------------------------------------------------------------- cache reuse


def test_multi_turn_chat_reuses_the_first_turns_cache_with_its_image():
    model = make_tiny_model(full_attn_mask=False)  # causal: a reused cache gives exactly the recomputed answer
    pixels, grid = random_pixels([GRID])
    first_turn = torch.tensor([image_prompt(model.config)])
    first = greedy(model, first_turn, pixel_values=pixels, image_grid_thw=grid, return_dict_in_generate=True)
    second_turn = torch.cat([first.sequences, torch.tensor([text(90, 6)])], dim=1)
    cache = output_cache(first)
    cached_length = cache.get_seq_length()
    assert 0 < cached_length < second_turn.shape[1]

    reused = greedy(model, second_turn, pixel_values=pixels, image_grid_thw=grid, **cache_kwarg(cache))
    fresh = greedy(model, second_turn, pixel_values=pixels, image_grid_thw=grid)
    assert torch.equal(reused, fresh)


def test_text_only_generation_continues_from_a_cache():
    model = make_tiny_model(full_attn_mask=False)
    ids = torch.tensor([text(3, 8)])
    first = greedy(model, ids, return_dict_in_generate=True)
    cache = output_cache(first)
    follow_up = torch.cat([first.sequences, torch.tensor([text(60, 3)])], dim=1)
    assert torch.equal(greedy(model, follow_up, **cache_kwarg(cache)), greedy(model, follow_up))


def test_assisted_decoding_with_the_model_as_its_own_assistant_equals_greedy():
    model = make_tiny_model(full_attn_mask=False)
    assistant = make_tiny_model(seed=1, full_attn_mask=False)
    pixels, grid = random_pixels([GRID])
    ids = torch.tensor([image_prompt(model.config)])
    plain = greedy(model, ids, pixel_values=pixels, image_grid_thw=grid)
    assisted = greedy(model, ids, pixel_values=pixels, image_grid_thw=grid, assistant_model=assistant)
    assert torch.equal(plain, assisted)


# --------------------------------------------------------------------------------------- inputs_embeds


@pytest.mark.parametrize("with_image", [False, True])
def test_inputs_embeds_give_the_input_ids_logits(tiny_model, with_image):
    ids = torch.tensor([image_prompt(tiny_model.config) if with_image else text(2, 12)])
    visual = dict(zip(("pixel_values", "image_grid_thw"), random_pixels([GRID]))) if with_image else {}
    embeds = tiny_model.get_input_embeddings()(ids)
    with torch.no_grad():
        from_ids = tiny_model(input_ids=ids, **visual)
        from_embeds = tiny_model(inputs_embeds=embeds, **visual)
    torch.testing.assert_close(from_embeds.logits, from_ids.logits)
    assert torch.equal(from_embeds.rope_deltas, from_ids.rope_deltas)


@pytest.mark.parametrize("with_image", [False, True])
def test_generate_from_inputs_embeds_continues_like_from_input_ids(with_image):
    model = make_tiny_model(full_attn_mask=False)
    ids = torch.tensor([image_prompt(model.config) if with_image else text(2, 12)])
    visual = dict(zip(("pixel_values", "image_grid_thw"), random_pixels([GRID]))) if with_image else {}
    from_ids = greedy(model, ids, **visual)[:, ids.shape[1] :]
    from_embeds = greedy(model, None, inputs_embeds=model.get_input_embeddings()(ids), **visual)
    assert torch.equal(from_embeds[:, -from_ids.shape[1] :], from_ids)


def test_beam_search_from_inputs_embeds_with_an_image_equals_beam_search_from_input_ids():
    model = make_tiny_model(full_attn_mask=False)
    ids = torch.tensor([image_prompt(model.config)])
    visual = dict(zip(("pixel_values", "image_grid_thw"), random_pixels([GRID])))
    beams = dict(num_beams=2, num_return_sequences=2)
    from_ids = greedy(model, ids, **visual, **beams)[:, ids.shape[1] :]
    # No ids at all: the image blocks that beam expansion repeats are found in the embeddings.
    from_embeds = greedy(model, None, inputs_embeds=model.get_input_embeddings()(ids), **visual, **beams)
    assert from_ids.shape[0] == 2
    assert torch.equal(from_embeds[:, -from_ids.shape[1] :], from_ids)


# ------------------------------------------------------------------------------------------- placeholders


def test_forward_embeds_placeholder_ids_without_pixels_as_text(tiny_model):
    # transformers' Qwen2.5-VL does the same, and its common tests pad batches with random ids that include them.
    ids = torch.tensor([image_prompt(tiny_model.config)])
    with torch.no_grad():
        from_ids = tiny_model(input_ids=ids).logits
        as_text = tiny_model(inputs_embeds=tiny_model.get_input_embeddings()(ids)).logits
        with_image = tiny_model(input_ids=ids, **dict(zip(("pixel_values", "image_grid_thw"), random_pixels([GRID]))))
    torch.testing.assert_close(from_ids, as_text)
    assert not torch.allclose(with_image.logits, from_ids)


@pytest.mark.parametrize("entry", ["generate", "diffusion_generate"])
@pytest.mark.parametrize("kind", ["image", "video"])
def test_user_entry_points_refuse_placeholders_without_pixels(tiny_model, entry, kind):
    config = tiny_model.config
    token_id = config.image_token_id if kind == "image" else config.video_token_id
    ids = torch.tensor([text(1, 3) + [config.vision_start_token_id, token_id, config.vision_end_token_id]])
    pixels_name = "pixel_values" if kind == "image" else "pixel_values_videos"
    with pytest.raises(ValueError, match=f"{kind} placeholder tokens \\(id {token_id}\\) but no `{pixels_name}`"):
        getattr(tiny_model, entry)(ids, max_new_tokens=2)
    # A lone placeholder id, not opened by <|vision_start|> (a sampled token in a continued chat), stays text.
    lone = torch.tensor([text(1, 3) + [token_id, config.vision_end_token_id]])
    assert getattr(tiny_model, entry)(lone, max_new_tokens=2).shape == (1, lone.shape[1] + 2)


# ----------------------------------------------------------------------------------- feature extraction


def test_get_image_features_returns_per_image_projected_features_and_tower_outputs(tiny_model):
    pixels, grid = random_pixels([GRID, (1, 2, 2)])
    out = tiny_model.get_image_features(pixels, grid, output_hidden_states=True)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert [f.shape for f in out.pooler_output] == [(6, 32), (1, 32)]  # t*h*w/4 rows each, decoder width 32
    assert out.last_hidden_state.shape == (28, 16)  # the tower's per-patch states (vision width 16)
    assert len(out.hidden_states) == tiny_model.config.vision_config.depth + 1
    # The features are what the forward writes into the placeholder slots.
    ids = torch.tensor([image_block(tiny_model.config, GRID) + image_block(tiny_model.config, (1, 2, 2))])
    with torch.no_grad():
        direct = tiny_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
        precomputed = tiny_model(input_ids=ids, image_features=torch.cat(out.pooler_output), image_grid_thw=grid)
    torch.testing.assert_close(precomputed.logits, direct)


@pytest.mark.parametrize("getter", ["get_image_features", "get_video_features"])
@pytest.mark.parametrize("where", ["argument", "config"])
def test_feature_getters_return_a_tuple_without_return_dict(getter, where):
    model = make_tiny_model(**({"return_dict": False} if where == "config" else {}))
    pixels, grid = random_pixels([(2, 4, 6)] if getter == "get_video_features" else [GRID])
    with torch.no_grad():
        out = getattr(model, getter)(pixels, grid, **({"return_dict": False} if where == "argument" else {}))
        as_dict = getattr(model, getter)(pixels, grid, return_dict=True)
    assert isinstance(out, tuple) and isinstance(as_dict, BaseModelOutputWithPooling)
    last_hidden_state, pooler_output = out[:2]
    torch.testing.assert_close(last_hidden_state, as_dict.last_hidden_state)
    torch.testing.assert_close(torch.cat(pooler_output), torch.cat(as_dict.pooler_output))


# ------------------------------------------------------------------------------------------ output flags


def test_config_output_flags_apply_when_the_call_does_not_set_them():
    model = make_tiny_model(output_hidden_states=True, output_attentions=True, attn_implementation="eager")
    ids = torch.tensor([text(5, 6)])
    with torch.no_grad():
        out = model(input_ids=ids)
        off = model(input_ids=ids, output_hidden_states=False, output_attentions=False)
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    assert off.hidden_states is None and off.attentions is None


@pytest.mark.parametrize("return_dict", [None, True, False])
def test_config_return_dict_false_gives_a_tuple_unless_the_call_asks_for_the_output_object(return_dict):
    # The decoder shares the config: its own output must not turn into a tuple too.
    model = make_tiny_model(return_dict=False)
    ids = torch.tensor([text(5, 6)])
    with torch.no_grad():
        out = model(input_ids=ids, return_dict=return_dict)
        reference = make_tiny_model()(input_ids=ids).logits
    logits = out.logits if return_dict else out[0]
    assert isinstance(out, tuple) != bool(return_dict)
    torch.testing.assert_close(logits, reference)


# ------------------------------------------------------------------------------------- packed sequences


@pytest.mark.parametrize("full_attn_mask", [True, False])
def test_packed_sequences_give_the_padded_batch_logits(full_attn_mask):
    model = make_tiny_model(full_attn_mask=full_attn_mask)
    rows = [image_prompt(model.config), text(9, 7), text(30, 11)]
    pixels, grid = random_pixels([GRID])
    padded_ids, mask = left_pad(rows, pad_id=model.config.pad_token_id)
    with torch.no_grad():
        padded = model(input_ids=padded_ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
        # Padding-free: one row, positions restarting at 0 for each sequence (as DataCollatorWithFlattening does).
        positions = torch.cat([model.get_rope_index(torch.tensor([row]), grid if i == 0 else None)[0]
                               for i, row in enumerate(rows)], dim=2)  # fmt: skip
        packed_ids = torch.tensor([sum(rows, [])])
        packed = model(input_ids=packed_ids, position_ids=positions, pixel_values=pixels, image_grid_thw=grid)
    expected = torch.cat([padded.logits[b, mask[b].bool()] for b in range(len(rows))])
    torch.testing.assert_close(packed.logits[0], expected, atol=1e-5, rtol=1e-4)


def test_packed_text_positions_may_be_two_dimensional(tiny_model):
    rows = [text(1, 5), text(20, 4)]
    positions = torch.tensor([[*range(5), *range(4)]])
    with torch.no_grad():
        packed = tiny_model(input_ids=torch.tensor([sum(rows, [])]), position_ids=positions).logits[0]
        alone = [tiny_model(input_ids=torch.tensor([row])).logits[0] for row in rows]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ shift_labels


def test_shift_labels_give_the_labels_loss(tiny_model):
    ids = torch.tensor([text(4, 10), text(8, 10)])
    labels = ids.clone()
    labels[:, :4] = -100
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    with torch.no_grad():
        from_labels = tiny_model(input_ids=ids, labels=labels).loss
        from_shifted = tiny_model(input_ids=ids, shift_labels=shifted).loss
        by_hand = torch.nn.functional.cross_entropy(
            tiny_model(input_ids=ids).logits.flatten(0, 1), shifted.flatten(), ignore_index=-100
        )
    torch.testing.assert_close(from_shifted, from_labels)
    torch.testing.assert_close(from_shifted, by_hand)


# ------------------------------------------------------------------------------- static cache, compiled decoding


@pytest.mark.parametrize("full_attn_mask", [False, True], ids=["causal", "bidirectional"])
def test_autoregressive_decoding_with_a_static_cache_gives_the_dynamic_cache_answers(full_attn_mask):
    model = make_tiny_model(full_attn_mask=full_attn_mask)
    pixels, grid = random_pixels([GRID, GRID])
    ids, mask = left_pad([image_prompt(model.config), text(7, 3) + image_block(model.config, GRID)], pad_id=0)
    inputs = dict(attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, decoding="autoregressive")
    dynamic = greedy(model, ids, max_new_tokens=8, **inputs)
    static = greedy(model, ids, max_new_tokens=8, cache_implementation="static", **inputs)
    assert torch.equal(static, dynamic)


def test_compiled_static_cache_decoding_has_no_graph_break_and_gives_the_eager_answers():
    from transformers import CompileConfig

    model = make_tiny_model(full_attn_mask=False)
    ids, mask = left_pad([text(3, 9), text(5, 6)], pad_id=0)
    eager = greedy(model, ids, attention_mask=mask, max_new_tokens=6, decoding="autoregressive")
    compile_config = CompileConfig(fullgraph=True)  # a graph break in the forward raises instead of splitting it
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=False):
        compiled = greedy(
            model, ids, attention_mask=mask, max_new_tokens=6, decoding="autoregressive",
            cache_implementation="static", compile_config=compile_config,
        )  # fmt: skip
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decoding steps did run compiled
    assert torch.equal(compiled, eager)


# ------------------------------------------------------------------------------- checks at the doors


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("entry", ["generate", "diffusion_generate"])
def test_input_values_are_checked_once_per_call_not_at_every_step(monkeypatch, tiny_model, entry, use_cache):
    """The host-syncing checks (ids inside the vocabulary, a 0/1 mask) and the search for packed sequences run at the
    call's door only, also without a cache, where every pass of the loop is a sequence's first pass."""
    import input_checks_dimple
    import modeling_dimple

    calls = []
    for module in (modeling_dimple, input_checks_dimple):
        for name in ("check_attention_mask_values", "check_token_ids", "packed_sequence_ids"):
            if hasattr(module, name):
                counted = functools.partial(count_call, calls, name, getattr(module, name))
                monkeypatch.setattr(module, name, counted)
    ids, mask = left_pad([text(3, 9), text(5, 6)], pad_id=0)
    counts = []
    for tokens in (2, 8):
        calls.clear()
        if entry == "generate":
            greedy(tiny_model, ids, attention_mask=mask, max_new_tokens=tokens, decoding="autoregressive",
                   use_cache=use_cache)  # fmt: skip
        else:
            tiny_model.diffusion_generate(
                ids, attention_mask=mask, max_new_tokens=tokens, steps=tokens, use_cache=use_cache
            )
        counts.append(collections.Counter(calls))
    # Checked, as often for 8 steps as for 2, and no pass looked for packing (the loops pass a mask).
    assert counts[0] == counts[1] and counts[0]["check_token_ids"] and counts[0]["check_attention_mask_values"]
    assert "packed_sequence_ids" not in counts[0]


def count_call(calls: list, name: str, function, *args):
    calls.append(name)
    return function(*args)


def test_attention_kind_is_set_once_in_the_config_and_every_layer(tiny_model):
    causal = make_tiny_model(full_attn_mask=False)
    assert [layer.self_attn.is_causal for layer in causal.model.layers] == [True, True]
    assert [layer.self_attn.is_causal for layer in tiny_model.model.layers] == [False, False]
    ids = torch.tensor([text(3, 6)])
    with torch.no_grad():
        bidirectional_logits = tiny_model(input_ids=ids).logits
        tiny_model.set_attention_kind(bidirectional=False)
        assert tiny_model.config.full_attn_mask is False
        assert [layer.self_attn.is_causal for layer in tiny_model.model.layers] == [True, True]
        torch.testing.assert_close(tiny_model(input_ids=ids).logits, causal(input_ids=ids).logits)
        tiny_model.set_attention_kind(bidirectional=True)
        torch.testing.assert_close(tiny_model(input_ids=ids).logits, bidirectional_logits)


@pytest.mark.skipif(not MULTIMODAL_OUTPUTS, reason="transformers <= 5.23 has no multimodal output classes")
def test_outputs_carry_the_vision_towers_output_of_the_images_they_encoded(tiny_model):
    pixels, grid = random_pixels([GRID])
    ids = torch.tensor([image_prompt(tiny_model.config)])
    with torch.no_grad():
        out = tiny_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, output_hidden_states=True)
        features = tiny_model.get_image_features(pixels, grid).pooler_output
    assert out.video_outputs is None
    assert len(out.image_outputs.pooler_output) == 1 and out.image_outputs.hidden_states is not None
    torch.testing.assert_close(out.image_outputs.pooler_output[0], features[0])
    assert tiny_model(input_ids=ids).image_outputs is None  # no image encoded
