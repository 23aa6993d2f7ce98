"""Student notebooks are generated from the solutions: stubs, cleared outputs, the sync check, bad inputs, and a
student's work surviving `make student` (notebooks saved exactly the way JupyterLab saves them)."""

from __future__ import annotations

import json
import shutil

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
EXERCISE_2 = "def g(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION"
ANSWER = "def f(x):\n    '''docs stay'''\n    return x + 1  # my answer\n\nprint(\"kept\")"

# ------------------------------------------------------------------------------------------ JupyterLab's save

# What JupyterLab 4.6 fills in from the running kernel: `make lab`'s "Python (gpt2lab)" kernel and python's
# full language_info, as ipykernel reports it.
LAB_KERNELSPEC = {"display_name": "Python (gpt2lab)", "language": "python", "name": "gpt2lab"}
LAB_LANGUAGE_INFO = {
    "codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py", "mimetype": "text/x-python",
    "name": "python", "nbconvert_exporter": "python", "pygments_lexer": "ipython3", "version": "3.11.7",
}


@pytest.fixture
def lab_save(tmp_path, monkeypatch):
    """Open a notebook and save it the way JupyterLab does, optionally editing it in between.

    JupyterLab's save goes through jupyter_server's FileContentsManager: the frontend sends the notebook as JSON
    with the kernel metadata filled in, the server validates, signs and writes it (nbformat v4, indent 1, sorted
    keys, sources as lists of lines). Here the same manager does the same, on a temporary copy.
    """
    from jupyter_server.services.contents.filemanager import FileContentsManager

    for var in ("JUPYTER_DATA_DIR", "JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR"):  # the notary's key and db
        monkeypatch.setenv(var, str(tmp_path / "jupyter" / var))

    def save(path, edit=None):
        manager = FileContentsManager(root_dir=str(path.parent))
        content = json.loads(json.dumps(manager.get(path.name)["content"]))  # what the frontend holds
        content["metadata"]["kernelspec"] = dict(LAB_KERNELSPEC)
        content["metadata"]["language_info"] = dict(LAB_LANGUAGE_INFO)
        if edit:
            edit(content["cells"])
        manager.save({"type": "notebook", "format": "json", "content": content}, path.name)
        return path.read_text(encoding="utf-8")

    return save


def type_answer(index, source, output="kept\n"):
    """An edit a student makes: type into cell `index` and run it (an output and an execution count)."""
    def edit(cells):
        cells[index]["source"] = source
        if cells[index]["cell_type"] == "code":
            cells[index]["execution_count"] = 7
            cells[index]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": output}]
    return edit


# ------------------------------------------------------------------------------------------ fixtures


def write_solution(solutions, name="01_demo.ipynb", intro="Intro", cells=(CELL,)):
    solutions.mkdir(exist_ok=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(intro)])
    for source in cells:
        code = nbformat.v4.new_code_cell(source, execution_count=3)
        code.outputs = [nbformat.v4.new_output("stream", text="kept\n")]
        code.metadata["collapsed"] = True
        nb.cells.append(code)
    nb.cells.append(nbformat.v4.new_markdown_cell("Recap"))
    nb.metadata["kernelspec"] = {"name": "some-venv-kernel", "display_name": "x", "language": "python"}
    nbformat.write(nb, solutions / name)


@pytest.fixture
def course_dirs(tmp_path):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    write_solution(solutions)
    return solutions, notebooks


def states(reports):
    return [(r.name, r.state) for r in reports]


# ------------------------------------------------------------------------------------------ generating


def test_strip_keeps_indentation_and_surroundings():
    assert course.strip_solutions(CELL, "nb cell 1") == (
        "def f(x):\n    '''docs stay'''\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nprint(\"kept\")"
    )
    assert course.strip_solutions("### BEGIN SOLUTION\nanswer\n### END SOLUTION", "m", markdown=True) == (
        "YOUR ANSWER HERE"
    )
    assert course.strip_solutions("no markers here\nwe append solutions", "x") == "no markers here\nwe append solutions"


