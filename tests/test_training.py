"""Fine-tuning: the chat collator, diffusion masking, both losses, stage set-up, the Trainer path, LoRA and the CLI.

The tokenizer here is a small word-level one whose special tokens sit at the tiny config's ids, so expected token
ids are written out by hand.
"""

import importlib.util
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, TINY_IDS, make_tiny_model
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModel, AutoProcessor, PreTrainedTokenizerFast
from transformers.loss.loss_utils import ForCausalLMLoss

from image_processing_dimple import DimpleImageProcessor
from processing_dimple import DimpleProcessor
from training_dimple import (
    ChatDataset,
    DimpleDataCollator,
    build_trainer,
    configure_stage,
    diffusion_mask,
    lora_config,
    parse_sample,
    save_final_model,
    stage_training_arguments,
    validate_samples,
)

WORDS = [
    "[UNK]", "\n", "system", "You", "are", "a", "helpful", "assistant.", "user", "assistant",
    "What", "is", "this", "?", "cat", "and", "dog", "red", "blue", "green", "square", "circle", "Name", "the",
    "color", "it",
]  # fmt: skip
W = {word: index for index, word in enumerate(WORDS)}
NL = W["\n"]
IM_START, IM_END = 248, 249
PAD, MASK = TINY_IDS["pad_token_id"], TINY_IDS["mask_token_id"]
IMG, VS, VE = TINY_IDS["image_token_id"], TINY_IDS["vision_start_token_id"], TINY_IDS["vision_end_token_id"]
SPECIALS = {
    "<|vision_start|>": VS,
    "<|vision_end|>": VE,
    "<|vision_pad|>": TINY_IDS["vision_token_id"],
    "<|image_pad|>": IMG,
    "<|video_pad|>": TINY_IDS["video_token_id"],
    "<|im_start|>": IM_START,
    "<|im_end|>": IM_END,
    "<|endoftext|>": PAD,
    "<|mask|>": MASK,
}
SYSTEM = [IM_START, W["system"], NL, W["You"], W["are"], W["a"], W["helpful"], W["assistant."], IM_END]


def user_turn(*content):
    return [NL, IM_START, W["user"], NL, *content, IM_END, NL, IM_START, W["assistant"], NL]


@pytest.fixture(scope="module")
def processor():
    tokenizer = Tokenizer(models.WordLevel({**W, **SPECIALS}, unk_token="[UNK]"))
    # Words split on spaces; "\n" is a token of its own.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split("\n", "isolated")]
    )
    tokenizer.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        mask_token="<|mask|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    return DimpleProcessor(image_processor=DimpleImageProcessor(), tokenizer=fast)


def picture(width, height, color=(200, 30, 30)):
    return Image.new("RGB", (width, height), color)


def two_turn_sample():
    return {
        "messages": [
            {"role": "user", "content": "<image>\nWhat is this ?"},
            {"role": "assistant", "content": "a cat"},
            {"role": "user", "content": "and <image> ?"},
            {"role": "assistant", "content": "dog"},
        ],
        "images": [picture(56, 56), picture(84, 56)],
    }


def text_sample(answer="red"):
    return {"messages": [{"role": "user", "content": "What is it ?"}, {"role": "assistant", "content": answer}]}


def toy_samples():
    colors = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
    return [
        {
            "messages": [
                {"role": "user", "content": "<image>\nName the color ?"},
                {"role": "assistant", "content": f"{name} {shape}"},
            ],
            "images": [picture(56, 56, rgb)],
        }
        for name, rgb in colors.items()
        for shape in ("square", "circle")
    ]


# --------------------------------------------------------------------------------------------------- collator


