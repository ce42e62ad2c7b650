"""Quantized loading (`quantization_dimple`): torchao int8 on CPU; bitsandbytes 8/4-bit only with a CUDA GPU."""

import pytest
import torch
from conftest import REPO_ROOT, make_tiny_model
from transformers import AutoModel, AutoProcessor

from quantization_dimple import FULL_PRECISION_MODULES, quantization_config
from shapes.evaluate import answer_batch, decoding_settings
from shapes.task import heldout_examples

CHECKPOINT = REPO_ROOT / "checkpoints" / "dimple-shapes"
needs_torchao = pytest.mark.skipif(not __import__("importlib").util.find_spec("torchao"), reason="torchao absent")
needs_cuda_bnb = pytest.mark.skipif(
    not torch.cuda.is_available() or not __import__("importlib").util.find_spec("bitsandbytes"),
    reason="bitsandbytes quantization needs a CUDA GPU and bitsandbytes",
)


def is_quantized(weight) -> bool:
    # torchao swaps the weight for a tensor subclass; bitsandbytes for its own Parameter classes.
    return type(weight).__module__.split(".")[0] in ("torchao", "bitsandbytes")


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="int8, bnb-8bit, bnb-4bit"):
        quantization_config("int4")


@needs_torchao
def test_int8_quantizes_the_decoder_linears_only_and_keeps_the_logits(tmp_path):
    make_tiny_model().save_pretrained(tmp_path)
    full = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval()
    int8 = AutoModel.from_pretrained(
        tmp_path, trust_remote_code=True, dtype=torch.float32, quantization_config=quantization_config("int8")
    ).eval()
    linears = {name for name, module in int8.named_modules() if isinstance(module, torch.nn.Linear)}
    quantized = {name for name in linears if is_quantized(int8.get_submodule(name).weight)}
    assert quantized == {name for name in linears if name.startswith("model.layers.")}
    assert all(not name.startswith(tuple(FULL_PRECISION_MODULES)) for name in quantized)

    ids = torch.randint(0, 240, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, logits = full(input_ids=ids).logits, int8(input_ids=ids).logits
    assert not torch.equal(logits, reference)  # the weights really changed
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


def shapes_answers(model, processor, count=40):
    setting = next(s for s in decoding_settings(32) if s.name == "confident-0.9")
    examples = heldout_examples(count)
    with torch.inference_mode():
        texts = answer_batch(model, processor, examples, setting.options)["texts"]
    return texts, sum(text == example.answer for text, example in zip(texts, examples)) / count


@pytest.fixture(scope="module")
def full_precision_answers():
    model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True, dtype=torch.float32).eval()
    return shapes_answers(model, AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True))


def check_quantized_checkpoint_answers(model, full_precision_answers, changed_at_most: int):
    texts, exact_match = shapes_answers(model, AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True))
    full_texts, full_exact_match = full_precision_answers
    assert sum(a != b for a, b in zip(texts, full_texts)) <= changed_at_most
    assert exact_match >= full_exact_match - changed_at_most / len(texts)


@needs_torchao
def test_int8_shapes_checkpoint_answers_like_full_precision(full_precision_answers):
    model = AutoModel.from_pretrained(
        CHECKPOINT, trust_remote_code=True, dtype=torch.float32, quantization_config=quantization_config("int8")
    ).eval()
    assert is_quantized(model.model.layers[0].mlp.up_proj.weight)
    check_quantized_checkpoint_answers(model, full_precision_answers, changed_at_most=1)


@needs_cuda_bnb
@pytest.mark.parametrize("method, changed_at_most", [("bnb-8bit", 2), ("bnb-4bit", 4)])
def test_bitsandbytes_shapes_checkpoint_answers_like_full_precision(method, changed_at_most, full_precision_answers):
    model = AutoModel.from_pretrained(
        CHECKPOINT, trust_remote_code=True, dtype=torch.float32, device_map="cuda",
        quantization_config=quantization_config(method, torch.float32),
    ).eval()  # fmt: skip
    assert is_quantized(model.model.layers[0].mlp.up_proj.weight)
    assert not is_quantized(model.lm_head.weight) and not is_quantized(model.img_projector.linear_1.weight)
    check_quantized_checkpoint_answers(model, full_precision_answers, changed_at_most)
