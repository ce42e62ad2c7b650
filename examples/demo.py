"""Ask Dimple about an image and watch the answer being denoised.

    python examples/demo.py                                  # the small shapes Dimple shipped in this repository (CPU)
    python examples/demo.py --model rp-yu/Dimple-7B --image photo.jpg --question "Describe this image."

Prints each answer, the number of forward passes it took and the canvas after every step (masked slots shown as
`_`), asks one question with a structure prior (fixed tokens among the masks), and saves the image and a picture of
the denoising progression under `outputs/`.

Settings: a checkpoint whose `generation_config.json` selects diffusion decoding (`"decoding": "diffusion"`; the
shipped shapes model: greedy confident decoding, threshold 0.9, prefill cache, N = steps = 32) is run with them;
other checkpoints, such as the
released Dimple-7B, get the released chat settings (N = steps = 64, temperature 0.2, top-p 0.95, top-k 50,
alg "origin", threshold 0.95, prefill cache). On a GPU the model runs in bfloat16.
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from generation_utils import RELEASED_CHAT_SETTINGS, DiffusionTextStreamer  # noqa: E402
from modeling_dimple import DimpleForConditionalGeneration  # noqa: E402
from processing_dimple import DimpleProcessor  # noqa: E402
from shapes.task import ATTRIBUTES_TEMPLATE, random_scene, render  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "checkpoints" / "dimple-shapes"
SHAPES_QUESTIONS = ["Describe the image.", "What color is the shape on the left?", "How many shapes are there?"]
SHAPES_TEMPLATE = ("What are the color and shape of the object on the left?", ATTRIBUTES_TEMPLATE)
GENERIC_QUESTIONS = ["Describe this image."]
GENERIC_TEMPLATE = ("What is the main object in the image, and what color is it? Answer in JSON.",
                    '{"object": "<|mask|>*4", "color": "<|mask|>*3"}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="Checkpoint folder or Hub id.")
    parser.add_argument("--image", type=Path, help="Image file (default: a generated shapes scene).")
    parser.add_argument("--question", action="append", help="Question to ask (repeatable).")
    parser.add_argument("--template", help="Structure prior for the last question, e.g. 'Color:<|mask|> Shape:<|mask|>'.")
    parser.add_argument("--seed", type=int, default=7, help="Seed of the generated scene.")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "outputs" / "demo_progress.png")
    return parser.parse_args(argv)


def load(model_id):
    """The repository's own classes (they also load the released 7B checkpoint); bf16 on a GPU, fp32 on CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = DimpleForConditionalGeneration.from_pretrained(model_id, dtype=dtype).to(device).eval()
    # trust_remote_code only lets the tokenizer lookup read the checkpoint's config.json; the code is this repo's.
    processor = DimpleProcessor.from_pretrained(model_id, trust_remote_code=True)
    return model, processor


def decoding_options(model) -> dict:
    """The checkpoint's own settings when they select diffusion decoding, else the released chat settings."""
    if model.generation_config.decoding == "diffusion":  # a DimpleGenerationConfig: the model declares its class
        return {}
    return dict(RELEASED_CHAT_SETTINGS)


def answer(model, processor, image, question, options, template=None, note=None) -> dict:
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt").to(model.device)
    extra = dict(options)
    if template:
        extra.update(response_template=processor.encode_response_template(template), max_new_tokens=None)
    start = time.perf_counter()
    # `generate` decodes by diffusion: the options (or the checkpoint's generation config) say `decoding="diffusion"`.
    output = model.generate(**inputs, **extra, output_history=True, return_dict_in_generate=True)
    seconds = time.perf_counter() - start
    prompt_length = inputs["input_ids"].shape[1]
    canvas = DiffusionTextStreamer(processor.tokenizer, mask_token_id=processor.mask_token_id)
    return {
        "question": question,
        "template": template,
        "note": note,
        "answer": processor.post_process_answer(output.sequences[0, prompt_length:]),
        "passes": int(output.num_forward_passes[0]),
        "committed": output.tokens_per_step[0].tolist(),
        "steps": [canvas.render(step[0, prompt_length:].tolist()) for step in output.history],
        "start": canvas.render(
            processor.encode_response_template(template) if template
            else [processor.mask_token_id] * (output.sequences.shape[1] - prompt_length)
        ),
        "seconds": seconds,
    }


