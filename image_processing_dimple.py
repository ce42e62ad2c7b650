"""Image processor of Dimple (arXiv 2505.16990): the Qwen2-VL smart-resize / normalize / patchify pipeline.

Images reuse transformers' PIL-backend `Qwen2VLImageProcessorPil`, which gives the same pixels as the processor the
released model was trained with, so this module needs neither torchvision nor a video decoder. What Dimple adds:

* the released `preprocessor_config.json` stores the pixel budget as `size={"min_pixels", "max_pixels"}` (the
  transformers 4.46 layout); it is translated to the 5.x `{"shortest_edge", "longest_edge"}` layout and
  `min_pixels` / `max_pixels` are saved as top-level keys again;
* one image reader, `read_image`, shared by inference (paths, URLs and base64 strings given to the processor, the
  pipeline or `apply_chat_template`) and fine-tuning: 16- and 32-bit integer and float pictures are brought to the
  8-bit scale the model was trained on (`to_eight_bit`) instead of being clipped to white by PIL's RGB conversion,
  and float pixels in [0, 1] (torchvision's `ToTensor`) are recognised instead of being rescaled a second time;
* clear errors for inputs the vision tower cannot take (empty images, sides below 28 px, aspect ratio above 200,
  pixels on no known scale, anything that is not 3-channel after the RGB conversion);
* videos (lists of frames or [T, H, W, C] / [T, C, H, W] arrays) go through the same pipeline with real temporal
  patches, and images and videos passed together both come back (upstream dropped the images).
"""

import base64
import binascii
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from transformers import BatchFeature, Qwen2VLImageProcessorPil

try:
    from .transformers_compat import ImageType, convert_to_rgb, get_image_type, make_batched_videos
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from transformers_compat import ImageType, convert_to_rgb, get_image_type, make_batched_videos

MAX_ASPECT_RATIO = 200
# Pixel scales. Integer pictures are read on the scale their bit depth implies, never stretched to the data's own
# range: the 8-bit version of a 16-bit picture (value / 257) is then exactly what the model sees, and a dark scan
# stays dark instead of gaining contrast that differs from image to image. 16-bit modes (`I;16`, `I;16B`, ...) and
# uint16 arrays are always on the 16-bit scale. PIL's 32-bit `I` mode and other wide integer arrays imply no scale
# of their own: values within 0..255 keep the 8-bit scale (as PIL's own conversion reads them, and as torch's int64
# tensors hold them), values up to 65535 the 16-bit scale (several formats open 16-bit files as `I`); beyond that the
# picture is refused with how to scale it. Floats (`F` mode, float arrays and tensors) have no bit depth: all values
# in [0, 1] means the unit scale (torchvision's `ToTensor`), otherwise [0, 255] the 8-bit scale
# (`np.asarray(image, float)`). Anything else, such as a mean/std-normalised tensor, is refused.
EIGHT_BIT_MAX = 255
SIXTEEN_BIT_MAX = 65535
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
URL_PREFIXES = ("http://", "https://")
ORIENTATION_TAG = 0x0112  # EXIF


