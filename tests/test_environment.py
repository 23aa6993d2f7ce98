"""setup(): seeding, device choice, quick mode, the status line and the [OK]/[FAIL] environment check."""

from __future__ import annotations

import os
import random
import shutil
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
    """The weights line: found in the cache [OK]; a set folder that is not there [FAIL] in real mode, [--] in quick
    mode (quick mode uses no weights); damaged [FAIL]. Within a second or two, no download."""
    snapshot = place_in_hub_cache(hf_tiny(31), own_hub_cache, "gpt2")
    monkeypatch.setenv("GPT2LAB_QUICK", "0")
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


def test_weights_not_cached_says_whether_real_mode_can_get_them(monkeypatch, own_hub_cache):
    """Not cached: quick mode needs none [--]; real mode asks the hub once: reachable [--] (downloaded on first use),
    offline or unreachable [FAIL] with the ways out. The hub is never really asked here."""
    from gpt2lab import weights

    where = f"weights 'gpt2': not in the Hugging Face cache at {own_hub_cache}"
    monkeypatch.setenv("GPT2LAB_QUICK", "1")
    ok, text = environment._weights_status(None)
    assert ok is None and text.startswith(f"{where}. Quick mode needs none; real mode downloads them once")
    assert "GPT2LAB_WEIGHTS=/path/to/folder" in text

    monkeypatch.setenv("GPT2LAB_QUICK", "0")  # HF_HUB_OFFLINE=1 (own_hub_cache): no connection is even tried
    start = time.perf_counter()
    ok, text = environment._weights_status(None)
    assert time.perf_counter() - start < 2
    assert ok is False and text.startswith(f"{where}; hub https://huggingface.co: not tried (HF_HUB_OFFLINE is set). ")
    assert "Real mode cannot load them: unset HF_HUB_OFFLINE, or set GPT2LAB_WEIGHTS=/path/to/folder" in text
    assert text.endswith("or use quick mode (GPT2LAB_QUICK=1)")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(weights, "hub_offline", lambda: False)
    monkeypatch.setattr(weights, "hub_unreachable", lambda: "unreachable (no answer within 3 s)")
    ok, text = environment._weights_status(None)
    assert ok is False and "hub https://huggingface.co: unreachable (no answer within 3 s)" in text
    assert "Real mode cannot load them: connect to the internet, or set GPT2LAB_WEIGHTS" in text
    monkeypatch.setattr(weights, "hub_unreachable", lambda: None)
    ok, text = environment._weights_status(None)
    assert (ok, text) == (None, f"{where}; hub https://huggingface.co: reachable, so real mode downloads them once, "
                                "on first use")


def test_check_environment_reports_missing_package_and_data(monkeypatch, tmp_path, own_hub_cache, capsys):
    from gpt2lab import data

    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    monkeypatch.setenv("GPT2LAB_QUICK", "1")
    monkeypatch.setattr(environment, "REQUIREMENTS", [*environment.REQUIREMENTS, ("no_such_pkg", "no-such-pkg", "x")])
    assert environment.check_environment() is False
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[OK] python ") and " at " in out[0]
    restart = "then restart the kernel (Kernel > Restart) and run this cell again"
    assert f"[FAIL] no_such_pkg missing (x): run `%pip install 'no-such-pkg'` in a cell, {restart}" in out
    assert any(line.startswith("[OK] torch 2.13.0") for line in out)
    fix = ("run `python -m gpt2lab.data download` in a terminal in the repo (needs internet once), or set GPT2LAB_DATA "
           "to the folder that holds the course data")
    names = ", ".join(name for name, _ in data.describe_data_dir())
    assert "sonnets.txt, " in names and "quora-train.csv, " in names and names.endswith("gpt2-tokenizer/merges.txt")
    assert f"[FAIL] data folder {tmp_path} ($GPT2LAB_DATA) holds none of the course files ({names}): {fix}" in out
    assert not any(line.startswith("[FAIL] sonnets.txt") for line in out)  # one line for an empty folder
    tokenizer_line = next(line for line in out if "tokenizer:" in line)
    assert tokenizer_line.startswith("[FAIL] no GPT-2 tokenizer:")
    assert "python -m gpt2lab.data download" in tokenizer_line
    assert out[-2].startswith("[--] weights 'gpt2': not in the Hugging Face cache")  # quick mode: not a failure
    assert out[-1] == f"3 [FAIL] lines: do what each says, {restart}"


def test_data_lines_name_each_missing_file(monkeypatch, tmp_path, sonnet_data, capsys):
    """A folder that is not there: one line. Some files there: [OK] each one present, [FAIL] each one missing."""
    from gpt2lab import data

    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path / "nowhere"))
    ((ok, text),) = environment._data_status()
    assert not ok and text.startswith(f"data folder {tmp_path / 'nowhere'} ($GPT2LAB_DATA) does not exist: run `")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(sonnet_data / "sonnets.txt", partial)
    monkeypatch.setenv("GPT2LAB_DATA", str(partial))
    lines = environment._data_status()
    assert lines[0] == (True, f"data folder {partial} ($GPT2LAB_DATA)")
    assert (True, "sonnets.txt") in lines
    fix = ("run `python -m gpt2lab.data download` in a terminal in the repo (needs internet once), or set GPT2LAB_DATA "
           "to the folder that holds the course data")
    assert (False, f"quora-dev.csv missing from {partial}: {fix}") in lines
    assert len(lines) == 1 + len(data.describe_data_dir()) and sum(ok for ok, _ in lines) == 2
    monkeypatch.delenv("GPT2LAB_DATA")
    assert "(the repo's data/ folder; $GPT2LAB_DATA is not set)" in environment._data_status()[0][1]


def test_package_too_old_or_broken(monkeypatch, tmp_path):
    """The versions needed are those the installed gpt2lab declares; one outside them is [FAIL] with the spec to
    install. A package whose own import fails says why (a broken install is not an absent one)."""
    import packaging.specifiers

    specs = environment.required_versions()
    assert {"torch", "transformers", "numpy", "ipywidgets"} <= set(specs) and "pytest" not in specs  # no dev extras
    assert packaging.specifiers.SpecifierSet(specs["torch"]).contains(torch.__version__.split("+")[0])
    ok, text = environment._package_status("numpy", "numpy", "arrays", {"numpy": ">=99"})
    assert not ok and text == (f"numpy {np.__version__} is not >=99 (arrays): run `%pip install 'numpy>=99'` in a "
                               "cell, then restart the kernel (Kernel > Restart) and run this cell again")
    assert environment._package_status("numpy", "numpy", "arrays", specs) == (True, f"numpy {np.__version__} (arrays)")
    (tmp_path / "halfinstalled.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ok, text = environment._package_status("halfinstalled", "halfinstalled", "x", {})
    assert not ok and text.startswith("halfinstalled missing (x): No module named 'no_such_dependency_xyz': run `%pip")


def test_check_environment_all_ok_with_real_data(sonnet_data, quora_data, tokenizer, own_hub_cache, monkeypatch,
                                                 capsys):
    monkeypatch.setenv("GPT2LAB_QUICK", "1")
    assert environment.check_environment() is True
    out = capsys.readouterr().out
    assert "[FAIL]" not in out and "[OK] tokenizer loads: Tokenizer(GPT-2 BPE, vocab 50257, eos 50256" in out
    assert "[--] weights 'gpt2'" in out  # not cached here: quick mode needs none
    assert out.splitlines()[-1] == "ready for quick mode"
