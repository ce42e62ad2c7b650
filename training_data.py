"""The data side of fine-tuning Dimple: reading data files, checking samples before the model loads, the collator.

`training_dimple` holds the stages, LoRA, the Trainer and saving, and re-exports the public names of this module.

Reading (`read_data_file`): `.json` (one list) and `.jsonl` (one sample per line) in UTF-8 with or without a BOM,
suffixes in any case; other encodings are refused with the file, line, byte offset and the fix. Parquet, CSV and
`datasets.save_to_disk` folders are read through `datasets`. Checking (`validate_samples`, `check_lengths`): every
sample's structure and images, then its length in tokens with its images expanded, all before the model loads.
The collator (`DimpleDataCollator`) turns checked samples into training batches (reference §6.1).
"""

import codecs
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset
from transformers import logging

try:
    from .image_processing_dimple import MAX_ASPECT_RATIO, image_size, read_image
    from .processing_dimple import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, VISION_TOKENS
    from .transformers_compat import smart_resize
except ImportError:  # no parent package: imported from the repository root
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from image_processing_dimple import MAX_ASPECT_RATIO, image_size, read_image
    from processing_dimple import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, VISION_TOKENS
    from transformers_compat import smart_resize

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
ANSWER_PLACEHOLDER = "\x00answer\x00"  # stands for an answer while the chat template renders the prompts
ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
OBJECTIVES = ("ar", "diffusion")
MASK_STRATEGIES = ("single", "dual")
ANSWER_PADDINGS = ("dynamic", "fixed")


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
    A content may also be a list of transformers chat parts, `{"type": "text", "text": ...}` and `{"type": "image"}`
    (an image part stands where a marker would; it may carry its image as `"image"`, `"path"` or `"url"`, and then
    every image part must, with no `"images"` list beside them). Raises ValueError naming the sample for anything else.
    """
    where = describe_sample(sample, index)
    if not isinstance(sample, dict):
        raise ValueError(f"{where}: expected a dict with 'messages' and 'images', got {type(sample).__name__}.")
    messages = sample.get("messages", sample.get("conversations"))
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts.")
    images = sample.get("images", sample.get("image")) or []
    images = list(images) if isinstance(images, (list, tuple)) else [images]

    system, turns, user, inline, image_parts = None, [], None, [], 0
    for position, message in enumerate(messages):
        role, content, parts_images, parts = _role_and_content(message, f"{where}, message {position}")
        inline += parts_images
        image_parts += parts
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
    if inline:
        if images or len(inline) != image_parts:
            raise ValueError(
                f"{where}: {len(inline)} of {image_parts} image part(s) carry their image and the sample lists "
                f"{len(images)} in 'images'; give every image part its image (and no 'images'), or none of them."
            )
        images = inline

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
    parts_images, image_parts = [], 0
    if isinstance(content, list):
        content, parts_images, image_parts = _text_of_parts(content, where)
    if not isinstance(content, str):
        raise ValueError(
            f"{where}: content must be a string or a list of {{'type': 'text' | 'image'}} parts, got "
            f"{type(content).__name__}."
        )
    literal = [token for token in VISION_TOKENS if token in content]
    if literal:
        raise ValueError(
            f"{where}: the text holds {', '.join(literal)}, which the processor writes itself for each image; "
            f"remove it and mark each image with {IMAGE_MARKER}."
        )
    return ROLE_NAMES[role], content, parts_images, image_parts


def _text_of_parts(parts: list, where: str) -> tuple[str, list, int]:
    """transformers' chat content parts as text with `<image>` markers (joined as written, so `[image, text]`
    gives `"<image>" + text`, the inference layout), the images the parts carry, and the number of image parts."""
    texts, images, image_parts = [], [], 0
    for number, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image":
            texts.append(IMAGE_MARKER)
            image_parts += 1
            source = next((part[key] for key in ("image", "path", "url") if part.get(key) is not None), None)
            images += [] if source is None else [source]
        else:
            raise ValueError(
                f"{where}, part {number}: a content part is {{'type': 'text', 'text': ...}} or {{'type': 'image'}} "
                f"(optionally with its 'image', 'path' or 'url'), got {part!r:.200}."
            )
    return "".join(texts), images, image_parts


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
        raise ValueError(
            f"{len(problems)} of {count} training image(s) cannot be used:\n  "
            + "\n  ".join(_first(problems))
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
DATASETS_SUFFIXES = (".parquet", ".csv")
# Columns of a flat table (CSV, or parquet / a `datasets` folder without a 'messages' column): one question each.
TABLE_COLUMNS = ("question", "answer")
TABLE_OPTIONAL_COLUMNS = ("image", "system", "id")
# Byte-order marks of encodings other than UTF-8, longest first (UTF-32 LE starts with UTF-16 LE's mark).
FOREIGN_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def read_data_file(path) -> tuple[list, list[str]]:
    """The samples of a data file or folder, and where each one is (`"data.jsonl, line 12"`) for error messages.

    `.json` (one JSON list) and `.jsonl` (one JSON object per line) are read as UTF-8, with or without a BOM;
    `.parquet`, `.csv` and `datasets.save_to_disk` folders through `datasets` (rows in the sample layout, or flat
    `question`, `answer` [, `image`, `system`, `id`] rows). Suffixes are matched in any case. Errors name the file,
    the line (or row) and the fix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_dataset_folder(path)
    if suffix not in DATA_SUFFIXES + DATASETS_SUFFIXES:
        raise ValueError(
            f"{path}: training data must be a .json file (a list of samples), a .jsonl file (one sample per line), "
            ".parquet, .csv (columns question, answer and optionally image, system, id) or a "
            "`datasets.save_to_disk` folder. Convert other tables with pandas, e.g. "
            f"`pd.read_excel('{path.name}').to_csv('{path.stem}.csv', index=False)`."
        )
    if not path.is_file():
        raise ValueError(f"{path}: no such training data file; check the path (--data in examples/finetune.py).")
    if suffix in DATASETS_SUFFIXES:
        return _read_table_file(path, suffix)
    text = _utf8_text(path)
    samples, locations = _json_lines(path, text) if suffix == ".jsonl" else _json_list(path, text)
    if not samples:
        raise ValueError(f"{path} holds no samples; it needs at least one (see `parse_sample` for the layout).")
    return samples, locations


