"""Student notebooks are generated from the solutions: stubs, cleared outputs, staleness check, marker errors."""

from __future__ import annotations

import json

import nbformat
import pytest

from gpt2lab import course

CELL = """def f(x):
    '''docs stay'''
    ### BEGIN SOLUTION
    y = x + 1
    return y
    ### END SOLUTION

print("kept")"""


def test_strip_keeps_indentation_and_surroundings():
    assert course.strip_solutions(CELL, "nb cell 0") == (
        "def f(x):\n    '''docs stay'''\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nprint(\"kept\")"
    )
    assert course.strip_solutions("### BEGIN SOLUTION\nanswer\n### END SOLUTION", "m", markdown=True) == (
        "YOUR ANSWER HERE"
    )
    assert course.strip_solutions("no markers here", "x") == "no markers here"


@pytest.mark.parametrize(
    "source, problem",
    [
        ("### BEGIN SOLUTION\nx = 1", "without a matching ### END SOLUTION"),
        ("x = 1\n### END SOLUTION", "line 2: ### END SOLUTION without a matching"),
        ("### BEGIN SOLUTION\n  ### BEGIN SOLUTION\n### END SOLUTION", "line 2: nested ### BEGIN SOLUTION"),
    ],
)
def test_malformed_markers_name_notebook_and_cell(tmp_path, source, problem):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell(source)])
    nbformat.write(nb, solutions / "07_bad.ipynb")
    with pytest.raises(course.MarkerError, match=f"07_bad.ipynb cell 1.*{problem}"):
        course.build(solutions=solutions, notebooks=notebooks)
    assert not notebooks.exists()


def _solution(tmp_path):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    code = nbformat.v4.new_code_cell(CELL, execution_count=3)
    code.outputs = [nbformat.v4.new_output("stream", text="kept\n")]
    code.metadata["collapsed"] = True
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("Intro"), code])
    nb.metadata["kernelspec"] = {"name": "some-venv-kernel", "display_name": "x", "language": "python"}
    nbformat.write(nb, solutions / "01_demo.ipynb")
    return solutions, notebooks


def test_build_writes_stubbed_clean_notebooks_and_check_detects_staleness(tmp_path):
    solutions, notebooks = _solution(tmp_path)
    assert course.build(check=True, solutions=solutions, notebooks=notebooks) == ["01_demo.ipynb"]
    assert not notebooks.exists()  # --check writes nothing
    assert course.build(solutions=solutions, notebooks=notebooks) == ["01_demo.ipynb"]
    student = json.loads((notebooks / "01_demo.ipynb").read_text())
    code = student["cells"][1]
    assert code["outputs"] == [] and code["execution_count"] is None and code["metadata"] == {}
    assert "raise NotImplementedError()" in "".join(code["source"]) and "y = x + 1" not in "".join(code["source"])
    assert student["metadata"]["kernelspec"]["name"] == "python3"
    assert [c["id"] for c in student["cells"]] == ["cell-000", "cell-001"]
    nbformat.validate(nbformat.reads(json.dumps(student), as_version=4))
    # in step now; a second build is byte-identical
    assert course.build(check=True, solutions=solutions, notebooks=notebooks) == []
    before = (notebooks / "01_demo.ipynb").read_bytes()
    course.build(solutions=solutions, notebooks=notebooks)
    assert (notebooks / "01_demo.ipynb").read_bytes() == before
    # editing a solution makes the student copy stale; a stray student notebook is reported too
    nb = nbformat.read(solutions / "01_demo.ipynb", as_version=4)
    nb.cells[0].source = "Intro, revised"
    nbformat.write(nb, solutions / "01_demo.ipynb")
    (notebooks / "99_orphan.ipynb").write_text("{}")
    assert course.build(check=True, solutions=solutions, notebooks=notebooks) == [
        "01_demo.ipynb",
        "99_orphan.ipynb (no solution notebook)",
    ]


def test_main_check_exit_codes(tmp_path, monkeypatch, capsys):
    solutions, notebooks = _solution(tmp_path)
    monkeypatch.setattr(course, "SOLUTIONS", solutions)
    monkeypatch.setattr(course, "NOTEBOOKS", notebooks)
    monkeypatch.setattr(course.build, "__defaults__", (False, solutions, notebooks))
    assert course.main(["build", "--check"]) == 1
    assert "stale student notebooks: 01_demo.ipynb (run `make student`)" in capsys.readouterr().err
    assert course.main(["build"]) == 0
    assert course.main(["build", "--check"]) == 0


def test_repository_notebooks_are_in_step():
    """The same check `make test` runs: notebooks/ must be regenerated after every edit of solutions/."""
    assert course.build(check=True) == []
    names = [p.name for p in course.solution_notebooks()]
    assert names and names[0] == "00_welcome.ipynb"


def test_every_exercise_in_the_student_notebooks_is_stubbed():
    for path in course.solution_notebooks():
        solution = nbformat.read(path, as_version=4)
        student = nbformat.read(course.NOTEBOOKS / path.name, as_version=4)
        assert len(solution.cells) == len(student.cells)
        for sol, stu in zip(solution.cells, student.cells):
            if course.BEGIN in sol.source:
                assert "raise NotImplementedError()" in stu.source or "YOUR ANSWER HERE" in stu.source
            assert course.BEGIN not in stu.source and course.END not in stu.source
            if stu.cell_type == "code":
                assert stu.outputs == []
