"""One training loop for every task and method: progress bars, evaluation, early stopping, checkpoints, exact resume.

Built in notebook 04 (finetune), §3 (the loop) and §6 (checkpoints and exact resume); the method notebooks (LoRA,
SMART, SOAP, AdaPreLoRA) plug into it through the three extension points below.

    record = train(model, task, make_optimizer, TrainConfig(epochs=3, lr=1e-4, method="full"), callbacks=[...])

A task is described in `gpt2lab.tasks`.

Extension points
----------------
* **The optimizer factory sees the model.** A factory whose first parameter is named `model` is called as
  `make_optimizer(model, lr)` and can build param groups from names and modules (e.g. with
  `gpt2lab.optim.decay_groups`, or LoRA+'s separate group for the B matrices). Any other callable is called the
  old way, `make_optimizer(params, lr)` with the list of trainable parameters, so `torch.optim.AdamW`,
  `gpt2lab.optim.AdamW` or a `functools.partial` of either can be passed as is. Either way the optimizer must
  hold exactly the trainable parameters (one line names those left out or frozen ones put in).
* **Callbacks get the loop's state.** A `Callback` overrides any of `on_start`, `on_step` (after every optimizer
  step), `on_evaluate` (after every evaluation) and `on_end`, each called with the `Loop` (step, epoch, loss,
  lr, lrs, metrics, model, optimizer, scheduler, task, config, state). A plain function is an `on_step`
  callback: `fn(loop)`. A callback with `state_dict()` / `load_state_dict(state)` has that state saved in
  every checkpoint and restored on resume (e.g. an EMA of the weights, an lr log), so it survives an
  interruption exactly. Raising from a callback (KeyboardInterrupt) stops the run like pressing ■.
* **Frozen bases.** When some parameters have requires_grad False (LoRA), checkpoint.pt and best.pt hold only
  the trainable parameters (plus buffers) and a fingerprint of the frozen base, which resume checks.

Reproducibility. A fresh run seeds python, numpy and torch with `config.seed` before its first step, so the same
config from the same starting weights gives the same weights and record (apart from times) with dropout on.
Batches are drawn from a permutation seeded by (seed, epoch), a function of the position in training, not of
history. A checkpoint stores the model, optimizer, scheduler, grad-scaler and callback states, every RNG state,
the position (epoch, batch, step), the best dev metric, the history and the time spent so far; `resume=True`
restores all of it and skips the batches already seen, so an interrupted run resumed from its last checkpoint
ends with exactly the parameters and metrics of an uninterrupted one (bit-for-bit on a CPU; on a GPU as far as
its kernels are deterministic). Evaluation runs under its own fixed seed (torch.random.fork_rng), so sampling
sonnets never shifts the training RNG.

Resume checks. Every config field is in one of three sets (a test keeps them complete): `RESULT_FIELDS` change
the result and must match the checkpoint, as must the training-set size, the task, the optimizer's class and
param-group settings, the trainable parameters, the stateful callbacks and (frozen base) the base's
fingerprint; all mismatches are refused in one line, old -> new. `EXTEND_FIELDS` only say how far the run goes
or how it is watched (epochs, max_steps, patience, evaluation and checkpoint frequency, logging): they are
accepted, and the line that announces the resume lists them. `PLACE_FIELDS` say where the run lives. With
schedule="linear" a new step budget moves the end of the decay (said in the same line).

Run folders (`gpt2lab.runs`). out_dir/run_name/ holds checkpoint.pt (latest), checkpoint.prev.pt (the one before,
the fallback when the latest cannot be read), best.pt (best dev weights), record.json, and lock.json while a run
uses it. The default run_name is derived from the config, the optimizer, the data size and the starting
weights (readable + hash), so different methods or hyper-parameters never share a folder and the same run
finds its folder again. The folder is checked for writing and locked before the first step. resume=False on a
folder that holds a run refuses unless `overwrite=True`.

The record (record.json) holds, besides the metrics: training time and evaluation time separately (and the time
spent writing files), it/s and tokens/s from training time only, this run's own peak memory and how it was
measured, the optimizer's name, settings and state size in bytes, trainable and total parameters, the number of
processes (`world_size`), and `eval_times`: one {step, train_time_s, wall_time_s} per entry of `evals` (same
order), the cumulative training and wall seconds when that evaluation ended, for plotting a metric against time.
(They sit beside `evals`, not inside its entries, so that two runs of one config still have equal `evals`.)

GPU path (notebook 09, experiments). `amp="bf16"` autocasts on CUDA; attention is PyTorch's fused
scaled_dot_product_attention (`gpt2lab.attention`); on CUDA every batch is collated on the CPU, pinned and copied
with non_blocking=True. `compile=True` compiles the model in place (`compile_model`), so hooks and swapped modules
still take effect. `length_batching=True` draws batches of similar lengths (`length_batches`) to cut padding;
still a function of (seed, epoch), so exact resume holds.

Several processes (`gpt2lab.parallel`, notebook 09). When a torch.distributed process group of N > 1 processes is
up, `batch_size` is the global batch and each rank trains on its share; the step equals one process's on the
whole batch up to float rounding (each rank's loss weighted by its share of the loss terms, `loss_terms`,
gradients summed). Rank 0 evaluates, prints, holds the lock and writes every file; the others read them.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import parallel, runs
from .batches import epoch_order, example_length, length_batches, loss_terms
from .environment import seed_everything
from .tasks import atomic_write_text, eval_mode, model_device, to_device


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model, the task, the optimizer factory and the callbacks.

    Built in notebook 04 (finetune), §3. Step counts are optimizer steps (one batch each).
    """

    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-4
    max_steps: int | None = None  # stop after this many steps in total (None: run all epochs)
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    schedule: str = "constant"  # after warm-up: "constant" or "linear" (decay to 0 at the last step)
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    amp: str | None = None  # "bf16" or "fp16" autocast, on CUDA only (ignored with a note elsewhere)
    evaluate: bool = True  # False: never evaluate (e.g. to overfit one batch)
    eval_every: int | None = None  # evaluate every N steps; None: at the end of every epoch
    patience: int | None = None  # stop after this many evaluations without a better dev metric
    restore_best: bool = True  # at the end, load the weights of the best evaluation (when there was one)
    checkpoint_every: int | None = None  # also checkpoint every N steps (always after each evaluation)
    seed: int = 1337
    method: str = "full"  # what is trained and how, in the run name: "full", "lora-r8-qv", "smart", ...
    out_dir: str | None = "results"  # None: write no files at all
    run_name: str | None = None  # None: derived from the config (see gpt2lab.runs.run_name)
    resume: bool = False  # continue from out_dir/run_name/checkpoint.pt when it exists
    overwrite: bool = False  # resume=False on a folder holding a run: start over instead of refusing
    log_every: int = 10  # record the training loss every N steps (for loss curves)
    progress: bool = True  # tqdm.auto progress bars
    extra: dict = field(default_factory=dict)  # free-form notes stored in the record (model name...)
    # Notebook 09 (experiments), the GPU path:
    length_batching: bool = False  # batches of similar lengths (less padding); see `length_batches`
    # Compile in place (`compile_model`). Tested: CPU + float32 + one process (test_train.py, equal to eager within
    # float rounding, hooks still fire). Needs a C compiler on the CPU. Not tested here: CUDA, bf16, several processes.
    compile: bool = False

    def __post_init__(self):
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"schedule must be 'constant' or 'linear', not {self.schedule!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', not {self.amp!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size ({self.batch_size}) and epochs ({self.epochs}) must be at least 1")


