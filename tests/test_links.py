"""Every notebook links to the previous and the next one, at its top and at its bottom, and every link to a notebook
resolves. The order is the sorted order of solutions/ (00, 01, ...); the handouts in notebooks/ carry the same names,
so the same links work there."""

from __future__ import annotations

import re

import pytest

from gpt2lab import course

SOLUTIONS = course.solution_notebooks()
NAMES = [p.name for p in SOLUTIONS]
LINK = re.compile(r"\[[^\]]+\]\(([^)\s]+\.ipynb)(?:#[^)]*)?\)")  # [text](target.ipynb) or (target.ipynb#section)


def _links(source: str) -> list[str]:
    return LINK.findall(source)


def test_course_has_several_notebooks():
    assert len(NAMES) >= 2 and NAMES[0].startswith("00_"), NAMES


@pytest.mark.parametrize("index", range(len(SOLUTIONS)), ids=[p.stem for p in SOLUTIONS])
def test_notebook_links_previous_and_next(index):
    path = SOLUTIONS[index]
    nb = course.read_notebook(path)
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    assert nb.cells[0].cell_type == "markdown" and nb.cells[-1].cell_type == "markdown", f"{path.name}"
    for cell in markdown:  # any link to a notebook, anywhere, resolves
        for target in _links(cell.source):
            assert (path.parent / target).is_file(), f"{path.name} links to {target}, which does not exist"
    expected = {NAMES[index - 1]} if index else set()
    expected |= {NAMES[index + 1]} if index + 1 < len(NAMES) else set()
    for where, cell in (("first", nb.cells[0]), ("last", nb.cells[-1])):
        found = set(_links(cell.source))  # it may link to other notebooks too; these two must be there
        missing = sorted(expected - found)
        assert not missing, f"{path.name}: its {where} cell does not link to {', '.join(missing)}"


def test_link_pattern():
    text = "Previous: [04 · finetune](04_finetune.ipynb) · next: [06 · smart](06_smart.ipynb#1-intro), [x](y.py)"
    assert _links(text) == ["04_finetune.ipynb", "06_smart.ipynb"]
