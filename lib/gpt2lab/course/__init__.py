"""Course tooling: generate the student notebooks from the solved ones, check them, re-execute the solutions.

    python -m gpt2lab.course build            solutions/*.ipynb -> notebooks/*.ipynb, keeping a student's answers
    python -m gpt2lab.course build --force    the same, also where answers cannot be placed (a backup is kept)
    python -m gpt2lab.course build --check    exit 1 naming every student notebook that is out of date
    (build takes --solutions DIR --notebooks DIR to work on other folders, e.g. temporary copies)
    python -m gpt2lab.course execute [NB...]  run solutions in place (quick mode in `make solutions`)
    python -m gpt2lab.course grade [PATH...]  grade submitted notebooks (`make grade`; see gpt2lab.course.grading)

Used by `make student`, `make test` and `make solutions`. Solution regions are marked the nbgrader way; each
becomes a stub at the same indentation:

    ### BEGIN SOLUTION                 # YOUR CODE HERE
    scores = q @ k.transpose(-2, -1)   ->   raise NotImplementedError()
    ### END SOLUTION

Markdown cells may mark regions too (they become "YOUR ANSWER HERE"). A line that looks like a marker but is not
exactly one (`## BEGIN SOLUTION`, `BEGIN_SOLUTION`, ...) is an error: it would hand the answer out. A cell holding
a stub in the generated notebook is an *exercise cell*.

A student's work is never lost (docs: DESIGN rule "a student's work is sacred"):
- Notebooks are compared semantically: cell types and sources (line endings and trailing spaces normalised),
  never outputs, execution counts, metadata, cell ids or JSON layout, so a notebook opened and saved unchanged in
  JupyterLab is in step. If only exercise cells differ, they hold the student's answers: in step, not stale.
- Each generated notebook records in its metadata (`gpt2lab.handout`) a short hash of every cell and which cells
  are exercises. That tells, later, a cell the student edited from one the handout changed under them.
- `build` leaves a notebook that is in step as it is. An out-of-date one is regenerated with every answer carried
  over (exercise cells matched by their position among the exercises, or, when the number of exercises changed,
  by an identical stub); the answer cells keep their outputs, and so does every cell whose source did not change.
  When an edit cannot be placed (a cell edited outside the exercises, an added cell, an exercise that is gone) it
  refuses, names the cells and writes nothing; `--force` then writes what it can place. Every notebook holding
  the student's work is copied to notebooks/.backup/<name>-<time>.ipynb before it is rewritten.
Cells are numbered from 1 in messages, as a reader counts them.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[3]  # lib/gpt2lab/course/__init__.py
SOLUTIONS = REPO_ROOT / "solutions"
NOTEBOOKS = REPO_ROOT / "notebooks"
BACKUPS = ".backup"  # inside notebooks/
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
# Anything a hand might type for a marker: any number of #, any case, space/underscore/hyphen, trailing text.
MARKER_LIKE = re.compile(r"(?i)\b(BEGIN|END)[\s_-]*SOLUTION\b")
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python"}
# Names JupyterLab gives a student's own notebooks (File > New, Duplicate): theirs, not stale handouts.
STUDENT_OWN = re.compile(r"^(Untitled\d*|.*-Copy\d+)\.ipynb$")


class CourseError(ValueError):
    """A course file cannot be used: the one-line message names the file and what to do."""


class MarkerError(CourseError):
    """A malformed solution marker: the message names the notebook, the cell and the line."""



def _count(n: int, noun: str) -> str:
    """'1 exercise', '3 exercises'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"

