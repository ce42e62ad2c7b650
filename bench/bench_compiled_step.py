"""Eager vs compiled denoising step (`compile_step=True`) on the shipped checkpoint, side by side in one run.

    python bench/bench_compiled_step.py                   # CPU, one thread, B = 1 and B = 16
    python bench/bench_compiled_step.py --device cuda     # the GPU check: mode="reduce-overhead" (CUDA graphs)

Held-out shapes questions (with their images) go through `diffusion_generate` with the prefill cache, N = 32 slots
and no threshold, so every step after step 0 is a cached step doing the same work. The time of one cached step is
(time of a 32-step call - time of a 1-step call) / 31: the loop around the step (mask check, random draws, history)
is included, the image encoding and the full step 0 cancel out. After a warm-up call of each kind (the compiled
path compiles there), the four calls are timed in turn `--repeats` times, so eager and compiled see the same load on
a shared machine, and the fastest time of each is kept (the run least disturbed by other jobs). The script also
checks that both paths return the same tokens, and exits with an error if they do not.
"""

import argparse
import functools
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from bench_speed import seconds  # noqa: E402
from shapes.task import heldout_examples, messages, render  # noqa: E402

SLOTS = 32


def prompts(processor, batch_size: int, device: str) -> dict:
    examples = heldout_examples(batch_size)
    texts = [processor.apply_chat_template(messages(e), add_generation_prompt=True) for e in examples]
    inputs = processor(text=texts, images=[render(e.scene) for e in examples], padding="longest", return_tensors="pt")
    return inputs.to(device)


def step_ms(model, inputs, device: str, repeats: int) -> dict:
    """Milliseconds per cached step, eager and compiled: (32-step call - 1-step call) / 31, fastest of `repeats`."""
    settings = dict(max_new_tokens=SLOTS, alg="maskgit_plus", alg_p_threshold=None, use_cache=True, **inputs)
    calls = {
        (compile_step, steps): functools.partial(
            model.diffusion_generate, steps=steps, compile_step=compile_step, **settings
        )
        for compile_step in (False, True)
        for steps in (SLOTS, 1)
    }
    for call in calls.values():
        call()  # warm-up (and compilation)
    times = {key: float("inf") for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            times[key] = min(times[key], seconds(call, device))
    return {
        path: 1000 * (times[(compile_step, SLOTS)] - times[(compile_step, 1)]) / (SLOTS - 1)
        for path, compile_step in (("eager", False), ("compiled", True))
    }


def same_tokens(model, inputs) -> bool:
    settings = dict(max_new_tokens=SLOTS, steps=SLOTS, alg="maskgit_plus", use_cache=True)
    for threshold in (None, 0.9):  # one token per step, and the checkpoint's confident decoding
        eager = model.diffusion_generate(**inputs, alg_p_threshold=threshold, **settings)
        compiled = model.diffusion_generate(**inputs, alg_p_threshold=threshold, compile_step=True, **settings)
        if not torch.equal(eager, compiled):
            return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "checkpoints" / "dimple-shapes"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{args.model} on {where}; N = {SLOTS}; ms per cached step, fastest of {args.repeats}\n")
    print("| batch | eager (ms) | compiled (ms) | speed-up | same tokens |")
    print("|---|---|---|---|---|")
    all_same = True
    for batch_size in args.batch_sizes:
        inputs = prompts(processor, batch_size, args.device)
        same = same_tokens(model, inputs)
        all_same &= same
        ms = step_ms(model, inputs, args.device, args.repeats)
        eager, compiled = ms["eager"], ms["compiled"]
        print(f"| {batch_size} | {eager:.2f} | {compiled:.2f} | {eager / compiled:.2f}x | {'yes' if same else 'NO'} |")
    if not all_same:
        sys.exit("The compiled step returned different tokens than the eager step.")


if __name__ == "__main__":
    main()
