"""Fine-tuning Dimple: the per-stage set-up, LoRA, a Trainer and saving (reference §6).

The data side lives in `training_data.py` (reading files, checks before the model loads) and `training_collator.py`
(what a batch is: lengths, masking, the collator); their public names are importable from here too.

Dimple trains autoregressively first, then as a masked discrete-diffusion model:

| stage       | objective | trains with   | saved model decodes with | trainable                 | lr   | grad clip |
|-------------|-----------|---------------|--------------------------|---------------------------|------|-----------|
| `align`     | AR        | causal        | the input model's mode   | `img_projector`           | 1e-3 | 1.0       |
| `ar`        | AR        | causal        | causal                   | `model`, `lm_head`, proj. | 2e-5 | 1.0       |
| `diffusion` | diffusion | bidirectional | bidirectional            | `model`, `lm_head`        | 5e-6 | 0.01      |

The vision tower (`visual`) is always frozen. The attention a saved model decodes with is its config's
`full_attn_mask`; `build_trainer(..., output_attention="input" | "causal" | "bidirectional")` overrides the stage's
choice (`align` trains only the projector, so its output keeps the attention the input model decodes with). LoRA
runs default to a learning rate of 1e-4 (`LORA_LEARNING_RATE`), which suits adapters better than full fine-tuning's.

Library use (the same path `examples/finetune.py` takes):

```python
from training_dimple import build_trainer, save_final_model, stage_training_arguments

args = stage_training_arguments("diffusion", "out/diffusion", per_device_train_batch_size=1,
                                gradient_accumulation_steps=32, bf16=True)
# Reads and checks every sample, opens every image and measures every sample before anything trains.
trainer = build_trainer(model, processor, "train.jsonl", "diffusion", args, image_folder="images/")
trainer.train()
save_final_model(trainer)  # out/diffusion/final: reloads with AutoModel.from_pretrained(dir, trust_remote_code=True)
end_distributed_run()  # a no-op in one process
```

The output folder: `checkpoint-*/` (optimizer state, to resume), `final/` (the model, processor and a model card:
the folder to push) and, with LoRA, `lora_adapter/` (loads on its own with `peft.AutoPeftModel`).

**One loss for both objectives.** The model's `labels` loss is the shifted next-token cross-entropy
CE(logits[:, :-1], labels[:, 1:]) summed over labels != -100 and divided by `num_items_in_batch`. The collator
decides what it means:

* `objective="ar"`: labels are the answer tokens and their `<|endoftext|>` pads (-100 on the prompt), and the stage
  sets `config.full_attn_mask = False` (causal attention);
* `objective="diffusion"`: per sample t ~ U(eps, 1); each answer position (pads included) becomes `<|mask|>` with
  probability t, and labels keep the original token only where the input is `<|mask|>`. With the bidirectional mask
  this is exactly the diffusion loss of §6.3 (no 1/t weighting, shift by one). `mask_strategy="dual"` returns each
  sample twice with complementary masks (the batch doubles, images included).

**Averaging over gradient accumulation** (a deviation from upstream, reference §7 item 33). transformers 5.23's
Trainer prefetches the micro-batches of one optimizer step, counts `labels[..., 1:] != -100` over all of them (the
model's loss type shifts labels; the collator also keeps position 0 unscored, so either count agrees), sums that
count across processes (`average_tokens_across_devices`, on by default) and passes it to the model as
`num_items_in_batch`; it then skips its own 1/GA division (DeepSpeed's too, `scale_wrt_gas=False`) and multiplies
by the number of processes to undo the data-parallel gradient mean. The gradient is therefore that of the mean loss
over every scored token of the global batch, however the tokens fall into micro-batches. Upstream averaged per
micro-batch and multiplied by 1/GA (1/GA² under DeepSpeed), which weights tokens unevenly and shrinks the gradient;
this matters with the 0.01 clipping threshold of the diffusion stage. A window with nothing scored gives loss 0.
"""

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, enable_full_determinism, logging, set_seed

