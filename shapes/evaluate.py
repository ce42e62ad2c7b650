"""Evaluate a shapes Dimple on held-out questions: accuracy and forward passes for each decoding setting.

    python shapes/evaluate.py                                  # the shipped checkpoint, every setting, 500 questions
    python shapes/evaluate.py --model runs/diffusion-only --settings confident-0.9
    python shapes/evaluate.py --json results.json

Metrics per setting, over the held-out split (never seen in training):

* exact match: the decoded answer (trailing `<|endoftext|>` pads stripped) equals the reference string; also by
  question type, and on the "binding" questions (`task.needs_binding`: one of several shapes named by its kind or
  colour, where reading another shape gives another answer);
* passes / answer token: forward passes summed over questions, divided by the answer tokens produced (non-pad);
  autoregressive decoding needs 1.0, the paper reports about 1/3 for confident decoding;
* passes / answer: the mean number of forward passes per question;
* length error: mean |answer tokens produced - reference answer tokens| (the "length bias" of the ablation);
* seconds: wall time for the whole split (batched; CPU timings are noisy on a shared machine).

The structure-prior row asks the "color and shape" questions with the template `Color:<|mask|> Shape:<|mask|>`
(fixed tokens, two slots) and reports exact match and whether every output has exactly that format.
"""

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from shapes.task import (  # noqa: E402
    ATTRIBUTES_TEMPLATE,
    QUESTION_TYPES,
    heldout_examples,
    messages,
    needs_binding,
    render,
    validation_examples,
)

DEFAULT_MODEL = REPO_ROOT / "checkpoints" / "dimple-shapes"
ATTRIBUTES_FORMAT = re.compile(r"Color: \w+ Shape: \w+")


@dataclass(frozen=True)
class Setting:
    name: str
    description: str
    options: dict = field(default_factory=dict)
    template: str | None = None  # structure prior (only the attributes questions are asked)


def decoding_settings(n: int) -> list[Setting]:
    """Confident decoding, one token per step and the dream pipeline, each with and without the prefill cache."""
    base = dict(max_new_tokens=n, steps=n, temperature=0.0, alg="maskgit_plus")
    settings = []
    for cache in (True, False):
        suffix = "" if cache else ", no cache"
        tag = "" if cache else "-nocache"
        settings += [
            Setting(f"confident-0.9{tag}", f"dim, threshold 0.9{suffix}",
                    dict(base, decoding_pipeline="dim", alg_p_threshold=0.9, use_cache=cache)),
            Setting(f"confident-0.95{tag}", f"dim, threshold 0.95{suffix}",
                    dict(base, decoding_pipeline="dim", alg_p_threshold=0.95, use_cache=cache)),
            Setting(f"one-per-step{tag}", f"dim, no threshold (1 token/step){suffix}",
                    dict(base, decoding_pipeline="dim", alg_p_threshold=None, use_cache=cache)),
            Setting(f"dream{tag}", f"dream, maskgit_plus{suffix}",
                    dict(base, decoding_pipeline="dream", alg_p_threshold=None, use_cache=cache)),
        ]
    template_options = dict(steps=n, temperature=0.0, alg="maskgit_plus", decoding_pipeline="dim",
                            alg_p_threshold=0.9, use_cache=True, max_new_tokens=None)
    settings += [
        Setting("attributes-free", "attribute questions, no template (threshold 0.9)",
                dict(base, decoding_pipeline="dim", alg_p_threshold=0.9, use_cache=True), template=None),
        Setting("attributes-template", f"attribute questions, template {ATTRIBUTES_TEMPLATE!r} (threshold 0.9)",
                template_options, template=ATTRIBUTES_TEMPLATE),
    ]
    return settings


def load(model_path):
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    return model, processor


def answer_batch(model, processor, examples, options: dict, template: str | None = None) -> dict:
    """Answer a batch of examples with one `diffusion_generate` call; returns texts, passes and token counts."""
    prompts = [processor.apply_chat_template(messages(e), add_generation_prompt=True) for e in examples]
    images = [render(e.scene) for e in examples]
    inputs = processor(text=prompts, images=images, padding="longest", return_tensors="pt")
    extra = {"response_template": processor.encode_response_template(template)} if template else {}
    fixed = fixed_tokens(processor, template)
    output = model.diffusion_generate(**inputs, **options, **extra, return_dict_in_generate=True)
    answers = output.sequences[:, inputs["input_ids"].shape[1]:]
    return {
        "texts": processor.post_process_answer(answers),
        "passes": output.num_forward_passes.tolist(),
        # Only the tokens the model produced count; a template's fixed tokens are not decoded.
        "tokens": [len(processor.answer_ids(row)) - fixed for row in answers.tolist()],
    }


