"""Running a grid: one training run per (task, method, seed), each in its own folder, skipped when finished and
resumed when interrupted.

Used in notebook 09 (experiments), §2-§3, and by `python -m gpt2lab.experiments run`.

    records = run_grid(load_grid("quick"), out="results/experiments")
    record = run_one("paraphrase", "lora+soap", seed=0, size="quick", out="results/experiments")

Each run: the tokenizer and the task's data are loaded once per data settings; the model is built per run, seeded
(the same seed gives the same starting weights and the same LoRA adapters); the method is wired by
`methods.build`; `gpt2lab.train.train` runs it with resume=True. The run folder is named from the config
(task, method, seed, size and a hash of the resolved settings and the weights), so runs with other settings,
sizes or weights never share a folder; a longer budget (epochs, max_steps, patience) keeps the folder, so a rerun
with more steps resumes the run. A folder whose record.json holds the same experiment block is skipped ("skip
<name>: finished"); one with a checkpoint and no record is resumed from it.

Weights: "tiny" (a 2-layer random GPT-2, quick mode), "random" (gpt2-small's shape, 124M parameters, seeded random
values: speed and memory do not depend on the values, so they are measured anywhere without the hub), or a hub
name / folder for `GPT2.from_pretrained`.

Every record carries record["config"]["extra"]["experiment"] = {task, method (canonical), seed, size, weights,
settings (resolved), grid (name), world_size}: what `experiments.report` groups by.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from .. import parallel, runs
from .grid import Grid, load_grid, task_name
from .methods import BUDGET_KEYS, Method, build, parse_method, resolve_settings

TINY_POSITIONS = 256  # GPT2Config.tiny(n_positions=256), as the notebooks' quick mode
WEIGHT_NOTES = {
    "tiny": "tiny random GPT-2 (2 layers, 64 channels): the numbers only show that everything runs",
    "random": "random gpt2-shaped weights (124M parameters, seeded): speed and memory are real (they do not depend "
              "on the values), the dev metrics mean nothing",
}


# ---------------------------------------------------------------------------------------------- processes


_STARTED: dict = {}


def start(device=None):
    """(rank, world_size, device): joins torchrun's process group when launched by it (gpt2lab.parallel), once."""
    if "device" not in _STARTED:
        from ..environment import pick_device

        rank, world, dev = parallel.init_from_env()  # (0, 1, None) for a single process
        dev = dev if dev is not None else pick_device()
        _STARTED.update(rank=rank, world_size=world, device=dev)
    if device is not None:
        import torch

        return _STARTED["rank"], _STARTED["world_size"], torch.device(device)
    return _STARTED["rank"], _STARTED["world_size"], _STARTED["device"]


def is_main() -> bool:
    return parallel.is_main()


def say(message: str) -> None:
    """Print on rank 0 only (every process of a torchrun job runs the same grid)."""
    if is_main():
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------- pieces of a run


def default_out() -> Path:
    """$GPT2LAB_RESULTS/experiments, else <repo>/results/experiments."""
    from ..environment import results_dir

    return results_dir() / "experiments"


def weights_for(weights: str | None, size: str) -> str:
    """The weights of a run: given, else "tiny" (quick) or the weights setting ($GPT2LAB_WEIGHTS, "gpt2") (full)."""
    if weights:
        return str(weights)
    if size == "quick":
        return "tiny"
    from ..weights import setting

    return setting(None)


def make_model(weights: str, seed: int, device=None):
    """A GPT2 seeded with `seed`: "tiny" and "random" are random initialisations, anything else is loaded."""
    import torch

    from ..model import GPT2, GPT2Config

    torch.manual_seed(seed)  # the same seed, the same starting weights (and dropout masks)
    if weights == "tiny":
        model = GPT2(GPT2Config.tiny(n_positions=TINY_POSITIONS))
    elif weights == "random":
        model = GPT2(GPT2Config.from_name("gpt2"))
    else:
        model = GPT2.from_pretrained(weights)
    return model.to(device) if device is not None else model


def load_task(task: str, settings: dict, cache: dict | None = None):
    """The task with the run's data settings, loaded once per (task, data settings) when `cache` is given."""
    from ..tasks import ParaphraseTask, SonnetTask

    keys = ("train_limit", "dev_limit", "max_length") + (("max_new_tokens",) if task == "sonnet" else ("test_limit",))
    key = (task, tuple(settings[k] for k in keys))
    if cache is not None and key in cache:
        return cache[key]
    if cache is not None and "tokenizer" in cache:
        tokenizer = cache["tokenizer"]
    else:
        from .. import tokenizer as tok

        tokenizer = tok.load()
        if cache is not None:
            cache["tokenizer"] = tokenizer
    common = dict(train_limit=settings["train_limit"], dev_limit=settings["dev_limit"],
                  max_length=settings["max_length"])
    if task == "sonnet":
        loaded = SonnetTask.load(tokenizer, max_new_tokens=settings["max_new_tokens"], **common)
    else:
        loaded = ParaphraseTask.load(tokenizer, test_limit=settings["test_limit"], **common)
    if cache is not None:
        cache[key] = loaded
    return loaded