def shown(path: Path) -> str:
    """A path as printed: relative to the current folder when inside it (notebooks/x.ipynb), else absolute."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith(os.pardir) else relative


# ------------------------------------------------------------------------------------------ solutions -> handout


def strip_solutions(source: str, where: str, markdown: bool = False) -> str:
    """Replace every BEGIN/END SOLUTION region of one cell's source with a stub at the marker's indentation."""
    out: list[str] = []
    indent: str | None = None
    opened = 0
    for lineno, line in enumerate(source.split("\n"), start=1):
        stripped = line.strip()
        if stripped == BEGIN:
            if indent is not None:
                raise MarkerError(f"{where}, line {lineno}: nested {BEGIN} (close the first region with {END})")
            indent, opened = line[: len(line) - len(line.lstrip())], lineno
            if markdown:
                out.append(f"{indent}YOUR ANSWER HERE")
            else:
                out += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError()"]
        elif stripped == END:
            if indent is None:
                raise MarkerError(f"{where}, line {lineno}: {END} without a matching {BEGIN}")
            indent = None
        elif MARKER_LIKE.search(line):
            raise MarkerError(
                f"{where}, line {lineno}: {stripped!r} looks like a solution marker but is not exactly {BEGIN!r} or "
                f"{END!r} (three #, capitals, alone on its line); fix it, or the answer is handed out"
            )
        elif indent is None:
            out.append(line)
    if indent is not None:
        raise MarkerError(f"{where}, line {opened}: {BEGIN} without a matching {END}")
    return "\n".join(out)


def normalise(source: str) -> str:
    """Cell text as compared: LF line ends, no trailing spaces, no blank lines at either end."""
    return "\n".join(line.rstrip() for line in source.replace("\r\n", "\n").split("\n")).strip("\n")


def cell_hash(cell) -> str:
    """Short hash of what makes two cells the same: type and normalised source (not outputs, ids or metadata)."""
    return hashlib.sha256(f"{cell.cell_type}\n{normalise(cell.source)}".encode()).hexdigest()[:12]


def student_version(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The student notebook for a solved one: regions stubbed, outputs cleared, metadata normalised.

    Its metadata records the handout (`gpt2lab.handout`: cell hashes, exercise cell indices) for later builds.
    """
    nb = copy.deepcopy(nb)
    exercises = []
    for index, cell in enumerate(nb.cells):
        where = f"{name} cell {index + 1}"
        if cell.cell_type in ("code", "markdown"):
            stubbed = strip_solutions(cell.source, where, markdown=cell.cell_type == "markdown")
            if stubbed != cell.source:
                exercises.append(index)
            cell.source = stubbed
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in ("tags", "editable", "deletable")}
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)}
    _record(nb, exercises)
    return stable_ids(nb)


def _record(nb: nbformat.NotebookNode, exercises: list[int]) -> None:
    """Store the handout record (`gpt2lab.handout`: cell hashes, exercise cell indices) in `nb`'s metadata."""
    nb.metadata["gpt2lab"] = {"handout": {"cells": [cell_hash(c) for c in nb.cells], "exercises": exercises}}


def exercise_cells(handout: nbformat.NotebookNode) -> list[int]:
    """Indices of the exercise cells of a generated notebook (from its metadata, or, if absent, its stubs)."""
    recorded = _recorded(handout)
    if recorded:
        return list(recorded["exercises"])
    stubs = ("raise NotImplementedError()", "YOUR ANSWER HERE")
    return [i for i, c in enumerate(handout.cells) if any(s in c.source for s in stubs)]


