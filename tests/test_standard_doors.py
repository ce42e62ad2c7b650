"""transformers' standard entry points on the shipped checkpoint: Auto classes, pipeline, `generate` decoding by
diffusion, transformers' streamers, end tokens, model cards."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationMixin,
    TextDiffusionStreamer,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)

from conftest import REPO_ROOT, make_tiny_model
from configuration_dimple import AUTO_MAP, DimpleConfig
from shapes.task import heldout_examples, messages, render
from test_compat import write_released_checkpoint
from tools.assemble_checkpoint import assemble

SHIPPED = REPO_ROOT / "checkpoints" / "dimple-shapes"
QUESTIONS = 20


@pytest.fixture(scope="module")
def pipe():
    return pipeline("image-text-to-text", model=str(SHIPPED), trust_remote_code=True, dtype=torch.float32)


@pytest.fixture(scope="module")
def examples():
    return heldout_examples(QUESTIONS)


def chat(example):
    """The held-out question as a pipeline chat: the image inline, then the question."""
    turn = messages(example)[0]
    content = [{"type": "image", "image": render(example.scene)} if part["type"] == "image" else part
               for part in turn["content"]]
    return [{"role": "user", "content": content}]


def inputs_of(pipe, example):
    prompt = pipe.processor.apply_chat_template(messages(example), add_generation_prompt=True)
    return pipe.processor(text=[prompt], images=[render(example.scene)], return_tensors="pt")


def direct_answer(pipe, example, **settings):
    """`diffusion_generate` with the checkpoint's settings, cleaned by `post_process_answer`."""
    inputs = inputs_of(pipe, example)
    out = pipe.model.diffusion_generate(**inputs, **settings)
    return pipe.processor.post_process_answer(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_every_written_config_names_the_image_text_to_text_auto_class(tmp_path):
    for folder in (REPO_ROOT, SHIPPED):
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForImageTextToText"] == "modeling_dimple.DimpleForConditionalGeneration"
    released_style = DimpleConfig.from_dict({"auto_map": {"AutoModel": "modeling_dimple.DimpleModel"}})
    assert released_style.auto_map["AutoModel"] == AUTO_MAP["AutoModel"]
    make_tiny_model().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert {name: saved[name] for name in AUTO_MAP} == AUTO_MAP


def test_auto_image_text_to_text_loads_the_shipped_checkpoint():
    model = AutoModelForImageTextToText.from_pretrained(SHIPPED, trust_remote_code=True)
    assert type(model).__name__ == "DimpleForConditionalGeneration"
    # generation_config.json loads as the class the model declares, its diffusion settings validated
    assert type(model.generation_config) is type(model).generation_config_class
    assert type(model.generation_config).__name__ == "DimpleGenerationConfig"
    assert model.generation_config.decoding == "diffusion"
    with pytest.raises(ValueError, match="alg"):
        model.generation_config.update(alg="greedy")


def test_a_model_built_from_its_config_keeps_transformers_generation_defaults():
    model = make_tiny_model()
    settings = model.generation_config
    assert type(settings).__name__ == "DimpleGenerationConfig" and settings.decoding is None  # unset:
    assert model.selected_decoding() == "autoregressive"  # ... which `generate` reads as autoregressive
    assert all(getattr(settings, name) is None for name in ("temperature", "use_cache", "max_length", "top_k"))


def test_shipped_generation_config_ends_answers_at_both_end_tokens():
    processor = AutoProcessor.from_pretrained(SHIPPED, trust_remote_code=True)
    settings = json.loads((SHIPPED / "generation_config.json").read_text())
    ends = processor.tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert sorted(settings["eos_token_id"]) == sorted(ends)


def test_pipeline_answers_what_diffusion_generate_answers(pipe, examples):
    answers = pipe(text=[chat(example) for example in examples], return_full_text=False, batch_size=1)
    expected = [direct_answer(pipe, example) for example in examples]
    assert [answer[0]["generated_text"] for answer in answers] == expected
    # The model is trained: most answers are right, so the equality above compares real answers.
    assert sum(text == example.answer for text, example in zip(expected, examples)) >= QUESTIONS // 2


def test_generate_kwargs_reach_the_diffusion_settings(pipe, examples):
    settings = dict(alg="entropy", alg_p_threshold=None, steps=8, max_new_tokens=16)
    for example in examples[:3]:
        answer = pipe(text=chat(example), return_full_text=False, generate_kwargs=settings)[0]["generated_text"]
        assert answer == direct_answer(pipe, example, **settings)


def test_pipeline_through_text_iterator_streamer(pipe, examples):
    for example in examples:
        streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(text=chat(example), return_full_text=False, generate_kwargs={"streamer": streamer})
        worker = threading.Thread(target=pipe, kwargs=kwargs)
        worker.start()
        streamed = "".join(streamer)
        worker.join()
        assert streamed == direct_answer(pipe, example)


def test_text_streamer_prints_the_final_answer_once(pipe, examples, capsys):
    example = examples[0]
    inputs = inputs_of(pipe, example)
    streamer = TextStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    pipe.model.generate(**inputs, streamer=streamer)
    assert capsys.readouterr().out == direct_answer(pipe, example) + "\n"


def test_text_diffusion_streamer_shows_drafts_then_the_final_text(pipe, examples, capsys):
    example = max(examples, key=lambda example: len(example.answer))  # a description
    settings = dict(alg_p_threshold=None, steps=8)  # the fallback schedule: 8 steps, 4 slots each
    inputs = inputs_of(pipe, example)
    streamer = TextDiffusionStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = pipe.model.generate(**inputs, **settings, streamer=streamer, return_dict_in_generate=True)
    printed = capsys.readouterr().out
    drafts = printed.count("\0337")  # each draft saves the cursor, to be overwritten by the next
    assert drafts == len(out.tokens_per_step[0]) == 8
    final = printed.rsplit("\0338\033[J", 1)[1]  # what is left once the last draft is cleared
    assert final == direct_answer(pipe, example, **settings) + "\n"


def test_one_keyword_switches_generate_to_autoregressive(pipe, examples):
    inputs = inputs_of(pipe, examples[0])
    diffusion = pipe.model.generate(**inputs)
    assert torch.equal(diffusion, pipe.model.diffusion_generate(**inputs))
    autoregressive = pipe.model.generate(**inputs, decoding="autoregressive", max_new_tokens=32)
    loop = GenerationMixin.generate(pipe.model, **inputs, max_new_tokens=32)  # transformers' own loop
    assert torch.equal(autoregressive, loop)
    with pytest.raises(ValueError, match="`decoding` must be one of"):
        pipe.model.generate(**inputs, decoding="beam")


def test_autoregressive_generate_stops_at_either_end_token(pipe, examples):
    inputs = inputs_of(pipe, examples[0])
    out = pipe.model.generate(**inputs, decoding="autoregressive", max_new_tokens=32)
    answer = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(answer) < 32 and answer[-1] in pipe.model.generation_config.eos_token_id


def test_shipped_and_assembled_cards_carry_hub_metadata(tmp_path):
    assembled = assemble(write_released_checkpoint(tmp_path / "released", make_tiny_model()), tmp_path / "out")
    for folder in (SHIPPED, assembled):
        data = ModelCard.load(folder / "README.md").data
        assert (data.license, data.library_name, data.pipeline_tag) == (
            "apache-2.0", "transformers", "image-text-to-text"
        )
        assert "dimple" in data.tags
    assert (assembled / "LICENSE").read_text() == (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in (REPO_ROOT / "LICENSE").read_text()
    settings = json.loads((assembled / "generation_config.json").read_text())
    assert settings["decoding"] == "diffusion" and len(settings["eos_token_id"]) == 2


def test_two_process_tensor_parallel_answers_like_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = str(REPO_ROOT / "tests" / "tp_answers.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    for name, command in (("two", torchrun), ("one", [sys.executable])):
        run = subprocess.run([*command, script, str(tmp_path / f"{name}.json"), "12"], env=env, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
    two, one = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("two", "one"))
    assert (two["world_size"], two["sharded"]) == (2, True)  # the weights really were split across the processes
    assert (one["world_size"], one["sharded"]) == (1, False)
    assert two["answers"] == one["answers"] and len(one["answers"]) == 12
