"""Benchmark: a LoRA training step against full fine-tuning, by rank: step time and peak memory.

    python -m gpt2lab.bench lora                          gpt2-small shapes, batch 2 x 128 tokens, CPU fp32,
                                                          LoRA on q,v with ranks 1, 2, 4, 8, 16, 32, 64
    python -m gpt2lab.bench lora --device cuda --amp      on a GPU with bf16 autocast
    python -m gpt2lab.bench lora --batch 1 --seq 128 --ranks 1,8,64 --repeats 3
    python -m gpt2lab.bench lora --tiny                   seconds-long smoke run (used by the tests)

A step is what the training loop does: forward, next-token loss, backward, an AdamW step (torch.optim.AdamW on the
trainable parameters) and zero_grad. Every setting starts from the same random gpt2-small weights (seed 0).
Times are medians over --repeats steps after 2 warm-up steps; on a CPU the process's CPU time per step is printed
too (steadier than wall time on a shared machine; exact with --threads 1). Peak memory comes from
`gpt2lab.runs.PeakMemory` (torch.cuda.max_memory_allocated on a GPU, the peak resident memory on a CPU), reset
just before the model is built, minus what the process held at that moment: it counts this setting's weights,
gradients, optimizer state and activations. On a CPU each setting runs in a fresh python process (--isolate, the
default there), because memory freed by one setting is not always handed back to the system and would hide the
next setting's peak. Ratios are LoRA / full fine-tuning (< 1: LoRA is cheaper).

What to expect: LoRA drops the weight gradients and AdamW's two moments of the frozen base (3 x 124M floats for
gpt2-small), so peak memory falls at every rank (the factors are under 2% of the weights even at r = 64); by how
much depends on the share of the activations, which LoRA does not shrink (about x0.33 at batch 1 x 128 on a CPU,
x0.72 at batch 8 x 512 fp32 on an H100). Time falls less: the forward and the backward through the activations
still run in full; LoRA saves the weight-gradient products and the AdamW update of the base (about x0.45 on a CPU,
x0.73 at 8 x 512 fp32 on an H100). A step bound by kernel launches (small batches, bf16 on a large GPU) can even be
slower with LoRA, whose extra small kernels cost more there than the work they save. At scale the savings are
larger: Hu et al. 2021 (arXiv 2106.09685, §4.2) report 2/3 less training memory and a 25% faster step on GPT-3.

Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time

import torch

RANKS = (1, 2, 4, 8, 16, 32, 64)


def add_step_arguments(p: argparse.ArgumentParser, tiny: str) -> None:
    """The options of the suites that time training steps setting by setting (lora, lora_optim)."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per setting (after 2 warm-ups)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each setting in a fresh process (default: on a CPU only)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help=tiny)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one setting, print JSON


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m gpt2lab.bench lora", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="gpt2", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl (default gpt2)")
    add_step_arguments(p, tiny="tiny sizes, ranks 1 and 4: a smoke run in seconds")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated LoRA ranks (default 1..64)")
    p.add_argument("--targets", default="q,v", help="LoRA targets (gpt2lab.lora.TARGETS names; default q,v)")
    args = p.parse_args(argv)
    try:
        args.rank_list = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ranks must be comma-separated integers such as 1,4,16, not {args.ranks!r}")
    if not args.rank_list or min(args.rank_list) < 1:
        p.error(f"--ranks must be positive integers such as 1,4,16, not {args.ranks!r}")
    if args.batch < 1 or args.seq < 2 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1 and --seq >= 2")
    if args.tiny:
        args.config, args.batch, args.seq, args.repeats, args.rank_list = "tiny", 2, 16, 3, [1, 4]
    if args.isolate is None:
        args.isolate = torch.device(args.device).type == "cpu" and not args.tiny
    return args


def _model_config(args):
    from ..model import GPT2Config

    if args.tiny:
        return GPT2Config.tiny(n_positions=64, vocab_size=512)
    config = GPT2Config.from_name(args.config, dropout=0.0)
    if args.seq > config.n_positions:
        raise SystemExit(f"--seq must be <= {config.n_positions}")
    return config


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _current_mb(device) -> float:
    """What the process holds now (the baseline the peak is measured above)."""
    from .. import runs

    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    rss = runs._rss_mb()  # psutil; without it the peak is reported with the process's own baseline included
    return 0.0 if rss is None else rss


