"""Synthetic visual question answering: coloured shapes on a shaded background, deterministic from a seed.

Each 84x84 image holds 1-3 non-overlapping shapes (circle, square, triangle in one of six colours), one per
horizontal third (left, middle, right), each centred in a cell of a 3 x 3 grid at a random height. 84 px is a
multiple of 28 (patch 14 x merge 2), so the processor keeps the size and every image becomes exactly 3 x 3 = 9
vision tokens, one per grid cell.

Questions ask for a colour, a shape, a count, a position, a "Color: ... Shape: ..." summary (the format that the
structure-prior template pins) or a description; answers run from 1 to 26 tokens.
"""

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from processing_dimple import DEFAULT_SYSTEM_PROMPT

IMAGE_SIZE = 84
# The background shades from dark grey on the left to near white on the right. The vision tower only knows relative
# (rotary) positions, so on a flat background a vision token cannot tell where it lies (a model trained that way
# never learnt left / middle / right); the shade around a shape tells its column, as surroundings do in a photograph.
BACKGROUND_LEFT, BACKGROUND_RIGHT = 110, 250
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 195, 20),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "middle", "right")
NUMBERS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("color", "shape", "count", "position", "attributes", "description")
# The attributes answer format, and the structure prior that pins it (one slot per attribute word).
ATTRIBUTES_TEMPLATE = "Color:<|mask|> Shape:<|mask|>"


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    color: str
    column: int  # 0 left, 1 middle, 2 right
    size: int  # bounding-box side in pixels
    cx: int  # centre
    cy: int

    @property
    def position(self) -> str:
        return POSITIONS[self.column]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # sorted left to right

    def signature(self) -> tuple:
        """Everything that determines the pixels: equal signatures mean equal images."""
        return tuple((s.kind, s.color, s.column, s.size, s.cx, s.cy) for s in self.shapes)


@dataclass(frozen=True)
class Example:
    scene: Scene
    kind: str  # one of QUESTION_TYPES
    question: str
    answer: str
    named: Shape | None = None  # the shape the question singles out by its kind or colour (not by its place)

    def key(self) -> tuple:
        return self.scene.signature(), self.question


# ------------------------------------------------------------------------------------------------ scenes


def random_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, 3)
    columns = sorted(rng.sample(range(3), count))
    shapes = []
    for column in columns:
        size = rng.randint(18, 24)
        # Centred (within 2 px) in one cell of the 3 x 3 grid of 28-px cells, i.e. inside one vision token: one
        # shape per column, so shapes never overlap.
        cx = column * 28 + 14 + rng.randint(-2, 2)
        cy = rng.randrange(3) * 28 + 14 + rng.randint(-2, 2)
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), column, size, cx, cy))
    return Scene(tuple(shapes))