def test_collator_two_turns_two_images_by_hand(processor):
    collator = DimpleDataCollator(processor, answer_padding="fixed", fixed_answer_length=3)
    batch = collator([two_turn_sample(), text_sample()])

    prompt_1 = SYSTEM + user_turn(VS, *[IMG] * 4, VE, NL, W["What"], W["is"], W["this"], W["?"])
    answer_1 = [W["a"], W["cat"], PAD]
    prompt_2 = user_turn(W["and"], VS, *[IMG] * 6, VE, W["?"])  # 56x56 -> 2x2 merged tokens; 84x56 -> 2x3
    answer_2 = [W["dog"], PAD, PAD]
    ids = prompt_1 + answer_1 + prompt_2 + answer_2
    ignored = [-100]
    labels = ignored * len(prompt_1) + answer_1 + ignored * len(prompt_2) + answer_2
    answer = [0] * len(prompt_1) + [1] * 3 + [0] * len(prompt_2) + [1] * 3

    short = SYSTEM + user_turn(W["What"], W["is"], W["it"], W["?"]) + [W["red"], PAD, PAD]
    pad = len(ids) - len(short)
    assert batch["input_ids"].tolist() == [ids, short + [PAD] * pad]
    assert batch["labels"].tolist() == [labels, [-100] * (len(short) - 3) + [W["red"], PAD, PAD] + [-100] * pad]
    assert collator.encode(two_turn_sample()).answer_mask.tolist() == [bool(a) for a in answer]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"}  # model inputs
    assert batch["attention_mask"].tolist() == [[1] * len(ids), [1] * len(short) + [0] * pad]
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    reference = DimpleImageProcessor()(images=two_turn_sample()["images"], return_tensors="pt")
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])


def test_training_prompt_is_the_inference_prompt(processor):
    """The collator's tokens before the answer are what the processor gives `diffusion_generate` at inference."""
    sample = {
        "messages": [
            {"role": "user", "content": "Name the <image> color ?"},
            {"role": "assistant", "content": "red square"},
        ],
        "images": [picture(84, 56)],
    }
    encoded = DimpleDataCollator(processor).encode(sample)
    prompt_length = int(encoded.answer_mask.long().argmax())
    question = [{"type": "text", "text": "Name the "}, {"type": "image"}, {"type": "text", "text": " color ?"}]
    text = processor.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    inference = processor(text=[text], images=sample["images"], return_tensors="pt")
    assert encoded.input_ids[:prompt_length].tolist() == inference["input_ids"][0].tolist()
    assert torch.equal(encoded.pixel_values, inference["pixel_values"])
    assert encoded.input_ids[prompt_length:].tolist()[:2] == [W["red"], W["square"]]


def test_every_sample_layout_parses_to_transformers_chat_format():
    """Markers, LLaVA's layout and content parts become one representation, the messages the chat template renders:
    user content as text and image parts, the images in their order beside them."""
    image = picture(56, 56)
    markers = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\nWhat is this ?"},
            {"role": "assistant", "content": "cat"},
        ],
        "images": [image],
    }
    llava = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\nWhat is this ?"},
            {"from": "gpt", "value": "cat"},
        ],
        "image": image,
    }
    parts = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "\nWhat is this ?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "cat"}]},
        ]
    }
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is this ?"}]},
        {"role": "assistant", "content": "cat"},
    ]
    for sample in (markers, llava, parts):
        chat = parse_sample(sample)
        assert chat.messages == expected
        assert chat.images == [image]
        assert chat.answers == ["cat"]


def test_collator_reads_llava_layout_and_image_files(processor, tmp_path):
    first, second = two_turn_sample()["images"]
    first.save(tmp_path / "one.png")
    buffer = io.BytesIO()
    second.save(buffer, format="PNG")
    llava = {
        "id": "x1",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this ?"},
            {"from": "gpt", "value": "a cat"},
            {"from": "human", "value": "and <image> ?"},
            {"from": "gpt", "value": "dog"},
        ],
        "images": ["one.png", buffer.getvalue()],
    }
    collator = DimpleDataCollator(processor, answer_padding="fixed", fixed_answer_length=3, image_folder=tmp_path)
    expected, got = collator([two_turn_sample()]), collator([llava])
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_sixteen_bit_png_trains_as_its_eight_bit_version(processor, tmp_path):
    # A gradient, so that a clipped (white) or stretched picture would differ from the 8-bit one.
    gray = Image.fromarray((torch.arange(56 * 84).reshape(56, 84) % 251).to(torch.uint8).numpy())
    gray.save(tmp_path / "eight.png")
    values = (torch.tensor(np.asarray(gray), dtype=torch.int32) * 257).numpy().astype("<u2")
    Image.frombytes("I;16", gray.size, values.tobytes()).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"

    def sample(name):
        return {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red"}],
                "images": [name]}  # fmt: skip

    validate_samples([sample("sixteen.png")], tmp_path)
    collator = DimpleDataCollator(processor, image_folder=tmp_path)
    eight, sixteen = collator([sample("eight.png")]), collator([sample("sixteen.png")])
    assert torch.equal(sixteen["pixel_values"], eight["pixel_values"])
    assert sixteen["pixel_values"].std() > 0.5  # a picture, not a blank


