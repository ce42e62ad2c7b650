"""What a Dimple training batch is: sample lengths, the answer padding, the diffusion masking and the collator.

The collator (`DimpleDataCollator`) turns checked samples (`training_data`) into training batches (reference
§6.1); `check_lengths` measures every sample against `max_length` before the model loads. `training_dimple` and
`training_data` re-export the public names of this module.
"""

import math
import os
from dataclasses import dataclass

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from transformers import logging

try:
    from .image_processing_dimple import MAX_ASPECT_RATIO, image_size, read_image
    from .processing_dimple import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN
    from .training_data import (
        IMAGE_MARKER,
        ChatDataset,
        ChatSample,
        describe_sample,
        first_lines,
        parse_sample,
        short_source,
    )
    from .transformers_compat import smart_resize
except ImportError:  # no parent package: imported from the repository root
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from image_processing_dimple import MAX_ASPECT_RATIO, image_size, read_image
    from processing_dimple import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN
    from training_data import (
        IMAGE_MARKER,
        ChatDataset,
        ChatSample,
        describe_sample,
        first_lines,
        parse_sample,
        short_source,
    )
    from transformers_compat import smart_resize

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
ANSWER_PLACEHOLDER = "\x00answer\x00"  # stands for an answer while the chat template renders the prompts
OBJECTIVES = ("ar", "diffusion")
MASK_STRATEGIES = ("single", "dual")
ANSWER_PADDINGS = ("dynamic", "fixed")


# ------------------------------------------------------------------------------------------------------- images


def pre_resize(image: Image.Image, min_pixels: int, max_pixels: int, min_side: int = 28) -> Image.Image:
    """Upstream's training-time resize (reference §4.3), done before the image processor's own `smart_resize`."""
    width, height = pre_resize_size(*image.size, min_pixels, max_pixels, min_side)
    return image if (width, height) == image.size else image.resize((width, height), Image.BICUBIC)


def pre_resize_size(width: int, height: int, min_pixels: int, max_pixels: int, min_side: int = 28) -> tuple[int, int]:
    """The (width, height) `pre_resize` gives an image of this size."""
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
    return width, height


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
class SampleLength:
    """A sample's length in tokens (images expanded, each answer with its first pad), its spans and `max_length`."""

    tokens: int
    segments: list[tuple[str, int, int]]
    max_length: int | None
    truncatable: bool  # a cut at max_length falls inside the last answer and leaves one of its tokens

    @property
    def fits(self) -> bool:
        return self.max_length is None or self.tokens <= self.max_length

    def cut(self) -> str:
        """What a cut at `max_length` removes, e.g. "answer 2 (229 of 300 tokens), image 2 (all 64 tokens)"."""
        removed = []
        for what, start, end in self.segments:
            if end > self.max_length:
                gone = end - max(start, self.max_length)
                removed.append(f"{what} ({'all ' if gone == end - start else ''}{gone} of {end - start} tokens)")
        return ", ".join(removed)

    def describe(self) -> str:
        return (
            f"{self.tokens} tokens (images expanded, each answer with one pad) > max_length={self.max_length}; "
            f"the cut would remove {self.cut()}"
        )


