"""The experiments of the course's finale: the method grid on both tasks, several seeds, reports and statistics.

Used in notebook 09 (experiments). `methods` (what a method is, the optimizer registry, default hyper-parameters),
`grid` (grid files), `runner` (run_one / run_grid: skip finished runs, resume interrupted ones), `report` (tables,
significance, plots) and the command line `python -m gpt2lab.experiments run|report`.
"""

from .grid import Grid, GridError, grid_from_dict, load_grid
from .methods import OPTIMIZERS, SETTINGS, Method, MethodError, parse_method, register_optimizer, resolve_settings
from .runner import run_grid, run_one

__all__ = ["OPTIMIZERS", "SETTINGS", "Grid", "GridError", "Method", "MethodError", "grid_from_dict", "load_grid",
           "parse_method", "register_optimizer", "report", "resolve_settings", "run_grid", "run_one"]


def __getattr__(name):
    # `from gpt2lab.experiments import report` / `experiments.report`: report.py (scipy, matplotlib) loads on first use
    if name == "report":
        import importlib

        return importlib.import_module(".report", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
