"""The first cell of every notebook: seeds, device, quick mode, data directory, versions.

Built in notebook 00 (welcome), §1. `setup()` is called at the top of every notebook; `check_environment()`
prints the [OK]/[FAIL] list of notebook 00.
"""

from __future__ import annotations

import importlib
import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path

QUICK_ENV = "GPT2LAB_QUICK"


def quick_mode() -> bool:
    """True when GPT2LAB_QUICK is set to a true value (the test command sets it): tiny models, few steps."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU) so a notebook rerun gives the same numbers."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(prefer: str | None = None):
    """cuda if present, then Apple's mps, else cpu. `prefer` (or GPT2LAB_DEVICE) overrides."""
    import torch

    prefer = prefer or os.environ.get("GPT2LAB_DEVICE")
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Setup:
    """What `setup()` decided; notebooks read `cfg.device`, `cfg.quick`, `cfg.data_dir`, `cfg.seed`."""

    seed: int
    device: object  # torch.device
    quick: bool
    data_dir: Path

    def status_line(self) -> str:
        import torch
        import transformers

        mode = "quick (tiny models, few steps)" if self.quick else "real"
        from .data import shown_path
        return (
            f"gpt2lab | python {platform.python_version()} | torch {torch.__version__} | "
            f"transformers {transformers.__version__} | device {self.device} | mode {mode} | "
            f"seed {self.seed} | data {shown_path(self.data_dir)}"
        )


def setup(seed: int = 1337, device: str | None = None, verbose: bool = True) -> Setup:
    """Seed everything, pick the device, read quick mode and the data directory; print one status line.

    Built in notebook 00 (welcome), §1; the first code cell of every notebook.
    """
    from .data import data_dir

    seed_everything(seed)
    cfg = Setup(seed=seed, device=pick_device(device), quick=quick_mode(), data_dir=data_dir())
    if verbose:
        print(cfg.status_line())
    return cfg


# (import name, pip name, why the course needs it)
REQUIREMENTS = [
    ("torch", "torch", "tensors, autograd, the models"),
    ("transformers", "transformers", "reference GPT-2 and tokenizer"),
    ("tokenizers", "tokenizers", "fast byte-level BPE"),
    ("sacrebleu", "sacrebleu", "chrF for the sonnets"),
    ("matplotlib", "matplotlib", "plots"),
    ("ipywidgets", "ipywidgets", "interactive explorers"),
    ("tqdm", "tqdm", "progress bars"),
    ("numpy", "numpy", "arrays"),
]


def check_environment(data: bool = True) -> bool:
    """Print [OK]/[FAIL] for each package, the python version and the data files; return True when all pass.

    Built in notebook 00 (welcome), §1.
    """
    ok_all = True

    def line(ok: bool, text: str) -> None:
        nonlocal ok_all
        ok_all &= ok
        print(f"[{'OK' if ok else 'FAIL'}] {text}")

    py_ok = tuple(map(int, platform.python_version_tuple()[:2])) >= (3, 10)
    line(py_ok, f"python {platform.python_version()} (need >= 3.10)")
    for module, pip_name, why in REQUIREMENTS:
        try:
            version = getattr(importlib.import_module(module), "__version__", "?")
            line(True, f"{module} {version} ({why})")
        except ImportError:
            line(False, f"{module} missing ({why}): pip install {pip_name}")
    if data:
        from .data import DataFileMissing, describe_data_dir

        try:
            for name, present in describe_data_dir():
                line(present, name if present else f"{name} missing")
        except DataFileMissing as err:
            line(False, str(err))
    return ok_all