def passes(result) -> str:
    count = result["passes"]
    return f"{count} forward pass" + ("" if count == 1 else "es")


def print_result(result):
    print(f"\nQ: {result['question']}" + (f"   [{result['note']}]" if result["note"] else ""))
    if result["template"]:
        print(f"   structure prior: {result['template']}")
    print(f"   start   {result['start']}")
    for step, (text, count) in enumerate(zip(result["steps"], result["committed"]), 1):
        print(f"   step {step:2d} (+{count:2d} tokens) {text}")
    print(f"A: {result['answer']}")
    print(f"   {passes(result)} ({result['seconds']:.2f} s)")


def figure_font(size: int):
    """A monospace font when the system has one (so the slots line up), else Pillow's built-in font."""
    try:
        return ImageFont.truetype("DejaVuSansMono.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def figure_lines(results: list[dict]) -> list[tuple[str, tuple]]:
    """(text, colour) rows: per question its title, the starting canvas, the canvas after each step, the pass count."""
    lines = []
    for result in results:
        title = f"Q: {result['question']}" + (f"   [{result['note']}]" if result["note"] else "")
        title += f"   [structure prior {result['template']}]" if result["template"] else ""
        lines.append((title, (0, 0, 0)))
        lines.append((f"start          {result['start']}", (120, 120, 120)))
        for step, (text, count) in enumerate(zip(result["steps"], result["committed"]), 1):
            lines.append((f"step {step:2d} (+{count:2d})  {text}", (20, 60, 160)))
        lines.append((f"A: {result['answer']}   ({passes(result)})", (0, 120, 0)))
        lines.append(("", (0, 0, 0)))
    return lines


def progress_figure(image: Image.Image, results: list[dict]) -> Image.Image:
    """The image, then per question the canvas after each step (drawn with PIL, no plotting library needed)."""
    font = figure_font(13)
    line_height = 17
    lines = figure_lines(results)
    thumbnail = image.copy()
    thumbnail.thumbnail((168, 168))
    width = int(max(font.getlength(text) for text, _ in lines)) + 20
    height = thumbnail.height + 20 + len(lines) * line_height
    figure = Image.new("RGB", (max(width, thumbnail.width + 20), height), "white")
    figure.paste(thumbnail, (10, 10))
    draw = ImageDraw.Draw(figure)
    for row, (text, colour) in enumerate(lines):
        draw.text((10, thumbnail.height + 20 + row * line_height), text, fill=colour, font=font)
    return figure


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    model, processor = load(args.model)
    shapes_model = Path(args.model).resolve() == DEFAULT_MODEL.resolve()
    options = decoding_options(model)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        image = render(random_scene(random.Random(args.seed)))
        image_path = args.output.parent / "demo_image.png"
        image.save(image_path)
        print(f"image: {image_path}")

    questions = args.question or (SHAPES_QUESTIONS if shapes_model else GENERIC_QUESTIONS)
    results = [answer(model, processor, image, q, options) for q in questions]
    if shapes_model and not args.question:
        # The trained model is confident enough to fill a whole description in one or two passes; a fixed schedule
        # of 8 steps (4 slots each, the most confident first) shows the canvas filling in.
        fixed = dict(options, steps=8, alg_p_threshold=None)
        results.insert(1, answer(model, processor, image, questions[0], fixed, note="8 fixed steps, no threshold"))
    if args.template:
        results[-1] = answer(model, processor, image, questions[-1], options, args.template)
    elif not args.question:
        question, template = SHAPES_TEMPLATE if shapes_model else GENERIC_TEMPLATE
        results.append(answer(model, processor, image, question, options, template))
    for result in results:
        print_result(result)

    progress_figure(image, results).save(args.output)
    print(f"\ndenoising progression saved to {args.output}")


if __name__ == "__main__":
    main()
