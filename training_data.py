"""The data side of fine-tuning Dimple: how data is read and checked, before the model loads.

`training_dimple` holds the stages, LoRA, the Trainer and saving; `training_collator` what a batch is (lengths,
masking, the collator). Both re-export the public names of this module, and this module the collator's.

Reading (`read_data_file`): `.json` (one list) and `.jsonl` (one sample per line) in UTF-8 with or without a BOM,
suffixes in any case; other encodings are refused with the file, line, byte offset and the fix. Parquet, CSV and
`datasets.save_to_disk` folders are read through `datasets`. Checking (`parse_sample`, `validate_samples`): every
sample's structure, then every image opened once, all before the model loads. The lengths in tokens are measured
by `training_collator.check_lengths`, which needs the processor.
"""

import codecs
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

try:
    from .image_processing_dimple import read_image
    from .processing_dimple import VISION_TOKENS
except ImportError:  # no parent package: imported from the repository root
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from image_processing_dimple import read_image
    from processing_dimple import VISION_TOKENS

IMAGE_MARKER = "<image>"
ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


# --------------------------------------------------------------------------------------------------------- data


@dataclass
class ChatSample:
    """A validated conversation in transformers' chat format, as the processor's chat template takes it.

    `messages`: an optional system message (text) first, then user and assistant turns alternating; a user content
    is a list of `{"type": "text"}` and `{"type": "image"}` parts (one image part per image, in order), an assistant
    content is its answer text. `images`: the image sources, in the order of the image parts.
    """

    messages: list[dict]
    images: list

    @property
    def answers(self) -> list[str]:
        return [message["content"] for message in self.messages if message["role"] == "assistant"]


def describe_sample(sample, index) -> str:
    sample_id = sample.get("id") if isinstance(sample, dict) else None
    return f"Sample {index}" + (f" (id {sample_id!r})" if sample_id is not None else "")


def parse_sample(sample, index: int = 0) -> ChatSample:
    """Validate one chat sample and return it in transformers' chat format (see `ChatSample`).

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

    chat, system, user, inline, image_parts, markers = [], None, None, [], 0, 0
    for position, message in enumerate(messages):
        role, content, parts_images, parts = _role_and_content(message, f"{where}, message {position}")
        inline += parts_images
        image_parts += parts
        if role == "system":
            if position:
                raise ValueError(f"{where}, message {position}: a system message may only come first.")
            system = content
            chat.append({"role": "system", "content": content})
        elif role == "user":
            if user is not None:
                raise ValueError(f"{where}, message {position}: two user turns in a row; turns must alternate.")
            user = content
            chat.append({"role": "user", "content": chat_parts(content)})
        else:
            if user is None:
                raise ValueError(f"{where}, message {position}: an assistant turn must follow a user turn.")
            if not content.strip():
                raise ValueError(f"{where}, message {position}: empty assistant answer.")
            if IMAGE_MARKER in content:
                raise ValueError(f"{where}, message {position}: {IMAGE_MARKER} markers belong in user turns.")
            chat.append({"role": "assistant", "content": content})
            markers += user.count(IMAGE_MARKER)
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

    if markers != len(images):
        problem = "more" if markers > len(images) else "fewer"
        raise ValueError(
            f"{where}: {markers} {IMAGE_MARKER} marker(s) but {len(images)} image(s) ({problem} markers than "
            "images); put one marker in the user text for each image."
        )
    return ChatSample(chat, images)


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
                problems.append(f"{where}, image {number} ({short_source(source)}): {problem}")
                missing_files |= problem.startswith("no such file")
    if problems:
        raise ValueError(
            f"{len(problems)} of {count} training image(s) cannot be used:\n  "
            + "\n  ".join(first_lines(problems))
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


def short_source(source) -> str:
    """An image source as messages name it: a path or URL (cut at 200 characters), a byte count, "PIL image"."""
    if isinstance(source, (bytes, bytearray)):
        return f"{len(source)} bytes"
    if isinstance(source, Image.Image):
        return "PIL image"
    return repr(source) if len(repr(source)) < 200 else repr(source)[:200] + "..."


def first_lines(lines: list[str], count: int = 20) -> list[str]:
    """The first `count` lines of a long report, and how many more there are."""
    return lines[:count] + ([f"... and {len(lines) - count} more"] if len(lines) > count else [])


def __getattr__(name):
    """The public names of `training_collator`, importable from here as before the split; loaded on first use,
    because the collator imports this module (an import at the top would be a cycle)."""
    if not name.startswith("__"):
        collator = importlib.import_module(f"{__package__}.training_collator" if __package__ else "training_collator")
        if name in collator.__all__:
            return getattr(collator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGE_MARKER",
    "ChatDataset",
    "ChatSample",
    "load_samples",
    "load_training_data",
    "parse_sample",
    "read_data_file",
    "read_image",
    "validate_samples",
]
