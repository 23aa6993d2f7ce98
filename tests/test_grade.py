"""The grader: a solution passes, a fresh handout reads "not implemented", a wrong answer gets its check's ✗ line, and
a crash, a timeout, a dead kernel, a removed or edited check cell and a patched library are reported, never passed;
the submitted files are never written. Real notebook 01 for the first two; a tiny two-exercise course (built here,
with notebook 01's real checks) for the rest, so each run costs a kernel start and two fast checks."""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import types

import nbformat
import pytest
import torch

from gpt2lab import course
from gpt2lab.checks import attention as attention_checks
from gpt2lab.checks import core
from gpt2lab.course import grading

TINY = [
    ("markdown", "# Tiny · two exercises"),
    ("code", "import torch"),
    ("markdown", "## 1. Scores"),
    ("code", "def attention_scores(q, k):\n    ### BEGIN SOLUTION\n"
             "    return q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5\n    ### END SOLUTION"),
    ("code", "# NBVAL_CHECK_OUTPUT\nfrom gpt2lab.checks import attention as check\n\n"
             "check.attention_scores(attention_scores)"),
    ("markdown", "## 2. The causal mask"),
    ("code", "def causal_mask(T):\n    ### BEGIN SOLUTION\n    return torch.ones(T, T, dtype=torch.bool).tril()\n"
             "    ### END SOLUTION"),
    ("code", "# NBVAL_CHECK_OUTPUT\ncheck.causal_mask(causal_mask)"),
    ("code", "total = 1 + 1"),
]
SCORES = "def attention_scores(q, k):\n    return q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5"
MASK = "def causal_mask(T):\n    return torch.ones(T, T, dtype=torch.bool).tril()"
WRONG_MASK = "def causal_mask(T):\n    return torch.ones(T, T, dtype=torch.bool).triu()  # the keys after, not before"
FAKE = '"lower-triangular mask (diagonal included) for T = 1, 4, 7"'
PATCHED = (f"import gpt2lab.checks.attention as c\nfrom gpt2lab.checks.core import ok\n\n{WRONG_MASK}\n\n"
           f"c.causal_mask = lambda fn: ok('causal_mask', {FAKE})")
REBOUND = (f"import types\nfrom gpt2lab.checks.core import ok\n\n{WRONG_MASK}\n\n"
           f"check = types.SimpleNamespace(causal_mask=lambda fn: ok('causal_mask', {FAKE}))")
EDITED_CHECK = ('# NBVAL_CHECK_OUTPUT\nfrom gpt2lab.checks import attention as check\n\n'
                'print("✓ attention_scores: fine")')


def _notebook(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) if t == "code" else nbformat.v4.new_markdown_cell(s) for t, s in cells]
    return nb


def _handout(**answers) -> nbformat.NotebookNode:
    """The tiny course's handout (with its record), cells replaced by index: c3="..." sets cell 3's source."""
    nb = course.student_version(_notebook(TINY), "01_tiny.ipynb")
    for key, source in answers.items():
        nb.cells[int(key[1:])].source = source
    return nb


def _grade(paths, solutions, out, timeout) -> tuple[int, str, list[dict]]:
    """Run the command line as a user would; (exit status, what it printed, the CSV's rows)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        rc = grading.cli([*map(str, paths), "--out", str(out), "--solutions", str(solutions),
                          "--timeout", str(timeout)])  # fmt: skip
    with open(out / "grades.csv", encoding="utf-8", newline="") as f:
        return rc, printed.getvalue(), list(csv.DictReader(f))


def _rows(rows, student):
    return [(r["exercise"], r["cell"], r["result"], r["message"]) for r in rows if r["student"] == student]


def _files(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four students' tiny notebooks graded in one run (generous limit), and two more with a 5 s limit."""
    root = tmp_path_factory.mktemp("grade")
    solutions = root / "solutions"
    solutions.mkdir()
    (solutions / "01_tiny.ipynb").write_text(course.render(_notebook(TINY)), encoding="utf-8")
    removed = _handout(c3=SCORES, c4=EDITED_CHECK, c6=MASK)
    del removed.cells[7]
    students = {
        "carol": _handout(c3=SCORES, c6=WRONG_MASK, c8="total = 1 / 0"),  # a wrong answer; a crash after it
        "erin": removed,  # a check cell edited, another removed
        "frank": _handout(c3=SCORES, c6=PATCHED),  # the check patched from the exercise cell
        "grace": _handout(c3=SCORES, c6=REBOUND),  # `check` rebound to a fake
        "hank": _handout(c1="import time\n\ntime.sleep(60)"),  # runs past the limit
        "ivy": _handout(c1="import os\n\nos._exit(1)"),  # the kernel dies
    }
    slow = {"hank", "ivy"}  # graded with a 5 s limit
    for name, nb in students.items():
        folder = root / ("slow" if name in slow else "submissions") / name
        folder.mkdir(parents=True)
        (folder / "01_tiny.ipynb").write_text(course.render(nb), encoding="utf-8")
    before = _files(root / "submissions") | _files(root / "slow")
    rc, printed, rows = _grade([root / "submissions"], solutions, root / "out", timeout=120)
    slow_rc, _, slow_rows = _grade([root / "slow" / "hank", root / "slow" / "ivy" / "01_tiny.ipynb"], solutions,
                                   root / "out-slow", timeout=5)
    after = _files(root / "submissions") | _files(root / "slow")
    return types.SimpleNamespace(rc=rc, printed=printed, rows=rows, slow_rc=slow_rc, slow_rows=slow_rows,
                                 before=before, after=after, out=root / "out")


