"""Benchmarks, run side by side against the reference implementation and reported as ratios.

    python -m gpt2lab.bench model    our GPT-2 vs transformers' GPT2LMHeadModel; KV-cache generation speed-up
    python -m gpt2lab.bench optim    our AdamW step vs torch.optim.AdamW (foreach); our SOAP vs pytorch_optimizer's;
                                     then the lora_optim suite
    python -m gpt2lab.bench lora     LoRA training step and peak memory by rank vs full fine-tuning (notebook 05)
    python -m gpt2lab.bench smart    a SMART step / a plain step, same model, batch and optimizer (notebook 06)
    python -m gpt2lab.bench lora_optim   AdaPreLoRA, Scaled AdamW, LoRA+ vs LoRA-AdamW: step time, state bytes,
                                     peak memory (notebook 08)
    python -m gpt2lab.bench train    GPT-2-small fine-tuning through the loop, ours vs transformers on the same
                                     batches: tokens/s, MFU, a Quora epoch's time (notebook 09)

Timings live here, never in tests: each suite interleaves ours and the reference, repeats, and prints medians.
"""
