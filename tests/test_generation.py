"""diffusion_generate and generate on tiny random models (CPU, fp32).

Expectations come from the decoding rules (spec section 5), not from the code under test: a logits hook plants
hand-made distributions with deliberately spread confidences, and the tests check which slots each step commits.
"""

import numpy as np
import pytest
import torch
from conftest import TEXT_VOCAB, TINY_IDS, image_block, left_pad, make_tiny_model, random_pixels
from transformers import DynamicCache, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from generation_utils import DiffusionTextStreamer, DimpleDiffusionOutput, DimpleGenerationConfig, sample_tokens

MASK, PAD, VOCAB = TINY_IDS["mask_token_id"], TINY_IDS["pad_token_id"], TINY_IDS["vocab_size"]
PROMPT = [5, 6, 7]


def confident_model(seed=0, **overrides):
    """A tiny model whose lm_head is scaled so its confidences spread over ~0.2-0.98 (random init gives ~1/V)."""
    model = make_tiny_model(seed, **overrides)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def planted(confidences, tokens=None):
    """Logits [B, N, V] whose softmax gives slot j probability conf[j] on tokens[j] and spreads the rest evenly."""
    conf = torch.tensor(confidences, dtype=torch.float64)
    conf = conf[None] if conf.ndim == 1 else conf
    if tokens is None:
        tokens = 10 + torch.arange(conf.shape[1]).expand_as(conf)
    probs = ((1 - conf) / (VOCAB - 1))[..., None].repeat(1, 1, VOCAB)
    probs.scatter_(-1, torch.as_tensor(tokens)[..., None], conf[..., None])
    return probs.log().float()


def plant(logits_rows):
    return lambda step, x, logits: logits_rows.expand_as(logits)


def committed_slots(out, prompt_length, row=0):
    """The set of answer slots each step filled, read from the history."""
    answers = [h[row, prompt_length:] for h in out.history]
    before = torch.full_like(answers[0], MASK)
    steps = []
    for answer in answers:
        steps.append(set(((before == MASK) & (answer != MASK)).nonzero().flatten().tolist()))
        before = answer
    return steps


def run(model, prompt=PROMPT, **kwargs):
    kwargs.setdefault("return_dict_in_generate", True)
    kwargs.setdefault("output_history", True)
    return model.diffusion_generate(torch.tensor([prompt]), **kwargs)


# ------------------------------------------------------------------------------------------- dim pipeline


def test_dim_threshold_then_reanchored_fallback_then_flush(tiny_model):
    # gamma 0.5, 6 slots, 6 steps, timesteps linspace(1, 1e-3, 7) = [1, .8335, .667, .5005, .334, .1675, .001]
    # step 0: slots above 0.5 -> {0, 2}
    # step 1: c=4, r=4/6: first grid point below r is .5005 -> k=int(4*(1-.5005/.6667))=0, next .334 -> k=1: slot 4
    # step 2: c=3, r=.5: first point below is .334 -> k=0, next .1675 -> k=1: slot 1
    # step 3: c=2, r=1/3: first point below is .1675 -> k=0, next is the grid end -> all: {3, 5}; then stop early
    conf = [0.9, 0.2, 0.7, 0.1, 0.3, 0.05]
    out = run(
        tiny_model,
        max_new_tokens=6,
        steps=6,
        alg="maskgit_plus",
        alg_p_threshold=0.5,
        generation_logits_hook_func=plant(planted(conf)),
    )
    assert committed_slots(out, 3) == [{0, 2}, {4}, {1}, {3, 5}]
    assert out.tokens_per_step.tolist() == [[2, 1, 1, 2]]
    assert out.num_forward_passes.tolist() == [4] and len(out.history) == 4
    assert out.sequences[0, 3:].tolist() == [10, 11, 12, 13, 14, 15]  # the planted argmax tokens


def test_dim_fallback_ties_break_leftmost_and_last_step_flushes(tiny_model):
    # No slot reaches gamma. Step 0: c=6, r=1, grid [1, .5005, .001]: k=int(6*.4995)=2, all tied -> slots 0, 1.
    # Step 1 is the last allowed step: the threshold phase takes every slot left.
    out = run(
        tiny_model,
        max_new_tokens=6,
        steps=2,
        alg="maskgit_plus",
        alg_p_threshold=0.95,
        generation_logits_hook_func=plant(planted([0.3] * 6)),
    )
    assert committed_slots(out, 3) == [{0, 1}, {2, 3, 4, 5}]


def test_dim_stops_as_soon_as_no_mask_is_left(tiny_model):
    out = run(
        tiny_model,
        max_new_tokens=5,
        steps=50,
        alg_p_threshold=0.9,
        generation_logits_hook_func=plant(planted([0.99] * 5)),
    )
    assert out.num_forward_passes.tolist() == [1] and len(out.history) == 1
    assert out.tokens_per_step.tolist() == [[5]]


def test_dim_origin_without_threshold_fills_one_per_step_and_two_last(tiny_model):
    # Spec 5.7: with steps = N and no gamma, k = 1 per step and the (N-1)-th step fills the last 2.
    out = run(tiny_model, max_new_tokens=8, steps=8, alg="origin")
    assert out.tokens_per_step.tolist() == [[1, 1, 1, 1, 1, 1, 2]]
    assert (out.sequences[0, 3:] != MASK).all()