class DimpleImageProcessor(Qwen2VLImageProcessorPil):
    r"""
    Turns images (and videos) into the flattened patch rows the Dimple vision tower takes.

    Each image is converted to RGB, resized with `smart_resize` (both sides multiples of
    `patch_size * merge_size` = 28, pixel count within [`min_pixels`, `max_pixels`]), rescaled by 1/255, normalized
    with the CLIP mean/std and cut into 14x14 patches; a still image is repeated to `temporal_patch_size` = 2 frames.

    Args:
        min_pixels (`int`, *optional*, defaults to 3136): smallest pixel count after resizing.
        max_pixels (`int`, *optional*, defaults to 1003520): largest pixel count after resizing (the released
            Dimple-7B file probably sets 112896 = 336 x 336).
        size (`dict`, *optional*): alternative to `min_pixels` / `max_pixels`, either as
            `{"shortest_edge", "longest_edge"}` or in the released `{"min_pixels", "max_pixels"}` layout.
        **kwargs: the other `Qwen2VLImageProcessorPil` options (`patch_size`, `temporal_patch_size`, `merge_size`,
            `image_mean`, `image_std`, `do_convert_rgb`, ...).

    Returns (from `__call__`): a `BatchFeature` with `pixel_values` [sum of patches, 3 * 2 * 14 * 14] and
    `image_grid_thw` [num_images, 3] for images, and `pixel_values_videos` / `video_grid_thw` for videos.
    """

    model_input_names = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]

    def __init__(self, **kwargs):
        kwargs = _translate_released_size(kwargs)
        super().__init__(**kwargs)
        if self.size.shortest_edge > self.size.longest_edge:
            raise ValueError(
                f"min_pixels ({self.size.shortest_edge}) must not exceed max_pixels ({self.size.longest_edge})."
            )

    def __call__(self, images=None, videos=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, videos=videos, **kwargs)

    def preprocess(self, images=None, videos=None, return_tensors=None, **kwargs) -> BatchFeature:
        """
        Process `images` (one image or a list; PIL, numpy or torch; paths and URLs are loaded) and/or `videos`
        (one video or a list of videos, each a list of frames or a 4-D array). Keyword arguments override the
        processor's settings for this call.
        """
        if images is None and videos is None:
            raise ValueError("DimpleImageProcessor needs `images` or `videos`; both were None.")
        data = {}
        if images is not None:
            data.update(super().preprocess(images, **kwargs))
        if videos is not None:
            data.update(self._preprocess_videos(videos, **kwargs))
        return BatchFeature(data, tensor_type=return_tensors)

    def _preprocess_videos(self, videos, **kwargs) -> dict:
        if any(isinstance(video, str) for video in _as_list(videos)):
            raise ValueError(
                "`videos` must hold decoded frames (a list of images or a [T, H, W, C] array per video), not paths; "
                "decode the file first, e.g. with `transformers.video_utils.load_video`."
            )
        self.check_video_frames(videos)
        videos = make_batched_videos(videos)
        frames = [frame for video in videos for frame in video]
        # The frames run through the parent's pipeline; `_preprocess` regroups them per video.
        video_lengths = [len(video) for video in videos]
        out = super().preprocess(frames, image_like_kwargs={"video_lengths": video_lengths}, **kwargs)
        return {"pixel_values_videos": out["pixel_values"], "video_grid_thw": out["image_grid_thw"]}

    @staticmethod
    def check_video_frames(videos) -> None:
        """Every video needs a frame: `make_batched_videos` fails on an empty one with a bare IndexError."""
        if _frame_count(videos) == 0:
            raise ValueError("`videos` holds no frames; pass a list of frames or a [T, H, W, C] array with T >= 1.")
        if isinstance(videos, (list, tuple)):
            for index, video in enumerate(videos):
                if _frame_count(video) == 0:
                    raise ValueError(
                        f"`videos[{index}]` holds no frames; every video needs at least one frame (drop the empty one)."
                    )

    def fetch_images(self, image_url_or_urls):
        """Paths, URLs and base64 strings opened by `read_image` (the reader fine-tuning uses too); images pass."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if not isinstance(image_url_or_urls, (str, os.PathLike)):
            return super().fetch_images(image_url_or_urls)
        try:
            return read_image(image_url_or_urls)
        except FileNotFoundError as error:
            raise ValueError(
                f"No image file {error.filename!r} (relative paths start at the current directory, {os.getcwd()}); "
                "pass an existing path, an http(s) URL, a base64 string or the image itself."
            ) from None

    def process_image(self, image, *args, patch_size=None, merge_size=None, **kwargs) -> np.ndarray:
        _check_not_empty(image)
        _check_channel_layout(image)
        # With do_rescale=False the caller declares the pixels already scaled: they are left as given.
        if kwargs.get("do_rescale", self.do_rescale):
            image = to_eight_bit(image)
        array = super().process_image(image, *args, **kwargs)
        _check_geometry(array, min_side=(patch_size or self.patch_size) * (merge_size or self.merge_size))
        return array

    def _preprocess(self, images, *args, video_lengths=None, **kwargs) -> BatchFeature:
        if video_lengths is None:
            return super()._preprocess(images, *args, **kwargs)
        return self._preprocess_video_frames(images, video_lengths, **kwargs)

    def _preprocess_video_frames(
        self,
        frames,
        video_lengths,
        do_resize,
        size,
        resample,
        do_rescale,
        rescale_factor,
        do_normalize,
        image_mean,
        image_std,
        patch_size,
        temporal_patch_size,
        merge_size,
        **kwargs,
    ) -> BatchFeature:
        factor = patch_size * merge_size
        processed = []
        for frame in frames:
            # All frames of one video have the same size, so smart_resize picks the same target for each of them.
            if do_resize:
                frame = self.resize(frame, size=size, resample=resample, factor=factor)
            if do_rescale:
                frame = self.rescale(frame, rescale_factor)
            if do_normalize:
                frame = self.normalize(frame, image_mean, image_std)
            processed.append(frame)

        all_patches, all_grids, start = [], [], 0
        for length in video_lengths:
            video = np.stack(processed[start : start + length])
            start += length
            patches, grid = _patchify_video(video, patch_size, merge_size, temporal_patch_size)
            all_patches.append(patches)
            all_grids.append(grid)
        data = {"pixel_values": np.concatenate(all_patches), "image_grid_thw": np.array(all_grids, dtype=np.int64)}
        return BatchFeature(data)

    def to_dict(self) -> dict:
        output = super().to_dict()
        # Saved under the names the released preprocessor_config.json uses.
        output["min_pixels"] = self.size.shortest_edge
        output["max_pixels"] = self.size.longest_edge
        return output


def read_image(source, image_folder=None) -> Image.Image:
    """The picture `source` holds, as an 8-bit RGB PIL image: the one reader of inference and fine-tuning.

    `source` is a PIL image, raw bytes, a `{"bytes", "path"}` dict (the `datasets` image layout), an http(s) URL, a
    base64 string (optionally a `data:image/...` URL) or a path (relative paths start at `image_folder`). Files get
    their EXIF orientation applied; wide integer and float pixels are brought to 8 bits (`to_eight_bit`);
    transparency is composited onto white, as the processor does. Raises `FileNotFoundError` for a missing file and
    `ValueError` for pixels on no known scale.
    """
    image = to_eight_bit(_open_image(source, image_folder))
    return Image.fromarray(convert_to_rgb(image, return_numpy=True))


def to_eight_bit(image):
    """`image` (PIL, numpy or torch) with its pixels on the 8-bit scale (see `EIGHT_BIT_MAX` for the rules).

    8-bit pictures come back unchanged; a wide PIL mode (`I;16*`, `I`, `F`) becomes an `L` image, a wide or float
    array a uint8 array of the same layout, a torch tensor a numpy array.
    """
    if isinstance(image, Image.Image):
        if image.mode not in WIDE_INTEGER_MODES + ("F",):
            return image
        return Image.fromarray(_eight_bit_array(np.asarray(image), f"a PIL image of mode {image.mode!r}"))
    if get_image_type(image) == ImageType.TORCH:
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    if image.dtype == np.uint8 or image.dtype == np.bool_:
        return image
    return _eight_bit_array(image, f"an image array of dtype {image.dtype}")


def _eight_bit_array(array: np.ndarray, what: str) -> np.ndarray:
    if array.size == 0:
        return array.astype(np.uint8)
    floating = np.issubdtype(array.dtype, np.floating)
    if floating and not np.isfinite(array).all():
        raise ValueError(f"Got {what} with NaN or infinite pixels; replace them before passing the image.")
    low, high = array.min(), array.max()
    if floating:
        scale = 1.0 if low >= 0 and high <= 1 else EIGHT_BIT_MAX
    else:
        sixteen_bit = array.dtype.kind == "u" and array.dtype.itemsize == 2
        scale = SIXTEEN_BIT_MAX if sixteen_bit or high > EIGHT_BIT_MAX else EIGHT_BIT_MAX
    if low < 0 or high > scale:
        raise ValueError(
            f"Got {what} with pixels in [{low}, {high}], which is on no known scale (floats: [0, 1] or [0, 255]; "
            "integers: 0..255 or 0..65535). A mean/std-normalised tensor cannot be read back: pass the image before "
            "normalising, or scale it to [0, 1] yourself, e.g. (x - x.min()) / (x.max() - x.min())."
        )
    return np.round(array.astype(np.float64) * (EIGHT_BIT_MAX / scale)).astype(np.uint8)


def image_size(source, image_folder=None) -> tuple[int, int]:
    """(width, height) of the picture `read_image` would give, from the file's header (nothing decoded)."""
    image = _open_unoriented(source, image_folder)
    width, height = image.size
    # EXIF orientations 5 to 8 turn the picture by 90 degrees.
    rotated = not isinstance(source, Image.Image) and image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
    return (height, width) if rotated else (width, height)


