"""Grading: run submitted student notebooks, collect every check's ✓/✗ line, and report what cannot be trusted.

    python -m gpt2lab.course grade submissions/              every student folder in submissions/
    python -m gpt2lab.course grade alice/03_adamw.ipynb      one notebook
    make grade                                               your own notebooks/: where you stand
    (options: --out DIR for grades.csv and grades.md, default build/grades; --timeout S per notebook, default 300;
     --solutions DIR, default solutions/ of this repo)

Who the student is: a folder of notebooks is one student, named after the folder (`grade submissions/alice`); a
folder of such folders is one student per folder (`grade submissions/` with submissions/alice/03_adamw.ipynb gives
"alice"); a single notebook belongs to the folder it is in. A notebook is graded against the handout of the same
name generated from solutions/ (`course.student_version`); a renamed one against the handout sharing most cells; one
matching none is reported, except a student's own (Untitled.ipynb, a -Copy1), which is noted and left alone.

How: each notebook is executed with nbclient from its own folder, in quick mode (GPT2LAB_QUICK=1, MPLBACKEND=Agg,
GPT2LAB_RESULTS in a temporary folder), on a copy in memory: the submitted file is only read, never written. Every
check cell of the handout (a `# NBVAL_CHECK_OUTPUT` cell calling `check.*`) gives one row: student, notebook,
exercise (the function the exercise cell before it defines, e.g. `causal_mask`; the check's own name for a check of
the library copy, e.g. `padded_batch`; the heading when the exercise defines nothing), cell, result and message (the
✓/✗ line). Results: pass, fail, not implemented, error (the check cell raised, e.g. NameError when the exercise
cell did not run), not run (the notebook stopped before it), tampered, outdated.

Reported, never silently passed (a "(notebook)" row, or the check's own row; the exit status is then non-zero):
- crashed: a cell other than an exercise or its check raised, or the kernel died;
- timed out: the notebook ran past its time limit (the cells after it are "not run");
- tampered: a check cell removed or edited (its hash differs from the handout's: the record kept in the notebook's
  metadata, `gpt2lab.handout`, and the handout solutions/ generates now); a check cell that returned no genuine
  check result, or shows a line other than the one its check returned, or a `check` that is not the check module;
  a library object changed at run time (`check.causal_mask = ...`, `gpt2lab.checks.core.ok = ...`,
  `torch.allclose = ...`): after the last cell, every function, class and constant of the imported gpt2lab modules
  (and of torch, torch.nn.functional, torch.Tensor, math and builtins) is fingerprinted inside the kernel (code,
  defaults, closures; past the wrappers torch itself adds at run time) and compared with a fresh import in a
  separate process. Passes are then not trusted.
- outdated: the notebook was handed out before solutions/ changed a check (`make student` updates it, keeping the
  answers).
This catches a student patching the checks by accident or on purpose from notebook code; it is no sandbox (code that
rewrites the library files on disk, or the grader's own probes, is beyond it).

Exit status: 0 when every check passes and nothing was reported, 1 otherwise, 2 when a path cannot be used.
"""

from __future__ import annotations

import argparse
import ast
import csv
import difflib
import inspect
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .. import course

OUT = course.REPO_ROOT / "build" / "grades"
TIMEOUT = 300  # seconds per notebook; quick mode runs each in well under a minute
PROBE_TIMEOUT = 120  # seconds for one of the grader's own probes in the kernel (not counted in the notebook's)
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
NOTEBOOK = "(notebook)"  # the exercise column of a row about the whole notebook
PASS, FAIL, TODO, ERROR, NOT_RUN, NOTE = "pass", "fail", "not implemented", "error", "not run", "note"
CRASHED, TIMED_OUT, TAMPERED, OUTDATED, UNREADABLE = "crashed", "timed out", "tampered", "outdated", "unreadable"
UNKNOWN = "not a course notebook"
# Fingerprinted besides the gpt2lab modules: what the checks compute with. "module:Class" also walks the class.
EXTRA_LIBRARY = ["torch", "torch.nn.functional", "torch:Tensor", "torch._C:TensorBase", "math", "builtins"]
COLUMNS = ["student", "notebook", "exercise", "cell", "result", "message"]


class GradeError(course.CourseError):
    """A path given to the grader cannot be used; the one-line message says which and why."""