def test_dim_origin_ratio_completes_by_the_last_step(tiny_model):
    torch.manual_seed(0)
    out = run(tiny_model, max_new_tokens=8, steps=4, alg="origin-ratio")
    assert out.tokens_per_step.sum() == 8 and (out.sequences[0, 3:] != MASK).all()


def test_autoregressive_commits_leftmost_and_flushes_at_the_last_step(tiny_model):
    out = run(tiny_model, max_new_tokens=5, steps=3, alg="autoregressive")
    assert committed_slots(out, 3) == [{0}, {1}, {2, 3, 4}]  # upstream left slots 3-4 masked
    out = run(tiny_model, max_new_tokens=4, steps=4, alg="autoregressive", decoding_pipeline="dream")
    assert committed_slots(out, 3) == [{0}, {1}, {2}, {3}]


def test_confidence_algorithms_rank_by_their_own_score(tiny_model):
    # Three slots; with N = steps = 3 the dim fallback commits exactly one slot at step 0.
    tops = [(0.50, 0.45), (0.40, 0.05), (0.30, 0.29)]
    probs = torch.full((3, VOCAB), 0.0, dtype=torch.float64)
    for slot, (first, second) in enumerate(tops):
        probs[slot] = (1 - first - second) / (VOCAB - 2)
        probs[slot, 10], probs[slot, 11] = first, second
    scores = {
        "maskgit_plus": probs.max(-1).values,
        "topk_margin": torch.tensor([a - b for a, b in tops], dtype=torch.float64),
        "entropy": (probs * probs.log()).sum(-1),
    }
    logits = probs.log().float()[None]
    for alg, score in scores.items():
        out = run(tiny_model, max_new_tokens=3, steps=3, alg=alg, generation_logits_hook_func=plant(logits))
        assert committed_slots(out, 3)[0] == {int(score.argmax())}, alg
    assert {int(s.argmax()) for s in scores.values()} == {0, 1}  # the scores really disagree


def test_original_confidence_vs_filtered_confidence(tiny_model):
    # top_p=0.01 keeps only the top-1 token, so the filtered confidence is exactly 1 everywhere.
    hook = plant(planted([0.3, 0.3, 0.3, 0.3]))
    settings = dict(max_new_tokens=4, steps=4, alg_p_threshold=0.9, top_p=0.01, generation_logits_hook_func=hook)
    filtered = run(tiny_model, use_original_confidence=False, **settings)
    original = run(tiny_model, use_original_confidence=True, alg="maskgit_plus", **settings)
    assert filtered.tokens_per_step.tolist() == [[4]]
    assert original.tokens_per_step[0, 0] == 1  # nothing passes 0.9 on the raw softmax: fallback


# ------------------------------------------------------------------------------------------ dream pipeline


@pytest.mark.parametrize(
    "length, steps, expected",
    [(8, 8, [0] + [1] * 6 + [2]), (64, 32, [1] + [2] * 30 + [3]), (64, 16, [3] + [4] * 14 + [5])],
)
def test_dream_schedule(tiny_model, length, steps, expected):
    out = run(
        tiny_model,
        max_new_tokens=length,
        steps=steps,
        alg="maskgit_plus",
        decoding_pipeline="dream",
        output_history=False,
    )
    assert out.tokens_per_step.tolist() == [expected]
    # A step whose schedule commits nothing (dream's first step when steps = N) runs no forward pass.
    assert out.num_forward_passes.tolist() == [sum(1 for count in expected if count > 0)]


def test_dream_commits_most_confident_first(tiny_model):
    # steps = N = 4 gives the schedule [0, 1, 1, 2]
    out = run(
        tiny_model,
        max_new_tokens=4,
        steps=4,
        alg="maskgit_plus",
        decoding_pipeline="dream",
        generation_logits_hook_func=plant(planted([0.2, 0.8, 0.5, 0.6])),
    )
    assert committed_slots(out, 3) == [set(), {1}, {3}, {0, 2}]


def test_dream_origin_fills_everything(tiny_model):
    torch.manual_seed(0)
    out = run(tiny_model, max_new_tokens=6, steps=3, decoding_pipeline="dream", temperature=0.7)
    assert (out.sequences[0, 3:] != MASK).all() and out.tokens_per_step.sum() == 6


def test_sample_tokens_filters_and_scores_in_the_logits_dtype():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log()
    confidence, tokens = sample_tokens(logits)
    assert tokens.tolist() == [0, 0] and torch.allclose(confidence, torch.tensor([0.5, 0.25]))  # ties: first token
    confidence, _ = sample_tokens(logits, top_p=0.01)
    assert confidence.tolist() == [1.0, 1.0]  # the nucleus keeps the top-1 token only
    confidence, _ = sample_tokens(logits, top_k=2)
    assert torch.allclose(confidence, torch.tensor([0.5 / 0.8, 0.25]))  # values tied with the k-th one are kept
    confidence, _ = sample_tokens(logits, top_k=2, use_original_confidence=True)
    assert torch.allclose(confidence, torch.tensor([0.5, 0.25]))
    confidence, _ = sample_tokens(logits, confidence="margin")
    assert torch.allclose(confidence, torch.tensor([0.2, 0.0]))
    # bf16 runs score in bf16, where gamma = 0.95 rounds to 0.94921875: a 0.95 confidence does not pass it
    confidence, _ = sample_tokens(torch.tensor([[0.95, 0.05]]).log().bfloat16())
    assert confidence.dtype == torch.bfloat16 and not (confidence > 0.95).any()