def fixed_tokens(processor, template: str | None) -> int:
    """Tokens a structure prior fixes (they are not decoded, so they do not count as answer tokens)."""
    if not template:
        return 0
    return sum(token != processor.mask_token_id for token in processor.encode_response_template(template))


def evaluate(model, processor, examples, setting: Setting, batch_size: int = 50) -> dict:
    if setting.name.startswith("attributes"):
        examples = [e for e in examples if e.kind == "attributes"]
    # Batches of one question type finish together (decoding is per sample, so grouping changes no answer).
    ordered = sorted(examples, key=lambda e: QUESTION_TYPES.index(e.kind))
    texts, passes, tokens = [], [], []
    start = time.perf_counter()
    for first in range(0, len(ordered), batch_size):
        result = answer_batch(model, processor, ordered[first:first + batch_size], setting.options, setting.template)
        texts += result["texts"]
        passes += result["passes"]
        tokens += result["tokens"]
    seconds = time.perf_counter() - start
    tokenizer = processor.tokenizer
    fixed = fixed_tokens(processor, setting.template)
    reference_tokens = [len(tokenizer.encode(e.answer, add_special_tokens=False)) - fixed for e in ordered]
    correct = [text == e.answer for text, e in zip(texts, ordered)]
    per_type = {
        kind: sum(c for c, e in zip(correct, ordered) if e.kind == kind) / max(1, sum(e.kind == kind for e in ordered))
        for kind in QUESTION_TYPES if any(e.kind == kind for e in ordered)
    }
    binding = [c for c, e in zip(correct, ordered) if needs_binding(e)]
    result = {
        "setting": setting.name,
        "description": setting.description,
        "questions": len(ordered),
        "exact_match": sum(correct) / len(ordered),
        "passes_per_answer_token": sum(passes) / max(1, sum(tokens)),
        "passes_per_answer": sum(passes) / len(ordered),
        "length_error": sum(abs(a - b) for a, b in zip(tokens, reference_tokens)) / len(ordered),
        "seconds": round(seconds, 1),
        "exact_match_by_type": per_type,
        # Questions that name one of several shapes by kind or colour, where picking another shape is wrong.
        "exact_match_binding": sum(binding) / max(1, len(binding)),
        "binding_questions": len(binding),
        "errors": [(e.question, e.answer, t) for t, e, c in zip(texts, ordered, correct) if not c][:10],
    }
    if setting.template:
        result["format_ok"] = sum(bool(ATTRIBUTES_FORMAT.fullmatch(t)) for t in texts) / len(texts)
    return result


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| setting | questions | exact match | passes / answer token | passes / answer | length error | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        em = f"{100 * r['exact_match']:.1f} %"
        if "format_ok" in r:
            em += f" (format {100 * r['format_ok']:.0f} %)"
        lines.append(
            f"| {r['description']} | {r['questions']} | {em} | {r['passes_per_answer_token']:.3f} | "
            f"{r['passes_per_answer']:.2f} | {r['length_error']:.2f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="Checkpoint folder (or Hub id).")
    parser.add_argument("--questions", type=int, default=500, help="Questions to ask.")
    parser.add_argument(
        "--split", choices=("heldout", "validation"), default="heldout",
        help="Report on held-out questions, or choose between recipes on validation ones (same distribution).",
    )
    parser.add_argument("--settings", nargs="*", help="Names of the settings to run (default: all).")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load(args.model)
    n = model.generation_config.max_new_tokens
    settings = decoding_settings(n)
    if args.settings:
        unknown = set(args.settings) - {s.name for s in settings}
        if unknown:
            raise SystemExit(f"unknown settings {sorted(unknown)}; choose from {[s.name for s in settings]}")
        settings = [s for s in settings if s.name in args.settings]
    examples = (heldout_examples if args.split == "heldout" else validation_examples)(args.questions)
    results = []
    for setting in settings:
        result = evaluate(model, processor, examples, setting, args.batch_size)
        results.append(result)
        by_type = ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["exact_match_by_type"].items())
        binding = f"{result['binding_questions']} binding {100 * result['exact_match_binding']:.0f}%"
        print(f"{setting.name}: EM {100 * result['exact_match']:.1f}% ({by_type}; {binding}); "
              f"passes/token {result['passes_per_answer_token']:.3f}; {result['seconds']:.0f} s", flush=True)
    print()
    print(f"model: {args.model}; {len(examples)} {args.split} questions; N = steps = {n}")
    print(markdown_table(results))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
