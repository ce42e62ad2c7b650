"""Processor of Dimple (arXiv 2505.16990): tokenizer + image processor + chat template + structure-prior templates.

`DimpleProcessor` turns chat messages, images and videos into `input_ids`, `attention_mask`, `pixel_values`,
`image_grid_thw` (and `pixel_values_videos`, `video_grid_thw`). Each `<|image_pad|>` / `<|video_pad|>` in the text is
expanded to one copy per merged vision token (t * h * w / merge_size**2 of its grid), counting images across the
whole batch in order. Special-token ids are always looked up by their strings, so a small test vocabulary works too.

The tokenizer is transformers' fast `Qwen2Tokenizer` (byte-level BPE) with Dimple's added tokens; see
`build_dimple_tokenizer`. The released checkpoint's `tokenizer_config.json` points at a `tokenization_dimple` module
that this package does not ship; `DimpleProcessor.from_pretrained` rebuilds that tokenizer from `vocab.json` and
`merges.txt` instead.
"""

import json
import re

from tokenizers import AddedToken

from transformers import ProcessorMixin, Qwen2Tokenizer

try:
    from .generation_config_dimple import DIMPLE_SETTINGS, STANDARD_SETTINGS
    from .image_processing_dimple import DimpleImageProcessor
    from .transformers_compat import cached_file, get_tokenizer_config
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from generation_config_dimple import DIMPLE_SETTINGS, STANDARD_SETTINGS
    from image_processing_dimple import DimpleImageProcessor
    from transformers_compat import cached_file, get_tokenizer_config

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|im_start|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
VISION_PAD_TOKEN = "<|vision_pad|>"
VISION_TOKENS = [VISION_START_TOKEN, VISION_END_TOKEN, VISION_PAD_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # the chat template's, used when a chat has none

# Dimple's added tokens in id order: Qwen2.5's 22 (ids 151643-151664 on the real vocabulary) then Dream's two.
ADDED_TOKENS = [
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    *VISION_TOKENS,
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<|beginoftext|>",
    MASK_TOKEN,
]
# As in Qwen2.5, the tool-call and fill-in-the-middle tokens are added but not "special" (decoding keeps them).
NON_SPECIAL_ADDED_TOKENS = set(ADDED_TOKENS[14:22])

# The Qwen2-VL / Qwen2.5-VL chat template (rendering rules of the Dimple reference, section 4.2).
DIMPLE_CHAT_TEMPLATE = (
    "{% set counter = namespace(image=0, video=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set counter.image = counter.image + 1 %}"
    "{% if add_vision_id %}Picture {{ counter.image }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set counter.video = counter.video + 1 %}"
    "{% if add_vision_id %}Video {{ counter.video }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% else %}"
    "{{ raise_exception('Chat content parts must be text, image or video.') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The roles the model was trained on: the Qwen2-VL template renders any role verbatim, unlike Qwen2.5's text
# template, which turns a "tool" message into a user turn wrapped in <tool_response>.
CHAT_ROLES = ("system", "user", "assistant")
# A sanity bound on `<|mask|>*N` (the released model's context is 131,072 positions); the model checks its own.
MAX_TEMPLATE_SLOTS = 131_072
# In the order the chat template tests them when a part has no "type".
CONTENT_TYPES = ("image", "image_url", "video", "text")
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only")


def build_dimple_tokenizer(vocab_file, merges_file, **kwargs) -> Qwen2Tokenizer:
    """
    Build Dimple's tokenizer from a Qwen2 `vocab.json` and `merges.txt`.

    Any special tokens of another model in those files are ignored: Dimple's added tokens (`ADDED_TOKENS`) follow
    the regular vocabulary in order, which puts them at ids 151643-151666 on the real 151,643-token vocabulary
    (`<|image_pad|>` 151655, `<|mask|>` 151666). Roles: bos `<|im_start|>`, eos `<|im_end|>`, pad and unk
    `<|endoftext|>`, mask `<|mask|>`; left padding; the Qwen2-VL chat template. `kwargs` override these settings
    (for example `model_max_length`).
    """
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    vocab = {token: index for token, index in vocab.items() if token not in ADDED_TOKENS}
    with open(merges_file, encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f if line.strip() and not line.startswith("#version")]
    added = {
        len(vocab) + offset: AddedToken(token, special=token not in NON_SPECIAL_ADDED_TOKENS, normalized=False)
        for offset, token in enumerate(ADDED_TOKENS)
    }
    settings = {
        "unk_token": PAD_TOKEN,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "mask_token": MASK_TOKEN,
        "extra_special_tokens": VISION_TOKENS,
        "added_tokens_decoder": added,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "chat_template": DIMPLE_CHAT_TEMPLATE,
        **kwargs,
    }
    return Qwen2Tokenizer(vocab=vocab, merges=merges, **settings)


class DimpleProcessor(ProcessorMixin):
    r"""
    Dimple's processor: a [`DimpleImageProcessor`], a Qwen2 tokenizer with Dimple's special tokens, and the
    Qwen2-VL chat template.

    Typical use:

    ```python
    processor = AutoProcessor.from_pretrained("rp-yu/Dimple-7B", trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": pil_image},
                                             {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[pil_image], padding="longest", return_tensors="pt")
    ```

    `apply_chat_template(..., tokenize=True, return_dict=True)` also collects the images (PIL images, numpy arrays,
    local paths, or URLs, which are downloaded) from the messages. Videos are passed as decoded frames.

    Args:
        image_processor ([`DimpleImageProcessor`]): the image processor (also used for video frames).
        tokenizer ([`Qwen2Tokenizer`]): a tokenizer that knows Dimple's special tokens (see `build_dimple_tokenizer`).
        chat_template (`str`, *optional*): Jinja chat template; defaults to the Qwen2-VL template.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DIMPLE_CHAT_TEMPLATE, **kwargs)
        self.image_token = IMAGE_TOKEN
        self.video_token = VIDEO_TOKEN
        self.image_token_id = _token_id(tokenizer, IMAGE_TOKEN)
        self.video_token_id = _token_id(tokenizer, VIDEO_TOKEN)
        self.mask_token = tokenizer.mask_token or MASK_TOKEN
        self.mask_token_id = _token_id(tokenizer, self.mask_token)
        self.pad_token_id = _token_id(tokenizer, PAD_TOKEN)
        self.vision_start_token_id = _token_id(tokenizer, VISION_START_TOKEN)  # Qwen3-VL's processor's names
        self.vision_end_token_id = _token_id(tokenizer, VISION_END_TOKEN)
        self._answer_end_tokens = (PAD_TOKEN, EOS_TOKEN)
        self._answer_end_ids = {_token_id(tokenizer, token) for token in self._answer_end_tokens}
        self._slot_pattern = re.compile(re.escape(self.mask_token) + r"(?:\*([+-]?\d*(?:\.\d+)?))?")

    @property
    def video_processor(self):
        # Videos run through the image processor (one vision tower); ProcessorMixin routes them to this attribute.
        return self.image_processor

    # ----------------------------------------------------------------------------------------------- inputs
    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self._num_vision_tokens(image_inputs["image_grid_thw"][image_idx])

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        return self.video_token * self._num_vision_tokens(video_inputs["video_grid_thw"][video_idx])

    def _num_vision_tokens(self, grid_thw) -> int:
        return int(grid_thw.prod()) // self.image_processor.merge_size**2

    def _process_videos(self, videos, **kwargs):
        # Drop video-decoding options (fps, num_frames, ...): frames arrive decoded and the image processor's own
        # options apply.
        accepted = self.image_processor.valid_kwargs.__annotations__
        kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        processed = self.image_processor(videos=videos, **kwargs)
        replacements = [
            self.replace_video_token(processed, video_idx=index) for index in range(len(processed["video_grid_thw"]))
        ]
        return processed, replacements

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        self.check_no_decoding_settings(kwargs)
        if videos is not None:
            self.image_processor.check_video_frames(videos)  # before transformers batches them (IndexError)
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if text is None or not _is_per_prompt(images, len(text)):
            return
        # Images given per prompt must match that prompt's placeholders, not just the batch total.
        for index, (sample, sample_images) in enumerate(zip(text, images)):
            if sample.count(self.image_token) != len(sample_images):
                raise ValueError(
                    f"Prompt {index} has {sample.count(self.image_token)} {self.image_token} placeholder(s) but "
                    f"`images[{index}]` holds {len(sample_images)} image(s); give each prompt one image per "
                    "placeholder."
                )

    def check_no_decoding_settings(self, kwargs: dict):
        """Refuse decoding settings given as processor options, which the processor would ignore.

        transformers' image-text-to-text pipeline hands `pipe(text=..., steps=8)` and `pipeline(..., steps=8)` to
        the processor (only standard settings named when the pipeline is built reach `generate`), so without this
        check the setting would be dropped with a log line and the answer decoded with the checkpoint's settings.
        """
        options = {name for typed in self.valid_processor_kwargs.__annotations__.values()
                   for name in getattr(typed, "__annotations__", {})}  # fmt: skip
        options |= set(self.image_processor.valid_kwargs.__annotations__)
        settings = sorted(name for name in kwargs if name in DIMPLE_SETTINGS or name in STANDARD_SETTINGS)
        settings = [name for name in settings if name not in options]
        if settings:
            example = ", ".join(f"{name!r}: {kwargs[name]!r}" for name in settings)
            raise ValueError(
                f"{settings} are decoding settings, not processor options. In a pipeline, pass them as "
                f"`generate_kwargs={{{example}}}` (to `pipe(...)` or to `pipeline(...)`); otherwise to "
                "`model.generate` (or `diffusion_generate`)."
            )

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """
        Render (and with `tokenize=True`, process) chat messages with the Qwen2-VL template. Content is a string
        or a list of parts: `{"type": "text", "text": ...}`, `{"type": "image", "image": <PIL image, numpy array,
        path or URL>}` (also `"url"` / `"path"` keys, or OpenAI's `image_url`), `{"type": "video", "video":
        <frames>}`. A part without `"type"` is classified by its keys. `add_vision_id=True` prefixes
        "Picture k: " / "Video k: ".
        """
        return super().apply_chat_template(_typed_conversation(conversation), chat_template, **kwargs)

    # ------------------------------------------------------------------------------------ structure priors
    def encode_response_template(self, template):
        """
        Turn a structure-prior template into answer token ids for `diffusion_generate(response_template=...)`.

        Syntax: plain text stays fixed; `<|mask|>` is one slot for the model to fill and `<|mask|>*N` is N slots
        (N >= 1). For example `'{"color": "<|mask|>*2", "count": <|mask|>}'` gives the token ids of `{"color": "`,
        two mask ids, the ids of `", "count": `, one mask id and the id of `}`. Other special tokens written in the
        text (such as `<|endoftext|>` to pin the answer's end) are encoded as themselves. Each text segment is
        tokenized on its own, so a space before a slot becomes its own token: write `"Answer:<|mask|>*3"` and let
        the model produce the leading space.

        Args:
            template (`str` or `list[str]`): one template, or a batch of templates.

        Returns:
            `list[int]` for one template, `list[list[int]]` for a batch.
        """
        if isinstance(template, (list, tuple)):
            return [self.encode_response_template(item) for item in template]
        if not isinstance(template, str):
            raise TypeError(f"`template` must be a string or a list of strings, got {type(template).__name__}.")
        ids, position, slots = [], 0, 0
        for match in self._slot_pattern.finditer(template):
            ids += self._encode_text(template[position : match.start()])
            length = self._slot_length(match)
            ids += [self.mask_token_id] * length
            slots += length
            position = match.end()
        ids += self._encode_text(template[position:])
        if not slots:
            raise ValueError(
                f"Template {template!r} has no mask slot; mark the tokens to generate with {self.mask_token} "
                f"(one slot) or {self.mask_token}*N (N slots)."
            )
        return ids

    def _slot_length(self, match) -> int:
        count = match.group(1)
        if count is None:
            return 1
        if not count.lstrip("+-").isdigit() or int(count) < 1:
            raise ValueError(
                f"Invalid slot {match.group(0)!r} in a response template: write {self.mask_token}*N with a whole "
                f"number N >= 1 (a slot of length 0 is not allowed; remove it instead)."
            )
        if int(count) > MAX_TEMPLATE_SLOTS:
            raise ValueError(
                f"Slot {match.group(0)!r} asks for more than {MAX_TEMPLATE_SLOTS} answer tokens; the answer must fit "
                "the model's context (config.max_position_embeddings)."
            )
        return int(count)

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    # ------------------------------------------------------------------------------------------- outputs
    def post_process_answer(self, answers, skip_special_tokens=False, **decode_kwargs):
        """
        Clean generated answers: drop leftover `<|mask|>` tokens and strip the trailing `<|endoftext|>` /
        `<|im_end|>` run that pads a diffusion answer.

        Args:
            answers: answer token ids (a 1-D list or tensor for one answer, 2-D for a batch; pass only the answer
                part, e.g. `output[:, prompt_length:]`) or decoded text (`str` or `list[str]`).
            skip_special_tokens (`bool`, defaults to `False`): also drop every other special token when decoding.
            **decode_kwargs: passed to the tokenizer's `decode`.

        Returns:
            `str` for one answer, `list[str]` for a batch.
        """
        if hasattr(answers, "tolist"):
            answers = answers.tolist()
        if isinstance(answers, str):
            return self._clean_text(answers)
        if not isinstance(answers, (list, tuple)):
            raise TypeError(
                "`answers` must be token ids (list or tensor) or text (str or list of str), "
                f"got {type(answers).__name__}."
            )
        if answers and all(isinstance(item, int) for item in answers):
            ids = self.answer_ids(answers)
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **decode_kwargs)
        return [self.post_process_answer(item, skip_special_tokens, **decode_kwargs) for item in answers]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **decode_kwargs):
        """What pipelines call to decode generated sequences: [`post_process_answer`] on each row (leftover masks
        dropped, trailing end tokens stripped), so a pipeline and a direct call give the same text.

        Returns:
            `list[str]`, one text per row of `generated_outputs` (`[B, L]` ids, or a list of id lists).
        """
        rows = generated_outputs.tolist() if hasattr(generated_outputs, "tolist") else list(generated_outputs)
        if rows and isinstance(rows[0], int):
            rows = [rows]
        return [self.post_process_answer(list(row), skip_special_tokens, **decode_kwargs) for row in rows]

    def answer_ids(self, ids: list[int]) -> list[int]:
        """The tokens an answer produced: leftover masks dropped, the trailing end-of-answer padding stripped."""
        ids = [token for token in ids if token != self.mask_token_id]
        while ids and ids[-1] in self._answer_end_ids:
            ids.pop()
        return ids

    def _clean_text(self, text: str) -> str:
        text = text.replace(self.mask_token, "")
        trailing_ends = "(?:" + "|".join(re.escape(token) for token in self._answer_end_tokens) + ")+$"
        return re.sub(trailing_ends, "", text)

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """
        Load the processor saved in a folder or Hub repository (`save_pretrained`, the released checkpoint).

        The sub-processor classes are fixed, so they are loaded directly rather than through the Auto classes:
        `AutoTokenizer` would read the folder's `auto_map` and ask whether to run its remote code (and log
        warnings about the Dimple config), and it fails on the released tokenizer config. Overriding this public
        method instead of `ProcessorMixin`'s private loading hooks keeps the processor loading on every supported
        transformers release (5.25 replaced `_get_arguments_from_pretrained` with `_resolve_subprocessors`).
        `kwargs` go to both sub-processors as in `ProcessorMixin.from_pretrained`; `chat_template` overrides the
        saved template.
        """
        kwargs.pop("trust_remote_code", None)  # the classes are this module's own: no remote code to trust
        path = pretrained_model_name_or_path
        subfolder = kwargs.pop("subfolder", "")
        chat_template = kwargs.pop("chat_template", None)
        image_processor = DimpleImageProcessor.from_pretrained(path, subfolder=subfolder, **kwargs)
        tokenizer = load_dimple_tokenizer(path, subfolder, **kwargs)
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        saved, _ = cls.get_processor_dict(path, subfolder=subfolder, **hub_kwargs)
        return cls(image_processor, tokenizer, chat_template=chat_template or saved.get("chat_template"))


def load_dimple_tokenizer(pretrained_model_name_or_path, subfolder="", **kwargs) -> Qwen2Tokenizer:
    """Dimple's tokenizer from a folder: its `Qwen2Tokenizer`, or rebuilt from the vocabulary for the released one."""
    path = pretrained_model_name_or_path
    hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    config = get_tokenizer_config(path, subfolder=subfolder, **hub_kwargs)
    if not _names_released_tokenizer(config):
        return Qwen2Tokenizer.from_pretrained(path, subfolder=subfolder, **kwargs)
    files = [cached_file(path, name, subfolder=subfolder, **hub_kwargs) for name in ("vocab.json", "merges.txt")]
    overrides = {key: config[key] for key in ("model_max_length", "chat_template") if config.get(key)}
    return build_dimple_tokenizer(*files, **overrides)


def _token_id(tokenizer, token: str) -> int:
    """Id of `token`; a token the vocabulary lacks is an error, not a silent unk."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"The tokenizer has no {token} token, which Dimple needs; build the tokenizer with "
            "`build_dimple_tokenizer(vocab_file, merges_file)` or add Dimple's special tokens to it."
        )
    return token_id


def _names_released_tokenizer(config: dict) -> bool:
    """True for the released tokenizer_config.json, which names a `tokenization_dimple.DimpleTokenizer` class."""
    auto_tokenizer = config.get("auto_map", {}).get("AutoTokenizer") or []
    names = [config.get("tokenizer_class")] + ([auto_tokenizer] if isinstance(auto_tokenizer, str) else auto_tokenizer)
    return any(name and name.split(".")[-1] == "DimpleTokenizer" for name in names)


def _is_per_prompt(images, num_prompts: int) -> bool:
    return (
        isinstance(images, (list, tuple))
        and len(images) == num_prompts
        and all(isinstance(sample_images, (list, tuple)) for sample_images in images)
    )


def _typed_conversation(conversation):
    """Copy of the conversation(s) in which every content part carries a known `type` (else a ValueError)."""
    if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
        return [_typed_messages(messages) for messages in conversation]
    return _typed_messages(conversation)


def _typed_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            "The conversation must be a non-empty list of messages such as [{'role': 'user', 'content': 'Hi'}], "
            f"got {messages!r}."
        )
    typed = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"Each chat message must be a dict with 'role' and 'content' keys, got {message!r}.")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(
                f"Unknown chat role {message['role']!r}; use one of {', '.join(map(repr, CHAT_ROLES))}. The Qwen2-VL "
                "template has no tool-call format: give a tool's result to the model in a 'user' message."
            )
        content = message["content"]
        if isinstance(content, (list, tuple)):
            message = {**message, "content": [_typed_part(part) for part in content]}
        elif not isinstance(content, str):
            raise TypeError(
                f"A message's 'content' must be a string or a list of parts ({{'type': 'text', 'text': ...}}, "
                f"{{'type': 'image', 'image': ...}}), got {type(content).__name__}: {message!r}."
            )
        typed.append(message)
    return typed


def _typed_part(part) -> dict:
    if not isinstance(part, dict):
        raise ValueError(f"Chat content parts must be dicts such as {{'type': 'text', 'text': ...}}, got {part!r}.")
    kind = part.get("type") or next((key for key in CONTENT_TYPES if key in part), None)
    if kind not in CONTENT_TYPES:
        raise ValueError(
            f"Unknown content type {kind!r} in a chat message; use one of {', '.join(CONTENT_TYPES)} "
            "(an image part looks like {'type': 'image', 'image': <PIL image, array, path or URL>})."
        )
    if kind == "text" and not isinstance(part.get("text"), str):
        raise ValueError(f"A text part needs a string under 'text', got {part!r}.")
    if kind == "video" and "video" in part and _is_empty(part["video"]):
        raise ValueError("A video part holds no frames; pass a non-empty list of frames (or drop the part).")
    return {**part, "type": kind}


def _is_empty(value) -> bool:
    return (isinstance(value, (list, tuple)) and not value) or (hasattr(value, "shape") and 0 in value.shape)


DimpleProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["DimpleProcessor", "build_dimple_tokenizer", "DIMPLE_CHAT_TEMPLATE"]