def _open_image(source, image_folder=None) -> Image.Image:
    image = _open_unoriented(source, image_folder)
    # Files are turned upright as transformers' `load_image` does; an image object is taken as it is.
    return image if isinstance(source, Image.Image) else ImageOps.exif_transpose(image)


def _open_unoriented(source, image_folder=None) -> Image.Image:
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    if isinstance(source, str) and source.startswith(URL_PREFIXES):
        import httpx

        return Image.open(io.BytesIO(httpx.get(source, follow_redirects=True).content))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if image_folder is not None and not path.is_absolute():
            path = Path(image_folder) / path
        encoded = _base64_bytes(source) if isinstance(source, str) and not path.is_file() else None
        return Image.open(io.BytesIO(encoded) if encoded else path)
    raise TypeError(
        f"Unsupported image source of type {type(source).__name__}; pass a path, URL, base64 string, bytes or image."
    )


def _base64_bytes(text: str) -> bytes | None:
    """The bytes a base64 string (or `data:image/...;base64,` URL) encodes; None when it is not one."""
    if text.startswith("data:image/"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True) or None
    except (binascii.Error, ValueError):
        return None


def _translate_released_size(kwargs: dict) -> dict:
    """Map the released `size={"min_pixels", "max_pixels"}` layout onto the `min_pixels` / `max_pixels` kwargs."""
    size = kwargs.get("size")
    if not isinstance(size, dict) or not ({"min_pixels", "max_pixels"} & size.keys()):
        return kwargs
    kwargs = dict(kwargs)
    for key in ("min_pixels", "max_pixels"):
        if key in size:
            kwargs.setdefault(key, size[key])
    rest = {k: v for k, v in size.items() if k not in ("min_pixels", "max_pixels")}
    kwargs["size"] = rest or None
    return kwargs


