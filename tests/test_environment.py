"""setup(): seeding, device choice, quick mode, the status line and the [OK]/[FAIL] environment check."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_cache import place_in_hub_cache
from tiny_gpt2 import hf_tiny

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


@pytest.fixture
def own_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of our own, no weights setting and no hub: the user's cache never leaks in."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "GPT2LAB_WEIGHTS", "GPT2LAB_LIMIT", "GPT2LAB_RESULTS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home" / "hub"


def test_setup_weights_limit_and_results(monkeypatch, tmp_path, own_hub_cache, capsys):
    cfg = gpt2lab.setup(seed=3, verbose=False)
    assert (cfg.weights, cfg.limit, cfg.results_dir) == ("gpt2", None, environment.DEFAULT_RESULTS)
    assert environment.DEFAULT_RESULTS.parent == Path(gpt2lab.__file__).resolve().parents[2]  # <repo>/results
    assert "| weights gpt2" in cfg.status_line() and "limit" not in cfg.status_line()
    monkeypatch.setenv("GPT2LAB_WEIGHTS", "gpt2-medium")
    monkeypatch.setenv("GPT2LAB_LIMIT", "40")
    monkeypatch.setenv("GPT2LAB_RESULTS", str(tmp_path / "runs"))
    cfg = gpt2lab.setup(verbose=True)
    assert (cfg.weights, cfg.limit, cfg.results_dir) == ("gpt2-medium", 40, tmp_path.resolve() / "runs")
    line = capsys.readouterr().out.strip()
    assert "| limit 40 |" in line and line.endswith("| weights gpt2-medium")
    assert gpt2lab.setup(weights=tmp_path, verbose=False).weights == str(tmp_path)  # the argument beats the env
    assert environment.Setup(seed=1, device="cpu", quick=True, data_dir=tmp_path).weights == "gpt2"
    for bad in ("0", "-3", "ten"):
        monkeypatch.setenv("GPT2LAB_LIMIT", bad)
        with pytest.raises(ValueError, match=f"GPT2LAB_LIMIT='{bad}' is not a positive whole number"):
            gpt2lab.setup(verbose=False)


def test_weights_line_cached_missing_or_broken(monkeypatch, tmp_path, own_hub_cache):
    """The weights line: found in the cache [OK]; not cached [--] (never a failure); a set folder that is not there
    [FAIL] in real mode, [--] in quick mode (quick mode uses no weights). Within a second or two, no download."""
    monkeypatch.setenv("GPT2LAB_QUICK", "0")
    start = time.perf_counter()
    ok, text = environment._weights_status(None)
    assert time.perf_counter() - start < 2
    assert ok is None and f"weights 'gpt2': not in the Hugging Face cache at {own_hub_cache}" in text
    assert "Real mode downloads them once" in text and "GPT2LAB_WEIGHTS=/path/to/folder" in text
    snapshot = place_in_hub_cache(hf_tiny(31), own_hub_cache, "gpt2")
    assert environment._weights_status("gpt2") == (True, f"weights 'gpt2': cached at {snapshot}")
    ok, text = environment._weights_status(tmp_path / "nope")
    assert ok is False and "local folder" in text and "nope: not there" in text
    monkeypatch.setenv("GPT2LAB_QUICK", "1")
    ok, text = environment._weights_status(tmp_path / "nope")
    assert ok is None and text.endswith("(quick mode needs none)")
    damaged = snapshot / "model.safetensors"
    Path(os.path.realpath(damaged)).write_bytes(b"\x00" * 16)
    monkeypatch.setenv("GPT2LAB_QUICK", "0")
    ok, text = environment._weights_status("gpt2")
    assert ok is False and "is damaged" in text


def test_check_environment_reports_missing_package_and_data(monkeypatch, tmp_path, own_hub_cache, capsys):
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    monkeypatch.setenv("GPT2LAB_QUICK", "1")
    monkeypatch.setattr(environment, "REQUIREMENTS", [*environment.REQUIREMENTS, ("no_such_pkg", "no-such-pkg", "x")])
    assert environment.check_environment() is False
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[OK] python ")
    assert "[FAIL] no_such_pkg missing (x): pip install no-such-pkg" in out
    assert "[FAIL] sonnets.txt missing" in out
    assert any(line.startswith("[OK] torch 2.13.0") for line in out)
    tokenizer_line = next(line for line in out if "tokenizer:" in line)
    assert tokenizer_line.startswith("[FAIL] no GPT-2 tokenizer:")
    assert "python -m gpt2lab.data download" in tokenizer_line
    assert out[-1].startswith("[--] weights 'gpt2': not in the Hugging Face cache")  # quick mode: not a failure


def test_check_environment_all_ok_with_real_data(sonnet_data, quora_data, tokenizer, own_hub_cache, capsys):
    assert environment.check_environment() is True
    out = capsys.readouterr().out
    assert "[FAIL]" not in out and "[OK] tokenizer loads: Tokenizer(GPT-2 BPE, vocab 50257, eos 50256" in out
    assert "[--] weights 'gpt2'" in out  # not cached here: a note, not a failure
