"""Checks for notebook 01 (attention): each exercise against torch's fused attention and hand-made cases.

Usage in the notebook: `from gpt2lab.checks import attention as check`, then e.g. `check.causal_mask(causal_mask)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import attention as ref
from .core import check, compare, earlier_stubs, expect


def _qkv(B=2, nh=3, Tq=5, Tk=5, hs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, nh, Tq, hs, generator=g), torch.randn(B, nh, Tk, hs, generator=g),
            torch.randn(B, nh, Tk, hs, generator=g))  # fmt: skip


@check("attention_scores")
def attention_scores(fn):
    """fn(q, k) -> q @ kᵀ / sqrt(hs)."""
    q, k, _ = _qkv(Tq=4, Tk=6, hs=16)
    got = fn(q, k)
    expect(got is not None, "attention_scores returned None: did you forget to `return`?")
    expect(tuple(got.shape) == (2, 3, 4, 6), f"scores should be (B, nh, Tq, Tk) = (2, 3, 4, 6), got {tuple(got.shape)}")
    expected = (q @ k.transpose(-2, -1)) / math.sqrt(16)
    if torch.allclose(got, q @ k.transpose(-2, -1), atol=1e-5):
        expect(False, "the scores are not scaled: divide by sqrt(head_size), i.e. sqrt(q.shape[-1])")
    compare("scores (B=2, nh=3, Tq=4, Tk=6, hs=16)", got, expected, atol=1e-5)
    q = torch.tensor([[1.0, 0.0, 2.0, 0.0]])  # hand case, hs = 4
    k = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])  # (2, 4)
    compare("scores for q=[1,0,2,0], k=[[1,1,1,1],[0,0,1,0]]", fn(q, k), torch.tensor([[1.5, 1.0]]), atol=1e-6)
    return "q·k / sqrt(hs) matches on a hand case and on random (2, 3, 4, 6) scores"


@check("causal_mask")
def causal_mask(fn):
    """fn(T) -> bool (T, T), True where query t may attend to key s (s <= t)."""
    got = fn(4)
    expect(got is not None, "causal_mask returned None: did you forget to `return`?")
    got = torch.as_tensor(got)
    expect(got.dtype == torch.bool, f"the mask should be boolean (True = may attend), got dtype {got.dtype}")
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    if tuple(got.shape) == (4, 4) and torch.equal(got, ~expected):
        expect(False, "the mask is inverted: True should mean 'may attend' (lower triangle, diagonal included)")
    if tuple(got.shape) == (4, 4) and torch.equal(got, expected & ~torch.eye(4, dtype=torch.bool)):
        expect(False, "the diagonal is missing: a token may attend to itself (s <= t, not s < t)")
    compare("causal_mask(4)", got, expected)
    compare("causal_mask(1)", torch.as_tensor(fn(1)), torch.ones(1, 1, dtype=torch.bool))
    compare("causal_mask(7)", torch.as_tensor(fn(7)), ref.causal_mask(7))
    return "lower-triangular mask (diagonal included) for T = 1, 4, 7"


@check("padding_mask")
def padding_mask(fn):
    """fn(attention_mask (B, T) of 0/1) -> bool (B, 1, 1, T)."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    got = fn(mask)
    expect(got is not None, "padding_mask returned None: did you forget to `return`?")
    got = torch.as_tensor(got)
    expect(got.dtype == torch.bool, f"the mask should be boolean (True = real token), got dtype {got.dtype}")
    expect(got.numel() == 10, f"expected one value per (row, position): 10 values, got shape {tuple(got.shape)}")
    shape = tuple(got.shape)
    expect(
        shape == (2, 1, 1, 5),
        f"shape should be (B, 1, 1, T) = (2, 1, 1, 5) to broadcast over heads and queries, got {shape}",
    )
    compare("padding_mask", got, mask.bool()[:, None, None, :])
    return "(B, 1, 1, T) key mask, True on real tokens, for right and left padding"