def _as_list(videos) -> list:
    return list(videos) if isinstance(videos, (list, tuple)) else [videos]


def _frame_count(video) -> int | None:
    """Frames in a video (a list of frames or a 4-D array); None for anything else (a single frame)."""
    if isinstance(video, (list, tuple)):
        return len(video)
    return video.shape[0] if getattr(video, "ndim", None) == 4 else None


def _check_not_empty(image) -> None:
    shape = (image.height, image.width) if get_image_type(image) == ImageType.PIL else tuple(image.shape)
    if 0 in shape:
        raise ValueError("Got an empty image (0 pixels); every image and video frame needs at least 28 x 28 pixels.")


def _check_channel_layout(image) -> None:
    """Arrays must be [H, W, C] or [C, H, W] with 1, 3 or 4 channels, or [H, W]; anything else is ambiguous."""
    if get_image_type(image) == ImageType.PIL or image.ndim == 2:
        return
    if image.ndim != 3 or not ({image.shape[0], image.shape[-1]} & {1, 3, 4}):
        raise ValueError(
            f"Cannot read an image array of shape {tuple(image.shape)}: expected [H, W, C] or [C, H, W] with C = 3 "
            "(RGB), or 1 / 4 channels to be converted to RGB."
        )


def _check_geometry(array: np.ndarray, min_side: int) -> None:
    """`array` is channels-first, after the RGB conversion."""
    channels, height, width = array.shape
    if channels != 3:
        raise ValueError(
            f"Dimple's vision tower takes RGB images, got {channels} channel(s). Keep `do_convert_rgb=True` or "
            "convert the image first (PIL: `image.convert('RGB')`)."
        )
    if height < min_side or width < min_side:
        raise ValueError(
            f"Image of height {height} and width {width} is too small: both sides must be at least {min_side} pixels. "
            "Pad or upscale it first."
        )
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"Image of height {height} and width {width} has an aspect ratio above {MAX_ASPECT_RATIO}; "
            "crop or pad it first."
        )


def _patchify_video(video: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int):
    """[T, C, H, W] -> ([gt * gh * gw, C * tp * p * p], (gt, gh, gw)), rows in merge-block order like images."""
    remainder = video.shape[0] % temporal_patch_size
    if remainder:
        # Pad the clip to whole temporal patches by repeating its last frame.
        repeats = np.repeat(video[-1:], temporal_patch_size - remainder, axis=0)
        video = np.concatenate([video, repeats])
    frames, channels, height, width = video.shape
    grid_t, grid_h, grid_w = frames // temporal_patch_size, height // patch_size, width // patch_size
    patches = video.reshape(
        grid_t,
        temporal_patch_size,
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return flat.astype(np.float32), (grid_t, grid_h, grid_w)


DimpleImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["DimpleImageProcessor", "image_size", "read_image", "to_eight_bit"]
