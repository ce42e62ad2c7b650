"""The documentation runs: every ```python block of README.md and docs/*.md, and every relative link and image.

Blocks of one page run in order in one namespace (a page reads top to bottom, so a later block may use an earlier
block's `model`); all pages run in one subprocess (one torch import), each in its own namespace: repository root on `sys.path`, `HF_HUB_OFFLINE=1`, one thread, a
scratch working directory that looks like the repository root (a link to each of its top-level entries, so a snippet
copied into a fresh clone reads the same files, e.g. the sample picture `examples/shapes.png`, and what it writes stays
in the scratch directory).

A block that names the released model runs on the shipped checkpoint with these substitutions (`RELEASED_MODEL`):
"rp-yu/Dimple-7B" and "dimple-7b" -> "checkpoints/dimple-shapes", `.cuda()` -> CPU, `torch.bfloat16` ->
`torch.float32`. A block that cannot run offline is preceded by `<!-- not-runnable: <the reason> -->`; a block that
needs an optional package by `<!-- requires: torchao -->` (it runs where the package is installed, as in CI, and the
page's test reports a skip where it is not, after running the page's other blocks).

Links: relative targets must exist; a `#anchor` must name a heading of the target page (GitHub's slugs).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SHIPPED = "checkpoints/dimple-shapes"
RELEASED_MODEL = [
    ('"rp-yu/Dimple-7B"', f'"{SHIPPED}"'),
    ('"dimple-7b"', f'"{SHIPPED}"'),
    (".cuda()", ""),
    ("torch.bfloat16", "torch.float32"),
]
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUNNABLE = re.compile(r"<!--\s*not-runnable:\s*(.*?)\s*-->")
REQUIRES = re.compile(r"<!--\s*requires:\s*(.*?)\s*-->")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img\s[^>]*src=\"([^\"]+)\"")
SNIPPET_TIMEOUT_S = 600


def fenced_blocks(text: str) -> list[dict]:
    """Each fenced block: language, first code line (1-based), code, and the reason when marked not runnable."""
    blocks, lines, open_block = [], text.splitlines(), None
    for number, line in enumerate(lines, start=1):
        fence = FENCE.match(line)
        if open_block is None and fence:
            previous = next((earlier for earlier in reversed(lines[: number - 1]) if earlier.strip()), "")
            marker = NOT_RUNNABLE.search(previous)
            requires = REQUIRES.search(previous)
            open_block = dict(language=fence.group(1), line=number + 1, code=[],
                              not_runnable=marker.group(1) if marker else None,
                              requires=requires.group(1).replace(" ", "").split(",") if requires else [])
        elif open_block is not None and line.strip() == "```":
            blocks.append(dict(open_block, code="\n".join(open_block["code"])))
            open_block = None
        elif open_block is not None:
            open_block["code"].append(line)
    if open_block is not None:
        raise AssertionError(f"an unclosed ``` fence opens at line {open_block['line'] - 1}")
    return blocks


def runnable_source(code: str) -> str:
    for released, shipped in RELEASED_MODEL:
        code = code.replace(released, shipped)
    return code


def pages_script(pages: dict[Path, list[dict]], report: Path) -> str:
    """One script that runs each page's blocks in order in the page's own namespace and writes each page's traceback
    (or None) to `report`; tracebacks point at the pages' own line numbers."""
    sources = {str(page): ["\n" * (block["line"] - 1) + runnable_source(block["code"]) for block in blocks]
               for page, blocks in pages.items()}
    return textwrap.dedent(f"""\
        import json, traceback
        failures = {{}}
        for page, sources in {sources!r}.items():
            namespace = {{"__name__": "__main__"}}
            try:
                for source in sources:
                    exec(compile(source, page, "exec"), namespace)
                failures[page] = None
            except BaseException:
                failures[page] = traceback.format_exc()
        with open({str(report)!r}, "w") as report:
            json.dump(failures, report)
        """)


def scratch_directory(tmp_path: Path) -> Path:
    """The working directory snippets see: the repository root's entries, linked (nothing planted for the docs)."""
    for entry in REPO_ROOT.iterdir():
        if not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return tmp_path


def run_pages(pages: dict[Path, list[dict]], cwd: Path) -> dict[str, str | None]:
    """All pages in one subprocess (one torch import, not one per page): each page's traceback, or None."""
    report = cwd.parent / f"{cwd.name}-report.json"
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg",
                       PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", pages_script(pages, report)], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=SNIPPET_TIMEOUT_S)
    assert report.exists(), f"the snippet runner itself failed:\n{result.stderr[-4000:]}"
    return json.loads(report.read_text())