# --------------------------------------------------------------------------------------- batch semantics


def test_rows_decide_on_their_own(tiny_model):
    # Row 0 has a confident slot, row 1 none: row 1 still takes its own fallback step (upstream stalled it), and
    # row 0, finished at step 0, no longer changes.
    logits = planted([[0.99, 0.99, 0.99, 0.99], [0.1, 0.1, 0.1, 0.1]])
    ids, mask = left_pad([PROMPT, [8, 9]], PAD)
    out = tiny_model.diffusion_generate(
        ids,
        attention_mask=mask,
        max_new_tokens=4,
        steps=4,
        alg="maskgit_plus",
        alg_p_threshold=0.5,
        generation_logits_hook_func=plant(logits),
        return_dict_in_generate=True,
        output_history=True,
    )
    assert out.tokens_per_step[:, 0].tolist() == [4, 1]
    assert out.num_forward_passes.tolist() == [1, 3]
    assert all(torch.equal(h[0], out.history[0][0]) for h in out.history)
    alone = tiny_model.diffusion_generate(
        torch.tensor([[8, 9]]),
        max_new_tokens=4,
        steps=4,
        alg="maskgit_plus",
        alg_p_threshold=0.5,
        generation_logits_hook_func=plant(logits[1:]),
        return_dict_in_generate=True,
    )
    assert out.tokens_per_step[1].tolist() == alone.tokens_per_step[0].tolist()


def mixed_prompts(config):
    """Three prompts of different lengths: text only, one small image, one larger image after some text."""
    small, large = [1, 4, 4], [1, 4, 8]
    rows = [
        [11, 12, 13, 14, 15],
        [20] + image_block(config, small) + [21, 22],
        [30, 31, 32] + image_block(config, large) + [33],
    ]
    pixels_small, grid_small = random_pixels([small], seed=1)
    pixels_large, grid_large = random_pixels([large], seed=2)
    images = [None, (pixels_small, grid_small), (pixels_large, grid_large)]
    return rows, images


def visual_kwargs(images):
    present = [image for image in images if image is not None]
    if not present:
        return {}
    return {"pixel_values": torch.cat([p for p, _ in present]), "image_grid_thw": torch.cat([g for _, g in present])}


@pytest.mark.parametrize("use_cache", [False, True])
def test_left_padded_batch_decodes_each_row_as_alone(use_cache):
    model = confident_model()
    rows, images = mixed_prompts(model.config)
    templates = [[MASK] * 5, [MASK, 40, MASK, MASK, MASK, MASK, 41], [MASK, MASK, 42, MASK]]
    settings = dict(steps=7, alg="maskgit_plus", alg_p_threshold=0.9, use_cache=use_cache, return_dict_in_generate=True)
    ids, mask = left_pad(rows, PAD)
    batch = model.diffusion_generate(
        ids, attention_mask=mask, response_template=templates, **visual_kwargs(images), **settings
    )
    assert batch.sequences.shape == (3, ids.shape[1] + 7)
    for row, (prompt, image, template) in enumerate(zip(rows, images, templates)):
        alone = model.diffusion_generate(
            torch.tensor([prompt]), response_template=template, **visual_kwargs([image]), **settings
        )
        answer = batch.sequences[row, ids.shape[1] :]
        assert answer[: len(template)].tolist() == alone.sequences[0, len(prompt) :].tolist()
        assert answer[len(template) :].tolist() == [PAD] * (7 - len(template))  # filler slots of short templates
        assert batch.num_forward_passes[row] == alone.num_forward_passes[0]
    assert batch.tokens_per_step.max() > 1  # confident decoding really fired


def test_right_padding_gives_the_left_padded_answers():
    model = confident_model()
    rows = [[11, 12, 13, 14, 15], [20, 21]]
    left_ids, left_mask = left_pad(rows, PAD)
    right_ids = torch.tensor([rows[0], rows[1] + [PAD] * 3])
    right_mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    settings = dict(max_new_tokens=6, steps=6, alg="maskgit_plus", alg_p_threshold=0.6, use_cache=True)
    left = model.diffusion_generate(left_ids, attention_mask=left_mask, **settings)
    right = model.diffusion_generate(right_ids, attention_mask=right_mask, **settings)
    assert torch.equal(right[:, :5], right_ids)  # the prompt comes back as given
    assert torch.equal(right[:, 5:], left[:, 5:])


def test_num_return_sequences_repeats_each_prompt_with_its_images():
    model = confident_model()
    rows, images = mixed_prompts(model.config)
    ids, mask = left_pad(rows[1:], PAD)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, steps=5, alg="maskgit_plus", **visual_kwargs(images[1:]))
    greedy = model.diffusion_generate(ids, **kwargs)
    # temperature 1 with top_k=1 samples the argmax: a random configuration whose answers must equal greedy ones
    repeated = model.diffusion_generate(ids, num_return_sequences=2, temperature=1.0, top_k=1, **kwargs)
    assert torch.equal(repeated, greedy.repeat_interleave(2, 0))
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.diffusion_generate(ids, num_return_sequences=2, **kwargs)  # temperature 0 + maskgit_plus


