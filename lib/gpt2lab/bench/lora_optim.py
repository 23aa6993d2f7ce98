"""Benchmark: AdaPreLoRA's training step against LoRA-AdamW's on GPT-2-small-shaped adapters (q,v, rank 8).

    python -m gpt2lab.bench lora_optim                    gpt2-small shapes, batch 2 x 128 tokens, CPU fp32
    python -m gpt2lab.bench lora_optim --device cuda --amp
    python -m gpt2lab.bench lora_optim --tiny             seconds-long smoke run (used by the tests)

Built for notebook 08 (adaprelora). A step is what the training loop does: forward, next-token loss, backward,
optimizer step, zero_grad. AdaPreLoRA costs more than LoRA-AdamW in two places: the backward, where hooks reduce
each adapted matrix's gradient G = δᵀ x~ to its row and column sums of G∘G (one (m, n) matrix alive at a time),
and the step, with its r×r solves per pair. Both are timed: the whole step (the figure that matters, target
<= 1.3x LoRA-AdamW's) and the optimizer's step() alone. Optimizer state is counted in bytes (target: equal to
LoRA-AdamW's up to the m + n statistics per pair); peak memory is measured as in `gpt2lab.bench.lora` (each setting
in a fresh process on a CPU; torch.cuda.max_memory_allocated on a GPU). Every setting starts from the same random
gpt2-small weights and adapters (seed 0). Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time

import torch

from .lora import _current_mb, _lifetime_peak_mb, _sync, add_step_arguments, run_isolated, with_threads

SETTINGS = ("adamw", "adaprelora", "adaprelora-sgd", "adaprelora-gram", "scaled-adamw")


def _optimizer(setting: str, model):
    from ..optim import AdamW, AdaPreLoRA, ScaledAdamW

    if setting == "adamw":
        return AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    if setting == "scaled-adamw":
        return ScaledAdamW(model, lr=1e-4)
    mode = "sgd" if setting == "adaprelora-sgd" else "scaled_adamw"
    return AdaPreLoRA(model, lr=1e-4, mode=mode, stats="gram" if setting == "adaprelora-gram" else "transient")


def measure(setting: str, args) -> dict:
    """Build the model with adapters and the optimizer for `setting`, time --repeats training steps."""
    from .. import runs
    from ..lora import add_lora
    from ..model import GPT2, GPT2Config, lm_loss
    from ..train import optimizer_state_bytes

    device = torch.device(args.device)
    config = GPT2Config.tiny(n_positions=64, vocab_size=512) if args.tiny else GPT2Config.from_name("gpt2",
                                                                                                     dropout=0.0)
    gc.collect()
    memory = runs.PeakMemory(device).start()
    baseline = _current_mb(device)
    torch.manual_seed(0)
    model = add_lora(GPT2(config).to(device).train(), args.rank, alpha=2 * args.rank, targets="q,v")
    optimizer = _optimizer(setting, model)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(1)).to(device)  # fmt: skip
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else contextlib.nullcontext()
    walls, cpus, steps = [], [], []
    for i in range(2 + args.repeats):  # 2 warm-ups: allocator, kernels, the optimizer's lazily created state
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast:
            loss = lm_loss(model(ids), ids)
        loss.backward()
        _sync(device)
        step_start = time.perf_counter()
        optimizer.step()
        _sync(device)
        step_time = time.perf_counter() - step_start
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu_start)
            steps.append(step_time)
        memory.sample()
    peak = memory.peak_mb()
    if args.one is not None and memory.how.startswith("resident memory sampled") and _lifetime_peak_mb():
        peak, memory.how = _lifetime_peak_mb(), "the process's lifetime peak resident memory (a fresh process)"
    pairs = [(p.B.shape[0], p.A.shape[1]) for p in getattr(optimizer, "pairs", [])] or None
    result = {"setting": setting, "wall_ms": [w * 1e3 for w in walls], "cpu_ms": [c * 1e3 for c in cpus],
              "step_ms": [s * 1e3 for s in steps], "state_bytes": optimizer_state_bytes(optimizer),
              "peak_mb": peak - baseline, "how": memory.how,
              "m_plus_n": sum(m + n for m, n in pairs) if pairs else None}  # fmt: skip
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    del model, optimizer, loss
    gc.collect()
    return result


def _measure_isolated(setting: str, args) -> dict:
    argv = ["--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
            "--repeats", str(args.repeats)] + ["--amp"] * args.amp + ["--tiny"] * args.tiny  # fmt: skip
    argv += ["--threads", str(args.threads)] if args.threads else []
    return run_isolated("lora_optim", setting, argv)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m gpt2lab.bench lora_optim", description=__doc__.split("\n")[0])
    add_step_arguments(p, tiny="a tiny model: a smoke run in seconds")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)}")
    args = p.parse_args(argv)
    args.setting_list = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.setting_list if s not in SETTINGS]
    if unknown or "adamw" not in args.setting_list:
        p.error(f"--settings must include adamw and come from {', '.join(SETTINGS)}; got {args.settings!r}")
    if args.batch < 1 or args.seq < 2 or args.repeats < 1 or args.rank < 1:
        p.error("--batch, --repeats and --rank must be >= 1 and --seq >= 2")
    if args.tiny:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 16)
    if args.isolate is None:
        args.isolate = torch.device(args.device).type == "cpu" and not args.tiny
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv or [])
    return with_threads(args.threads, _main, args)


def _main(args) -> int:
    if args.one is not None:
        print("RESULT " + json.dumps(measure(args.one, args)))
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}")
    print(f"training step (forward + backward + step), {'tiny model' if args.tiny else 'gpt2-small'}, LoRA q,v rank "
          f"{args.rank}, batch {args.batch} x {args.seq} tokens, {'bf16 autocast' if args.amp else 'fp32'}, median of "
          f"{args.repeats} steps{', each setting in its own process' if args.isolate else ''}")  # fmt: skip
    results = {s: _measure_isolated(s, args) if args.isolate else measure(s, args) for s in args.setting_list}
    base = results["adamw"]
    med = {s: {k: statistics.median(r[k]) for k in ("wall_ms", "cpu_ms", "step_ms")} for s, r in results.items()}
    cpu = torch.device(args.device).type == "cpu"
    print(f"  {'optimizer':<17}{'step ms':>9}{'ratio':>7}" + (f"{'CPU ms':>9}{'ratio':>7}" if cpu else "")
          + f"{'opt.step ms':>12}{'state bytes':>13}{'- AdamW':>10}{'peak MiB':>10}{'ratio':>7}")  # fmt: skip
    for s, r in results.items():
        t, c = med[s], med["adamw"]
        print(f"  {s:<17}{t['wall_ms']:>9.1f}{t['wall_ms'] / c['wall_ms']:>7.3f}"
              + (f"{t['cpu_ms']:>9.1f}{t['cpu_ms'] / c['cpu_ms']:>7.3f}" if cpu else "")
              + f"{t['step_ms']:>12.2f}{r['state_bytes']:>13,}{r['state_bytes'] - base['state_bytes']:>10,}"
              + f"{r['peak_mb']:>10.1f}{r['peak_mb'] / base['peak_mb'] if base['peak_mb'] > 0 else float('nan'):>7.3f}")
    extra = results.get("adaprelora")
    if extra is not None and extra["m_plus_n"]:
        print(f"  AdaPreLoRA's extra state: {extra['state_bytes'] - base['state_bytes']:,} bytes; 4 bytes x the sum of "
              f"m + n over its pairs = {4 * extra['m_plus_n']:,} (targets: step ratio <= 1.3, extra state O(m + n))")
    print(f"  peak memory: {base['how']}; above what the process held before building the model")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
