"""Fine-tuning Dimple: chat data, the training collator, the per-stage set-up and a Trainer (reference §6).

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
# Reads and checks every sample and opens every image before anything trains.
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
from PIL import Image
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, logging

logger = logging.get_logger(__name__)

try:
    from .image_processing_dimple import MAX_ASPECT_RATIO, read_image
    from .model_card import write_model_card
    from .processing_dimple import DEFAULT_SYSTEM_PROMPT, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, VISION_TOKENS
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from image_processing_dimple import MAX_ASPECT_RATIO, read_image
    from model_card import write_model_card
    from processing_dimple import DEFAULT_SYSTEM_PROMPT, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, VISION_TOKENS

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
ANSWER_PLACEHOLDER = "\x00answer\x00"  # stands for an answer while the chat template renders the prompts
ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
OBJECTIVES = ("ar", "diffusion")
MASK_STRATEGIES = ("single", "dual")
ANSWER_PADDINGS = ("dynamic", "fixed")
# Batch keys the collator returns for inspection that the model does not take.
COLLATOR_ONLY_KEYS = ("answer_mask",)
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


# --------------------------------------------------------------------------------------------------------- data


@dataclass
class ChatSample:
    """A validated conversation: the system text (None when absent), (user, assistant) turns, image sources."""

    system: str | None
    turns: list[tuple[str, str]]
    images: list


def describe_sample(sample, index) -> str:
    sample_id = sample.get("id") if isinstance(sample, dict) else None
    return f"Sample {index}" + (f" (id {sample_id!r})" if sample_id is not None else "")


def parse_sample(sample, index: int = 0) -> ChatSample:
    """Validate one chat sample and return its turns.

    Accepted layouts: `{"messages": [{"role", "content"}], "images": [...]}` and LLaVA's
    `{"conversations": [{"from": "human"|"gpt", "value"}], "image": path}`. Turns alternate user, assistant
    (an optional system message may come first); every `<image>` marker in user text takes the next image.
    Raises ValueError naming the sample for anything else.
    """
    where = describe_sample(sample, index)
    if not isinstance(sample, dict):
        raise ValueError(f"{where}: expected a dict with 'messages' and 'images', got {type(sample).__name__}.")
    messages = sample.get("messages", sample.get("conversations"))
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts.")
    images = sample.get("images", sample.get("image")) or []
    images = list(images) if isinstance(images, (list, tuple)) else [images]

    system, turns, user = None, [], None
    for position, message in enumerate(messages):
        role, content = _role_and_content(message, f"{where}, message {position}")
        if role == "system":
            if position:
                raise ValueError(f"{where}, message {position}: a system message may only come first.")
            system = content
        elif role == "user":
            if user is not None:
                raise ValueError(f"{where}, message {position}: two user turns in a row; turns must alternate.")
            user = content
        else:
            if user is None:
                raise ValueError(f"{where}, message {position}: an assistant turn must follow a user turn.")
            if not content.strip():
                raise ValueError(f"{where}, message {position}: empty assistant answer.")
            if IMAGE_MARKER in content:
                raise ValueError(f"{where}, message {position}: {IMAGE_MARKER} markers belong in user turns.")
            turns.append((user, content))
            user = None
    if user is not None:
        raise ValueError(f"{where}: the conversation ends with a user turn that has no assistant answer.")
    if system is not None and IMAGE_MARKER in system:
        raise ValueError(f"{where}: {IMAGE_MARKER} markers belong in user turns, not in the system message.")

    markers = sum(question.count(IMAGE_MARKER) for question, _ in turns)
    if markers != len(images):
        problem = "more" if markers > len(images) else "fewer"
        raise ValueError(
            f"{where}: {markers} {IMAGE_MARKER} marker(s) but {len(images)} image(s) ({problem} markers than "
            "images); put one marker in the user text for each image."
        )
    return ChatSample(system, turns, images)


def chat_parts(text: str) -> list[dict]:
    """User text with `<image>` markers as chat-template content parts: text, image, text..."""
    parts = []
    for position, piece in enumerate(text.split(IMAGE_MARKER)):
        if position:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _role_and_content(message, where):
    if not isinstance(message, dict):
        raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}.")
    role = message.get("role", message.get("from"))
    content = message.get("content", message.get("value"))
    if role not in ROLE_NAMES:
        raise ValueError(
            f"{where}: unknown role {role!r}; use 'user' or 'assistant' (or LLaVA's 'human' / 'gpt'), and "
            "'system' only as the first message."
        )
    if not isinstance(content, str):
        raise ValueError(f"{where}: content must be a string, got {type(content).__name__}.")
    literal = [token for token in VISION_TOKENS if token in content]
    if literal:
        raise ValueError(
            f"{where}: the text holds {', '.join(literal)}, which the processor writes itself for each image; "
            f"remove it and mark each image with {IMAGE_MARKER}."
        )
    return ROLE_NAMES[role], content


def validate_samples(samples, image_folder=None, *, check_images: bool = True, locations=None) -> None:
    """Check a whole data set before anything trains (and before the model loads, in `examples/finetune.py`).

    Every sample's structure is checked (roles, `<image>` markers against images, empty answers, literal vision
    tokens): the first bad one raises, named. With `check_images`, every image is then opened once and all the
    missing, unreadable or empty ones are reported in one `ValueError`. `locations` names each sample in messages
    (`read_data_file` gives the file and line); an empty data set is refused.
    """
    if len(samples) == 0:
        raise ValueError("The training data holds no samples; give at least one (see `parse_sample` for the layout).")
    parsed = []
    for index in range(len(samples)):
        try:
            parsed.append(parse_sample(samples[index], index))
        except ValueError as error:
            if locations is None:
                raise
            raise ValueError(f"{locations[index]}: {error}") from None
    if not check_images:
        return
    problems, missing_files, count = [], False, 0
    for index, chat in enumerate(parsed):
        where = describe_sample(samples[index], index)
        where = f"{locations[index]} ({where[0].lower()}{where[1:]})" if locations is not None else where
        for number, source in enumerate(chat.images):
            count += 1
            problem = image_problem(source, image_folder)
            if problem:
                problems.append(f"{where}, image {number} ({_short(source)}): {problem}")
                missing_files |= problem.startswith("no such file")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(
            f"{len(problems)} of {count} training image(s) cannot be used:\n  "
            + "\n  ".join(shown)
            + "\n"
            + _image_fix(missing_files, image_folder)
        )


def image_problem(source, image_folder=None) -> str | None:
    """Why an image source cannot be trained on (None when it can): opens and decodes it once."""
    try:
        image = read_image(source, image_folder)
    except FileNotFoundError as error:
        return f"no such file {error.filename or source}"
    except (OSError, ValueError, TypeError, Image.DecompressionBombError) as error:
        return f"cannot be read ({error})"
    if 0 in image.size:
        return f"empty ({image.width}x{image.height})"
    return None


def _image_fix(missing_files: bool, image_folder) -> str:
    if not missing_files:
        return "Fix or remove these samples."
    if image_folder is None:
        return (
            f"Relative image paths start at the current directory ({os.getcwd()}); pass image_folder "
            "(--image_folder in examples/finetune.py) with the folder they are relative to."
        )
    return (
        f"Relative image paths start at image_folder={str(image_folder)!r} (--image_folder); check that it is the "
        "folder the paths are relative to."
    )


DATA_SUFFIXES = (".json", ".jsonl")


def read_data_file(path) -> tuple[list, list[str]]:
    """The samples of a `.json` file (one JSON list) or a `.jsonl` file (one JSON object per line), and where each
    one is (`"data.jsonl, line 12"`) for error messages. Errors name the file, the line and the fix."""
    path = Path(path)
    if path.suffix not in DATA_SUFFIXES:
        raise ValueError(f"{path}: training data must be a .json file (a list of samples) or a .jsonl file (one "
                         "sample per line).")  # fmt: skip
    if not path.is_file():
        raise ValueError(f"{path}: no such training data file; check the path (--data in examples/finetune.py).")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        samples, locations = [], []
        for line_number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path}, line {line_number}: invalid JSON ({error.msg}, column {error.colno}); a .jsonl file "
                        "holds one complete JSON sample per line."
                    ) from None
                locations.append(f"{path}, line {line_number}")
    else:
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as error:
            hint = (
                "the file holds several JSON values, one sample per line: rename it to .jsonl, or put the samples "
                "in one JSON list"
                if error.msg == "Extra data"
                else "a .json file holds one JSON list of samples"
            )
            raise ValueError(
                f"{path}, line {error.lineno} column {error.colno}: invalid JSON ({error.msg}); {hint}."
            ) from None
        if not isinstance(samples, list):
            raise ValueError(
                f"{path}: expected a JSON list of samples, got a {type(samples).__name__}; put the samples in a list "
                "(or use .jsonl with one sample per line)."
            )
        locations = [str(path)] * len(samples)  # messages name the sample's index after the file
    if not samples:
        raise ValueError(f"{path} holds no samples; it needs at least one (see `parse_sample` for the layout).")
    return samples, locations


def load_samples(path) -> list[dict]:
    """Read a JSON list (`.json`) or one JSON object per line (`.jsonl`); see `read_data_file`."""
    return read_data_file(path)[0]


def load_training_data(data, image_folder=None) -> "ChatDataset":
    """A checked `ChatDataset` from a `.json` / `.jsonl` path or a list of samples (`validate_samples`, images
    included); other datasets (possibly lazy, with decoded images) are wrapped as they are and checked per batch."""
    if isinstance(data, ChatDataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        samples, locations = read_data_file(data)
        validate_samples(samples, image_folder, locations=locations)
        return ChatDataset(samples)
    if isinstance(data, list):
        validate_samples(data, image_folder)
    return ChatDataset(data)


class ChatDataset(Dataset):
    """Map-style dataset over chat samples that tags each item with its index, so data errors can name it."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return {**self.samples[index], "sample_index": index}