# ------------------------------------------------------------------------------------------------ cache


def test_cache_refreshed_every_step_equals_no_cache():
    model = confident_model()
    rows, images = mixed_prompts(model.config)
    ids, mask = left_pad(rows, PAD)
    settings = dict(
        attention_mask=mask, max_new_tokens=6, steps=6, alg="maskgit_plus", alg_p_threshold=0.6, **visual_kwargs(images)
    )
    plain = model.diffusion_generate(ids, use_cache=False, **settings)
    refreshed = model.diffusion_generate(ids, use_cache=True, cache_refresh_interval=1, **settings)
    assert torch.equal(plain, refreshed)


def test_prefix_cache_follows_spec_5_8():
    """Step 0 is a full forward; step 1 re-runs [last prompt token + N slots] against the prompt's first P-1 K/V."""
    model = confident_model()
    config = model.config
    prompt = [3] + image_block(config, [1, 4, 4]) + [4, 5]
    pixels, grid = random_pixels([[1, 4, 4]])
    seen = []
    out = model.diffusion_generate(
        torch.tensor([prompt]),
        pixel_values=pixels,
        image_grid_thw=grid,
        max_new_tokens=5,
        steps=5,
        use_cache=True,
        cache_refresh_interval=3,
        alg="maskgit_plus",
        return_dict_in_generate=True,
        output_history=True,
        generation_logits_hook_func=lambda step, x, logits: seen.append(logits.clone()) or logits,
    )
    P, N = len(prompt), 5
    start = torch.tensor([prompt + [MASK] * N])
    cache = DynamicCache(config=config)
    first = model(input_ids=start, pixel_values=pixels, image_grid_thw=grid, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(seen[0], first.logits[:, P - 1 : -1])
    cache.crop((P - 1) - cache.get_seq_length())
    step1 = model(
        input_ids=out.history[0][:, P - 1 :], past_key_values=cache, use_cache=True, rope_deltas=first.rope_deltas
    )
    torch.testing.assert_close(seen[1], step1.logits[:, :N])
    # The cached prefix is stale (it saw an all-mask answer): step 1 differs from a fresh full forward...
    assert not torch.allclose(
        seen[1], model(input_ids=out.history[0], pixel_values=pixels, image_grid_thw=grid).logits[:, P - 1 : -1]
    )
    # ...until the refresh at step 3, which recomputes everything from the current answer.
    fresh = model(input_ids=out.history[2], pixel_values=pixels, image_grid_thw=grid).logits[:, P - 1 : -1]
    torch.testing.assert_close(seen[3], fresh)


def test_lm_head_only_scores_answer_slots():
    """Answer-only logits: the LM head sees N rows per sample, never the whole [B, S] sequence."""
    model = confident_model()
    rows_seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows_seen.append(tuple(args[0].shape[:2])))
    prompt = list(range(3, 40))
    for use_cache in (False, True):
        rows_seen.clear()
        model.diffusion_generate(torch.tensor([prompt, prompt]), max_new_tokens=4, steps=4, use_cache=use_cache)
        assert rows_seen and set(rows_seen) == {(2, 4)}


def test_cached_steps_never_grow_the_prefix():
    model = confident_model()
    prefixes = []
    original = model.score_answer_slots

    def spy(batch, answer, start, cache):
        prefixes.append(None if cache is None else cache.get_seq_length())
        return original(batch, answer, start, cache)

    model.score_answer_slots = spy
    model.diffusion_generate(torch.tensor([PROMPT]), max_new_tokens=5, steps=5, alg="maskgit_plus", use_cache=True)
    assert prefixes[0] == 0 and prefixes[1:] == [len(PROMPT) - 1] * (len(prefixes) - 1)


def test_compiled_step_needs_the_cache(tiny_model):
    with pytest.raises(ValueError, match="use_cache"):
        run(tiny_model, max_new_tokens=4, steps=4, compile_step=True)


