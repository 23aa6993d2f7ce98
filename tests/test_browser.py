"""The course as a student meets it: JupyterLab in a real browser (headless chromium driven by Playwright).

- Every solution notebook is opened in quick mode and run with "Run All Cells"; every cell must run without an
  error, every widget must render (no "Error displaying widget": the tokenizer explorer of 00, the sampling
  playground of 02, the tqdm bars), the plots must be there and every check cell must show ✓.
- A student notebook (00, as handed out) is run: its first exercise's check must say "not implemented yet", not
  print a traceback. A correct answer is then typed into the exercise cell with the keyboard and saved with
  Ctrl+S; the sync check (`build --check`) must still pass, and `build` (`make student`) must keep the answer,
  also when the handout changed meanwhile.

Everything runs on a temporary copy (solutions/ copied, notebooks/ generated from it): JupyterLab saves what it
opens, and the repo's notebooks must not change. Screenshots of each notebook go to test-artifacts/ (ignored by
git), with the server's log. Without chromium the tests skip saying how to get it; in CI (GPT2LAB_REQUIRE_BROWSER,
GPT2LAB_REQUIRE_DATA or CI set) that is a failure.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from browser_helpers import CHROMIUM_ARGS, HOW_TO_GET, JupyterLab, LabPage, browser_required, find_chromium

from gpt2lab import course, data

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
SOLUTIONS = course.solution_notebooks()
RUN_LIMIT_S = 600  # per notebook; quick mode takes seconds to ~30 s
WIDGET = "application/vnd.jupyter.widget-view+json"
TQDM_TEXT = re.compile(r"\d+%\|.*\| *\d+/\d+")  # a tqdm bar's text form: " 0%|          | 0/3 [00:00<?, ?it/s]"


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path, why = None, "playwright is not installed: pip install -e '.[dev]'"
    else:
        path, why = find_chromium(), f"no chromium found: {HOW_TO_GET}"
    if path is None:
        if browser_required():
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def course_copy(tmp_path_factory) -> Path:
    """solutions/ copied and notebooks/ generated from it, as `make student` would, in a temporary folder."""
    root = tmp_path_factory.mktemp("course")
    (root / "solutions").mkdir()
    (root / "notebooks").mkdir()
    for path in SOLUTIONS:
        shutil.copyfile(path, root / "solutions" / path.name)
        handout = course.student_version(course.read_notebook(path), path.name)
        (root / "notebooks" / path.name).write_text(course.render(handout), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def lab(chromium, course_copy, sonnet_data, quora_data, tokenizer, tmp_path_factory):
    state = tmp_path_factory.mktemp("jupyter")
    env = {
        "GPT2LAB_QUICK": "1",
        "GPT2LAB_DATA": str(data.data_dir()),
        "GPT2LAB_RESULTS": str(state / "results"),
        "MPLBACKEND": None,  # the kernel's inline backend draws the plots into the page
        "HF_HUB_OFFLINE": "1",
    }
    ARTIFACTS.mkdir(exist_ok=True)
    with JupyterLab(course_copy, state, env, log=ARTIFACTS / "jupyterlab.log") as server:
        yield server


@pytest.fixture(scope="module")
def page(lab, chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield LabPage(browser.new_page(viewport={"width": 1400, "height": 1000}), lab)
        finally:
            browser.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_check(cell: dict) -> bool:
    return "NBVAL_CHECK_OUTPUT" in cell["source"] and "check." in cell["source"]


def _problems(name: str, cells: list[dict], allowed_errors: set[int] = frozenset()) -> list[str]:
    """Cells that did not run, raised, printed a traceback or show a widget that failed to render."""
    problems = []
    for c in cells:
        if c["type"] != "code":
            continue
        where = f"{name} cell {c['index'] + 1}"
        if c["source"].strip() and c["execution_count"] is None:
            problems.append(f"{where} did not run")
        for o in c["outputs"]:
            if o["type"] == "error" and c["index"] not in allowed_errors:
                problems.append(f"{where} raised {o['ename']}: {o['evalue']}")
            if o["type"] == "stream" and o["name"] == "stderr" and "Traceback" in o["text"]:
                problems.append(f"{where} printed a traceback: {o['text'][-300:]}")
        if "Error displaying widget" in c["shown"]:
            problems.append(f"{where} shows 'Error displaying widget'")
        widget_outputs = sum(WIDGET in o["mimes"] for o in c["outputs"])
        if not (c["widget_views"] == c["live_widgets"] + c["closed_widgets"] == widget_outputs):
            problems.append(f"{where}: {widget_outputs} widget outputs, {c['widget_views']} in the page, "
                            f"{c['live_widgets']} live widgets and {c['closed_widgets']} closed")
    return problems


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solution_notebook_runs_in_jupyterlab(solution, page, course_copy):
    before = _digest(solution)
    path = f"solutions/{solution.name}"
    page.open(path)
    seconds = page.run_all(path, RUN_LIMIT_S)
    cells, seen = page.cells(), page.seen()
    page.screenshot(ARTIFACTS / f"browser-{solution.stem}.png")
    page.close()
    print(f"{solution.name}: run all cells in the browser took {seconds:.1f} s")

    assert not _problems(solution.name, cells), "\n".join(_problems(solution.name, cells))
    checks = [c for c in cells if c["type"] == "code" and _is_check(c)]
    assert checks, f"{solution.name} has no check cell"
    for c in checks:
        shown = c["shown"].strip()
        assert shown.startswith("✓") and "✗" not in shown, f"{solution.name} cell {c['index'] + 1} shows {shown!r}"

    # what `make solutions` stored says where the plots and widgets are: each must be in the page too
    stored = course.read_notebook(solution)
    assert len(stored.cells) == len(cells)
    bars = 0
    for index, cell in enumerate(stored.cells):
        if cell.cell_type != "code":
            continue
        got, where = cells[index], f"{solution.name} cell {index + 1}"
        images = sum("image/png" in o.get("data", {}) for o in cell.outputs)
        assert got["images"] >= images, f"{where}: {images} plots stored, {got['images']} shown"
        widgets = [o.data.get("text/plain", "") for o in cell.outputs if WIDGET in o.get("data", {})]
        bars += sum(bool(TQDM_TEXT.search(text)) for text in widgets)
        if any(not TQDM_TEXT.search(text) and text != "Output()" for text in widgets):
            assert got["controls"] >= 1, f"{where}: the interactive widget shows no control"
    assert seen["widget_errors"] == 0, f"{solution.name}: 'Error displaying widget' appeared while it ran"
    if bars:  # tqdm bars: those that stay are in the page; those gone when done (leave=False) were seen meanwhile
        assert seen["progress"] >= 1, f"{solution.name}: {bars} tqdm bars stored, none shown in the browser"
    assert _digest(solution) == before, f"running {solution.name} in JupyterLab changed the repo's copy"


def test_student_notebook_in_jupyterlab(page, course_copy):
    """The first notebook as handed out: a stub's check says "not implemented yet"; a typed answer is saved,
    keeps the folder in step, and survives `make student`, also after the handout changed."""
    solution = SOLUTIONS[0]
    name, path = solution.name, f"notebooks/{solution.name}"
    target, solutions_dir, notebooks_dir = course_copy / path, course_copy / "solutions", course_copy / "notebooks"
    handout = course.read_notebook(target)
    exercises = course.exercise_cells(handout)
    exercise = next(i for i in exercises if handout.cells[i].cell_type == "code")
    check = next(i for i in range(exercise + 1, len(handout.cells)) if handout.cells[i].cell_type == "code")
    assert "NBVAL_CHECK_OUTPUT" in handout.cells[check].source, f"{name}: no check cell after cell {exercise + 1}"
    lines = course.read_notebook(solution).cells[exercise].source.split("\n")
    answer = "\n".join(ln for ln in lines if ln.strip() not in (course.BEGIN, course.END))

    page.open(path)
    page.run_all(path, RUN_LIMIT_S)
    cells = page.cells()
    stubs = {i for i in exercises if "raise NotImplementedError()" in handout.cells[i].source}
    assert not _problems(name, cells, allowed_errors=stubs), "\n".join(_problems(name, cells, stubs))
    shown = cells[check]["shown"].strip()
    assert "not implemented yet" in shown and "\n" not in shown and "Traceback" not in shown, shown
    page.screenshot(ARTIFACTS / f"browser-student-{solution.stem}-handout.png")

    typed = page.type_into(exercise, answer)
    assert typed == answer, f"the editor holds {typed!r}"
    page.run_cell(exercise)
    page.run_cell(check)
    shown = page.cells()[check]["shown"].strip()
    assert shown.startswith("✓"), shown
    page.save()
    page.screenshot(ARTIFACTS / f"browser-student-{solution.stem}-answered.png")
    page.close()
    assert course.read_notebook(target).cells[exercise].source == answer

    def build(*flags: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "gpt2lab.course", "build", *flags,
               "--solutions", str(solutions_dir), "--notebooks", str(notebooks_dir)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    result = build("--check")
    assert result.returncode == 0 and "1 notebook holds your answers" in result.stdout, result.stdout + result.stderr
    result = build()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{name}: in step, left as you saved it (your answers to 1 exercise)" in result.stdout
    assert course.read_notebook(target).cells[exercise].source == answer

    # the instructor revises the handout's introduction: `make student` regenerates it, carrying the answer over
    revised = course.read_notebook(solutions_dir / name)
    revised.cells[0].source += "\n\nA sentence added after the handout went out."
    (solutions_dir / name).write_text(course.render(revised), encoding="utf-8")
    result = build()
    assert result.returncode == 0 and f"{name}: regenerated (1 answer carried over" in result.stdout, result.stdout
    student = nbformat.read(target, as_version=4)
    assert student.cells[exercise].source == answer
    assert student.cells[0].source.endswith("A sentence added after the handout went out.")
    assert build("--check").returncode == 0