def _lifetime_peak_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def measure(setting: str, args) -> dict:
    """Build the model for `setting` ("full" or "r<rank>"), time --repeats training steps, return the figures."""
    from .. import runs
    from ..lora import add_lora, parameter_report
    from ..model import GPT2, lm_loss

    device = torch.device(args.device)
    config = _model_config(args)
    gc.collect()
    memory = runs.PeakMemory(device).start()  # reset the peak counter, then note what the process holds already
    baseline = _current_mb(device)
    torch.manual_seed(0)
    model = GPT2(config).to(device).train()  # random gpt2-small weights: values do not change the cost
    if setting != "full":
        add_lora(model, int(setting[1:]), targets=args.targets)
    report = parameter_report(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(1)).to(device)  # fmt: skip
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else contextlib.nullcontext())
    walls, cpus = [], []
    for i in range(2 + args.repeats):  # 2 warm-ups: allocator, kernels, the optimizer's lazily created state
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast:
            loss = lm_loss(model(ids), ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= 2:
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu_start)
        memory.sample()
    peak = memory.peak_mb()
    if args.one is not None and memory.how.startswith("resident memory sampled") and _lifetime_peak_mb():
        # the peak counter could not be reset (it happens under load): in a fresh process the lifetime peak is
        # this setting's own, and unlike samples taken between steps it includes the peak inside a step
        peak, memory.how = _lifetime_peak_mb(), "the process's lifetime peak resident memory (a fresh process)"
    peak -= baseline
    del model, optimizer, loss
    gc.collect()
    return {"setting": setting, "trainable": report["trainable"], "total": report["total"],
            "wall_ms": [w * 1e3 for w in walls], "cpu_ms": [c * 1e3 for c in cpus], "peak_mb": peak,
            "how": memory.how}  # fmt: skip


def run_isolated(suite: str, setting: str, argv: list[str]) -> dict:
    """`measure(setting)` of `python -m gpt2lab.bench <suite>` in a fresh python process, so that its peak memory is
    its own; `argv` holds the suite's other options. The child prints one `RESULT <json>` line."""
    command = [sys.executable, "-m", "gpt2lab.bench", suite, "--one", setting, *argv, "--no-isolate"]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"setting {setting} failed in its own process: {(done.stderr or done.stdout).strip()[-500:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def with_threads(threads: int | None, run, args) -> int:
    """run(args) with torch on `threads` threads (None: as it is), then the thread count as it was: a bench's main
    may run inside another program (the tests)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(before)


def _measure_isolated(setting: str, args) -> dict:
    size = ["--tiny"] if args.tiny else ["--config", args.config]  # "tiny" is no config name: pass the flag on
    argv = [*size, "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
            "--targets", args.targets, "--repeats", str(args.repeats)]  # fmt: skip
    argv += ["--amp"] * args.amp + (["--threads", str(args.threads)] if args.threads else [])
    return run_isolated("lora", setting, argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv or [])
    return with_threads(args.threads, _main, args)


def _main(args) -> int:
    if args.one is not None:  # the child process of --isolate
        print("RESULT " + json.dumps(measure(args.one, args)))
        return 0
    settings = ["full"] + [f"r{r}" for r in args.rank_list]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}")
    print(f"training step (forward + backward + AdamW step)  {args.config}, batch {args.batch} x {args.seq} tokens, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, LoRA targets {args.targets}, median of {args.repeats} steps"
          f"{', each setting in its own process' if args.isolate else ''}")  # fmt: skip
    results = {}
    for setting in settings:
        results[setting] = _measure_isolated(setting, args) if args.isolate else measure(setting, args)
    full = results["full"]
    t_full, c_full = statistics.median(full["wall_ms"]), statistics.median(full["cpu_ms"])
    cpu = torch.device(args.device).type == "cpu"
    header = (f"  {'setting':<18}{'trainable':>13}{'fraction':>10}{'step ms':>10}{'time ratio':>12}"
              + (f"{'CPU ms':>9}{'CPU ratio':>11}" if cpu else "") + f"{'peak MiB':>10}{'memory ratio':>14}")
    print(header)
    for setting in settings:
        r = results[setting]
        t, c = statistics.median(r["wall_ms"]), statistics.median(r["cpu_ms"])
        label = "full fine-tuning" if setting == "full" else f"r={setting[1:]}"
        print(f"  {label:<18}{r['trainable']:>13,}{100 * r['trainable'] / r['total']:>9.3f}%{t:>10.1f}"
              f"{t / t_full:>12.3f}" + (f"{c:>9.1f}{c / c_full:>11.3f}" if cpu else "")
              + f"{r['peak_mb']:>10.1f}{r['peak_mb'] / full['peak_mb']:>14.3f}")  # fmt: skip
    print(f"  peak memory: {full['how']}; above what the process held before building the model")
    return 0
