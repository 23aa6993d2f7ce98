"""The experiments command line under torchrun (notebook 09, multi-GPU): 2 gloo processes on a CPU give the records,
run folders and weights of 1 process with the same global batch; only rank 0 writes and prints; AdaPreLoRA is refused.

Each run is a subprocess (`python -m torch.distributed.run ... -m gpt2lab.experiments run ...`), as a user types it.
The tiny quick-mode model has no dropout (GPT2Config.tiny) and full+adamw adds none, so the two runs draw no random
masks that could differ; a global batch of 4 over 7 training examples makes the last batch of each epoch 3 examples,
shared 2 + 1 between the ranks (the loss must be weighted by each rank's share, not averaged)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed's gloo backend is not available in this torch build")

COMMON = ["run", "--task", "paraphrase", "--task", "sonnet", "--method", "full+adamw", "--seeds", "0",
          "--size", "quick", "--set", "batch_size=4", "--set", "train_limit=7", "--set", "epochs=2",  # 2 x 2 steps
          "--set", "keep=all"]  # the finished runs' checkpoints are compared below
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    """The suite's environment for a child: one thread, quick mode, CPU only (gloo, never NCCL), no leftover
    torchrun variables, no limit or results folder from the caller."""
    drop = ("GPT2LAB_LIMIT", "GPT2LAB_RESULTS", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    out = {k: v for k, v in os.environ.items() if k not in drop}
    out.update(OMP_NUM_THREADS="1", GPT2LAB_QUICK="1", MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")]))
    return out


def experiments(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """`python -m gpt2lab.experiments ARGS`, under torchrun when processes > 1."""
    launcher = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes), "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "gpt2lab.experiments", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env(), timeout=300)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| relative to |a| (Frobenius norms)."""
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def test_two_processes_through_the_command_line_equal_one(tmp_path, sonnet_data, quora_data, tokenizer):
    one, two = tmp_path / "one", tmp_path / "two"
    done2 = experiments(*COMMON, "--out", str(two), processes=2)
    assert done2.returncode == 0, done2.stderr[-4000:]
    done1 = experiments(*COMMON, "--out", str(one))
    assert done1.returncode == 0, done1.stderr[-4000:]

    # one set of files, in folders named alike (the number of processes is not part of a run's identity)
    names = sorted(p.name for p in one.iterdir())
    assert len(names) == 2 and sorted(p.name for p in two.iterdir()) == names
    assert files(two) == files(one)
    assert not any("rank" in f or f.endswith("lock.json") for f in files(two))

    # only rank 0 prints: the 2-process output has the 1-process output's lines, each once
    lines1, lines2 = done1.stdout.splitlines(), done2.stdout.splitlines()
    assert len(lines2) == len(lines1) == len(set(lines2)) and len(lines1) >= 6
    assert "x 2 processes" in lines2[0] and "x 2 processes" not in lines1[0]

    for name in names:
        r1, r2 = (json.loads((folder / name / "record.json").read_text()) for folder in (one, two))
        b1, b2 = r1["config"]["extra"]["experiment"], r2["config"]["extra"]["experiment"]
        assert (r1["world_size"], b1["world_size"], r2["world_size"], b2["world_size"]) == (1, 1, 2, 2)
        assert {**b2, "world_size": 1} == b1
        assert r1["status"] == r2["status"] == "completed" and r1["steps"] == r2["steps"] == STEPS
        assert r2["tokens"] == r1["tokens"]  # summed over the ranks
        assert [s for s, _ in r2["loss_log"]] == [s for s, _ in r1["loss_log"]] == list(range(1, STEPS + 1))
        assert [x for _, x in r2["loss_log"]] == pytest.approx([x for _, x in r1["loss_log"]], rel=1e-5)
        metrics = ("train_loss", "accuracy", "f1") if name.startswith("paraphrase") else ("train_loss", "chrf",
                                                                                          "dev_loss")
        assert [e["step"] for e in r2["evals"]] == [e["step"] for e in r1["evals"]] == [2, 4]
        for e1, e2 in zip(r1["evals"], r2["evals"]):
            assert {m: e2[m] for m in metrics} == pytest.approx({m: e1[m] for m in metrics}, rel=1e-5)
        assert r2["best_metric"]["name"] == r1["best_metric"]["name"]
        assert r2["best_metric"]["step"] == r1["best_metric"]["step"]
        assert r2["best_metric"]["value"] == pytest.approx(r1["best_metric"]["value"], rel=1e-5)

        # the final weights: summing over ranks rounds differently, and Adam divides by sqrt(v), so parameters with
        # small gradients show gaps of ~1e-5 of their norm after 4 steps (1e-7 under SGD, tests/test_parallel.py)
        w1, w2 = (torch.load(folder / name / "checkpoint.pt", weights_only=False)["model"] for folder in (one, two))
        assert w1.keys() == w2.keys() and len(w1) > 10
        for key, p in w1.items():
            if key.endswith("attn.c_attn.bias"):
                # the key bias gets no true gradient (softmax ignores a shift shared by every key), so Adam turns
                # rounding noise into steps: its third is compared in absolute terms, far below one step (lr 3e-3)
                q, k, v = p.chunk(3)
                q2, k2, v2 = w2[key].chunk(3)
                assert gap(q, q2) < 1e-4 and gap(v, v2) < 1e-4, key
                assert float((k - k2).abs().max()) < 1e-4, key
            else:
                assert gap(p, w2[key]) < 1e-4, f"{name}: {key} differs by {gap(p, w2[key]):.1e} of its norm"


# The refusal of AdaPreLoRA with several processes is tested without the command line (5 s less here):
# tests/test_parallel.py::test_adaprelora_is_refused_with_several_processes
