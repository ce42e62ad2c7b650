"""CPU benchmark of `diffusion_generate`: confident decoding vs one token per step, and the prefix cache.

Reports, for one batch of text prompts, the forward passes per answer token and the wall time of confident decoding
(dim pipeline, threshold gamma) against the same decoder without a threshold (one slot per step, steps = N), each
with and without the prefix cache, and the time per denoising step with vs without the cache. All numbers come from
the same run: the four calls are timed in turn, round after round (`--rounds`, after a warm-up round), and each time
is the median with [min-max] over the rounds; ratios are taken within a round. Prints a markdown table.

    python bench/bench_generation_cpu.py                                  # small random model
    python bench/bench_generation_cpu.py --model checkpoints/dimple-shapes --logit-scale 1

A randomly initialised model predicts every token with probability ~1/vocab, so a threshold never fires. By default
the lm_head of the random model is multiplied by `--logit-scale` 16 (the raw softmax read at temperature 1/16), which
puts its top probabilities just below 0.95 at step 0. A random model's confidences are nearly the same for every
mask slot, so the pass count is close to all-or-nothing in the scale (x14: 63 passes, x16: 14, x17: 2): treat the
random-model pass counts as illustrative, and the per-step timings and the cache ratio as the measurement. A trained
checkpoint needs no scaling.
"""

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from configuration_dimple import DimpleConfig  # noqa: E402
from modeling_dimple import DimpleForConditionalGeneration  # noqa: E402
from timing import interleaved, per_round, spread  # noqa: E402

SPECIAL_IDS = dict(
    pad_token_id=4090,
    vision_start_token_id=4091,
    vision_end_token_id=4092,
    vision_token_id=4093,
    image_token_id=4094,
    video_token_id=4095,
    mask_token_id=4089,
)


def small_config() -> DimpleConfig:
    """A 4-layer, 256-wide decoder (GQA, M-RoPE) with a 4096-token vocabulary and a 2-block ViT."""
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256, fullatt_block_indexes=[1]
    )
    return DimpleConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        mrope_section=[4, 6, 6],
        max_position_embeddings=4096,
        vision_config=vision,
        bos_token_id=None,
        eos_token_id=None,
        **SPECIAL_IDS,
    )


def load_model(path: str | None, logit_scale: float) -> DimpleForConditionalGeneration:
    if path:
        model = DimpleForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = DimpleForConditionalGeneration(small_config())
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model.eval()


def random_prompts(config, batch: int, length: int) -> torch.LongTensor:
    """Random ordinary-text ids (below every special id of the config)."""
    specials = [getattr(config, name) for name in SPECIAL_IDS if getattr(config, name, None) is not None]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, min(specials + [config.vocab_size]), (batch, length), generator=generator)


def seeded(call):
    """`call()` from the same random state every time (the same random decoding in every round)."""
    torch.manual_seed(0)
    return call()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: a small random config)")
    parser.add_argument("--logit-scale", type=float, help="lm_head multiplier (default: 16 random, 1 checkpoint)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--alg", default="origin")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is stable on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    scale = args.logit_scale if args.logit_scale is not None else (1.0 if args.model else 16.0)
    model = load_model(args.model, scale)
    prompts = random_prompts(model.config, args.batch, args.prompt_length)
    n = args.new_tokens
    base = dict(max_new_tokens=n, steps=n, alg=args.alg, return_dict_in_generate=True)
    decoders = {"confident (gamma=%g)" % args.threshold: dict(alg_p_threshold=args.threshold), "one slot per step": {}}

    calls, passes = {}, {}
    for name, decoder in decoders.items():
        for use_cache in (False, True):
            call = functools.partial(model.diffusion_generate, prompts, use_cache=use_cache, **base, **decoder)
            calls[name, use_cache] = functools.partial(seeded, call)
            passes[name, use_cache] = int(calls[name, use_cache]().num_forward_passes.max())
    times = interleaved(calls, "cpu", args.rounds)
    print(
        f"Model: {args.model or 'small random config'} (lm_head x{scale:g}), batch {args.batch}, "
        f"prompt {args.prompt_length} tokens, N = steps = {n}, alg={args.alg}, {args.threads} threads, "
        f"median [min-max] of {args.rounds} interleaved rounds.\n"
    )
    print("| decoding | cache | forward passes | passes / answer token | wall time (s) | time / step (ms) |")
    print("|---|---|---|---|---|---|")
    for (name, use_cache), seconds in times.items():
        count = passes[name, use_cache]
        print(
            f"| {name} | {'on' if use_cache else 'off'} | {count} | {count / n:.3f} | {spread(seconds, digits=3)} | "
            f"{spread(seconds, scale=1000 / count, digits=1)} |"
        )
    confident, single = list(decoders)
    print()
    for use_cache in (False, True):
        fewer = passes[single, use_cache] / passes[confident, use_cache]
        faster = per_round(lambda s, c: s / c, times[single, use_cache], times[confident, use_cache])
        print(
            f"- cache {'on' if use_cache else 'off'}: confident decoding uses {fewer:.2f}x fewer forward passes and is "
            f"{spread(faster, unit='x')} faster than one slot per step."
        )
    for name in decoders:
        per_step = per_round(
            lambda off, on: (off / passes[name, False]) / (on / passes[name, True]), times[name, False], times[name, True]
        )
        print(f"- {name}: the cache makes a step {spread(per_step, unit='x')} faster.")


if __name__ == "__main__":
    main()