@dataclass
class Row:
    """One line of grades.csv: a check's result, or a problem with the whole notebook (exercise "(notebook)")."""

    student: str
    notebook: str
    exercise: str
    cell: int | None  # the check cell's number (from 1) in the submitted notebook; None where it has none
    result: str
    message: str

    def as_list(self) -> list[str]:
        return [self.student, self.notebook, self.exercise, "" if self.cell is None else str(self.cell), self.result,
                self.message]  # fmt: skip


@dataclass
class Submission:
    student: str
    path: Path


# ------------------------------------------------------------------------------------------ what is submitted


def find_submissions(paths: list[Path]) -> list[Submission]:
    """The notebooks under `paths` with their student (see the module docstring); GradeError for a bad path."""
    found = []
    for path in paths:
        if path.is_file() and path.suffix == ".ipynb":
            found.append(Submission(path.resolve().parent.name, path))
        elif path.is_dir():
            direct = sorted(path.glob("*.ipynb"))
            found += [Submission(path.resolve().name, p) for p in direct]
            for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                found += [Submission(folder.name, p) for p in sorted(folder.glob("*.ipynb"))]
        else:
            raise GradeError(f"{path}: no such notebook or folder (give submitted .ipynb files or folders of them)")
    if not found:
        where = ", ".join(map(str, paths))
        raise GradeError(f"no notebooks in {where} (give a folder of .ipynb files, or a folder of such folders)")
    return found


def is_check_cell(cell) -> bool:
    return cell.cell_type == "code" and course.normalise(cell.source).startswith(CHECK_MARK) and "check." in cell.source


def _first_line(cell) -> str:
    """A cell for messages: its check call (a check cell) or its first line, shortened."""
    lines = [ln.strip() for ln in cell.source.split("\n") if ln.strip() and ln.strip() != CHECK_MARK]
    calls = [ln for ln in lines if ln.startswith("check.")] if is_check_cell(cell) else []
    line = (calls or lines or [""])[-1 if calls else 0]
    return f"`{line[:60]}{'...' if len(line) > 60 else ''}`"


def _check_call(source: str) -> tuple[str, list[str]]:
    """(name of the check called, names passed to it) for the last `check.X(...)` of a handout's check cell."""
    call = None
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == "check":  # fmt: skip
            call = node if call is None or node.lineno >= call.lineno else call
    if call is None:
        return "check", []
    return call.func.attr, [a.id for a in call.args if isinstance(a, ast.Name)]


