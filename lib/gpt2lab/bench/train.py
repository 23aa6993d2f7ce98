"""Benchmark: GPT-2-small fine-tuning throughput and MFU on the paraphrase task, ours vs transformers' GPT-2.

    python -m gpt2lab.bench train                     gpt2-small, batch 32, 20 timed steps after 5 warm-ups,
                                                      bf16 autocast on CUDA (fp32 on a CPU)
    python -m gpt2lab.bench train --compile --length-batching --batch-size 64
    python -m gpt2lab.bench train --epoch             also time a full training epoch of our model (a GPU)
    python -m gpt2lab.bench train --tiny              tiny model, seconds on a CPU (used by the tests)

Used in notebook 09 (experiments), §GPU path. Both models get the same random gpt2-small weights (ours loaded
from the reference's state dict), train on the SAME batches of the paraphrase task (real tokenizer, real Quora
data) through the course's own loop (`gpt2lab.train.train`, no evaluation, no files, the course's AdamW with
weight decay on the matrices), one after the other in this process. The clock starts after `--warmup` steps and
stops after the last one, with CUDA synchronised at both ends. `--loop minimal` times instead a bare loop that
does the loop's step (task.loss, backward, gradient clipping, optimizer step) on batches collated beforehand and
without the loop's one wait per step for the loss: the gap between the two is the loop's own overhead
(tokenising each batch, the loss.item()). `--compile` is the loop's own option (`TrainConfig.compile`: each
model compiled whole, in place; our cloze path's `hidden_states` and `head` calls run eagerly); shapes change from
batch to batch, so give a few warm-ups.

FLOPs (model FLOPs, PaLM, Chowdhery et al. 2022, appendix B), for a batch of B rows padded to T tokens:

    FLOPs = B*T * (6*N + 12*L*d*T)  +  B * 6*V*d

N = the weights of the blocks' matrix products, 12*L*d^2 (84,934,656 for gpt2-small; biases, LayerNorms and
the embedding lookups do no matrix products), 12*L*d*T = PaLM's 12*L*H*Q*T (H*Q = d) for the attention scores
and the weighted sum, forward and backward, without halving for the causal mask. The task reads the head at
the answer position only, so the head costs 6*V*d per row, not per token (ours computes just that; the
reference computes the head at every position and does more work than the FLOPs credit it with). "MFU" counts
the padded batch (what the kernels run); "useful MFU" counts each row at its real length (what the task needs),
so length batching raises the second. MFU = FLOPs / seconds / peak, peak the bf16 dense tensor-core figure of
the GPU (`PEAK_TFLOPS`, or `--peak-tflops`); on a CPU, "n/a" unless `--peak-tflops` is given.

Epoch time: without `--epoch` it is an ESTIMATE, the real tokens of the training split (counted once with the
tokenizer) divided by the measured real tokens/s. The offline data holds only the first 14,139 rows of the
training split: then the count is scaled to the full split (`FULL_TRAIN_PAIRS`, or `--epoch-pairs`), and said so.
Targets (ours >= 45% MFU in bf16 on an H100, faster than transformers, an epoch in <= 5 minutes) are printed
beside the measurements, never asserted. Timings live here, never in tests.

What to expect on a CPU (one thread, fp32, batch 4, course loop): gpt2-small 2.6 s a step for ours, 3.6 s for
transformers' (x0.72; transformers' also runs the head at every position), 0.06 TFLOPS; tiny, 43 ms vs 186 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch

# bf16 dense tensor-core peak, TFLOPS, by a piece of torch.cuda.get_device_name(); the first match wins
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# INFERRED: the full CS224N minBERT Quora training split ("141k pairs"); offline only its first rows are present
FULL_TRAIN_PAIRS = 141_506
TARGETS = {"mfu": 0.45, "ratio": 1.0, "epoch_s": 300.0}
MODELS = ("ours", "transformers")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m gpt2lab.bench train", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="gpt2", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl (default gpt2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("bf16", "none"), default=None, help="autocast (default: bf16 on CUDA, else none)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per model")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (kernels, allocator, compilation)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--length-batching", action="store_true", help="batches of similar lengths (the loop's option)")
    p.add_argument("--loop", choices=("course", "minimal"), default="course", help="see the module docstring")
    p.add_argument("--epoch", action="store_true", help="also time a full training epoch of our model")
    p.add_argument("--epoch-pairs", type=int, default=None, help="pairs in a full epoch (default: the split's)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training pairs")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak of the device (default: by GPU name)")
    p.add_argument("--tiny", action="store_true", help="tiny model (2 layers, 64 dims): a CPU smoke run")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch-size and --steps must be >= 1 and --warmup >= 0")
    if args.amp is None:
        args.amp = "bf16" if torch.device(args.device).type == "cuda" else "none"
    if args.tiny:
        args.config = "tiny"
    return args


# ------------------------------------------------------------------------------------------------------- FLOPs


def non_embedding_params(config) -> int:
    """N of the FLOPs formula: the weights of the blocks' matrix products, 12 * L * d^2 (qkv 3d^2, proj d^2,
    MLP 8d^2 per layer)."""
    return 12 * config.n_layer * config.n_embd**2


def batch_flops(config, lengths: list[int], width: int) -> tuple[float, float]:
    """(padded, useful) model FLOPs of one training step (forward + backward) on rows of real `lengths` padded to
    `width` tokens: per token 6N + 12*L*d*T (T = width, or the row's own length for "useful"), plus 6*V*d per
    row for the head at the answer position."""
    n, attn = non_embedding_params(config), 12 * config.n_layer * config.n_embd
    head = 6 * config.vocab_size * config.n_embd
    padded = len(lengths) * (width * (6 * n + attn * width) + head)
    useful = sum(t * (6 * n + attn * t) + head for t in lengths)
    return float(padded), float(useful)


def peak_tflops(device, override: float | None) -> tuple[float | None, str]:
    """(peak TFLOPS or None, where it came from)."""
    if override is not None:
        return override, "--peak-tflops"
    if torch.device(device).type != "cuda":
        return None, "no peak for a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(torch.device(device))
    for piece, tflops in PEAK_TFLOPS:
        if piece.lower() in name.lower():
            return tflops, f"{name}: bf16 dense {tflops:g} TFLOPS"
    return None, f"{name}: not in the table (give --peak-tflops)"


# -------------------------------------------------------------------------------------------------- set-up


def model_config(args):
    from ..model import GPT2Config

    if args.tiny:  # prompts reach 329 tokens: positions enough for every training pair
        return GPT2Config.tiny(n_positions=512)
    return GPT2Config.from_name(args.config)


def load_task(args, config):
    from ..tasks import ParaphraseTask

    return ParaphraseTask.load(train_limit=args.train_limit, dev_limit=1, test_limit=1,
                               max_length=config.n_positions, progress=False)  # fmt: skip


def count_epoch(task, args) -> dict:
    """Real tokens of the training split (counted with the tokenizer) and the pairs of a full epoch."""
    from .. import data

    pairs = len(task.train_set)
    tokens = sum(len(task.encode(pair)[0]) for pair in task.train_set)
    subset_size = data.KNOWN_SUBSETS.get(data.QUORA_FILES["train"], (None,))[0]
    train_file = data.data_dir() / data.QUORA_FILES["train"]
    partial = args.train_limit is not None or (train_file.exists() and train_file.stat().st_size == subset_size)
    epoch_pairs = args.epoch_pairs or (FULL_TRAIN_PAIRS if partial else pairs)
    return {"pairs_counted": pairs, "tokens_counted": tokens, "epoch_pairs": epoch_pairs,
            "epoch_tokens": tokens * epoch_pairs / pairs, "scaled": epoch_pairs != pairs}  # fmt: skip


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model, lr):
    """The grid's full+adamw optimizer (`gpt2lab.experiments.methods.adamw`): AdamW, weight decay 0.01 on matrices."""
    from ..experiments.methods import adamw

    return adamw(model, lr)


class _Counted:
    """The task, with the attention mask of every batch its loss sees kept (on the device: no wait for it)."""

    def __init__(self, task):
        self.task, self.masks = task, []

    def loss(self, model, batch, *args, **kwargs):
        self.masks.append(batch["attention_mask"])
        return self.task.loss(model, batch, *args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self.task, attr)


def first_batch_losses(ours, ref, task, batch_size: int, seed: int) -> dict:
    """The loss of both models on the loop's first batch, fp32, dropout off: equal when the weights are."""
    from ..batches import epoch_order
    from ..tasks import to_device

    order = epoch_order(len(task.train_set), seed, 0)
    batch = task.collate([task.train_set[i] for i in order[:batch_size]])
    out = {}
    for name, model in zip(MODELS, (ours, ref)):
        model.eval()
        with torch.no_grad():
            out[name] = task.loss(model, to_device(batch, next(model.parameters()).device)).item()
        model.train()
    return out


# --------------------------------------------------------------------------------------------------- timing


def _train_config(args, steps: int | None, n_train: int, seed: int):
    from ..train import TrainConfig

    epochs = 1 if steps is None else math.ceil(steps / math.ceil(n_train / args.batch_size))
    return TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=1e-4, max_steps=steps, evaluate=False,
                       out_dir=None, progress=False, seed=seed, amp=None if args.amp == "none" else args.amp,
                       length_batching=args.length_batching, compile=args.compile)  # fmt: skip


