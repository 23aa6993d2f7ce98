"""Benchmark: the time of a SMART training step divided by that of a plain step, same model, batch and optimizer.

    python -m gpt2lab.bench smart                        gpt2-small shapes, batch 2 x 128 tokens, CPU fp32, K = 1, 2
    python -m gpt2lab.bench smart --device cuda --amp    on a GPU with bf16 autocast
    python -m gpt2lab.bench smart --lora 8               with LoRA adapters on q, v (a frozen base)
    python -m gpt2lab.bench smart --tiny                 seconds-long smoke run (used by the tests)

A step is what the training loop does: loss (the task's, or the `gpt2lab.smart` objective's), backward, AdamW step.
Both loss shapes of the course are measured, with the tasks' own `outputs` on random token batches (random
weights; nothing is downloaded): "lm", next-token logits at every position (the sonnets), and "cloze", the two
answer logits at the last token (paraphrase). Variants: SMART with K ascent steps (`--steps`, default 1 and 2), and
K = 1 with the momentum Bregman term as well (one more no-grad forward and an EMA update per step).

The plain step and the variants are timed in alternation (the order rotates every repeat) so that drifts in machine
load hit all of them; the headline ratio is the median over repeats of each variant's time over the plain step of
the same repeat. The target is <= 2.0x for K = 1. What a SMART step costs beyond a plain one: K forward + backward
passes to the perturbation only (no weight gradients), one adversarial forward and its backward (the clean logits
of the task's own forward are reused). So a SMART step can be no faster than 2 x (forward + backward) + K ascent
passes + the optimizer step: the "floor" line times those parts alone and gives that bound, so the measured ratio
can be read against what the method itself costs (the rest is overhead). Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from ..tasks import ParaphraseTask, SonnetTask, Task


class LMShape(Task):
    """The sonnet task's loss shape: SonnetTask.outputs (next-token logits, masked LM loss) on any batch."""

    name = "lm"
    outputs = SonnetTask.outputs


class ClozeShape(Task):
    """The paraphrase task's loss shape: ParaphraseTask.outputs (the yes/no logits at the last token) on any batch."""

    name = "cloze"
    outputs = ParaphraseTask.outputs


