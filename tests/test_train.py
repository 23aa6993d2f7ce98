"""gpt2lab.train: exact resume after an interruption (in-process and a real SIGKILL), NaN stop keeping the last good
checkpoint, early stopping, the run record, bad inputs. A character-level toy task (vocab 64) keeps it fast."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_tasks import ToyTask

from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.train import Callback, TrainConfig, epoch_order, train


def toy_model(seed=0):
    torch.manual_seed(seed)
    # dropout on: resuming must also restore the RNG that draws the dropout masks
    return GPT2(GPT2Config.tiny(vocab_size=64, n_positions=48, n_embd=32, n_head=2, dropout=0.1))


def toy_config(out_dir, **overrides):
    base = dict(epochs=3, batch_size=3, lr=3e-3, eval_every=3, checkpoint_every=2,
                out_dir=None if out_dir is None else str(out_dir),
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

    def interrupt(loop):
        if loop.step == 7:  # mid-epoch 2; the last checkpoint is step 6 (eval), so step 7 is done again
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
    def interrupt(loop):
        if loop.step == 5:
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

    def kill(loop):
        if loop.step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: like a crash or a killed job

    train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config({out!r}), callbacks=[kill])
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_resume_after_sigkill_is_exact(uninterrupted, tmp_path, capsys):
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
    killed_pid = json.loads((run_dir / "lock.json").read_text())["pid"]
    capsys.readouterr()
    record = train(resumed_model, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True))
    # the killed run could not release its lock: the dead pid's lock is taken over, saying so
    assert f"taking over the stale lock of {run_dir} (pid {killed_pid}" in capsys.readouterr().out
    assert not (run_dir / "lock.json").exists()
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
    # no temp files, no lock left behind; the previous checkpoint is kept as the fallback
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "checkpoint.prev.pt", "checkpoint.pt",
                                                         "record.json"]
    saved = json.loads((run_dir / "record.json").read_text())
    for key in ("config", "evals", "epochs", "train_time_s", "eval_time_s", "wall_time_s", "it_per_s",
                "tokens_per_s", "peak_memory_mb", "peak_memory_how", "optimizer", "params", "seed", "versions",
                "task", "loss_log"):
        assert saved[key] is not None, key
    assert saved["optimizer"]["name"] == "AdamW" and saved["optimizer"]["module"] == "torch.optim.adamw"
    n = model.num_parameters()
    # AdamW's state: exp_avg and exp_avg_sq (float32) per weight, plus a 0-d float32 step per tensor
    assert saved["optimizer"]["state_bytes"] == 8 * n + 4 * len(list(model.parameters()))
    assert saved["eval_time_s"] > 0 and saved["wall_time_s"] >= saved["train_time_s"] + saved["eval_time_s"]
    assert saved["it_per_s"] == pytest.approx(saved["steps"] / saved["train_time_s"])
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


# ------------------------------------------------------------------------------ reproducibility and run figures

# measurements of the machine, not results of the run (how the peak was read depends on what the OS allowed)
TIMES = ("train_time_s", "eval_time_s", "eval_times", "io_time_s", "wall_time_s", "it_per_s", "tokens_per_s",
         "peak_memory_mb", "peak_memory_how", "finished_at")


def test_same_config_same_weights_and_record_with_dropout():
    """A seed determines a run: dropout masks come from the RNG, which the loop seeds before its first step."""
    config = toy_config(None, max_steps=6)
    models = [toy_model(), toy_model()]
    torch.manual_seed(123)  # a different global RNG state before each run must not matter
    first = train(models[0], ToyTask(), torch.optim.AdamW, config)
    torch.rand(7)
    second = train(models[1], ToyTask(), torch.optim.AdamW, config)
    assert_same_params(models[0], models[1])
    assert {k: v for k, v in first.items() if k not in TIMES} == {k: v for k, v in second.items() if k not in TIMES}
    other = toy_model()  # not vacuous: another seed gives other dropout masks (the data order is also the seed's)
    train(other, ToyTask(), torch.optim.AdamW, toy_config(None, max_steps=6, seed=1))
    assert any(not torch.equal(p, q) for p, q in zip(models[0].parameters(), other.parameters()))


def test_every_config_field_is_classified_for_resume():
    from dataclasses import fields

    from gpt2lab.train import EXTEND_FIELDS, PLACE_FIELDS, RESULT_FIELDS

    names = [f.name for f in fields(TrainConfig)]
    groups = RESULT_FIELDS + EXTEND_FIELDS + PLACE_FIELDS
    assert sorted(groups) == sorted(names), "a TrainConfig field must be in exactly one of the three sets"


def test_resumed_record_counts_the_time_of_every_session(tmp_path):
    def interrupt(loop):
        if loop.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path), callbacks=[interrupt])
    saved = torch.load(tmp_path / "toy" / "checkpoint.pt", weights_only=False)["state"]
    assert saved["step"] == 6 and saved["train_time"] > 0 and saved["eval_time"] > 0  # saved as they go
    record = train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True))
    assert record["train_time_s"] > saved["train_time"]
    assert record["it_per_s"] == pytest.approx(12 / record["train_time_s"])


def test_peak_memory_is_this_runs_own(tmp_path):
    """A large run, then a small one in the same process: the small run's record shows its own, smaller peak."""
    import gc

    big = GPT2(GPT2Config.tiny(vocab_size=64, n_positions=48, n_embd=512, n_head=4, n_layer=6))
    large = train(big, ToyTask(), torch.optim.AdamW, toy_config(None, max_steps=2, evaluate=False))
    del big
    gc.collect()
    small = train(toy_model(), ToyTask(), torch.optim.AdamW,
                  toy_config(None, max_steps=2, evaluate=False))
    assert "reset at the start" in small["peak_memory_how"] or "sampled" in small["peak_memory_how"]
    # the large run allocates gradients and AdamW's moments for 19M weights (216 MiB), freed before the small run
    assert large["peak_memory_mb"] > small["peak_memory_mb"] + 50, (large["peak_memory_mb"], small["peak_memory_mb"])


