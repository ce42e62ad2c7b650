"""What serving costs: one image question through `python -m serve_dimple` (HTTP, the `openai` client) against the
same `model.generate` call in this process, on the shipped checkpoint.

    python bench/bench_serving.py                 # CPU, 20 questions x 5 rounds
    python bench/bench_serving.py --threads 1     # torch threads here and in the server

Held-out-style shapes questions (a seed of their own, none from the test set) with the checkpoint's settings. Each
round asks every question three ways in turn, so the variants see the same load on a shared machine: `generate`
here (with the processor's chat template), the server without streaming, and the server streaming (time to the last
chunk). Prints the median and quartiles of each, and of the per-question ratio server / `generate`. Exits with an
error if a served answer differs from `generate`'s.
"""

import argparse
import base64
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from openai import OpenAI
from transformers import AutoModelForImageTextToText, AutoProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from serve_dimple import running_server  # noqa: E402
from shapes.task import heldout_examples, make_examples, render  # noqa: E402

FOLDER = "checkpoints/dimple-shapes"


def data_url(example) -> str:
    buffer = io.BytesIO()
    render(example.scene).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def quartiles(values: list[float]) -> str:
    low, median, high = statistics.quantiles(values, n=4)
    return f"{median:8.2f} ({low:.2f}-{high:.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads, here and in the server")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}

    test_set = frozenset(example.key() for example in heldout_examples())
    examples = make_examples(seed=29_029, count=args.questions, exclude=test_set)
    model = AutoModelForImageTextToText.from_pretrained(REPO_ROOT / FOLDER, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(REPO_ROOT / FOLDER, trust_remote_code=True)

    def direct(example) -> str:
        chat = [{"role": "user", "content": [{"type": "image", "image": render(example.scene)},
                                             {"type": "text", "text": example.question}]}]  # fmt: skip
        inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            output = model.generate(**inputs)
        return processor.post_process_answer(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    with running_server(FOLDER, env=env) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def served(example, stream: bool) -> str:
            chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(example)}},
                                                 {"type": "text", "text": example.question}]}]  # fmt: skip
            response = client.chat.completions.create(model=FOLDER, messages=chat, stream=stream)
            if not stream:
                return response.choices[0].message.content
            return "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)

        variants = {"generate": direct, "served": lambda e: served(e, False), "streamed": lambda e: served(e, True)}
        for example in examples[:2]:  # warm-up
            for call in variants.values():
                call(example)
        times = {name: {index: [] for index in range(len(examples))} for name in variants}
        mismatches = 0
        for _ in range(args.rounds):
            for index, example in enumerate(examples):
                answers = {}
                for name, call in variants.items():
                    start = time.perf_counter()
                    answers[name] = call(example)
                    times[name][index].append(1000 * (time.perf_counter() - start))
                mismatches += answers["served"] != answers["generate"] or answers["streamed"] != answers["generate"]

    best = {name: [min(runs) for runs in per_question.values()] for name, per_question in times.items()}
    print(f"{len(examples)} questions x {args.rounds} rounds, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs; fastest of the rounds per question, ms: median (quartiles)")  # fmt: skip
    for name, values in best.items():
        print(f"  {name:9s} {quartiles(values)}")
    for name in ("served", "streamed"):
        ratios = [served_ms / direct_ms for served_ms, direct_ms in zip(best[name], best["generate"])]
        print(f"  {name} / generate: {quartiles(ratios)}")
    print(f"answers equal to generate's: {len(examples) * args.rounds - mismatches} of {len(examples) * args.rounds}")
    if mismatches:
        raise SystemExit("a served answer differs from generate's")


if __name__ == "__main__":
    main()