def time_course_loop(model, task, args, seed: int = 0) -> tuple[float, list]:
    """Train `warmup + steps` steps with gpt2lab.train.train; (seconds of the last `steps`, their masks)."""
    from ..train import Callback, train

    device, warmup = args.device, args.warmup
    clock = {}

    class Clock(Callback):
        def on_start(self, loop):
            if warmup == 0:
                _sync(device)
                clock["start"] = time.perf_counter()

        def on_step(self, loop):
            if loop.step == warmup:
                _sync(device)
                clock["start"] = time.perf_counter()

        def on_end(self, loop):
            _sync(device)
            clock["end"] = time.perf_counter()

    counted = _Counted(task)
    config = _train_config(args, warmup + args.steps, len(task.train_set), seed)
    train(model, counted, make_optimizer, config, callbacks=[Clock()])
    return clock["end"] - clock["start"], counted.masks[warmup:]


def time_minimal_loop(model, task, args, seed: int = 0) -> tuple[float, list]:
    """The loop's step on batches collated (and pinned) beforehand, no per-step wait: (seconds, masks).

    The batches are the loop's (its epoch-0 order, or its `length_batches` with --length-batching)."""
    from ..batches import epoch_order, example_length, length_batches
    from ..tasks import to_device

    device = torch.device(args.device)
    n, size = args.warmup + args.steps, args.batch_size
    order = epoch_order(len(task.train_set), seed, 0)
    indices = [order[(k * size) % len(order) :][:size] for k in range(n)]  # the loop's batches, epoch 0
    if args.length_batching:  # the loop's length batching
        lengths = [example_length(task, pair) for pair in task.train_set]
        drawn = length_batches(lengths, size, seed, 0)
        indices = [drawn[k % len(drawn)] for k in range(n)]
    batches = [task.collate([task.train_set[i] for i in idx]) for idx in indices]
    if device.type == "cuda":
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    optimizer = make_optimizer(model, 1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
    model.train()
    start = None
    for k, batch in enumerate(batches):
        if k == args.warmup:
            _sync(device)
            start = time.perf_counter()
        batch = to_device(batch, device)
        with autocast:
            loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    _sync(device)
    return time.perf_counter() - start, [b["attention_mask"] for b in batches[args.warmup :]]


def summarize(config, seconds: float, masks: list, peak: float | None) -> dict:
    """Throughput, FLOPs and MFU of the timed steps."""
    shapes = [(m.sum(dim=1).tolist(), m.shape[1]) for m in (m.cpu() for m in masks)]  # (lengths, width) per step
    flops = [batch_flops(config, lengths, width) for lengths, width in shapes]
    real = sum(sum(lengths) for lengths, _ in shapes)
    padded = sum(len(lengths) * width for lengths, width in shapes)
    padded_flops, useful_flops = sum(f[0] for f in flops), sum(f[1] for f in flops)
    tflops = padded_flops / seconds / 1e12
    return {
        "steps": len(shapes), "seconds": seconds, "step_s": seconds / len(shapes),
        "real_tokens": real, "padded_tokens": padded,
        "real_tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds,
        "flops": padded_flops, "useful_flops": useful_flops, "achieved_tflops": tflops,
        "mfu": None if peak is None else tflops / peak,
        "useful_mfu": None if peak is None else useful_flops / seconds / 1e12 / peak,
        "batches": [[len(lengths), width, sum(lengths)] for lengths, width in shapes],  # rows, width, real tokens
    }  # fmt: skip


def time_epoch(model, task, args, counts: dict) -> dict:
    """One full epoch of the course loop over the training pairs loaded, timed from the call to the end."""
    from ..train import train

    config = _train_config(args, None, len(task.train_set), seed=0)
    _sync(args.device)
    start = time.perf_counter()
    record = train(model, task, make_optimizer, config)
    _sync(args.device)
    seconds = time.perf_counter() - start
    scale = counts["epoch_pairs"] / len(task.train_set)
    return {"pairs": len(task.train_set), "steps": record["steps"], "seconds": seconds,
            "train_time_s": record["train_time_s"], "epoch_s": seconds * scale, "scaled": scale != 1}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- main


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    from .lora import with_threads

    args = _parse(argv or [])
    return with_threads(args.threads, _main, args)


def _main(args) -> int:
    from ..train import compile_model
    from .model import build_pair

    device = torch.device(args.device)
    config = model_config(args)
    peak, peak_how = peak_tflops(device, args.peak_tflops)
    task = load_task(args, config)
    counts = count_epoch(task, args)
    torch.manual_seed(0)
    ours, ref = build_pair(config, device)  # same random weights; transformers' on its SDPA attention
    start_weights = {k: v.detach().clone() for k, v in ours.state_dict().items()} if args.epoch else None
    losses = first_batch_losses(ours, ref, task, args.batch_size, seed=0)

    notes = []
    if args.compile and args.loop == "course":
        notes.append("--compile: the loop's TrainConfig(compile=True) (gpt2lab.train.compile_model)")
    elif args.compile:  # the minimal loop: compiled the loop's way, before timing
        for model in (ours, ref):
            compile_model(model)
        notes.append("--compile: gpt2lab.train.compile_model on both models before timing")
    if args.amp == "none" and peak is not None:
        notes.append("fp32 (--amp none): MFU is still against the bf16 peak")
    timer = time_course_loop if args.loop == "course" else time_minimal_loop

    results = {}
    for name, model in zip(MODELS, (ours, ref)):
        seconds, masks = timer(model, task, args)
        results[name] = {**summarize(config, seconds, masks, peak), "first_loss": losses[name]}
    ratio = results["ours"]["step_s"] / results["transformers"]["step_s"]
    estimate = counts["epoch_tokens"] / results["ours"]["real_tokens_per_s"]
    epoch = None
    if args.epoch:
        ours.load_state_dict(start_weights)
        epoch = time_epoch(ours, task, args, counts)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}; peak: {peak_how}")
    print(f"fine-tuning step  {args.config} (n_layer={config.n_layer}, n_embd={config.n_embd}, dropout "
          f"{config.dropout}), paraphrase task, batch {args.batch_size}, {args.amp if args.amp != 'none' else 'fp32'}"
          f", {args.loop} loop{', compiled' if args.compile else ''}"
          f"{', length batching' if args.length_batching else ''}; {args.steps} timed steps after {args.warmup} "
          f"warm-ups, same batches for both")  # fmt: skip
    for note in notes:
        print(f"  note: {note}")
    print(f"  {'model':<14}{'step ms':>9}{'real tok/s':>12}{'padded tok/s':>14}{'TFLOPS':>9}{'MFU':>8}"
          f"{'useful MFU':>12}{'first loss':>12}")  # fmt: skip
    for name in MODELS:
        r = results[name]
        print(f"  {name:<14}{r['step_s'] * 1e3:>9.1f}{r['real_tokens_per_s']:>12,.0f}{r['padded_tokens_per_s']:>14,.0f}"
              f"{r['achieved_tflops']:>9.3f}{_pct(r['mfu']):>8}{_pct(r['useful_mfu']):>12}{r['first_loss']:>12.6f}")
    print(f"  ratio ours/transformers (step time) = {ratio:.3f}   target < {TARGETS['ratio']:g} (faster)")
    print(f"  MFU of ours = {_pct(results['ours']['mfu'])}   target >= {TARGETS['mfu']:.0%} in bf16 on an H100")
    print(f"  same first-batch loss (same weights, fp32, no dropout): |ours - transformers| = "
          f"{abs(losses['ours'] - losses['transformers']):.2e}")
    print(f"  FLOPs/step = B*T*(6N + 12*L*d*T) + B*6*V*d, N = {non_embedding_params(config):,} (PaLM app. B); "
          "MFU: padded batch; useful: real lengths")
    scaled = (f", scaled from the {counts['pairs_counted']:,} pairs present to {counts['epoch_pairs']:,}"
              if counts["scaled"] else "")
    print(f"  epoch ESTIMATE (ours) = {counts['epoch_tokens']:,.0f} real tokens{scaled} / "
          f"{results['ours']['real_tokens_per_s']:,.0f} real tokens/s = {estimate:.1f} s   "
          f"target <= {TARGETS['epoch_s']:g} s")
    if epoch is not None:
        how = (f"{epoch['seconds']:.1f} s for the {epoch['pairs']:,} pairs present, scaled to "
               f"{counts['epoch_pairs']:,} pairs" if epoch["scaled"] else "measured")
        print(f"  epoch TIMED (ours) = {epoch['epoch_s']:.1f} s ({how}; {epoch['steps']} steps, loop train time "
              f"{epoch['train_time_s']:.1f} s)   target <= {TARGETS['epoch_s']:g} s")
    if args.json:
        out = {
            "config": args.config, "model": config.to_dict(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "amp": args.amp, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
            "loop": args.loop, "compile": args.compile, "length_batching": args.length_batching, "notes": notes,
            "peak_tflops": peak, "peak_how": peak_how, "n_nonembedding": non_embedding_params(config),
            "flops_formula": "B*T*(6*N + 12*L*d*T) + B*6*V*d per step (padded); per row at its real length (useful)",
            "models": results, "ratio_ours_over_transformers": ratio,
            "epoch_estimate": {**counts, "real_tokens_per_s": results["ours"]["real_tokens_per_s"],
                               "seconds": estimate},
            "epoch": epoch, "targets": TARGETS, "torch": torch.__version__,
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"  numbers written to {args.json}")
    return 0
