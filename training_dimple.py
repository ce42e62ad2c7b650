"""Fine-tuning Dimple: chat data, the training collator, the per-stage set-up and a Trainer (reference §6).

Dimple trains autoregressively first, then as a masked discrete-diffusion model:

| stage       | objective | attention     | trainable                       | lr   | max grad norm |
|-------------|-----------|---------------|---------------------------------|------|---------------|
| `align`     | AR        | causal        | `img_projector`                 | 1e-3 | 1.0           |
| `ar`        | AR        | causal        | `model` + `lm_head` + projector | 2e-5 | 1.0           |
| `diffusion` | diffusion | bidirectional | `model` + `lm_head`             | 5e-6 | 0.01          |

The vision tower (`visual`) is always frozen.

Library use (the same path `examples/finetune.py` takes):

```python
from training_dimple import build_trainer, save_final_model, stage_training_arguments

args = stage_training_arguments("diffusion", "out/diffusion", per_device_train_batch_size=1,
                                gradient_accumulation_steps=32, bf16=True)
trainer = build_trainer(model, processor, "train.jsonl", "diffusion", args, image_folder="images/")
trainer.train()
save_final_model(trainer)  # reloads with AutoModel.from_pretrained(dir, trust_remote_code=True)
```

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

import io
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
    from .image_processing_dimple import MAX_ASPECT_RATIO
    from .processing_dimple import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from image_processing_dimple import MAX_ASPECT_RATIO
    from processing_dimple import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN

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


# ------------------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One training stage of reference §6.4."""

    objective: str
    trainable: tuple[str, ...]
    learning_rate: float
    max_grad_norm: float


STAGES = {
    "align": Stage("ar", ("img_projector",), 1e-3, 1.0),
    "ar": Stage("ar", ("model", "lm_head", "img_projector"), 2e-5, 1.0),
    "diffusion": Stage("diffusion", ("model", "lm_head"), 5e-6, 0.01),
}


def get_stage(stage: str) -> Stage:
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose one of {', '.join(STAGES)}.")
    return STAGES[stage]


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
    model.config.full_attn_mask = spec.objective == "diffusion"
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
    return ROLE_NAMES[role], content


def validate_samples(samples) -> None:
    """Check every sample's structure up front (roles, markers vs images, empty answers); images are not opened."""
    for index in range(len(samples)):
        parse_sample(samples[index], index)


def load_samples(path) -> list[dict]:
    """Read a JSON list (`.json`) or one JSON object per line (`.jsonl`)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        samples = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {line_number}: invalid JSON ({error}).") from error
        return samples
    samples = json.loads(text)
    if not isinstance(samples, list):
        raise ValueError(f"{path}: expected a JSON list of samples (or use .jsonl with one sample per line).")
    return samples


class ChatDataset(Dataset):
    """Map-style dataset over chat samples that tags each item with its index, so data errors can name it."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return {**self.samples[index], "sample_index": index}


def read_image(source, image_folder=None) -> Image.Image:
    """Open an image given as a PIL image, raw bytes, a path (relative paths start at `image_folder`) or a
    `{"bytes", "path"}` dict (the Hugging Face `datasets` image layout); returns it in RGB."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray)):
        image = Image.open(io.BytesIO(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if image_folder is not None and not path.is_absolute():
            path = Path(image_folder) / path
        image = Image.open(path)
    else:
        raise TypeError(f"unsupported image source of type {type(source).__name__}")
    return image.convert("RGB")


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

    def __init__(self, *args, processor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.processor = processor
        if callable(getattr(self.data_collator, "set_epoch", None)):
            self.add_callback(CollatorEpochCallback(self.data_collator))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {key: value for key, value in inputs.items() if key not in COLLATOR_ONLY_KEYS}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.processor is not None and self.args.should_save:
            self.processor.save_pretrained(output_dir or self.args.output_dir)


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


def stage_training_arguments(stage: str, output_dir: str, **overrides) -> TrainingArguments:
    """`TrainingArguments` with the reference §6.4 defaults of `stage`; keyword arguments override them.

    Defaults: the stage's learning rate and max grad norm, AdamW (torch), weight decay 0, 3 % linear warm-up then
    linear decay, seed 0, one epoch, no reporting, `use_cpu` when there is no accelerator. `remove_unused_columns`
    is always False: the collator needs the raw `messages` / `images`.
    """
    spec = get_stage(stage)
    values = dict(
        output_dir=output_dir,
        learning_rate=spec.learning_rate,
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
    eval_dataset=None,
    callbacks=None,
    **collator_options,
) -> DimpleTrainer:
    """A ready-to-run `DimpleTrainer` for one stage.

    Args:
        model: a `DimpleForConditionalGeneration` (from this repository or loaded with `trust_remote_code`).
        processor: its `DimpleProcessor`.
        train_dataset: a list of chat samples, a path to a `.json` / `.jsonl` file, or any map-style dataset of
            samples (see `parse_sample` for the layout). Lists and files are validated up front.
        stage: `"align"`, `"ar"` or `"diffusion"`: sets the objective, the attention mode and which modules train.
        args: `TrainingArguments`; defaults to `stage_training_arguments(stage, "outputs/<stage>")`.
        lora: a PEFT `LoraConfig` (see `lora_config`) to train adapters instead of full weights.
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
    return DimpleTrainer(
        model=prepare_model(model, stage, lora),
        args=args,
        train_dataset=_as_dataset(train_dataset),
        eval_dataset=_as_dataset(eval_dataset) if eval_dataset is not None else None,
        data_collator=collator,
        callbacks=callbacks,
        processor=processor,
    )


def _as_dataset(data):
    if isinstance(data, (str, os.PathLike)):
        data = load_samples(data)
    if isinstance(data, list):
        # Fail before training starts; other datasets (possibly lazy, with decoded images) are checked per batch.
        validate_samples(data)
    return data if isinstance(data, ChatDataset) else ChatDataset(data)


def save_final_model(trainer: Trainer, output_dir: str | None = None) -> str:
    """Save the trained model (and processor) so `AutoModel.from_pretrained(dir, trust_remote_code=True)` loads it.

    With LoRA the adapter goes to `<dir>/lora_adapter` and the merged weights to `<dir>`. Merging needs the full
    weights on one process, which ZeRO-1/2 and DDP have; under FSDP only the adapter is saved. Call it after
    training: merging changes the trainer's model in place.
    """
    output_dir = output_dir or trainer.args.output_dir
    if not callable(getattr(trainer.model, "merge_and_unload", None)):  # not a PEFT (LoRA) model
        trainer.save_model(output_dir)
        return output_dir
    trainer.save_model(os.path.join(output_dir, "lora_adapter"))
    if trainer.is_fsdp_enabled:
        return os.path.join(output_dir, "lora_adapter")
    if trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(output_dir)
        if getattr(trainer, "processor", None) is not None:
            trainer.processor.save_pretrained(output_dir)
    return output_dir


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
    "get_stage",
    "load_samples",
    "lora_config",
    "parse_sample",
    "pre_resize",
    "prepare_model",
    "read_image",
    "save_final_model",
    "stage_training_arguments",
    "validate_samples",
    "warn_if_single_process",
]
