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


# (import name, pip name, why the course needs it); the versions needed are those gpt2lab was installed with
REQUIREMENTS = [
    ("torch", "torch", "tensors, autograd, the models"),
    ("transformers", "transformers", "reference GPT-2 and tokenizer"),
    ("tokenizers", "tokenizers", "fast byte-level BPE"),
    ("safetensors", "safetensors", "the weights files"),
    ("huggingface_hub", "huggingface_hub", "fetches and caches the released weights"),
    ("sacrebleu", "sacrebleu", "chrF for the sonnets"),
    ("matplotlib", "matplotlib", "plots"),
    ("ipywidgets", "ipywidgets", "interactive explorers"),
    ("tqdm", "tqdm", "progress bars"),
    ("numpy", "numpy", "arrays"),
]
RESTART = "then restart the kernel (Kernel > Restart) and run this cell again"


def required_versions() -> dict[str, str]:
    """{pip name (normalised): version specifier} as declared by the installed gpt2lab (pyproject's ranges); {} when
    gpt2lab runs from a source folder that was never installed."""
    import importlib.metadata as metadata

    try:
        from packaging.requirements import Requirement

        declared = metadata.requires("gpt2lab") or []
    except (ImportError, metadata.PackageNotFoundError):
        return {}
    specs = {}
    for line in declared:
        req = Requirement(line)
        if req.marker is None:  # the dev extras are not the course's business
            specs[_normal(req.name)] = str(req.specifier)
    return specs


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _package_status(module: str, pip_name: str, why: str, specs: dict[str, str]) -> tuple[bool, str]:
    """[OK] with the version, or [FAIL] saying what to install: into the kernel's own python, hence %pip."""
    import importlib.metadata as metadata

    spec = specs.get(_normal(pip_name), "")
    install = f"run `%pip install '{pip_name}{spec}'` in a cell, {RESTART}"
    try:
        imported = importlib.import_module(module)
    except ImportError as err:
        detail = "" if getattr(err, "name", module) == module else f": {err}"  # a broken install, not an absent one
        return False, f"{module} missing ({why}){detail}: {install}"
    try:
        version = metadata.version(pip_name)
    except metadata.PackageNotFoundError:
        version = getattr(imported, "__version__", "?")
    if spec and version != "?":
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion

        try:
            fits = SpecifierSet(spec).contains(version, prereleases=True)
        except InvalidVersion:
            fits = True  # a version string we cannot read: do not guess
        if not fits:
            return False, f"{module} {version} is not {spec} ({why}): {install}"
    return True, f"{module} {version} ({why})"


def check_environment(data: bool = True, weights: str | os.PathLike | None = None) -> bool:
    """Print one line per requirement: python, each package, the data files, the tokenizer and the GPT-2 weights,
    then a summary; return True when nothing is [FAIL].

    Built in notebook 00 (welcome), §1. Markers: [OK] ready; [FAIL] the course cannot run as it is, and the line says
    exactly what to do (the package spec to install into this kernel, the command that fetches the data, the setting
    to change); [--] not needed yet: in quick mode, GPT-2 weights (quick mode uses tiny random models); in real mode,
    weights not cached yet while the hub is reachable (they are downloaded once, on first use). Nothing is
    downloaded: the tokenizer and the weights are looked for locally and in the Hugging Face cache; in real mode,
    when the weights are not cached, one connection to the hub (a few seconds at most) tells whether they can be.
    `weights` is the weights setting (None: $GPT2LAB_WEIGHTS, else "gpt2").
    """
    import sys

    from .data import shown_path

    fails = 0

    def line(ok: bool | None, text: str) -> None:
        nonlocal fails
        fails += ok is False
        print(f"[{'--' if ok is None else 'OK' if ok else 'FAIL'}] {text}")

    py_ok = tuple(map(int, platform.python_version_tuple()[:2])) >= (3, 10)
    where = shown_path(Path(sys.executable))
    line(py_ok, f"python {platform.python_version()} at {where}" + ("" if py_ok else
         " is too old: the course needs python >= 3.10; start JupyterLab from an environment that has it"))
    specs = required_versions()
    for module, pip_name, why in REQUIREMENTS:
        line(*_package_status(module, pip_name, why, specs))
    if data:
        for status in _data_status():
            line(*status)
        line(*_tokenizer_status())
    line(*_weights_status(weights))
    if fails:
        print(f"{fails} [FAIL] line{'s' if fails > 1 else ''}: do what {'each' if fails > 1 else 'it'} says, {RESTART}")
    else:
        print(f"ready for {'quick' if quick_mode() else 'real'} mode")
    return fails == 0


def _data_status() -> list[tuple[bool, str]]:
    """The data folder (and where its setting comes from), then one line per course file."""
    from .data import DATA_ENV, FETCH_HINT, DataFileMissing, data_dir, describe_data_dir, shown_path

    root = data_dir()
    origin = f"${DATA_ENV}" if os.environ.get(DATA_ENV) else f"the repo's data/ folder; ${DATA_ENV} is not set"
    folder = f"data folder {shown_path(root)} ({origin})"
    fix = (f"run `{FETCH_HINT}` in a terminal in the repo (needs internet once), or set {DATA_ENV} to the folder "
           "that holds the course data")
    try:
        files = describe_data_dir()
    except DataFileMissing as err:
        return [(False, str(err))]
    if not root.is_dir():
        return [(False, f"{folder} does not exist: {fix}")]
    if not any(present for _, present in files):
        return [(False, f"{folder} holds none of the course files ({', '.join(n for n, _ in files)}): {fix}")]
    return [(True, folder)] + [(True, name) if present else (False, f"{name} missing from {shown_path(root)}: {fix}")
                               for name, present in files]


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
        hub_endpoint,
        hub_offline,
        hub_unreachable,
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
    where = f"weights {name!r}: not in the Hugging Face cache at {shown_path(hub_cache_dir())}"
    offline_fix = (f"set {WEIGHTS_ENV}=/path/to/folder (or setup(weights=...)) to a folder holding config.json and "
                   "model.safetensors")
    if quick:
        return None, (f"{where}. Quick mode needs none; real mode downloads them once on first use (needs internet); "
                      f"offline, {offline_fix}")
    why = hub_unreachable()  # one connection, a few seconds at most: can real mode fetch them?
    if why is None:
        return None, f"{where}; hub {hub_endpoint()}: reachable, so real mode downloads them once, on first use"
    reach = "unset HF_HUB_OFFLINE" if hub_offline() else "connect to the internet"
    return False, (f"{where}; hub {hub_endpoint()}: {why}. Real mode cannot load them: {reach}, or {offline_fix}, "
                   "or use quick mode (GPT2LAB_QUICK=1)")

