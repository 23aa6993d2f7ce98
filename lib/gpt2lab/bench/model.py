"""Benchmark: our GPT-2 vs transformers' GPT2LMHeadModel, and generation with vs without the KV cache.

    python -m gpt2lab.bench model                       gpt2-small shapes, batch 2 x 128 tokens, CPU fp32
    python -m gpt2lab.bench model --device cuda --amp   on a GPU with bf16 autocast
    python -m gpt2lab.bench model --tiny                seconds-long smoke run (used by the tests)

Forward + backward: both models get the same random weights (ours loaded from the reference's state dict), the
same batch and the same loss (`lm_loss` on the logits); the two are timed alternately (ours, theirs, theirs, ours,
...) so that drifts in machine load hit both. The headline ratio is the median, over the repeats, of the ratio of
each back-to-back pair (steadier on a shared machine than the ratio of the median times, which is printed too).
A ratio < 1 means ours is faster. On a shared machine pass `--threads 1` so the two sides compete for one core.

Generation: tokens per second of greedy decoding of `--new-tokens` tokens, with and without the KV cache.
Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m gpt2lab.bench model", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="gpt2", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl (default gpt2)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7, help="timed forward+backward pairs (after 2 warm-ups)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated in the KV-cache comparison")
    p.add_argument("--gen-layers", type=int, default=None, help="layers of the generation model (default: config's)")
    p.add_argument("--gen-repeats", type=int, default=1)
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p.parse_args(argv)


def build_pair(config, device, dtype=torch.float32):
    """(ours, reference) with identical random weights and the same dropout."""
    import transformers

    from ..model import GPT2

    hf_cfg = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_epsilon,
    )  # fmt: skip
    hf_cfg._attn_implementation = "sdpa"  # transformers' fastest built-in path on CPU and GPU
    ref = transformers.GPT2LMHeadModel(hf_cfg).to(device, dtype)
    ours = GPT2(config).to(device, dtype)
    ours.load_hf_state_dict(ref.state_dict())
    return ours, ref


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_train_step(model, ids, is_ref: bool, device, amp: bool) -> tuple[float, float]:
    """One forward + backward: (wall seconds, this process's CPU seconds). The CPU time is what the step would take
    on an idle machine with `--threads 1`, whatever other processes share the cores."""
    from ..model import lm_loss

    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    model.zero_grad(set_to_none=True)
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with autocast:
        logits = model(ids).logits if is_ref else model(ids)
        loss = lm_loss(logits, ids)
    loss.backward()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def bench_train(args, config) -> float:
    ours, ref = build_pair(config, args.device)
    ours.train()
    ref.train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)
    for _ in range(2):  # warm-up: allocator, kernels, lazy inits
        time_train_step(ours, ids, False, args.device, args.amp)
        time_train_step(ref, ids, True, args.device, args.amp)
    runs_ours, runs_ref = [], []
    for i in range(args.repeats):
        pair = [(ours, False, runs_ours), (ref, True, runs_ref)]
        for model, is_ref, bucket in pair if i % 2 == 0 else pair[::-1]:  # alternate who goes first
            bucket.append(time_train_step(model, ids, is_ref, args.device, args.amp))
    t_ours, t_ref = [w for w, _ in runs_ours], [w for w, _ in runs_ref]
    m_ours, m_ref = statistics.median(t_ours), statistics.median(t_ref)
    paired = statistics.median(a / b for a, b in zip(t_ours, t_ref))  # each pair ran back to back
    print(
        f"forward+backward  {args.config} (n_layer={config.n_layer}, n_embd={config.n_embd}), batch {args.batch} x "
        f"{args.seq} tokens, {args.device}{' bf16 autocast' if args.amp else ' fp32'}, dropout {config.dropout}, "
        f"{args.repeats} interleaved repeats"
    )
    print(f"  ours             median {m_ours * 1e3:9.1f} ms   (min {min(t_ours) * 1e3:.1f})")
    print(f"  transformers     median {m_ref * 1e3:9.1f} ms   (min {min(t_ref) * 1e3:.1f})")
    print(f"  ratio ours/transformers = {paired:.3f}  (median of the {args.repeats} back-to-back pairs; target <= 0.9)")
    print(f"  ratio of the medians = {m_ours / m_ref:.3f}, of the minima = {min(t_ours) / min(t_ref):.3f}")
    if args.device == "cpu":  # on a shared machine, CPU time is steadier than wall time (exact with --threads 1)
        c_ours, c_ref = [c for _, c in runs_ours], [c for _, c in runs_ref]
        cpu_paired = statistics.median(a / b for a, b in zip(c_ours, c_ref))
        print(f"  CPU time per step: ours {statistics.median(c_ours) * 1e3:.1f} ms, transformers "
              f"{statistics.median(c_ref) * 1e3:.1f} ms; ratio {cpu_paired:.3f} (median of the pairs)")  # fmt: skip
    return paired


def bench_generation(args, config) -> float:
    from ..generate import generate
    from ..model import GPT2

    model = GPT2(config).to(args.device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 8), device=args.device)
    generate(model, prompt, 4)  # warm-up
    speeds = {}
    for use_cache in (True, False):
        times = []
        for _ in range(args.gen_repeats):
            _sync(args.device)
            start = time.perf_counter()
            out = generate(model, prompt, args.new_tokens, use_cache=use_cache)
            _sync(args.device)
            times.append(time.perf_counter() - start)
        assert out.shape[1] == prompt.shape[1] + args.new_tokens
        speeds[use_cache] = args.new_tokens / statistics.median(times)
    print(f"generation  greedy, prompt 8 + {args.new_tokens} new tokens, batch 1, n_layer={config.n_layer}")
    print(f"  with KV cache    {speeds[True]:9.1f} tokens/s")
    print(f"  without cache    {speeds[False]:9.1f} tokens/s")
    print(f"  speed-up = {speeds[True] / speeds[False]:.1f}x  (target >= 5x)")
    return speeds[True] / speeds[False]


def main(argv: list[str] | None = None) -> int:
    from ..model import GPT2Config

    args = _parse(argv or [])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.tiny:
        config = GPT2Config.tiny(n_positions=64, vocab_size=512)
        args.config = "tiny"
        args.batch, args.seq, args.repeats, args.new_tokens = 2, 16, 3, 16
    else:
        config = GPT2Config.from_name(args.config, dropout=args.dropout)
        if args.new_tokens + 8 > config.n_positions:
            raise SystemExit(f"--new-tokens must be <= {config.n_positions - 8}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}")
    bench_train(args, config)
    if not args.skip_generation:
        gen_config = (
            config if args.gen_layers is None else GPT2Config(**{**config.to_dict(), "n_layer": args.gen_layers})
        )
        bench_generation(args, gen_config)
    return 0
