"""Quantized vs full-precision loading of the shipped shapes Dimple: exact match, passes per token, weight bytes.

    python bench/bench_quantization.py                       # CPU: fp32 and torchao int8, 500 held-out questions
    python bench/bench_quantization.py --device cuda         # GPU: also bitsandbytes 8-bit and 4-bit

Every method loads the same checkpoint through `quantization_dimple.quantization_config` (decoder linears only) and
answers the same held-out questions with the checkpoint's own decoding (confident, threshold 0.9, prefill cache,
greedy). Weight bytes are the serialized size of the state dict (quantized tensors save their int8/4-bit data and
scales), so the ratio counts what the quantized layers really hold. Speed: all methods stay loaded and answer the
same `--timed-questions` questions in turn, round after round (`--rounds`, after a warm-up round), so they share the
machine's load; ms per question is the median with [min-max] over the rounds, the ratio to full precision is taken
within each round.
"""

import argparse
import functools
import io
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from quantization_dimple import quantization_config  # noqa: E402
from shapes.evaluate import decoding_settings, evaluate  # noqa: E402
from shapes.task import heldout_examples  # noqa: E402
from timing import interleaved, per_round, spread  # noqa: E402

CHECKPOINT = REPO_ROOT / "checkpoints" / "dimple-shapes"
CPU_METHODS = ("full", "int8")
CUDA_METHODS = ("full", "int8", "bnb-8bit", "bnb-4bit")


def load(method: str, device: str):
    options = {} if method == "full" else {"quantization_config": quantization_config(method, torch.float32)}
    if method.startswith("bnb"):
        options["device_map"] = device  # bitsandbytes places the weights while loading
    model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True, dtype=torch.float32, **options)
    return (model if method.startswith("bnb") else model.to(device)).eval()


def weight_bytes(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--methods", nargs="*", help="Default: full and int8 on CPU, all four on CUDA.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timed-questions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods or (CUDA_METHODS if args.device.startswith("cuda") else CPU_METHODS)
    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    examples = heldout_examples(args.questions)
    setting = next(s for s in decoding_settings(32) if s.name == "confident-0.9")

    models, rows = {}, []
    for method in methods:
        models[method] = load(method, args.device)
        with torch.inference_mode():
            result = evaluate(models[method], processor, examples, setting)
        rows.append((method, result, weight_bytes(models[method])))
        print(f"{method}: EM {100 * result['exact_match']:.1f} %, passes/token "
              f"{result['passes_per_answer_token']:.3f}", flush=True)  # fmt: skip
    timed = examples[: args.timed_questions]
    with torch.inference_mode():
        calls = {method: functools.partial(evaluate, model, processor, timed, setting) for method, model in models.items()}
        ms = {k: [1000 * t / len(timed) for t in v] for k, v in interleaved(calls, args.device, args.rounds).items()}

    full_bytes = rows[0][2] if rows[0][0] == "full" else None
    print(f"\n{len(examples)} held-out questions, {setting.description}, device {args.device}; ms / question: "
          f"{len(timed)} questions, median [min-max] of {args.rounds} interleaved rounds")  # fmt: skip
    print("| weights | exact match | passes / answer token | passes / answer | weight bytes | vs full | ms / question "
          "| time vs full |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for method, result, size in rows:
        ratio = f"{size / full_bytes:.3f}" if full_bytes else "-"
        speed = spread(per_round(lambda m, f: m / f, ms[method], ms["full"]), unit="x") if "full" in ms else "-"
        print(f"| {method} | {100 * result['exact_match']:.1f} % | {result['passes_per_answer_token']:.3f} | "
              f"{result['passes_per_answer']:.2f} | {size:,} | {ratio} | {spread(ms[method], digits=1)} | {speed} |")  # fmt: skip


if __name__ == "__main__":
    main()