try:
    from .model_card import write_model_card
    from .processing_dimple import EOS_TOKEN, PAD_TOKEN
    from .training_collator import (
        ANSWER_PADDINGS,
        IGNORE_INDEX,
        MASK_STRATEGIES,
        OBJECTIVES,
        DimpleDataCollator,
        EncodedSample,
        answer_length_bound,
        check_lengths,
        diffusion_mask,
        pre_resize,
    )
    from .training_data import (
        IMAGE_MARKER,
        ChatDataset,
        ChatSample,
        load_samples,
        load_training_data,
        parse_sample,
        read_data_file,
        read_image,
        validate_samples,
    )
except ImportError:  # no parent package: imported from the repository root
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from model_card import write_model_card
    from processing_dimple import EOS_TOKEN, PAD_TOKEN
    from training_collator import (
        ANSWER_PADDINGS,
        IGNORE_INDEX,
        MASK_STRATEGIES,
        OBJECTIVES,
        DimpleDataCollator,
        EncodedSample,
        answer_length_bound,
        check_lengths,
        diffusion_mask,
        pre_resize,
    )
    from training_data import (
        IMAGE_MARKER,
        ChatDataset,
        ChatSample,
        load_samples,
        load_training_data,
        parse_sample,
        read_data_file,
        read_image,
        validate_samples,
    )

logger = logging.get_logger(__name__)

# LoRA targets the decoder's attention and MLP projections only; the vision tower reuses the MLP names.
LORA_TARGET_MODULES = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# Adapters move further from their zero start than full weights do from a trained model: a larger default step.
LORA_LEARNING_RATE = 1e-4
# The attention a saved model decodes with: the input model's, causal, or bidirectional (config.full_attn_mask).
OUTPUT_ATTENTIONS = ("input", "causal", "bidirectional")
# How AutoPeftModel rebuilds the base model of a saved adapter: through AutoModel, which finds Dimple's remote code in
# the base folder, instead of peft's default, the hashed `transformers_modules...` module of the training process.
ADAPTER_AUTO_MAPPING = {"base_model_class": "AutoModel", "parent_library": "transformers"}
# Hub download options that `from_pretrained` leaves in tokenizer_config.json: they describe this machine's cache
# (HF_HUB_OFFLINE gives "local_files_only": true) and would follow the files to the Hub.
MACHINE_LOCAL_KEYS = ("local_files_only", "cache_dir", "proxies", "force_download", "token")
NO_BASE_ID = "a local folder (its Hub id was not given: --base_model_id)"


# ------------------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One training stage of reference §6.4."""

    objective: str
    trainable: tuple[str, ...]
    learning_rate: float
    max_grad_norm: float
    output_attention: str  # what the saved model decodes with, one of OUTPUT_ATTENTIONS

    @property
    def training_attention(self) -> str:
        # The next-token loss needs causal attention; the masked-token loss is defined with bidirectional attention.
        return "bidirectional" if self.objective == "diffusion" else "causal"


STAGES = {
    "align": Stage("ar", ("img_projector",), 1e-3, 1.0, "input"),
    "ar": Stage("ar", ("model", "lm_head", "img_projector"), 2e-5, 1.0, "causal"),
    "diffusion": Stage("diffusion", ("model", "lm_head"), 5e-6, 0.01, "bidirectional"),
}


def get_stage(stage: str) -> Stage:
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose one of {', '.join(STAGES)}.")
    return STAGES[stage]


def output_full_attn_mask(stage: str, output_attention: str | None, input_full_attn_mask: bool) -> bool:
    """The `full_attn_mask` a stage's saved model gets: `output_attention` (default: the stage's choice), where
    `"input"` keeps the input model's."""
    attention = output_attention or get_stage(stage).output_attention
    if attention not in OUTPUT_ATTENTIONS:
        raise ValueError(f"Unknown output_attention {attention!r}; choose one of {', '.join(OUTPUT_ATTENTIONS)}.")
    return bool(input_full_attn_mask) if attention == "input" else attention == "bidirectional"