def render(scene: Scene) -> Image.Image:
    ramp = np.linspace(BACKGROUND_LEFT, BACKGROUND_RIGHT, IMAGE_SIZE).round().astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp[None, :, None], (IMAGE_SIZE, IMAGE_SIZE, 3))))
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        half = shape.size // 2
        box = (shape.cx - half, shape.cy - half, shape.cx + half, shape.cy + half)
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(shape.cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


# --------------------------------------------------------------------------------------------- questions


def location_phrase(position: str) -> str:
    return "in the middle" if position == "middle" else f"on the {position}"


def describe(scene: Scene) -> str:
    parts = [f"a {s.color} {s.kind} {location_phrase(s.position)}" for s in scene.shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    count = len(parts)
    verb, noun = ("is", "shape") if count == 1 else ("are", "shapes")
    return f"There {verb} {NUMBERS[count]} {noun}: {listed}."


def attributes_answer(shape: Shape) -> str:
    return f"Color: {shape.color} Shape: {shape.kind}"


def unique(scene: Scene, attribute: str, value: str) -> bool:
    return sum(getattr(s, attribute) == value for s in scene.shapes) == 1


def ask(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str, Shape | None]:
    """One (question, answer, shape named by kind or colour) of the given type about the scene."""
    shape = rng.choice(scene.shapes)
    where = location_phrase(shape.position)
    if kind == "color":
        if unique(scene, "kind", shape.kind) and rng.random() < 0.5:
            return f"What color is the {shape.kind}?", shape.color, shape
        return f"What color is the shape {where}?", shape.color, None
    if kind == "shape":
        if unique(scene, "color", shape.color) and rng.random() < 0.5:
            return f"What shape is the {shape.color} object?", shape.kind, shape
        return f"What shape is {where}?", shape.kind, None
    if kind == "count":
        if rng.random() < 0.5:
            return "How many shapes are there?", NUMBERS[len(scene.shapes)], None
        target = rng.choice(SHAPES)
        return f"How many {target}s are there?", NUMBERS[sum(s.kind == target for s in scene.shapes)], None
    if kind == "position":
        options = [f"Where is the {shape.kind}?"] if unique(scene, "kind", shape.kind) else []
        if sum((s.color, s.kind) == (shape.color, shape.kind) for s in scene.shapes) == 1:
            options.append(f"Where is the {shape.color} {shape.kind}?")
        return (rng.choice(options) if options else ""), where, shape
    if kind == "attributes":
        return f"What are the color and shape of the object {where}?", attributes_answer(shape), None
    if kind == "description":
        return rng.choice(("Describe the image.", "What is in the picture?")), describe(scene), None
    raise ValueError(f"unknown question type {kind!r}")


def make_example(rng: random.Random, kinds=QUESTION_TYPES) -> Example:
    while True:
        scene = random_scene(rng)
        kind = rng.choice(kinds)
        question, answer, named = ask(scene, kind, rng)
        if question:  # a position question needs a shape that a colour or kind singles out
            return Example(scene, kind, question, answer, named)


def needs_binding(example: Example) -> bool:
    """The question names one of several shapes by kind or colour, and another shape would give another answer.

    These are the questions a model cannot answer without finding the named shape ("What color is the circle?" next
    to a blue square); answering about a random shape of the scene gets 44 % of the validation ones right.
    """
    named = example.named
    if named is None:
        return False
    asked = {"color": "color", "shape": "kind", "position": "column"}[example.kind]
    return any(getattr(other, asked) != getattr(named, asked) for other in example.scene.shapes if other != named)


def make_examples(seed: int, count: int, kinds=QUESTION_TYPES, exclude: frozenset = frozenset()) -> list[Example]:
    """`count` examples from `seed`, skipping any (image, question) pair whose key is in `exclude`."""
    rng = random.Random(seed)
    examples = []
    while len(examples) < count:
        example = make_example(rng, kinds)
        if example.key() not in exclude:
            examples.append(example)
    return examples


# Fixed seeds: the held-out split never shares an (image, question) pair with training or validation (checked by
# key). Validation is for choosing between recipes; held-out is for reporting the chosen one.
TRAIN_SEED = 0
HELDOUT_SEED = 10_000
VALIDATION_SEED = 20_000


def heldout_examples(count: int = 500) -> list[Example]:
    return make_examples(HELDOUT_SEED, count)


def _heldout_keys(count: int) -> frozenset:
    return frozenset(example.key() for example in heldout_examples(count))


def validation_examples(count: int = 500, heldout_count: int = 500) -> list[Example]:
    return make_examples(VALIDATION_SEED, count, exclude=_heldout_keys(heldout_count))


def train_examples(count: int, seed: int = TRAIN_SEED, heldout_count: int = 500) -> list[Example]:
    return make_examples(seed, count, exclude=_heldout_keys(heldout_count))


def messages(example_or_question, with_answer: bool = False) -> list[dict]:
    """Chat messages for one question (the image part first, as in LLaVA data); optionally with the answer."""
    question = getattr(example_or_question, "question", example_or_question)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if with_answer:
        turn.append({"role": "assistant", "content": example_or_question.answer})
    return turn


def corpus() -> list[str]:
    """Every word the task can produce (used to train the tokenizer's merges)."""
    rng = random.Random(12345)
    texts = [DEFAULT_SYSTEM_PROMPT, "system", "user", "assistant", ATTRIBUTES_TEMPLATE.replace("<|mask|>", " ")]
    for _ in range(3000):
        example = make_example(rng)
        texts += [example.question, example.answer]
    return texts
