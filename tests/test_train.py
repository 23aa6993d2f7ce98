"""gpt2lab.train: exact resume after an interruption (in-process and a real SIGKILL), NaN stop keeping the last good
checkpoint, early stopping, the run record, bad inputs. A character-level toy task (vocab 64) keeps it fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.tasks import SonnetTask
from gpt2lab.train import TrainConfig, epoch_order, train


class CharTokenizer:
    """Characters as tokens (ids 0..62), 63 = end of text / padding: a 64-token vocabulary."""

    eos_token_id = pad_token_id = 63
    vocab_size = 64

    def encode(self, text):
        return [ord(c) % 63 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 32) for i in ids)


class ToyTask(SonnetTask):
    """SonnetTask on characters; evaluation is the dev loss (no sampling), so early stopping watches it."""

    def __init__(self, n_train=10):
        texts = [f"line {i}: shall I compare thee to a summer's day {i * 7}" for i in range(n_train)]
        super().__init__(CharTokenizer(), texts, ["dev a", "dev b"], ["dev sonnet one", "dev sonnet two"],
                         max_length=48, metric="dev_loss")

    def evaluate(self, model):
        return {"dev_loss": self.dev_loss(model)}


def toy_model(seed=0):
    torch.manual_seed(seed)
    # dropout on: resuming must also restore the RNG that draws the dropout masks
    return GPT2(GPT2Config.tiny(vocab_size=64, n_positions=48, n_embd=32, n_head=2, dropout=0.1))


def toy_config(out_dir, **overrides):
    base = dict(epochs=3, batch_size=3, lr=3e-3, eval_every=3, checkpoint_every=2, out_dir=str(out_dir),
                run_name="toy", progress=False, log_every=1, schedule="linear", warmup_steps=2)
    base.update(overrides)
    return TrainConfig(**base)


def assert_same_params(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs after resuming"


def same_metrics(r1, r2):
    keys = ("evals", "epochs", "loss_log", "best_metric", "steps", "status")
    return {k: r1[k] for k in keys} == {k: r2[k] for k in keys}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model = toy_model()
    record = train(model, ToyTask(), torch.optim.AdamW, toy_config(tmp_path_factory.mktemp("full")))
    return model, record


def test_uninterrupted_run_record(uninterrupted):
    model, record = uninterrupted
    assert record["status"] == "completed"
    assert record["steps"] == 12  # 10 examples / batch 3 = 4 batches, 3 epochs
    assert [e["step"] for e in record["evals"]] == [3, 6, 9, 12]
    assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3]
    assert record["evals"][-1]["dev_loss"] < record["evals"][0]["dev_loss"]


def test_resume_after_keyboard_interrupt_is_exact(uninterrupted, tmp_path):
    full_model, full_record = uninterrupted

    def interrupt(step, loss):
        if step == 7:  # mid-epoch 2; the last checkpoint is step 6 (eval), so step 7 is done again
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path), callbacks=[interrupt])
    assert torch.load(tmp_path / "toy" / "checkpoint.pt", weights_only=False)["state"]["step"] == 6
    resumed_model = toy_model(seed=99)  # different initial weights: everything must come from the checkpoint
    record = train(resumed_model, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True))
    assert record["resumed_from_step"] == 6
    assert_same_params(full_model, resumed_model)
    assert same_metrics(record, full_record)


def test_resume_without_rng_restore_would_differ(uninterrupted, tmp_path, monkeypatch):
    """The equality above is not vacuous: skipping the RNG restore (dropout masks) changes the result."""
    full_model, _ = uninterrupted
    def interrupt(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path), callbacks=[interrupt])
    import gpt2lab.train as train_module

    monkeypatch.setattr(train_module, "set_rng_state", lambda state: None)
    resumed_model = toy_model(seed=99)
    train(resumed_model, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True))
    assert any(not torch.equal(p, q) for p, q in zip(full_model.parameters(), resumed_model.parameters()))


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_train import ToyTask, toy_model, toy_config
    from gpt2lab.train import train

    def kill(step, loss):
        if step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: like a crash or a killed job

    train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config({out!r}), callbacks=[kill])
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_resume_after_sigkill_is_exact(uninterrupted, tmp_path):
    full_model, full_record = uninterrupted
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), kill_at=9, out=str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same kernels as this process
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = tmp_path / "toy"
    assert not (run_dir / "record.json").exists()  # the killed run never finished
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    # killed in the callback of step 9, before its evaluation: the last checkpoint is the end of epoch 2 (step 8)
    assert (ckpt["state"]["step"], ckpt["state"]["epoch"], ckpt["state"]["batch"]) == (8, 2, 0)
    resumed_model = toy_model(seed=5)
    record = train(resumed_model, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True))
    assert record["resumed_from_step"] == 8
    assert_same_params(full_model, resumed_model)
    assert same_metrics(record, full_record)


class NaNTask(ToyTask):
    """Plants a NaN loss at training step `at`."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def loss(self, model, batch):
        self.calls += model.training  # training calls only (the dev loss calls this too)
        loss = super().loss(model, batch)
        return loss * float("nan") if self.calls == self.at else loss


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    model = toy_model()
    record = train(model, NaNTask(at=5), torch.optim.AdamW, toy_config(tmp_path, eval_every=None))
    out = capsys.readouterr().out.strip().splitlines()
    assert record["status"] == "diverged" and record["steps"] == 4
    message = [line for line in out if line.startswith("stopped:")]
    assert len(message) == 1 and "loss is nan at step 5" in message[0] and "checkpoint" in message[0]
    ckpt = torch.load(tmp_path / "toy" / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["step"] == 4  # the last good one, not overwritten after the NaN
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for name, p in model.state_dict().items():  # the model is left at the last good step
        assert torch.equal(p, ckpt["model"][name]), name
    saved = json.loads((tmp_path / "toy" / "record.json").read_text())
    assert saved["status"] == "diverged" and "nan" in saved["message"]


def test_nonfinite_gradient_norm_stops(tmp_path):
    class BadGrad(ToyTask):
        def loss(self, model, batch):
            loss = super().loss(model, batch)
            w = model.transformer.wpe.weight
            # finite value, infinite gradient: d/dw sqrt(w - w) at 0
            return loss + torch.sqrt((w - w.detach()).abs().sum())

    record = train(toy_model(), BadGrad(), torch.optim.AdamW, toy_config(tmp_path, eval_every=None))
    assert record["status"] == "diverged"
    assert "gradient norm is" in record["message"] and "\n" not in record["message"]


def test_early_stopping(tmp_path):
    # lr 0: the dev loss never improves after the first evaluation, so patience 2 stops at the third
    record = train(toy_model(), ToyTask(), lambda p, lr: torch.optim.SGD(p, lr), toy_config(
        tmp_path, lr=0.0, eval_every=1, patience=2, warmup_steps=0, schedule="constant"))
    assert record["status"] == "early_stopped"
    assert record["steps"] == 3 and len(record["evals"]) == 3
    assert record["best_metric"] == {"name": "dev_loss", "value": record["evals"][0]["dev_loss"], "step": 1}
    # resuming an early-stopped run does not train on
    again = train(toy_model(), ToyTask(), lambda p, lr: torch.optim.SGD(p, lr), toy_config(
        tmp_path, lr=0.0, eval_every=1, patience=2, warmup_steps=0, schedule="constant", resume=True))
    assert again["status"] == "early_stopped" and again["steps"] == 3 and again["evals"] == record["evals"]


def test_restore_best_and_record_file(tmp_path, capsys):
    model = toy_model()
    record = train(model, ToyTask(), torch.optim.AdamW,
                   toy_config(tmp_path, epochs=2, lr=3e-2, eval_every=2, run_name="rec", amp="bf16"))
    assert "amp='bf16' needs a CUDA device; training in float32 on cpu" in capsys.readouterr().out
    run_dir = tmp_path / "rec"
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "checkpoint.pt", "record.json"]  # no temp files
    saved = json.loads((run_dir / "record.json").read_text())
    for key in ("config", "evals", "epochs", "wall_time_s", "it_per_s", "tokens_per_s", "peak_memory_mb",
                "params", "seed", "versions", "task", "loss_log"):
        assert saved[key] is not None, key
    assert saved["config"]["lr"] == 3e-2 and saved["seed"] == 1337
    assert saved["params"] == {"trainable": model.num_parameters(), "total": model.num_parameters()}
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["tokens_per_s"] > 0 and saved["it_per_s"] > 0
    best = torch.load(run_dir / "best.pt", weights_only=True)
    for name, p in model.state_dict().items():  # restore_best: the model ends on the best evaluation's weights
        assert torch.equal(p, best[name]), name
    best_eval = min(record["evals"], key=lambda e: e["dev_loss"])
    assert record["best_metric"]["step"] == best_eval["step"]


def test_max_steps_then_resume_continues(tmp_path):
    first = train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, max_steps=5, schedule="constant"))
    assert first["status"] == "completed" and first["steps"] == 5
    model = toy_model()
    second = train(model, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True, schedule="constant"))
    assert second["steps"] == 12 and second["resumed_from_step"] == 5


def test_resume_refuses_a_different_data_order(tmp_path):
    train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="batch_size 3 -> 4"):
        train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True, batch_size=4))


def test_data_order_depends_only_on_seed_and_epoch():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 1, 3)) == list(range(10))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="schedule must be"):
        TrainConfig(schedule="cosine")
    with pytest.raises(ValueError, match="amp must be"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    model = toy_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, ToyTask(), torch.optim.AdamW, toy_config(tmp_path))
    task = ToyTask()
    task.train_set = []
    with pytest.raises(ValueError, match="no training examples"):
        train(toy_model(), task, torch.optim.AdamW, toy_config(tmp_path))