def check_lengths(dataset: "ChatDataset", collator: "DimpleDataCollator", max_positions: int | None = None) -> int:
    """Measure every sample against the collator's `max_length`, and `max_length` against the model's positions,
    before the model loads. All over-long samples are refused in one `ValueError` (file, line, sample, tokens, what
    the cut would remove); with `truncate_answers`, the samples whose cut falls inside their last answer are cut
    instead, and a warning says how many. Returns the number of samples that will be cut."""
    max_length = collator.max_length
    if dataset.measured_for == (max_length, collator.truncate_answers, max_positions):
        return dataset.truncated  # measured already (examples/finetune.py measures before the model loads)
    if max_positions is not None and (max_length is None or max_length > max_positions):
        raise ValueError(
            f"max_length={max_length} exceeds the model's {max_positions} positions (max_position_embeddings): the "
            f"trained model would refuse inputs that long. Use max_length <= {max_positions} (--max_length; the "
            "default is the model's positions)."
        )
    too_long, cut = [], []
    for index in range(len(dataset)):
        length = collator.measure(dataset.samples[index], index)
        if length.fits:
            continue
        if collator.truncate_answers and length.truncatable:
            cut.append(f"{dataset.where(index)}: {length.tokens} tokens; cuts {length.cut()}")
        else:
            too_long.append(f"{dataset.where(index)}: {length.describe()}")
    if too_long:
        fix = (
            "These cuts would reach past the last answer (into a question, an image or an earlier turn), which "
            "truncate_answers never does: shorten or drop these samples, or raise max_length."
            if collator.truncate_answers
            else "Raise max_length (--max_length, at most the model's positions), shorten or drop these samples, or "
            "pass truncate_answers=True (--truncate_answers) to cut the end of the last answer."
        )
        raise ValueError(
            f"{len(too_long)} of {len(dataset)} sample(s) are longer than max_length={max_length}:\n  "
            + "\n  ".join(first_lines(too_long))
            + f"\n{fix}"
        )
    dataset.measured_for, dataset.truncated = (max_length, collator.truncate_answers, max_positions), len(cut)
    if cut:
        logger.warning(
            f"truncate_answers: the last answer of {len(cut)} of {len(dataset)} sample(s) is cut at "
            f"max_length={max_length}:\n  " + "\n  ".join(first_lines(cut))
        )
    return len(cut)


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
        max_length: the most tokens a sample may have (None: no limit; `build_trainer` and `examples/finetune.py`
            default it to the model's `max_position_embeddings`). A sample whose prompts, images and answers (each
            with its first pad) do not fit is refused, named, unless `truncate_answers`; the dynamic padding drawn
            beyond the first pad is shortened to fit.
        truncate_answers: cut over-long samples at `max_length` when the cut falls inside the last answer (keeping
            at least one of its tokens); a cut anywhere else (an earlier turn, a question, an image) is still
            refused. `check_lengths` says how many samples it cuts.
        eps: smallest diffusion mask ratio.
        image_folder: where relative image paths start.
        resize_images: apply upstream's pre-resize (`pre_resize`) with the image processor's pixel bounds.
        seed: seeds the padding and masking draws, which are per sample (see `_sample_generator`).
        system_prompt: system text for samples without a system message.

    Returns (from `__call__`) model inputs only: `input_ids`, `attention_mask`, `labels` (right-padded with the pad
    id / 0 / -100 by `pad_sequence`) and, when the batch has images, `pixel_values` and `image_grid_thw`
    (`encode` gives one sample's `answer_mask` too). Positions are left
    to the model, which computes its M-RoPE index from `input_ids`, `attention_mask` and the grids.
    """

    processor: object
    objective: str = "ar"
    mask_strategy: str = "single"
    answer_padding: str = "dynamic"
    fixed_answer_length: int = 64
    max_length: int | None = None
    truncate_answers: bool = False
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
        if (self.max_length is not None and self.max_length < 2) or self.fixed_answer_length < 1:
            raise ValueError("max_length must be at least 2 and fixed_answer_length at least 1.")
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        self.pad_token_id = self.processor.pad_token_id
        self.mask_token_id = self.processor.mask_token_id
        self.image_token_id = self.processor.image_token_id
        self.vision_start_token_id = self.processor.vision_start_token_id
        self.vision_end_token_id = self.processor.vision_end_token_id
        self.epoch = 0

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
        pixel_values, grids = self._process_images(chat.images, where)
        turns = self._turn_tokens(chat, grids, where)
        lengths = self._fit_padding(turns, self._answer_lengths(turns, generator))

        ids, labels, answer = [], [], []
        for (prompt, reply), length in zip(turns, lengths):
            padded = reply[:length] + [self.pad_token_id] * (length - len(reply))
            ids += prompt + padded
            labels += [IGNORE_INDEX] * len(prompt) + padded
            answer += [False] * len(prompt) + [True] * len(padded)
        cut = self.cut_position(turns, where)
        return EncodedSample(
            torch.tensor(ids[:cut]),
            torch.tensor(labels[:cut]),
            torch.tensor(answer[:cut], dtype=torch.bool),
            pixel_values,
            grids if pixel_values is not None else None,
        )

    def measure(self, sample, index: int = 0, image_folder=None) -> "SampleLength":
        """The length of one sample in tokens, images expanded, each answer with its first pad (the shortest
        padding), from the image sizes alone; what `max_length` would cut. Nothing is drawn or processed."""
        chat = parse_sample(sample, index)
        where = describe_sample(sample, index)
        grids = torch.tensor([self.image_grid(source, image_folder) for source in chat.images], dtype=torch.long)
        grids = grids.reshape(-1, 3)
        turns = self._turn_tokens(chat, grids, where)
        segments = self._segments(turns, self._shortest_answer_lengths(turns))
        return SampleLength(segments[-1][2], segments, self.max_length, self._truncatable(segments))

    def image_grid(self, source, image_folder=None) -> tuple[int, int, int]:
        """The (t, h, w) patch grid an image becomes, from its size alone (the file's header): the grid the
        image processor gives after the pre-resize."""
        width, height = image_size(source, image_folder or self.image_folder)
        processor = self.image_processor
        size = processor.size
        if self.resize_images:
            width, height = pre_resize_size(width, height, size.shortest_edge, size.longest_edge)
        factor = processor.patch_size * processor.merge_size
        height, width = smart_resize(height, width, factor, size.shortest_edge, size.longest_edge)
        return 1, height // processor.patch_size, width // processor.patch_size

    def cut_position(self, turns, where: str) -> int:
        """Where a sample ends: its whole length, or `max_length` inside the last answer (`truncate_answers`)."""
        segments = self._segments(turns, self._shortest_answer_lengths(turns))
        length = SampleLength(segments[-1][2], segments, self.max_length, self._truncatable(segments))
        if length.fits:
            return None
        if self.truncate_answers and length.truncatable:
            return self.max_length
        raise ValueError(f"{where}: {length.describe()}")

    def _turn_tokens(self, chat: ChatSample, grids, where: str) -> list[tuple[list, list]]:
        """(prompt ids with each image expanded by the processor, answer ids) per turn, before padding."""
        images = iter(range(len(chat.images)))
        turns = [
            (self._encode_text(self._expand_images(prompt, grids, images)), self._encode_text(reply))
            for prompt, reply in zip(self._prompts(chat), chat.answers)
        ]
        image_tokens = (grids.prod(-1) // self.image_processor.merge_size**2).tolist()
        self._check_image_tokens([token for prompt, _ in turns for token in prompt], image_tokens, where)
        return turns

    def _shortest_answer_lengths(self, turns) -> list[int]:
        if self.answer_padding == "fixed":
            return [self.fixed_answer_length] * len(turns)
        return [len(reply) + 1 for _, reply in turns]

    def _answer_lengths(self, turns, generator) -> list[int]:
        """Each answer's padded length: `fixed_answer_length`, or drawn from [n + 1, U(n)] (one draw per turn)."""
        if self.answer_padding == "fixed":
            return [self.fixed_answer_length] * len(turns)
        lengths = []
        for _, reply in turns:
            bound = answer_length_bound(len(reply))
            lengths.append(int(torch.randint(len(reply) + 1, bound + 1, (1,), generator=generator)))
        return lengths

    def _fit_padding(self, turns, lengths) -> list[int]:
        """Shorten the drawn padding beyond each answer's first pad, first turns first, so the sample fits
        `max_length` (the draws themselves are unchanged, so later draws do not depend on the cut)."""
        shortest = self._shortest_answer_lengths(turns)
        if self.max_length is None:
            return lengths
        room = self.max_length - sum(len(prompt) for prompt, _ in turns) - sum(shortest)
        fitted = []
        for length, minimum in zip(lengths, shortest):
            extra = max(0, min(length - minimum, room))
            room -= extra
            fitted.append(minimum + extra)
        return fitted

    def _segments(self, turns, answer_lengths) -> list[tuple[str, int, int]]:
        """(what, start, end) token spans of a sample: each turn's question, image blocks and answer."""
        segments, position, image = [], 0, 0
        for turn, ((prompt, _), length) in enumerate(zip(turns, answer_lengths), 1):
            starts = [offset for offset, token in enumerate(prompt) if token == self.vision_start_token_id]
            segments.append((f"question {turn}", position, position + len(prompt)))
            for offset in starts:
                end = prompt.index(self.vision_end_token_id, offset) + 1
                image += 1
                segments.append((f"image {image}", position + offset, position + end))
            position += len(prompt)
            segments.append((f"answer {turn}", position, position + length))
            position += length
        return segments

    def _truncatable(self, segments) -> bool:
        """A cut at max_length falls inside the last answer and leaves at least one of its tokens."""
        if self.max_length is None:
            return True
        _, start, _ = segments[-1]
        return start + 1 <= self.max_length

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prompts(self, chat: ChatSample) -> list[str]:
        """The text before each answer, the sample's messages rendered once by the processor's chat template (the
        one inference prompts come from): the system turn (`system_prompt` when the sample has none), first
        question and assistant header, then each later question and header.

        Each answer is rendered as a placeholder and cut out together with the end-of-turn token that the template
        puts after it: a training answer ends in pads instead.
        """
        messages = [
            {**message, "content": ANSWER_PLACEHOLDER} if message["role"] == "assistant" else message
            for message in chat.messages
        ]
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.processor.apply_chat_template(messages, tokenize=False)
        return text.split(ANSWER_PLACEHOLDER + self.tokenizer.eos_token)[:-1]

    def _expand_images(self, text: str, grids, images) -> str:
        """Each `<|image_pad|>` (as rendered) becomes what the processor's `replace_image_token` makes of the next
        image: its t*h*w/merge² copies, as at inference."""
        pieces = text.split(IMAGE_TOKEN)
        expanded = [self.processor.replace_image_token({"image_grid_thw": grids}, next(images)) for _ in pieces[1:]]
        return "".join([pieces[0]] + [block + piece for block, piece in zip(expanded, pieces[1:])])

    def _process_images(self, sources, where):
        """The images' pixel rows (None without images) and their (t, h, w) grids ([0, 3] without images)."""
        if not sources:
            return None, torch.zeros((0, 3), dtype=torch.long)
        images = []
        for number, source in enumerate(sources):
            try:
                image = read_image(source, self.image_folder)
            except (OSError, ValueError, TypeError, Image.DecompressionBombError) as error:
                raise ValueError(f"{where}: cannot read image {number} ({short_source(source)}): {error}") from error
            if 0 in image.size:
                raise ValueError(
                    f"{where}: image {number} ({short_source(source)}) is empty ({image.width}x{image.height})."
                )
            if self.resize_images:
                size = self.image_processor.size
                image = pre_resize(image, size.shortest_edge, size.longest_edge)
            images.append(image)
        try:
            processed = self.image_processor(images=images, return_tensors="pt")
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
        return processed["pixel_values"], processed["image_grid_thw"]

    def _check_image_tokens(self, ids, image_tokens, where):
        # Literal vision special tokens written in the text would shift the image features; refuse them.
        if ids.count(self.image_token_id) != sum(image_tokens) or ids.count(self.vision_start_token_id) != len(
            image_tokens
        ):
            raise ValueError(
                f"{where}: the text contains Dimple's vision special tokens (<|vision_start|>, <|image_pad|>); "
                f"mark images with {IMAGE_MARKER} only."
            )

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
                rows[0].append((encoded.input_ids, encoded.labels))
            else:
                variants = diffusion_mask(
                    encoded.input_ids, encoded.answer_mask, self.mask_token_id, generator, self.mask_strategy, self.eps
                )
                for copy, variant in zip(rows, variants):
                    copy.append(variant)
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
        """Right-pad the rows: `<|endoftext|>` ids, attention 0 and labels -100 after each row's end."""
        input_ids, labels = zip(*rows)
        return {
            "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence([torch.ones_like(ids) for ids in input_ids], batch_first=True),
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        }


__all__ = [
    "ANSWER_PADDINGS",
    "IGNORE_INDEX",
    "MASK_STRATEGIES",
    "OBJECTIVES",
    "DimpleDataCollator",
    "EncodedSample",
    "SampleLength",
    "answer_length_bound",
    "check_lengths",
    "diffusion_mask",
    "pre_resize",
    "pre_resize_size",
]