def experiment_block(task: str, method: Method, seed: int, size: str, weights: str, settings: dict, grid: str,
                     world_size: int = 1) -> dict:
    """record["config"]["extra"]["experiment"]: what report.py groups by, as plain JSON values."""
    block = {"task": task, "method": method.name, "seed": seed, "size": size, "weights": weights,
             "settings": settings, "grid": grid, "world_size": world_size}
    return json.loads(json.dumps(block))


SAME_RUN_KEYS = ("task", "method", "seed", "size", "weights", "settings")  # a record with these equal is this run
HOW_KEYS = ("compile", "keep")  # settings that change neither the result nor the budget: a finished run stays finished


def run_name(block: dict) -> str:
    """'<task>-<method>-seed<seed>-<size>-<hash>': the hash covers the settings (but the budget) and the weights."""
    identity = {k: block[k] for k in ("task", "method", "seed", "size", "weights")}
    identity["settings"] = {k: v for k, v in block["settings"].items() if k not in BUDGET_KEYS}
    readable = f"{block['task']}-{block['method']}-seed{block['seed']}-{block['size']}"
    return re.sub(r"[^A-Za-z0-9._+=-]", "-", readable) + "-" + runs.short_hash(identity)


def finished_record(run_dir: Path, block: dict) -> dict | None:
    """The record in run_dir when it is a finished run of this experiment (same task, method, seed, size, weights
    and settings, budget included), else None."""
    path = run_dir / runs.RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    old = dict(record.get("config", {}).get("extra", {}).get("experiment") or {})
    if isinstance(old.get("settings"), dict):  # how it ran and what it kept do not make it another run
        old["settings"] = {k: v for k, v in old["settings"].items() if k not in HOW_KEYS}
    block = {**block, "settings": {k: v for k, v in block["settings"].items() if k not in HOW_KEYS}}
    return record if all(old.get(k) == block[k] for k in SAME_RUN_KEYS) else None


def prune(run_dir: Path, record: dict, keep: str) -> list[str]:
    """Delete what a finished run no longer needs (setting `keep`); returns the names deleted.

    keep "all": nothing. "best": the checkpoints (checkpoint.pt, checkpoint.prev.pt), which only serve to resume or
    extend the run; at gpt2 size with AdamW each is ~1.5 GB (weights and two moments). "record": best.pt too.
    A diverged or unfinished run keeps everything (its last good checkpoint is what one inspects). A run whose
    checkpoints are gone and that is asked for a longer budget starts over (the same seed gives the same run).
    """
    if keep == "all" or record.get("status") not in ("completed", "early_stopped") or not is_main():
        return []
    names = [runs.CHECKPOINT, runs.PREVIOUS] + ([runs.BEST] if keep == "record" else [])
    gone = [n for n in names if (run_dir / n).exists()]
    for name in gone:
        (run_dir / name).unlink()
    return gone


def _total_steps(n_train: int, settings: dict) -> int:
    steps = math.ceil(n_train / settings["batch_size"]) * settings["epochs"]
    return min(steps, settings["max_steps"]) if settings["max_steps"] is not None else steps


# the settings that are TrainConfig fields of the same name
LOOP_KEYS = ("epochs", "batch_size", "lr", "max_steps", "warmup_steps", "schedule", "grad_clip", "amp", "patience",
             "eval_every", "log_every", "length_batching", "compile")


def train_config(settings: dict, *, seed: int, method: Method, out: Path, name: str, block: dict, progress: bool):
    """The TrainConfig of a run."""
    from ..train import TrainConfig

    return TrainConfig(**{k: settings[k] for k in LOOP_KEYS}, seed=seed, method=method.name, out_dir=str(out),
                       run_name=name, resume=True, progress=progress, extra={"experiment": block})


def _limit(limit):
    if limit == "env":
        from ..environment import limit_from_env

        return limit_from_env()
    return limit


# ---------------------------------------------------------------------------------------------- runs


