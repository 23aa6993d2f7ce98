"""One training loop for both tasks: progress bars, evaluation, early stopping, checkpoints, exact resume.

Built in notebook 04 (finetune), §3 (the loop) and §6 (checkpoints and exact resume).

    record = train(model, task, make_optimizer, TrainConfig(epochs=3, lr=1e-4, out_dir="results"))

`make_optimizer(params, lr)` builds the optimizer from the trainable parameters, so `gpt2lab.optim.AdamW`,
`torch.optim.AdamW` or a `functools.partial` of either can be passed as is. A task is described in
`gpt2lab.tasks`.

Reproducibility. Batches are drawn from a permutation seeded by (seed, epoch), so the data order is a function of
the position in training, not of history. A checkpoint stores the model, optimizer, scheduler and grad-scaler
states, the python / numpy / torch RNG states, the position (epoch, batch within epoch, step), the best dev metric
and the history. `resume=True` restores all of it and skips the batches already seen, so an interrupted run
resumed from its last checkpoint ends with exactly the parameters and metrics of an uninterrupted one
(bit-for-bit on a CPU; on a GPU as far as its kernels are deterministic). Evaluation runs under its own fixed seed
(torch.random.fork_rng), so sampling sonnets never shifts the training RNG.

Files (under out_dir/run_name/): checkpoint.pt (last), best.pt (best dev weights), record.json (the run record),
each written to a temporary file and renamed, so a crash mid-write never leaves a half file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .tasks import atomic_write_text, eval_mode, model_device, to_device


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model, the task and the optimizer factory.

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
    out_dir: str | None = "results"  # None: write no files at all
    run_name: str | None = None  # default: "<task>-seed<seed>"
    resume: bool = False  # continue from out_dir/run_name/checkpoint.pt when it exists
    log_every: int = 10  # record the training loss every N steps (for loss curves)
    progress: bool = True  # tqdm.auto progress bars
    extra: dict = field(default_factory=dict)  # free-form notes stored in the record (method, model name...)

    def __post_init__(self):
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"schedule must be 'constant' or 'linear', not {self.schedule!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', not {self.amp!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size ({self.batch_size}) and epochs ({self.epochs}) must be at least 1")


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


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path` (never a half checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example indices of one epoch: a function of (seed, epoch) only, so resuming can redo it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


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


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; elsewhere the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows
        return float("nan")


def versions() -> dict:
    import transformers

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "gpt2lab": __version__, "numpy": np.__version__}


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


# ---------------------------------------------------------------------------------------------- the loop


def train(model, task, make_optimizer: Callable, config: TrainConfig | None = None,
          callbacks: list[Callable] | None = None) -> dict:
    """Fine-tune `model` on `task`; return the run record (also written to out_dir/run_name/record.json).

    Built in notebook 04 (finetune), §3 and §6. `callbacks` are called as `fn(step, loss)` after every optimizer step
    (the tests raise KeyboardInterrupt or kill the process from one to prove that resuming is exact).
    Stops early on: max_steps, `patience` evaluations without improvement, or a NaN/inf loss or gradient (then
    it prints one line, keeps the last good checkpoint and returns a record with status "diverged").
    """
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    callbacks = callbacks or []
    device = model_device(model)
    n_train = len(task.train_set)
    if n_train == 0:
        raise ValueError(f"task {task.name!r} has no training examples")
    batches_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = batches_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    run_name = config.run_name or f"{task.name}-seed{config.seed}"
    run_dir = Path(config.out_dir) / run_name if config.out_dir is not None else None

    use_amp = config.amp is not None and device.type == "cuda"
    if config.amp is not None and not use_amp:
        print(f"note: amp={config.amp!r} needs a CUDA device; training in float32 on {device.type}")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp or "", torch.float32)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and config.amp == "fp16")

    def autocast():
        return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    optimizer = make_optimizer(params, config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, total_steps))

    # training state: everything a checkpoint must hold to continue exactly
    state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None, "bad_evals": 0,
             "epoch_loss": 0.0, "epoch_batches": 0, "tokens": 0, "train_time": 0.0,
             "evals": [], "epochs": [], "loss_log": [], "status": "running"}
    resumed_from = None
    checkpoint_path = run_dir / "checkpoint.pt" if run_dir else None
    best_path = run_dir / "best.pt" if run_dir else None
    best_weights = None  # in memory when there is no out_dir
    if config.resume and checkpoint_path is not None and checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)  # RNG states live on the CPU
        changed = [f"{k} {ckpt['config'][k]} -> {getattr(config, k)}" for k in ("seed", "batch_size")
                   if ckpt["config"][k] != getattr(config, k)]
        if changed:  # the data order depends on them: the resumed run would not continue the same one
            raise ValueError(f"cannot resume {checkpoint_path}: {', '.join(changed)}; use the checkpoint's values "
                             "or resume=False to start over")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        set_rng_state(ckpt["rng"])
        resumed_from = state["step"]
        if state["status"] == "completed" and state["step"] < total_steps:
            state["status"] = "running"  # a run that stopped at max_steps, continued with a larger budget
        if config.progress:
            print(f"resuming {run_name} from step {state['step']} (epoch {state['epoch'] + 1}, "
                  f"batch {state['batch']})")
    elif config.resume and config.progress:
        print(f"no checkpoint to resume in {run_dir}: starting {run_name} from scratch")

    last_saved = None

    def save_checkpoint() -> None:
        nonlocal last_saved
        where = (state["step"], state["epoch"], state["batch"], state["status"], len(state["evals"]))
        if checkpoint_path is None or where == last_saved:  # nothing new since the last one
            return
        last_saved = where
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "state": state, "rng": rng_state(), "config": asdict(config)}, checkpoint_path)

    def run_evaluation(save: bool = True) -> dict:
        nonlocal best_weights
        # a fixed seed of its own: sampled sonnets are reproducible and the training RNG is untouched
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eval_mode(model), autocast():
            torch.manual_seed(config.seed)
            result = {k: float(v) for k, v in task.evaluate(model).items()}
        mean_loss = state["epoch_loss"] / max(state["epoch_batches"], 1)
        entry = {"step": state["step"], "epoch": state["epoch"] + state["batch"] / batches_per_epoch,
                 "train_loss": mean_loss, **result}
        state["evals"].append(entry)
        value = result[task.metric]
        if _better(value, state["best"], task.higher_is_better):
            state["best"], state["best_step"], state["bad_evals"] = value, state["step"], 0
            if best_path is not None:
                atomic_save(model.state_dict(), best_path)
            else:
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_evals"] += 1
        if save:
            save_checkpoint()
        return entry

    start = time.perf_counter()
    train_time_before = state["train_time"]
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"{task.name}", unit="step",
               disable=not config.progress, dynamic_ncols=True)
    smooth = None
    model.train()
    try:
        while state["epoch"] < config.epochs and state["step"] < total_steps and state["status"] == "running":
            order = epoch_order(n_train, config.seed, state["epoch"])
            while state["batch"] < batches_per_epoch and state["step"] < total_steps:
                idx = order[state["batch"] * config.batch_size : (state["batch"] + 1) * config.batch_size]
                batch = to_device(task.collate([task.train_set[i] for i in idx]), device)
                with autocast():
                    loss = task.loss(model, batch)
                if not torch.isfinite(loss):
                    raise _Interrupted(f"loss is {loss.item()} at step {state['step'] + 1}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                    if not torch.isfinite(norm) and not scaler.is_enabled():  # fp16's scaler skips such steps
                        raise _Interrupted(f"gradient norm is {norm.item()} at step {state['step'] + 1}")
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()

                value = loss.item()
                state["step"] += 1
                state["batch"] += 1
                state["epoch_loss"] += value
                state["epoch_batches"] += 1
                state["tokens"] += int(batch["attention_mask"].sum())
                if state["step"] % config.log_every == 0 or state["step"] == 1:
                    state["loss_log"].append((state["step"], value))
                smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.4f}", best=state["best"] if state["best"] is None
                                else f"{state['best']:.4g}")
                for fn in callbacks:
                    fn(state["step"], value)

                if config.evaluate and config.eval_every and state["step"] % config.eval_every == 0:
                    run_evaluation()
                    if config.patience is not None and state["bad_evals"] >= config.patience:
                        state["status"] = "early_stopped"
                        save_checkpoint()  # so that resuming this run does not train on
                        break
                elif config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                    save_checkpoint()

            if state["status"] != "running":
                break
            if state["batch"] >= batches_per_epoch:  # the epoch is complete
                mean_loss = state["epoch_loss"] / max(state["epoch_batches"], 1)
                state["epochs"].append({"epoch": state["epoch"] + 1, "step": state["step"], "train_loss": mean_loss})
                evaluated_now = bool(state["evals"]) and state["evals"][-1]["step"] == state["step"]
                if config.evaluate and not config.eval_every and not evaluated_now:
                    entry = run_evaluation(save=False)  # saved just below, with the epoch counted
                    state["epochs"][-1].update({k: v for k, v in entry.items() if k not in ("step", "epoch")})
                state["epoch"] += 1
                state["batch"], state["epoch_loss"], state["epoch_batches"] = 0, 0.0, 0
                if config.patience is not None and state["bad_evals"] >= config.patience:
                    state["status"] = "early_stopped"
                save_checkpoint()
        if state["status"] == "running":
            state["status"] = "completed"
            if config.evaluate and (not state["evals"] or state["evals"][-1]["step"] != state["step"]):
                run_evaluation()  # e.g. max_steps stopped mid-epoch: the record still ends on a dev score
            save_checkpoint()
    except _Interrupted as err:
        state["status"] = "diverged"
        kept = "no checkpoint was written yet" if checkpoint_path is None or not checkpoint_path.exists() else \
            f"the last good checkpoint {checkpoint_path} is kept"
        message = f"stopped: {err} (non-finite); {kept}. Try a lower lr, grad_clip, or amp=None."
        state["message"] = message
        print(message)
    finally:
        bar.close()
        state["train_time"] = train_time_before + (time.perf_counter() - start)

    if config.restore_best and state["best_step"] is not None and state["status"] != "diverged":
        if best_path is not None and best_path.exists():
            model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True))
        elif best_weights is not None:
            model.load_state_dict(best_weights)

    record = make_record(model, task, config, state, device, run_name, resumed_from)
    if run_dir is not None:
        atomic_write_text(run_dir / "record.json", json.dumps(record, indent=1, default=str) + "\n")
    return record


def make_record(model, task, config: TrainConfig, state: dict, device, run_name: str, resumed_from) -> dict:
    """The run record: config, dev metrics per evaluation and per epoch, speed, memory, sizes, versions."""
    trainable, total = count_parameters(model)
    seconds = state["train_time"]
    return {
        "run_name": run_name,
        "task": task.describe(),
        "status": state["status"],
        "message": state.get("message"),
        "config": asdict(config),
        "steps": state["step"],
        "best_metric": {"name": task.metric, "value": state["best"], "step": state["best_step"]},
        "final": state["evals"][-1] if state["evals"] else None,
        "evals": state["evals"],
        "epochs": state["epochs"],
        "loss_log": state["loss_log"],
        "wall_time_s": seconds,
        "it_per_s": state["step"] / seconds if seconds else None,
        "tokens_per_s": state["tokens"] / seconds if seconds else None,
        "peak_memory_mb": peak_memory_mb(device),
        "params": {"trainable": trainable, "total": total},
        "seed": config.seed,
        "device": str(device),
        "resumed_from_step": resumed_from,
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
