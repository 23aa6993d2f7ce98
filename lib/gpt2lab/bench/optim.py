"""Benchmark: one step of our AdamW vs torch.optim.AdamW(foreach=True) on GPT-2-small-shaped parameters.

    python -m gpt2lab.bench optim [--device cpu|cuda] [--repeats 9] [--steps 2] [--dtype float32] [--threads N]
                                  [--small]

The parameter shapes are GPT-2 small's (124,439,808 values: wte 50257×768, wpe 1024×768, 12 blocks of
c_attn 768×2304, c_proj 768×768, c_fc 768×3072, mlp c_proj 3072×768, their biases and the LayerNorms); the
gradients are random and fixed. Each optimizer gets its own copy of the parameters. Ours and torch's are timed
in alternation (one timed batch of `--steps` steps each per repeat, order swapped every repeat) so that drifts in
machine load hit both. The headline ratio (ours / torch) is the median over repeats of the ratio of each
back-to-back pair, which cancels slow changes in load on a shared machine; the ratio of the median step times and
of the fastest runs are printed beside it.
`--small` uses tiny shapes (the smoke test). Built for notebook 03 (adamw); timings are never asserted in tests.

SOAP section (notebook 07): one step of gpt2lab.optim.SOAP vs pytorch_optimizer.SOAP (the same params and grads,
float32, precondition_frequency 10). A SOAP step is one of two kinds: a plain step (rotate, Adam, rotate back,
update the Kronecker factors) or, every 10th step, a refresh step that adds one power iteration + QR per factor.
Each step is timed on its own, ours and the reference's back to back (order swapped every step); the figures are
the medians of each kind and the amortised step (9 plain + 1 refresh) / 10, whose ratio is the headline (target
<= 1.0x). The first call (statistics and a full eigendecomposition) is timed once, apart. `--soap-layers` sets the
number of GPT-2-small blocks (default: all 12 on a GPU, 1 on a CPU, where a 3072×3072 QR takes seconds; the token
and position embeddings are always in). `--soap-steps 0` skips the section.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..optim import SOAP, AdamW


def gpt2_shapes(vocab: int = 50257, n_positions: int = 1024, n_embd: int = 768, n_layer: int = 12) -> list[tuple]:
    """The parameter shapes of GPT-2 (small by default), in the order the model registers them."""
    shapes: list[tuple] = [(vocab, n_embd), (n_positions, n_embd)]
    for _ in range(n_layer):
        shapes += [(n_embd,), (n_embd,)]  # ln_1 weight, bias
        shapes += [(n_embd, 3 * n_embd), (3 * n_embd,)]  # attn.c_attn
        shapes += [(n_embd, n_embd), (n_embd,)]  # attn.c_proj
        shapes += [(n_embd,), (n_embd,)]  # ln_2
        shapes += [(n_embd, 4 * n_embd), (4 * n_embd,)]  # mlp.c_fc
        shapes += [(4 * n_embd, n_embd), (n_embd,)]  # mlp.c_proj
    shapes += [(n_embd,), (n_embd,)]  # ln_f
    return shapes


SMALL = dict(vocab=1000, n_positions=64, n_embd=64, n_layer=2)


def make_params(shapes: list[tuple], device, dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(optimizer: torch.optim.Optimizer, steps: int, device: torch.device) -> float:
    """Seconds per step, averaged over `steps` consecutive steps."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def run(device: str = "cpu", repeats: int = 9, steps: int = 2, dtype: str = "float32", small: bool = False) -> dict:
    device_t = torch.device(device)
    dtype_t = getattr(torch, dtype)
    shapes = gpt2_shapes(**SMALL) if small else gpt2_shapes()
    hyper = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    optimizers = {
        "ours": AdamW(make_params(shapes, device_t, dtype_t), **hyper),
        "torch": torch.optim.AdamW(make_params(shapes, device_t, dtype_t), foreach=True, **hyper),
    }
    for opt in optimizers.values():  # warm-up: creates the state, first-touch of its memory, kernel caches
        time_steps(opt, 1, device_t)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for r in range(repeats):
        order = list(optimizers) if r % 2 == 0 else list(optimizers)[::-1]
        for name in order:
            times[name].append(time_steps(optimizers[name], steps, device_t))
    n_values = sum(torch.Size(s).numel() for s in shapes)
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    # each repeat times ours and torch back to back: their ratio cancels slow changes in machine load
    paired = statistics.median(a / b for a, b in zip(times["ours"], times["torch"]))
    return dict(n_tensors=len(shapes), n_values=n_values, times=times, median=median, best=best,
                ratio=paired, ratio_of_medians=median["ours"] / median["torch"],
                ratio_best=best["ours"] / best["torch"], device=str(device_t), dtype=dtype)