def test_compiled_passes_are_one_graph_each_and_give_the_eager_tokens():
    """`fullgraph=True` raises on any graph break, so this passing means each pass is one graph: one for the whole
    pass (step 0 and the refresh at step 3 share it) and one for the cached step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = confident_model().to(device)
    rows, images = mixed_prompts(model.config)
    ids, mask = left_pad(rows, PAD)
    settings = dict(
        attention_mask=mask.to(device), max_new_tokens=8, steps=8, alg="maskgit_plus", alg_p_threshold=0.97,
        use_cache=True, cache_refresh_interval=3, return_dict_in_generate=True,
        **{k: v.to(device) for k, v in visual_kwargs(images).items()},
    )  # fmt: skip
    eager = model.diffusion_generate(ids.to(device), **settings)
    torch._dynamo.reset()  # forget graphs compiled earlier in this process, so the one below is counted
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = model.diffusion_generate(ids.to(device), compile_step=True, **settings)
    assert torch.equal(eager.sequences, compiled.sequences)
    assert torch.equal(eager.tokens_per_step, compiled.tokens_per_step)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before + 2
    assert (eager.num_forward_passes > 4).all()  # cached steps ran before and after the refresh at step 3
    assert (eager.tokens_per_step > 1).any()  # and the threshold fired


def test_compiled_passes_check_their_guards_at_each_calls_first_pass():
    """Guards are skipped after a call's first pass of each kind only: a call of another shape, and a call back at
    the first shape, each run the graph of their own shape."""
    model = confident_model()
    settings = dict(max_new_tokens=6, steps=6, alg="maskgit_plus", use_cache=True)
    prompts = [torch.tensor([PROMPT]), torch.tensor([PROMPT + [9, 10, 11, 12]]), torch.tensor([PROMPT])]
    for ids in prompts:
        eager = model.diffusion_generate(ids, **settings)
        assert torch.equal(model.diffusion_generate(ids, compile_step=True, **settings), eager)


def test_compile_step_max_autotune_gives_the_eager_tokens_and_follows_weights_changed_in_place():
    """A mode name picks torch.compile's mode. On a CPU "max-autotune" freezes the weights (they become constants of
    the graph, which inductor's own GEMM kernels need) and tunes the matrix products (slow to compile: minutes here);
    after an in-place change (an optimizer step, `load_state_dict`) it compiles again instead of answering with the
    old weights."""
    model = confident_model()
    ids, settings = torch.tensor([PROMPT]), dict(max_new_tokens=6, steps=6, alg="maskgit_plus", use_cache=True)
    assert torch.equal(
        model.diffusion_generate(ids, compile_step="max-autotune", **settings), model.diffusion_generate(ids, **settings)
    )
    with torch.no_grad():
        model.lm_head.weight.copy_(model.lm_head.weight.flip(0))  # another answer from the same objects
    eager = model.diffusion_generate(ids, **settings)
    assert torch.equal(model.diffusion_generate(ids, compile_step="max-autotune", **settings), eager)


def test_compiled_passes_run_eagerly_past_the_recompile_limit(caplog):
    """Each combination of settings compiles its own graph; past torch's recompile limit `fullgraph=True` would raise,
    so the call runs its passes eagerly (same tokens) and says why."""
    model = confident_model()
    ids, settings = torch.tensor([PROMPT]), dict(max_new_tokens=6, steps=6, alg="maskgit_plus", use_cache=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level("WARNING"):
        model.diffusion_generate(ids, compile_step=True, **settings)  # the one graph the limit allows
        compiled = model.diffusion_generate(ids, compile_step=True, alg_p_threshold=0.5, **settings)
    assert torch.equal(compiled, model.diffusion_generate(ids, alg_p_threshold=0.5, **settings))
    assert "recompile limit" in caplog.text


def test_compiled_step_draws_like_the_eager_step():
    """Random draws are made outside the step, so with the same seed a compiled random run repeats the eager one."""
    model = confident_model()
    ids, mask = left_pad([PROMPT, [8, 9]], PAD)
    settings = dict(
        attention_mask=mask, max_new_tokens=6, steps=6, decoding_pipeline="dream", alg="origin", temperature=0.7,
        top_k=50, top_p=0.9, use_cache=True,
    )  # fmt: skip
    torch.manual_seed(0)
    eager = model.diffusion_generate(ids, **settings)
    torch.manual_seed(0)
    assert torch.equal(model.diffusion_generate(ids, compile_step=True, **settings), eager)


def test_video_prompt_decodes_with_and_without_cache():
    model = confident_model()
    config = model.config
    pixels, grid = random_pixels([[2, 4, 4]])  # two frames: 2 * 4 * 4 / 4 = 8 placeholder tokens
    video = [config.vision_start_token_id] + [config.video_token_id] * 8 + [config.vision_end_token_id]
    ids = torch.tensor([[3] + video + [4]])
    settings = dict(pixel_values_videos=pixels, video_grid_thw=grid, max_new_tokens=4, steps=4, alg="maskgit_plus")
    plain = model.diffusion_generate(ids, **settings)
    assert torch.equal(plain, model.diffusion_generate(ids, use_cache=True, cache_refresh_interval=1, **settings))
    assert (plain != MASK).all()


# ------------------------------------------------------------------------------------------ structure priors


def test_template_fixed_tokens_survive_and_set_the_length(tiny_model):
    template = [MASK, 40, MASK, MASK, 41, MASK]
    # An early answer slot: the first slot is the only confident one, so it is filled first.
    out = run(
        tiny_model,
        response_template=template,
        steps=6,
        alg_p_threshold=0.8,
        generation_logits_hook_func=plant(planted([0.95, 0.1, 0.2, 0.3, 0.1, 0.2])),
    )
    assert out.sequences.shape[1] == 3 + len(template)
    assert 0 in committed_slots(out, 3)[0]
    for state in out.history:
        assert state[0, 4].item() == 40 and state[0, 7].item() == 41
    assert (out.sequences[0, 3:] != MASK).all()
    assert out.tokens_per_step.sum() == 4  # only the free slots are decoded


def test_template_errors(tiny_model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(tiny_model, response_template=[MASK] * 5, max_new_tokens=4)
    with pytest.raises(ValueError, match="mask slot"):
        run(tiny_model, response_template=[40, 41])
    with pytest.raises(TypeError, match="response_template"):
        run(tiny_model, response_template="<|mask|> is red")
    with pytest.raises(ValueError, match="rows"):
        run(tiny_model, response_template=[[MASK], [MASK]])


# ------------------------------------------------------------------------------- hooks, streamer, history


@pytest.mark.parametrize("use_cache", [False, True])
def test_hooks_see_full_sequences_and_answer_logits(tiny_model, use_cache):
    calls = []

    def tokens_hook(step, x, logits):
        calls.append((step, tuple(x.shape), None if logits is None else tuple(logits.shape)))
        x = x.clone()
        x[:, -1] = 99  # a right-aligned edit: pin the last slot
        return x

    out = run(tiny_model, max_new_tokens=4, steps=4, use_cache=use_cache, generation_tokens_hook_func=tokens_hook)
    assert calls[0] == (None, (1, 7), None)
    assert all(shape == (1, 7) and logits == (1, 4, VOCAB) for _, shape, logits in calls[1:])
    assert [step for step, _, _ in calls[1:]] == list(range(len(out.history)))
    assert out.sequences[0, -1] == 99 and out.tokens_per_step.sum() == 3


def test_bad_hooks_are_reported(tiny_model):
    with pytest.raises(ValueError, match="generation_logits_hook_func"):
        run(tiny_model, max_new_tokens=3, steps=3, generation_logits_hook_func=lambda step, x, logits: logits[:, :1])
    with pytest.raises(TypeError, match="generation_tokens_hook_func"):
        run(tiny_model, max_new_tokens=3, steps=3, generation_tokens_hook_func=lambda step, x, logits: x.float())
    with pytest.raises(ValueError, match="changed the prompt"):
        run(tiny_model, max_new_tokens=3, steps=3, generation_tokens_hook_func=lambda step, x, logits: x * 0)


class RecordingStreamer(BaseStreamer):
    """transformers' diffusion streamer protocol, recorded: `put` (prompt, then answer), `put_draft`, `end`."""

    def __init__(self):
        self.puts, self.drafts, self.ended = [], [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def put_draft(self, value):
        self.drafts.append(value.clone())

    def end(self):
        self.ended += 1


def test_streamer_gets_prompt_drafts_answer_end(tiny_model):
    streamer = RecordingStreamer()
    ids, mask = left_pad([PROMPT, [8]], PAD)
    out = tiny_model.diffusion_generate(
        ids,
        attention_mask=mask,
        max_new_tokens=6,
        steps=6,
        alg_p_threshold=0.9,
        streamer=streamer,
        return_dict_in_generate=True,
        output_history=True,
        generation_logits_hook_func=plant(planted([[0.95] * 6, [0.5] * 6])),
    )
    steps_run = out.tokens_per_step.shape[1]
    assert len(streamer.drafts) == len(out.history) == steps_run and streamer.ended == 1
    assert [draft.tolist() for draft in streamer.drafts] == [step[:, 3:].tolist() for step in out.history]
    assert len(streamer.puts) == 2
    assert torch.equal(streamer.puts[0], ids) and torch.equal(streamer.puts[1], out.sequences[:, 3:])
    assert out.num_forward_passes.tolist() == [1, steps_run]
    assert out.tokens_per_step.sum(1).tolist() == [6, 6]


def test_a_streamer_without_put_draft_gets_the_prompt_and_the_answer_only(tiny_model):
    streamer = RecordingStreamer()
    streamer.put_draft = None  # like TextStreamer: no drafts
    out = tiny_model.diffusion_generate(torch.tensor([PROMPT]), max_new_tokens=4, steps=4, streamer=streamer)
    assert [value.tolist() for value in streamer.puts] == [[PROMPT], out[:, len(PROMPT):].tolist()]


def test_diffusion_text_streamer_shows_masks_as_placeholders(capsys):
    class CharTokenizer:
        mask_token_id = MASK

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + i) for i in ids)

    streamer = DiffusionTextStreamer(CharTokenizer())
    streamer.put(torch.tensor([[5, 6]]))  # the prompt: not shown
    streamer.put_draft(torch.tensor([[0, MASK, MASK, 1, 2], [MASK] * 5]))
    streamer.put(torch.tensor([[0, 3, 4, 1, 2], [1] * 5]))
    streamer.end()
    assert streamer.texts == ["adebc", "bbbbb"] and streamer.finished
    assert capsys.readouterr().out == (
        "[step 1, row 0] a__bc\n[step 1, row 1] _____\n[answer, row 0] adebc\n[answer, row 1] bbbbb\n"
    )