# which config fields must match on resume, which may change, which only place the run (see the module docstring)
RESULT_FIELDS = ("batch_size", "lr", "warmup_steps", "schedule", "grad_clip", "amp", "seed", "method",
                 "length_batching")
# compile: how the same math is executed (equal up to float rounding), so a run compiled on a GPU may be resumed
# uncompiled elsewhere, like a change of device
EXTEND_FIELDS = ("epochs", "max_steps", "patience", "evaluate", "eval_every", "checkpoint_every", "restore_best",
                 "log_every", "progress", "compile")
PLACE_FIELDS = ("out_dir", "run_name", "resume", "overwrite", "extra")
# Fields added after runs were already named and stored (results folders, notebook outputs): they enter the run
# name's identity, and are compared on resume, only when not at their default, so those runs keep their names and
# their checkpoints (which lack the field) still resume.
LATE_FIELDS = {"length_batching": False, "compile": False}


def identity_config(config: TrainConfig) -> dict:
    """The RESULT_FIELDS part of a run's identity (its name's hash); a late field only when not at its default."""
    return {k: getattr(config, k) for k in RESULT_FIELDS
            if k not in LATE_FIELDS or getattr(config, k) != LATE_FIELDS[k]}


# ---------------------------------------------------------------------------------------------- callbacks


class Callback:
    """Base class of the loop's callbacks (notebook 04, §3): override the events you need.

    Add `state_dict()` and `load_state_dict(state)` to have the callback's state checkpointed and restored.
    """

    def on_start(self, loop: Loop) -> None:
        """Before the first step of this call (after a resume has restored everything)."""

    def on_step(self, loop: Loop) -> None:
        """After every optimizer step: loop.step, loop.loss and loop.lr describe the step just taken."""

    def on_evaluate(self, loop: Loop) -> None:
        """After every evaluation: loop.metrics is its entry (step, epoch, train_loss and the task's metrics)."""

    def on_end(self, loop: Loop) -> None:
        """After the last step (and before the best weights are restored); loop.state['status'] says why."""


EVENTS = ("start", "step", "evaluate", "end")