def runnable_blocks(page: Path) -> tuple[list[dict], list[str]]:
    """The blocks of a page to run here, and the optional packages whose blocks are left out for want of them."""
    blocks = [block for block in python_blocks(page) if not block["not_runnable"]]
    missing = sorted({name for block in blocks for name in block["requires"] if importlib.util.find_spec(name) is None})
    return [block for block in blocks if not set(block["requires"]) & set(missing)], missing


def python_blocks(page: Path) -> list[dict]:
    return [block for block in fenced_blocks(page.read_text()) if block["language"] == "python"]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, inline markup and punctuation dropped, spaces become hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = strip_fenced_blocks(page.read_text())
    slugs, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.MULTILINE):
        slug = github_slug(heading)
        slugs.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return slugs


def strip_fenced_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```\s*$", "", text, flags=re.MULTILINE | re.DOTALL)


def strip_code(text: str) -> str:
    """Markdown without fenced blocks and inline code, where a `[x](y)` is not a link."""
    return re.sub(r"`[^`\n]*`", "", strip_fenced_blocks(text))


def broken_links(page: Path) -> list[str]:
    problems = []
    for match in LINK.finditer(strip_code(page.read_text())):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            problems.append(f"{target}: {destination} does not exist")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{target}: no heading with the anchor #{anchor} in {destination.name}")
    return problems


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO_ROOT))


PAGES_WITH_CODE = [page for page in PAGES if any(not b["not_runnable"] for b in python_blocks(page))]


@pytest.fixture(scope="module")
def page_failures(tmp_path_factory):
    pages = {page: runnable_blocks(page)[0] for page in PAGES_WITH_CODE}
    return run_pages(pages, scratch_directory(tmp_path_factory.mktemp("snippets")))


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=page_id)
def test_python_blocks_of_the_page_run(page, page_failures):
    failure = page_failures[str(page)]
    assert failure is None, f"a Python block of {page_id(page)} failed:\n{failure[-4000:]}"
    blocks, missing = runnable_blocks(page)
    if missing:
        pytest.skip(f"block(s) of {page_id(page)} not run: they need {', '.join(missing)}")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_blocks_not_run_say_why(page):
    for block in python_blocks(page):
        if block["not_runnable"] is not None:
            assert block["not_runnable"], f"{page_id(page)}:{block['line']}: the not-runnable marker needs a reason"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_and_images_resolve(page):
    assert broken_links(page) == []


def test_the_snippet_runner_reports_a_broken_block_at_its_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        # A page

        ```python
        answer = 41
        ```

        <!-- not-runnable: needs a GPU -->
        ```python
        raise RuntimeError("never run")
        ```

        ```python
        assert answer == 42, "off by one"
        ```
        """))
    (tmp_path / "run").mkdir()
    failure = run_pages({page: runnable_blocks(page)[0]}, tmp_path / "run")[str(page)]
    assert f'File "{page}", line 13' in failure and "off by one" in failure
    assert "never run" not in failure


def test_the_released_model_runs_as_the_shipped_checkpoint_on_cpu():
    code = 'AutoModel.from_pretrained("rp-yu/Dimple-7B", dtype=torch.bfloat16).cuda()'
    assert runnable_source(code) == f'AutoModel.from_pretrained("{SHIPPED}", dtype=torch.float32)'


def test_the_link_check_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Some `code` heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#some-code-heading) [gone](missing.md) ![img](pic.png) "
                    "[bad anchor](other.md#nowhere) [web](https://example.com) `[code](ignored.md)`\n")
    assert broken_links(page) == [
        f"missing.md: {tmp_path / 'missing.md'} does not exist",
        f"pic.png: {tmp_path / 'pic.png'} does not exist",
        "other.md#nowhere: no heading with the anchor #nowhere in other.md",
    ]


def test_markers_before_a_block_are_read():
    blocks = fenced_blocks("<!-- requires: torchao, gradio -->\n```python\npass\n```\n\n"
                           "<!-- not-runnable: needs a GPU -->\n\n```python\npass\n```\n\n```python\npass\n```\n")
    assert [(b["requires"], b["not_runnable"]) for b in blocks] == [
        (["torchao", "gradio"], None), ([], "needs a GPU"), ([], None)
    ]