# ------------------------------------------------------------------------------ resume: refusals and extensions


def test_resume_refuses_every_result_change_in_one_line(tmp_path):
    train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, max_steps=2))
    with pytest.raises(ValueError) as err:
        train(toy_model(), ToyTask(n_train=9), torch.optim.AdamW,
              toy_config(tmp_path, resume=True, lr=1e-3, warmup_steps=0))
    message = str(err.value)
    assert "\n" not in message
    for part in ("lr 0.003 -> 0.001", "warmup_steps 2 -> 0", "training-set size 10 -> 9"):
        assert part in message, message
    assert "optimizer group 0 lr" not in message  # the lr is named once
    with pytest.raises(ValueError, match=r"optimizer AdamW -> SGD") as err:  # was a KeyError: 'momentum'
        train(toy_model(), ToyTask(), lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9),
              toy_config(tmp_path, resume=True))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"optimizer group 0 weight_decay 0.01 -> 0.1"):
        train(toy_model(), ToyTask(), functools.partial(torch.optim.AdamW, weight_decay=0.1),
              toy_config(tmp_path, resume=True))


def test_resume_accepts_extensions_and_says_so(tmp_path, capsys):
    first = train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, max_steps=5, schedule="constant"))
    assert first["status"] == "completed" and first["steps"] == 5
    capsys.readouterr()
    record = train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(
        tmp_path, resume=True, schedule="constant", epochs=4, patience=9, eval_every=4, checkpoint_every=None))
    out = capsys.readouterr().out
    assert record["steps"] == 16 and record["resumed_from_step"] == 5 and record["status"] == "completed"
    assert record["resume_changes"] == ["epochs 3 -> 4", "max_steps 5 -> None", "patience None -> 9",
                                        "eval_every 3 -> 4", "checkpoint_every 2 -> None"]
    assert "accepted changes: epochs 3 -> 4, max_steps 5 -> None" in out


def test_resume_false_on_a_finished_run_refuses_unless_overwrite(tmp_path, capsys):
    model = toy_model()
    first = train(model, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, max_steps=3))
    with pytest.raises(FileExistsError, match=r"holds a finished run \(record.json\): pass resume=True") as err:
        train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, max_steps=3))
    assert str(tmp_path / "toy") in str(err.value) and "\n" not in str(err.value)
    again = toy_model()
    second = train(again, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, max_steps=3, overwrite=True))
    assert "overwrite=True: removing a finished run" in capsys.readouterr().out
    assert_same_params(model, again)
    assert same_metrics(first, second)


# ------------------------------------------------------------------------------ callbacks