def test_wrong_answer_gets_the_checks_line(tiny):
    expected = str(attention_checks.causal_mask(lambda T: torch.ones(T, T, dtype=torch.bool).triu()))
    assert expected.startswith("✗ causal_mask: ")
    assert _rows(tiny.rows, "carol")[1:] == [
        ("attention_scores", "5", "pass", str(attention_checks.attention_scores(
            lambda q, k: q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5))),
        ("causal_mask", "8", "fail", expected),
    ]


def test_crash_outside_the_exercises_is_reported(tiny):
    assert _rows(tiny.rows, "carol")[0] == (
        "(notebook)", "9", "crashed", "cell 9 (`total = 1 / 0`) raised ZeroDivisionError: division by zero")


def test_removed_and_edited_check_cells_are_reported(tiny):
    assert _rows(tiny.rows, "erin") == [
        ("(notebook)", "5", "tampered", "check cell 5 was edited (the handout's is "
                                        "`check.attention_scores(attention_scores)`): not graded; restore it"),
        ("(notebook)", "", "tampered", "the check cell `check.causal_mask(causal_mask)` was removed: not graded; "
                                       "restore it"),
        ("attention_scores", "5", "tampered", "check cell 5 was edited (the handout's is "
                                              "`check.attention_scores(attention_scores)`): not graded; restore it"),
        ("causal_mask", "", "tampered", "the check cell `check.causal_mask(causal_mask)` was removed: not graded; "
                                        "restore it"),
    ]


def test_patched_check_is_reported_and_its_pass_not_trusted(tiny):
    rows = _rows(tiny.rows, "frank")
    assert rows[0][:3] == ("(notebook)", "", "tampered")
    assert rows[0][3].startswith("the library was changed at run time: gpt2lab.checks.attention.causal_mask replaced")
    assert rows[2][:3] == ("causal_mask", "8", "tampered")
    assert rows[2][3] == f"not trusted (the library was changed at run time): ✓ causal_mask: {FAKE[1:-1]}"


def test_check_rebound_to_a_fake_is_not_graded(tiny):
    rows = _rows(tiny.rows, "grace")
    assert rows[1][:3] == ("causal_mask", "8", "tampered")
    assert rows[1][3].startswith("`check` is namespace(causal_mask=") and \
        rows[1][3].endswith("here, not the module gpt2lab.checks.attention: not graded")  # fmt: skip


def test_timeout_and_dead_kernel_are_reported(tiny):
    assert tiny.slow_rc == 1
    assert _rows(tiny.slow_rows, "hank") == [
        ("(notebook)", "2", "timed out", "ran past its 5 s limit in cell 2 (`import time`); the cells after it did "
                                         "not run"),
        ("attention_scores", "5", "not run", "not run: the notebook stopped in cell 2"),
        ("causal_mask", "8", "not run", "not run: the notebook stopped in cell 2"),
    ]
    assert _rows(tiny.slow_rows, "ivy")[0] == (
        "(notebook)", "2", "crashed", "the kernel died in cell 2 (`import os`): out of memory, or the code ended the "
                                      "process")  # fmt: skip


