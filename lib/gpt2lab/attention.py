"""Causal self-attention, written out step by step, plus the fast path that gives the same numbers.

Built in notebook 01 (attention). The pieces, in the order the notebook builds them:

    §1 attention_scores      q @ kᵀ / sqrt(head_size)                       (B, nh, Tq, Tk)
    §2 causal_mask           token t may look at tokens 0..t                  (Tq, Tk) bool
    §3 padding_mask          real keys only, from a (B, T) 0/1 attention mask (B, 1, 1, Tk) bool
    §4 attention             mask -> softmax -> weighted sum of values        (B, nh, Tq, hs)
    §5 split_heads / merge_heads   (B, T, C) <-> (B, nh, T, hs)
    §6 CausalSelfAttention   GPT-2's fused qkv projection, heads, output projection, dropout

Masks are boolean with True = "may attend". `attention` (written out, returns the weights for heatmaps) and
`torch.nn.functional.scaled_dot_product_attention` (fused kernel, used by the model) take the same mask, and a
test holds them to 1e-6 of each other.

References: Vaswani et al. 2017, "Attention is all you need" (§3.2); Radford et al. 2019 (GPT-2).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled dot products q·k / sqrt(hs) for every query/key pair: (..., Tq, hs), (..., Tk, hs) -> (..., Tq, Tk).

    Built in notebook 01 (attention), §1. Dividing by sqrt(hs) keeps the scores' variance near 1 whatever the head
    size, so the softmax does not saturate at initialisation.
    """
    assert q.shape[-1] == k.shape[-1], f"q and k need the same head size, got {q.shape[-1]} and {k.shape[-1]}"
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., Tq, Tk)


def causal_mask(T: int, T_k: int | None = None, device=None) -> torch.Tensor:
    """Boolean (T, T_k) mask, True where query t may attend to key s, i.e. s <= t.

    Built in notebook 01 (attention), §2. With a KV cache the T queries are the *last* T of T_k positions, so query
    t sits at absolute position T_k - T + t (bottom-right alignment); T_k defaults to T.
    """
    T_k = T if T_k is None else T_k
    assert T_k >= T, f"causal_mask: need at least as many keys as queries, got T={T}, T_k={T_k}"
    return torch.ones(T, T_k, dtype=torch.bool, device=device).tril(diagonal=T_k - T)  # (T, T_k)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 attention mask -> boolean (B, 1, 1, T) key mask (True = real token), broadcastable over heads
    and queries.

    Built in notebook 01 (attention), §3.
    """
    assert attention_mask.dim() == 2, f"attention_mask should be (batch, seq) of 0/1, got shape {attention_mask.shape}"
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)


def combined_mask(attention_mask: torch.Tensor | None, T: int, T_k: int | None = None, device=None) -> torch.Tensor:
    """Causal mask AND padding mask: boolean (B, 1, T, T_k), or (1, 1, T, T_k) without an attention mask.

    Built in notebook 01 (attention), §3. A padding *query* (e.g. a left-pad at position 0) would have no key left
    to attend to, and softmax over an all-masked row is NaN (0/0); so every query may always see its own key.
    Real tokens are unaffected (they see themselves anyway) and padded positions stay finite (their outputs are
    ignored by the loss).
    """
    T_k = T if T_k is None else T_k
    mask = causal_mask(T, T_k, device=device)[None, None]  # (1, 1, T, T_k)
    if attention_mask is None:
        return mask
    assert attention_mask.shape[-1] == T_k, (
        f"attention_mask covers {attention_mask.shape[-1]} positions but there are {T_k} keys (past + new tokens)"
    )
    # query t is the key at absolute position T_k - T + t
    own_key = torch.arange(T_k, device=device)[None, :] == torch.arange(T_k - T, T_k, device=device)[:, None]
    return mask & (padding_mask(attention_mask) | own_key)  # (B, 1, T, T_k)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention written out: returns (output (..., Tq, hs), weights (..., Tq, Tk)).

    Built in notebook 01 (attention), §4. `mask` is boolean, True where attention is allowed, broadcastable to the
    scores. Masked scores become -inf before the softmax, so they get exactly zero weight.
    """
    scores = attention_scores(q, k)  # (B, nh, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores, dim=-1)  # (B, nh, Tq, Tk), each row sums to 1
    weights = F.dropout(weights, p=dropout_p, training=training)
    return weights @ v, weights  # (B, nh, Tq, hs)


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, nh, T, hs): each head sees its own hs = C / nh slice of the channels.

    Built in notebook 01 (attention), §5.
    """
    B, T, C = x.shape
    assert C % n_head == 0, f"embedding size {C} must be divisible by the number of heads {n_head}"
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, C): the heads' outputs side by side again. Inverse of `split_heads`.

    Built in notebook 01 (attention), §5.
    """
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, C)


class CausalSelfAttention(nn.Module):
    """GPT-2's multi-head causal self-attention: one fused (C -> 3C) projection for q, k, v, then heads, then an
    output projection.

    Built in notebook 01 (attention), §6. The fused `c_attn` is one matmul instead of three (faster) and matches the
    layout of the released weights. `forward` uses `F.scaled_dot_product_attention` (fused kernel) unless the
    attention weights are asked for, in which case it runs the written-out `attention` above.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd={n_embd} must be divisible by n_head={n_head}"
        self.n_head = n_head
        self.n_embd = n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache=None,
        layer: int = 0,
        return_weights: bool = False,
    ):
        """x (B, T, C) -> y (B, T, C); with `return_weights`, (y, weights (B, nh, T, T_k)).

        `mask`: boolean (B or 1, 1, T, T_k) from `combined_mask`, or None for the plain causal case (the fused
        kernel's `is_causal` path). `cache`: a `gpt2lab.model.KVCache`; this layer's new keys/values are
        written into it and attention runs over past + new keys.
        """
        B, T, C = x.shape
        assert C == self.n_embd, f"expected inputs with {self.n_embd} channels, got {C}"
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, T_k, hs): past keys/values + these
        T_k = k.shape[2]
        dropout_p = self.attn_dropout if self.training else 0.0
        if return_weights:
            full_mask = mask if mask is not None else causal_mask(T, T_k, device=x.device)
            y, weights = attention(q, k, v, full_mask, dropout_p, self.training)
        elif T == 1 and T_k > 1:
            # one new token against the cache (generation): two small matmuls. On CPU the fused kernel costs ~8 ms
            # per call here (measured, torch 2.13) because the key length changes every step.
            y, weights = attention(q, k, v, mask, dropout_p, self.training)
            weights = None
        else:
            weights = None
            if mask is None and T != T_k and T > 1:  # is_causal aligns top-left; with a cache we need bottom-right
                mask = causal_mask(T, T_k, device=x.device)
            is_causal = mask is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side
        y = self.resid_dropout(self.c_proj(y))
        return (y, weights) if return_weights else y
