"""Prompt, image and scoring functions of the `shapes_vqa` lmms-eval task (see shapes_vqa.yaml)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    """Exact match of the decoded answer, as `shapes/evaluate.py` scores it; binding questions also on their own."""
    correct = float(results[0].strip() == doc["answer"])
    return {"exact_match": correct, "binding_exact_match": correct if doc["binding"] else None}


def mean_of_present(values):
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else float("nan")