def attention_name(full_attn_mask: bool) -> str:
    return "bidirectional" if full_attn_mask else "causal"


def configure_stage(model, stage: str):
    """Set the attention mode of `stage` and freeze everything except its trainable modules (in place)."""
    spec = get_stage(stage)
    children = {name for name, _ in model.named_children()}
    missing = set(spec.trainable) - children
    if missing:
        raise ValueError(
            f"The model has no {', '.join(sorted(missing))} module; configure the stage on the Dimple model itself "
            "(before any PEFT wrapping)."
        )
    model.set_attention_kind(bidirectional=spec.objective == "diffusion")
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".", 1)[0] in spec.trainable)
    return model


def lora_config(stage: str, r: int = 16, alpha: int = 32, dropout: float = 0.05):
    """A PEFT `LoraConfig` on the decoder's q/k/v/o and MLP projections.

    In the `ar` stage the projector also trains (fully, as a PEFT `modules_to_save` copy); `lm_head` and the
    embeddings stay frozen. The `align` stage trains only the projector, so LoRA does not apply to it.
    """
    from peft import LoraConfig

    spec = get_stage(stage)
    if "model" not in spec.trainable:
        raise ValueError(
            f"LoRA adapts the language model, which the {stage!r} stage keeps frozen; train it without LoRA."
        )
    full_modules = [name for name in spec.trainable if name not in ("model", "lm_head")]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=full_modules or None,
    )


def prepare_model(model, stage: str, lora=None):
    """`configure_stage`, then wrap the model with PEFT when a `LoraConfig` is given (only the adapters train)."""
    configure_stage(model, stage)
    if lora is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora)


# ------------------------------------------------------------------------------------------------------ trainer


