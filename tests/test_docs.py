"""The documentation cannot drift from the code: the site builds strictly, every code block runs.

* ``mkdocs build --strict`` (``mkdocs.yml``): every page in the nav, no broken link or anchor,
  the API reference generated from the docstrings without a warning.
* Every fenced block tagged ``python`` in ``docs/*.md`` and ``README.md`` runs, in page order,
  in one namespace per page, in a fresh working folder (files a block writes stay there).
  A page gives its blocks the context a reader would have (a trained model, calibration
  batches) in *hidden setup* comments, which run where they stand and never show on the site::

      <!-- setup
      model = ...
      -->

  A block that cannot run anywhere in CI (it needs a GPU, or is a pattern with placeholders)
  says so in its info string, ```` ```python title="illustration" ````, and is listed in
  ``NOT_RUN`` below, so that a new one is a deliberate change. Signatures are ``text`` blocks.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest

# the examples' models are tiny: one thread is faster and steadier on a shared machine
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

#: the info string that marks a python block as not run (and why it may be)
ILLUSTRATION = 'title="illustration"'

#: python blocks not run, per page: each needs hardware CI does not have or is a placeholder
NOT_RUN: Dict[str, int] = {}

#: pages whose blocks train a model, load MiniLM or export ONNX models: 4-10 s each on 2 cores
SLOW_PAGES = {"analysis.md", "export.md", "getting_started.md", "prepare.md", "qat_modules.md"}

# a fence opening: ``` or more, then the info string; the block ends at a fence as long
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,})(?P<info>[^`\n]*)$")
_SETUP = re.compile(r"^<!-- setup\s*$")


@dataclass
class Snippet:
    """One piece of code of a page: a python block or a hidden setup comment."""

    line: int          # 1-based line of the first code line in the page
    code: str
    info: str          # the fence's info string ('setup' for a hidden setup)

    @property
    def runs(self) -> bool:
        return self.info == "setup" or (self.info.split()[:1] == ["python"]
                                        and ILLUSTRATION not in self.info)


def snippets(path: Path) -> List[Snippet]:
    """The python blocks and setup comments of a Markdown page, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: List[Snippet] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if _SETUP.match(lines[i]):
            end = lines.index("-->", i)
            found.append(Snippet(i + 2, "\n".join(lines[i + 1:end]), "setup"))
            i = end + 1
        elif opening:
            indent, fence = opening["indent"], opening["fence"]
            end = next(j for j in range(i + 1, len(lines))
                       if lines[j].strip() == fence and lines[j].startswith(indent))
            info = opening["info"].strip()
            if info.split()[:1] == ["python"]:
                body = [ln[len(indent):] for ln in lines[i + 1:end]]
                found.append(Snippet(i + 2, "\n".join(body), info))
            i = end + 1
        else:
            i += 1
    return found


PAGE_PARAMS = [pytest.param(path, id=path.name,
                             marks=[pytest.mark.slow] if path.name in SLOW_PAGES else [])
               for path in PAGES]


@pytest.mark.parametrize("page", PAGE_PARAMS)
def test_code_blocks_run(page: Path, tmp_path, monkeypatch):
    """Each page's python blocks and setup run in order without an error (tracebacks name the
    page and its line)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTSIM_PROGRESS", "0")
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for snippet in snippets(page):
        if not snippet.runs:
            continue
        # pad with blank lines so that a traceback's line number is the page's line
        code = compile("\n" * (snippet.line - 1) + snippet.code, str(page), "exec")
        exec(code, namespace)  # noqa: S102 - the documentation's own examples


def test_not_run_blocks_are_listed():
    """Python blocks left out are marked as illustrations and counted in ``NOT_RUN``."""
    counts = {}
    for page in PAGES:
        n = sum(1 for s in snippets(page) if not s.runs)
        if n:
            counts[page.name] = n
    assert counts == NOT_RUN


def test_snippet_extraction(tmp_path):
    """The extractor sees indented blocks, longer fences, setup comments and illustrations."""
    page = ("text\n<!-- setup\nx = 1\n-->\n```python\ny = x + 1\n```\n"
            "* item\n\n  ```python\n  z = y\n  ```\n"
            "````python title=\"illustration\"\n```\n````\n```text\nnot python\n```\n")
    path = tmp_path / "probe.md"
    path.write_text(page, encoding="utf-8")
    found = snippets(path)
    assert [(s.line, s.code, s.runs) for s in found] == [
        (3, "x = 1", True), (6, "y = x + 1", True), (11, "z = y", True), (14, "```", False)]


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    """The site builds with ``--strict``: nav complete, links and anchors resolve, the API
    reference renders every docstring it names without a warning."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "sim" / "index.html").is_file()


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(text: str) -> List[str]:
    """Targets of Markdown links that point into the repository (no scheme, not an anchor)."""
    return [t.split("#")[0] for t in _LINK.findall(text)
            if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_readme_and_notebook_links_resolve():
    """The links the site build does not see: README.md's and the notebooks' Markdown cells'
    relative links name files that exist."""
    import nbformat

    sources = {ROOT / "README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        sources[path] = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    broken = [f"{path.name}: {target}" for path, text in sources.items()
              for target in _relative_links(text) if not (path.parent / target).exists()]
    assert not broken, broken