def _defines(source: str) -> list[str]:
    """Names of the functions and classes a cell defines at top level (none when it does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def _heading(handout, index: int) -> str:
    for cell in reversed(handout.cells[:index]):
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("#"):
            return cell.source.lstrip().split("\n")[0].lstrip("#").strip()
    return f"cell {index + 1}"


@dataclass
class CheckSpec:
    """A check cell of the handout and the exercise it grades."""

    index: int  # in the handout
    hash: str
    name: str  # the check called, e.g. causal_mask
    exercise: str  # the row's exercise label
    exercise_index: int | None  # the handout's exercise cell it grades, None for a check of the library copy


def check_specs(handout: nbformat.NotebookNode) -> list[CheckSpec]:
    """Every check cell of a handout, each mapped to the exercise cell before it that defines what it is given (or,
    when it is given none, to the nearest exercise no other check claimed; else it checks the library copy)."""
    exercises = set(course.exercise_cells(handout))
    specs, claimed = [], set()
    for index, cell in enumerate(handout.cells):
        if not is_check_cell(cell):
            continue
        name, args = _check_call(cell.source)
        label, owner = name, None
        for e in sorted((e for e in exercises if e < index), reverse=True):
            defined = _defines(handout.cells[e].source)
            hit = [a for a in args if a in defined]
            if hit:
                label, owner = hit[0], e
                break
        if owner is None:
            nearest = max((e for e in exercises if e < index), default=None)
            between = handout.cells[nearest:index] if nearest is not None else []
            if nearest is not None and nearest not in claimed and not any(is_check_cell(c) for c in between):
                owner = nearest
                defined = _defines(handout.cells[owner].source)
                label = defined[0] if defined else _heading(handout, owner)
        if owner is not None:
            claimed.add(owner)
        specs.append(CheckSpec(index, course.cell_hash(cell), name, label, owner))
    return specs


def _align(submitted: list[str], handout: list[str]) -> dict[int, int]:
    """{submitted cell: handout cell} for cells kept (equal) or edited in place (a replaced run, paired in order)."""
    pairs = {}
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, handout, submitted, autojunk=False).get_opcodes():
        if tag in ("equal", "replace"):
            for d in range(min(i2 - i1, j2 - j1)):
                pairs[j1 + d] = i1 + d
    return pairs


def _handout_for(path: Path, nb, handouts: dict) -> tuple[str | None, str]:
    """(the handout's name, how it was chosen): by file name, else the one sharing most cells (at least half)."""
    if path.name in handouts:
        return path.name, ""
    mine = {course.cell_hash(c) for c in nb.cells}
    scores = {name: sum(course.cell_hash(c) in mine for c in h.cells) / len(h.cells) for name, h in handouts.items()}
    best = max(scores, key=scores.get, default=None)
    if best is not None and scores[best] >= 0.5:
        return best, f"graded as {best} (by its cells)"
    return None, ""


# ------------------------------------------------------------------------------------------ probes in the kernel
# The functions here are shipped to the kernel as source (never imported from its gpt2lab, which the student's code
# could have changed) and run there in a namespace of their own; library_fingerprints also runs in a fresh process.


def library_fingerprints(names, fresh=True):
    """{"module:attr" or "module:Class.attr": short hash of what it is} for the modules ("module:Class": a class)
    named. fresh: import what is missing (a clean process); else mark a module absent from sys.modules."""
    import hashlib
    import importlib
    import sys
    import types

    scalars = (type(None), bool, int, float, complex, str, bytes)

    def unwrapped(fn):
        """Past the wrappers torch puts on functions (an optimizer's step profiling hook and dynamo's disable on
        torch.manual_seed are added at run time): a student's function inside one is still theirs."""
        torch_file = getattr(sys.modules.get("torch"), "__file__", None)
        torch_dir = torch_file.rsplit("/", 1)[0] + "/" if isinstance(torch_file, str) else None
        while isinstance(getattr(fn, "__wrapped__", None), types.FunctionType) and torch_dir and \
                fn.__code__.co_filename.startswith(torch_dir):  # fmt: skip
            fn = fn.__wrapped__
        return fn

    def code_fp(code):
        consts = tuple(code_fp(c) if isinstance(c, types.CodeType) else value_fp(c, 0) for c in code.co_consts)
        return repr((code.co_name, code.co_filename, code.co_firstlineno, code.co_code, code.co_names,
                     code.co_varnames, code.co_freevars, consts))

    def value_fp(obj, depth):
        if isinstance(obj, scalars):
            return f"{type(obj).__name__}:{obj!r}"
        if isinstance(obj, tuple) and len(obj) <= 64:
            return "tuple:(" + ",".join(value_fp(o, depth) for o in obj) + ")"
        if isinstance(obj, frozenset) and len(obj) <= 64:
            return "frozenset:" + ",".join(sorted(value_fp(o, depth) for o in obj))
        if isinstance(obj, types.ModuleType):
            listed = sys.modules.get(obj.__name__) is obj
            return f"module:{obj.__name__}{'' if listed else ' (not the imported one)'}"
        if isinstance(obj, (staticmethod, classmethod)):
            return f"{type(obj).__name__}:" + value_fp(obj.__func__, depth)
        if isinstance(obj, property):
            return "property:" + ",".join(value_fp(f, depth) for f in (obj.fget, obj.fset, obj.fdel))
        if isinstance(obj, types.FunctionType):
            obj = unwrapped(obj)
            parts = [code_fp(obj.__code__), value_fp(obj.__defaults__, depth),
                     repr(sorted((k, value_fp(v, depth)) for k, v in (obj.__kwdefaults__ or {}).items()))]
            if depth < 3:  # a decorated check keeps the student-facing function in its closure
                for cell in obj.__closure__ or ():
                    try:
                        parts.append(value_fp(cell.cell_contents, depth + 1))
                    except ValueError:  # an empty cell
                        parts.append("empty")
            return "function:" + "|".join(parts)
        if isinstance(obj, types.MethodType):
            return "method:" + value_fp(obj.__func__, depth) + " of " + type(obj.__self__).__qualname__
        if isinstance(obj, type):
            return f"class:{obj.__module__}.{obj.__qualname__}"
        if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            owner = getattr(obj, "__self__", None)
            owner = owner.__name__ if isinstance(owner, types.ModuleType) else type(owner).__qualname__
            return f"builtin:{owner}.{getattr(obj, '__qualname__', obj.__name__)}"
        name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
        return f"object:{type(obj).__module__}.{type(obj).__qualname__}" + (f":{name}" if isinstance(name, str) else "")

    def digest(text):
        return hashlib.sha1(text.encode("utf-8", "backslashreplace")).hexdigest()[:12]

    skip = {"__builtins__", "__loader__", "__spec__", "__file__", "__cached__", "__doc__", "__path__", "__dict__",
            "__weakref__", "__annotations__", "__module__", "__firstlineno__", "__static_attributes__",
            "__slotnames__"}  # copyreg caches __slotnames__ on a class the first time one of its objects is copied
    out = {}

    def walk_class(prefix, cls):
        for attr, value in list(vars(cls).items()):
            if attr not in skip:
                out[f"{prefix}.{attr}"] = digest(value_fp(value, 0))

    if fresh:  # import everything first: importing a submodule adds an attribute to its package
        for name in names:
            importlib.import_module(name.split(":")[0])
    for name in names:
        module_name, _, cls_name = name.partition(":")
        module = sys.modules.get(module_name)
        if module is None:
            out[f"{module_name}:"] = "not imported"
            continue
        if cls_name:
            walk_class(name, getattr(module, cls_name))
            continue
        for attr, value in list(vars(module).items()):
            if attr in skip:
                continue
            out[f"{name}:{attr}"] = digest(value_fp(value, 0))
            if isinstance(value, type) and value.__module__ == name:  # a class defined here: its attributes too
                walk_class(f"{name}:{attr}", value)
    return out


def check_probe(user_ns, count):
    """What the check cell run as execution `count` returned (from Out, not from what it displayed) and what
    `check` is."""
    import sys
    import types

    core = sys.modules.get("gpt2lab.checks.core")
    result_type = getattr(core, "CheckResult", None)
    out = user_ns.get("Out", {}).get(count)
    module = user_ns.get("check")
    name = getattr(module, "__name__", None)
    genuine = isinstance(module, types.ModuleType) and isinstance(name, str) and sys.modules.get(name) is module
    report = {"check": name if genuine else repr(module)[:80], "genuine": genuine, "type": type(out).__name__,
              "result": None}
    if result_type is not None and type(out) is result_type:
        report["result"] = [bool(out.passed), str(out.name), str(out.message)]
    return report


def _in_kernel(client, function, *args) -> object:
    """Call `function` (shipped as source) with `args` (Python expressions) inside the kernel, silently (no history,
    no output, nothing left in the student's namespace); return its result, through JSON. RuntimeError when it
    cannot."""
    client.timeout = PROBE_TIMEOUT  # ours, not the student's time
    source = _PROBES[function.__name__]
    expression = (f"(lambda ns: (exec({source!r}, ns), __import__('json').dumps(ns[{function.__name__!r}]"
                  f"({', '.join(args)})))[1])({{}})")
    msg_id = client.kc.execute("", silent=True, store_history=False, user_expressions={"r": expression})
    reply = client.wait_for_reply(msg_id)
    value = (reply or {}).get("content", {}).get("user_expressions", {}).get("r", {})
    if value.get("status") != "ok":
        raise RuntimeError(f"{value.get('ename', 'no reply')}: {value.get('evalue', '')}".strip())
    return json.loads(ast.literal_eval(value["data"]["text/plain"]))


_FRESH: dict[tuple, dict] = {}  # fresh fingerprints by (python, names, library files' age): one import per module set


def fresh_fingerprints(names: list[str], python: str, env: dict, cwd: Path) -> dict:
    """library_fingerprints(names) in a fresh process (kept until the library's files change, as while editing it)."""
    library = Path(__file__).parents[1]  # lib/gpt2lab/
    newest = max(p.stat().st_mtime_ns for p in library.rglob("*.py"))
    key = (python, tuple(names), newest)
    if key not in _FRESH:
        code = (_PROBES["library_fingerprints"] + "\nimport json, sys\n"
                "print(json.dumps(library_fingerprints(json.loads(sys.argv[1]))))")
        done = subprocess.run([python, "-c", code, json.dumps(names)], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=300)
        if done.returncode:
            last = (done.stderr.strip().split("\n") or ["?"])[-1]
            raise RuntimeError(f"a fresh import of the library failed ({last})")
        _FRESH[key] = json.loads(done.stdout)
    return _FRESH[key]


def library_changes(kernel: dict, fresh: dict) -> list[str]:
    """What differs between the kernel's fingerprints and a fresh import's, e.g. "gpt2lab.checks.core.ok replaced"."""
    removed = sorted(key[:-1] for key, value in kernel.items() if value == "not imported" and key.endswith(":"))
    changes = [f"{module} removed from sys.modules" for module in removed]
    for key, value in fresh.items():
        if key.partition(":")[0] in removed:
            continue
        if key not in kernel:
            changes.append(f"{key.replace(':', '.')} deleted")
        elif kernel[key] != value:
            changes.append(f"{key.replace(':', '.')} replaced")
    for key in sorted(kernel.keys() - fresh.keys()):
        module, _, attr = key.partition(":")
        if attr and ("." in attr or module.startswith("gpt2lab")):  # added to a class, or to a module of ours
            changes.append(f"{key.replace(':', '.')} added")
    return changes


# ------------------------------------------------------------------------------------------ running one notebook


@dataclass
class Run:
    """What executing a submitted notebook gave, besides the outputs written into the in-memory copy."""

    stopped: str | None = None  # TIMED_OUT or CRASHED (kernel died)
    stop_cell: int | None = None
    probes: dict = field(default_factory=dict)  # check cell index -> check_probe's report, or an error string
    changes: list[str] | None = None  # library changes; None when not probed
    probe_error: str | None = None


def kernel_env(results: Path) -> dict:
    env = dict(os.environ, GPT2LAB_QUICK="1", MPLBACKEND="Agg", GPT2LAB_RESULTS=str(results))
    env["PYTHONHASHSEED"] = "0"  # set order inside the library's constants: the same in the kernel and a fresh import
    return env


def execute(nb, cwd: Path, timeout: float, check_cells: set[int], modules: list[str]) -> Run:
    """Run `nb` (a copy: its outputs are filled in) from `cwd` within `timeout` seconds of execution; probe every
    check cell after it runs, and the library after the last cell."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    run = Run()
    with tempfile.TemporaryDirectory(prefix="gpt2lab-grade-") as results:
        env = kernel_env(Path(results))
        client = NotebookClient(nb, timeout=math.ceil(timeout), kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": str(cwd)}})
        with client.setup_kernel(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
            deadline = time.monotonic() + timeout
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    run.stopped, run.stop_cell = TIMED_OUT, index
                    break
                client.timeout = max(1, math.ceil(remaining))
                try:
                    client.execute_cell(cell, index)
                except CellTimeoutError:
                    run.stopped, run.stop_cell = TIMED_OUT, index
                    break
                except DeadKernelError:
                    run.stopped, run.stop_cell = CRASHED, index
                    break
                if index in check_cells and cell.get("execution_count"):
                    try:
                        run.probes[index] = _in_kernel(client, check_probe, "get_ipython().user_ns",
                                                       str(cell.execution_count))
                    except Exception as err:  # the student's code broke the kernel's evaluation
                        run.probes[index] = f"{type(err).__name__}: {err}"
            if run.stopped is None:
                try:
                    names = sorted(set(modules) | set(_in_kernel(client, _loaded_gpt2lab))) + EXTRA_LIBRARY
                    kernel = _in_kernel(client, library_fingerprints, repr(names), "False")
                    python = _in_kernel(client, _python)
                    run.changes = library_changes(kernel, fresh_fingerprints(names, python, env, cwd))
                except Exception as err:
                    run.probe_error = f"{type(err).__name__}: {err}"
            else:
                client.shutdown_kernel = "immediate"  # a kernel still busy past its limit never answers a request
    return run


def _loaded_gpt2lab():
    import sys

    return sorted(n for n in sys.modules if n == "gpt2lab" or n.startswith("gpt2lab."))


def _python():
    import sys

    return sys.executable


# read once, at import: a file edited while grading runs must not ship other code than what runs here
_PROBES = {fn.__name__: inspect.getsource(fn) for fn in (library_fingerprints, check_probe, _loaded_gpt2lab, _python)}


# ------------------------------------------------------------------------------------------ grading one notebook


def _text(cell) -> str:
    """A check cell's displayed result (its execute_result; printed text when there is none)."""
    outputs = cell.get("outputs", [])
    shown = [o.get("data", {}).get("text/plain", "") for o in outputs if o.output_type == "execute_result"]
    if not shown:
        shown = [o.get("text", "") for o in outputs if o.output_type == "stream"]
    return "".join(shown).strip()


def _error(cell) -> str | None:
    for o in cell.get("outputs", []):
        if o.output_type == "error":
            return f"{o.ename}: {o.evalue}".strip()
    return None


def _verdict(line: str) -> str:
    if line.startswith("✓"):
        return PASS
    if line.startswith("✗"):
        return TODO if ": not implemented yet" in line.split("\n")[0] else FAIL
    return ERROR


def locate_checks(submitted, handout, specs) -> tuple[dict, dict]:
    """Where each check cell of the handout is in the submission: ({handout index: submitted index} for those found
    unchanged (same hash; in order where possible), {handout index: (result, message, submitted cell or None)} for
    the others: edited, removed, or outdated (the notebook's own record says it was handed out before that check)."""
    mine = [course.cell_hash(c) for c in submitted.cells]
    in_place = {h: s for s, h in _align(mine, [course.cell_hash(c) for c in handout.cells]).items()}
    recorded = course._recorded(submitted)
    record = set(recorded["cells"]) if recorded else None
    found, last = {}, -1
    for spec in specs:
        same = [i for i, h in enumerate(mine) if h == spec.hash and i not in found.values()]
        pick = next((i for i in same if i > last), same[0] if same else None)
        if pick is not None:
            found[spec.index] = last = pick
    missing = {}
    for spec in specs:
        if spec.index in found:
            continue
        edited = in_place.get(spec.index)  # the cell in its place, whatever it holds now
        if edited is None or edited in found.values() or submitted.cells[edited].cell_type != "code":
            edited = next((i for i, c in enumerate(submitted.cells) if i not in found.values() and is_check_cell(c)
                           and f"check.{spec.name}(" in c.source), None)
        first = _first_line(handout.cells[spec.index])
        if record is not None and spec.hash not in record and (edited is None or mine[edited] in record):
            missing[spec.index] = (OUTDATED, f"this check changed in solutions/ after the notebook was handed out "
                                             f"({first}); run `make student` (it keeps the answers)", edited)
        elif edited is not None:
            missing[spec.index] = (TAMPERED, f"check cell {edited + 1} was edited (the handout's is {first}): not "
                                             "graded; restore it", edited)
        else:
            missing[spec.index] = (TAMPERED, f"the check cell {first} was removed: not graded; restore it", None)
    return found, missing


def grade_notebook(sub: Submission, handouts: dict, timeout: float = TIMEOUT) -> list[Row]:
    """The rows for one submitted notebook (the file is read once and never written)."""

    def row(exercise, cell, result, message):
        return Row(sub.student, sub.path.name, exercise, cell, result, message)

    try:
        submitted = course.read_notebook(sub.path)
    except course.CourseError as err:
        return [row(NOTEBOOK, None, UNREADABLE, str(err))]
    handout_name, how = _handout_for(sub.path, submitted, handouts)
    if handout_name is None and course.STUDENT_OWN.match(sub.path.name):
        return [row(NOTEBOOK, None, NOTE, "a notebook of your own (not a handout): not graded")]
    if handout_name is None:
        return [row(NOTEBOOK, None, UNKNOWN, f"no handout in solutions/ matches it (grading takes the notebooks "
                                            f"handed out: {', '.join(handouts)})")]
    handout = handouts[handout_name]
    specs = check_specs(handout)
    found, missing = locate_checks(submitted, handout, specs)
    head = [row(NOTEBOOK, None, NOTE, how)] if how else []
    head += [row(NOTEBOOK, None if cell is None else cell + 1, result, message) for result, message, cell in
             missing.values()]  # fmt: skip
    imported = [f"gpt2lab.checks.{m}" for c in handout.cells if is_check_cell(c) for m in _checks_imported(c.source)]
    modules = sorted({"gpt2lab", "gpt2lab.checks", "gpt2lab.checks.core", *imported})
    nb = nbformat.from_dict(json.loads(json.dumps(submitted)))  # a copy: outputs go here, never to the file
    try:
        run = execute(nb, sub.path.resolve().parent, timeout, set(found.values()), modules)
    except Exception as err:  # the kernel would not start, or nbclient failed: say so, grade nothing
        return head + [row(NOTEBOOK, None, ERROR, f"could not run it: {type(err).__name__}: {err}")]

    exercises = set(course.exercise_cells(handout))
    mine = [course.cell_hash(c) for c in submitted.cells]
    aligned = _align(mine, [course.cell_hash(c) for c in handout.cells])
    head += [row(NOTEBOOK, cell, result, message) for cell, result, message in
             _problems(run, nb, timeout, {s for s, h in aligned.items() if h in exercises}, set(found.values()))]
    rows = []
    for spec in specs:
        if spec.index in missing:
            result, message, cell = missing[spec.index]
            rows.append(row(spec.exercise, None if cell is None else cell + 1, result, message))
        elif run.stopped and found[spec.index] >= run.stop_cell:
            index = found[spec.index]
            rows.append(row(spec.exercise, index + 1, NOT_RUN, f"not run: the notebook stopped in cell "
                                                              f"{run.stop_cell + 1}"))
        else:
            index = found[spec.index]
            exercise = {h: s for s, h in aligned.items()}.get(spec.exercise_index)
            result, message = _check_result(nb.cells[index], run.probes.get(index), imported[:1],
                                            None if exercise is None else nb.cells[exercise], exercise)
            rows.append(row(spec.exercise, index + 1, result, message))
    if run.changes:
        for r in rows:
            if r.result == PASS:
                r.result, r.message = TAMPERED, f"not trusted (the library was changed at run time): {r.message}"
    return head + rows


def _problems(run: Run, nb, timeout: float, exercise_cells: set[int], check_cells: set[int]) -> list[tuple]:
    """(cell number or None, result, message) for what went wrong with the run as a whole."""
    problems = []
    if run.stopped:
        n, where = run.stop_cell + 1, _first_line(nb.cells[run.stop_cell])
        problems.append((n, TIMED_OUT, f"ran past its {timeout:g} s limit in cell {n} ({where}); the cells after it "
                                       "did not run") if run.stopped == TIMED_OUT else
                        (n, CRASHED, f"the kernel died in cell {n} ({where}): out of memory, or the code ended the "
                                     "process"))  # fmt: skip
    for index, cell in enumerate(nb.cells):
        error = _error(cell) if cell.cell_type == "code" else None
        if error and index not in exercise_cells and index not in check_cells:
            problems.append((index + 1, CRASHED, f"cell {index + 1} ({_first_line(cell)}) raised {error}"))
    if run.probe_error:
        problems.append((None, ERROR, f"could not check the library after the run ({run.probe_error})"))
    if run.changes:
        more = f" and {len(run.changes) - 5} more" if len(run.changes) > 5 else ""
        problems.append((None, TAMPERED, f"the library was changed at run time: {', '.join(run.changes[:5])}{more}; "
                                         "its passes are not trusted"))
    return problems


def _checks_imported(source: str) -> list[str]:
    """Check modules a cell imports as `check` (`from gpt2lab.checks import attention as check`)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "gpt2lab.checks"
            for a in n.names if a.asname == "check"]  # fmt: skip


def _check_result(cell, probe, expected: list[str], exercise_cell, exercise: int | None) -> tuple[str, str]:
    """(result, message) of a check cell that ran: its line, cross-checked with what the check really returned."""
    line, error = _text(cell), _error(cell)
    if error:
        message = f"the check cell raised {error}"
        if exercise_cell is not None and _error(exercise_cell):
            message += f" (the exercise cell {exercise + 1} raised {_error(exercise_cell)})"
        return ERROR, message
    if not isinstance(probe, dict):
        return ERROR, f"{line} (could not confirm it in the kernel: {probe})"
    module = expected[0] if expected else "gpt2lab.checks.*"
    if not probe["genuine"] or not probe["check"].startswith("gpt2lab.checks.") or \
            (expected and probe["check"] != module):  # fmt: skip
        return TAMPERED, f"`check` is {probe['check']} here, not the module {module}: not graded"
    if probe["result"] is None:
        return TAMPERED, f"the check cell returned a {probe['type']}, not a check result (it shows {line[:80]!r})"
    passed, name, message = probe["result"]
    real = f"{'✓' if passed else '✗'} {name}: {message}"
    if line != real:
        return TAMPERED, f"the cell shows {line[:80]!r} but its check returned {real[:80]!r}"
    return _verdict(real), real


# ------------------------------------------------------------------------------------------ reports


def grade(paths: list[Path], solutions: Path = course.SOLUTIONS, timeout: float = TIMEOUT,
          progress: bool = True) -> list[Row]:
    """Every row for the notebooks under `paths` (see the module docstring)."""
    submissions = find_submissions(paths)
    handouts = course.handouts(solutions)
    rows = []
    for n, sub in enumerate(submissions, start=1):
        if progress:
            print(f"[{n}/{len(submissions)}] {sub.student} · {sub.path.name}", file=sys.stderr, flush=True)
        rows += grade_notebook(sub, handouts, timeout)
    return rows


def ok(rows: list[Row]) -> bool:
    """True when every check passed and nothing was reported (a "note" row is information only)."""
    return all(r.result in (PASS, NOTE) for r in rows)


def to_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(r.as_list() for r in rows)
    return buffer.getvalue()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: list[Row]) -> str:
    """A summary table (one line per student and notebook), then each notebook's rows."""
    notebooks: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        notebooks.setdefault((r.student, r.notebook), []).append(r)
    lines = ["# Grades", "", "| student | notebook | pass | fail | not implemented | other | reported |",
             "|---|---|---|---|---|---|---|"]
    for (student, notebook), group in notebooks.items():
        checks = [r for r in group if r.exercise != NOTEBOOK]
        count = {k: sum(r.result == k for r in checks) for k in (PASS, FAIL, TODO)}
        other = len(checks) - sum(count.values())
        reported = sorted({r.result for r in group if (r.exercise == NOTEBOOK and r.result != NOTE)
                           or r.result in (TAMPERED, OUTDATED)})
        lines.append(f"| {_cell(student)} | {_cell(notebook)} | {count[PASS]}/{len(checks)} | {count[FAIL]} | "
                     f"{count[TODO]} | {other} | {', '.join(reported) or '-'} |")
    for (student, notebook), group in notebooks.items():
        lines += ["", f"## {_cell(student)} · {_cell(notebook)}", "", "| exercise | cell | result | message |",
                  "|---|---|---|---|"]
        lines += [f"| {_cell(r.exercise)} | {'' if r.cell is None else r.cell} | {r.result} | {_cell(r.message)} |"
                  for r in group]
    total = [r for r in rows if r.exercise != NOTEBOOK]
    passed = sum(r.result == PASS for r in total)
    problems = sum(r.exercise == NOTEBOOK and r.result != NOTE for r in rows)
    lines += ["", f"{passed} of {len(total)} checks pass; {problems} problem{'' if problems == 1 else 's'} reported."]
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="*", type=Path, help="submitted notebooks, folders of them (one student), or "
                        "folders of such folders (one student each); default: notebooks/")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for grades.csv, grades.md (default build/grades)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help=f"seconds per notebook (default {TIMEOUT})")
    parser.add_argument("--solutions", type=Path, default=course.SOLUTIONS, help="default: solutions/ of this repo")


def cli(argv: list[str] | None = None) -> int:
    """`python -m gpt2lab.course grade [PATH...] [--out DIR] [--timeout S] [--solutions DIR]` (`make grade`)."""
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.course grade", description="run submitted notebooks, "
                                     "collect their checks, report crashes, timeouts and tampering (grades.csv, "
                                     "grades.md)")
    add_arguments(parser)
    return main(parser.parse_args(argv))


def main(args) -> int:
    """`python -m gpt2lab.course grade`: grade, write grades.csv and grades.md, print the Markdown."""
    try:
        if args.timeout <= 0:
            raise GradeError(f"--timeout {args.timeout:g}: give a positive number of seconds per notebook, e.g. 300")
        rows = grade(args.paths or [course.NOTEBOOKS], args.solutions, args.timeout)
    except course.CourseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows)
    (args.out / "grades.csv").write_text(to_csv(rows), encoding="utf-8")
    (args.out / "grades.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"wrote {course.shown(args.out / 'grades.csv')} and {course.shown(args.out / 'grades.md')}")
    return 0 if ok(rows) else 1
