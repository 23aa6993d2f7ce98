"""Smoke test of `python -m gpt2lab.bench optim` on tiny shapes; timings are printed, never asserted."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2lab.bench import __main__ as dispatcher
from gpt2lab.bench import optim as bench


def test_gpt2_small_shapes_count_124m_parameters():
    shapes = bench.gpt2_shapes()
    assert len(shapes) == 2 + 12 * 12 + 2
    assert sum(math.prod(s) for s in shapes) == 124_439_808  # GPT-2 small, lm_head tied to wte
    assert shapes[0] == (50257, 768) and (768, 2304) in shapes and (3072, 768) in shapes


def test_run_small_returns_positive_times_for_both():
    result = bench.run(repeats=2, steps=1, small=True)  # timings are not asserted, only their shape
    assert set(result["median"]) == {"ours", "torch"}
    assert all(len(t) == 2 and min(t) > 0 for t in result["times"].values())
    assert result["ratio"] > 0 and result["n_values"] == sum(math.prod(s) for s in bench.gpt2_shapes(**bench.SMALL))


def test_main_through_the_dispatcher_prints_the_ratio(capsys):
    threads = torch.get_num_threads()
    try:
        assert dispatcher.main(["optim", "--small", "--repeats", "1", "--steps", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "ratio ours / torch" in out and "tiny shapes" in out
    assert "AdaPreLoRA's extra state" in out  # the LoRA optimizers' section ran too (skip it: --no-lora-optimizers)


def test_bad_option_is_rejected(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--small", "--repeats", "0"])
    assert "--repeats and --steps must be >= 1" in capsys.readouterr().err
