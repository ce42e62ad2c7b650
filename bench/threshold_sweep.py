"""The speed/quality dial as a figure: exact match and forward passes per answer token against the threshold γ.

    OMP_NUM_THREADS=1 python bench/threshold_sweep.py      # 500 held-out questions, writes docs/threshold-sweep.png
    python bench/threshold_sweep.py --questions 100 --json sweep.json      # a quicker look, and the points as JSON

Confident decoding (`decoding_pipeline="dim"`) commits every slot whose probability exceeds γ (`alg_p_threshold`)
and falls back to its time schedule when none does; "one token per step" (`alg_p_threshold=None`) is the reference.
Every point decodes the same held-out shapes questions with the shipped checkpoint, N = steps = 32, greedy,
`maskgit_plus`, prefill cache, and is scored by `shapes/evaluate.py` (exact match, passes / answer token).
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no display: write the PNG only
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from shapes.evaluate import DEFAULT_MODEL, Setting, evaluate, load  # noqa: E402
from shapes.task import heldout_examples  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
FIGURE = REPO_ROOT / "docs" / "threshold-sweep.png"


def sweep_settings(n: int, thresholds) -> list[Setting]:
    """One confident-decoding setting per γ, then one token per step (no threshold) as the reference."""
    base = dict(max_new_tokens=n, steps=n, temperature=0.0, alg="maskgit_plus", decoding_pipeline="dim",
                use_cache=True)
    settings = [Setting(f"gamma-{gamma}", f"γ = {gamma}", dict(base, alg_p_threshold=gamma)) for gamma in thresholds]
    settings.append(Setting("one-per-step", "one token per step", dict(base, alg_p_threshold=None)))
    return settings


def draw(results: list[dict], questions: int, n: int, path: Path) -> None:
    """Exact match (left axis) and passes per answer token (right axis, log) against γ; the reference as lines."""
    swept = [r for r in results if r["gamma"] is not None]
    reference = next(r for r in results if r["gamma"] is None)
    gammas = [r["gamma"] for r in swept]
    figure, accuracy_axis = plt.subplots(figsize=(7, 4.2), dpi=110)
    passes_axis = accuracy_axis.twinx()
    accuracy_axis.plot(gammas, [100 * r["exact_match"] for r in swept], "o-", color="tab:blue",
                       label="exact match (confident)")
    accuracy_axis.axhline(100 * reference["exact_match"], color="tab:blue", linestyle=":",
                          label="exact match (one token per step)")
    passes_axis.plot(gammas, [r["passes_per_answer_token"] for r in swept], "s-", color="tab:orange",
                     label="passes / answer token (confident)")
    passes_axis.axhline(reference["passes_per_answer_token"], color="tab:orange", linestyle=":",
                        label="passes / answer token (one token per step)")
    passes_axis.set_yscale("log")
    passes_axis.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    passes_axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    passes_axis.set_yticks([0.1, 0.2, 0.5, 1, 2, 5, 10])
    passes_axis.set_ylim(0.1, 10)
    accuracy_axis.set_ylim(80, 100)  # a zoomed axis would turn one question in 500 into a cliff
    accuracy_axis.set_xlabel("threshold γ (alg_p_threshold)")
    accuracy_axis.set_ylabel("exact match (%)", color="tab:blue")
    passes_axis.set_ylabel("forward passes per answer token (log)", color="tab:orange")
    accuracy_axis.set_title(f"dimple-shapes, {questions} held-out questions, N = steps = {n}, greedy, cache",
                            fontsize=10)
    lines = accuracy_axis.get_legend_handles_labels()[0] + passes_axis.get_legend_handles_labels()[0]
    accuracy_axis.legend(lines, [line.get_label() for line in lines], loc="center left", fontsize=8)
    accuracy_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def markdown_table(results: list[dict]) -> str:
    lines = ["| decoding | exact match | passes / answer token | passes / answer |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['description']} | {100 * r['exact_match']:.1f} % | {r['passes_per_answer_token']:.3f} | "
                     f"{r['passes_per_answer']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="Checkpoint folder.")
    parser.add_argument("--questions", type=int, default=500,
                        help="Held-out questions per point (500: the README's held-out set).")
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=FIGURE, help="PNG to write.")
    parser.add_argument("--json", type=Path, help="Also write the measured points to this JSON file.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load(args.model)
    n = model.generation_config.max_new_tokens
    examples = heldout_examples(args.questions)
    results = []
    for setting in sweep_settings(n, args.thresholds):
        result = evaluate(model, processor, examples, setting, args.batch_size)
        result["gamma"] = setting.options["alg_p_threshold"]
        results.append(result)
        print(f"{setting.description}: EM {100 * result['exact_match']:.1f}%; "
              f"passes/token {result['passes_per_answer_token']:.3f}; {result['seconds']:.0f} s", flush=True)
    draw(results, len(examples), n, args.out)
    print(f"\nmodel: {args.model}; {len(examples)} held-out questions; N = steps = {n}; figure: {args.out}")
    print(markdown_table(results))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
