"""Write the `shapes_vqa` lmms-eval task's data: the 500 held-out questions with their rendered images, offline.

    python shapes/lmms_eval_task/write_data.py            # -> shapes/lmms_eval_task/data/heldout.parquet

Rows keep the order of `shapes.task.heldout_examples`, so `--limit n` scores the same questions as
`python shapes/evaluate.py --questions n`.
"""

import argparse
import sys
from pathlib import Path

from datasets import Dataset, Features, Image, Value

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from shapes.task import heldout_examples, needs_binding, render  # noqa: E402

FEATURES = Features({
    "question_id": Value("int64"),
    "image": Image(),
    "question": Value("string"),
    "answer": Value("string"),
    "kind": Value("string"),
    "binding": Value("bool"),
})  # fmt: skip


def heldout_dataset(count: int) -> Dataset:
    examples = heldout_examples(count)
    columns = {
        "question_id": list(range(count)),
        "image": [render(e.scene) for e in examples],
        "question": [e.question for e in examples],
        "answer": [e.answer for e in examples],
        "kind": [e.kind for e in examples],
        "binding": [needs_binding(e) for e in examples],
    }
    return Dataset.from_dict(columns, features=FEATURES)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--output", type=Path, default=HERE / "data" / "heldout.parquet")
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    heldout_dataset(args.questions).to_parquet(args.output)
    print(f"wrote {args.questions} questions to {args.output}")


if __name__ == "__main__":
    main()