@pytest.mark.parametrize("words, bound", [(1, 2), (2, 4), (5, 8), (15, 16), (16, 32), (20, 32)])
def test_dynamic_answer_padding_draws_the_whole_range(processor, words, bound):
    collator = DimpleDataCollator(processor)
    sample = text_sample(" ".join(["a"] * words))
    generator = torch.Generator().manual_seed(0)
    totals = set()
    for _ in range(300):
        encoded = collator.encode(sample, generator=generator)
        assert encoded.input_ids[-1] == PAD  # at least one pad, never <|im_end|>
        totals.add(int(encoded.answer_mask.sum()))
    assert totals == set(range(words + 1, bound + 1))


def test_over_long_sample_is_refused_naming_what_the_cut_would_remove(processor):
    sample = {
        "messages": [{"role": "user", "content": "What is it ?"}, {"role": "assistant", "content": "red"},
                     {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "dog"}],
        "images": [picture(56, 56)],
    }  # fmt: skip
    full = DimpleDataCollator(processor, answer_padding="fixed", fixed_answer_length=2)([sample])["input_ids"][0]
    start = full.tolist().index(VS)
    question_end = len(full) - 2  # the second answer: "dog" and one pad
    inside_image = DimpleDataCollator(processor, max_length=start + 3, answer_padding="fixed", fixed_answer_length=2)
    message = (
        rf"Sample 0: {len(full)} tokens \(images expanded, each answer with one pad\) > max_length={start + 3}; the "
        rf"cut would remove question 2 \({question_end - start - 3} of \d+ tokens\), image 1 \(3 of 6 tokens\), "
        r"answer 2 \(all 2 of 2 tokens\)"
    )
    with pytest.raises(ValueError, match=message):
        inside_image([sample])
    inside_image.truncate_answers = True  # never inside an image, even when asked to cut answers
    with pytest.raises(ValueError, match=message):
        inside_image([sample])


def test_truncate_answers_cuts_the_last_answer_end_only(processor):
    sample = {"messages": [{"role": "user", "content": "<image>"},
                           {"role": "assistant", "content": "a red cat and a dog"}],
              "images": [picture(56, 56)]}  # fmt: skip
    options = dict(answer_padding="fixed", fixed_answer_length=8)
    full = DimpleDataCollator(processor, **options)([sample])
    cut = DimpleDataCollator(processor, max_length=len(full["input_ids"][0]) - 5, truncate_answers=True, **options)
    batch = cut([sample])
    # The answer loses its 2 pads and its last 3 words; the image and the rest are kept whole.
    assert batch["input_ids"][0].tolist() == full["input_ids"][0, :-5].tolist()
    assert batch["input_ids"][0, -3:].tolist() == [W["a"], W["red"], W["cat"]]
    assert torch.equal(batch["pixel_values"], full["pixel_values"])


def test_dynamic_padding_is_shortened_to_fit_max_length(processor):
    sample = text_sample(" ".join(["a"] * 5))  # 5 answer tokens, padding drawn up to 8
    shortest = len(DimpleDataCollator(processor).encode(sample, generator=torch.Generator()).input_ids)
    collator = DimpleDataCollator(processor, max_length=shortest - 5 + 6)  # room for the answer and one pad
    for seed in range(20):
        encoded = collator.encode(sample, generator=torch.Generator().manual_seed(seed))
        assert len(encoded.input_ids) <= shortest - 5 + 6 and encoded.input_ids[-1] == PAD


def test_empty_image_is_named(processor):
    sample = {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red"}],
              "images": [Image.new("RGB", (0, 0))]}  # fmt: skip
    with pytest.raises(ValueError, match=r"image 0 .* is empty \(0x0\)"):
        DimpleDataCollator(processor)([sample])


