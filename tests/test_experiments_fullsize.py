"""The full-size path of gpt2lab.experiments on a CPU (issue: "a test runs both tasks at full gpt2-small size for
2 steps each, through the command line"): gpt2-shaped random weights (`--weights random`, no hub), 1024 positions,
the real tokenizer and the real data, cut by `--limit 2`. Quick mode never reaches these sizes.

LoRA keeps it cheap (checkpoints hold the adapters only); the forward and backward passes still go through the whole
124M-parameter model at 1024 positions. About 15 s on one core. Find it by name: `pytest -k fullsize`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPT2_SMALL = 124_439_808  # transformers' GPT2LMHeadModel("gpt2").num_parameters(): the tied head counted once
LORA_QV_R8 = 12 * 2 * 8 * (768 + 768)  # 12 blocks x (q, v) x rank 8 x (A: 8 x 768 + B: 768 x 8)


def test_fullsize_both_tasks_two_steps_through_the_command_line(tmp_path, tokenizer, sonnet_data, quora_data):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2LAB_") or k == "GPT2LAB_DATA"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "lib"), GPT2LAB_DEVICE="cpu")
    out = tmp_path / "results"
    command = [sys.executable, "-m", "gpt2lab.experiments", "run", "--task", "sonnet", "--task", "paraphrase",
               "--method", "lora", "--weights", "random", "--size", "full", "--limit", "2", "--max-steps", "2",
               "--batch-size", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "random gpt2-shaped weights" in done.stdout and "speed and memory are real" in done.stdout

    records = {r["task"]["name"]: r for r in (json.loads(p.read_text()) for p in out.glob("*/record.json"))}
    assert sorted(records) == ["paraphrase", "sonnet"]
    for record in records.values():
        experiment = record["config"]["extra"]["experiment"]
        model = record["config"]["extra"]["model"]
        assert (experiment["size"], experiment["weights"], experiment["method"]) == ("full", "random",
                                                                                     "lora-r8-qv+adamw")
        assert (model["n_positions"], model["n_layer"], model["n_embd"], model["vocab_size"]) == (1024, 12, 768, 50257)
        assert experiment["settings"]["max_length"] == 1024  # the real-mode sequence length
        assert record["steps"] == 2 and record["status"] == "completed"
        assert record["params"]["trainable"] == LORA_QV_R8
        assert record["params"]["total"] - record["params"]["trainable"] == GPT2_SMALL
        assert record["best_metric"]["value"] is not None and record["tokens_per_s"] > 0
        assert experiment["settings"]["train_limit"] == experiment["settings"]["dev_limit"] == 2
    assert records["sonnet"]["config"]["lr"] == 2e-4 and records["sonnet"]["config"]["epochs"] == 2  # 10, capped