def test_exit_status_summary_and_files_untouched(tiny):
    assert tiny.rc == 1
    assert tiny.after == tiny.before  # same files, same bytes: nothing written into the submissions' folders
    assert {r["student"] for r in tiny.rows} == {"carol", "erin", "frank", "grace"}
    markdown = (tiny.out / "grades.md").read_text(encoding="utf-8")
    assert markdown in tiny.printed
    assert "| carol | 01_tiny.ipynb | 1/2 | 1 | 0 | 0 | crashed |" in markdown
    assert "| erin | 01_tiny.ipynb | 0/2 | 0 | 0 | 2 | tampered |" in markdown
    assert "| grace | 01_tiny.ipynb | 1/2 | 0 | 0 | 1 | tampered |" in markdown  # reported by its check's own row


# ------------------------------------------------------------------------------------------ notebook 01 itself


@pytest.fixture(scope="module")
def course_01(tmp_path_factory, sonnet_data, tokenizer):
    """Notebook 01 as solved (alice, no handout record) and as handed out (bob)."""
    root = tmp_path_factory.mktemp("grade01")
    solution = course.SOLUTIONS / "01_attention.ipynb"
    for student in ("alice", "bob"):
        (root / student).mkdir()
    (root / "alice" / solution.name).write_bytes(solution.read_bytes())
    handout = course.student_version(course.read_notebook(solution), solution.name)
    (root / "bob" / solution.name).write_text(course.render(handout), encoding="utf-8")
    before = _files(root)
    rc, printed, rows = _grade([root / "alice", root / "bob"], course.SOLUTIONS, root.parent / "out01", timeout=300)
    return types.SimpleNamespace(rc=rc, rows=rows, before=before, after=_files(root))


EXERCISES_01 = ["attention_scores", "causal_mask", "padding_mask", "attention", "split_heads", "merge_heads",
                "self_attention"]


def test_solution_passes_every_check(course_01):
    rows = _rows(course_01.rows, "alice")
    assert [r[0] for r in rows] == [*EXERCISES_01, "padded_batch"]
    assert all(r[2] == "pass" and r[3].startswith(f"✓ {r[0]}: ") for r in rows), rows
    assert grading.ok([r for r in map(_row, course_01.rows) if r.student == "alice"])


def test_fresh_handout_is_not_implemented(course_01):
    rows = _rows(course_01.rows, "bob")
    assert [r[0] for r in rows] == [*EXERCISES_01, "padded_batch"]
    for exercise, _, result, message in rows[:-1]:
        assert (result, message) == ("not implemented", f"✗ {exercise}: not implemented yet (replace "
                                                        "`raise NotImplementedError()` with your code)")
    assert rows[-1][2] == "pass"  # a check of the library copy, which the handout already holds
    assert course_01.rc == 1
    assert course_01.after == course_01.before


def _row(d) -> grading.Row:
    return grading.Row(d["student"], d["notebook"], d["exercise"], int(d["cell"]) if d["cell"] else None,
                       d["result"], d["message"])


# ------------------------------------------------------------------------------------------ no kernel needed


@pytest.mark.parametrize("name, expected", [
    ("03_adamw.ipynb", ["update_moments", "bias_correction", "decoupled_decay", "adamw_step", "MyAdamW",
                        "torch_parity"]),
    ("02_gpt2.ipynb", ["embed", "block_forward", "logits_from_hidden", "gpt2_matches_transformers", "greedy",
                       "cache_matches", "greedy_matches_transformers", "top_k_filter", "top_p_filter",
                       "beam_matches_transformers"]),
])  # fmt: skip
def test_each_check_is_named_after_its_exercise(name, expected):
    handout = course.student_version(course.read_notebook(course.SOLUTIONS / name), name)
    assert [s.exercise for s in grading.check_specs(handout)] == expected