def run_one(task: str, method: str | Method, seed: int = 0, *, size: str = "quick", weights: str | None = None,
            settings: dict | None = None, layers: list[dict] | None = None, out=None, grid: str = "custom",
            limit: int | None | str = "env", callbacks: list | tuple = (), device=None, cache: dict | None = None,
            verbose: bool = True) -> dict:
    """Train one (task, method, seed) and return its record; skip it when finished, resume it when interrupted.

    Used in notebook 09, §2. size: "quick" or "full" (the defaults of `methods.defaults`). weights: "tiny",
    "random", a hub name or a folder (None: "tiny" for quick, the weights setting for full). settings: overrides
    for this run, applied after `layers` (the grid's sections, lowest first). out: the folder of run folders (None:
    `default_out()`). limit: caps example counts, epochs and generated tokens ("env": $GPT2LAB_LIMIT). callbacks:
    extra loop callbacks (e.g. one that interrupts the run). cache: a dict shared by the runs of a grid (tokenizer,
    tasks).
    """
    import torch

    from ..train import train

    task = task_name(task)
    method = parse_method(method)
    if size not in ("quick", "full"):
        raise ValueError(f"size must be 'quick' or 'full', not {size!r}")
    _, world_size, device = start(device)
    weights = weights_for(weights, size)
    method, resolved = resolve_settings(method, task, size, [*(layers or []), settings or {}], limit=_limit(limit),
                                        cuda=device.type == "cuda")
    if weights == "tiny":
        resolved["max_length"] = min(resolved["max_length"], TINY_POSITIONS)  # the tiny model's positions
    block = experiment_block(task, method, seed, size, weights, resolved, grid, world_size)
    name = run_name(block)
    out = Path(out) if out is not None else default_out()
    run_dir = out / name
    done = finished_record(run_dir, block)
    if done is not None:
        if verbose:
            say(f"skip {name}: finished")
        return done

    with contextlib.redirect_stdout(io.StringIO()) if not is_main() else contextlib.nullcontext():
        loaded = load_task(task, resolved, cache if cache is not None else {})  # data notices: said by rank 0 only
    model = make_model(weights, seed, device)
    built = build(method, loaded, model, resolved, _total_steps(len(loaded.train_set), resolved), seed=seed)
    config = train_config(resolved, seed=seed, method=method, out=out, name=name, block=block,
                          progress=verbose and size == "full" and is_main())
    config.extra["model"] = model.config.to_dict()  # the shape trained (n_positions, n_layer, ...), for the record
    record = train(built.model, built.objective, built.factory, config, callbacks=[*built.callbacks, *callbacks])
    prune(run_dir, record, resolved["keep"])
    if verbose:
        say(summary_line(record))
    del model, built
    if device.type == "cuda":  # give the GPU memory back before the next model (a full gc costs ~0.2 s a run)
        gc.collect()
        torch.cuda.empty_cache()
    return record


def summary_line(record: dict) -> str:
    """One line per finished run: the dev metric, steps, speed, memory, time."""
    best = record.get("best_metric") or {}
    value = best.get("value")
    metric = f"dev {best.get('name')} {value:.4g}" if value is not None else "no dev evaluation"
    its, tps = record.get("it_per_s"), record.get("tokens_per_s")
    speed = f"{its:.2f} it/s, {tps:,.0f} tokens/s" if its and tps else "speed n/a"
    return (f"  {record['run_name']}: {record['status']}, {metric} | {record['steps']} steps | {speed} | "
            f"peak {record.get('peak_memory_mb') or 0:,.0f} MB | {record.get('wall_time_s') or 0:.1f} s")


def run_grid(grid: Grid | str, out=None, *, settings: dict | None = None, tasks: list[str] | None = None,
             methods: list | None = None, seeds: list[int] | None = None, size: str | None = None,
             weights: str | None = None, limit: int | None | str = "env", callbacks: list | tuple = (),
             device=None, verbose: bool = True, on_run: Callable | None = None) -> list[dict]:
    """Run every (task, method, seed) of a grid and return the records (skipped runs included), task by task.

    Used in notebook 09, §2-§3, and by the command line. grid: a Grid, a file or "quick" / "default" / "auto".
    tasks, methods, seeds, size, weights replace the grid's; settings override every run (the command line's
    --set). out: None for `default_out()`. on_run(record) is called after each run (e.g. to plot as they come).
    """
    if not isinstance(grid, Grid):
        import torch

        grid = load_grid(grid, cuda=torch.cuda.is_available(), say=say if verbose else None)
    size = size or grid.size
    chosen_methods = [parse_method(m) for m in methods] if methods else grid.methods
    chosen_tasks = [task_name(t) for t in tasks] if tasks else grid.tasks
    chosen_seeds = list(seeds) if seeds else grid.seeds
    # the grid's weights belong to its size: `--size full` on the quick grid takes full size's default weights
    weights = weights_for(weights or (grid.weights if size == grid.size else None), size)
    out = Path(out) if out is not None else default_out()
    _, world_size, dev = start(device)
    total = len(chosen_tasks) * len(chosen_methods) * len(chosen_seeds)
    if verbose:
        note = WEIGHT_NOTES.get(weights, f"weights {weights}")
        say(f"grid {grid.name}: {len(chosen_tasks)} task(s) x {len(chosen_methods)} method(s) x "
            f"{len(chosen_seeds)} seed(s) = {total} runs at {size} size on {dev}"
            f"{f' x {world_size} processes' if world_size > 1 else ''}; {note}; results in {out}")
    cache: dict = {}
    records = []
    i = 0
    for task in chosen_tasks:
        for method in chosen_methods:
            for seed in chosen_seeds:
                i += 1
                if verbose:
                    say(f"[{i}/{total}] {task} {method.name} seed {seed}")
                record = run_one(task, method, seed, size=size, weights=weights, settings=settings,
                                 layers=grid.layers(task, method), out=out, grid=grid.name, limit=limit,
                                 callbacks=callbacks, device=device, cache=cache, verbose=verbose)
                records.append(record)
                if on_run is not None:
                    on_run(record)
    return records
