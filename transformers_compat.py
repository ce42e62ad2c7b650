"""The one place where Dimple meets transformers' moving parts: the supported range and every version difference.

Remote code runs on whatever transformers a user has installed, so the package checks the version at import
(`check_transformers_version`) and everything that differs between supported releases is decided here, by feature
detection rather than by version number:

- 5.24 renamed the cache from `past_key_values` to `cache`, in model outputs and in forward signatures
  (`CACHE_NAME`, `cache_kwarg`, `output_cache`); `DimpleForConditionalGeneration.forward` accepts both names and,
  where `cache` is the release's name, warns about the old one as native models do (`warn_old_cache_name`).
- 5.24 added `MultimodalCausalLMOutputWithPast` (`image_outputs` / `video_outputs`, which transformers' common tests
  expect of a vision-language model): Dimple's output derives from it where it exists (`CausalLMOutputBase`,
  `MULTIMODAL_OUTPUTS`).
- 5.25 loads the processor through `_resolve_subprocessors` + `from_dict` instead of `_get_arguments_from_pretrained`
  (`DimpleProcessor` overrides the public `from_pretrained` instead), depends on `kernels` and loads Hub kernels by
  default in `from_pretrained`: without the `kernels` package it needs `USE_HUB_KERNELS=NO`
  (`tools/install_transformers.sh`).

Every transformers name the package imports from outside the top-level namespace is imported here and nowhere else,
and every transformers method the package overrides is listed here (`OVERRIDDEN_HOOKS`, `OWN_ENTRY_POINTS`), as is
the private behaviour it relies on without overriding (`RELIED_ON`): this file is the list of what a new release can
break (README, "transformers versions").
"""

import warnings
from importlib.metadata import version as installed_version

import torch
from packaging.version import Version

OLDEST_SUPPORTED = "5.23.0"
NEWEST_TESTED = "5.25"  # the newest minor release the whole suite has passed on; requirements cap below the next


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
from transformers import GenerationConfig  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402
from transformers.image_processing_utils import BatchFeature  # noqa: E402
from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.image_utils import ImageType, get_image_type  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast  # noqa: E402
from transformers.models.auto.tokenization_auto import get_tokenizer_config  # noqa: E402
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402
from transformers.utils import ModelOutput, cached_file  # noqa: E402
from transformers.video_utils import make_batched_videos  # noqa: E402

