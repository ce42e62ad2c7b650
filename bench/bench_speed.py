"""Decoding speed of one set of weights, all variants in a single run: diffusion steps (no cache / prefix cache /
prefix cache + compiled step, `compile_step=True`, CUDA graphs through torch.compile's "reduce-overhead" mode), the
same model's autoregressive `generate`, end-to-end latency of a 64-token answer and peak memory.

    python bench/bench_speed.py --config 7b --device cuda          # Dimple-7B shape, random bf16 weights (GPU)
    python bench/bench_speed.py                                    # small config on the CPU, anyone can run it

Settings are `P<prompt>/L<answer>/B<batch>` (default: P700/L64/B1, P2000/L256/B1, P700/L64/B8 on the GPU; smaller
ones on the CPU). Prompts are random text tokens. Per-step latency = wall time / forward passes of a
`diffusion_generate` call whose dim fallback schedule fills the answer in `--steps` passes (no threshold, so the pass
count is fixed). The end-to-end answer uses `--passes-per-token` x 64 passes: the measured ratio of confident
decoding on the trained `checkpoints/dimple-shapes` (see the README) or whatever you pass. All calls of a setting are
timed in turn, round after round (`--rounds`, after one warm-up round), so they see the same load on a shared
machine; each number is the median with [min-max] over the rounds, and each speed-up is taken within a round.
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

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_config() -> DimpleConfig:
    """A 4-layer, 512-wide decoder (GQA, M-RoPE) with an 8k vocabulary: small enough for a laptop CPU."""
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=512)
    return DimpleConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, mrope_section=[8, 12, 12], rope_theta=1e6, max_position_embeddings=8192,
        vision_config=vision, pad_token_id=8191, mask_token_id=8190, image_token_id=8189, video_token_id=8188,
        vision_start_token_id=8187, vision_end_token_id=8186, vision_token_id=8185,
    )  # fmt: skip


def build_model(name: str, device: str, dtype: torch.dtype) -> DimpleForConditionalGeneration:
    config = DimpleConfig.from_pretrained(REPO_ROOT) if name == "7b" else small_config()
    torch.manual_seed(0)
    with torch.device(device):
        model = DimpleForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def parse_setting(text: str) -> tuple[int, int, int]:
    parts = dict((p[0], int(p[1:])) for p in text.upper().split("/"))
    return parts["P"], parts["L"], parts["B"]


def step_call(model, ids, answer, steps, **options):
    """A `diffusion_generate` call with a fixed number of forward passes, and that number."""
    settings = dict(max_new_tokens=answer, steps=steps, alg="maskgit_plus", return_dict_in_generate=True, **options)
    passes = int(model.diffusion_generate(ids, **settings).num_forward_passes.max())
    return functools.partial(model.diffusion_generate, ids, **settings), passes


def ar_call(model, ids, answer):
    """The model's standard `generate` (greedy, KV cache, exactly `answer` tokens)."""
    settings = dict(max_new_tokens=answer, min_new_tokens=answer, do_sample=False, use_cache=True, eos_token_id=None)
    return functools.partial(model.generate, ids, decoding="autoregressive", **settings)


def peak_memory_gib(model, ids, answer, device, **options) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    model.diffusion_generate(ids, max_new_tokens=answer, steps=answer, alg="maskgit_plus", **options)
    return torch.cuda.max_memory_allocated() / 2**30


def bench_setting(model, setting, args) -> dict[str, list[float]]:
    """Milliseconds per round of every measure of one setting; all calls interleaved round by round."""
    prompt, answer, batch = parse_setting(setting)
    text_vocab = min(model.config.vision_token_id, model.config.mask_token_id, model.config.pad_token_id) - 1
    ids = torch.randint(0, text_vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(args.device)
    steps = min(args.steps, answer)
    variants = {"no cache": dict(use_cache=False), "cache": dict(use_cache=True)}
    if args.compile:
        variants["cache+compile"] = dict(use_cache=True, compile_step=True)
    calls, passes = {}, {}
    for name, options in variants.items():
        calls[name], passes[name] = step_call(model, ids, answer, steps, **options)
    calls["AR"] = ar_call(model, ids, answer)
    times = interleaved(calls, args.device, args.rounds)
    ms = {f"{name} step": [1000 * t / passes[name] for t in times[name]] for name in variants}
    ms["AR token"] = [1000 * t / answer for t in times["AR"]]
    fastest = "cache+compile step" if args.compile else "cache step"
    answer_passes = max(1, round(args.passes_per_token * 64))
    ms["64-token answer (diffusion)"] = [t * answer_passes for t in ms[fastest]]
    ms["64-token answer (AR)"] = [t * 64 for t in ms["AR token"]]
    ms["peak GiB"] = peak_memory_gib(model, ids, answer, args.device, use_cache=True)
    return ms


def print_table(results, args, weights_gib):
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nDevice: {device}; config {args.config}, {args.dtype}; weights {weights_gib:.2f} GiB; end-to-end "
          f"diffusion uses {args.passes_per_token} passes/token; ms, median [min-max] of {args.rounds} interleaved "
          "rounds; speed-ups taken within each round.\n")  # fmt: skip
    for setting, ms in results.items():
        peak = ms.pop("peak GiB")
        print(f"**{setting}**" + (f" (peak GPU memory {peak:.2f} GiB)" if peak is not None else "") + "\n")
        print("| measure | ms |\n|---|---|")
        for name, values in ms.items():
            print(f"| {name} | {spread(values)} |")
        cache = per_round(lambda n, c: n / c, ms["no cache step"], ms["cache step"])
        answer = per_round(lambda a, d: a / d, ms["64-token answer (AR)"], ms["64-token answer (diffusion)"])
        print(f"| cache speed-up | {spread(cache, unit='x')} |")
        if "cache+compile step" in ms:
            compiled = per_round(lambda c, k: c / k, ms["cache step"], ms["cache+compile step"])
            print(f"| compile speed-up (cached step) | {spread(compiled, unit='x')} |")
        print(f"| 64-token answer, diffusion vs AR | {spread(answer, unit='x')} |\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["small", "7b"], default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--settings", nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=16, help="forward passes per diffusion call when timing steps")
    parser.add_argument("--passes-per-token", type=float, default=0.21)  # shipped checkpoint, gamma = 0.9
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time compile_step=True (default: on CUDA only; compiling takes a while on a CPU)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.settings is None:
        gpu = ["P700/L64/B1", "P2000/L256/B1", "P700/L64/B8"]
        args.settings = gpu if args.device == "cuda" else ["P256/L32/B1", "P512/L64/B1", "P256/L32/B4"]
    model = build_model(args.config, args.device, getattr(torch, args.dtype))
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    print_table({setting: bench_setting(model, setting, args) for setting in args.settings}, args, weights)


if __name__ == "__main__":
    main()
