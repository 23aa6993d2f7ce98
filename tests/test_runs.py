"""gpt2lab.runs: run names, the folder lock, checkpoint files kept and fallen back to, stale temp files, fingerprints.
The loop's use of them (train refusing, falling back, taking over) is tested in test_train.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from gpt2lab import runs
from gpt2lab.runs import RunLock, RunLockedError


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): no process has it now."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / "lock.json").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLockedError) as err:
            RunLock(tmp_path).acquire()
        message = str(err.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}, started {holder['started']}" in message
        assert str(tmp_path) in message and "\n" not in message
    assert not (tmp_path / "lock.json").exists()
    RunLock(tmp_path).acquire().release()  # free again


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    (tmp_path / "lock.json").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    lock = RunLock(tmp_path).acquire()
    assert f"taking over the stale lock of {tmp_path} (pid {pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / "lock.json").write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "started": "earlier"}))
    with pytest.raises(RunLockedError, match="on elsewhere, started earlier"):
        RunLock(tmp_path).acquire()


def test_release_leaves_someone_elses_lock(tmp_path):
    lock = RunLock(tmp_path).acquire()
    (tmp_path / "lock.json").write_text(json.dumps({"pid": 1, "host": "x", "token": "other"}))  # taken over since
    lock.release()
    assert (tmp_path / "lock.json").exists()


def test_save_keeps_the_previous_checkpoint_and_load_falls_back(tmp_path, capsys):
    for step in (1, 2):
        runs.save_checkpoint({"state": {"step": step}}, tmp_path)
    assert torch.load(tmp_path / "checkpoint.prev.pt")["state"]["step"] == 1
    ckpt, path = runs.load_checkpoint(tmp_path)
    assert ckpt["state"]["step"] == 2 and path.name == "checkpoint.pt" and capsys.readouterr().out == ""
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    ckpt, path = runs.load_checkpoint(tmp_path)
    out = capsys.readouterr().out.strip()
    assert ckpt["state"]["step"] == 1 and path.name == "checkpoint.prev.pt"
    assert out.startswith("could not read checkpoint.pt (") and out.endswith("(step 1)") and "\n" not in out
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no checkpoint can be read: checkpoint.pt \(.*\); checkpoint.prev.pt"):
        runs.load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pt").unlink()
    (tmp_path / "checkpoint.prev.pt").unlink()
    assert runs.load_checkpoint(tmp_path) == (None, None)


def test_only_previous_checkpoint_after_a_crash_between_renames(tmp_path):
    runs.save_checkpoint({"state": {"step": 3}}, tmp_path)
    os.replace(tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt")
    ckpt, path = runs.load_checkpoint(tmp_path)
    assert ckpt["state"]["step"] == 3 and path.name == "checkpoint.prev.pt"


def test_remove_stale_temps_removes_only_temp_files(tmp_path):
    names = [".checkpoint.pt.tmp123", ".record.json.tmp9", ".best.pt.tmp4"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    for keep in ("checkpoint.pt", "notes.tmp1", ".hidden"):
        (tmp_path / keep).write_bytes(b"x")
    assert runs.remove_stale_temps(tmp_path) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "checkpoint.pt", "notes.tmp1"]


def test_check_writable(tmp_path):
    runs.check_writable(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match=rf"^cannot write to the run folder {tmp_path}/file/run \("):
        runs.check_writable(tmp_path / "file" / "run")


def test_run_name_is_readable_stable_and_keeps_runs_apart():
    identity = {"config": {"lr": 1e-4, "seed": 1}, "optimizer": {"name": "AdamW"}}
    name = runs.run_name("paraphrase", "lora r8/qv", "AdamW", 2e-5, 16, 1337, identity)
    assert name.startswith("paraphrase-lora-r8-qv-adamw-lr2e-05-bs16-seed1337-") and len(name.split("-")[-1]) == 8
    assert name == runs.run_name("paraphrase", "lora r8/qv", "AdamW", 2e-5, 16, 1337, dict(identity))
    other = {**identity, "config": {"lr": 1e-4, "seed": 1, "grad_clip": None}}
    assert name != runs.run_name("paraphrase", "lora r8/qv", "AdamW", 2e-5, 16, 1337, other)


def test_weights_fingerprint_sees_names_shapes_and_values():
    torch.manual_seed(0)
    tensors = {"a": torch.randn(40, 30), "b": torch.randn(7)}
    base = runs.weights_fingerprint(tensors.items())
    assert base == runs.weights_fingerprint(reversed(list(tensors.items())))  # order-free
    assert base == runs.weights_fingerprint({k: v.clone() for k, v in tensors.items()}.items())
    changed = {**tensors, "a": tensors["a"] + 1e-3}
    renamed = {"a2": tensors["a"], "b": tensors["b"]}
    reshaped = {**tensors, "a": tensors["a"].reshape(30, 40)}
    for variant in (changed, renamed, reshaped):
        assert runs.weights_fingerprint(variant.items()) != base


def test_peak_memory_is_reset_at_start():
    memory = runs.PeakMemory(torch.device("cpu"))
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del big
    memory.start()
    assert memory.how is not None
    if "reset at the start" in memory.how:
        before = memory.peak_mb()
        grown = torch.ones(64 * 2**20 // 4)
        assert memory.peak_mb() > before + 32
        del grown


def test_weights_fingerprint_of_a_gpt2_sized_embedding():
    # gpt2's wte has 38,597,376 values: float32 sample indices would round the last one out of range
    big = torch.zeros(50257, 768)
    big[-1, -1] = 1.0
    assert runs.weights_fingerprint([("wte", big)]) != runs.weights_fingerprint([("wte", torch.zeros(50257, 768))])