def stable_ids(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Cell ids from cell positions, so regenerating a notebook never changes bytes for nothing."""
    nb.nbformat, nb.nbformat_minor = 4, 5
    for index, cell in enumerate(nb.cells):
        cell.id = f"cell-{index:03d}"
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    """Stable text for a notebook (sorted keys, one-space indent, trailing newline)."""
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """A notebook file, or CourseError in one line naming the file (and the line and column of broken JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except UnicodeDecodeError as err:
        raise CourseError(f"{shown(path)}: not UTF-8 (byte {err.start}); restore it from git or a backup") from None
    except json.JSONDecodeError as err:
        raise CourseError(
            f"{shown(path)}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "fix it there, or restore it from git"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nbformat warns about missing cell ids in older files
            return nbformat.reads(text, as_version=4)
    except Exception as err:  # nbformat raises several types for JSON that is not a notebook
        first = str(err).strip().split("\n")[0]
        raise CourseError(f"{shown(path)}: valid JSON but not a Jupyter notebook ({first})") from None


def solution_notebooks(solutions: Path = SOLUTIONS) -> list[Path]:
    return sorted(solutions.glob("*.ipynb"))


def handouts(solutions: Path) -> dict[str, nbformat.NotebookNode]:
    """Every student notebook generated in memory (all checked before anything is written)."""
    sources = solution_notebooks(solutions)
    if not sources:
        raise CourseError(f"no solution notebooks in {shown(solutions)}")
    return {p.name: student_version(read_notebook(p), f"{solutions.name}/{p.name}") for p in sources}


# ------------------------------------------------------------------------------------------ comparing


@dataclass
class Report:
    """What check() found or build() did for one student notebook; `ok` False makes the command exit 1."""

    name: str
    state: str
    detail: str = ""
    ok: bool = True

    def __str__(self) -> str:
        return f"{self.name}: {self.state}" + (f" ({self.detail})" if self.detail else "")


def _first_line(cell) -> str:
    line = next((ln.strip() for ln in cell.source.split("\n") if ln.strip()), "")
    return json.dumps(line[:50] + ("..." if len(line) > 50 else ""), ensure_ascii=False)


def _recorded(nb: nbformat.NotebookNode) -> dict | None:
    """The handout record (`_record`) a notebook was generated with, when its metadata still holds it."""
    recorded = nb.metadata.get("gpt2lab", {}).get("handout")
    if isinstance(recorded, dict) and isinstance(recorded.get("cells"), list):
        return recorded
    return None


def read_student(path: Path) -> nbformat.NotebookNode:
    """A student notebook; one still exactly as a generator without `gpt2lab.handout` wrote it gets its record.

    Only our generator writes each source as one string (JupyterLab, nbclient and VS Code write lists of
    lines), so a file equal to its own rendering was never saved by an editor: nothing in it is the student's.
    """
    student = read_notebook(path)
    if _recorded(student) is None and path.read_text(encoding="utf-8") == render(student):
        _record(student, exercise_cells(student))
    return student


def compare(student: nbformat.NotebookNode, handout: nbformat.NotebookNode) -> tuple[str | None, int]:
    """(why the student notebook is out of date, or None; how many exercise cells hold answers)."""
    exercises = set(exercise_cells(handout))
    mine, theirs = [cell_hash(c) for c in student.cells], [cell_hash(c) for c in handout.cells]
    if len(mine) != len(theirs):
        ops = difflib.SequenceMatcher(None, mine, theirs, autojunk=False).get_opcodes()
        first = next(i1 for tag, i1, _, _, _ in ops if tag != "equal")
        return (f"{len(mine)} cells, the handout has {len(theirs)}: cells added or removed, "
                f"the first at cell {first + 1}"), 0
    recorded = _recorded(student)
    old = recorded["cells"] if recorded and len(recorded["cells"]) == len(mine) else None
    answers, problem = 0, None
    for i, (s, h) in enumerate(zip(student.cells, handout.cells)):
        if mine[i] == theirs[i]:
            continue
        where = f"cell {i + 1} ({h.cell_type}, {_first_line(h)})"
        if s.cell_type != h.cell_type:
            problem = problem or f"{where} is a {s.cell_type} cell here"
        elif old and mine[i] == old[i]:  # untouched since it was handed out: the handout changed
            problem = problem or f"{where} differs: solutions/ changed it"
        elif i in exercises:
            answers += 1
            if old and old[i] != theirs[i]:  # answered, but the exercise itself changed since
                problem = problem or f"{where}: solutions/ changed this exercise since you answered it"
        elif old:
            problem = problem or f"{where} is outside the exercises and was edited here; undo the edit"
        else:
            problem = problem or f"{where} differs (edited here, or solutions/ changed it)"
    return problem, answers


def check(solutions: Path = SOLUTIONS, notebooks: Path = NOTEBOOKS) -> list[Report]:
    """Compare every student notebook with what solutions/ generates; nothing is written (`build --check`)."""
    reports, generated = [], handouts(solutions)
    for name, handout in generated.items():
        target = notebooks / name
        if not target.exists():
            reports.append(Report(name, "missing", "run `make student`", ok=False))
            continue
        try:
            problem, answers = compare(read_student(target), handout)
        except CourseError as err:
            reports.append(Report(name, "unreadable", str(err), ok=False))
            continue
        if problem:
            detail = f"{problem}; run `make student` (it keeps your answers, or says why it cannot)"
            reports.append(Report(name, "out of date", detail, ok=False))
        else:
            held = f"holds your answers to {_count(answers, 'exercise')}" if answers else ""
            reports.append(Report(name, "in step", held))
    return reports + _others(notebooks, set(generated))


def _others(notebooks: Path, expected: set[str]) -> list[Report]:
    """Notebooks in notebooks/ with no solution: a student's own (Untitled, -Copy1) is fine; another is stale."""
    reports = []
    for path in sorted(notebooks.glob("*.ipynb")):
        if path.name in expected:
            continue
        if STUDENT_OWN.match(path.name):
            reports.append(Report(path.name, "yours", "not a handout; left alone"))
        else:
            reports.append(Report(path.name, "no solution notebook", "delete it if it is no longer handed out", False))
    return reports


# ------------------------------------------------------------------------------------------ carrying answers over


def carry_over(student: nbformat.NotebookNode, handout: nbformat.NotebookNode):
    """The new handout with the student's answers in it: (notebook, edits that cannot be placed, answers carried).

    The student's own edits are the cells that differ from the handout they were given (recorded in their
    metadata; without it, from the new handout, which is the safe guess: then every difference outside the
    exercises counts as theirs). An edited exercise cell goes to the same exercise of the new handout: the k-th
    exercise to the k-th when the number of exercises is unchanged, else the one with the identical stub.
    """
    mine = [cell_hash(c) for c in student.cells]
    new = [cell_hash(c) for c in handout.cells]
    new_ex = exercise_cells(handout)
    recorded = _recorded(student)
    old, old_ex = (recorded["cells"], list(recorded["exercises"])) if recorded else (new, new_ex)

    edits: list[tuple[int, int | None]] = []  # (student cell, the old handout cell it replaced, or None if added)
    matcher = difflib.SequenceMatcher(None, mine, old, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "replace" and i2 - i1 == j2 - j1:
            edits += [(i, j1 + i - i1) for i in range(i1, i2)]
        elif tag in ("replace", "delete"):
            edits += [(i, None) for i in range(i1, i2)]
        # "insert": the student deleted handout cells; nothing of theirs to keep

    result = copy.deepcopy(handout)
    unplaced, carried, taken = [], 0, set()
    for i, j in edits:
        cell = student.cells[i]
        where = f"cell {i + 1} ({_first_line(cell)})"
        if j is None:
            unplaced.append(f"{where} was added")
            continue
        if j not in old_ex:
            unplaced.append(f"{where} is outside the exercises and was edited")
            continue
        k = old_ex.index(j)
        if len(old_ex) == len(new_ex):
            target = new_ex[k]
        else:
            same_stub = [n for n in new_ex if new[n] == old[j]]
            target = same_stub[0] if len(same_stub) == 1 else None
        if target is None or target in taken or handout.cells[target].cell_type != cell.cell_type:
            unplaced.append(f"{where} answers exercise {k + 1}, which the new handout changed")
            continue
        taken.add(target)
        _take(result.cells[target], cell)
        carried += 1

    # every other cell whose source the student still has unchanged keeps its outputs
    matcher = difflib.SequenceMatcher(None, mine, new, autojunk=False)
    for i1, j1, size in matcher.get_matching_blocks():
        for d in range(size):
            if j1 + d not in taken:
                _take(result.cells[j1 + d], student.cells[i1 + d])
    for key in ("kernelspec", "language_info"):  # the kernel the student chose
        if key in student.metadata:
            result.metadata[key] = copy.deepcopy(student.metadata[key])
    return result, unplaced, carried


def _take(target, cell) -> None:
    """Copy a student's cell (source, outputs, execution count) into the new handout's cell."""
    target.source = cell.source
    if target.cell_type == "code":
        target.outputs = copy.deepcopy(cell.get("outputs", []))
        target.execution_count = cell.get("execution_count")


def _has_outputs(student: nbformat.NotebookNode) -> bool:
    return any(c.get("outputs") or c.get("execution_count") for c in student.cells if c.cell_type == "code")


def backup(path: Path) -> Path:
    """Copy a student notebook to notebooks/.backup/<name>-<time>.ipynb (never overwriting an older backup)."""
    folder = path.parent / BACKUPS
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = folder / f"{path.stem}-{stamp}.ipynb", 1
    while target.exists():
        target, n = folder / f"{path.stem}-{stamp}-{n}.ipynb", n + 1
    target.write_bytes(path.read_bytes())
    return target


def _write(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so an interrupted build never leaves half a notebook."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def build(force: bool = False, solutions: Path = SOLUTIONS, notebooks: Path = NOTEBOOKS) -> list[Report]:
    """Regenerate notebooks/ from solutions/ without losing a student's work (`make student`); one Report each."""
    reports, generated = [], handouts(solutions)
    for name, handout in generated.items():
        target, text = notebooks / name, render(handout)
        if not target.exists():
            _write(target, text)
            reports.append(Report(name, "created"))
            continue
        if target.read_text(encoding="utf-8", errors="replace") == text:
            reports.append(Report(name, "unchanged"))
            continue
        try:
            student = read_student(target)
        except CourseError as err:
            if not force:
                reports.append(Report(name, "refused", f"{err}; it may hold your work: fix it, or use --force", False))
                continue
            saved = backup(target)
            _write(target, text)
            reports.append(Report(name, "regenerated", f"the unreadable file was kept as {shown(saved)}"))
            continue
        problem, answers = compare(student, handout)
        if problem is None and (answers or _has_outputs(student)):
            detail = f"your answers to {_count(answers, 'exercise')}" if answers else "your outputs"
            reports.append(Report(name, "in step, left as you saved it", detail))
            continue
        if problem is None:  # same cells, nothing run or typed: only the file's layout or metadata differ
            _write(target, text)
            reports.append(Report(name, "refreshed", "layout and metadata only"))
            continue
        merged, unplaced, carried = carry_over(student, handout)
        if unplaced and not force:
            reports.append(Report(name, "refused", "; ".join(unplaced) + ". Nothing written: copy what you need, "
                                  "then run `make student FORCE=1` (keeps a backup)", False))
            continue
        saved = backup(target) if carried or unplaced or _has_outputs(student) else None  # anything of theirs
        _write(target, render(merged))
        detail = [f"{_count(carried, 'answer')} carried over" if carried else "", f"not carried: {'; '.join(unplaced)}"
                  if unplaced else "", f"backup {shown(saved)}" if saved else ""]
        reports.append(Report(name, "regenerated", ", ".join(d for d in detail if d)))
    return reports + _others(notebooks, set(generated))


# ------------------------------------------------------------------------------------------ executing solutions


def execute(paths: list[Path], timeout: int = 1200) -> None:
    """Run solution notebooks top to bottom in place, keeping outputs (what nbval compares)."""
    from nbclient import NotebookClient
    from tqdm.auto import tqdm

    for path in tqdm(paths, desc="executing", unit="notebook"):
        nb = read_notebook(path)
        resources = {"metadata": {"path": str(path.parent)}}  # run from solutions/, as nbval does
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
        path.write_text(render(stable_ids(nb)), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.course", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="regenerate notebooks/ from solutions/, keeping the answers in them")
    b.add_argument("--check", action="store_true", help="only check; exit 1 naming the out-of-date notebooks")
    b.add_argument("--force", action="store_true", help="also rewrite notebooks whose edits cannot be carried over "
                   "(each is backed up to notebooks/.backup/ first)")
    b.add_argument("--solutions", type=Path, default=SOLUTIONS, help="default: solutions/ of this repo")
    b.add_argument("--notebooks", type=Path, default=NOTEBOOKS, help="default: notebooks/ of this repo")
    e = sub.add_parser("execute", help="re-run solution notebooks in place")
    e.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in solutions/")
    args = parser.parse_args(argv)
    try:
        if args.command == "execute":
            execute(args.notebooks or solution_notebooks(SOLUTIONS))
            return 0
        solutions, notebooks = args.solutions, args.notebooks
        if args.check:
            reports = check(solutions, notebooks)
            bad = [r for r in reports if not r.ok]
            for r in bad:
                print(f"{shown(notebooks / r.name)}: {r.state}: {r.detail}", file=sys.stderr)
            if bad:
                return 1
            answered = sum(r.state == "in step" and bool(r.detail) for r in reports)
            verb = "holds" if answered == 1 else "hold"
            held = f"; {_count(answered, 'notebook')} {verb} your answers" if answered else ""
            print(f"{shown(notebooks)} is in step with {shown(solutions)} ({_count(len(reports), 'notebook')}{held})")
            return 0
        reports = build(force=args.force, solutions=solutions, notebooks=notebooks)
        for r in reports:
            print(r, file=sys.stdout if r.ok else sys.stderr)
        return 0 if all(r.ok for r in reports) else 1
    except CourseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
