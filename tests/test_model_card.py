"""The model cards written for pushable folders: Hub metadata, facts tables, and a usage snippet that runs."""

import re
import shutil

import pytest
from huggingface_hub import ModelCard

from conftest import REPO_ROOT
from model_card import write_model_card

SHIPPED = REPO_ROOT / "checkpoints" / "dimple-shapes"


@pytest.mark.parametrize(
    "kind, library", [("released", "transformers"), ("shapes", "transformers"), ("finetuned", "transformers"),
                      ("adapter", "peft")]
)
def test_card_metadata_lets_the_hub_show_licence_widget_and_library(tmp_path, kind, library):
    write_model_card(tmp_path, kind=kind, base_model="rp-yu/Dimple-7B")
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.license == "apache-2.0"
    assert data.library_name == library
    assert data.pipeline_tag == "image-text-to-text"
    assert data.base_model == "rp-yu/Dimple-7B"
    assert "dimple" in data.tags


def test_training_and_evaluation_facts_become_tables(tmp_path):
    write_model_card(tmp_path, kind="finetuned", training={"stage": "diffusion", "samples": 200},
                     evaluation={"exact match (100 held-out questions)": "92.0 %"})
    text = (tmp_path / "README.md").read_text()
    assert "| stage | diffusion |" in text
    assert "| samples | 200 |" in text
    assert "| exact match (100 held-out questions) | 92.0 % |" in text


def test_a_card_without_facts_has_no_empty_tables(tmp_path):
    write_model_card(tmp_path, kind="shapes")
    text = (tmp_path / "README.md").read_text()
    assert "## Training" not in text and "## Evaluation" not in text
    assert ModelCard.load(tmp_path / "README.md").data.base_model is None


def test_unknown_kind_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"kind='merged'.*'adapter', 'finetuned', 'released', 'shapes'"):
        write_model_card(".", kind="merged")


def card_snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def run_snippet(snippet: str) -> list:
    printed = []
    exec(compile(snippet, "card snippet", "exec"), {"print": lambda *args: printed.extend(args)})
    return printed


def test_the_cards_usage_snippet_runs_on_the_shipped_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "dimple-shapes"
    shutil.copytree(SHIPPED, folder)
    write_model_card(folder, kind="shapes")
    monkeypatch.chdir(tmp_path)  # the snippet loads the folder by its name and draws its own picture
    assert run_snippet(card_snippet((folder / "README.md").read_text())) == [
        "There is one shape: a red circle in the middle."
    ]


def test_the_shipped_cards_snippet_runs_as_copied_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    snippet = card_snippet((SHIPPED / "README.md").read_text())
    assert 'from_pretrained("checkpoints/dimple-shapes"' in snippet
    assert run_snippet(snippet) == ["There is one shape: a red circle in the middle."]
