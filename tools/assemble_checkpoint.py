"""Run the released Dimple weights with *this* package's code: assemble a local model folder.

    python tools/assemble_checkpoint.py rp-yu/Dimple-7B dimple-7b      # Hub id (downloads ~16.6 GB) or local folder
    python -c "from transformers import AutoModel; AutoModel.from_pretrained('dimple-7b', trust_remote_code=True)"

`AutoModel.from_pretrained("rp-yu/Dimple-7B", trust_remote_code=True)` runs the code stored in the Hub repository,
which is upstream's and needs transformers 4.46.2. The folder written here holds the released weights (copied as they
are), the released config re-saved with an `auto_map` naming this package's classes, the processor rebuilt from the
released tokenizer files (`vocab.json` + `merges.txt`; the released `tokenization_dimple.py` is not needed), a
`generation_config.json` with the released chat settings (`generate` decodes by diffusion and stops at either end
token), this package's remote-code modules, the LICENSE and a model card (`README.md` with the Hub metadata). No
Python file of the source is copied. The folder loads offline with `AutoModel` / `AutoProcessor`
(`trust_remote_code=True`) and can be pushed with `model.push_to_hub(...)` or `huggingface-cli upload`.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from configuration_dimple import AUTO_MAP, DimpleConfig  # noqa: E402
from generation_utils import RELEASED_CHAT_SETTINGS, DimpleGenerationConfig  # noqa: E402
from model_card import write_model_card  # noqa: E402
from processing_dimple import EOS_TOKEN, PAD_TOKEN, DimpleProcessor  # noqa: E402

# The package's remote code: every module a checkpoint folder needs (they import each other relatively).
REMOTE_CODE_FILES = (
    "configuration_dimple.py",
    "modeling_dimple.py",
    "input_checks_dimple.py",
    "generation_utils.py",
    "generation_config_dimple.py",
    "denoising_dimple.py",
    "passes_dimple.py",
    "streaming_dimple.py",
    "processing_dimple.py",
    "image_processing_dimple.py",
    "transformers_compat.py",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
SOURCE_PATTERNS = (
    *WEIGHT_PATTERNS,
    "config.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


def source_folder(source: str) -> Path:
    """A local folder as it is, or the Hub repository's weights, config and tokenizer files (never its code)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=list(SOURCE_PATTERNS)))


def assemble(source: str | Path, output: str | Path) -> Path:
    """Write `output`: the source's weights and settings with this package's code. Returns the folder."""
    base_model = base_model_id(str(source))
    source, output = source_folder(str(source)), Path(output)
    weights = [path for pattern in WEIGHT_PATTERNS for path in source.glob(pattern)]
    if not weights:
        raise FileNotFoundError(f"No *.safetensors weights in {source}; pass a Dimple checkpoint folder or Hub id.")
    if output.resolve() == source.resolve():
        raise ValueError("The output folder must differ from the source folder.")
    output.mkdir(parents=True, exist_ok=True)
    for path in weights:
        shutil.copy2(path, output / path.name)

    config = DimpleConfig.from_pretrained(source)  # validates the released config, fills the diff-style vision dict
    config.architectures = ["DimpleForConditionalGeneration"]
    config_dict = config.to_diff_dict()
    config_dict["auto_map"] = AUTO_MAP
    (output / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")

    processor = DimpleProcessor.from_pretrained(source)
    processor.save_pretrained(output)
    released_generation_config(config, processor.tokenizer).save_pretrained(output)
    for name in REMOTE_CODE_FILES:
        shutil.copy2(REPO_ROOT / name, output / name)
    shutil.copy2(REPO_ROOT / "LICENSE", output / "LICENSE")
    write_model_card(output, kind="released", base_model=base_model)
    return output


def base_model_id(source: str) -> str | None:
    """The Hub id the weights came from (a local folder has none the card could name)."""
    return None if Path(source).exists() else source


def released_generation_config(config: DimpleConfig, tokenizer) -> DimpleGenerationConfig:
    """The released chat settings, with the special ids of the model config (the mask id among them) and both
    tokens that end an answer as EOS, so that `generate` stops at either."""
    ids = {name: getattr(config, name) for name in ("bos_token_id", "pad_token_id", "mask_token_id")}
    ids["eos_token_id"] = tokenizer.convert_tokens_to_ids([PAD_TOKEN, EOS_TOKEN])
    return DimpleGenerationConfig(**RELEASED_CHAT_SETTINGS, **{k: v for k, v in ids.items() if v is not None})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("source", help="Released-style checkpoint: a local folder or a Hub id (rp-yu/Dimple-7B).")
    parser.add_argument("output", type=Path, help="Folder to write.")
    args = parser.parse_args(argv)
    folder = assemble(args.source, args.output)
    print(f"Wrote {folder}: load it with AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).")


if __name__ == "__main__":
    main()