class DimpleTrainer(Trainer):
    """The HF Trainer; the loss is the model's (see the module docstring), the batches the collator's model inputs.

    `processor` is saved next to the model in every checkpoint. It is deliberately not the Trainer's
    `processing_class`: with one, `train()` rewrites the model config's bos/eos ids with the tokenizer's
    (`<|im_start|>` / `<|im_end|>`), while Dimple's config keeps `<|endoftext|>`, which ends its answers.
    """

    def __init__(
        self, *args, processor=None, stage=None, input_full_attn_mask=None, output_full_attn_mask=None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.processor = processor
        self.stage = stage
        self.input_full_attn_mask = input_full_attn_mask
        # What `save_final_model` writes into the saved config (checkpoints keep the training attention).
        self.output_full_attn_mask = output_full_attn_mask
        if callable(getattr(self.data_collator, "set_epoch", None)):
            self.add_callback(CollatorEpochCallback(self.data_collator))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            if self.processor is not None:
                self.processor.save_pretrained(output_dir or self.args.output_dir)
            remove_machine_local_keys(output_dir or self.args.output_dir)


def remove_machine_local_keys(folder) -> None:
    """Drop `MACHINE_LOCAL_KEYS` from the top level of the JSON files in `folder` (rewriting only those that hold
    one), so that a saved folder can be pushed as it is."""
    for path in Path(folder).glob("*.json"):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(content, dict) and any(key in content for key in MACHINE_LOCAL_KEYS):
            kept = {key: value for key, value in content.items() if key not in MACHINE_LOCAL_KEYS}
            path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class CollatorEpochCallback(TrainerCallback):
    """Tells the collator which epoch starts, so each epoch draws new masks; on resume the epoch comes from the
    checkpoint's trainer state, so the collator's random state needs no file of its own."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(math.floor(state.epoch or 0))


def warn_if_single_process(args: TrainingArguments) -> bool:
    """Warn (and return True) when a launcher asked for several processes but this one trains alone.

    Two ways this happens on a machine without a GPU: `accelerate launch --cpu --num_processes N` (with or without
    a MULTI_CPU config) runs the script once, leaving `MASTER_ADDR` for an MPI launcher that never came; and
    `torchrun --nproc_per_node N` starts N processes, but without `use_cpu=True` (which `stage_training_arguments`
    sets when there is no accelerator) transformers makes each of them train alone on the whole data set.
    """
    world_size = os.environ.get("WORLD_SIZE")
    launched = int(world_size) > 1 if world_size else "MASTER_ADDR" in os.environ
    if not launched or args.world_size > 1:
        return False
    logger.warning(
        "A multi-process launch ended up training in a single process (world size 1): this run trains alone, with "
        "a global batch of per_device_train_batch_size x gradient_accumulation_steps. Without a GPU, launch with "
        "`torchrun --nproc_per_node N examples/finetune.py ...` (not `accelerate launch --cpu`) and keep "
        "use_cpu=True in TrainingArguments."
    )
    return True


def stage_defaults(stage: str, *, lora: bool = False) -> dict:
    """The reference §6.4 `TrainingArguments` values of `stage` (`stage_training_arguments` uses them, and
    `examples/finetune.py` sets them as its parser's defaults).

    The stage's learning rate (`LORA_LEARNING_RATE` with `lora=True`) and max grad norm, AdamW (torch), weight
    decay 0, 3 % linear warm-up then linear decay, seed 0, one epoch, no reporting, `use_cpu` when there is no
    accelerator, DDP's `find_unused_parameters` only for the stages that train the projector (a batch without
    images leaves it unused; the diffusion stage uses every trainable weight in every step), and
    `remove_unused_columns=False`: the collator needs the raw `messages` / `images`.
    """
    spec = get_stage(stage)
    return dict(
        learning_rate=LORA_LEARNING_RATE if lora else spec.learning_rate,
        max_grad_norm=spec.max_grad_norm,
        optim="adamw_torch",
        weight_decay=0.0,
        warmup_steps=0.03,
        lr_scheduler_type="linear",
        num_train_epochs=1,
        seed=0,
        report_to="none",
        # Without it, processes started by torchrun on a machine with no accelerator each train alone.
        use_cpu=not torch.accelerator.is_available(),
        ddp_find_unused_parameters="img_projector" in spec.trainable,
        remove_unused_columns=False,
    )


def stage_training_arguments(stage: str, output_dir: str, *, lora: bool = False, **overrides) -> TrainingArguments:
    """`TrainingArguments` with the defaults of `stage` (`stage_defaults`); keyword arguments override them, except
    `remove_unused_columns`, which is always False."""
    values = {**stage_defaults(stage, lora=lora), "output_dir": output_dir, **overrides}
    values["remove_unused_columns"] = False
    return TrainingArguments(**values)


def build_trainer(
    model,
    processor,
    train_dataset,
    stage: str,
    args: TrainingArguments | None = None,
    *,
    lora=None,
    output_attention: str | None = None,
    eval_dataset=None,
    callbacks=None,
    **collator_options,
) -> DimpleTrainer:
    """A ready-to-run `DimpleTrainer` for one stage.

    Args:
        model: a `DimpleForConditionalGeneration` (from this repository or loaded with `trust_remote_code`).
        processor: its `DimpleProcessor`.
        train_dataset: a list of chat samples, a path to a `.json` / `.jsonl` file, or any map-style dataset of
            samples (see `parse_sample` for the layout). Lists and files are validated up front, images included
            (`load_training_data`); a `ChatDataset` from `load_training_data` is taken as already checked.
        stage: `"align"`, `"ar"` or `"diffusion"`: sets the objective, the attention mode and which modules train.
        args: `TrainingArguments`; defaults to `stage_training_arguments(stage, "outputs/<stage>")`.
        lora: a PEFT `LoraConfig` (see `lora_config`) to train adapters instead of full weights.
        output_attention: what the model saved by `save_final_model` decodes with: `"input"` (the input model's
            attention), `"causal"` or `"bidirectional"`; default: the stage's (see the module docstring).
        eval_dataset, callbacks: passed to the Trainer.
        **collator_options: `DimpleDataCollator` options (`image_folder`, `mask_strategy`, `answer_padding`,
            `max_length`, `truncate_answers`, `seed`, ...); `seed` defaults to `args.seed`, `max_length` to the
            model's `max_position_embeddings`. Files and lists are measured against it (`check_lengths`).
    """
    if args is None:
        args = stage_training_arguments(stage, os.path.join("outputs", stage))
    elif args.remove_unused_columns:
        raise ValueError(
            "Set remove_unused_columns=False in TrainingArguments (stage_training_arguments does): the collator "
            "needs the raw 'messages' and 'images' fields."
        )
    positions = model.config.max_position_embeddings
    collator_options = {"seed": args.seed, "max_length": positions, **collator_options}
    collator = DimpleDataCollator(processor, objective=get_stage(stage).objective, **collator_options)
    image_folder = collator_options.get("image_folder")
    train_dataset = load_training_data(train_dataset, image_folder)
    eval_dataset = load_training_data(eval_dataset, image_folder) if eval_dataset is not None else None
    for dataset in (train_dataset, eval_dataset):
        if dataset is not None and dataset.checked:
            check_lengths(dataset, collator, positions)
    # The LoRA weights are drawn when the adapter is created, before the Trainer seeds: seed here.
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
    input_mask = model.config.full_attn_mask
    saved_mask = output_full_attn_mask(stage, output_attention, input_mask)
    logger.warning(
        f"Stage {stage!r} trains with {get_stage(stage).training_attention} attention; the saved model will decode "
        f"with {attention_name(saved_mask)} attention (full_attn_mask={saved_mask}; the input model's is "
        f"{attention_name(input_mask)}). Choose it with output_attention (--output_attention)."
    )
    return DimpleTrainer(
        model=prepare_model(model, stage, lora),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=callbacks,
        processor=processor,
        stage=stage,
        input_full_attn_mask=input_mask,
        output_full_attn_mask=saved_mask,
    )


def save_final_model(
    trainer: Trainer, output_dir: str | None = None, *, adapter_dir: str | None = None, base_model: str | None = None
) -> str:
    """Save the trained model, its processor and a model card, ready to push; returns the folder.

    `output_dir` defaults to `<args.output_dir>/final`, beside (not among) the `checkpoint-*` folders. The saved
    config gets the attention chosen for the stage's output (`build_trainer`'s `output_attention`);
    `AutoModel.from_pretrained(dir, trust_remote_code=True)` loads it. With LoRA the adapter goes to `adapter_dir`
    (default `<args.output_dir>/lora_adapter`) and the merged weights to `output_dir`. `base_model` is the base's
    Hub id, recorded in the adapter config and the cards (default: the model's `name_or_path` when that is a Hub
    id; a local folder is never written into these files, which are meant for the Hub). The cards' title and
    snippet use `args.hub_model_id`, else the name of `args.output_dir`. Files get the usual permissions. Merging
    needs the full weights on one process, which ZeRO-1/2 and DDP have; under FSDP only the adapter is saved (its
    folder is returned). Every process must call it: all of them wait until rank 0 has written everything. Merging
    changes the trainer's model in place.
    """
    output_dir = output_dir or os.path.join(trainer.args.output_dir, "final")
    base_model = check_base_model_id(base_model) or hub_reference(
        getattr(unwrapped_model(trainer), "name_or_path", None)
    )
    facts = {"base model": base_model or NO_BASE_ID, **training_facts(trainer)}
    name = trainer.args.hub_model_id or Path(trainer.args.output_dir).resolve().name
    if callable(getattr(trainer.model, "merge_and_unload", None)):  # a PEFT (LoRA) model
        adapter_dir = adapter_dir or os.path.join(trainer.args.output_dir, "lora_adapter")
        trainer.save_model(adapter_dir)
        if trainer.is_world_process_zero():
            _finish_adapter_folder(trainer, adapter_dir, base_model, facts, f"{name}-lora")
        if trainer.is_fsdp_enabled:
            trainer.accelerator.wait_for_everyone()
            return adapter_dir
        if trainer.is_world_process_zero():
            merged = trainer.model.merge_and_unload()
            _set_output_decoding(trainer, merged)
            merged.save_pretrained(output_dir)
            if getattr(trainer, "processor", None) is not None:
                trainer.processor.save_pretrained(output_dir)
    else:
        _set_output_decoding(trainer, trainer.model)
        trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        _make_pushable(output_dir)
        write_model_card(output_dir, kind="finetuned", base_model=base_model, training=facts, name=name)
        usual_permissions(output_dir)
    # Other ranks must not exit (and tear down their connections) while rank 0 still writes.
    trainer.accelerator.wait_for_everyone()
    return output_dir


def end_distributed_run() -> None:
    """Tear the process group down once every process is done (a no-op in one process).

    A gloo process that exits with its group still up while a peer is busy can abort in a C++ destructor
    ("terminate called without an active exception"), which makes torchrun kill the others; in a bare two-process
    gloo script where rank 0 works one second longer, 2 of 8 runs aborted without this and 0 of 10 with it.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def hub_reference(name_or_path) -> str | None:
    """`name_or_path` when it names a Hub model; None for a local folder or path, which must not follow the files
    to the Hub (and would resolve nowhere else)."""
    if not name_or_path or Path(name_or_path).exists() or Path(name_or_path).is_absolute():
        return None
    return str(name_or_path)


