"""Answer held-out questions with the shipped checkpoint; under torchrun, tensor parallel (`tp_plan="auto"`).

    torchrun --nproc_per_node 2 tests/tp_answers.py OUT.json [COUNT]   # tensor parallel (gloo on CPU)
    python tests/tp_answers.py OUT.json [COUNT]                           # one process

Writes {"answers": [...], "world_size": N, "sharded": bool} (rank 0 only).
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, DistributedConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from shapes.task import heldout_examples, messages, render  # noqa: E402

CHECKPOINT = REPO_ROOT / "checkpoints" / "dimple-shapes"


def load():
    parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # The plan the decoder inherits from Qwen2.5-VL's text config (`base_model_tp_plan`).
    extra = {"distributed_config": DistributedConfig(tp_plan="auto")} if parallel else {}
    model = AutoModelForImageTextToText.from_pretrained(
        CHECKPOINT, trust_remote_code=True, dtype=torch.float32, **extra
    ).eval()
    return model, AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)


def answers(model, processor, count: int) -> list[str]:
    texts = []
    for example in heldout_examples(count):
        prompt = processor.apply_chat_template(messages(example), add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[render(example.scene)], return_tensors="pt").to(model.device)
        out = model.generate(**inputs)
        texts.append(processor.post_process_answer(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def main(output: str, count: int = 12):
    model, processor = load()
    texts = answers(model, processor, count)
    sharded = any(isinstance(p.data, torch.distributed.tensor.DTensor) for p in model.parameters())
    if int(os.environ.get("RANK", "0")) == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        Path(output).write_text(json.dumps({"answers": texts, "world_size": world, "sharded": sharded}))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))