class WeightEMA(Callback):
    """An exponential moving average of the weights (as SMART's Bregman proximal term keeps): state to checkpoint."""

    def __init__(self, decay=0.9):
        self.decay, self.shadow = decay, None

    def on_step(self, loop):
        with torch.no_grad():
            if self.shadow is None:
                self.shadow = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}
            for k, v in loop.model.state_dict().items():
                self.shadow[k].lerp_(v, 1 - self.decay)

    def state_dict(self):
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.decay, self.shadow = state["decay"], state["shadow"]


def test_callback_state_survives_resume_exactly(tmp_path):
    full = WeightEMA()
    train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path / "full"), callbacks=[full])

    def interrupt(loop):
        if loop.step == 7:  # the last checkpoint is step 6: the EMA of steps 1..6 must come back from it
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path), callbacks=[WeightEMA(), interrupt])
    resumed = WeightEMA()
    train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True), callbacks=[resumed])
    for k, v in full.shadow.items():
        assert torch.equal(v, resumed.shadow[k]), k
    with pytest.raises(ValueError, match=r"callbacks with state \['WeightEMA'\] -> \[\]"):
        train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True))


def test_callbacks_see_the_loop_state(tmp_path):
    seen = []

    class Spy(Callback):
        def on_start(self, loop):
            seen.append(("start", loop.step))

        def on_step(self, loop):
            assert loop.event == "step" and loop.model is model and isinstance(loop.optimizer, torch.optim.AdamW)
            seen.append(("step", loop.step, loop.lr, loop.loss))

        def on_evaluate(self, loop):
            seen.append(("evaluate", loop.step, loop.metrics["dev_loss"]))

        def on_end(self, loop):
            seen.append(("end", loop.step, loop.state["status"]))

    model = toy_model()
    record = train(model, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, max_steps=6), callbacks=[Spy()])
    steps = [s for s in seen if s[0] == "step"]
    # warm-up of 2 steps, then linear decay to 0 at step 6: the lr each step used
    assert [s[2] for s in steps] == pytest.approx([1.5e-3, 3e-3, 3e-3, 2.25e-3, 1.5e-3, 0.75e-3])
    assert [(s[1], s[3]) for s in steps] == [tuple(x) for x in record["loss_log"]]
    assert [s[1:] for s in seen if s[0] == "evaluate"] == [(e["step"], e["dev_loss"]) for e in record["evals"]]
    assert seen[0] == ("start", 0) and seen[-1] == ("end", 6, "completed")


# ------------------------------------------------------------------------------ optimizer factories


def test_optimizer_factory_forms(tmp_path):
    from gpt2lab.optim import AdamW, decay_groups

    config = toy_config(None, max_steps=3)
    calls = []

    def make(model, lr):  # the model form: groups by name and module
        calls.append(model)
        return AdamW(decay_groups(model, weight_decay=0.1), lr=lr)

    model = toy_model()
    record = train(model, ToyTask(), make, config)
    assert calls == [model]
    groups = record["optimizer"]["groups"]
    assert [(g["weight_decay"], g["n_params"]) for g in groups] == [(0.1, 8), (0.0, 20)]
    reference = toy_model()  # the same groups given to torch's AdamW give the same weights
    train(reference, ToyTask(),
          lambda model, lr: torch.optim.AdamW(decay_groups(model, weight_decay=0.1), lr=lr), config)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    for factory in (torch.optim.AdamW, AdamW, functools.partial(torch.optim.AdamW, weight_decay=0.0)):  # old form
        assert train(toy_model(), ToyTask(), factory, config)["status"] == "completed"
    with pytest.raises(ValueError, match=r"leaves out 2 trainable parameters \(transformer.ln_f.weight, "
                                         r"transformer.ln_f.bias\)"):
        train(toy_model(), ToyTask(), lambda model, lr: torch.optim.AdamW(
            [p for n, p in model.named_parameters() if "ln_f" not in n], lr=lr), config)


# ------------------------------------------------------------------------------ frozen base, folders, files


def frozen_base_model(seed=0):
    """The toy model with only two LayerNorms trainable: a frozen base, as in an adapter run."""
    model = toy_model(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("transformer.ln_f.", "transformer.h.1.ln_2.")))
    return model