def bad_samples(tmp_path):
    good = text_sample()
    return {
        "unknown role": (
            {"messages": [{"role": "user", "content": "What"}, {"role": "bot", "content": "red"}]},
            r"Sample 3 \(id 'bad'\), message 1: unknown role 'bot'",
        ),
        "more markers": (
            {**good, "messages": [{"role": "user", "content": "<image> <image>"}, good["messages"][1]],
             "images": [picture(56, 56)]},
            r"Sample 3 \(id 'bad'\): 2 <image> marker\(s\) but 1 image\(s\) \(more markers than images\)",
        ),
        "fewer markers": (
            {**good, "images": [picture(56, 56)]},
            r"Sample 3 \(id 'bad'\): 0 <image> marker\(s\) but 1 image\(s\) \(fewer markers than images\)",
        ),
        "empty answer": (
            {"messages": [good["messages"][0], {"role": "assistant", "content": "  "}]},
            r"Sample 3 \(id 'bad'\), message 1: empty assistant answer",
        ),
        "garbage bytes": (
            {"messages": [{"role": "user", "content": "<image>"}, good["messages"][1]], "images": [b"not a png"]},
            r"Sample 3 \(id 'bad'\): cannot read image 0 \(9 bytes\)",
        ),
        "missing file": (
            {"messages": [{"role": "user", "content": "<image>"}, good["messages"][1]], "images": ["gone.png"]},
            r"Sample 3 \(id 'bad'\): cannot read image 0 \('gone.png'\)",
        ),
        "literal image token": (
            {"messages": [{"role": "user", "content": "What <|image_pad|> ?"}, good["messages"][1]]},
            r"Sample 3 \(id 'bad'\), message 0: the text holds <\|image_pad\|>, .* mark each image with <image>",
        ),
    }  # fmt: skip


# The same problems found by the up-front check (images opened once), where the collator's wording differs.
UP_FRONT_MESSAGES = {
    "garbage bytes": r"1 of 1 training image\(s\) cannot be used:\n  Sample 3 \(id 'bad'\), image 0 \(9 bytes\): "
    r"cannot be read",
    "missing file": r"Sample 3 \(id 'bad'\), image 0 \('gone.png'\): no such file .*gone.png\n"
    r"Relative image paths start at image_folder=.* \(--image_folder\)",
}


@pytest.mark.parametrize(
    "problem",
    ["unknown role", "more markers", "fewer markers", "empty answer", "garbage bytes", "missing file",
     "literal image token"],
)  # fmt: skip
def test_bad_data_names_the_sample(processor, tmp_path, problem):
    sample, message = bad_samples(tmp_path)[problem]
    dataset = ChatDataset([text_sample()] * 3 + [{**sample, "id": "bad"}])
    collator = DimpleDataCollator(processor, image_folder=tmp_path)
    with pytest.raises(ValueError, match=message):
        collator([dataset[0], dataset[3]])
    with pytest.raises(ValueError, match=UP_FRONT_MESSAGES.get(problem, message)):
        validate_samples(dataset.samples, tmp_path)


# ---------------------------------------------------------------------------------------------------- masking


def test_diffusion_mask_follows_the_seeded_draws(processor):
    encoded = DimpleDataCollator(processor, answer_padding="fixed", fixed_answer_length=8).encode(two_turn_sample())
    ids, answer = encoded.input_ids, encoded.answer_mask
    [(masked, labels)] = diffusion_mask(ids, answer, MASK, torch.Generator().manual_seed(3), eps=1e-3)

    generator = torch.Generator().manual_seed(3)
    t = 0.999 * torch.rand(1, generator=generator) + 0.001
    expected = answer & (torch.rand(len(ids), generator=generator) < t)
    assert expected.any() and not expected.all()
    assert torch.equal(masked == MASK, expected)
    assert torch.equal(masked[~expected], ids[~expected])
    assert torch.equal(labels[expected], ids[expected]) and (labels[~expected] == -100).all()

    reached = torch.zeros_like(answer)
    for seed in range(40):
        [(masked, _)] = diffusion_mask(ids, answer, MASK, torch.Generator().manual_seed(seed))
        assert not (masked[~answer] == MASK).any()  # system, prompt, vision and image tokens are never masked
        reached |= masked == MASK
    assert torch.equal(reached, answer)


