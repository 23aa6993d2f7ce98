"""The command line of notebook 09 (experiments): run a grid, report on its records.

    python -m gpt2lab.experiments run --task paraphrase --method lora+soap --seeds 0 1 2 [--out results]
    python -m gpt2lab.experiments run --grid quick            # or default, auto, or a TOML/JSON file
    python -m gpt2lab.experiments run --grid default --weights random --size full --limit 2 --max-steps 2
    python -m gpt2lab.experiments report results/experiments
    torchrun --nproc_per_node 2 -m gpt2lab.experiments run ...  # one process per GPU (gpt2lab.parallel)

Without --grid, the runs are --task x --method x --seeds (defaults: both tasks, full+adamw, seed 0) at --size
(default: full on a CUDA GPU, quick otherwise, said in one line). Hyper-parameters: `--set key=value` (any key of
`gpt2lab.experiments.methods.SETTINGS`, repeatable) or the direct flags --lr, --epochs, --batch-size, --rank,
--max-steps; they override the grid file for every run. Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from ..data import OneLineError
from .methods import SETTINGS, check_setting


def parse_assignment(text: str) -> tuple[str, object]:
    """'lr=1e-4' -> ('lr', 0.0001); 'amp=none' -> ('amp', None); 'targets=q,v' -> ('targets', 'q,v')."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: write key=value, e.g. --set lr=1e-4; keys: {', '.join(SETTINGS)}")
    key, raw = (part.strip() for part in text.split("=", 1))
    lowered = raw.lower()
    if lowered in ("true", "false"):
        value = lowered == "true"
    else:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a plain string (schedule=linear, targets=q,v)
        if isinstance(value, tuple):
            value = raw
    return key, check_setting(key, value, f"--set {text}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.experiments",
                                     description="The method grid of notebook 09: run it, report on it.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every (task, method, seed); finished runs are skipped, interrupted "
                         "ones resumed")
    run.add_argument("--grid", help="a TOML/JSON grid file, or quick, default, auto (default on CUDA, else quick)")
    run.add_argument("--task", action="append", help="sonnet or paraphrase (repeatable; default: the grid's, or both)")
    run.add_argument("--method", action="append",
                     help="e.g. full+adamw, lora+soap, lora-r16-qkv+adaprelora, smart (repeatable)")
    run.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the grid's, or 0)")
    run.add_argument("--out", help="folder of the run folders (default: $GPT2LAB_RESULTS/experiments, else "
                     "results/experiments)")
    run.add_argument("--weights", help="tiny, random (gpt2-shaped random weights), a hub name or a folder")
    run.add_argument("--size", choices=("quick", "full"), help="quick (tiny sizes) or full (the real-mode sizes)")
    run.add_argument("--limit", type=int, help="cap example counts, epochs and generated tokens (smoke runs; "
                     "also $GPT2LAB_LIMIT)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help=f"override a setting for every run; keys: {', '.join(SETTINGS)}")
    for flag, key, kind in (("--lr", "lr", float), ("--epochs", "epochs", int), ("--batch-size", "batch_size", int),
                            ("--rank", "rank", int), ("--max-steps", "max_steps", int)):
        run.add_argument(flag, dest=key, type=kind, help=f"same as --set {key}=...")
    run.add_argument("--quiet", action="store_true", help="no per-run lines")
    report = sub.add_parser("report", help="tables (Markdown on screen, CSV), significance tests and plots")
    report.add_argument("folder", help="a folder holding run folders (record.json files)")
    report.add_argument("--out", help="where to write the CSV and plots (default: the folder)")
    return parser


def _run(args) -> int:
    import torch

    from .grid import load_grid
    from .runner import run_grid, say, start

    start()  # joins torchrun's process group first, so that only rank 0 prints from here on

    overrides = dict(parse_assignment(text) for text in args.set)
    for key in ("lr", "epochs", "batch_size", "rank", "max_steps"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = check_setting(key, value, f"--{key.replace('_', '-')}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive whole number, not {args.limit}")
    cuda = torch.cuda.is_available()
    if args.grid:
        grid = load_grid(args.grid, cuda=cuda, say=say)
    else:
        from .grid import Grid

        size = args.size
        if size is None:
            size = "full" if cuda else "quick"
            if not cuda:
                say("no CUDA GPU: running at quick size (tiny random model, a few examples and steps); "
                    "pass --size full for the real sizes")
        grid = Grid(name="cli", size=size)
    records = run_grid(grid, args.out, settings=overrides, tasks=args.task, methods=args.method, seeds=args.seeds,
                       size=args.size, weights=args.weights, limit=args.limit if args.limit is not None else "env",
                       verbose=not args.quiet)
    say(f"{len(records)} run(s) done; report: python -m gpt2lab.experiments report "
        f"{Path(records[0]['run_dir']).parent if records and records[0].get('run_dir') else '<out>'}")
    return 0


def _report(args) -> int:
    from . import report  # lazy: scipy and matplotlib load only here

    report.report(args.folder, out=args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 with one line on stderr for a usage or settings error)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args) if args.command == "run" else _report(args)
    except (OneLineError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (finished runs are skipped)", file=sys.stderr)
        return 130
    finally:
        _finish()


def _finish() -> None:
    """Leave torchrun's process group cleanly (gpt2lab.parallel), when one was joined."""
    from .. import parallel

    parallel.destroy()