def test_frozen_base_checkpoints_hold_only_the_trainable_part(tmp_path):
    full = frozen_base_model()
    train(full, ToyTask(), torch.optim.AdamW, toy_config(tmp_path / "full"))

    def interrupt(loop):
        if loop.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(frozen_base_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path), callbacks=[interrupt])
    run_dir = tmp_path / "toy"
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert sorted(ckpt["model"]) == ["transformer.h.1.ln_2.bias", "transformer.h.1.ln_2.weight",
                                     "transformer.ln_f.bias", "transformer.ln_f.weight"]
    whole = tmp_path / "whole.pt"
    torch.save(full.state_dict(), whole)
    for name in ("checkpoint.pt", "best.pt"):  # the model alone is larger than a whole checkpoint with a frozen base
        assert (run_dir / name).stat().st_size < whole.stat().st_size / 3, name
    resumed = frozen_base_model()
    train(resumed, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True))
    assert_same_params(full, resumed)
    other_base = frozen_base_model(seed=1)  # another base: the fingerprint refuses it
    with pytest.raises(ValueError, match=r"frozen base weights \(fingerprint [0-9a-f]+ -> [0-9a-f]+"):
        train(other_base, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True))


def test_default_run_names_differ_by_method_and_settings(tmp_path):
    config = dict(max_steps=1, run_name=None, evaluate=False)
    a = train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, **config))
    b = train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, method="lora-r8-qv", **config))
    c = train(toy_model(), ToyTask(), torch.optim.SGD, toy_config(tmp_path, **config))
    assert a["run_name"].startswith("sonnet-full-adamw-lr0.003-bs3-seed1337-")
    assert b["run_name"].startswith("sonnet-lora-r8-qv-adamw-lr0.003-bs3-seed1337-")
    assert c["run_name"].startswith("sonnet-full-sgd-")
    assert len({a["run_dir"], b["run_dir"], c["run_dir"]}) == 3
    # the same config finds its own folder again: resume=True picks up the finished run without training
    again = train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True, **config))
    assert again["run_dir"] == a["run_dir"] and again["resumed_from_step"] == 1


def test_a_second_run_on_a_locked_folder_fails_at_once(tmp_path):
    import socket

    from gpt2lab.runs import RunLock, RunLockedError

    (tmp_path / "toy").mkdir()
    task = CountingTask()
    with RunLock(tmp_path / "toy"):
        with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {os.getpid()} on "
                                                 rf"{socket.gethostname()}, started 20"):
            train(toy_model(), task, torch.optim.AdamW, toy_config(tmp_path))
    assert task.calls == 0
    assert train(toy_model(), task, torch.optim.AdamW, toy_config(tmp_path, max_steps=1))["status"] == "completed"
    assert not (tmp_path / "toy" / "lock.json").exists()  # released


class CountingTask(ToyTask):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss(self, model, batch):
        self.calls += 1
        return super().loss(model, batch)


def test_unwritable_out_dir_fails_before_the_first_step(tmp_path):
    task = CountingTask()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=rf"cannot write to the run folder {blocker}/toy/toy") as err:
        train(toy_model(), task, torch.optim.AdamW, toy_config(blocker / "toy"))
    assert "\n" not in str(err.value) and task.calls == 0
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):  # root ignores permissions: the case above covers it
            pytest.skip("running as root: a read-only folder is still writable")
        with pytest.raises(PermissionError, match=rf"cannot write to the run folder {read_only}/toy"):
            train(toy_model(), task, torch.optim.AdamW, toy_config(read_only))
        assert task.calls == 0
    finally:
        read_only.chmod(0o755)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path, capsys):
    full_model, full_record = uninterrupted

    def interrupt(loop):
        if loop.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path), callbacks=[interrupt])
    run_dir = tmp_path / "toy"
    latest = run_dir / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a copy cut short
    (run_dir / ".checkpoint.pt.tmp999999").write_bytes(b"half a checkpoint")  # a killed write's leftovers
    (run_dir / ".record.json.tmp1").write_text("{")
    capsys.readouterr()
    resumed = toy_model(seed=3)
    record = train(resumed, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True))
    out = capsys.readouterr().out
    assert "removed 2 stale temporary file(s)" in out and ".checkpoint.pt.tmp999999" in out
    assert not list(run_dir.glob(".*.tmp*"))
    fallback = [line for line in out.splitlines() if line.startswith("could not read checkpoint.pt")]
    assert len(fallback) == 1 and "falling back to the previous checkpoint" in fallback[0] and "(step 4)" in fallback[0]
    assert record["resumed_from_step"] == 4
    assert_same_params(full_model, resumed)  # resuming from the step before is just as exact
    assert same_metrics(record, full_record)


