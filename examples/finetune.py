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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModel, AutoProcessor, HfArgumentParser, TrainingArguments

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
    stage_defaults,
    warn_if_single_process,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")
# TrainingArguments defaults of this command line besides the stage's (`stage_defaults`).
CLI_DEFAULTS = {"per_device_train_batch_size": 1, "logging_steps": 10}
logger = logging.getLogger("finetune")


@dataclass
class DimpleArguments:
    """Dimple's own options; every `TrainingArguments` option (`--learning_rate`, `--bf16`, `--deepspeed`,
    `--hub_model_id`, ...) is accepted too, with the stage's defaults where the stage has one."""

    model: str = field(metadata={"help": "Dimple checkpoint folder or Hub id (remote code)."})
    data: str = field(
        metadata={"help": "Training samples: .json (a list), .jsonl, .parquet, .csv or a datasets.save_to_disk folder."}
    )
    stage: str = field(metadata={"choices": list(STAGES), "help": "align, ar or diffusion."})
    processor: Optional[str] = field(default=None, metadata={"help": "Processor folder or Hub id (default: --model)."})
    image_folder: Optional[str] = field(default=None, metadata={"help": "Folder that relative image paths start from."})
    mask_strategy: Optional[str] = field(
        default=None, metadata={"choices": MASK_STRATEGIES, "help": "Diffusion stage only (default single)."}
    )
    answer_padding: str = field(default="dynamic", metadata={"choices": ANSWER_PADDINGS})
    fixed_answer_length: Optional[int] = field(
        default=None, metadata={"help": "Answer length for --answer_padding fixed (64)."}
    )
    max_length: Optional[int] = field(
        default=None, metadata={"help": "Longest sample in tokens, images expanded (default: the model's positions)."}
    )
    truncate_answers: bool = field(
        default=False,
        metadata={"help": "Cut over-long samples inside their last answer instead of refusing them (never a "
                  "question or image)."},  # fmt: skip
    )
    dtype: str = field(default="float32", metadata={"choices": list(DTYPES), "help": "Dtype the weights load in."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the decoder instead of all weights."})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    base_model_id: Optional[str] = field(
        default=None,
        metadata={"help": "The Hub id of the base model, recorded in the adapter config and model cards (default: "
                  "--model when it is a Hub id; a local folder is never written into a file meant for the Hub)."},
    )  # fmt: skip
    output_attention: Optional[str] = field(
        default=None,
        metadata={"choices": OUTPUT_ATTENTIONS, "help": "What the saved model decodes with: the input model's "
                  "attention, causal or bidirectional (default: input after align, causal after ar, bidirectional "
                  "after diffusion)."},
    )  # fmt: skip


def checkpoint_or_last(value):
    """`--resume_from_checkpoint`: a checkpoint folder, or true (the output folder's last checkpoint) / false."""
    if value is None or value.lower() in TRUE + FALSE:
        return value is not None and value.lower() in TRUE or None
    return value


def parse_args(argv=None) -> tuple[DimpleArguments, TrainingArguments]:
    """Dimple's options and `TrainingArguments`, parsed by `HfArgumentParser`; the TrainingArguments defaults are
    the stage's (`stage_defaults`: learning rate, grad clip, ...), so they depend on `--stage` and `--lora`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    stage_only = argparse.ArgumentParser(add_help=False)
    stage_only.add_argument("--stage", choices=list(STAGES))
    stage_only.add_argument("--lora", nargs="?", const="true", default="false")
    known, _ = stage_only.parse_known_args(argv)
    parser = HfArgumentParser((DimpleArguments, TrainingArguments), description=__doc__.split("\n", 1)[0])
    if known.stage is not None:
        parser.set_defaults(**stage_defaults(known.stage, lora=known.lora.lower() in TRUE), **CLI_DEFAULTS)
    return parser.parse_args_into_dataclasses(argv)


def check_stage_options(args: DimpleArguments, training: TrainingArguments) -> None:
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
    if training.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay false: the collator needs the raw samples.")


def main(argv=None):
    """Run one stage; returns the trainer (its model is the trained one)."""
    args, training_args = parse_args(argv)
    check_stage_options(args, training_args)
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
    trainer.train(resume_from_checkpoint=checkpoint_or_last(training_args.resume_from_checkpoint))
    save_final_model(trainer, base_model=args.base_model_id)
    end_distributed_run()
    return trainer


if __name__ == "__main__":
    main()