@pytest.mark.parametrize(
    "source, problem",
    [
        ("### BEGIN SOLUTION\nx = 1", "line 1: ### BEGIN SOLUTION without a matching ### END SOLUTION"),
        ("x = 1\n### END SOLUTION", "line 2: ### END SOLUTION without a matching"),
        ("### BEGIN SOLUTION\n  ### BEGIN SOLUTION\n### END SOLUTION", "line 2: nested ### BEGIN SOLUTION"),
        # near-misses that would otherwise hand the answer out, every check still passing
        ("def f():\n    ## BEGIN SOLUTION\n    return 1\n    ## END SOLUTION", "line 2: '## BEGIN SOLUTION' looks"),
        ("#### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "line 1: '#### BEGIN SOLUTION' looks like"),
        ("### begin solution\nx = 1\n### end solution", "line 1: '### begin solution' looks like"),
        ("### BEGIN SOLUTION\nx = 1\n## END SOLUTION", "line 3: '## END SOLUTION' looks like"),
        ("# BEGIN_SOLUTION\nx = 1", "line 1: '# BEGIN_SOLUTION' looks like"),
        ("### BEGIN SOLUTION  # the mask\nx = 1\n### END SOLUTION", "line 1: '### BEGIN SOLUTION  # the mask' looks"),
    ],
)
def test_malformed_markers_name_notebook_cell_and_line(tmp_path, source, problem):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    write_solution(solutions, "07_bad.ipynb", cells=[source])
    with pytest.raises(course.MarkerError, match=f"solutions/07_bad.ipynb cell 2, {problem}"):
        course.build(solutions=solutions, notebooks=notebooks)
    assert not notebooks.exists()  # nothing written, not even the good notebooks


def test_solution_that_is_not_json_is_one_line_naming_file_line_and_column(course_dirs, monkeypatch, capsys):
    solutions, notebooks = course_dirs
    text = (solutions / "01_demo.ipynb").read_text().splitlines()
    text[5] = text[5] + ","  # a stray comma, as a bad merge leaves
    (solutions / "01_demo.ipynb").write_text("\n".join(text))
    with pytest.raises(course.CourseError, match=r"solutions/01_demo.ipynb: not valid JSON \(line [67], column \d+"):
        course.check(solutions, notebooks)
    monkeypatch.setattr(course, "SOLUTIONS", solutions)
    monkeypatch.setattr(course, "NOTEBOOKS", notebooks)
    assert course.main(["build"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "01_demo.ipynb: not valid JSON (line" in err and err.count("\n") == 1
    (solutions / "01_demo.ipynb").write_text('{"cells": 3}')
    with pytest.raises(course.CourseError, match="01_demo.ipynb: valid JSON but not a Jupyter notebook"):
        course.check(solutions, notebooks)


def test_build_writes_stubbed_clean_notebooks_and_check_detects_staleness(course_dirs):
    solutions, notebooks = course_dirs
    assert states(course.check(solutions, notebooks)) == [("01_demo.ipynb", "missing")]
    assert not notebooks.exists()  # --check writes nothing
    assert states(course.build(solutions=solutions, notebooks=notebooks)) == [("01_demo.ipynb", "created")]
    student = json.loads((notebooks / "01_demo.ipynb").read_text())
    code = student["cells"][1]
    assert code["outputs"] == [] and code["execution_count"] is None and code["metadata"] == {}
    assert "raise NotImplementedError()" in "".join(code["source"]) and "y = x + 1" not in "".join(code["source"])
    assert student["metadata"]["kernelspec"]["name"] == "python3"
    assert student["metadata"]["gpt2lab"]["handout"]["exercises"] == [1]
    assert [c["id"] for c in student["cells"]] == ["cell-000", "cell-001", "cell-002"]
    nbformat.validate(nbformat.reads(json.dumps(student), as_version=4))
    # in step now; a second build is byte-identical
    assert [r.ok for r in course.check(solutions, notebooks)] == [True]
    before = (notebooks / "01_demo.ipynb").read_bytes()
    assert states(course.build(solutions=solutions, notebooks=notebooks)) == [("01_demo.ipynb", "unchanged")]
    assert (notebooks / "01_demo.ipynb").read_bytes() == before
    # editing a solution makes the student copy stale; a stray notebook is reported, a student's own is not
    write_solution(solutions, intro="Intro, revised")
    (notebooks / "99_orphan.ipynb").write_text("{}")
    (notebooks / "Untitled1.ipynb").write_text("{}")
    (notebooks / "01_demo-Copy1.ipynb").write_text("{}")
    reports = course.check(solutions, notebooks)
    assert [(r.name, r.state, r.ok) for r in reports] == [
        ("01_demo.ipynb", "out of date", False), ("01_demo-Copy1.ipynb", "yours", True),
        ("99_orphan.ipynb", "no solution notebook", False), ("Untitled1.ipynb", "yours", True),
    ]
    assert 'cell 1 (markdown, "Intro, revised") differs: solutions/ changed it' in reports[0].detail


# ------------------------------------------------------------------------------------------ a student's work


def test_notebook_saved_unchanged_in_jupyterlab_is_in_step(course_dirs, lab_save):
    solutions, notebooks = course_dirs
    course.build(solutions=solutions, notebooks=notebooks)
    path = notebooks / "01_demo.ipynb"
    saved = lab_save(path)
    assert saved != course.render(course.student_version(nbformat.read(solutions / "01_demo.ipynb", 4), "x"))
    assert isinstance(json.loads(saved)["cells"][1]["source"], list)  # really JupyterLab's layout
    assert json.loads(saved)["metadata"]["kernelspec"]["name"] == "gpt2lab"
    assert [(r.state, r.ok, r.detail) for r in course.check(solutions, notebooks)] == [("in step", True, "")]
    # nothing of the student's in it: build may rewrite it (it says so), and it stays in step
    assert states(course.build(solutions=solutions, notebooks=notebooks)) == [("01_demo.ipynb", "refreshed")]


def test_answer_in_jupyterlab_saved_notebook_is_in_step_and_survives_build(course_dirs, lab_save, monkeypatch,
                                                                           capsys):
    solutions, notebooks = course_dirs
    course.build(solutions=solutions, notebooks=notebooks)
    path = notebooks / "01_demo.ipynb"
    saved = lab_save(path, type_answer(1, ANSWER))
    # in step: `make test`'s check passes and counts the answers
    assert [(r.state, r.ok, r.detail) for r in course.check(solutions, notebooks)] == [
        ("in step", True, "holds your answers to 1 exercise")]
    monkeypatch.setattr(course, "SOLUTIONS", solutions)
    monkeypatch.setattr(course, "NOTEBOOKS", notebooks)
    assert course.main(["build", "--check"]) == 0
    assert "(1 notebook; 1 notebook holds your answers)" in capsys.readouterr().out
    # a build with solutions/ unchanged leaves the file exactly as the student saved it
    assert states(course.build(solutions=solutions, notebooks=notebooks)) == [
        ("01_demo.ipynb", "in step, left as you saved it")]
    assert path.read_text() == saved
    # the course changes (intro and recap reworded): the answer, its output and the kernel choice are carried over
    write_solution(solutions, intro="Intro, revised")
    nb = nbformat.read(solutions / "01_demo.ipynb", 4)
    nb.cells[2].source = "Recap, revised"
    nbformat.write(nb, solutions / "01_demo.ipynb")
    report = course.check(solutions, notebooks)[0]
    assert (report.state, report.ok) == ("out of date", False) and "cell 1 (markdown" in report.detail
    assert course.main(["build"]) == 0
    out = capsys.readouterr().out
    assert "01_demo.ipynb: regenerated (1 answer carried over, backup " in out
    student = nbformat.read(path, 4)
    assert [c.source for c in student.cells] == ["Intro, revised", ANSWER, "Recap, revised"]
    assert student.cells[1].outputs[0].text == "kept\n" and student.cells[1].execution_count == 7
    assert student.metadata.kernelspec.name == "gpt2lab"
    assert [r.ok for r in course.check(solutions, notebooks)] == [True]
    backups = list((notebooks / course.BACKUPS).glob("01_demo-*.ipynb"))
    assert len(backups) == 1 and backups[0].read_text() == saved


def test_exercises_added_answers_follow_their_stub_or_build_refuses(course_dirs, lab_save):
    solutions, notebooks = course_dirs
    course.build(solutions=solutions, notebooks=notebooks)
    path = notebooks / "01_demo.ipynb"
    lab_save(path, type_answer(1, ANSWER))
    # a new exercise before the answered one: matched by its unchanged stub
    write_solution(solutions, cells=[EXERCISE_2, CELL])
    assert course.check(solutions, notebooks)[0].detail.startswith("3 cells, the handout has 4")
    assert states(course.build(solutions=solutions, notebooks=notebooks)) == [("01_demo.ipynb", "regenerated")]
    assert [c.source for c in nbformat.read(path, 4).cells][2] == ANSWER
    # the answered exercise's stub changes while the count changes again: no safe place, so nothing is written
    before = path.read_text()
    write_solution(solutions, cells=[CELL.replace("docs stay", "docs changed")])
    report = course.build(solutions=solutions, notebooks=notebooks)[0]
    assert (report.state, report.ok) == ("refused", False)
    assert 'cell 3 ("def f(x):") answers exercise 2, which the new handout changed' in report.detail
    assert path.read_text() == before


def test_cell_edited_outside_the_exercises_is_reported_and_kept(course_dirs, lab_save):
    solutions, notebooks = course_dirs
    course.build(solutions=solutions, notebooks=notebooks)
    path = notebooks / "01_demo.ipynb"
    saved = lab_save(path, type_answer(2, "Recap, with my notes"))
    report = course.check(solutions, notebooks)[0]
    assert not report.ok
    assert 'cell 3 (markdown, "Recap") is outside the exercises and was edited here' in report.detail
    # the course changes elsewhere: build cannot place the note, so it refuses and writes nothing
    write_solution(solutions, intro="Intro, revised")
    report = course.build(solutions=solutions, notebooks=notebooks)[0]
    assert (report.state, report.ok) == ("refused", False)
    assert 'cell 3 ("Recap, with my notes") is outside the exercises and was edited' in report.detail
    assert "FORCE=1" in report.detail and path.read_text() == saved
    # --force backs the notebook up first, then writes the new handout
    report = course.build(force=True, solutions=solutions, notebooks=notebooks)[0]
    assert report.state == "regenerated" and "not carried: cell 3" in report.detail
    assert nbformat.read(path, 4).cells[0].source == "Intro, revised"
    (backup,) = (notebooks / course.BACKUPS).iterdir()
    assert backup.read_text() == saved and backup.name.startswith("01_demo-")


def test_added_cell_and_unreadable_notebook_are_never_overwritten_without_force(course_dirs, lab_save):
    solutions, notebooks = course_dirs
    course.build(solutions=solutions, notebooks=notebooks)
    path = notebooks / "01_demo.ipynb"
    lab_save(path, lambda cells: cells.insert(2, nbformat.v4.new_code_cell("scratch = 1")))
    report = course.check(solutions, notebooks)[0]
    assert "4 cells, the handout has 3: cells added or removed, the first at cell 3" in report.detail
    write_solution(solutions, intro="Intro, revised")
    report = course.build(solutions=solutions, notebooks=notebooks)[0]
    assert report.state == "refused" and 'cell 3 ("scratch = 1") was added' in report.detail
    path.write_text(path.read_text()[:-40])  # a truncated save
    assert course.check(solutions, notebooks)[0].state == "unreadable"
    report = course.build(solutions=solutions, notebooks=notebooks)[0]
    assert report.state == "refused" and "not valid JSON (line" in report.detail
    damaged = path.read_text()
    course.build(force=True, solutions=solutions, notebooks=notebooks)
    (backup,) = (notebooks / course.BACKUPS).iterdir()
    assert backup.read_text() == damaged and [r.ok for r in course.check(solutions, notebooks)] == [True]


def test_handout_from_before_the_record_is_regenerated_but_a_saved_one_is_not_guessed(course_dirs, lab_save):
    """Notebooks written before `gpt2lab.handout` existed: untouched by an editor, they are the generator's own."""
    solutions, notebooks = course_dirs
    course.build(solutions=solutions, notebooks=notebooks)
    path = notebooks / "01_demo.ipynb"
    nb = nbformat.read(path, 4)
    del nb.metadata["gpt2lab"]
    path.write_text(course.render(nb))  # what the earlier generator wrote
    write_solution(solutions, intro="Intro, revised")
    assert "differs: solutions/ changed it" in course.check(solutions, notebooks)[0].detail
    assert states(course.build(solutions=solutions, notebooks=notebooks)) == [("01_demo.ipynb", "regenerated")]
    assert not (notebooks / course.BACKUPS).exists()  # nothing of a student's, so no backup
    # the same, but opened and saved in JupyterLab: a changed cell may be the student's, so build refuses
    path.write_text(course.render(nb))
    lab_save(path)
    write_solution(solutions, intro="Intro, revised twice")
    report = course.check(solutions, notebooks)[0]
    assert "differs (edited here, or solutions/ changed it)" in report.detail
    assert course.build(solutions=solutions, notebooks=notebooks)[0].state == "refused"


def test_exercise_changed_after_it_was_answered_is_stale_and_the_answer_kept(course_dirs, lab_save):
    solutions, notebooks = course_dirs
    course.build(solutions=solutions, notebooks=notebooks)
    path = notebooks / "01_demo.ipynb"
    lab_save(path, type_answer(1, ANSWER))
    write_solution(solutions, cells=[CELL.replace("docs stay", "docs reworded")])
    assert "solutions/ changed this exercise since you answered it" in course.check(solutions, notebooks)[0].detail
    assert course.build(solutions=solutions, notebooks=notebooks)[0].detail.startswith("1 answer carried over")
    assert nbformat.read(path, 4).cells[1].source == ANSWER
    assert [(r.state, r.detail) for r in course.check(solutions, notebooks)] == [
        ("in step", "holds your answers to 1 exercise")]


def test_answer_survives_in_a_real_course_notebook(tmp_path, lab_save):
    """The same on a copy of notebook 00: answer both exercises, reword the solution's first cell, rebuild."""
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    shutil.copy(course.SOLUTIONS / "00_welcome.ipynb", solutions)
    course.build(solutions=solutions, notebooks=notebooks)
    path = notebooks / "00_welcome.ipynb"
    exercises = course.exercise_cells(nbformat.read(path, 4))
    assert len(exercises) == 2
    answers = {i: nbformat.read(path, 4).cells[i].source.replace("raise NotImplementedError()", f"return {i}")
               for i in exercises}

    def edit(cells):
        for i, source in answers.items():
            type_answer(i, source)(cells)
    lab_save(path, edit)
    assert course.check(solutions, notebooks)[0].detail == "holds your answers to 2 exercises"
    nb = nbformat.read(solutions / "00_welcome.ipynb", 4)
    nb.cells[0].source += "\n\nA sentence the instructor added."
    nbformat.write(nb, solutions / "00_welcome.ipynb")
    assert course.check(solutions, notebooks)[0].state == "out of date"
    assert course.build(solutions=solutions, notebooks=notebooks)[0].state == "regenerated"
    student = nbformat.read(path, 4)
    assert {i: student.cells[i].source for i in exercises} == answers
    assert student.cells[0].source.endswith("A sentence the instructor added.")


# ------------------------------------------------------------------------------------------ the repository


def test_repository_notebooks_are_in_step():
    """The same check `make test` runs: notebooks/ must be regenerated (`make student`) after editing solutions/."""
    bad = [str(r) for r in course.check() if not r.ok]
    assert not bad, "; ".join(bad)
    names = [p.name for p in course.solution_notebooks()]
    assert names and names[0] == "00_welcome.ipynb"


def test_every_exercise_in_the_generated_notebooks_is_stubbed():
    for path in course.solution_notebooks():
        solution = nbformat.read(path, as_version=4)
        student = course.student_version(solution, path.name)
        assert len(solution.cells) == len(student.cells)
        exercises = course.exercise_cells(student)
        assert exercises, f"{path.name} has no exercise"
        for index, (sol, stu) in enumerate(zip(solution.cells, student.cells)):
            assert (course.BEGIN in sol.source) == (index in exercises)
            if index in exercises:
                assert "raise NotImplementedError()" in stu.source or "YOUR ANSWER HERE" in stu.source
            assert course.BEGIN not in stu.source and course.END not in stu.source
            if stu.cell_type == "code":
                assert stu.outputs == []