def test_dual_masking_masks_every_answer_token_exactly_once(processor):
    samples = [two_turn_sample(), text_sample()]
    plain = DimpleDataCollator(processor, answer_padding="fixed", fixed_answer_length=4)(samples)
    batch = DimpleDataCollator(
        processor, objective="diffusion", mask_strategy="dual", answer_padding="fixed", fixed_answer_length=4, seed=1
    )(samples)
    assert batch["input_ids"].shape[0] == 4
    hits = batch["input_ids"] == MASK
    # in the AR view (fixed padding, nothing masked), the scored positions are exactly the answers and their pads
    assert torch.equal(hits[:2].int() + hits[2:].int(), (plain["labels"] != -100).int())
    for copy in (slice(0, 2), slice(2, 4)):
        assert torch.equal(batch["labels"][copy][hits[copy]], plain["input_ids"][hits[copy]])
        assert (batch["labels"][copy][~hits[copy]] == -100).all()
        assert torch.equal(batch["input_ids"][copy][~hits[copy]], plain["input_ids"][~hits[copy]])
    assert torch.equal(batch["pixel_values"], torch.cat([plain["pixel_values"]] * 2))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]] * 2


# ----------------------------------------------------------------------------------------------------- losses


def test_diffusion_loss_equals_hand_computation(processor):
    model = configure_stage(make_tiny_model(), "diffusion")
    samples = [two_turn_sample(), text_sample()]
    options = dict(answer_padding="fixed", fixed_answer_length=4)
    original = DimpleDataCollator(processor, **options)(samples)["input_ids"]
    batch = DimpleDataCollator(processor, objective="diffusion", seed=5, **options)(samples)
    output = model(**batch)

    masked = (batch["input_ids"] == MASK).nonzero().tolist()
    assert len(masked) > 1
    log_probs = output.logits.float().log_softmax(-1)
    # The logit at position j - 1 scores the token at j.
    expected = -sum(log_probs[b, j - 1, original[b, j]] for b, j in masked) / len(masked)
    torch.testing.assert_close(output.loss, expected)


def test_batch_without_masked_tokens_gives_zero_loss_and_a_valid_graph(processor):
    model = configure_stage(make_tiny_model(), "diffusion").train()
    batch = DimpleDataCollator(processor)([two_turn_sample()])
    labels = torch.full_like(batch["labels"], -100)
    for count in (None, torch.tensor(0)):
        model.zero_grad()
        loss = model(**batch | {"labels": labels}, num_items_in_batch=count).loss
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        grads = [param.grad for param in model.parameters() if param.grad is not None]
        assert grads and all(torch.isfinite(grad).all() and not grad.any() for grad in grads)


def test_ar_loss_equals_transformers_causal_lm_loss(processor):
    model = configure_stage(make_tiny_model(), "ar")
    batch = DimpleDataCollator(processor, seed=2)([two_turn_sample(), text_sample()])
    output = model(**batch)
    vocab = model.config.vocab_size
    torch.testing.assert_close(output.loss, ForCausalLMLoss(output.logits, batch["labels"], vocab))
    count = torch.tensor(11)
    summed = model(**batch, num_items_in_batch=count).loss
    torch.testing.assert_close(summed, ForCausalLMLoss(output.logits, batch["labels"], vocab, num_items_in_batch=count))


def test_ar_stage_is_causal_and_diffusion_stage_is_not(processor):
    model = make_tiny_model()
    batch = DimpleDataCollator(processor)([two_turn_sample()])
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][0, -2] = W["green"]
    with torch.no_grad():
        for stage, causal in (("ar", True), ("diffusion", False)):
            configure_stage(model, stage)
            before, after = model(**batch).logits[0, :-2], model(**changed).logits[0, :-2]
            assert torch.allclose(before, after, atol=1e-6) is causal


@pytest.mark.parametrize(
    "stage, trainable, full_attention, lr, clip",
    [
        ("align", {"img_projector"}, False, 1e-3, 1.0),
        ("ar", {"model", "lm_head", "img_projector"}, False, 2e-5, 1.0),
        ("diffusion", {"model", "lm_head"}, True, 5e-6, 0.01),
    ],
)
def test_stage_freezing_attention_and_defaults(tmp_path, stage, trainable, full_attention, lr, clip):
    model = configure_stage(make_tiny_model(), stage)
    assert {name.split(".")[0] for name, param in model.named_parameters() if param.requires_grad} == trainable
    assert not any(param.requires_grad for name, param in model.named_parameters() if name.startswith("visual."))
    assert model.config.full_attn_mask is full_attention
    args = stage_training_arguments(stage, str(tmp_path))
    assert (args.learning_rate, args.max_grad_norm, args.weight_decay) == (lr, clip, 0)
    assert args.remove_unused_columns is False


