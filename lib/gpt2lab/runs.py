"""Run folders: names derived from the config, a lock, checkpoint files that survive crashes, this run's peak memory.

Built in notebook 04 (finetune), §6; used by `gpt2lab.train` (every run) and by the later method notebooks, whose
runs share one results folder.

* `run_name(...)`: readable + a short hash of everything that changes the result, e.g.
  `paraphrase-full-adamw-lr2e-05-bs16-seed1337-3f2a9c1b`, so two methods (or two lrs) on one task never share a
  folder, and the same config always finds its own folder again (that is how `resume=True` finds a run).
* `RunLock`: `lock.json` (pid, host, start time) created with O_EXCL. A second run on the folder fails at once,
  naming the holder; a lock left by a dead process on this host (a killed job) is taken over, saying so.
* `save_checkpoint` / `load_checkpoint`: the new checkpoint is written to a temporary file, then the current one
  becomes `checkpoint.prev.pt` and the new one takes its place. A latest checkpoint that cannot be read (a disk
  that filled up, a copy cut short) falls back to the previous one, saying so.
* `remove_stale_temps`: temporary files of killed writes (`.name.tmpPID`) are removed when a run takes the lock.
* `weights_fingerprint`: names, shapes, dtypes and a few sampled values of some tensors, hashed; checkpoints of
  a run with a frozen base store it instead of the base (see `gpt2lab.train`).
* `PeakMemory`: this run's own peak memory, reset at its start (CUDA: `torch.cuda.reset_peak_memory_stats`;
  Linux CPU: memory freed by earlier work handed back with glibc's malloc_trim, then the process's peak RSS reset
  by writing "5" to /proc/self/clear_refs, read as VmHWM; else the resident size sampled at each step with
  psutil; else the process's lifetime peak, said so in the record).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path

import torch

LOCK = "lock.json"
CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
BEST = "best.pt"
RECORD = "record.json"
RUN_FILES = (CHECKPOINT, PREVIOUS, BEST, RECORD)  # what `overwrite` removes (never anything else in the folder)
_TEMP = re.compile(r"^\..+\.tmp\d+$")  # `.checkpoint.pt.tmp1234`: the temporary names of atomic_save / atomic_write


class RunLockedError(RuntimeError):
    """Another process is using the run folder. Raised by `RunLock.acquire` (notebook 04, §6)."""


# ---------------------------------------------------------------------------------------------- names


def short_hash(obj) -> str:
    """8 hex digits of the sha256 of `obj` written as sorted JSON (non-JSON values by their repr)."""
    text = json.dumps(obj, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_name(task: str, method: str, optimizer: str, lr: float, batch_size: int, seed: int, identity: dict) -> str:
    """`<task>-<method>-<optimizer>-lr<lr>-bs<batch>-seed<seed>-<hash of identity>`, safe as a folder name.

    Notebook 04, §3. `identity` must hold everything that changes the result (config, optimizer settings, data
    size, starting weights): the readable part is for people, the hash keeps different runs apart.
    """
    readable = f"{task}-{method}-{optimizer.lower()}-lr{lr:g}-bs{batch_size}-seed{seed}"
    return re.sub(r"[^A-Za-z0-9._+=-]", "-", readable) + "-" + short_hash(identity)


def weights_fingerprint(named_tensors) -> str:
    """16 hex digits identifying a set of named tensors: names, shapes, dtypes and 16 values sampled from each.

    Notebook 04, §6. Cheap on a 124M-parameter model (a 16-element gather per tensor) and exact (no reduction whose
    rounding could differ between runs); it catches other weights (a different checkpoint, a merged adapter)
    but is not a cryptographic proof that every value is the same.
    """
    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda item: item[0]):
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.reshape(-1)
        if flat.numel():
            # float64: in float32 the last index of gpt2's wte (38,597,375) rounds up to 38,597,376, out of range
            idx = torch.linspace(0, flat.numel() - 1, min(16, flat.numel()), dtype=torch.float64).long().to(flat.device)
            h.update(flat[idx].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- the folder


def check_writable(run_dir: Path) -> None:
    """Create `run_dir` and write a probe file in it, so an unwritable folder fails before the first step."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe.tmp{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write to the run folder {run_dir} ({err.strerror or err}); "
                              "pass a writable out_dir (or out_dir=None to write no files)") from None


