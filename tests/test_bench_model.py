"""Smoke test: the model benchmark runs end to end at tiny sizes and prints its ratios (timings are never asserted)."""

from __future__ import annotations

from gpt2lab.bench import __main__ as dispatcher
from gpt2lab.bench import model as bench


def test_bench_model_tiny_runs(capsys):
    assert bench.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert "ratio ours/transformers = " in out and "(median of the 3 back-to-back pairs" in out
    assert "ratio of the medians = " in out and "CPU time per step: ours " in out
    assert "speed-up = " in out


def test_dispatcher_routes_model(capsys):
    assert dispatcher.main(["model", "--tiny", "--skip-generation"]) == 0
    assert "forward+backward" in capsys.readouterr().out


def test_build_pair_gives_identical_models():
    import torch

    from gpt2lab.model import GPT2Config

    ours, ref = bench.build_pair(GPT2Config.tiny(vocab_size=100, n_positions=16), "cpu")
    ours.eval()
    ref.eval()
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-5
