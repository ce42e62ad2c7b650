"""Hub model cards for the folders this package writes.

Every folder a user may push (the shipped small checkpoint, the released weights assembled with this package's code,
a fine-tuning output, a LoRA adapter) gets a `README.md` whose metadata lets the Hub show a licence, a widget and the
right library: `huggingface_hub.ModelCard` writes the YAML header, this module only decides what it says.
"""

from pathlib import Path
from typing import Mapping, Optional

from huggingface_hub import ModelCard, ModelCardData

LICENSE = "apache-2.0"  # upstream Dimple's code and released weights
PAPER = "https://arxiv.org/abs/2505.16990"
TAGS = ["dimple", "discrete-diffusion", "multimodal", "vision-language", "custom_code"]

SUMMARY = {
    "released": (
        "Dimple-7B, the first discrete-diffusion multimodal LLM ([paper]({paper})): a Qwen2.5-VL vision tower, a "
        "two-layer projector and a bidirectional Qwen2.5-7B-shaped decoder that answers by filling `<|mask|>` slots "
        "over a few forward passes. The weights are the released ones, unchanged; the code is the transformers-5 "
        "Dimple package."
    ),
    "shapes": (
        "A small Dimple ([paper]({paper})) trained from scratch on synthetic pictures of coloured shapes, so that the "
        "whole pipeline (processor, diffusion decoding, fine-tuning) runs on a CPU in seconds. It answers questions "
        "about colours, shapes, counts and positions; it knows nothing else."
    ),
    "finetuned": "A Dimple model ([paper]({paper})) fine-tuned with the Dimple package's training code.",
    "adapter": (
        "A LoRA adapter for a Dimple model ([paper]({paper})), trained with the Dimple package's training code. "
        "Load it on top of its base model with peft, or use the merged folder written beside it."
    ),
}

MODEL_USAGE = '''```python
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
picture = Image.linear_gradient("L").rotate(90).resize((84, 84))  # or Image.open("your-picture.png")
picture = picture.point(lambda value: 110 + value * 140 // 255).convert("RGB")  # a shaded background
ImageDraw.Draw(picture).ellipse((32, 32, 52, 52), fill=(215, 40, 40))  # and a red circle in the middle
messages = [{{"role": "user", "content": [{{"type": "image", "image": picture}},
                                         {{"type": "text", "text": "Describe the image."}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
out = model.generate(**inputs)  # decodes as the folder's generation_config.json says (diffusion or left to right)
print(processor.post_process_answer(out[0, inputs["input_ids"].shape[1]:]))
```'''

ADAPTER_USAGE = '''```python
from peft import AutoPeftModel

model = AutoPeftModel.from_pretrained("{repo}", trust_remote_code=True)
```'''


def write_model_card(
    folder,
    *,
    kind: str,
    name: Optional[str] = None,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    training: Optional[Mapping[str, object]] = None,
    evaluation: Optional[Mapping[str, object]] = None,
) -> ModelCard:
    """Write `folder/README.md` for a folder of the given kind and return the card.

    `training` holds facts about how the weights were made (stage, data size, epochs, ...), `evaluation` the scores
    measured on them; each becomes a table. `base_model` is the Hub id (or path) the weights were trained from.
    `name` (default: the folder's name) is the card's title and, unless `repo_id` is given, the id its snippet loads:
    the Hub id to push to. `repo_id` is what the snippet loads when that differs (e.g. `checkpoints/dimple-shapes`
    for the shipped card, which runs from the repository root). The snippet draws its own picture, so it runs as
    copied wherever the model loads.
    """
    if kind not in SUMMARY:
        raise ValueError(f"kind={kind!r} is not a Dimple model-card kind; use one of {sorted(SUMMARY)}.")
    folder = Path(folder)
    data = ModelCardData(
        license=LICENSE,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="image-text-to-text",
        tags=TAGS,
        base_model=base_model,
    )
    title = name or folder.name
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(title, repo_id or title, kind, training, evaluation)}")
    card.save(folder / "README.md")
    return card


def _body(name, repo_id, kind, training, evaluation):
    usage = ADAPTER_USAGE if kind == "adapter" else MODEL_USAGE
    sections = [
        f"# {name}",
        SUMMARY[kind].format(paper=PAPER),
        "## Use",
        f"This folder holds its own code (`trust_remote_code=True` runs it; transformers 5.23 or newer).\n\n"
        f"{usage.format(repo=repo_id)}",
    ]
    if training:
        sections += ["## Training", _table(training, "fact")]
    if evaluation:
        sections += ["## Evaluation", _table(evaluation, "metric")]
    sections += ["## Licence", f"Apache-2.0, like upstream Dimple ({PAPER})."]
    return "\n\n".join(sections) + "\n"


def _table(rows: Mapping[str, object], what: str) -> str:
    lines = [f"| {what} | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)