SHAPES = {"lm": LMShape, "cloze": ClozeShape}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m gpt2lab.bench smart", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="gpt2", help="gpt2 | gpt2-medium | ... (default gpt2; random weights)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after 1 warm-up round)")
    p.add_argument("--steps", default="1,2", help="ascent steps K to measure, comma-separated (default 1,2)")
    p.add_argument("--tasks", default="lm,cloze", help="loss shapes: lm, cloze or both (default both)")
    p.add_argument("--no-bregman", action="store_true", help="skip the K = 1 + Bregman variant")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on q, v (0: full fine-tuning)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    try:
        args.steps = [int(k) for k in args.steps.split(",")]
    except ValueError:
        p.error(f"--steps takes whole numbers separated by commas, not {args.steps!r}")
    args.tasks = [t.strip() for t in args.tasks.split(",")]
    if any(t not in SHAPES for t in args.tasks):
        p.error(f"--tasks takes lm, cloze or both, not {','.join(args.tasks)!r}")
    if args.repeats < 1 or args.batch < 1 or args.seq < 2 or any(k < 0 for k in args.steps):
        p.error("--repeats and --batch must be >= 1, --seq >= 2, --steps >= 0")
    return args


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def make_batch(vocab: int, batch: int, seq: int, device, seed: int = 0) -> dict:
    """Random token ids, all real (unpadded), with 0/1 labels for the cloze shape."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)  # (B, T)
    labels = torch.randint(0, 2, (batch,), generator=g)  # (B,)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def time_step(model, task, batch, optimizer, device, amp: bool, after=None) -> tuple[float, float]:
    """One training step (loss, backward, optimizer step, then `after(model)`): (wall s, this process's CPU s)."""
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss = task.loss(model, batch)
    loss.backward()
    optimizer.step()
    if after is not None:
        after(model)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def time_parts(model, task, batch, optimizer, device, amp: bool) -> tuple[float, float, float]:
    """Wall seconds of the parts a SMART step is made of, each timed alone: (forward + backward of the task loss,
    optimizer step, one ascent pass = forward + backward to the perturbation with the parameters frozen)."""
    from ..smart import SmartRegularizer, frozen, perturb

    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    times = []
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    with autocast:
        out = task.outputs(model, batch)
    out.loss.backward()
    _sync(device)
    times.append(time.perf_counter() - start)
    start = time.perf_counter()
    optimizer.step()
    _sync(device)
    times.append(time.perf_counter() - start)
    reg = SmartRegularizer(task, steps=1)  # its settings: only the work is timed
    start = time.perf_counter()
    with autocast:
        embeds = task.embeddings(model, batch)
        with frozen(model):
            fn = lambda e: task.outputs(model, batch, e).logits
            perturb(fn, embeds, out.logits, out.mask, batch["attention_mask"], eps=reg.eps, steps=1)
    _sync(device)
    times.append(time.perf_counter() - start)
    return tuple(times)


def variants(task, steps: list[int], bregman: bool) -> list[tuple[str, object, object]]:
    """(label, objective, its MomentumBregman or None): the plain task first, then the SMART objectives."""
    from ..smart import MomentumBregman, smart_objective

    out = [("plain", task, None)]
    for k in steps:
        out.append((f"smart K={k}", smart_objective(task, weight=1.0, eps=1e-5, steps=k), None))
    if bregman:
        prox = MomentumBregman(task, weight=1.0, beta=0.99)
        out.append(("smart K=1 + bregman", smart_objective(task, weight=1.0, eps=1e-5, steps=1, proximal=prox), prox))
    return out


def bench_task(args, config, shape: str) -> dict[str, float]:
    """Time every variant on one loss shape; print and return the paired ratios to the plain step."""
    from ..model import GPT2

    torch.manual_seed(0)
    model = GPT2(config).to(args.device).train()
    if args.lora:
        from ..lora import add_lora

        add_lora(model, rank=args.lora, alpha=args.lora, targets="q,v")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)  # tiny steps: the weights stay those of the random model
    batch = make_batch(config.vocab_size, args.batch, args.seq, args.device)
    runs = []
    for label, objective, prox in variants(SHAPES[shape](), args.steps, not args.no_bregman):
        if prox is not None:
            prox.reset(model)  # what train's on_start does; its update runs after each step, as on_step
        runs.append((label, objective, None if prox is None else prox.update, []))
    task = runs[0][1]
    for _, objective, after, _ in runs:  # warm-up: allocator, kernels, lazy inits
        time_step(model, objective, batch, optimizer, args.device, args.amp, after)
    time_parts(model, task, batch, optimizer, args.device, args.amp)
    parts = []
    for i in range(args.repeats):
        shift = i % len(runs)  # rotate who goes first
        for _label, objective, after, times in runs[shift:] + runs[:shift]:
            times.append(time_step(model, objective, batch, optimizer, args.device, args.amp, after))
        parts.append(time_parts(model, task, batch, optimizer, args.device, args.amp))  # in the same round
    fb, opt, ascent = (statistics.median(p[i] for p in parts) for i in range(3))
    plain = [w for w, _ in runs[0][3]]
    print(f"{shape}: {args.config} (n_layer={config.n_layer}, n_embd={config.n_embd}), batch {args.batch} x {args.seq} "
          f"tokens, {args.device}{' bf16 autocast' if args.amp else ' fp32'}, "
          f"{'LoRA r=' + str(args.lora) + ' on q,v' if args.lora else 'full fine-tuning'}, AdamW, "
          f"{args.repeats} rotated repeats")
    ratios = {}
    for label, _, _, times in runs:
        wall = [w for w, _ in times]
        paired = statistics.median(a / b for a, b in zip(wall, plain))
        line = f"  {label:20s} median {statistics.median(wall) * 1e3:9.1f} ms/step"
        if label != "plain":
            ratios[label] = paired
            line += f"   ratio to plain {paired:.2f}x"
            if args.device == "cpu":
                cpu = statistics.median(a[1] / b[1] for a, b in zip(times, runs[0][3]))
                line += f" (CPU time {cpu:.2f}x)"
            if label == "smart K=1":
                line += "  target <= 2.0x"
        print(line)
    floors = ", ".join(f"K={k} {(2 * fb + k * ascent + opt) / (fb + opt):.2f}x" for k in args.steps)
    print(f"  floor of the method: {floors}  [(2 x forward+backward {fb * 1e3:.1f} ms + K x ascent pass "
          f"{ascent * 1e3:.1f} ms + optimizer step {opt * 1e3:.1f} ms) / (forward+backward + optimizer step), "
          "each part timed alone]")
    return ratios


def main(argv: list[str] | None = None) -> int:
    from ..model import GPT2Config

    args = _parse(argv or [])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:  # the cloze shape reads the "yes"/"no" ids 8505 and 3919: a vocabulary past them, tiny layers
        config = GPT2Config.tiny(n_positions=64, n_embd=32, n_head=2, n_layer=2, vocab_size=8600, dropout=args.dropout)
        args.config = "tiny"
        args.batch, args.seq, args.repeats = 2, 16, 2
    else:
        config = GPT2Config.from_name(args.config, dropout=args.dropout)
        if args.seq > config.n_positions:
            raise SystemExit(f"--seq must be <= {config.n_positions}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}")
    for shape in args.tasks:
        bench_task(args, config, shape)
    return 0
