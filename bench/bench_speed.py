"""Decoding speed of one set of weights, all variants in a single run: diffusion steps (no cache / prefix cache /
prefix cache + compiled step, `compile_step=True`, CUDA graphs through torch.compile's "reduce-overhead" mode), the
same model's autoregressive `generate`, end-to-end latency of a 64-token answer and peak memory.

    python bench/bench_speed.py --config 7b --device cuda          # Dimple-7B shape, random bf16 weights (GPU)
    python bench/bench_speed.py                                    # small config on the CPU, anyone can run it

Settings are `P<prompt>/L<answer>/B<batch>` (default: P700/L64/B1, P2000/L256/B1, P700/L64/B8 on the GPU; smaller
ones on the CPU). Prompts are random text tokens. Per-step latency = wall time / forward passes of a
`diffusion_generate` call whose dim fallback schedule fills the answer in `--steps` passes (no threshold, so the pass
count is fixed). The end-to-end answer uses `--passes-per-token` x 64 passes: the measured ratio of confident
decoding on the trained `checkpoints/dimple-shapes` (see the README) or whatever you pass. Each number is the median
of `--repeats` timed runs after one warm-up; compare ratios within one run only.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configuration_dimple import DimpleConfig  # noqa: E402
from modeling_dimple import DimpleForConditionalGeneration  # noqa: E402

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


def seconds(fn, device: str) -> float:
    """Wall time of one `fn()`, with the GPU's queue drained before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def diffusion_step_ms(model, ids, answer, steps, device, repeats, **options) -> float:
    """Milliseconds per forward pass of diffusion decoding with a fixed number of passes."""
    settings = dict(max_new_tokens=answer, steps=steps, alg="maskgit_plus", return_dict_in_generate=True, **options)
    passes = int(model.diffusion_generate(ids, **settings).num_forward_passes.max())
    return 1000 * timed(lambda: model.diffusion_generate(ids, **settings), device, repeats) / passes


def ar_token_ms(model, ids, answer, device, repeats) -> float:
    """Milliseconds per token of the model's standard `generate` (greedy, KV cache, exactly `answer` tokens)."""
    settings = dict(max_new_tokens=answer, min_new_tokens=answer, do_sample=False, use_cache=True, eos_token_id=None)
    return 1000 * timed(lambda: model.generate(ids, **settings), device, repeats) / answer


def peak_memory_gib(model, ids, answer, device, **options) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    model.diffusion_generate(ids, max_new_tokens=answer, steps=answer, alg="maskgit_plus", **options)
    return torch.cuda.max_memory_allocated() / 2**30


def bench_setting(model, setting, args):
    prompt, answer, batch = parse_setting(setting)
    text_vocab = min(model.config.vision_token_id, model.config.mask_token_id, model.config.pad_token_id) - 1
    ids = torch.randint(0, text_vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(args.device)
    steps = min(args.steps, answer)
    row = {"setting": setting}
    row["no cache"] = diffusion_step_ms(model, ids, answer, steps, args.device, args.repeats, use_cache=False)
    row["cache"] = diffusion_step_ms(model, ids, answer, steps, args.device, args.repeats, use_cache=True)
    if args.device == "cuda":
        row["cache+compile"] = diffusion_step_ms(
            model, ids, answer, steps, args.device, args.repeats, use_cache=True, compile_step=True
        )
    row["AR token"] = ar_token_ms(model, ids, answer, args.device, args.repeats)
    fastest = min(v for k, v in row.items() if k in ("cache", "cache+compile"))
    passes = max(1, round(args.passes_per_token * 64))
    row["64-token answer (diffusion)"] = fastest * passes
    row["64-token answer (AR)"] = row["AR token"] * 64
    row["peak GiB"] = peak_memory_gib(model, ids, answer, args.device, use_cache=True)
    return row


def print_table(rows, args, weights_gib):
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nDevice: {device}; config {args.config}, {args.dtype}; weights {weights_gib:.2f} GiB; "
          f"end-to-end diffusion uses {args.passes_per_token} passes/token; times in ms (median of {args.repeats}).\n")  # fmt: skip
    columns = [c for c in rows[0] if c != "setting"]
    print("| setting | " + " | ".join(columns) + " | cache speed-up | 64-token speed-up vs AR |")
    print("|" + "---|" * (len(columns) + 3))
    for row in rows:
        cells = ["-" if row[c] is None else f"{row[c]:.2f}" for c in columns]
        cache_speedup = row["no cache"] / row["cache"]
        answer_speedup = row["64-token answer (AR)"] / row["64-token answer (diffusion)"]
        print(f"| {row['setting']} | " + " | ".join(cells) + f" | {cache_speedup:.2f}x | {answer_speedup:.2f}x |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["small", "7b"], default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--settings", nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=16, help="forward passes per diffusion call when timing steps")
    parser.add_argument("--passes-per-token", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
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
    rows = [bench_setting(model, setting, args) for setting in args.settings]
    print_table(rows, args, weights)


if __name__ == "__main__":
    main()