def remove_stale_temps(run_dir: Path) -> list[str]:
    """Delete the temporary files of writes that were killed mid-way; call only while holding the lock."""
    removed = []
    for path in run_dir.iterdir():
        if _TEMP.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 checks without sending anything)."""
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate it on Windows: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """`lock.json` in the run folder while a run uses it (notebook 04, §6). Use as a context manager.

    The file is created with O_CREAT | O_EXCL, so of two processes starting at once exactly one gets it. The other
    raises `RunLockedError` naming the holder (pid, host, start time). A lock whose pid is dead on this host is
    stale (the run was killed) and is taken over with a printed note; a lock from another host is never taken
    over, since its pid cannot be checked from here.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.token = uuid.uuid4().hex
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "token": self.token}
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
        return True

    def acquire(self) -> RunLock:
        if self._create():
            self.held = True
            return self
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            raise RunLockedError(f"{self.path.parent} is locked by {self.path}, which cannot be read (being written?); "
                                 "if no run uses this folder, delete the lock file") from None
        who = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
        stale = holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1)))
        if not stale:
            raise RunLockedError(f"{self.path.parent} is in use by another run ({who}); wait for it to finish, "
                                 "or pick another run_name or out_dir")
        print(f"taking over the stale lock of {self.path.parent} ({who}: that process is no longer running)")
        self.path.unlink(missing_ok=True)
        if not self._create():  # someone else took it over in between
            raise RunLockedError(f"{self.path.parent} was taken by another run while clearing a stale lock")
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:  # never remove someone else's lock
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------- checkpoints


def _save_temp(obj, path: Path) -> Path:
    """torch.save `obj` to `.<name>.tmp<pid>` beside `path`, flushed to disk; returns the temporary file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(_save_temp(obj, path), path)


def save_checkpoint(obj, run_dir: Path) -> None:
    """Write checkpoint.pt, keeping the one it replaces as checkpoint.prev.pt (the fallback of `load_checkpoint`).

    The new file is complete on disk before anything is renamed; a crash between the two renames leaves
    checkpoint.prev.pt and no checkpoint.pt, which `load_checkpoint` handles.
    """
    latest, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    tmp = _save_temp(obj, latest)
    if latest.exists():
        os.replace(latest, previous)
    os.replace(tmp, latest)


def load_checkpoint(run_dir: Path):
    """The newest readable checkpoint of the run as (checkpoint, path), or (None, None) when there is none.

    A latest checkpoint that cannot be read is reported in one line and the previous one is used.
    """
    candidates = [p for p in (run_dir / CHECKPOINT, run_dir / PREVIOUS) if p.exists()]
    failures = []
    for path in candidates:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)  # RNG states live on the CPU
        except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            failures.append(f"{path.name} ({reason[:120]})")
            continue
        if failures:
            print(f"could not read {failures[0]}; falling back to the previous checkpoint {path} "
                  f"(step {ckpt['state']['step']})")
        return ckpt, path
    if failures:
        raise ValueError(f"cannot resume from {run_dir}: no checkpoint can be read: {'; '.join(failures)}; "
                         "use resume=False with overwrite=True to start over")
    return None, None


# ---------------------------------------------------------------------------------------------- memory


class PeakMemory:
    """This run's peak memory in MiB, measured from `start()` on (notebook 04, §7; one per `train` call).

    `how` says which measure was used; see the module docstring for the order they are tried in.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.how = None
        self._mode = None  # "cuda", "vmhwm", "sampled" or "lifetime", set by start()
        self._sampled = 0.0

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._mode, self.how = "cuda", "torch.cuda.max_memory_allocated, reset at the start of the run"
        elif _reset_vmhwm():
            self._mode = "vmhwm"
            self.how = "peak resident memory (VmHWM), reset at the start of the run via /proc/self/clear_refs"
        elif _rss_mb() is not None:
            self._mode, self.how = "sampled", "resident memory sampled after every step and evaluation (psutil)"
            self.sample()
        else:
            self._mode = "lifetime"
            self.how = "the process's lifetime peak resident memory (ru_maxrss): not resettable on this system"
        return self

    def sample(self) -> None:
        """Note the current resident size (used only when no peak counter can be reset)."""
        if self._mode == "sampled":
            self._sampled = max(self._sampled, _rss_mb() or 0.0)

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._mode == "vmhwm":
            return _vmhwm_mb()
        if self._mode == "sampled":
            return self._sampled
        try:
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
        except ImportError:  # Windows without psutil
            return float("nan")


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def _reset_vmhwm() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    _malloc_trim()
    for _ in range(5):  # the write can be interrupted on a busy machine (seen once in a full test run): try again
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (VmHWM) to the current RSS; Linux >= 4.0
            return _vmhwm_mb() == _vmhwm_mb()  # readable (not NaN)
        except PermissionError:
            return False
        except OSError:
            time.sleep(0.01)
    return False


def _malloc_trim() -> None:
    """Hand memory freed by earlier work (an earlier run in this process) back to the OS, so that the resident size
    the peak is reset to counts only live memory (glibc keeps freed heap memory otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20