# ---------------------------------------------------------------------------------------------------- trainer


def eval_loss(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.parametrize("stage", ["ar", "diffusion"])
def test_trainer_steps_lower_the_loss(processor, tmp_path, stage):
    model = make_tiny_model()
    options = dict(answer_padding="fixed", fixed_answer_length=4)
    args = stage_training_arguments(
        stage, str(tmp_path), learning_rate=1e-2, max_grad_norm=1.0, warmup_steps=0, max_steps=10,
        per_device_train_batch_size=6, save_strategy="no", logging_steps=1,
    )  # fmt: skip
    trainer = build_trainer(model, processor, toy_samples(), stage, args, **options)
    probe = DimpleDataCollator(processor, objective=trainer.data_collator.objective, seed=9, **options)(toy_samples())
    before = eval_loss(model, probe)
    trainer.train()
    after = eval_loss(model, probe)
    assert after < 0.6 * before
    assert model.config.full_attn_mask is (stage == "diffusion")


def test_gradient_accumulation_matches_one_big_batch(processor, tmp_path):
    samples = [two_turn_sample(), text_sample("a red square and a blue circle and a green cat")]
    counts = [int((DimpleDataCollator(processor, objective="diffusion")([s])["labels"] != -100).sum()) for s in samples]

    def sgd_update(batch_size, accumulation):
        model = make_tiny_model()
        args = stage_training_arguments(
            "diffusion", str(tmp_path / str(accumulation)), optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
            warmup_steps=0, lr_scheduler_type="constant", max_steps=1, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, train_sampling_strategy="sequential", save_strategy="no",
        )  # fmt: skip
        trainer = build_trainer(model, processor, samples, "diffusion", args)
        before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
        trainer.train()
        return {name: before[name] - param.detach() for name, param in model.named_parameters() if name in before}

    # The collator draws per sample in order, so both runs see the same masks: unequal counts per micro-batch.
    assert counts[0] != counts[1] and min(counts) > 0
    big, accumulated = sgd_update(2, 1), sgd_update(1, 2)
    assert any(update.abs().max() > 0 for update in big.values())
    for name, update in big.items():
        torch.testing.assert_close(accumulated[name], update, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(processor):
    batch = DimpleDataCollator(processor, objective="diffusion", seed=4)([two_turn_sample(), text_sample()])

    def gradients(checkpointing):
        model = configure_stage(make_tiny_model(), "diffusion").train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(**batch).loss.backward()
        return {name: param.grad for name, param in model.named_parameters() if param.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)


def tiny_logits(model, processor):
    batch = DimpleDataCollator(processor, answer_padding="fixed", fixed_answer_length=4)(toy_samples()[:2])
    model.eval()
    with torch.no_grad():
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        return model(**{key: batch[key] for key in keys}).logits


def test_lora_trains_adapters_on_the_language_model_and_merges(processor, tmp_path):
    model = make_tiny_model()
    original = {name: param.detach().clone() for name, param in model.named_parameters()}
    base_logits = tiny_logits(model, processor)
    args = stage_training_arguments(
        "diffusion", str(tmp_path / "run"), learning_rate=1e-2, max_grad_norm=1.0, warmup_steps=0, max_steps=3,
        per_device_train_batch_size=6, save_strategy="no",
    )  # fmt: skip
    lora = lora_config("diffusion", r=4, alpha=8, dropout=0.0)
    trainer = build_trainer(model, processor, toy_samples(), "diffusion", args, lora=lora)

    trainable = [name for name, param in trainer.model.named_parameters() if param.requires_grad]
    adapted = {name.split("base_model.model.")[1].split(".lora_")[0] for name in trainable}
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    assert all(".lora_" in name for name in trainable)
    assert adapted == {f"model.layers.{layer}.{projection}" for layer in range(2) for projection in projections}

    trainer.train()
    for name, param in trainer.model.get_base_model().named_parameters():
        if ".lora_" not in name:  # frozen base weights (vision tower included) are untouched
            assert torch.equal(param, original[name.replace(".base_layer", "")]), name
    assert any(param.abs().sum() > 0 for name, param in trainer.model.named_parameters() if "lora_B" in name)

    output_dir = save_final_model(trainer, str(tmp_path / "final"))
    merged_logits = tiny_logits(trainer.model.get_base_model(), processor)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)
    reloaded = AutoModel.from_pretrained(output_dir, trust_remote_code=True, dtype=torch.float32)
    torch.testing.assert_close(tiny_logits(reloaded, processor), merged_logits)
    assert (tmp_path / "run" / "lora_adapter" / "adapter_config.json").exists()


# -------------------------------------------------------------------------------------------------------- CLI


def load_finetune_script():
    spec = importlib.util.spec_from_file_location("finetune", REPO_ROOT / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_script_trains_and_saves_a_reloadable_checkpoint(processor, tmp_path):
    base = tmp_path / "base"
    make_tiny_model().save_pretrained(base)
    processor.save_pretrained(base)
    (tmp_path / "images").mkdir()
    rows = []
    for number, sample in enumerate(toy_samples()):
        sample["images"][0].save(tmp_path / "images" / f"{number}.png")
        rows.append(json.dumps({**sample, "images": [f"{number}.png"]}))
    (tmp_path / "data.jsonl").write_text("\n".join(rows))

    trainer = load_finetune_script().main([
        "--model", str(base), "--data", str(tmp_path / "data.jsonl"), "--image_folder", str(tmp_path / "images"),
        "--stage", "ar", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--per_device_train_batch_size", "3", "--gradient_checkpointing", "--learning_rate", "1e-2",
    ])  # fmt: skip
    assert trainer.args.max_grad_norm == 1.0 and trainer.args.activation_checkpointing

    reloaded = AutoModel.from_pretrained(tmp_path / "out" / "final", trust_remote_code=True, dtype=torch.float32)
    reprocessor = AutoProcessor.from_pretrained(tmp_path / "out" / "final", trust_remote_code=True)
    assert reprocessor.tokenizer.convert_tokens_to_ids("<|mask|>") == MASK
    assert reloaded.config.full_attn_mask is False
    torch.testing.assert_close(tiny_logits(reloaded, processor), tiny_logits(trainer.model, processor))
    initial = AutoModel.from_pretrained(base, trust_remote_code=True, dtype=torch.float32)
    # The Trainer never sees the processor, so it cannot rewrite bos/eos with the tokenizer's <|im_start|>/<|im_end|>.
    assert (reloaded.config.bos_token_id, reloaded.config.eos_token_id) == (None, None)
    changed = {name.split(".")[0] for name, param in reloaded.named_parameters()
               if not torch.equal(param, initial.get_parameter(name))}  # fmt: skip
    assert changed == {"model", "lm_head", "img_projector"}


def test_distributed_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = REPO_ROOT / "examples" / "configs"
    for name, stage in (("zero1.json", 1), ("zero2.json", 2)):
        config = json.loads((configs / name).read_text())
        assert config["zero_optimization"]["stage"] == stage
        # Batch sizes, accumulation and clipping come from the Trainer's arguments.
        trainer_owned = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
        assert {config[key] for key in trainer_owned} == {"auto"}
    fsdp = load_config_from_file(str(configs / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP"
    wrapped = set(fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    assert wrapped <= {type(module).__name__ for module in make_tiny_model().modules()}


# ------------------------------------------------------------------------------------------------ module split


@pytest.mark.parametrize("first", ["training_data", "training_collator", "training_dimple"])
def test_data_names_stay_importable_where_they_were(first):
    """The collator's names moved to `training_collator`; `training_data` and `training_dimple` still give the same
    objects, whichever module a fresh interpreter imports first (the lazy re-export must not make an import cycle)."""
    script = f"""
import importlib
importlib.import_module({first!r})
import training_collator, training_data, training_dimple
for name in training_collator.__all__:
    assert getattr(training_data, name) is getattr(training_collator, name), name
for name in training_data.__all__:
    assert getattr(training_dimple, name) is getattr(training_data, name), name
for name in training_collator.__all__:
    assert getattr(training_dimple, name, None) in (None, getattr(training_collator, name)), name
try:
    training_data.no_such_name
except AttributeError as error:
    assert "no_such_name" in str(error)
else:
    raise SystemExit("an unknown name must raise AttributeError")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
