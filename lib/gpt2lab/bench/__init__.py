"""Benchmarks, run side by side against the reference implementation and reported as ratios.

    python -m gpt2lab.bench model    our GPT-2 vs transformers' GPT2LMHeadModel; KV-cache generation speed-up
    python -m gpt2lab.bench optim    our AdamW step vs torch.optim.AdamW (foreach)

Timings live here, never in tests: each suite interleaves ours and the reference, repeats, and prints medians.
"""
