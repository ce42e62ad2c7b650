"""Quantized loading of Dimple through transformers' own quantization configs (torchao, bitsandbytes).

    from quantization_dimple import quantization_config
    model = AutoModel.from_pretrained(path, trust_remote_code=True, quantization_config=quantization_config("int8"))

Only the decoder's linear layers are quantized. The vision tower, the projector and `lm_head` stay in the loaded
dtype: the vision tower and projector are small next to the decoder (0.7 B of Dimple-7B's 8.3 B parameters) and
feed every image token, and `lm_head` scores every answer slot, so confidences (and with them the number of
decoding steps) depend on it directly. bitsandbytes skips `lm_head` by default for the same reason.

| method | library | device | weights |
|---|---|---|---|
| `int8` | torchao `Int8WeightOnlyConfig` | CPU and CUDA | int8, per-channel scales |
| `bnb-8bit` | bitsandbytes LLM.int8() | CUDA | int8 |
| `bnb-4bit` | bitsandbytes NF4 (compute in the model's dtype) | CUDA | 4-bit |

Measured on the shipped checkpoint: `python bench/bench_quantization.py` (README, "Quantized loading").
"""

import torch
from transformers import BitsAndBytesConfig, TorchAoConfig

FULL_PRECISION_MODULES = ["visual", "img_projector", "lm_head"]
METHODS = ("int8", "bnb-8bit", "bnb-4bit")


def quantization_config(method: str, compute_dtype: torch.dtype = torch.bfloat16):
    """The transformers quantization config of `method` (see the module docstring); the decoder only."""
    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=FULL_PRECISION_MODULES)
    if method == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=FULL_PRECISION_MODULES)
    if method == "bnb-4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=FULL_PRECISION_MODULES,
        )
    raise ValueError(f"Unknown quantization method {method!r}; choose one of {', '.join(METHODS)}.")
