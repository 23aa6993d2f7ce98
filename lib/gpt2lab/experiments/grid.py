"""Experiment grids: which tasks, methods, seeds, at which size, from which weights, with which settings.

Used in notebook 09 (experiments), §1 and §5. A grid is a small TOML (or JSON) file:

    name = "my-grid"
    tasks = ["sonnet", "paraphrase"]
    methods = ["full+adamw", "lora+soap", "full+adamw+smart"]
    seeds = [0, 1, 2]
    size = "full"            # "quick" (tiny sizes) or "full" (the notebooks' real-mode sizes)
    weights = "gpt2"         # a hub name or folder, "random" (gpt2-shaped random weights) or "tiny" (quick mode)

    [settings]               # every run
    batch_size = 16
    [task.sonnet]            # the runs of one task
    epochs = 5
    [method."lora+soap"]     # the runs of one method (any spelling parse_method accepts)
    lr = 1e-3

Later sections win: [settings] < [task.<name>] < [method."<name>"] < the command line. The keys a section may set
are `methods.SETTINGS`. An unknown or ill-typed key is refused in one line naming the file and the key.
Built-in grids ("quick", "default") live in grids/ next to this module; "auto" is "default" on a CUDA GPU and
"quick" otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data import OneLineError
from .methods import SETTINGS, Method, MethodError, check_setting, parse_method

GRIDS_DIR = Path(__file__).resolve().parent / "grids"
BUILTIN = ("quick", "default")
TASKS = ("sonnet", "paraphrase")
TASK_ALIASES = {"sonnets": "sonnet", "quora": "paraphrase", "paraphrases": "paraphrase"}
SIZES = ("quick", "full")
TOP_KEYS = ("name", "description", "tasks", "methods", "seeds", "size", "weights", "settings", "task", "method")


class GridError(OneLineError, ValueError):
    """A grid file that cannot be used: the message names the file and the key, and lists the known keys."""


@dataclass
class Grid:
    """A parsed grid (notebook 09, §1): build it with `load_grid` or `grid_from_dict`.

    weights None means the size's default ("tiny" for quick, the weights setting, e.g. "gpt2", for full).
    task_settings maps a task name, method_settings a canonical method name, to its overrides.
    """

    name: str = "custom"
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    methods: list[Method] = field(default_factory=lambda: [parse_method("full+adamw")])
    seeds: list[int] = field(default_factory=lambda: [0])
    size: str = "quick"
    weights: str | None = None
    settings: dict = field(default_factory=dict)
    task_settings: dict = field(default_factory=dict)
    method_settings: dict = field(default_factory=dict)
    source: str = "<built in python>"
    description: str = ""

    def layers(self, task: str, method: Method) -> list[dict]:
        """The override dicts of one run, lowest first: [settings], [task.<task>], [method."<method>"]."""
        return [self.settings, self.task_settings.get(task, {}), self.method_settings.get(method.name, {})]

    def runs(self) -> list[tuple[str, Method, int]]:
        """(task, method, seed) of every run, task-major (so each task's data is loaded once)."""
        return [(t, m, s) for t in self.tasks for m in self.methods for s in self.seeds]


def task_name(name: str, where: str = "task") -> str:
    """'sonnet' / 'paraphrase' (aliases 'sonnets', 'quora'), or a one-line error."""
    key = TASK_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in TASKS:
        raise GridError(f"{where}: unknown task {name!r}; known: {', '.join(TASKS)}")
    return key


def _read(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise GridError(f"grid file {path}: not valid JSON ({err})") from None
    try:
        import tomllib
    except ImportError:  # python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise GridError(f"grid file {path}: reading TOML needs python >= 3.11 (or `pip install tomli`); "
                            "or write the grid as JSON") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise GridError(f"grid file {path}: not valid TOML ({err})") from None


def builtin_path(name: str) -> Path:
    return GRIDS_DIR / f"{name}.toml"


def load_grid(path_or_name, cuda: bool | None = None, say=print) -> Grid:
    """A grid from a file (TOML, or JSON by its suffix) or a built-in name: "quick", "default", or "auto"
    (default on a CUDA GPU, else quick, said in one line through `say`)."""
    text = str(path_or_name)
    if text == "auto":
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        text = "default" if cuda else "quick"
        if not cuda and say is not None:
            say("no CUDA GPU: running the quick grid (tiny random model, a few examples and steps; the numbers "
                "only show that everything runs)")
    path = builtin_path(text) if text in BUILTIN else Path(text).expanduser()
    if not path.is_file():
        raise GridError(f"no grid file {path}: give a TOML or JSON file, or one of quick, default, auto")
    data = _read(path)
    grid = grid_from_dict(data, source=str(path) if text not in BUILTIN else f"built-in grid {text!r}")
    if text in BUILTIN and "name" not in data:
        grid.name = text
    return grid


def _section(values, where: str) -> dict:
    if not isinstance(values, dict):
        raise GridError(f"{where} must be a table of settings (known keys: {', '.join(SETTINGS)}), not {values!r}")
    out = {}
    for key, value in values.items():
        try:
            out[key] = check_setting(key, value, where)
        except MethodError as err:
            raise GridError(str(err)) from None
    return out


def _list(d: dict, key: str, kind, where: str) -> list:
    value = d[key]
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                          for v in value):
        raise GridError(f"{where}: {key} must be a non-empty list of {kind.__name__}s, not {value!r}")
    return value