@check("attention")
def attention(fn):
    """fn(q, k, v, mask) -> (output, weights); compared with F.scaled_dot_product_attention."""
    q, k, v = _qkv(Tq=6, Tk=6, hs=8, seed=1)
    out, weights = fn(q, k, v, None)
    compare("output without a mask", out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    expect(tuple(weights.shape) == (2, 3, 6, 6), f"weights should be (B, nh, Tq, Tk) = (2, 3, 6, 6), got "
                                                 f"{tuple(weights.shape)}")  # fmt: skip
    compare("each row of weights sums to", weights.sum(-1), torch.ones(2, 3, 6), atol=1e-5)
    causal = ref.causal_mask(6)
    out, weights = fn(q, k, v, causal)
    compare("weights on future tokens (causal mask)", weights.masked_select(~causal), torch.zeros(2 * 3 * 15), atol=0)
    compare("output with the causal mask", out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    pad = ref.combined_mask(torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]), 6)  # (2, 1, 6, 6)
    out, weights = fn(q, k, v, pad)
    compare("output with causal + padding mask", out, F.scaled_dot_product_attention(q, k, v, attn_mask=pad), atol=1e-5)
    return "output and weights match torch's scaled_dot_product_attention (no mask, causal, causal + padding)"


@check("split_heads")
def split_heads(fn):
    """fn(x (B, T, C), n_head) -> (B, nh, T, hs)."""
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    got = fn(x, 4)
    expect(got is not None, "split_heads returned None: did you forget to `return`?")
    expect(tuple(got.shape) == (2, 4, 3, 2), f"shape should be (B, nh, T, hs) = (2, 4, 3, 2), got {tuple(got.shape)}")
    if torch.equal(got, x.view(2, 4, 3, 2)):
        expect(False, "reshaping straight to (B, nh, T, hs) mixes tokens: view as (B, T, nh, hs), then transpose(1, 2)")
    compare("split_heads(x, 4)", got, ref.split_heads(x, 4), atol=0)
    return "(B, T, C) -> (B, nh, T, hs): head h of token t holds channels h*hs .. (h+1)*hs - 1"


@check("merge_heads")
def merge_heads(fn):
    """fn(x (B, nh, T, hs)) -> (B, T, C), the inverse of split_heads."""
    x = torch.randn(2, 5, 3, 8, generator=torch.Generator().manual_seed(2))
    got = fn(x)
    expect(got is not None, "merge_heads returned None: did you forget to `return`?")
    expect(tuple(got.shape) == (2, 3, 40), f"shape should be (B, T, C) = (2, 3, 40), got {tuple(got.shape)}")
    compare("merge_heads(split_heads(y))", fn(ref.split_heads(x.transpose(1, 2).reshape(2, 3, 40), 5)),
            x.transpose(1, 2).reshape(2, 3, 40), atol=0)  # fmt: skip
    compare("merge_heads(x)", got, ref.merge_heads(x), atol=0)
    return "(B, nh, T, hs) -> (B, T, C), and merge_heads undoes split_heads"


@check("self_attention")
def self_attention(fn):
    """fn(module, x, mask) -> (B, T, C): the CausalSelfAttention forward, written with the module's weights."""
    torch.manual_seed(3)
    module = ref.CausalSelfAttention(n_embd=24, n_head=3).eval()
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        with earlier_stubs(fn):
            got = fn(module, x, None)
        compare("self-attention output (causal)", got, module(x), atol=1e-5)
        attention_mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
        mask = ref.combined_mask(attention_mask, 7)
        got = fn(module, x, mask)
        real = attention_mask.bool()
        compare("self-attention output on real tokens (left-padded row)", got[real], module(x, mask)[real], atol=1e-5)
    return "fused qkv -> heads -> attention -> merge -> c_proj matches CausalSelfAttention, with and without padding"


@check("padded_batch")
def padded_batch(outputs_padded, outputs_alone, attention_mask):
    """The padded batch's outputs on real tokens equal each sequence run alone."""
    for row, alone in enumerate(outputs_alone):
        real = attention_mask[row].bool()
        compare(f"row {row} on its real tokens", outputs_padded[row][real], alone[0], atol=1e-5)
    return f"padded batch = {len(outputs_alone)} sequences run alone, on every real token"
