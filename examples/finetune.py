"""Fine-tune Dimple on image-text chat data, one stage at a time (autoregressive, then diffusion; reference §6).

Data: a `.json` list or a `.jsonl` file of samples (UTF-8; `.parquet`, `.csv` and `datasets.save_to_disk` folders
through `datasets`, see docs/fine-tuning.md)

    {"messages": [{"role": "user", "content": "<image>What is in the picture?"},
                  {"role": "assistant", "content": "A red square."}],
     "images": ["shapes/0001.png"]}

(LLaVA's `{"conversations": [{"from": "human"|"gpt", "value": ...}], "image": ...}` and transformers' content parts
`[{"type": "image"}, {"type": "text", ...}]` work too). Image paths are relative to `--image_folder`. Each `<image>`
marker takes the next image. `"<image>" + question`, with nothing
between them, is the layout the chat template gives inference prompts and the one `checkpoints/dimple-shapes` was
trained on (`shapes/train.py`). Every file is parsed, every image opened and every sample measured in tokens (images
expanded) before the model loads: a malformed line, a file in another encoding, a missing or corrupt image, an
empty file or a sample longer than `--max_length` (default: the model's positions) stops the run at once, naming the
file, line and sample; `--truncate_answers` cuts over-long answers at their end instead (never a question or image).

Stages (each starts from the previous stage's final model):

    python examples/finetune.py --model PATH --data align.jsonl --image_folder images \\
        --stage align --output_dir out/align
    python examples/finetune.py --model out/align/final --data sft.jsonl --image_folder images \\
        --stage ar --output_dir out/ar
    python examples/finetune.py --model out/ar/final --data sft.jsonl --image_folder images \\
        --stage diffusion --mask_strategy dual --output_dir out/diffusion

`align` trains the projector, `ar` the LM + lm_head + projector (both causal, next-token loss), `diffusion` the
LM + lm_head with bidirectional attention and the masked-token loss; the vision tower stays frozen. The learning
rate and max grad norm default to the stage's values (1e-3 / 2e-5 / 5e-6 and 1.0 / 1.0 / 0.01; 1e-4 with
`--lora`). `--lora` trains LoRA adapters on the decoder's attention and MLP projections instead of full weights.

The saved model decodes with the attention in its config (`full_attn_mask`): after `align`, the input model's;
after `ar`, causal; after `diffusion`, bidirectional. `--output_attention input|causal|bidirectional` chooses it;
the run logs it and the model card states it.

Output (`--output_dir out`):

    out/final/          the model, processor and model card: the folder to push (`hf upload me/model out/final`)
    out/lora_adapter/   with --lora: the adapter alone, with its card; `AutoPeftModel.from_pretrained(
                        "out/lora_adapter", trust_remote_code=True)` loads it on its base, recorded by its Hub id
                        (--base_model_id, or --model when that is one; never a local path)

`--hub_model_id me/model` names the cards and their snippets after the repository you push to (default: the name
of `--output_dir`).
    out/checkpoint-*/   optimizer state to resume from (`--resume_from_checkpoint True` takes the last); not for
                        pushing

`out/final` reloads with `AutoModel.from_pretrained("out/final", trust_remote_code=True)` and
`AutoProcessor.from_pretrained("out/final", trust_remote_code=True)`.

Multi-GPU runs go through the Hugging Face Trainer and accelerate:

    # DDP (4 GPUs)
    accelerate launch --num_processes 4 examples/finetune.py ... --bf16
    # DeepSpeed ZeRO-1 as upstream (ZeRO-2: examples/configs/zero2.json); also works with `deepspeed` / `torchrun`
    accelerate launch --num_processes 4 examples/finetune.py ... --bf16 --deepspeed examples/configs/zero1.json
    # FSDP2 (edit num_processes in the YAML)
    accelerate launch --config_file examples/configs/fsdp.yaml examples/finetune.py ... --bf16

The upstream global batch of 128 on 4 GPUs is `--per_device_train_batch_size 1 --gradient_accumulation_steps 32`
for the diffusion stage (dual masking doubles the per-device batch). The loss is averaged over every scored token
of the accumulation window and all processes, whatever the micro-batching (see `training_dimple`). On CPUs use
`torchrun --nproc_per_node N examples/finetune.py ...` (gloo). Every process waits for rank 0's final save (and
merge) and then tears the process group down. DDP looks for unused parameters only in the stages that train the
projector (a batch without images leaves it unused); `--ddp_find_unused_parameters true|false` overrides that.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training_dimple import (  # noqa: E402
    ANSWER_PADDINGS,
    MASK_STRATEGIES,
    OUTPUT_ATTENTIONS,
    STAGES,
    DimpleDataCollator,
    build_trainer,
    check_base_model_id,
    check_lengths,
    end_distributed_run,
    load_training_data,
    lora_config,
    save_final_model,
    stage_training_arguments,
    warn_if_single_process,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")
logger = logging.getLogger("finetune")


def boolean(value: str) -> bool:
    if value.lower() in TRUE + FALSE:
        return value.lower() in TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def checkpoint_or_last(value: str):
    """`--resume_from_checkpoint`: a checkpoint folder, or true (the output folder's last checkpoint) / false."""
    if value.lower() in TRUE + FALSE:
        return value.lower() in TRUE or None
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", required=True, help="Dimple checkpoint folder or Hub id (remote code).")
    parser.add_argument("--processor", help="Processor folder or Hub id (default: --model).")
    parser.add_argument(
        "--data",
        required=True,
        help="Training samples: .json (a list), .jsonl, .parquet, .csv or a datasets.save_to_disk folder.",
    )
    parser.add_argument("--image_folder", help="Folder that relative image paths start from.")
    parser.add_argument("--stage", required=True, choices=list(STAGES))
    parser.add_argument("--output_dir", required=True)

    data = parser.add_argument_group("data")
    data.add_argument("--mask_strategy", choices=MASK_STRATEGIES, help="Diffusion stage only (default single).")
    data.add_argument("--answer_padding", default="dynamic", choices=ANSWER_PADDINGS)
    data.add_argument("--fixed_answer_length", type=int, help="Answer length for --answer_padding fixed (64).")
    data.add_argument(
        "--max_length", type=int, help="Longest sample in tokens, images expanded (default: the model's positions)."
    )
    data.add_argument(
        "--truncate_answers",
        action="store_true",
        help="Cut over-long samples inside their last answer instead of refusing them (never a question or image).",
    )
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    optim = parser.add_argument_group("optimisation (defaults: the stage's values)")
    optim.add_argument("--optim", default="adamw_torch", help="A TrainingArguments optimizer name (e.g. sgd).")
    optim.add_argument("--learning_rate", type=float, help="Default: the stage's, or 1e-4 with --lora.")
    optim.add_argument("--max_grad_norm", type=float)
    optim.add_argument("--warmup_steps", type=float, default=0.03, help="Steps, or a fraction of all steps if < 1.")
    optim.add_argument("--per_device_train_batch_size", type=int, default=1)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--num_train_epochs", type=float, default=1.0)
    optim.add_argument("--max_steps", type=int, default=-1, help="Overrides --num_train_epochs when > 0.")
    optim.add_argument("--seed", type=int, default=0)

    hardware = parser.add_argument_group("precision, memory and parallelism")
    hardware.add_argument("--dtype", default="float32", choices=list(DTYPES), help="Dtype the weights load in.")
    hardware.add_argument("--bf16", action="store_true", help="bf16 mixed precision.")
    hardware.add_argument("--gradient_checkpointing", action="store_true")
    hardware.add_argument("--deepspeed", help="DeepSpeed JSON config (examples/configs/zero1.json or zero2.json).")
    hardware.add_argument(
        "--ddp_find_unused_parameters", type=boolean, help="true|false; default true for align and ar, else false."
    )

    lora = parser.add_argument_group("LoRA (PEFT)")
    lora.add_argument("--lora", action="store_true", help="Train LoRA adapters on the decoder instead of all weights.")
    lora.add_argument("--lora_r", type=int, default=16)
    lora.add_argument("--lora_alpha", type=int, default=32)
    lora.add_argument("--lora_dropout", type=float, default=0.05)
    lora.add_argument(
        "--base_model_id",
        help="The Hub id of the base model, recorded in the adapter config and model cards (default: --model when "
        "it is a Hub id; a local folder is never written into a file meant for the Hub).",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--hub_model_id", help="The Hub id the output will be pushed to: the model card's title and snippet use it."
    )
    output.add_argument(
        "--output_attention",
        choices=OUTPUT_ATTENTIONS,
        help="What the saved model decodes with: the input model's attention, causal or bidirectional (default: "
        "input after align, causal after ar, bidirectional after diffusion).",
    )

    run = parser.add_argument_group("checkpoints and logging")
    run.add_argument("--save_steps", type=int, default=500)
    run.add_argument("--save_total_limit", type=int)
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--report_to", default="none", help="'none', 'tensorboard', 'wandb', ...")
    run.add_argument(
        "--resume_from_checkpoint",
        type=checkpoint_or_last,
        help="A checkpoint folder of this run to continue from, or true for the last one in --output_dir.",
    )
    return parser.parse_args(argv)


def check_stage_options(args: argparse.Namespace) -> None:
    """Refuse options the stage cannot use, and warn about ones that have no effect, before anything loads."""
    diffusion = STAGES[args.stage].objective == "diffusion"
    if args.mask_strategy == "dual" and not diffusion:
        raise ValueError(
            f"--mask_strategy dual applies to the diffusion stage only; the {args.stage!r} stage masks nothing. "
            "Drop the option or use --stage diffusion."
        )
    if args.fixed_answer_length is not None and args.answer_padding != "fixed":
        logger.warning("--fixed_answer_length has no effect without --answer_padding fixed.")
    check_base_model_id(args.base_model_id)
    if not args.lora and args.base_model_id is not None:
        logger.warning("--base_model_id is recorded in the model card only (it also names a LoRA adapter's base).")


def training_overrides(args: argparse.Namespace) -> dict:
    """TrainingArguments values from the command line; unset optimisation values keep the stage defaults."""
    overrides = dict(
        lora=args.lora,
        optim=args.optim,
        warmup_steps=args.warmup_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        seed=args.seed,
        bf16=args.bf16,
        activation_checkpointing=args.gradient_checkpointing,
        deepspeed=args.deepspeed,
        dataloader_num_workers=args.dataloader_num_workers,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        hub_model_id=args.hub_model_id,
    )
    for name in ("learning_rate", "max_grad_norm", "ddp_find_unused_parameters"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return overrides


def main(argv=None):
    """Run one stage; returns the trainer (its model is the trained one)."""
    args = parse_args(argv)
    check_stage_options(args)
    lora = lora_config(args.stage, args.lora_r, args.lora_alpha, args.lora_dropout) if args.lora else None
    # Every sample parsed and every image opened, then every sample measured with the light processor and config,
    # before the (possibly large) model loads.
    dataset = load_training_data(args.data, args.image_folder)
    processor = AutoProcessor.from_pretrained(args.processor or args.model, trust_remote_code=True)
    positions = AutoConfig.from_pretrained(args.model, trust_remote_code=True).max_position_embeddings
    collator_options = dict(
        image_folder=args.image_folder,
        mask_strategy=args.mask_strategy or "single",
        answer_padding=args.answer_padding,
        fixed_answer_length=args.fixed_answer_length or 64,
        max_length=args.max_length or positions,
        truncate_answers=args.truncate_answers,
    )
    measuring = DimpleDataCollator(processor, objective=STAGES[args.stage].objective, **collator_options)
    check_lengths(dataset, measuring, positions)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=DTYPES[args.dtype])
    training_args = stage_training_arguments(args.stage, args.output_dir, **training_overrides(args))
    warn_if_single_process(training_args)
    trainer = build_trainer(
        model,
        processor,
        dataset,
        args.stage,
        training_args,
        lora=lora,
        output_attention=args.output_attention,
        **collator_options,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    save_final_model(trainer, base_model=args.base_model_id)
    end_distributed_run()
    return trainer


if __name__ == "__main__":
    main()