def grid_from_dict(d: dict, source: str = "<dict>") -> Grid:
    """A Grid from the parsed contents of a grid file (see the module docstring); one-line errors name `source`."""
    where = f"grid file {source}" if not source.startswith(("built-in", "<")) else source
    if not isinstance(d, dict):
        raise GridError(f"{where}: a grid is a table of keys ({', '.join(TOP_KEYS)})")
    unknown = [k for k in d if k not in TOP_KEYS]
    if unknown:
        raise GridError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(TOP_KEYS)}")
    grid = Grid(source=source)
    if "name" in d:
        if not isinstance(d["name"], str) or not d["name"]:
            raise GridError(f"{where}: name must be a string, not {d['name']!r}")
        grid.name = d["name"]
    elif not source.startswith(("built-in", "<")):
        grid.name = Path(source).stem
    grid.description = str(d.get("description", ""))
    if "tasks" in d:
        grid.tasks = list(dict.fromkeys(task_name(t, where) for t in _list(d, "tasks", str, where)))
    if "methods" in d:
        methods = []
        for text in _list(d, "methods", str, where):
            try:
                methods.append(parse_method(text))
            except MethodError as err:
                raise GridError(f"{where}: methods: {err}") from None
        grid.methods = list(dict.fromkeys(methods))
    if "seeds" in d:
        grid.seeds = list(dict.fromkeys(_list(d, "seeds", int, where)))
    if "size" in d:
        if d["size"] not in SIZES:
            raise GridError(f"{where}: size must be one of {', '.join(SIZES)}, not {d['size']!r}")
        grid.size = d["size"]
    if "weights" in d:
        if not isinstance(d["weights"], str) or not d["weights"]:
            raise GridError(f"{where}: weights must be a string (a hub name, a folder, 'random' or 'tiny'), "
                            f"not {d['weights']!r}")
        grid.weights = d["weights"]
    if "settings" in d:
        grid.settings = _section(d["settings"], f"{where} [settings]")
    for name, values in _table(d, "task", where).items():
        task = task_name(name, f"{where} [task.{name}]")
        if task not in grid.tasks:
            raise GridError(f"{where}: [task.{name}] names no task of this grid (tasks = {grid.tasks})")
        grid.task_settings[task] = _section(values, f"{where} [task.{name}]")
    for name, values in _table(d, "method", where).items():
        label = f'{where} [method."{name}"]'
        try:
            method = parse_method(name)
        except MethodError as err:
            raise GridError(f"{label}: {err}") from None
        if method not in grid.methods:
            raise GridError(f"{label} names no method of this grid (methods = {[m.name for m in grid.methods]})")
        grid.method_settings[method.name] = _section(values, label)
    return grid


def _table(d: dict, key: str, where: str) -> dict:
    value = d.get(key, {})
    if not isinstance(value, dict):
        raise GridError(f"{where}: [{key}.<name>] must hold tables of settings, not {value!r}")
    return value
