"""setup(): seeding, device choice, quick mode, the status line and the [OK]/[FAIL] environment check."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import gpt2lab
from gpt2lab import environment


def test_setup_seeds_everything_reproducibly(capsys):
    draws = []
    for _ in range(2):
        gpt2lab.setup(seed=7, verbose=False)
        draws.append((random.random(), np.random.rand(), torch.rand(3).tolist()))
    assert draws[0] == draws[1]
    gpt2lab.setup(seed=8, verbose=False)
    assert torch.rand(3).tolist() != draws[0][2]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_quick_mode_from_environment(monkeypatch, value, expected):
    monkeypatch.setenv("GPT2LAB_QUICK", value)
    assert environment.quick_mode() is expected
    assert gpt2lab.setup(verbose=False).quick is expected


def test_status_line_and_device(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    monkeypatch.setenv("GPT2LAB_QUICK", "1")
    cfg = gpt2lab.setup(seed=3)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"torch {torch.__version__}" in line and "mode quick" in line
    assert f"data {tmp_path.resolve()}" in line and "seed 3" in line
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert cfg.device.type == expected
    assert gpt2lab.setup(device="cpu", verbose=False).device == torch.device("cpu")
    monkeypatch.setenv("GPT2LAB_DEVICE", "meta")
    assert environment.pick_device() == torch.device("meta")


def test_check_environment_reports_missing_package_and_data(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    monkeypatch.setattr(environment, "REQUIREMENTS", [*environment.REQUIREMENTS, ("no_such_pkg", "no-such-pkg", "x")])
    assert environment.check_environment() is False
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[OK] python ")
    assert "[FAIL] no_such_pkg missing (x): pip install no-such-pkg" in out
    assert "[FAIL] sonnets.txt missing" in out
    assert any(line.startswith("[OK] torch 2.13.0") for line in out)


def test_check_environment_all_ok_with_real_data(sonnet_data, quora_data, tokenizer, capsys):
    assert environment.check_environment() is True
    assert "[FAIL]" not in capsys.readouterr().out
