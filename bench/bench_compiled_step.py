"""Eager vs compiled passes (`compile_step=True`) on the shipped checkpoint, interleaved in one process.

    python bench/bench_compiled_step.py                   # CPU, one thread, B = 1 and B = 16
    python bench/bench_compiled_step.py --modes True max-autotune --batch-sizes 1   # also compile_step="max-autotune"
    python bench/bench_compiled_step.py --device cuda     # the GPU check: mode="reduce-overhead" (CUDA graphs)

Held-out shapes questions (with their images) go through `diffusion_generate` with the prefill cache, N = 32 slots.
Three calls per path (eager, and each `--modes` value of `compile_step`), timed in turn in every round so all paths
see the same load on a shared machine, after a warm-up round (the compiled paths compile there):

- `first pass`: a 1-step call: image encoding, the whole-sequence pass (prompt + canvas) and the slot selection;
- `cached step`: (32-step call - 1-step call) / 31 with no threshold, so every step after the first is a cached step
  doing the same work (the loop around the step is included; the image encoding and the first pass cancel out);
- `checkpoint call`: a call with the checkpoint's own settings (threshold 0.9), most of which end after the first pass.

Each cell is the median over `--rounds` rounds with [min-max]; the speed-up is taken within each round. The script
also checks that every path returns the eager tokens, and exits with an error if they do not.
"""

import argparse
import functools
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from shapes.task import heldout_examples, messages, render  # noqa: E402
from timing import interleaved, per_round, spread  # noqa: E402

SLOTS = 32


def prompts(processor, batch_size: int, device: str) -> dict:
    examples = heldout_examples(batch_size)
    texts = [processor.apply_chat_template(messages(e), add_generation_prompt=True) for e in examples]
    inputs = processor(text=texts, images=[render(e.scene) for e in examples], padding="longest", return_tensors="pt")
    return inputs.to(device)


def timings(model, inputs, device: str, rounds: int, paths: dict) -> dict[str, dict[str, list[float]]]:
    """Milliseconds per round of each measure (first pass, cached step, checkpoint call) on each path."""
    fixed = dict(max_new_tokens=SLOTS, alg="maskgit_plus", alg_p_threshold=None, use_cache=True, **inputs)
    calls = {}
    for path, compile_step in paths.items():
        call = functools.partial(model.diffusion_generate, compile_step=compile_step)
        calls[(path, 1)] = functools.partial(call, steps=1, **fixed)
        calls[(path, SLOTS)] = functools.partial(call, steps=SLOTS, **fixed)
        calls[(path, "checkpoint")] = functools.partial(call, **inputs, use_cache=True)  # the checkpoint's settings
    times = interleaved(calls, device, rounds)
    measures = {}
    for path in paths:
        one, full = times[(path, 1)], times[(path, SLOTS)]
        measures.setdefault("first pass", {})[path] = [1000 * t for t in one]
        measures.setdefault("cached step", {})[path] = per_round(lambda f, o: 1000 * (f - o) / (SLOTS - 1), full, one)
        measures.setdefault("checkpoint call", {})[path] = [1000 * t for t in times[(path, "checkpoint")]]
    return measures


def same_tokens(model, inputs, compile_step) -> bool:
    settings = dict(max_new_tokens=SLOTS, steps=SLOTS, alg="maskgit_plus", use_cache=True)
    for threshold in (None, 0.9):  # one token per step, and the checkpoint's confident decoding
        eager = model.diffusion_generate(**inputs, alg_p_threshold=threshold, **settings)
        compiled = model.diffusion_generate(**inputs, alg_p_threshold=threshold, compile_step=compile_step, **settings)
        if not torch.equal(eager, compiled):
            return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "checkpoints" / "dimple-shapes"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--modes", nargs="+", default=["True"],
        help='compile_step values to time against eager: True (the device default) and torch.compile mode names, '
        'e.g. --modes True max-autotune',
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Every (mode, batch size, settings, steps) here compiles a graph of its own: more than torch's default limit of 8,
    # past which a call would run eagerly and be timed as compiled.
    torch._dynamo.config.recompile_limit = 64
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{args.model} on {where}; N = {SLOTS}; ms, median [min-max] of {args.rounds} interleaved rounds\n")
    print("| batch | measure | compile_step | eager (ms) | compiled (ms) | speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|")
    compiled = {mode: True if mode == "True" else mode for mode in args.modes}
    all_same = True
    for batch_size in args.batch_sizes:
        inputs = prompts(processor, batch_size, args.device)
        same = {mode: same_tokens(model, inputs, compile_step) for mode, compile_step in compiled.items()}
        all_same &= all(same.values())
        for measure, ms in timings(model, inputs, args.device, args.rounds, {"eager": False, **compiled}).items():
            for mode in compiled:
                ratio = per_round(lambda e, c: e / c, ms["eager"], ms[mode])
                print(f"| {batch_size} | {measure} | {mode} | {spread(ms['eager'])} | {spread(ms[mode])} | "
                      f"{spread(ratio, unit='x')} | {'yes' if same[mode] else 'NO'} |")  # fmt: skip
    if not all_same:
        sys.exit("The compiled passes returned different tokens than the eager passes.")

if __name__ == "__main__":
    main()
