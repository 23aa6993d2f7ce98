"""Installing gpt2lab where torch is already installed keeps that torch (README, "On a GPU machine").

A lab cluster or a hosted notebook comes with its own torch built for CUDA (gigabytes). `pip install -e .` there
must use it, so pyproject.toml declares ranges and only `make`/CI pin exact versions (constraints.txt).

The test asks pip's resolver, offline and downloading nothing, what it would install into an environment that
holds another torch from the declared range (a CUDA build at the range's lower bound) beside the versions of this
environment's other packages. The environment is made of the packages' metadata only (their dist-info folders),
which is all a resolver reads. With exact pins (`torch==2.13.0`) the same question fails: pip would have to
replace torch and, offline, cannot, so the test can tell the two apart.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _torch_range() -> str:
    match = re.search(r'^\s*"torch([^"]*)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml declares no torch requirement"
    return match.group(1)


def _lower_bound(spec: str) -> str:
    match = re.search(r">=\s*([0-9][0-9.]*)", spec)
    assert match, f"pyproject.toml's torch requirement {spec!r} has no lower bound (>=): declare a range"
    return match.group(1)


def _environment_with_torch(folder: Path, torch_version: str) -> Path:
    """A venv (no pip of its own) whose site-packages holds this environment's dist-info folders, torch's rewritten."""
    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / "bin" / "python"
    target = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    here = Path(sysconfig.get_paths()["purelib"])
    for info in here.glob("*.dist-info"):
        name = info.name.split("-")[0].lower()
        if name in ("gpt2lab", "__editable__"):
            continue
        if name == "torch":
            copy = target / f"torch-{torch_version}.dist-info"
            copy.mkdir()
            meta = (info / "METADATA").read_text()
            (copy / "METADATA").write_text(re.sub(r"(?m)^Version: .*$", f"Version: {torch_version}", meta, count=1))
            (copy / "INSTALLER").write_text("pip\n")
            (copy / "RECORD").write_text("")
        else:
            shutil.copytree(info, target / info.name)
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """gpt2lab built as a wheel from this checkout (no network: this environment's setuptools)."""
    return _build(REPO, tmp_path_factory.mktemp("wheel"))


def _build(source: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "--isolated", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(source)], check=True, capture_output=True, text=True)
    (built,) = out.glob("gpt2lab-*.whl")
    return built


def _would_install(python: Path, wheel: Path, requirement: str, report: Path) -> subprocess.CompletedProcess:
    # --isolated: no pip.conf or PIP_* settings (a machine's local wheel folder would answer instead of the env)
    return subprocess.run([sys.executable, "-m", "pip", "--isolated", "--python", str(python), "install", "--dry-run",
                           "--no-index", "--find-links", str(wheel.parent), "--report", str(report),
                           requirement], capture_output=True, text=True)


@pytest.mark.parametrize("requirement", ["gpt2lab", "gpt2lab[dev]"])
def test_install_keeps_a_torch_from_the_declared_range(requirement, wheel, tmp_path):
    other = _lower_bound(_torch_range()) + "+cu121"
    python = _environment_with_torch(tmp_path / "env", other)
    report = tmp_path / "report.json"
    result = _would_install(python, wheel, requirement, report)
    assert result.returncode == 0, f"pip would not install {requirement} beside torch {other}:\n{result.stderr}"
    install = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "torch" not in install, f"pip would replace torch {other} with {install['torch']}"
    assert set(install) == {"gpt2lab"}, f"pip would also install or replace {sorted(set(install) - {'gpt2lab'})}"


def test_exact_pins_would_replace_torch(wheel, tmp_path):
    """The control: the same question for a wheel that pins torch exactly fails (the test above can fail)."""
    pinned = tmp_path / "pinned"
    shutil.copytree(REPO / "lib", pinned / "lib")
    text = (REPO / "pyproject.toml").read_text()
    (pinned / "pyproject.toml").write_text(re.sub(r'"torch[^"]*"', '"torch==2.13.0"', text, count=1))
    (pinned / "README.md").write_text("gpt2lab\n")
    built = _build(pinned, tmp_path / "pinned-wheel")
    python = _environment_with_torch(tmp_path / "env", _lower_bound(_torch_range()) + "+cu121")
    result = _would_install(python, built, "gpt2lab", tmp_path / "report.json")
    assert result.returncode != 0, "offline, pip found a way to satisfy torch==2.13.0 beside another torch"
    said = result.stdout + result.stderr
    assert "torch==2.13.0" in said, said