def test_progress_false_silences_the_tasks_evaluation_bars():
    class ProgressTask(ToyTask):
        def __init__(self):
            super().__init__()
            self.seen = []

        def evaluate(self, model, progress=None):
            self.seen.append(progress)
            return super().evaluate(model)

    quiet, loud = ProgressTask(), ProgressTask()
    train(toy_model(), quiet, torch.optim.AdamW, toy_config(None, max_steps=3))  # progress=False
    train(toy_model(), loud, torch.optim.AdamW, toy_config(None, max_steps=3, progress=True))
    assert quiet.seen == [False] and loud.seen == [None]  # None: the task decides (on, except in quick mode)
    # a task whose evaluate takes no options is called as before
    assert train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(None, max_steps=3))["status"] == "completed"


# ------------------------------------------------------------------- notebook 09: the fields added for the GPU path


def test_new_result_fields_keep_old_run_names_at_their_defaults(tmp_path):
    """Runs named before length_batching existed keep their names: at its default it is not in the identity."""
    from gpt2lab.train import RESULT_FIELDS, identity_config

    before = ("batch_size", "lr", "warmup_steps", "schedule", "grad_clip", "amp", "seed", "method")  # the old set
    assert list(identity_config(TrainConfig())) == list(before)
    assert "length_batching" in RESULT_FIELDS
    assert "length_batching" in identity_config(TrainConfig(length_batching=True))
    names = [train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path / str(i), run_name=None,
                                                                         max_steps=1, evaluate=False, **kw))["run_name"]
             for i, kw in enumerate([{}, {"length_batching": True}])]
    assert names[0] != names[1]


def test_resume_treats_a_checkpoint_without_length_batching_as_false(tmp_path):
    train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, max_steps=2))
    path = tmp_path / "toy" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["config"]["length_batching"], ckpt["config"]["compile"]  # as written before the fields existed
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="length_batching False -> True"):
        train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True, length_batching=True))
    record = train(toy_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True, max_steps=4))
    assert record["resumed_from_step"] == 2 and record["steps"] == 4


def test_record_has_world_size_and_the_time_of_every_evaluation(uninterrupted):
    _, record = uninterrupted
    assert record["world_size"] == 1
    times = record["eval_times"]
    assert [t["step"] for t in times] == [e["step"] for e in record["evals"]]
    for key in ("train_time_s", "wall_time_s"):
        assert all(0 < a[key] <= b[key] for a, b in zip(times, times[1:]))
    assert times[-1]["train_time_s"] <= record["train_time_s"] and times[-1]["wall_time_s"] <= record["wall_time_s"]
    assert all(t["train_time_s"] < t["wall_time_s"] for t in times)  # wall time also counts the evaluations


@pytest.mark.skipif(sys.platform != "linux" or not (shutil.which("cc") or shutil.which("gcc")),
                    reason="torch.compile on the CPU needs Linux and a C compiler")
def test_compile_trains_like_eager_and_keeps_hooks():
    """compile=True: the same steps as eager up to float rounding, with a forward hook on a module inside a block
    (it halves the MLP's output) in effect at every step. Equal-length examples, no evaluation, dropout off (compiled
    dropout draws other masks): one compilation."""

    class Equal(ToyTask):  # every example 12 tokens: one shape
        def __init__(self):
            super().__init__(n_train=6)
            self.train_set = [e[:12] for e in self.train_set]

    def run(compile_):
        torch.manual_seed(0)
        model = GPT2(GPT2Config.tiny(vocab_size=64, n_positions=48, n_embd=32, n_head=2))
        calls = []
        model.transformer.h[0].mlp.register_forward_hook(lambda module, args, out: calls.append(1) or out * 0.5)
        record = train(model, Equal(), torch.optim.AdamW, toy_config(None, epochs=1, evaluate=False, batch_size=3,
                                                                     compile=compile_))
        return model, [loss for _, loss in record["loss_log"]], calls

    eager, compiled = run(False), run(True)
    assert compiled[0]._compiled_call_impl is not None  # it did compile
    assert compiled[1] == pytest.approx(eager[1], rel=1e-5)  # a lost hook changes the loss by ~1e-2
    for p, q in zip(eager[0].parameters(), compiled[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert len(compiled[2]) == len(eager[2]) == 2  # the hook ran at both steps