def pre_resize(image: Image.Image, min_pixels: int, max_pixels: int, min_side: int = 28) -> Image.Image:
    """Upstream's training-time resize (reference §4.3), done before the image processor's own `smart_resize`."""
    width, height = image.size
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = int(width * scale), int(height * scale)
    elif width * height < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        width, height = math.ceil(width * scale), math.ceil(height * scale)
    width, height = max(width, min_side), max(height, min_side)
    # The vision tower rejects aspect ratios above MAX_ASPECT_RATIO (200); upstream clamps them to 180:1.
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        width, height = (height * 180, height) if width > height else (width, width * 180)
    return image if (width, height) == image.size else image.resize((width, height), Image.BICUBIC)


# ------------------------------------------------------------------------------------------------------ masking


def answer_length_bound(num_tokens: int) -> int:
    """U(n) of the dynamic padding rule: 2^ceil(log2(n + 1)) for n < 16, else 16 * (n // 16 + 1) (both > n)."""
    return 1 << num_tokens.bit_length() if num_tokens < 16 else 16 * (num_tokens // 16 + 1)


def diffusion_mask(
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    strategy: str = "single",
    eps: float = 1e-3,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mask one sample's answer for the diffusion loss (reference §6.3).

    Draws t = (1 - eps) * u + eps, then one uniform per position; a position is masked where it is an answer
    position and its uniform is below t. `"dual"` adds the complementary copy (answer positions whose uniform is
    >= t), so every answer token is masked in exactly one copy.

    Returns a list with one `(input_ids, labels)` pair per copy: `<|mask|>` at masked positions in the inputs, and
    the original token at masked positions (-100 elsewhere) in the labels.
    """
    if strategy not in MASK_STRATEGIES:
        raise ValueError(f"Unknown mask strategy {strategy!r}; choose one of {', '.join(MASK_STRATEGIES)}.")
    t = (1 - eps) * torch.rand(1, generator=generator) + eps
    below = torch.rand(input_ids.shape, generator=generator) < t
    selections = [answer_mask & below]
    if strategy == "dual":
        selections.append(answer_mask & ~below)
    return [
        (input_ids.masked_fill(selected, mask_token_id), input_ids.masked_fill(~selected, IGNORE_INDEX))
        for selected in selections
    ]


# ----------------------------------------------------------------------------------------------------- collator


@dataclass
class EncodedSample:
    """One sample as token rows (before masking and batch padding) plus its images' patches and grids."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    answer_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


@dataclass
class DimpleDataCollator:
    """Turn chat samples into Dimple training batches (reference §6.1).

    The prompts are rendered by the processor's chat template, the one that builds inference prompts:
    `<|im_start|>system\\n{system}<|im_end|>`, then per turn `\\n<|im_start|>user\\n{question}<|im_end|>\\n`
    `<|im_start|>assistant\\n` and the answer tokens **without** `<|im_end|>`, followed by `<|endoftext|>` pads.
    Each `<image>` becomes `<|vision_start|>`, t*h*w/merge² `<|image_pad|>`, `<|vision_end|>`. Labels are -100
    except on answers and their pads; `answer_mask` marks the same positions.

    Args:
        processor: a `DimpleProcessor` (its chat template, `.tokenizer` and `.image_processor`).
        objective: `"ar"` (labels on answers) or `"diffusion"` (answers masked, labels only on masked slots).
        mask_strategy: `"single"` or `"dual"` (complementary copies; doubles the batch, images included).
        answer_padding: `"dynamic"` (total answer length drawn from [n + 1, U(n)], see `answer_length_bound`) or
            `"fixed"` (pad or truncate every answer to `fixed_answer_length`). Answers always end in pads, never in
            `<|im_end|>`: that is how a diffusion answer of N slots learns to stop early.
        max_length: sequences are truncated to this many tokens (answers may be cut); an image block that does not
            fit is dropped whole, with its pixels.
        eps: smallest diffusion mask ratio.
        image_folder: where relative image paths start.
        resize_images: apply upstream's pre-resize (`pre_resize`) with the image processor's pixel bounds.
        seed: seeds the padding and masking draws, which are per sample (see `_sample_generator`).
        system_prompt: system text for samples without a system message.

    Returns (from `__call__`): `input_ids`, `attention_mask`, `labels` (right-padded with the pad id / 0 / -100),
    `answer_mask` (bool) and, when the batch has images, `pixel_values` and `image_grid_thw`. Positions are left
    to the model, which computes its M-RoPE index from `input_ids`, `attention_mask` and the grids.
    """

    processor: object
    objective: str = "ar"
    mask_strategy: str = "single"
    answer_padding: str = "dynamic"
    fixed_answer_length: int = 64
    max_length: int = 1024
    eps: float = 1e-3
    image_folder: str | os.PathLike | None = None
    resize_images: bool = True
    seed: int = 0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self):
        for name, value, choices in (
            ("objective", self.objective, OBJECTIVES),
            ("mask_strategy", self.mask_strategy, MASK_STRATEGIES),
            ("answer_padding", self.answer_padding, ANSWER_PADDINGS),
        ):
            if value not in choices:
                raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(choices)}.")
        if self.objective == "ar" and self.mask_strategy != "single":
            raise ValueError(
                f"mask_strategy={self.mask_strategy!r} applies to the diffusion objective only (the ar objective "
                "masks nothing); leave it at 'single' or train the diffusion stage."
            )
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}.")
        if self.max_length < 2 or self.fixed_answer_length < 1:
            raise ValueError("max_length must be at least 2 and fixed_answer_length at least 1.")
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        self.pad_token_id = self._token_id("<|endoftext|>")
        self.mask_token_id = self._token_id("<|mask|>")
        self.image_token_id = self._token_id("<|image_pad|>")
        self.vision_start_token_id = self._token_id("<|vision_start|>")
        self.epoch = 0

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ValueError(f"The tokenizer has no {token} token, which Dimple's training format needs.")
        return token_id

    def set_epoch(self, epoch: int) -> None:
        """Draw the masks of `epoch` (as a sampler's `set_epoch`); `DimpleTrainer` calls it at every epoch start."""
        self.epoch = epoch

    def _sample_generator(self, index: int) -> torch.Generator:
        """The padding and masking draws of one sample, a function of the seed, the sample's dataset index and the
        epoch only: masks do not depend on how samples fall into batches, processes, DataLoader workers or
        accumulation steps, and a run resumed from a checkpoint (which holds the epoch) draws what an
        uninterrupted one would. Samples collated without a dataset index use their position in the batch."""
        return torch.Generator().manual_seed(hash((self.seed, index, self.epoch)) % 2**63)

    # ---------------------------------------------------------------------------------------------- samples

    def encode(self, sample, index: int = 0, generator: torch.Generator | None = None) -> EncodedSample:
        """Token rows, labels and answer mask of one sample (AR view; no diffusion masking, no batch padding)."""
        chat = parse_sample(sample, index)
        where = describe_sample(sample, index)
        pixel_values, grids, image_tokens = self._process_images(chat.images, where)
        blocks = iter(image_tokens)

        ids, labels, answer = [], [], []

        def append(tokens, is_answer):
            ids.extend(tokens)
            labels.extend(tokens if is_answer else [IGNORE_INDEX] * len(tokens))
            answer.extend([is_answer] * len(tokens))

        system = chat.system if chat.system is not None else self.system_prompt
        for prompt, (_, reply) in zip(self._prompts(system, chat.turns), chat.turns):
            append(self._encode_text(self._expand_images(prompt, blocks)), False)
            append(self._pad_answer(self._encode_text(reply), generator), True)

        self._check_image_tokens(ids, image_tokens, where)
        full_length = len(ids)
        ids, labels, answer, kept = self._truncate(ids, labels, answer, image_tokens)
        if not any(answer):
            raise ValueError(
                f"{where}: max_length={self.max_length} cuts off every answer token (the sample has {full_length} "
                "tokens), so it has nothing to learn; raise max_length or shorten the prompt."
            )
        if kept < len(image_tokens):
            pixel_values = pixel_values[: int(grids[:kept].prod(-1).sum())] if kept else None
            grids = grids[:kept] if kept else None
        return EncodedSample(
            torch.tensor(ids), torch.tensor(labels), torch.tensor(answer, dtype=torch.bool), pixel_values, grids
        )

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prompts(self, system: str, turns) -> list[str]:
        """The text before each answer, rendered by the processor's chat template (the one inference prompts come
        from): the system turn, first question and assistant header, then each later question and header.

        Each answer is rendered as a placeholder and cut out together with the end-of-turn token that the template
        puts after it: a training answer ends in pads instead.
        """
        messages = [{"role": "system", "content": system}]
        for question, _ in turns:
            messages.append({"role": "user", "content": chat_parts(question)})
            messages.append({"role": "assistant", "content": ANSWER_PLACEHOLDER})
        text = self.processor.apply_chat_template(messages, tokenize=False)
        return text.split(ANSWER_PLACEHOLDER + self.tokenizer.eos_token)[:-1]

    def _expand_images(self, text: str, blocks) -> str:
        """One `<|image_pad|>` per image (as rendered) becomes the image's t*h*w/merge² copies."""
        pieces = text.split(IMAGE_TOKEN)
        return "".join([pieces[0]] + [IMAGE_TOKEN * next(blocks) + piece for piece in pieces[1:]])

    def _pad_answer(self, tokens: list[int], generator) -> list[int]:
        if self.answer_padding == "fixed":
            tokens = tokens[: self.fixed_answer_length]
            return tokens + [self.pad_token_id] * (self.fixed_answer_length - len(tokens))
        bound = answer_length_bound(len(tokens))
        total = int(torch.randint(len(tokens) + 1, bound + 1, (1,), generator=generator))
        return tokens + [self.pad_token_id] * (total - len(tokens))

    def _process_images(self, sources, where):
        if not sources:
            return None, None, []
        images = []
        for number, source in enumerate(sources):
            try:
                image = read_image(source, self.image_folder)
            except (OSError, ValueError, TypeError, Image.DecompressionBombError) as error:
                raise ValueError(f"{where}: cannot read image {number} ({_short(source)}): {error}") from error
            if 0 in image.size:
                raise ValueError(f"{where}: image {number} ({_short(source)}) is empty ({image.width}x{image.height}).")
            if self.resize_images:
                size = self.image_processor.size
                image = pre_resize(image, size.shortest_edge, size.longest_edge)
            images.append(image)
        try:
            processed = self.image_processor(images=images, return_tensors="pt")
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
        grids = processed["image_grid_thw"]
        tokens = (grids.prod(-1) // self.image_processor.merge_size**2).tolist()
        return processed["pixel_values"], grids, tokens

    def _check_image_tokens(self, ids, image_tokens, where):
        # Literal vision special tokens written in the text would shift the image features; refuse them.
        if ids.count(self.image_token_id) != sum(image_tokens) or ids.count(self.vision_start_token_id) != len(
            image_tokens
        ):
            raise ValueError(
                f"{where}: the text contains Dimple's vision special tokens (<|vision_start|>, <|image_pad|>); "
                f"mark images with {IMAGE_MARKER} only."
            )

    def _truncate(self, ids, labels, answer, image_tokens):
        """Cut to `max_length`, moving the cut before an image block it would split; returns the images kept."""
        cut, kept = min(len(ids), self.max_length), 0
        starts = [position for position, token in enumerate(ids) if token == self.vision_start_token_id]
        for start, count in zip(starts, image_tokens):
            if start + count + 1 < cut:  # the block ends with <|vision_end|> at start + count + 1
                kept += 1
            else:
                cut = min(cut, start)
                break
        return ids[:cut], labels[:cut], answer[:cut], kept

    # ------------------------------------------------------------------------------------------------ batch

    def __call__(self, features) -> dict[str, torch.Tensor]:
        copies = 2 if self.objective == "diffusion" and self.mask_strategy == "dual" else 1
        rows = [[] for _ in range(copies)]
        pixel_values, grids = [], []
        for position, feature in enumerate(features):
            index, sample = position, feature
            if isinstance(feature, dict) and "sample_index" in feature:
                sample = {key: value for key, value in feature.items() if key != "sample_index"}
                index = feature["sample_index"]
            generator = self._sample_generator(index)
            encoded = self.encode(sample, index, generator)
            if self.objective == "ar":
                rows[0].append((encoded.input_ids, encoded.labels, encoded.answer_mask))
            else:
                variants = diffusion_mask(
                    encoded.input_ids, encoded.answer_mask, self.mask_token_id, generator, self.mask_strategy, self.eps
                )
                for copy, (input_ids, labels) in zip(rows, variants):
                    copy.append((input_ids, labels, encoded.answer_mask))
            if encoded.pixel_values is not None:
                pixel_values.append(encoded.pixel_values)
                grids.append(encoded.image_grid_thw)

        # Dual copies follow each other as whole batches; the model scatters image features batch-major, so the
        # pixel rows repeat in the same order.
        batch = self._pad([row for copy in rows for row in copy])
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values * copies)
            batch["image_grid_thw"] = torch.cat(grids * copies)
        return batch

    def _pad(self, rows) -> dict[str, torch.Tensor]:
        width = max(len(input_ids) for input_ids, _, _ in rows)
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
            "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
            "answer_mask": torch.zeros(len(rows), width, dtype=torch.bool),
        }
        for row, (input_ids, labels, answer_mask) in enumerate(rows):
            length = len(input_ids)
            batch["input_ids"][row, :length] = input_ids
            batch["attention_mask"][row, :length] = 1
            batch["labels"][row, :length] = labels
            batch["answer_mask"][row, :length] = answer_mask
        return batch


