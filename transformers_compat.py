"""The one place where Dimple meets transformers' moving parts: the supported range and every version difference.

Remote code runs on whatever transformers a user has installed, so the package checks the version at import
(`check_transformers_version`) and everything that differs between supported releases is decided here, by feature
detection rather than by version number:

- 5.24 renamed the cache from `past_key_values` to `cache`, in model outputs and in forward signatures
  (`CACHE_NAME`, `cache_kwarg`, `output_cache`); `DimpleForConditionalGeneration.forward` accepts both names.

Every transformers name the package imports from outside the top-level namespace is imported here and nowhere else,
so this file is also the list of internals a new release can break (README, "transformers versions").
"""

import warnings
from importlib.metadata import version as installed_version

from packaging.version import Version

OLDEST_SUPPORTED = "5.23.0"
NEWEST_TESTED = "5.24"  # the newest minor release the whole suite has passed on; requirements cap below the next


def check_transformers_version(installed: str | None = None) -> None:
    """`ImportError` below the oldest supported release; one warning above the newest tested minor release."""
    installed = installed or installed_version("transformers")
    release = Version(installed).release
    if release < Version(OLDEST_SUPPORTED).release:
        raise ImportError(
            f"Dimple needs transformers>={OLDEST_SUPPORTED}, but {installed} is installed. Upgrade it with "
            f"`pip install 'transformers>={OLDEST_SUPPORTED},<{next_minor(NEWEST_TESTED)}'`."
        )
    if release[:2] > Version(NEWEST_TESTED).release[:2]:
        warnings.warn(
            f"Dimple was tested with transformers {OLDEST_SUPPORTED} to {NEWEST_TESTED}.x, and {installed} is "
            f"installed. It may work; if it does not, install `transformers<{next_minor(NEWEST_TESTED)}` and report "
            "the error.",
            UserWarning,
            stacklevel=2,
        )


def next_minor(version: str) -> str:
    major, minor = Version(version).release[:2]
    return f"{major}.{minor + 1}"


check_transformers_version()

# Everything below imports only after the version check, so a too-old transformers fails with the message above.
from transformers.activations import ACT2FN  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402
from transformers.image_processing_utils import BatchFeature  # noqa: E402
from transformers.image_utils import ImageType, get_image_type  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast  # noqa: E402
from transformers.models.auto.tokenization_auto import get_tokenizer_config  # noqa: E402
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402
from transformers.utils import ModelOutput, cached_file  # noqa: E402
from transformers.video_utils import make_batched_videos  # noqa: E402

# ------------------------------------------------------------------------------------------- the cache's name
# <= 5.23: `past_key_values`; >= 5.24: `cache` (the old keyword still works there, with a deprecation warning).
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwarg(cache) -> dict:
    """The cache as the keyword argument this transformers' decoders and output classes take."""
    return {CACHE_NAME: cache}


def output_cache(output):
    """The cache of a model output, without the deprecation warning the other name gives."""
    return getattr(output, CACHE_NAME)


__all__ = [
    "ACT2FN",
    "BaseModelOutputWithPooling",
    "BaseStreamer",
    "BatchFeature",
    "CACHE_NAME",
    "CausalLMOutputWithPast",
    "ImageType",
    "ModelOutput",
    "PRETOKENIZE_REGEX",
    "ProcessorMixin",
    "cache_kwarg",
    "cached_file",
    "check_transformers_version",
    "get_image_type",
    "get_tokenizer_config",
    "make_batched_videos",
    "output_cache",
]