def _utf8_text(path: Path) -> str:
    """The file as text: UTF-8 with or without a BOM; anything else refused with where it fails and the fix."""
    raw = path.read_bytes()
    for bom, name in FOREIGN_BOMS:
        if raw.startswith(bom):
            raise ValueError(
                f'{path} is {name}-encoded (it starts with a {name} byte-order mark; Windows Notepad\'s "Unicode" '
                f"saves this way), and training data must be UTF-8. Save it as UTF-8 (Notepad: Save as, Encoding "
                f"UTF-8), or convert it: `iconv -f {name} -t UTF-8 {path.name} > {path.stem}-utf8{path.suffix}`."
            )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}, line {line}: byte 0x{raw[error.start]:02x} at byte offset {error.start} is not UTF-8 "
            f"({error.reason}); the file is in another encoding (often Latin-1 or Windows-1252). Save it as UTF-8, "
            f"e.g. `iconv -f WINDOWS-1252 -t UTF-8 {path.name} > {path.stem}-utf8{path.suffix}`."
        ) from None


def _json_lines(path: Path, text: str) -> tuple[list, list[str]]:
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
    return samples, locations


def _json_list(path: Path, text: str) -> tuple[list, list[str]]:
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
    return samples, [str(path)] * len(samples)  # messages name the sample's index after the file


def _datasets_module(path: Path):
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{path}: reading it needs the `datasets` package (`pip install datasets`); or convert it to JSON Lines "
            'where `datasets` is installed: `python -c "import datasets; '
            f"datasets.load_dataset('{'csv' if path.suffix.lower() == '.csv' else 'parquet'}', "
            f"data_files='{path.name}')['train'].to_json('{path.stem}.jsonl')\"` (flat question/answer rows then "
            "need the messages layout, see docs/fine-tuning.md)."
        ) from None
    return datasets


def _read_table_file(path: Path, suffix: str) -> tuple[list, list[str]]:
    datasets = _datasets_module(path)
    reader = datasets.Dataset.from_csv if suffix == ".csv" else datasets.Dataset.from_parquet
    try:
        dataset = reader(str(path), keep_in_memory=True)
    except Exception as error:  # datasets and pyarrow raise many kinds; the user needs the file and the reason
        raise ValueError(
            f"{path}: cannot be read as {suffix[1:]} ({type(error).__name__}: {error}); check that it is a "
            f"{suffix[1:]} file with at least one row."
        ) from error
    return _dataset_rows(path, dataset)


def _read_dataset_folder(path: Path) -> tuple[list, list[str]]:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise ValueError(
            f"{path} is a folder but not a `datasets.save_to_disk` folder (it has no state.json or "
            "dataset_dict.json); give that folder, or a .json, .jsonl, .parquet or .csv file."
        )
    dataset = _datasets_module(path).load_from_disk(str(path))
    if hasattr(dataset, "keys"):  # a DatasetDict
        if "train" not in dataset:
            raise ValueError(
                f"{path} holds the splits {', '.join(dataset)} but no 'train' split; give the split's own folder "
                f"({path}/<split>) to train on it."
            )
        dataset, path = dataset["train"], path / "train"
    return _dataset_rows(path, dataset)