def run_soap(device: str = "cpu", layers: int = 1, steps: int = 10, small: bool = False,
             frequency: int = 10) -> dict | None:
    """Time SOAP steps, ours vs pytorch_optimizer's, one by one; None when pytorch_optimizer is not installed."""
    try:
        from pytorch_optimizer import SOAP as ReferenceSOAP
    except ImportError:
        return None
    device_t = torch.device(device)
    shapes = gpt2_shapes(**SMALL) if small else gpt2_shapes(n_layer=layers)
    hyper = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=frequency)
    optimizers = {"ours": SOAP(make_params(shapes, device_t, torch.float32), **hyper),
                  "reference": ReferenceSOAP(make_params(shapes, device_t, torch.float32), **hyper)}
    first = {name: time_steps(opt, 1, device_t) for name, opt in optimizers.items()}  # statistics + eigh, no update
    times: dict[str, dict[str, list[float]]] = {name: {"plain": [], "refresh": []} for name in optimizers}
    for t in range(1, steps + 1):  # t counts the steps after the first call, as the refresh schedule does
        kind = "refresh" if t % frequency == 0 else "plain"
        order = list(optimizers) if t % 2 else list(optimizers)[::-1]
        for name in order:
            times[name][kind].append(time_steps(optimizers[name], 1, device_t))
    median = {name: {k: statistics.median(v) if v else None for k, v in kinds.items()} for name, kinds in
              times.items()}

    def amortised(m: dict) -> float | None:  # one refresh every `frequency` steps
        return None if m["refresh"] is None else ((frequency - 1) * m["plain"] + m["refresh"]) / frequency

    paired = {k: statistics.median(a / b for a, b in zip(times["ours"][k], times["reference"][k])) if
              times["ours"][k] else None for k in ("plain", "refresh")}
    ours_a, ref_a = amortised(median["ours"]), amortised(median["reference"])
    return dict(n_tensors=len(shapes), n_values=sum(torch.Size(s).numel() for s in shapes), first=first,
                times=times, median=median, paired=paired, amortised={"ours": ours_a, "reference": ref_a},
                ratio=None if ours_a is None else ours_a / ref_a, device=str(device_t), frequency=frequency)


def _print_soap(result: dict | None, args) -> None:
    if result is None:
        print("SOAP: skipped, pytorch_optimizer is not installed (pip install -e '.[dev]')")
        return
    shapes = "tiny" if args.small else f"GPT-2 small ({args.soap_layers} block{'s' * (args.soap_layers > 1)} + "\
                                       "embeddings)"
    print(f"SOAP step, {shapes} shapes: {result['n_tensors']} tensors, {result['n_values']:,} values, float32 on "
          f"{args.device}; {args.soap_steps} steps each, a refresh every {result['frequency']}")
    for name, label in (("ours", "gpt2lab.optim.SOAP"), ("reference", "pytorch_optimizer.SOAP")):
        m = result["median"][name]
        refresh = "   (no refresh step timed)" if m["refresh"] is None else \
            f"   refresh {1e3 * m['refresh']:9.1f} ms   amortised {1e3 * result['amortised'][name]:9.1f} ms/step"
        print(f"  {label:24s} first call {1e3 * result['first'][name]:9.1f} ms   plain {1e3 * m['plain']:9.1f} ms"
              f"{refresh}")
    paired = result["paired"]
    line = f"  ratio ours / pytorch_optimizer: plain {paired['plain']:.3f}x (median of back-to-back pairs)"
    if result["ratio"] is not None:
        line += f", refresh {paired['refresh']:.3f}x, amortised {result['ratio']:.3f}x (target <= 1.0x)"
    print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.bench optim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=9, help="timed batches per optimizer (median reported)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed batch")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--small", action="store_true", help="tiny GPT-2 shapes (a smoke test, seconds)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 is steadier on a busy shared machine")
    parser.add_argument("--soap-layers", type=int, default=None,
                        help="GPT-2-small blocks in the SOAP section (default: 12 on a GPU, 1 on a CPU)")
    parser.add_argument("--soap-steps", type=int, default=10,
                        help="SOAP steps timed after the first call (every 10th is a refresh); 0 skips SOAP")
    parser.add_argument("--no-lora-optimizers", dest="lora_optimizers", action="store_false",
                        help="skip the LoRA optimizers' section (AdaPreLoRA and the baselines vs LoRA-AdamW)")
    args = parser.parse_args(argv)
    if args.soap_layers is None:
        args.soap_layers = 12 if args.device.startswith("cuda") else 1
    if args.soap_layers < 1 or args.soap_steps < 0:
        parser.error("--soap-layers must be >= 1 and --soap-steps >= 0")
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    result = run(args.device, args.repeats, args.steps, args.dtype, args.small)
    where = args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"AdamW step, {'tiny' if args.small else 'GPT-2 small'} shapes: {result['n_tensors']} tensors, "
          f"{result['n_values']:,} values, {args.dtype} on {where}; {args.repeats} repeats × {args.steps} steps")
    for name, label in (("ours", "gpt2lab.optim.AdamW"), ("torch", "torch.optim.AdamW(foreach=True)")):
        runs = ", ".join(f"{1e3 * t:.1f}" for t in result["times"][name])
        print(f"  {label:34s} median {1e3 * result['median'][name]:9.2f} ms/step   (runs: {runs})")
    print(f"  ratio ours / torch: {result['ratio']:.3f}x (median of the {args.repeats} back-to-back pairs; "
          f"{result['ratio_of_medians']:.3f}x of medians, {result['ratio_best']:.3f}x of fastest runs; target <= 1.2x)")
    if args.soap_steps:
        _print_soap(run_soap(args.device, args.soap_layers, args.soap_steps, args.small), args)
    if args.lora_optimizers:  # AdaPreLoRA, Scaled AdamW, LoRA+ vs LoRA-AdamW (python -m gpt2lab.bench lora_optim)
        from . import lora_optim

        lora_argv = ["--device", args.device, *(["--tiny", "--no-isolate"] if args.small else [])]
        lora_optim.main(lora_argv + (["--threads", str(args.threads)] if args.threads else []))
    return 0
