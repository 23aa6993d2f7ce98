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

from .weights import DEFAULT as DEFAULT_WEIGHTS

QUICK_ENV = "GPT2LAB_QUICK"
LIMIT_ENV = "GPT2LAB_LIMIT"
RESULTS_ENV = "GPT2LAB_RESULTS"
DEFAULT_RESULTS = Path(__file__).resolve().parents[2] / "results"


def quick_mode() -> bool:
    """True when GPT2LAB_QUICK is set to a true value (the test command sets it): tiny models, few steps."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU) so a notebook rerun gives the same numbers."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds only
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
    """What `setup()` decided; notebooks read `cfg.device`, `cfg.quick`, `cfg.data_dir`, `cfg.seed`, `cfg.weights`,
    `cfg.limit` and `cfg.results_dir`.

    weights: the one weights setting (a hub name such as "gpt2" or a local folder), passed to every
    `GPT2.from_pretrained` / `weights.load_reference` call. limit: $GPT2LAB_LIMIT, a cap on notebook 04's real-mode
    sizes (training and dev examples, steps) for smoke runs; None means no cap. results_dir: where notebook 04 writes
    its run folders in real mode.
    """

    seed: int
    device: object  # torch.device
    quick: bool
    data_dir: Path
    weights: str = DEFAULT_WEIGHTS
    limit: int | None = None
    results_dir: Path = DEFAULT_RESULTS

    def status_line(self) -> str:
        import torch
        import transformers

        from .data import shown_path

        mode = "quick (tiny models, few steps)" if self.quick else "real"
        weights = Path(self.weights).expanduser()
        weights = shown_path(weights.resolve()) if weights.is_dir() else self.weights
        limit = f" | limit {self.limit}" if self.limit is not None else ""
        return (
            f"gpt2lab | python {platform.python_version()} | torch {torch.__version__} | "
            f"transformers {transformers.__version__} | device {self.device} | mode {mode}{limit} | "
            f"seed {self.seed} | data {shown_path(self.data_dir)} | weights {weights}"
        )


def limit_from_env() -> int | None:
    """$GPT2LAB_LIMIT as a positive int (a cap on notebook 04's real-mode sizes), or None when unset."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{LIMIT_ENV}={raw!r} is not a positive whole number: set it to e.g. 50, or unset it")
    return value


def results_dir() -> Path:
    """$GPT2LAB_RESULTS, else <repo>/results: where notebook 04 writes its run folders in real mode."""
    env = os.environ.get(RESULTS_ENV, "").strip()
    return Path(env).expanduser().resolve() if env else DEFAULT_RESULTS


def setup(
    seed: int = 1337, device: str | None = None, verbose: bool = True, weights: str | os.PathLike | None = None
) -> Setup:
    """Seed everything, pick the device, read quick mode, the data directory, the weights setting, the size limit
    and the results folder; print one status line.

    Built in notebook 00 (welcome), §1; the first code cell of every notebook. `weights` (else $GPT2LAB_WEIGHTS,
    else "gpt2") is a hub name or a local folder holding config.json and model.safetensors.
    """
    from .data import data_dir
    from .weights import setting

    seed_everything(seed)
    cfg = Setup(
        seed=seed, device=pick_device(device), quick=quick_mode(), data_dir=data_dir(), weights=setting(weights),
        limit=limit_from_env(), results_dir=results_dir(),
    )  # fmt: skip
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


def check_environment(data: bool = True, weights: str | os.PathLike | None = None) -> bool:
    """Print one line per package, the python version, the data files, the tokenizer and the GPT-2 weights; return
    True when nothing is [FAIL].

    Built in notebook 00 (welcome), §1. Markers: [OK] ready; [FAIL] the course cannot run as it is (the line says what
    to do); [--] not needed yet: the weights are not cached (real mode downloads them once on first use, which needs
    internet) or, in quick mode, the weights are missing at all (quick mode uses tiny random models, no weights).
    Nothing is downloaded: the tokenizer and the weights are looked for locally and in the Hugging Face cache only.
    `weights` is the weights setting (None: $GPT2LAB_WEIGHTS, else "gpt2").
    """
    ok_all = True

    def line(ok: bool | None, text: str) -> None:
        nonlocal ok_all
        ok_all &= ok is not False
        print(f"[{'--' if ok is None else 'OK' if ok else 'FAIL'}] {text}")

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
        line(*_tokenizer_status())
    line(*_weights_status(weights))
    return ok_all


def _tokenizer_status() -> tuple[bool, str]:
    from . import tokenizer

    try:
        tok = tokenizer.load(local_files_only=True)  # checks vocab 50257, eos 50256, "yes" -> 8505, the last merge
    except (FileNotFoundError, OSError, ValueError) as err:
        return False, str(err)
    return True, f"tokenizer loads: {tok!r} (\"yes\" -> 8505, all 50000 merges)"


def _weights_status(value: str | os.PathLike | None) -> tuple[bool | None, str]:
    from .data import shown_path
    from .weights import (
        WEIGHTS_ENV,
        WeightsUnavailable,
        check_files,
        find_cached,
        hub_cache_dir,
        looks_like_folder,
        resolve,
    )
    from .weights import setting as weights_setting

    name = weights_setting(value)
    quick = quick_mode()
    if Path(name).expanduser().exists() or looks_like_folder(name):
        try:
            folder = resolve(name)  # a local folder: never the network
        except WeightsUnavailable as err:
            return (None if quick else False), f"weights: {err}" + (" (quick mode needs none)" if quick else "")
        return True, f"weights: local folder {shown_path(folder.resolve())}"
    folder = find_cached(name)
    if folder is not None:
        try:
            check_files(folder)
        except WeightsUnavailable as err:
            return (None if quick else False), f"weights: {err}"
        return True, f"weights {name!r}: cached at {shown_path(folder)}"
    return None, (
        f"weights {name!r}: not in the Hugging Face cache at {shown_path(hub_cache_dir())}. "
        f"{'Quick mode needs none; real' if quick else 'Real'} mode downloads them once on first use (needs "
        f"internet); offline, set {WEIGHTS_ENV}=/path/to/folder (or setup(weights=...)) to a folder holding "
        "config.json and model.safetensors"
    )

