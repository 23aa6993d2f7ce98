"""Tiny random transformers GPT-2 models, saved with save_pretrained and loaded back by our from_pretrained.

Shared by test_model, test_generate, test_attention and test_bench_model. Nothing here touches the network.
"""

from __future__ import annotations

import torch
import transformers

from gpt2lab.model import GPT2


def hf_tiny(seed: int = 0, vocab_size: int = 50257, eos: int | None = None, **overrides):
    """A random transformers.GPT2LMHeadModel (eval mode, no dropout) of a tiny config."""
    torch.manual_seed(seed)
    eos = vocab_size - 1 if eos is None else eos
    kw = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=vocab_size, bos_token_id=eos,
              eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    kw.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()


def pair(tmp_path, seed: int = 0, **kw) -> tuple[transformers.GPT2LMHeadModel, GPT2]:
    """(reference, ours): the same random weights, ours loaded from the reference's save_pretrained folder."""
    ref = hf_tiny(seed, **kw)
    folder = tmp_path / f"hf_tiny_{seed}"
    ref.save_pretrained(folder)
    return ref, GPT2.from_pretrained(folder).eval()


def left_pad_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids transformers' generate uses for a padded batch (real tokens count from 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