# ---------------------------------------------------------------------------------- overridden hooks
# Methods of transformers classes that Dimple's classes override and that transformers' own code calls. A release
# that stops calling one drops Dimple's behaviour without an error (5.25 stopped calling
# `ProcessorMixin._get_arguments_from_pretrained`, which the processor overrode then), so
# tests/test_compat.py spies on each during a real load, generate, save and training step and fails when one is
# not called; it also fails when a Dimple class overrides a transformers method missing from these lists.
OVERRIDDEN_HOOKS = {
    "modeling_dimple.DimpleForConditionalGeneration._prepare_position_ids_for_generation":
        "GenerationMixin.generate: the M-RoPE positions of the whole prompt, images included",
    "modeling_dimple.DimpleForConditionalGeneration.prepare_inputs_for_generation":
        "GenerationMixin's decoding loop: only the images whose placeholders are not cached yet",
    "modeling_dimple.DimpleForConditionalGeneration._expand_inputs_for_generation":
        "GenerationMixin.generate (num_return_sequences): each prompt's own images repeated with it",
    "modeling_dimple.DimpleForConditionalGeneration.get_input_embeddings": "PreTrainedModel, GenerationMixin",
    "modeling_dimple.DimpleForConditionalGeneration.get_output_embeddings": "PreTrainedModel (tying, resizing)",
    "modeling_dimple.DimpleForConditionalGeneration.set_input_embeddings": "PreTrainedModel.resize_token_embeddings",
    "modeling_dimple.DimpleForConditionalGeneration.set_output_embeddings": "PreTrainedModel.resize_token_embeddings",
    "generation_utils.DimpleGenerationMixin.adjust_generation_fn":
        "PreTrainedModel.from_pretrained: generation_config.json loaded as a DimpleGenerationConfig",
    "generation_config_dimple.DimpleGenerationConfig.from_model_config":
        "PreTrainedModel.__init__ (generation_config_class): the model's generation config from config.json",
    "generation_config_dimple.DimpleGenerationConfig.validate": "GenerationConfig.__init__ / update / save_pretrained",
    "generation_config_dimple.DimpleGenerationConfig.to_diff_dict": "GenerationConfig.save_pretrained (to_json_string)",
    "passes_dimple.PrefixCache.update": "the decoder's attention layers (the Cache protocol)",
    "image_processing_dimple.DimpleImageProcessor._preprocess": "Qwen2VLImageProcessorPil.preprocess",
    "image_processing_dimple.DimpleImageProcessor.process_image": "the PIL backend's preprocess, per image",
    "image_processing_dimple.DimpleImageProcessor.fetch_images":
        "preprocess and ProcessorMixin.__call__: paths, URLs and base64 strings opened by `read_image`",
    "image_processing_dimple.DimpleImageProcessor.to_dict": "save_pretrained, ProcessorMixin.to_dict",
    "processing_dimple.DimpleProcessor.post_process_image_text_to_text":
        "ImageTextToTextPipeline.postprocess: the answer cleaned as post_process_answer cleans it",
    "processing_dimple.DimpleProcessor.validate_inputs": "ProcessorMixin.__call__",
    "processing_dimple.DimpleProcessor.replace_image_token": "ProcessorMixin.__call__: one pad per vision token",
    "processing_dimple.DimpleProcessor._process_videos": "ProcessorMixin.__call__: videos through the image processor",
    "training_dimple.DimpleTrainer.save_model": "Trainer's checkpointing and the end of training",
    "training_dimple.CollatorEpochCallback.on_epoch_begin": "Trainer's callback handler",
}  # fmt: skip
# Overrides that only users and Dimple's own code call: public API, not a hook a release can stop calling.
OWN_ENTRY_POINTS = (
    "generation_utils.DimpleGenerationMixin.generate",
    "processing_dimple.DimpleProcessor.from_pretrained",  # public; replaces the private loading hooks 5.25 dropped
    "processing_dimple.DimpleProcessor.apply_chat_template",
    "streaming_dimple.DiffusionTextStreamer.put",  # called by diffusion_generate
    "streaming_dimple.DiffusionTextStreamer.end",
    "image_processing_dimple.DimpleImageProcessor.preprocess",  # called by its own __call__
    "processing_dimple.DimpleProcessor.replace_video_token",  # called by its own _process_videos
)
# Private behaviour used without overriding it, and the test that notices when it changes.
RELIED_ON = {
    "GenerationMixin.prepare_inputs_for_generation (called through super)":
        "slices `position_ids` to the uncached tokens; test_generation.py::"
        "test_generate_with_causal_attention_cache_matches_full_forwards",
    "GenerationMixin._update_model_kwargs_for_generation":
        "extends the `[3, B, S]` M-RoPE `position_ids` by one per new token; the same test",
    "GenerationMixin.prepare_inputs_for_generation: `self.create_masks_for_generate` when the model defines it":
        "with a static cache, Dimple's mask instead of the stock causal mapping (forward refuses a mask mapping); "
        "test_conformance.py::test_autoregressive_decoding_with_a_static_cache_gives_the_dynamic_cache_answers",
    "GenerationMixin._expand_inputs_for_generation (called through super)":
        "repeats the text inputs; test_compat.py::test_transformers_still_calls_every_hook_the_package_overrides",
    "ProcessorMixin.get_processor_dict": "reads processor_config.json and the chat template; the loading tests",
    "GenerationConfig._get_default_generation_params":
        "the neutral value of each standard generation setting (what `generate` fills in when nothing sets it); "
        "test_habits.py::test_autoregressive_only_settings_raise_naming_them",
}  # fmt: skip

def standard_generation_defaults() -> dict:
    """What transformers' `generate` gives each standard setting that nothing sets (`max_length=20`, `num_beams=1`,
    `repetition_penalty=1.0`, ...): values at which a setting asks for nothing."""
    return GenerationConfig._get_default_generation_params()


# ------------------------------------------------------------------------------------- transformers serve
# `transformers serve` cannot load remote code (it looks the model class up by name in the `transformers` namespace)
# and calls `generate` with autoregressive defaults. `serve_dimple.py` subclasses two of its classes and puts the
# subclasses where serve's CLI looks them up (`install_serve_classes`); these are their overrides, with the serve code
# that calls each. serve moved `generate` to a model process in 5.25: `serve_internals().model_process` says which.
SERVE_HOOKS = {
    "serve_dimple.DimpleServeLoader._load_model":
        "load_model_and_processor of serve's loader (ModelManager <= 5.24; ModelLoader 5.25, in the model process)",
    "serve_dimple.DimpleServeLoader.get_model_modality":
        "ChatCompletionHandler.handle_request (<= 5.24); EngineClient.modality (5.25): VLM, so images reach the chat",
    "serve_dimple.DimpleChatCompletionHandler._build_generation_config":
        "ChatCompletionHandler.handle_request (<= 5.24): the request's diffusion settings, validated",
    "serve_dimple.DimpleChatCompletionHandler._build_generation_kwargs":
        "ChatCompletionHandler.handle_request (5.25): the request's diffusion settings, validated",
    "serve_dimple.DimpleChatCompletionHandler._streaming":
        "ChatCompletionHandler.handle_request: committed answer prefix as deltas",
    "serve_dimple.DimpleChatCompletionHandler._non_streaming":
        "ChatCompletionHandler.handle_request: the answer without its pad slots",
}  # fmt: skip