def _short(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"{len(source)} bytes"
    if isinstance(source, Image.Image):
        return "PIL image"
    return repr(source) if len(repr(source)) < 200 else repr(source)[:200] + "..."


# ------------------------------------------------------------------------------------------------------ trainer


class DimpleTrainer(Trainer):
    """The HF Trainer, minus the collator-only batch keys; the loss is the model's (see the module docstring).

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {key: value for key, value in inputs.items() if key not in COLLATOR_ONLY_KEYS}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

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


def stage_training_arguments(stage: str, output_dir: str, *, lora: bool = False, **overrides) -> TrainingArguments:
    """`TrainingArguments` with the reference §6.4 defaults of `stage`; keyword arguments override them.

    Defaults: the stage's learning rate (`LORA_LEARNING_RATE` with `lora=True`) and max grad norm, AdamW (torch),
    weight decay 0, 3 % linear warm-up then linear decay, seed 0, one epoch, no reporting, `use_cpu` when there is
    no accelerator, and DDP's `find_unused_parameters` only for the stages that train the projector (a batch
    without images leaves it unused; the diffusion stage uses every trainable weight in every step).
    `remove_unused_columns` is always False: the collator needs the raw `messages` / `images`.
    """
    spec = get_stage(stage)
    values = dict(
        output_dir=output_dir,
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
    )
    values.update(overrides)
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
            `max_length`, `seed`, ...); `seed` defaults to `args.seed`.
    """
    if args is None:
        args = stage_training_arguments(stage, os.path.join("outputs", stage))
    elif args.remove_unused_columns:
        raise ValueError(
            "Set remove_unused_columns=False in TrainingArguments (stage_training_arguments does): the collator "
            "needs the raw 'messages' and 'images' fields."
        )
    collator = DimpleDataCollator(
        processor, objective=get_stage(stage).objective, **{"seed": args.seed, **collator_options}
    )
    image_folder = collator_options.get("image_folder")
    train_dataset = load_training_data(train_dataset, image_folder)
    eval_dataset = load_training_data(eval_dataset, image_folder) if eval_dataset is not None else None
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
    (default `<args.output_dir>/lora_adapter`), with its base recorded as `base_model` (default: the model's
    `name_or_path`, made absolute when it is a local folder; pass the Hub id when pushing), and the merged weights to
    `output_dir`. Merging needs the full weights on one process, which ZeRO-1/2 and DDP have; under FSDP only the
    adapter is saved (its folder is returned). Every process must call it: all of them wait until rank 0 has
    written everything. Merging changes the trainer's model in place.
    """
    output_dir = output_dir or os.path.join(trainer.args.output_dir, "final")
    base_model = base_model or resolvable_reference(getattr(unwrapped_model(trainer), "name_or_path", None))
    facts = {"base model": base_model, **training_facts(trainer)} if base_model else training_facts(trainer)
    if callable(getattr(trainer.model, "merge_and_unload", None)):  # a PEFT (LoRA) model
        adapter_dir = adapter_dir or os.path.join(trainer.args.output_dir, "lora_adapter")
        trainer.save_model(adapter_dir)
        if trainer.is_world_process_zero():
            _finish_adapter_folder(trainer, adapter_dir, base_model, facts)
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
        write_model_card(output_dir, kind="finetuned", base_model=hub_id(base_model), training=facts)
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


def resolvable_reference(name_or_path) -> str | None:
    """A base-model reference that resolves from any working directory: an absolute path for a local folder,
    else the name as given (a Hub id); None when the model was not loaded from anywhere."""
    if not name_or_path:
        return None
    return str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else str(name_or_path)


def hub_id(reference) -> str | None:
    """The reference when it names a Hub model; None for a local folder, which the card's `base_model` metadata
    (a Hub link) cannot hold (the training table still names it)."""
    return None if reference is None or Path(reference).is_dir() else reference


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


def _finish_adapter_folder(trainer, adapter_dir, base_model, facts) -> None:
    """Make the adapter folder load on its own: a resolvable base, AutoModel (remote code) as the base class."""
    if base_model is None:
        logger.warning(
            "The model was not loaded from a folder or Hub id, so the adapter records no base model; pass "
            "base_model= to save_final_model for an adapter that loads with AutoPeftModel."
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
    write_model_card(adapter_dir, kind="adapter", base_model=hub_id(base_model), training=facts)


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
    "STAGES",
    "ChatDataset",
    "ChatSample",
    "CollatorEpochCallback",
    "DimpleDataCollator",
    "DimpleTrainer",
    "EncodedSample",
    "answer_length_bound",
    "build_trainer",
    "configure_stage",
    "diffusion_mask",
    "end_distributed_run",
    "get_stage",
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
    "stage_training_arguments",
    "validate_samples",
    "warn_if_single_process",
]