class _OnStep(Callback):
    """A plain function used as a callback: called as fn(loop) after every step."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def on_step(self, loop: Loop) -> None:
        self.fn(loop)


@dataclass
class Loop:
    """What callbacks see (notebook 04, §3): the objects of the run and where it stands.

    `state` is the loop's own dict (step, epoch, batch, best, evals, ...; saved in checkpoints): read it, do not
    change it. `loss` and `lrs` describe the last optimizer step (`lr` is the first group's lr); `metrics` the last
    evaluation.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    task: object
    config: TrainConfig
    state: dict
    run_dir: Path | None = None
    event: str = "start"
    loss: float | None = None
    lrs: list = field(default_factory=list)
    metrics: dict | None = None

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def epoch(self) -> int:
        return self.state["epoch"]

    @property
    def lr(self) -> float | None:
        return self.lrs[0] if self.lrs else None


def _stateful(callback) -> bool:
    return callable(getattr(callback, "state_dict", None)) and callable(getattr(callback, "load_state_dict", None))


class _Interrupted(Exception):
    """Internal: a non-finite loss or gradient; carries the one-line message."""


# ------------------------------------------------------------------------------------------------- helpers


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile `model` in place with `model.compile()` (notebook 09, experiments); returns it.

    In place, the module tree stays: forward hooks and swapped submodules (LoRA) still take effect (dynamo guards
    on them and recompiles after a change), and the model stays compiled after training. The whole model, not each
    `Block`: compiling the blocks one by one lets the blocks share one compiled graph, which then drops a hook put
    on ONE block's submodule (seen with torch 2.13; the test in test_train.py guards the whole-model way).
    Only calls of the model itself are compiled: a task that calls other methods (ParaphraseTask's
    `model.hidden_states` and `model.head`) runs those eagerly.
    """
    model.compile()
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor (e.g. GPT-2's tied head) counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def versions() -> dict:
    import transformers

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "gpt2lab": __version__, "numpy": np.__version__}


def _plain(value):
    """A param-group setting as JSON-able data, for comparing and recording (tuples -> lists, tensors -> numbers)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def build_optimizer(make_optimizer: Callable, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Call the factory the way it asks for (see the module docstring) and check it holds the trainable parameters."""
    try:
        first = next(iter(inspect.signature(make_optimizer).parameters), None)
    except (TypeError, ValueError):  # a callable without a signature: the old form
        first = None
    if first == "model":
        optimizer = make_optimizer(model, lr)
    else:
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    named = list(model.named_parameters())
    left_out = [n for n, p in named if p.requires_grad and id(p) not in held]
    frozen_in = [n for n, p in named if not p.requires_grad and id(p) in held]
    if left_out or frozen_in:
        which = (f"leaves out {len(left_out)} trainable parameters ({', '.join(left_out[:3])}"
                 f"{', ...' if len(left_out) > 3 else ''})" if left_out else
                 f"holds {len(frozen_in)} frozen parameters ({', '.join(frozen_in[:3])})")
        raise ValueError(f"the optimizer built by {getattr(make_optimizer, '__name__', make_optimizer)!r} {which}: "
                         "give it exactly the parameters with requires_grad=True")
    return optimizer


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    """Class and param-group settings (everything but the tensors), taken before the scheduler changes any lr."""
    groups = [{**{k: _plain(v) for k, v in g.items() if k not in ("params", "param_names")},
               "n_params": len(g["params"])} for g in optimizer.param_groups]
    return {"name": type(optimizer).__name__, "module": type(optimizer).__module__, "groups": groups}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (Adam: two per parameter, plus step counts)."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def _accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` takes a keyword argument `name` (directly or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _lr_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:  # step = number of optimizer steps already taken
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - config.warmup_steps))
        return 1.0

    return factor


def _better(value: float, best: float | None, higher_is_better: bool) -> bool:
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def _model_weights(model: nn.Module, trainable_only: bool) -> dict:
    """The model's state dict, or (frozen base) only its trainable parameters and its buffers."""
    if not trainable_only:
        return model.state_dict()
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()
            if not isinstance(v, nn.Parameter) or v.requires_grad}


def _load_weights(model: nn.Module, weights: dict, trainable_only: bool, where) -> None:
    if not trainable_only:
        model.load_state_dict(weights)
        return
    frozen = {k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)
              and not v.requires_grad}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    wrong = sorted(set(missing) - frozen) + sorted(unexpected)
    if wrong:
        raise ValueError(f"cannot load {where}: its weights do not match this model's trainable parameters "
                         f"({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''})")


def _rank_seed(seed: int, rank: int) -> int:
    """The torch seed of rank > 0 (rank 0 keeps `seed`, as in one process): other dropout masks on every rank."""
    return seed * 1_000_003 + 7919 * rank


def _per_rank_statistics(optimizer) -> bool:
    """Whether the optimizer gathers statistics from hooks on its own process's backward (AdaPreLoRA): such
    statistics would be per-rank under data parallelism. An optimizer can also say so with `per_rank_statistics`."""
    from .optim import AdaPreLoRA

    return isinstance(optimizer, AdaPreLoRA) or bool(getattr(optimizer, "per_rank_statistics", False))


# ---------------------------------------------------------------------------------------------- the loop


def train(model, task, make_optimizer: Callable, config: TrainConfig | None = None,
          callbacks: list | None = None) -> dict:
    """Fine-tune `model` on `task`; return the run record (also written to out_dir/run_name/record.json).

    Built in notebook 04 (finetune), §3 and §6; the extension points are in the module docstring.
    Stops early on: max_steps, `patience` evaluations without improvement, or a NaN/inf loss or gradient (then
    it prints one line, keeps the last good checkpoint and returns a record with status "diverged").
    """
    return _Run(model, task, make_optimizer, config or TrainConfig(), callbacks or []).run()