# ------------------------------------------------------------------------------------------------ settings


def test_config_defaults_validation_and_round_trip(tmp_path):
    config = DimpleGenerationConfig()
    # every setting starts unset, so resolution can fill it from the model's config; the standard ones keep
    # transformers' meaning (unset) for the autoregressive `generate` ...
    assert all(getattr(config, name) is None for name in ("temperature", "use_cache", "max_length", "top_k"))
    assert (config.steps, config.eps, config.alg, config.decoding_pipeline) == (None, None, None, None)
    # ... and get their diffusion values only when diffusion decoding resolves them
    config.fill_diffusion_defaults(make_tiny_model().config)
    assert (config.steps, config.eps, config.alg, config.decoding_pipeline) == (512, 1e-3, "origin", "dim")
    assert (config.temperature, config.top_p, config.top_k, config.mask_token_id) == (0.0, None, None, MASK)
    assert (config.use_cache, config.max_length, config.cache_refresh_interval) == (False, None, 0)
    saved = DimpleGenerationConfig(steps=32, alg="maskgit_plus", alg_p_threshold=0.95, top_k=50, mask_token_id=9)
    saved.save_pretrained(tmp_path)
    assert DimpleGenerationConfig.from_pretrained(tmp_path) == saved
    plain = GenerationConfig.from_pretrained(tmp_path)  # what transformers' own loader reads from the file
    assert (plain.steps, plain.alg, plain.top_k) == (32, "maskgit_plus", 50)
    assert plain.temperature is None and plain.use_cache is None  # defaults are not pinned for `generate`
    from_model = DimpleGenerationConfig.from_model_config(make_tiny_model().config)
    assert from_model.mask_token_id == MASK and from_model.top_k is None


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(steps=0), "steps"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(alg_p_threshold=0.0), "alg_p_threshold"),
        (dict(alg_p_threshold=1.5), "alg_p_threshold"),
        (dict(alg="greedy"), "alg"),
        (dict(decoding_pipeline="llada"), "decoding_pipeline"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(eps=0.0), "eps"),
        (dict(alg="origin-ratio", decoding_pipeline="dream"), "origin-ratio"),
        (dict(num_return_sequences=2, alg="maskgit_plus"), "num_return_sequences"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(alg_temp=float("nan")), "alg_temp"),
        (dict(steps=10**9), "steps"),
        (dict(compile_step="max_autotune", use_cache=True), "compile_step"),  # torch's name has a hyphen
        (dict(compile_step=1, use_cache=True), "compile_step"),
    ],
)
def test_invalid_settings_raise(tiny_model, settings, match):
    with pytest.raises(ValueError, match=match):
        DimpleGenerationConfig(**settings)
    with pytest.raises(ValueError, match=match):
        run(tiny_model, **{"max_new_tokens": 2, **settings})


