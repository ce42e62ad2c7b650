"""Train the small shapes Dimple with the repository's training library: autoregressive, then diffusion.

    python shapes/train.py                      # the shipped recipe and seed -> checkpoints/dimple-shapes
    python shapes/train.py --diffusion-only --output runs/diffusion-only   # the paper's ablation
    python shapes/train.py --smoke --output /tmp/smoke                            # 2 steps per stage

Recipe (reference §6, scaled to a toy trained from scratch):

* stage A, `ar` (causal attention, next-token loss on the answer and its `<|endoftext|>` pads);
* stage B, `diffusion` (bidirectional attention; per sample t ~ U(eps, 1), answer slots and pads masked with
  probability t; loss on the masked slots); answers padded by the dynamic rule of §6.1 in both stages.

Deviations from §6.4, because the vision tower and projector start from random weights here instead of
Qwen2.5-VL's: every module trains in every stage (the tower is never frozen), there is no separate alignment stage,
and the learning rates are those of training from scratch (AdamW, 1e-3 then 5e-4, clipping at 1.0). `--diffusion-only`
spends the same total step budget on stage B alone, with everything else unchanged.
"""

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from shapes.build import (  # noqa: E402
    build_config,
    MAX_NEW_TOKENS,
    build_model,
    build_processor,
    describe_model,
    generation_config,
)
from shapes.task import messages, render, train_examples  # noqa: E402
from training_dimple import build_trainer, stage_training_arguments  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "checkpoints" / "dimple-shapes"


class ShapesChatData(Dataset):
    """Training examples in the library's chat layout; images are rendered when a batch needs them."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        example = self.examples[index]
        turn = messages(example, with_answer=True)
        # The library marks image positions with "<image>" in the user text (here before the question, as the
        # chat template renders it: `<|vision_end|>Question`).
        chat = [{"role": "user", "content": "<image>" + example.question}, turn[1]]
        return {"messages": chat, "images": [render(example.scene)]}


def diffusion_padding(rule: str) -> dict:
    """Collator options: §6.1's dynamic rule, or every answer padded to the N = 32 slots decoding uses."""
    if rule == "dynamic":
        return {"answer_padding": "dynamic"}
    return {"answer_padding": "fixed", "fixed_answer_length": MAX_NEW_TOKENS}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Checkpoint folder to write.")
    parser.add_argument("--ar-steps", type=int, default=1800, help="Optimizer steps of stage A.")
    parser.add_argument("--diffusion-steps", type=int, default=1600, help="Optimizer steps of stage B.")
    parser.add_argument("--diffusion-only", action="store_true", help="Skip stage A; stage B gets its steps.")
    parser.add_argument(
        "--diffusion-padding", choices=("fixed", "dynamic"), default="fixed",
        help="Answer padding of stage B: to the 32 decoding slots (default) or §6.1's dynamic rule.",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ar-lr", type=float, default=1e-3)
    parser.add_argument("--diffusion-lr", type=float, default=5e-4)
    parser.add_argument(
        "--seed", type=int, default=3,
        help="Examples and initialisation. Seeds 0-3 were trained; 3 (best on validation) is the shipped checkpoint.",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--smoke", action="store_true", help="2 steps per stage on a tiny batch (a quick check).")
    args = parser.parse_args(argv)
    if args.smoke:
        args.ar_steps, args.diffusion_steps, args.batch_size = 2, 2, 4
    if args.diffusion_only:
        args.diffusion_steps, args.ar_steps = args.ar_steps + args.diffusion_steps, 0
    return args


def run_stage(model, processor, stage, steps, lr, data, args, workdir, **collator_options) -> dict:
    """Train one stage for `steps` optimizer steps on fresh examples; return its loss summary and wall time."""
    training_args = stage_training_arguments(
        stage,
        str(workdir / stage),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        max_grad_norm=1.0,
        warmup_steps=0.03,
        logging_steps=max(1, min(50, steps // 20)),
        save_strategy="no",
        dataloader_num_workers=0,
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = build_trainer(model, processor, data, stage, training_args, **collator_options)
    # Toy deviation from §6.4: the tower and projector are fresh, so they train in every stage.
    for param in model.parameters():
        param.requires_grad_(True)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"[{stage}] {steps} steps in {seconds:.0f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    return {"steps": steps, "seconds": round(seconds, 1), "train_loss": result.training_loss, "losses": losses}


def save_checkpoint(model, processor, output: Path, report: dict):
    model.set_attention_kind(bidirectional=True)  # inference is bidirectional whatever the last stage was
    model.generation_config = generation_config(model.config)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    (output / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    processor = build_processor()
    model = build_model(build_config(processor.tokenizer))
    print(f"model: {describe_model(model)}", flush=True)
    examples = train_examples((args.ar_steps + args.diffusion_steps) * args.batch_size, seed=args.seed)
    # Each stage sees fresh examples: the first ar_steps * batch go to stage A, the rest to stage B.
    split = args.ar_steps * args.batch_size
    workdir = args.output / "_trainer"

    report = {"arguments": {k: str(v) for k, v in vars(args).items()}, "stages": {}}
    start = time.perf_counter()
    if args.ar_steps:
        report["stages"]["ar"] = run_stage(
            model, processor, "ar", args.ar_steps, args.ar_lr, ShapesChatData(examples[:split]), args, workdir
        )
    report["stages"]["diffusion"] = run_stage(
        model, processor, "diffusion", args.diffusion_steps, args.diffusion_lr,
        ShapesChatData(examples[split:]), args, workdir, **diffusion_padding(args.diffusion_padding),
    )
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    print(f"total training time: {report['total_seconds']:.0f} s", flush=True)

    save_checkpoint(model, processor, args.output, report)
    for leftover in sorted(workdir.rglob("*"), reverse=True):  # the Trainer's scratch folders (no checkpoints saved)
        leftover.rmdir() if leftover.is_dir() else leftover.unlink()
    workdir.rmdir() if workdir.exists() else None
    print(f"saved {args.output}", flush=True)


if __name__ == "__main__":
    main()
