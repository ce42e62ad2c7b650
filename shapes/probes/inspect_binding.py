"""Look inside a trained shapes Dimple: what the vision tokens carry and where the answer looks on binding questions.

    python shapes/probes/inspect_binding.py                      # the shipped checkpoint
    python shapes/probes/inspect_binding.py --model RUN_FOLDER

One bidirectional forward pass per batch of validation questions, prompt plus 32 `<|mask|>` answer slots (as in
decoding), prints:

* the residual-stream norm per decoder layer at vision, text and answer positions, and how much each layer adds;
* how well a linear classifier (fit on 80 % of the shapes, scored on the rest) reads a shape's kind, colour and
  column from its vision token, normalised as each layer's RMSNorm sees it;
* how well one reads the named kind ("What color is the circle?") or colour ("What shape is the red object?") from
  the first answer slot: the query side of a lookup;
* per layer, the attention that the first answer slot pays to the named shape's token and, on average, to each other
  shape's token, on binding questions (`task.needs_binding`), for the head that favours the named shape most.
"""

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from shapes.evaluate import DEFAULT_MODEL  # noqa: E402
from shapes.task import COLORS, SHAPES, messages, needs_binding, render, validation_examples  # noqa: E402
from transformers import AutoModel, AutoProcessor  # noqa: E402

ANSWER_SLOTS = 32


def token_of(shape) -> int:
    """Index among the 9 vision tokens of the 28-px grid cell holding the shape."""
    return 3 * (shape.cy // 28) + shape.column


@torch.no_grad()
def forward(model, processor, examples):
    prompts = [processor.apply_chat_template(messages(e), add_generation_prompt=True) for e in examples]
    inputs = processor(text=prompts, images=[render(e.scene) for e in examples], padding="longest", return_tensors="pt")
    batch, prompt = inputs["input_ids"].shape
    masks = torch.full((batch, ANSWER_SLOTS), processor.mask_token_id)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], masks], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(masks)], 1)
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    vision = inputs["input_ids"] == model.config.image_token_id
    # hidden_states[l] is the input of layer l (the last entry is after the final norm, so it is left out)
    return inputs, prompt, vision, out.hidden_states[:-1], out.attentions


def rms_normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


def linear_accuracy(features: torch.Tensor, labels: list[int]) -> float:
    """Held-out accuracy of an L2-regularised multinomial logistic regression (LBFGS) on 80 % of the rows."""
    labels = torch.tensor(labels)
    split = int(0.8 * len(labels))
    weight = torch.zeros(features.shape[1], int(labels.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure():
        optimizer.zero_grad()
        logits = features[:split] @ weight + bias
        loss = torch.nn.functional.cross_entropy(logits, labels[:split]) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return ((features[split:] @ weight + bias).argmax(-1) == labels[split:]).float().mean().item()


def report_norms(model, processor, examples):
    inputs, prompt, vision, hidden, _ = forward(model, processor, examples[:200])
    answer = torch.zeros_like(vision)
    answer[:, prompt:] = True
    text = inputs["attention_mask"].bool() & ~vision & ~answer
    print("residual norm at each layer's input (+ what the layer before added): vision | text | answer slots")
    for layer, states in enumerate(hidden):
        norm = states.norm(dim=-1)
        added = (states - hidden[layer - 1]).norm(dim=-1) if layer else torch.zeros_like(norm)
        parts = [f"{norm[where].mean():.1f} (+{added[where].mean():.1f})" for where in (vision, text, answer)]
        print(f"  layer {layer}: " + " | ".join(parts))


def report_vision_readout(model, processor, examples):
    features, kinds, colors, columns = [], [], [], []
    for start in range(0, 600, 200):
        subset = examples[start:start + 200]
        _, _, vision, hidden, _ = forward(model, processor, subset)
        for row, example in enumerate(subset):
            for shape in example.scene.shapes:
                features.append(torch.stack([states[row][vision[row]][token_of(shape)] for states in hidden]))
                kinds.append(SHAPES.index(shape.kind))
                colors.append(list(COLORS).index(shape.color))
                columns.append(shape.column)
    features = rms_normalised(torch.stack(features))
    print(f"a shape's own vision token, linear read-out accuracy ({len(kinds)} shapes) per layer input: "
          "kind | colour | column")
    for layer in range(features.shape[1]):
        scores = [linear_accuracy(features[:, layer], labels) for labels in (kinds, colors, columns)]
        print(f"  layer {layer}: " + " | ".join(f"{score:.1%}" for score in scores))


def report_named_readout(model, processor, examples):
    for kind, attribute, values in (("color", "kind", SHAPES), ("shape", "color", list(COLORS))):
        named = [e for e in examples if e.kind == kind and e.named is not None][:400]
        _, prompt, _, hidden, _ = forward(model, processor, named)
        labels = [values.index(getattr(e.named, attribute)) for e in named]
        scores = [linear_accuracy(rms_normalised(states[:, prompt]), labels) for states in hidden]
        print(f"named {attribute} of {len(named)} '{kind}' questions read from the first answer slot, per layer input: "
              + " | ".join(f"{score:.1%}" for score in scores))


def report_attention(model, processor, examples):
    binding = [e for e in examples if needs_binding(e)][:200]
    _, prompt, vision, _, attentions = forward(model, processor, binding)
    print(f"first answer slot's attention on {len(binding)} binding questions, head favouring the named shape most:")
    for layer, attention in enumerate(attentions):
        on_named, on_other = torch.zeros(attention.shape[1]), torch.zeros(attention.shape[1])
        for row, example in enumerate(binding):
            keys = vision[row].nonzero().flatten()
            others = [token_of(s) for s in example.scene.shapes if s != example.named]
            on_named += attention[row, :, prompt, keys[token_of(example.named)]]
            on_other += attention[row, :, prompt][:, keys[others]].mean(-1)
        head = int((on_named - on_other).argmax())
        print(f"  layer {layer}, head {head}: named shape {on_named[head] / len(binding):.2f}, "
              f"each other shape {on_other[head] / len(binding):.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--questions", type=int, default=6000, help="Validation questions to draw from.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    examples = validation_examples(args.questions)
    for report in (report_norms, report_vision_readout, report_named_readout, report_attention):
        report(model, processor, examples)


if __name__ == "__main__":
    main()