class _Run:
    """One call of `train`: set-up (optimizer, name, folder, resume), the loop, the record."""

    def __init__(self, model, task, make_optimizer, config: TrainConfig, callbacks: list):
        self.model, self.task, self.config = model, task, config
        self.callbacks = [c if isinstance(c, Callback) or any(hasattr(c, f"on_{e}") for e in EVENTS) else _OnStep(c)
                          for c in callbacks]
        self.device = model_device(model)
        self.rank, self.world = parallel.rank(), parallel.world_size()  # (0, 1) without a process group
        self.main = self.rank == 0  # evaluates, prints, holds the lock and writes every file
        self.n_train = len(task.train_set)
        if self.n_train == 0:
            raise ValueError(f"task {task.name!r} has no training examples")
        self.batches_per_epoch = math.ceil(self.n_train / config.batch_size)
        self.total_steps = self.batches_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)

        self.use_amp = config.amp is not None and self.device.type == "cuda"
        if config.amp is not None and not self.use_amp:
            self._say(f"note: amp={config.amp!r} needs a CUDA device; training in float32 on {self.device.type}")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp or "", torch.float32)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and config.amp == "fp16")

        named = list(model.named_parameters())
        self.params = [p for _, p in named if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (every requires_grad is False)")
        self.trainable_names = [n for n, p in named if p.requires_grad]
        frozen = [(n, p) for n, p in named if not p.requires_grad]
        self.trainable_only = bool(frozen)  # a frozen base: checkpoints hold the trainable part only
        self.base_fingerprint = runs.weights_fingerprint(frozen) if frozen else None
        start_fingerprint = runs.weights_fingerprint(model.state_dict().items())  # the starting weights

        self.optimizer = build_optimizer(make_optimizer, model, config.lr)
        if self.world > 1 and _per_rank_statistics(self.optimizer):
            raise ValueError(f"{type(self.optimizer).__name__} cannot train with {self.world} processes: its "
                             "row/column statistics come from hooks on this process's backward pass, so each rank "
                             "would see only its own shard's; run it in one process")
        self.optimizer_desc = describe_optimizer(self.optimizer)  # before the scheduler rewrites the lrs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(config, self.total_steps))

        identity = {"task": task.name, "n_train": self.n_train, "optimizer": self.optimizer_desc,
                    "config": identity_config(config), "start": start_fingerprint,
                    "trainable": self.trainable_names}
        extra_losses = task.describe().get("extra_losses") if hasattr(task, "describe") else None
        if extra_losses:  # an Objective's terms and their settings (SMART's eps, weight, ...) change the result too
            identity["extra_losses"] = extra_losses
        self.run_name = config.run_name or runs.run_name(
            task.name, config.method, self.optimizer_desc["name"], config.lr, config.batch_size, config.seed, identity)
        self.run_dir = Path(config.out_dir) / self.run_name if config.out_dir is not None else None
        self.start_fingerprint = start_fingerprint

        # training state: everything a checkpoint must hold to continue exactly
        self.state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None, "bad_evals": 0,
                      "epoch_loss": 0.0, "epoch_batches": 0, "tokens": 0, "train_time": 0.0, "eval_time": 0.0,
                      "io_time": 0.0, "wall_time": 0.0, "peak_memory_mb": 0.0,
                      "evals": [], "eval_times": [], "epochs": [], "loss_log": [], "status": "running"}
        self.loop = Loop(model, self.optimizer, self.scheduler, task, config, self.state, self.run_dir)
        self.resumed_from = None
        self.resume_changes: list[str] = []
        self.best_weights = None  # in memory when there is no out_dir
        self.last_saved = None
        self.memory = runs.PeakMemory(self.device)
        # progress=False in the config silences the task's evaluation bars too (tasks that take the option)
        self.eval_kwargs = {} if config.progress or not _accepts(task.evaluate, "progress") else {"progress": False}
        # the lengths length_batches sorts by, measured once (a tokenizer pass over the training set for paraphrase)
        self.lengths = [example_length(task, ex) for ex in task.train_set] if config.length_batching else None
        self._batches: tuple[int, list] | None = None  # (epoch, its batches), drawn once per epoch
        if config.compile:
            compile_model(model)  # after the fingerprints and the optimizer: compiling changes no parameter

    def _say(self, message: str) -> None:
        """Print on rank 0 only (every line the loop prints goes through here)."""
        if self.main:
            print(message)

    # ------------------------------------------------------------------------------------------ set-up

    def run(self) -> dict:
        if self.run_dir is None or not self.main:  # the folder is rank 0's: checked and locked by it alone
            return self._run()
        with contextlib.ExitStack() as stack:
            try:
                runs.check_writable(self.run_dir)  # before any work: a read-only out_dir fails here, naming the folder
                stack.enter_context(runs.RunLock(self.run_dir))
            except BaseException as err:
                self._tell_failure(err)  # the other ranks wait for rank 0's set-up: they stop too
                raise
            removed = runs.remove_stale_temps(self.run_dir)
            if removed:
                print(f"removed {len(removed)} stale temporary file(s) of killed writes in {self.run_dir}: "
                      f"{', '.join(removed)}")
            return self._run()

    def _on_main(self, fn: Callable):
        """fn() on rank 0, its result on every rank; an error on rank 0 stops every rank (one process: just fn())."""
        if self.world == 1:
            return fn()
        if self.main:
            try:
                value = fn()
            except BaseException as err:
                self._tell_failure(err)
                raise
            return parallel.broadcast_object(("ok", value))[1]
        status, value = parallel.broadcast_object()
        if status == "error":
            raise RuntimeError(f"rank 0 stopped: {value}")
        return value

    def _tell_failure(self, err: BaseException) -> None:
        """Rank 0's side of a failed `_on_main`: send the error line to the ranks waiting for its result."""
        if self.world > 1:
            parallel.broadcast_object(("error", f"{type(err).__name__}: {err}"))

    def _prepare_folder(self) -> None:
        """resume=False: refuse to replace a run already in the folder, unless config.overwrite."""
        held = [name for name in runs.RUN_FILES if (self.run_dir / name).exists()]
        if not held:
            return
        record = self.run_dir / runs.RECORD
        what = "a finished run (record.json)" if record.exists() else f"an unfinished run ({', '.join(held)})"
        if not self.config.overwrite:
            raise FileExistsError(f"{self.run_dir} already holds {what}: pass resume=True to continue or load it, "
                                  "overwrite=True to start over, or another run_name")
        print(f"overwrite=True: removing {what} in {self.run_dir}")
        for name in held:
            (self.run_dir / name).unlink(missing_ok=True)

    def _resume(self) -> bool:
        ckpt, path = runs.load_checkpoint(self.run_dir)
        if ckpt is None:
            if self.config.progress:
                print(f"starting {self.run_name} in {self.run_dir.parent} (no checkpoint to resume yet)")
            return False
        self._check_compatible(ckpt, path)
        self._restore(ckpt, path)
        if self.config.progress or self.resume_changes:
            changes = f"; accepted changes: {', '.join(self.resume_changes)}" if self.resume_changes else ""
            if self.state["status"] == "running":
                print(f"resuming {self.run_name} from step {self.state['step']} (epoch {self.state['epoch'] + 1}, "
                      f"batch {self.state['batch']}){changes}")
            else:  # a finished run: loaded, nothing left to train
                print(f"loading {self.run_name}: {self.state['status']} at step {self.state['step']}, nothing left "
                      f"to train{changes}")
        return True

    def _restore(self, ckpt: dict, path) -> None:
        """Load everything a checkpoint holds (rank 0 checked it against this run first)."""
        _load_weights(self.model, ckpt["model"], ckpt.get("trainable_only", False), path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        for callback, saved in zip(self._stateful(), ckpt.get("callbacks", [])):
            callback.load_state_dict(saved["state"])
        self.state.update(ckpt["state"])
        if "eval_times" not in ckpt["state"]:  # a checkpoint from before eval_times: those times are unknown
            self.state["eval_times"] = [{"step": e["step"], "train_time_s": None, "wall_time_s": None}
                                        for e in self.state["evals"]]
        rank_rngs = ckpt.get("rank_rng")
        if rank_rngs is not None and len(rank_rngs) == self.world:
            set_rng_state(rank_rngs[self.rank])  # each rank continues its own streams (its dropout masks)
        else:
            set_rng_state(ckpt["rng"])
            if self.rank > 0:  # another number of processes: fresh, distinct streams for the other ranks
                torch.manual_seed(_rank_seed(self.config.seed, self.rank) + self.state["step"])
        self.resumed_from = self.state["step"]
        status, patience = self.state["status"], self.config.patience
        more_steps = self.state["step"] < self.total_steps
        if status == "completed" and more_steps:  # stopped at max_steps or its last epoch: a larger budget goes on
            self.state["status"] = "running"
        if status == "early_stopped" and more_steps and (patience is None or self.state["bad_evals"] < patience):
            self.state["status"] = "running"  # a larger patience continues an early-stopped run

    def _follow_resume(self) -> None:
        """A rank other than 0 loads the checkpoint rank 0 has just checked (no prints: rank 0 said it all)."""
        with contextlib.redirect_stdout(io.StringIO()):
            ckpt, path = runs.load_checkpoint(self.run_dir)
        self._restore(ckpt, path)

    def _check_compatible(self, ckpt: dict, path) -> None:
        """Refuse, in one line listing old -> new, every difference that would make the resumed run another run."""
        old_config, config = ckpt["config"], self.config
        old_config = {**LATE_FIELDS, **old_config}  # a checkpoint older than a late field ran at its default
        refused = [f"{k} {old_config[k]!r} -> {getattr(config, k)!r}" for k in RESULT_FIELDS
                   if k in old_config and old_config[k] != getattr(config, k)]
        self.resume_changes = [f"{k} {old_config[k]!r} -> {getattr(config, k)!r}" for k in EXTEND_FIELDS
                               if k in old_config and old_config[k] != getattr(config, k)]
        old_world = ckpt.get("world_size", 1)
        if old_world != self.world:  # the same steps up to float rounding (gpt2lab.parallel)
            self.resume_changes.append(f"world_size {old_world} -> {self.world}")
        old_total = ckpt.get("total_steps")
        if config.schedule == "linear" and old_total is not None and old_total != self.total_steps:
            self.resume_changes.append(f"the linear decay now ends at step {self.total_steps} (was {old_total})")
        for key, new in (("task", self.task.name), ("n_train", self.n_train)):
            if key in ckpt and ckpt[key] != new:
                refused.append(f"{'training-set size' if key == 'n_train' else key} {ckpt[key]!r} -> {new!r}")
        old_opt, new_opt = ckpt.get("optimizer_desc"), self.optimizer_desc
        if old_opt is not None:
            if old_opt["name"] != new_opt["name"]:
                refused.append(f"optimizer {old_opt['name']} -> {new_opt['name']}")
            elif len(old_opt["groups"]) != len(new_opt["groups"]):
                refused.append(f"optimizer param groups {len(old_opt['groups'])} -> {len(new_opt['groups'])}")
            else:
                lr_refused = any(item.startswith("lr ") for item in refused)  # said once, not once per group
                for i, (a, b) in enumerate(zip(old_opt["groups"], new_opt["groups"])):
                    for k in sorted(set(a) | set(b)):
                        if a.get(k) != b.get(k) and not (k == "lr" and lr_refused):
                            refused.append(f"optimizer group {i} {k} {a.get(k)!r} -> {b.get(k)!r}")
        if "trainable" in ckpt and ckpt["trainable"] != self.trainable_names:
            refused.append(f"trainable parameters {len(ckpt['trainable'])} tensors -> {len(self.trainable_names)} "
                           "(or other names)")
        if ckpt.get("base_fingerprint") != self.base_fingerprint and ckpt.get("trainable_only", False):
            refused.append(f"frozen base weights (fingerprint {ckpt.get('base_fingerprint')} -> "
                           f"{self.base_fingerprint}; load the same base weights)")
        old_cbs = [c["name"] for c in ckpt.get("callbacks", [])]
        new_cbs = [type(c).__name__ for c in self._stateful()]
        if "callbacks" in ckpt and old_cbs != new_cbs:
            refused.append(f"callbacks with state {old_cbs} -> {new_cbs}")
        if refused:
            raise ValueError(f"cannot resume {path}: {'; '.join(refused)}. These change the result: use the "
                             "checkpoint's settings, or resume=False with overwrite=True to start over")

    def _stateful(self) -> list:
        return [c for c in self.callbacks if _stateful(c)]

    def _fire(self, event: str) -> None:
        self.loop.event = event
        for callback in self.callbacks:
            getattr(callback, f"on_{event}", lambda loop: None)(self.loop)

    # ------------------------------------------------------------------------------------------ files

    def _save_checkpoint(self) -> None:
        where = (self.state["step"], self.state["epoch"], self.state["batch"], self.state["status"],
                 len(self.state["evals"]))
        if self.run_dir is None or where == self.last_saved:  # nothing new since the last one
            return
        self.last_saved = where
        t0 = time.perf_counter()
        self._note_times()
        # every rank reaches this point at the same steps; each one's RNG goes into rank 0's file
        more = {"world_size": self.world, "rank_rng": parallel.all_gather_object(rng_state())} if self.world > 1 else {}
        if not self.main:
            return
        runs.save_checkpoint({
            "format": 2, "model": _model_weights(self.model, self.trainable_only),
            "trainable_only": self.trainable_only, "base_fingerprint": self.base_fingerprint,
            "trainable": self.trainable_names, "optimizer": self.optimizer.state_dict(),
            "optimizer_desc": self.optimizer_desc, "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "state": self.state, "rng": rng_state(),
            "config": asdict(self.config), "task": self.task.name, "n_train": self.n_train,
            "total_steps": self.total_steps,
            "callbacks": [{"name": type(c).__name__, "state": c.state_dict()} for c in self._stateful()], **more,
        }, self.run_dir)
        self.state["io_time"] += time.perf_counter() - t0

    def _note_times(self) -> None:
        """Bring wall time and peak memory in the state up to date (they are saved with every checkpoint)."""
        now = time.perf_counter()
        self.state["wall_time"] += now - self._wall_mark
        self._wall_mark = now
        self.memory.sample()
        self.state["peak_memory_mb"] = max(self.state["peak_memory_mb"], self.memory.peak_mb())

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    # ------------------------------------------------------------------------------------------ evaluation

    def _evaluate(self, save: bool = True) -> dict:
        t0 = time.perf_counter()

        def dev_metrics() -> dict:
            # a fixed seed of its own: sampled sonnets are reproducible and the training RNG is untouched
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), eval_mode(self.model), self._autocast():
                torch.manual_seed(self.config.seed)
                return {k: float(v) for k, v in self.task.evaluate(self.model, **self.eval_kwargs).items()}

        result = self._on_main(dev_metrics)  # several processes: rank 0's metrics everywhere, so every rank stops alike
        state = self.state
        mean_loss = state["epoch_loss"] / max(state["epoch_batches"], 1)
        entry = {"step": state["step"], "epoch": state["epoch"] + state["batch"] / self.batches_per_epoch,
                 "train_loss": mean_loss, **result}
        state["evals"].append(entry)
        value = result[self.task.metric]
        if _better(value, state["best"], self.task.higher_is_better):
            state["best"], state["best_step"], state["bad_evals"] = value, state["step"], 0
            weights = _model_weights(self.model, self.trainable_only)
            if self.run_dir is None:  # every rank keeps its own copy (the ranks' weights are the same)
                self.best_weights = {k: v.detach().clone() for k, v in weights.items()}
            elif self.main:
                runs.atomic_save(weights, self.run_dir / runs.BEST)
        else:
            state["bad_evals"] += 1
        now = time.perf_counter()
        state["eval_time"] += now - t0
        state["eval_times"].append({"step": state["step"], "train_time_s": state["train_time"],
                                    "wall_time_s": state["wall_time"] + now - self._wall_mark})
        self.memory.sample()
        self.loop.metrics = entry
        self._show()
        self._fire("evaluate")
        if save:
            self._save_checkpoint()
        return entry

    def _show(self, refresh: bool = True) -> None:
        """Progress-bar postfix: smoothed loss and the best dev metric so far (refreshed after every evaluation)."""
        best = self.state["best"]
        self.bar.set_postfix(loss="-" if self.smooth is None else f"{self.smooth:.4f}",
                             best="-" if best is None else f"{best:.4g}", refresh=refresh)

    # ------------------------------------------------------------------------------------------ the loop

    def _run(self) -> dict:
        from tqdm.auto import tqdm

        config, state = self.config, self.state
        resumed = False
        if self.run_dir is not None:  # rank 0 checks the folder and the checkpoint; then the others read it
            resumed = self._on_main(lambda: self._resume() if config.resume else (self._prepare_folder() or False))
            if resumed and not self.main:
                self._follow_resume()
            if resumed:
                parallel.barrier()  # every rank has read the checkpoint before rank 0 may replace it
        elif config.resume and config.progress:
            self._say("resume=True has no effect with out_dir=None (no checkpoints are written)")
        if not resumed:
            seed_everything(config.seed)  # the same config from the same weights gives the same run
            if self.rank > 0:  # several processes: rank 0 draws as one process would, the others their own masks
                torch.manual_seed(_rank_seed(config.seed, self.rank))

        self.memory.start()
        self._wall_mark = time.perf_counter()
        self.smooth = None
        self.bar = tqdm(total=self.total_steps, initial=state["step"], desc=self.task.name, unit="step",
                        disable=not (config.progress and self.main), dynamic_ncols=True)
        self.model.train()
        try:
            self._fire("start")
            self._loop()
        except _Interrupted as err:
            state["status"] = "diverged"
            path = self.run_dir / runs.CHECKPOINT if self.run_dir is not None else None
            kept = "no checkpoint was written yet" if path is None or not path.exists() else \
                f"the last good checkpoint {path} is kept"
            message = f"stopped: {err} (non-finite); {kept}. Try a lower lr, grad_clip, or amp=None."
            state["message"] = message
            self._say(message)
        finally:
            self.bar.close()
        self._note_times()
        self._fire("end")

        if config.restore_best and state["best_step"] is not None and state["status"] != "diverged":
            best_path = self.run_dir / runs.BEST if self.run_dir is not None else None
            if best_path is not None:
                parallel.barrier()  # rank 0 has written best.pt
            if best_path is not None and best_path.exists():
                _load_weights(self.model, torch.load(best_path, map_location="cpu", weights_only=True),
                              self.trainable_only, best_path)
            elif self.best_weights is not None:
                _load_weights(self.model, self.best_weights, self.trainable_only, "the best weights")

        def write_record() -> dict:
            record = self._record()
            if self.run_dir is not None:
                atomic_write_text(self.run_dir / runs.RECORD, json.dumps(record, indent=1, default=str) + "\n")
            return record

        return self._on_main(write_record)  # several processes: every rank returns rank 0's record

    def _loop(self) -> None:
        config, state = self.config, self.state
        while state["epoch"] < config.epochs and state["step"] < self.total_steps and state["status"] == "running":
            batches = self._epoch_batches(state["epoch"])
            while state["batch"] < self.batches_per_epoch and state["step"] < self.total_steps:
                self._step(batches[state["batch"]])
                self._fire("step")
                if config.evaluate and config.eval_every and state["step"] % config.eval_every == 0:
                    self._evaluate()
                    if config.patience is not None and state["bad_evals"] >= config.patience:
                        state["status"] = "early_stopped"
                        self._save_checkpoint()  # so that resuming this run does not train on
                        break
                elif config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                    self._save_checkpoint()

            if state["status"] != "running":
                break
            if state["batch"] >= self.batches_per_epoch:  # the epoch is complete
                mean_loss = state["epoch_loss"] / max(state["epoch_batches"], 1)
                state["epochs"].append({"epoch": state["epoch"] + 1, "step": state["step"], "train_loss": mean_loss})
                evaluated_now = bool(state["evals"]) and state["evals"][-1]["step"] == state["step"]
                if config.evaluate and not config.eval_every and not evaluated_now:
                    entry = self._evaluate(save=False)  # saved just below, with the epoch counted
                    state["epochs"][-1].update({k: v for k, v in entry.items() if k not in ("step", "epoch")})
                state["epoch"] += 1
                state["batch"], state["epoch_loss"], state["epoch_batches"] = 0, 0.0, 0
                if config.patience is not None and state["bad_evals"] >= config.patience:
                    state["status"] = "early_stopped"
                self._save_checkpoint()
        if state["status"] == "running":
            state["status"] = "completed"
            if config.evaluate and (not state["evals"] or state["evals"][-1]["step"] != state["step"]):
                self._evaluate(save=False)  # e.g. max_steps stopped mid-epoch: the record still ends on a dev score
            self._save_checkpoint()

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches of example indices: a function of (seed, epoch), drawn once per epoch."""
        if self._batches is None or self._batches[0] != epoch:
            size = self.config.batch_size
            if self.lengths is not None:
                batches = length_batches(self.lengths, size, self.config.seed, epoch)
            else:
                order = epoch_order(self.n_train, self.config.seed, epoch)
                batches = [order[i : i + size] for i in range(0, self.n_train, size)]
            self._batches = (epoch, batches)
        return self._batches[1]

    def _to_device(self, batch: dict) -> dict:
        """The batch on the model's device; on CUDA through pinned memory, so the copy does not wait for the GPU."""
        if self.device.type != "cuda":
            return to_device(batch, self.device)
        return {k: v.pin_memory().to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def _step(self, idx: list[int]) -> None:
        """One optimizer step on the global batch `idx`; its time is training time (the loss.item() waits for the GPU).

        Several processes: this rank trains on its share, its mean loss weighted by its share of the batch's loss
        terms; the gradients are summed over ranks (gpt2lab.parallel). One process: exactly the plain step.
        """
        config, state, optimizer = self.config, self.state, self.optimizer
        t0 = time.perf_counter()
        mine = parallel.shard(idx, self.rank, self.world) if self.world > 1 else idx
        batch = self.task.collate([self.task.train_set[i] for i in mine]) if mine else None
        tokens = int(batch["attention_mask"].sum()) if batch is not None else 0  # before the move: no GPU wait
        if self.world > 1:
            terms = loss_terms(self.task, batch) if batch is not None else 0
            total_terms, tokens = (int(x) for x in parallel.all_reduce_sum(torch.tensor([terms, tokens])).tolist())
            if terms == 0:  # an empty share (a short last batch) or no targets: this rank adds zero gradients
                batch = None
        if batch is not None:
            with self._autocast():
                loss = self.task.loss(self.model, self._to_device(batch))
            if self.world > 1:
                loss = loss * (terms / total_terms)  # its share: the ranks' weighted losses sum to the global mean
        else:
            loss = torch.zeros((), device=self.device)
        if self.world > 1:
            value = parallel.all_reduce_sum(loss.detach().double()).item()  # the global loss, the same on every rank
        else:
            value = loss.item()  # the one wait for the GPU per step
        if not math.isfinite(value):
            raise _Interrupted(f"loss is {value} at step {state['step'] + 1}")
        optimizer.zero_grad(set_to_none=True)
        if batch is not None:
            self.scaler.scale(loss).backward()
        if self.world > 1:
            parallel.all_reduce_gradients(self.params)
        if config.grad_clip is not None:
            self.scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip)
            if not self.scaler.is_enabled() and not torch.isfinite(norm):  # fp16's scaler skips such steps
                raise _Interrupted(f"gradient norm is {norm.item()} at step {state['step'] + 1}")
        lrs = [group["lr"] for group in optimizer.param_groups]  # the lrs this step uses
        self.scaler.step(optimizer)
        self.scaler.update()
        self.scheduler.step()
        state["train_time"] += time.perf_counter() - t0

        state["step"] += 1
        state["batch"] += 1
        state["epoch_loss"] += value
        state["epoch_batches"] += 1
        state["tokens"] += tokens
        if state["step"] % config.log_every == 0 or state["step"] == 1:
            state["loss_log"].append((state["step"], value))
        self.loop.loss, self.loop.lrs = value, lrs
        self.smooth = value if self.smooth is None else 0.9 * self.smooth + 0.1 * value
        self.memory.sample()
        self._show(refresh=False)  # drawn by update, at most every mininterval (not once per step)
        self.bar.update(1)

    # ------------------------------------------------------------------------------------------ record

    def _record(self) -> dict:
        """The run record: config, metrics per evaluation and epoch, times, speed, memory, sizes, versions."""
        trainable, total = count_parameters(self.model)
        state, config = self.state, self.config
        seconds = state["train_time"]
        return {
            "run_name": self.run_name,
            "run_dir": str(self.run_dir) if self.run_dir is not None else None,
            "task": self.task.describe(),
            "method": config.method,
            "status": state["status"],
            "message": state.get("message"),
            "config": asdict(config),
            "steps": state["step"],
            "best_metric": {"name": self.task.metric, "value": state["best"], "step": state["best_step"]},
            "final": state["evals"][-1] if state["evals"] else None,
            "evals": state["evals"],
            "eval_times": state["eval_times"],  # cumulative training and wall seconds at each of `evals`
            "epochs": state["epochs"],
            "loss_log": state["loss_log"],
            "train_time_s": seconds,  # optimizer steps only (batches, forward, backward, update)
            "eval_time_s": state["eval_time"],
            "io_time_s": state["io_time"],  # writing checkpoints
            "wall_time_s": state["wall_time"],  # all of it, every session of a resumed run
            "it_per_s": state["step"] / seconds if seconds else None,
            "tokens_per_s": state["tokens"] / seconds if seconds else None,
            "tokens": state["tokens"],
            "peak_memory_mb": state["peak_memory_mb"],
            "peak_memory_how": self.memory.how + (" (the largest of the sessions of this resumed run)"
                                                  if self.resumed_from is not None else ""),
            "optimizer": {**self.optimizer_desc, "state_bytes": optimizer_state_bytes(self.optimizer)},
            "params": {"trainable": trainable, "total": total},
            "checkpoints": "trainable parameters only (frozen base fingerprinted)" if self.trainable_only
            else "the whole model",
            "start_fingerprint": self.start_fingerprint,
            "seed": config.seed,
            "device": str(self.device),
            "world_size": self.world,  # processes training together (gpt2lab.parallel); batch_size is their total
            "resumed_from_step": self.resumed_from,
            "resume_changes": self.resume_changes,
            "versions": versions(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
