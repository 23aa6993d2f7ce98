"""Course tooling: generate the student notebooks from the solved ones, and re-execute the solutions.

    python -m gpt2lab.course build            solutions/*.ipynb -> notebooks/*.ipynb
    python -m gpt2lab.course build --check    exit 1 naming every student notebook that is stale
    python -m gpt2lab.course execute [NB...]  run solutions in place (quick mode in `make solutions`)

Solution regions are marked the nbgrader way; each becomes a stub at the same indentation:

    ### BEGIN SOLUTION                 # YOUR CODE HERE
    scores = q @ k.transpose(-2, -1)   ->   raise NotImplementedError()
    ### END SOLUTION

Markdown cells may mark regions too (they become "YOUR ANSWER HERE"). Outputs and execution counts are cleared
and the kernel metadata normalised, so the generated notebooks are byte-for-byte reproducible.
Instructors need nothing but this repo (no nbgrader server).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS = REPO_ROOT / "solutions"
NOTEBOOKS = REPO_ROOT / "notebooks"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python"}


class MarkerError(ValueError):
    """A malformed solution marker: the message names the notebook and the cell."""


def strip_solutions(source: str, where: str, markdown: bool = False) -> str:
    """Replace every BEGIN/END SOLUTION region of one cell's source with a stub at the marker's indentation."""
    out: list[str] = []
    indent: str | None = None
    for lineno, line in enumerate(source.split("\n"), start=1):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if indent is not None:
                raise MarkerError(f"{where}, line {lineno}: nested {BEGIN} (close the first region with {END})")
            indent = line[: len(line) - len(line.lstrip())]
            if markdown:
                out.append(f"{indent}YOUR ANSWER HERE")
            else:
                out += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError()"]
        elif stripped.startswith(END):
            if indent is None:
                raise MarkerError(f"{where}, line {lineno}: {END} without a matching {BEGIN}")
            indent = None
        elif indent is None:
            out.append(line)
    if indent is not None:
        raise MarkerError(f"{where}: {BEGIN} without a matching {END}")
    return "\n".join(out)


def student_version(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The student notebook for a solved one: regions stubbed, outputs cleared, metadata normalised."""
    nb = copy.deepcopy(nb)
    for index, cell in enumerate(nb.cells):
        where = f"{name} cell {index}"
        if cell.cell_type in ("code", "markdown"):
            cell.source = strip_solutions(cell.source, where, markdown=cell.cell_type == "markdown")
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in ("tags", "editable", "deletable")}
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)}
    return stable_ids(nb)


def stable_ids(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Cell ids from cell positions, so regenerating a notebook never changes bytes for nothing."""
    nb.nbformat, nb.nbformat_minor = 4, 5
    for index, cell in enumerate(nb.cells):
        cell.id = f"cell-{index:03d}"
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    """Stable text for a notebook (sorted keys, one-space indent, trailing newline)."""
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def solution_notebooks(solutions: Path = SOLUTIONS) -> list[Path]:
    return sorted(solutions.glob("*.ipynb"))


def build(check: bool = False, solutions: Path = SOLUTIONS, notebooks: Path = NOTEBOOKS) -> list[str]:
    """Write (or with check=True only compare) every student notebook; return the names that were stale."""
    stale = []
    sources = solution_notebooks(solutions)
    if not sources:
        raise FileNotFoundError(f"no solution notebooks in {solutions}")
    for path in sources:
        nb = nbformat.read(path, as_version=4)
        text = render(student_version(nb, path.name))
        target = notebooks / path.name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            stale.append(path.name)
            if not check:
                notebooks.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
    expected = {p.name for p in sources}
    extra = sorted(p.name for p in notebooks.glob("*.ipynb") if p.name not in expected)
    stale += [f"{name} (no solution notebook)" for name in extra]
    return stale


def execute(paths: list[Path], timeout: int = 1200) -> None:
    """Run solution notebooks top to bottom in place, keeping outputs (what nbval compares)."""
    from nbclient import NotebookClient
    from tqdm.auto import tqdm

    for path in tqdm(paths, desc="executing", unit="notebook"):
        nb = nbformat.read(path, as_version=4)
        resources = {"metadata": {"path": str(path.parent)}}  # run from solutions/, as nbval does
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
        path.write_text(render(stable_ids(nb)), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.course", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="regenerate notebooks/ from solutions/")
    b.add_argument("--check", action="store_true", help="only check; exit 1 naming the stale notebooks")
    e = sub.add_parser("execute", help="re-run solution notebooks in place")
    e.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in solutions/")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            stale = build(check=args.check)
            if args.check:
                if stale:
                    print(f"stale student notebooks: {', '.join(stale)} (run `make student`)", file=sys.stderr)
                    return 1
                print(f"notebooks/ is in step with solutions/ ({len(solution_notebooks())} notebooks)")
            else:
                print(f"wrote {len(stale)} student notebook(s)" + (f": {', '.join(stale)}" if stale else ""))
        else:
            execute(args.notebooks or solution_notebooks())
    except (MarkerError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