def test_ineffective_combinations_warn():
    with pytest.warns(UserWarning, match="entropy"):
        DimpleGenerationConfig(alg="entropy", alg_p_threshold=0.9)
    with pytest.warns(UserWarning, match="dream"):
        DimpleGenerationConfig(decoding_pipeline="dream", alg_p_threshold=0.9)


def test_settings_resolution_order(tiny_model):
    tiny_model.generation_config.steps = 2  # as if loaded from the checkpoint's generation_config.json
    out = run(tiny_model, max_new_tokens=6)
    assert out.num_forward_passes.tolist() == [2]
    explicit = DimpleGenerationConfig(steps=3, max_new_tokens=6, return_dict_in_generate=True)
    assert tiny_model.diffusion_generate(torch.tensor([PROMPT]), explicit).num_forward_passes.tolist() == [3]
    out = tiny_model.diffusion_generate(
        torch.tensor([PROMPT]), explicit, steps=4, alg="maskgit_plus", decoding_pipeline="dream"
    )
    assert out.num_forward_passes.tolist() == [4]
    # no mask id anywhere in the generation settings: it comes from config.json
    assert (tiny_model.diffusion_generate(torch.tensor([PROMPT]), max_new_tokens=2, steps=2) != MASK).all()


def test_default_length_is_twenty_new_slots(tiny_model):
    assert tiny_model.diffusion_generate(torch.tensor([PROMPT]), steps=4).shape == (1, 3 + 20)
    assert tiny_model.diffusion_generate(torch.tensor([PROMPT]), steps=4, max_length=10).shape == (1, 10)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(inputs=torch.tensor([[5, MASK, 7]])), ValueError, "mask token"),
        (dict(pixel_values=torch.zeros(16, 1176)), ValueError, "image_grid_thw"),
        (dict(alg_threshold=0.9), TypeError, "alg_threshold"),
        (dict(inputs_embeds=torch.zeros(1, 3, 32)), ValueError, "inputs_embeds"),
        (dict(attention_mask=torch.ones(1, 4)), ValueError, "attention_mask"),
        (dict(inputs=torch.tensor([[5.0, 6.0]])), TypeError, "inputs"),
        (dict(inputs=torch.tensor([[5, 256]])), ValueError, "`inputs` holds token id 256"),
        (dict(response_template=[5, MASK, 999]), ValueError, "`response_template` holds token id 999"),
        (dict(mask_token_id=300), ValueError, "`mask_token_id` is 300"),
        (dict(temperature="0.5"), TypeError, "`temperature` must be a number"),
        (dict(max_new_tokens=10**12), ValueError, "exceed the model's 4096 positions"),
        (dict(response_template=[MASK] * 5000), ValueError, "exceed the model's 4096 positions"),
        (dict(streamer=object()), TypeError, "put"),
        (dict(inputs=torch.tensor([[5, 243, 246, 246, 246, 246, 244]]), pixel_values=np.zeros((16, 1176), np.float32),
              image_grid_thw=torch.tensor([[1, 4, 4]])), TypeError, "float torch.Tensor"),
        (dict(image_grid_thw=torch.tensor([[1, 4, 4]])), ValueError, "image_grid_thw` was given without `pixel_values"),
        (dict(inputs=torch.tensor([[5, 243, 246, 246, 246, 246, 244]])), ValueError, "no `pixel_values` was given"),
        (dict(generation_logits_hook_func=lambda step, x, logits: logits * float("nan")), ValueError, "NaN"),
        (dict(generation_tokens_hook_func=lambda step, x, logits: x + 1000), ValueError, "outside the model"),
    ],
)
def test_bad_inputs_raise(tiny_model, kwargs, error, match):
    kwargs.setdefault("inputs", torch.tensor([PROMPT]))
    kwargs = {"max_new_tokens": 2, "steps": 2, **kwargs}
    if "response_template" in kwargs:
        del kwargs["max_new_tokens"]
    with pytest.raises(error, match=match):
        tiny_model.diffusion_generate(**kwargs)