def test_students_are_named_by_folder(tmp_path):
    for path in ("class/alice/01_a.ipynb", "class/bob/01_a.ipynb", "class/02_b.ipynb", "single/03_c.ipynb"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("{}")
    found = grading.find_submissions([tmp_path / "class", tmp_path / "single" / "03_c.ipynb"])
    assert [(s.student, s.path.name) for s in found] == [("class", "02_b.ipynb"), ("alice", "01_a.ipynb"),
                                                         ("bob", "01_a.ipynb"), ("single", "03_c.ipynb")]
    with pytest.raises(grading.GradeError, match="no such notebook or folder"):
        grading.find_submissions([tmp_path / "nowhere"])


def test_unknown_and_unreadable_notebooks_are_reported(tmp_path):
    (tmp_path / "notes.ipynb").write_text(course.render(_notebook([("code", "print('mine')")])), encoding="utf-8")
    (tmp_path / "broken.ipynb").write_text("{", encoding="utf-8")
    handouts = {"01_tiny.ipynb": _handout()}
    rows = [r for p in sorted(tmp_path.iterdir()) for r in grading.grade_notebook(grading.Submission("s", p), handouts)]
    assert [(r.notebook, r.result) for r in rows] == [("broken.ipynb", "unreadable"),
                                                      ("notes.ipynb", "not a course notebook")]


@pytest.mark.parametrize("patch", ["attribute", "core", "closure", "code", "method", "torch", "tensor", "module",
                                   "removed"])
def test_fingerprints_see_every_kind_of_patch(patch, monkeypatch):
    """Each way of faking a check changes the fingerprints (here in this process; the grader compares the kernel's
    with a fresh import's)."""
    import sys

    names = ["gpt2lab.checks.core", "gpt2lab.checks.attention", *grading.EXTRA_LIBRARY]
    before = grading.library_fingerprints(names, fresh=False)
    assert grading.library_changes(grading.library_fingerprints(names, fresh=False), before) == []
    fake = lambda *a, **k: core.ok("causal_mask", "fine")  # noqa: E731
    closure = attention_checks.causal_mask.__closure__
    if patch == "attribute":
        monkeypatch.setattr(attention_checks, "causal_mask", fake)
    elif patch == "core":
        monkeypatch.setattr(core, "compare", fake)
    elif patch == "closure":  # the function the @check wrapper calls
        inner = next(c for c in closure if callable(c.cell_contents))
        monkeypatch.setattr(inner, "cell_contents", fake)
    elif patch == "code":
        monkeypatch.setattr(attention_checks.causal_mask.__wrapped__, "__code__", fake.__code__)
    elif patch == "method":
        monkeypatch.setattr(core.CheckResult, "__str__", lambda self: "✓ fine")
    elif patch == "torch":
        monkeypatch.setattr(torch, "allclose", fake)
    elif patch == "tensor":
        monkeypatch.setattr(torch.Tensor, "equal", fake, raising=False)
    elif patch == "module":
        monkeypatch.setitem(sys.modules, "gpt2lab.checks.attention", types.ModuleType("gpt2lab.checks.attention"))
    elif patch == "removed":
        monkeypatch.delitem(sys.modules, "gpt2lab.checks.attention")
    changes = grading.library_changes(grading.library_fingerprints(names, fresh=False), before)
    assert changes
    if patch == "removed":
        assert changes == ["gpt2lab.checks.attention removed from sys.modules"]


def test_fingerprints_see_past_torchs_own_wrappers(monkeypatch):
    """torch wraps functions at run time (an optimizer's first use hooks its class's step; importing dynamo wraps
    torch.manual_seed): not a change. A wrapper made in the student's code is one."""
    import functools

    from gpt2lab.optim import AdamW

    names = ["gpt2lab.optim.adamw", *grading.EXTRA_LIBRARY]
    step, seed = inspect.unwrap(AdamW.step), inspect.unwrap(torch.manual_seed)
    monkeypatch.setattr(AdamW, "step", step)
    monkeypatch.setattr(torch, "manual_seed", seed)
    before = grading.library_fingerprints(names, fresh=False)
    AdamW([torch.nn.Parameter(torch.zeros(2))])  # hooks AdamW.step
    monkeypatch.setattr(torch, "manual_seed", torch.no_grad()(seed))  # a wrapper made in torch, as dynamo's is
    assert getattr(AdamW.step, "hooked", False)
    assert grading.library_changes(grading.library_fingerprints(names, fresh=False), before) == []
    monkeypatch.setattr(torch, "manual_seed", functools.wraps(seed)(lambda *a: None))
    assert grading.library_changes(grading.library_fingerprints(names, fresh=False), before) == \
        ["torch.manual_seed replaced"]  # fmt: skip


def test_bad_arguments_get_one_line(tmp_path, capsys):
    assert grading.cli([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: no such notebook or folder (give submitted " \
                                      ".ipynb files or folders of them)\n"  # fmt: skip
    assert grading.cli([str(tmp_path), "--timeout", "0"]) == 2
    assert "give a positive number of seconds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