def check_base_model_id(base_model_id):
    """A `--base_model_id` must be a Hub id: a local path would be published with the files."""
    if base_model_id is not None and (Path(base_model_id).is_absolute() or Path(base_model_id).exists()):
        raise ValueError(
            f"base_model_id={base_model_id!r} is a local path; give the base model's Hub id (e.g. "
            "'rp-yu/Dimple-7B'): it is written into the adapter config and model cards that are pushed."
        )
    return base_model_id


def usual_permissions(folder) -> None:
    """Give every file in `folder` the permissions a new file gets (0644 with the usual umask): some writers
    create theirs private (0600), which a shared or served folder cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def unwrapped_model(trainer):
    model = trainer.model
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def _make_pushable(folder) -> None:
    """No machine-local keys, and no pickled `TrainingArguments` (the Trainer's `training_args.bin`, which holds
    this machine's paths; the model card states the training facts instead)."""
    remove_machine_local_keys(folder)
    Path(folder, "training_args.bin").unlink(missing_ok=True)


def _set_output_decoding(trainer, model) -> None:
    """The saved model attends as chosen for the stage's output, and `generate` decodes to match: by diffusion with
    bidirectional attention, left to right with causal attention (diffusion on a causal model garbles answers). Its
    generation config also ends answers at both end tokens, as every folder this package writes does."""
    saved = getattr(trainer, "output_full_attn_mask", None)
    if saved is None:
        return
    model.set_attention_kind(bidirectional=saved)
    model.generation_config.decoding = "diffusion" if saved else "autoregressive"
    processor = getattr(trainer, "processor", None)
    if processor is not None:
        model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids([PAD_TOKEN, EOS_TOKEN])
    logger.warning(
        f"The saved model decodes with {attention_name(saved)} attention (full_attn_mask={saved}); its `generate` "
        f"decodes {'by diffusion' if saved else 'autoregressively'} (generation_config.decoding)."
    )


def _finish_adapter_folder(trainer, adapter_dir, base_model, facts, name) -> None:
    """Make the adapter folder load on its own: its base's Hub id, AutoModel (remote code) as the base class."""
    if base_model is None:
        logger.warning(
            "The base model was loaded from a local folder, so the adapter records no base model (a local path "
            "must not be pushed): pass its Hub id (--base_model_id, library: save_final_model(base_model=...)) for an "
            "adapter that loads with AutoPeftModel, or load it with PeftModel.from_pretrained(base, adapter_folder)."
        )
    config = copy.copy(trainer.model.peft_config["default"])
    config.base_model_name_or_path = base_model
    config.save_pretrained(adapter_dir, auto_mapping_dict=ADAPTER_AUTO_MAPPING)
    _make_pushable(adapter_dir)
    # The adapter carries no config: on its base it decodes with the base's attention.
    base_mask, saved = getattr(trainer, "input_full_attn_mask", None), getattr(trainer, "output_full_attn_mask", None)
    if base_mask is not None:
        facts = {**facts, "decodes with": f"{attention_name(base_mask)} attention (the base model's config)"}
        if saved is not None and saved != base_mask:
            logger.warning(
                f"The adapter loaded on its base decodes with the base's {attention_name(base_mask)} attention; the "
                f"merged folder decodes with {attention_name(saved)} attention."
            )
    write_model_card(adapter_dir, kind="adapter", base_model=base_model, training=facts, name=name)
    usual_permissions(adapter_dir)


def training_facts(trainer) -> dict:
    """What a model card says about the run: stage, attention, data, steps, batch, optimiser, LoRA, last loss."""
    args, state, collator = trainer.args, trainer.state, trainer.data_collator
    stage = getattr(trainer, "stage", None)
    saved = getattr(trainer, "output_full_attn_mask", None)
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    facts = {
        "stage": stage,
        "objective": get_stage(stage).objective if stage else None,
        "trained with attention": get_stage(stage).training_attention if stage else None,
        "decodes with": f"{attention_name(saved)} attention (full_attn_mask={saved})" if saved is not None else None,
        "training samples": len(trainer.train_dataset) if trainer.train_dataset is not None else None,
        "epochs": round(state.epoch, 3) if state.epoch else None,
        "optimizer steps": state.global_step,
        "global batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "learning rate": args.learning_rate,
        "max grad norm": args.max_grad_norm,
        "precision": "bf16 mixed" if args.bf16 else "float32",
        "mask strategy": getattr(collator, "mask_strategy", None) if stage == "diffusion" else None,
        "answer padding": getattr(collator, "answer_padding", None),
        "last logged training loss": round(losses[-1], 5) if losses else None,
    }
    peft_config = getattr(trainer.model, "peft_config", {}).get("default")
    if peft_config is not None:
        facts["LoRA"] = f"r={peft_config.r}, alpha={peft_config.lora_alpha}, dropout={peft_config.lora_dropout}"
    return {key: value for key, value in facts.items() if value is not None}


__all__ = [
    "ANSWER_PADDINGS",
    "IGNORE_INDEX",
    "IMAGE_MARKER",
    "MASK_STRATEGIES",
    "OBJECTIVES",
    "STAGES",
    "ChatDataset",
    "ChatSample",
    "CollatorEpochCallback",
    "DimpleDataCollator",
    "DimpleTrainer",
    "EncodedSample",
    "answer_length_bound",
    "build_trainer",
    "check_base_model_id",
    "check_lengths",
    "configure_stage",
    "diffusion_mask",
    "end_distributed_run",
    "get_stage",
    "hub_reference",
    "load_samples",
    "load_training_data",
    "lora_config",
    "parse_sample",
    "pre_resize",
    "prepare_model",
    "read_data_file",
    "read_image",
    "remove_machine_local_keys",
    "save_final_model",
    "stage_defaults",
    "stage_training_arguments",
    "usual_permissions",
    "validate_samples",
    "warn_if_single_process",
]