def test_steps_beyond_the_answer_length_run_only_the_passes_that_commit(tiny_model):
    many = run(tiny_model, max_new_tokens=4, steps=400, alg="maskgit_plus", decoding_pipeline="dream")
    assert (many.sequences[:, -4:] != MASK).all()
    assert many.tokens_per_step.sum().item() == 4
    assert many.num_forward_passes.item() == (many.tokens_per_step > 0).sum().item() <= 4


def test_readme_call_runs(tiny_model):
    ids, mask = left_pad([PROMPT, [8, 9]], PAD)
    out = tiny_model.diffusion_generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        steps=8,
        temperature=0.2,
        top_p=0.95,
        alg="origin",
        alg_p_threshold=0.95,
        use_original_confidence=True,
        decoding_pipeline="dim",
        use_cache=True,
        output_history=True,
        return_dict_in_generate=True,
    )
    assert isinstance(out, DimpleDiffusionOutput) and (out.sequences[:, 3:] != MASK).all()


# ------------------------------------------------------------------------------------- autoregressive generate

NON_TEXT = list(range(TEXT_VOCAB, VOCAB))  # vision/mask/pad ids: suppressed so greedy text stays text


def greedy_loop(model, ids, steps, **visual):
    """Reference: re-run the whole sequence and append the argmax of the last position's logits."""
    mask = torch.ones_like(ids)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, **visual).logits[:, -1]
        logits[:, NON_TEXT] = -float("inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.ones_like(ids)
    return ids


def test_generate_greedy_equals_a_loop_of_full_forwards():
    model = make_tiny_model()
    prompt = [3] + image_block(model.config, [1, 4, 4]) + [4]
    pixels, grid = random_pixels([[1, 4, 4]])
    ids = torch.tensor([prompt])
    reference = greedy_loop(model, ids, 5, pixel_values=pixels, image_grid_thw=grid)
    out = model.generate(
        ids,
        pixel_values=pixels,
        image_grid_thw=grid,
        max_new_tokens=5,
        do_sample=False,
        use_cache=False,
        suppress_tokens=NON_TEXT,
    )
    assert torch.equal(out, reference)
    # With the (bidirectional) cache the first token is the same; later ones may differ (the cache is causal).
    cached = model.generate(
        ids,
        pixel_values=pixels,
        image_grid_thw=grid,
        max_new_tokens=5,
        do_sample=False,
        use_cache=True,
        suppress_tokens=NON_TEXT,
    )
    assert cached[0, len(prompt)] == reference[0, len(prompt)]


def test_generate_with_causal_attention_cache_matches_full_forwards():
    model = make_tiny_model(full_attn_mask=False)
    rows, images = mixed_prompts(model.config)
    ids, mask = left_pad(rows[1:], PAD)
    visual = visual_kwargs(images[1:])
    streamer = RecordingStreamer()
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, suppress_tokens=NON_TEXT, **visual)
    cached = model.generate(ids, use_cache=True, streamer=streamer, **settings)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **settings))
    assert len(streamer.puts) == 1 + 4 and streamer.ended == 1  # the prompt, then one token per step
    sampled = model.generate(
        ids,
        use_cache=True,
        do_sample=True,
        top_k=1,
        num_return_sequences=2,
        **{k: v for k, v in settings.items() if k != "do_sample"},
    )
    assert torch.equal(sampled, cached.repeat_interleave(2, 0))  # each prompt repeated with its own image


def test_generate_stops_at_eos(tiny_model):
    ids = torch.tensor([PROMPT])
    free = tiny_model.generate(ids, max_new_tokens=6, do_sample=False, suppress_tokens=NON_TEXT)
    eos = int(free[0, 4])
    first_eos = 3 + int((free[0, 3:] == eos).nonzero()[0])
    stopped = tiny_model.generate(ids, max_new_tokens=6, do_sample=False, suppress_tokens=NON_TEXT, eos_token_id=eos)
    assert torch.equal(stopped, free[:, : first_eos + 1])


def test_generate_rejects_diffusion_arguments(tiny_model):
    with pytest.raises(TypeError, match="diffusion_generate"):
        tiny_model.generate(torch.tensor([PROMPT]), steps=4)