def serve_internals():
    """The `transformers serve` internals `serve_dimple.py` builds on, imported only when serving (they need the
    `transformers[serving]` extras). Differences between releases are resolved here: the loader class is
    `ModelManager` up to 5.24 and `ModelLoader` (with a spawned model process, `EngineClient`) from 5.25."""
    from types import SimpleNamespace

    from transformers.cli.serving import chat_completion, model_manager, utils
    from transformers.cli.transformers import app

    model_process = hasattr(model_manager, "EngineClient")
    return SimpleNamespace(
        cli=app,
        model_process=model_process,
        loader_class=model_manager.ModelLoader if model_process else model_manager.ModelManager,
        chat_handler_class=chat_completion.ChatCompletionHandler,
        ModelManager=model_manager.ModelManager,
        GenerationState=utils.GenerationState,
        Modality=utils.Modality,
        prompt_length=getattr(utils, "prompt_length", None),
        # <= 5.24: streaming runs in the server's process with these; 5.25 streams through `EngineClient.submit_*`
        DirectStreamer=getattr(utils, "DirectStreamer", None),
        GenerationCancelled=utils._GenerationCancelled,
        StreamError=utils._StreamError,
    )


def install_serve_classes(loader_class, chat_handler_class) -> None:
    """Make serve's CLI build Dimple's loader and chat handler: it imports both by name from these modules when it
    starts (`Serve.__init__` / `Serve.run`), and 5.25's `EngineClient.modality` asks the loader module's class."""
    from transformers.cli.serving import chat_completion, model_manager

    setattr(model_manager, serve_internals().loader_class.__name__, loader_class)
    chat_completion.ChatCompletionHandler = chat_handler_class


def remote_class(reference: str, repo: str, revision: str | None = None):
    """The remote-code class `module.Class` of a folder or Hub repo (the one `auto_map` names)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(reference, repo, revision=revision)


def make_class_visible_to_serve(name: str, model_class) -> None:
    """serve loads `getattr(transformers, config.architectures[0])`: a remote-code class is made visible under its
    architecture name (never shadowing a transformers class of that name), in the module object serve's loader holds
    (importing some transformers submodules replaces `sys.modules["transformers"]`, so `import transformers` here
    may give another object)."""
    from transformers.cli.serving import model_manager

    if not hasattr(model_manager.transformers, name):
        setattr(model_manager.transformers, name, model_class)


# ------------------------------------------------------------------------------------------- the cache's name
# <= 5.23: `past_key_values`; >= 5.24: `cache` (the old keyword still works there, with a deprecation warning).
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def warn_old_cache_name(owner: str) -> None:
    """Where the release calls the cache `cache`, `past_key_values=` warns as native models' `forward` does
    (transformers' `deprecate_kwarg` words, which its common tests look for); on <= 5.23 it is the current name."""
    if CACHE_NAME == "cache" and not torch.compiler.is_compiling():
        warnings.warn(
            f"`past_key_values` is deprecated for `{owner}` (transformers 5.24 renamed it). Use `cache` instead.",
            FutureWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------- multimodal outputs
# >= 5.24: causal-LM outputs of vision-language models carry their encoders' outputs (`image_outputs`, ...).
try:
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast as CausalLMOutputBase  # noqa: E402

    MULTIMODAL_OUTPUTS = True
except ImportError:  # <= 5.23
    CausalLMOutputBase = CausalLMOutputWithPast
    MULTIMODAL_OUTPUTS = False


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
    "CausalLMOutputBase",
    "CausalLMOutputWithPast",
    "ImageType",
    "MULTIMODAL_OUTPUTS",
    "ModelOutput",
    "OVERRIDDEN_HOOKS",
    "OWN_ENTRY_POINTS",
    "PRETOKENIZE_REGEX",
    "ProcessorMixin",
    "RELIED_ON",
    "SERVE_HOOKS",
    "cache_kwarg",
    "cached_file",
    "check_transformers_version",
    "convert_to_rgb",
    "get_image_type",
    "get_tokenizer_config",
    "install_serve_classes",
    "make_batched_videos",
    "make_class_visible_to_serve",
    "output_cache",
    "remote_class",
    "serve_internals",
    "smart_resize",
    "standard_generation_defaults",
    "warn_old_cache_name",
]