def _dataset_rows(path: Path, dataset) -> tuple[list, list[str]]:
    """The rows of a `datasets.Dataset` as samples; flat question/answer tables become one-turn chats."""
    columns = set(dataset.column_names)
    flat = not ({"messages", "conversations"} & columns)
    if flat and not set(TABLE_COLUMNS) <= columns:
        raise ValueError(
            f"{path}: a table of training data needs a 'messages' column (the sample layout) or the columns "
            f"{', '.join(TABLE_COLUMNS)} (and optionally {', '.join(TABLE_OPTIONAL_COLUMNS)}); it has "
            f"{', '.join(sorted(columns)) or 'none'}."
        )
    rows = [dict(row) for row in dataset]
    samples = [_table_sample(row) for row in rows] if flat else rows
    if not samples:
        raise ValueError(f"{path} holds no samples; it needs at least one (see `parse_sample` for the layout).")
    return samples, [f"{path}, row {number}" for number in range(len(samples))]


def _table_sample(row: dict) -> dict:
    """A flat row (question, answer, optional image, system, id) as a one-turn chat; the image goes first."""
    question, image = row["question"], row.get("image")
    if image is not None and isinstance(question, str) and IMAGE_MARKER not in question:
        question = IMAGE_MARKER + question
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": row["answer"]}]
    sample = {"messages": messages, "images": [] if image is None else [image]}
    return sample if row.get("id") is None else {**sample, "id": row["id"]}


def load_samples(path) -> list[dict]:
    """The samples of a data file or folder; see `read_data_file`."""
    return read_data_file(path)[0]


def load_training_data(data, image_folder=None) -> "ChatDataset":
    """A checked `ChatDataset` from a path (see `read_data_file`) or a list of samples (`validate_samples`, images
    included); other datasets (possibly lazy, with decoded images) are wrapped as they are and checked per batch."""
    if isinstance(data, ChatDataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        samples, locations = read_data_file(data)
        validate_samples(samples, image_folder, locations=locations)
        return ChatDataset(samples, locations, checked=True)
    if isinstance(data, list):
        validate_samples(data, image_folder)
        return ChatDataset(data, checked=True)
    return ChatDataset(data)


class ChatDataset(Dataset):
    """Map-style dataset over chat samples that tags each item with its index, so data errors can name it.

    `locations` names each sample's file and line for messages; `checked` says `validate_samples` passed.
    """

    def __init__(self, samples, locations=None, checked: bool = False):
        self.samples = samples
        self.locations = locations
        self.checked = checked
        self.measured_for, self.truncated = None, 0  # set by check_lengths

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return {**self.samples[index], "sample_index": index}

    def where(self, index: int) -> str:
        """ "data.jsonl, line 14 (sample 13)", or "Sample 13" without a file."""
        described = describe_sample(self.samples[index], index)
        if self.locations is None:
            return described
        return f"{self.locations[index]} ({described[0].lower()}{described[1:]})"


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
            + "\n  ".join(_first(too_long))
            + f"\n{fix}"
        )
    dataset.measured_for, dataset.truncated = (max_length, collator.truncate_answers, max_positions), len(cut)
    if cut:
        logger.warning(
            f"truncate_answers: the last answer of {len(cut)} of {len(dataset)} sample(s) is cut at "
            f"max_length={max_length}:\n  " + "\n  ".join(_first(cut))
        )
    return len(cut)


def _first(lines: list[str], count: int = 20) -> list[str]:
    return lines[:count] + ([f"... and {len(lines) - count} more"] if len(lines) > count else [])


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
        self.pad_token_id = self._token_id("<|endoftext|>")
        self.mask_token_id = self.processor.mask_token_id
        self.image_token_id = self.processor.image_token_id
        self.vision_start_token_id = self._token_id("<|vision_start|>")
        self.vision_end_token_id = self._token_id("<|vision_end|>")
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
        system = chat.system if chat.system is not None else self.system_prompt
        images = iter(range(len(chat.images)))
        turns = [
            (self._encode_text(self._expand_images(prompt, grids, images)), self._encode_text(reply))
            for prompt, (_, reply) in zip(self._prompts(system, chat.turns), chat.turns)
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
                raise ValueError(f"{where}: cannot read image {number} ({_short(source)}): {error}") from error
            if 0 in image.size:
                raise ValueError(
                    f"{where}: image {number} ({_short(source)}) is empty ({image.width}x{image.height})."
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


def _short(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"{len(source)} bytes"
    if isinstance(source, Image.Image):
        return "PIL image"
    return repr(source) if len(repr(source)) < 200 else repr(source)[:200] + "..."


__all__ = [
    "ANSWER_PADDINGS",
    "IGNORE_INDEX",
    "IMAGE_MARKER",
    "MASK_STRATEGIES",
    "OBJECTIVES",
    "ChatDataset",
    "ChatSample",
    "DimpleDataCollator",
    "EncodedSample",
    "SampleLength",
    "answer_length_bound",
    "check_lengths",
    "diffusion_mask",
    "load_samples",
    "load_training_data",
    "parse_sample",
    "pre_resize",
    "pre_resize_size",
    "read_data_file",
    "read_image",
    "validate_samples",
]
