"""Notebook 01's checks against the mistakes learners make: each planted mistake gets its own ✗ line (asserted
word for word), correct alternative formulations pass, and inputs written in place are caught."""

import math

import pytest
import torch
import torch.nn.functional as F
from check_helpers import NOT_YET, assert_mistake_line, assert_passes, stub

from gpt2lab import attention as A
from gpt2lab.checks import attention as check


def _attention_with(weights_of):
    """An attention whose weights come from `weights_of(scores, mask)`; the rest is right."""
    def attention(q, k, v, mask=None):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        weights = weights_of(scores, mask)
        return weights @ v, weights
    return attention


def _softmax_masked(scores, mask):
    return (scores if mask is None else scores.masked_fill(~mask, float("-inf"))).softmax(-1)


def _self_attention_with(order=(0, 1, 2), proj=True, causal_default=True, use_mask=True):
    def self_attention(module, x, mask=None):
        B, T, C = x.shape
        qkv = module.c_attn(x).split(module.n_embd, dim=2)
        q, k, v = (A.split_heads(qkv[i], module.n_head) for i in order)
        if mask is None or not use_mask:
            mask = A.causal_mask(T) if causal_default else None
        out, _ = A.attention(q, k, v, mask)
        y = A.merge_heads(out)
        return module.c_proj(y) if proj else y
    return self_attention


def _attention_unscaled_masked(q, k, v, mask=None):  # the mask applied right, the scores not scaled
    weights = _softmax_masked(q @ k.transpose(-2, -1), mask)
    return weights @ v, weights


def _scores_in_place(q, k):
    q /= math.sqrt(q.shape[-1])  # writes into the caller's q
    return q @ k.transpose(-2, -1)


def _masked_fill_in_place_weights(q, k, v, mask=None):
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
    if mask is not None:  # zero the masked weights in place, then renormalise: the values are right, backward fails
        weights.masked_fill_(~mask, 0.0)
        weights = weights / weights.sum(-1, keepdim=True)
    return weights @ v, weights


def _detached_attention(q, k, v, mask=None):
    out, weights = A.attention(q.detach(), k.detach(), v.detach(), mask)
    return out, weights


def _merge_with_view(x):
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).view(B, T, nh * hs)


def _inverted_in_place_padding(m):
    m[:] = 1 - m  # writes into the caller's batch
    return (m == 0).bool()[:, None, None, :]


# (check, answer, the ✗ line's message: exact text, or a prefix ending in "…")
MISTAKES = [
    # attention_scores
    ("attention_scores", stub, NOT_YET),
    ("attention_scores", lambda q, k: q @ k.transpose(-2, -1),
     "the scores are not scaled: divide by sqrt(head_size), i.e. sqrt(q.shape[-1])"),
    ("attention_scores", lambda q, k: q @ k.transpose(-2, -1) / q.shape[-1],
     "the scores are divided by the head size hs = 16: divide by its square root, sqrt(hs) = 4"),
    ("attention_scores", lambda q, k: q @ k.transpose(-2, -1) / math.sqrt(k.shape[-2]),
     "the scores are divided by sqrt(Tk), the number of keys: divide by sqrt(head_size) = sqrt(q.shape[-1])"),
    ("attention_scores", lambda q, k: (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1),
     "these are softmax weights: attention_scores returns the raw scaled scores (the softmax comes in attention)"),
    ("attention_scores", lambda q, k: k @ q.transpose(-2, -1) / math.sqrt(q.shape[-1]),
     "scores are (B, nh, Tk, Tq) = (2, 3, 6, 4): that is k @ qᵀ; compute q @ kᵀ (one row per query)"),
    ("attention_scores", _scores_in_place,
     "you modified q in place: divide a new tensor (scores / ...), not q or k themselves (q /= ...)"),
    # causal_mask
    ("causal_mask", stub, NOT_YET),
    ("causal_mask", lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1),
     "the diagonal is missing: a token may attend to itself (s <= t, not s < t)"),
    ("causal_mask", lambda T: ~torch.ones(T, T, dtype=torch.bool).tril(),
     "the mask is inverted: True should mean 'may attend' (lower triangle, diagonal included)"),
    ("causal_mask", lambda T: torch.ones(T, T, dtype=torch.bool).triu(),
     "the mask is the upper triangle: row t is the query and may see keys s <= t, the lower triangle (torch.tril)"),
    ("causal_mask", lambda T: torch.ones(T, T).tril(),
     "the mask should be boolean (True = may attend), got dtype torch.float32"),
    ("causal_mask", lambda T: torch.full((T, T), float("-inf")).triu(1),
     "that is an additive float mask (0 / -inf); here the mask is boolean, True = may attend: "
     "torch.tril(torch.ones(T, T, dtype=torch.bool))"),
    ("causal_mask", lambda T: torch.ones(1, 1, T, T, dtype=torch.bool).tril(),
     "causal_mask(4) should be (T, T) = (4, 4), got shape (1, 1, 4, 4): return the plain (T, T) mask, broadcasting "
     "adds the batch and head dims"),
    ("causal_mask", lambda T: None, "causal_mask returned None: did you forget to `return`?"),
    # padding_mask
    ("padding_mask", stub, NOT_YET),
    ("padding_mask", lambda m: m.bool()[:, None, :, None],
     "the mask is (B, 1, T, 1): that masks queries; padding removes keys, so T goes last: (B, 1, 1, T)"),
    ("padding_mask", lambda m: m.bool(),
     "the mask is (B, T): add the head and query dims, (B, 1, 1, T), e.g. attention_mask.bool()[:, None, None, :], "
     "so it broadcasts over heads and queries"),
    ("padding_mask", lambda m: (m == 0)[:, None, None, :],
     "the mask is inverted: True should mark real tokens (mask == 1), not padding"),
    ("padding_mask", lambda m: m[:, None, None, :],
     "the mask should be boolean (True = real token), got dtype torch.int64: convert with .bool() (or == 1)"),
    ("padding_mask", _inverted_in_place_padding,
     "you modified attention_mask in place: build a new tensor (attention_mask.bool()[...]) instead of writing "
     "into it"),
    # attention
    ("attention", stub, NOT_YET),
    ("attention", lambda q, k, v, mask=None: A.attention(q, k, v, mask)[0],
     "attention returned one tensor of shape (2, 3, 4, 8); return the pair (output, weights): "
     "`return weights @ v, weights`"),
    ("attention", lambda q, k, v, mask=None: A.attention(q, k, v, mask)[::-1],
     "the pair is in the wrong order: return (output, weights), output first"),
    ("attention", _attention_with(lambda s, m: s.softmax(-2)),
     "softmax over the wrong dim: normalise over the keys (dim=-1), so that each query's row sums to 1"),
    ("attention", _attention_with(lambda s, m: s * math.sqrt(8) / 8),  # scores scaled by hs, no softmax: generic
     "weights without a mask[…"),
    ("attention", _attention_with(lambda s, m: (s * math.sqrt(8)).softmax(-1)),
     "the scores are not scaled: divide q·k by sqrt(head_size) (your attention_scores)"),
    ("attention", _attention_with(lambda s, m: s.softmax(-1)),
     "the mask is not applied: masked keys must get zero weight (scores.masked_fill(~mask, float('-inf')) before "
     "the softmax)"),
    ("attention", _attention_with(lambda s, m: (s if m is None else s.masked_fill(m, float("-inf"))).softmax(-1)),
     "the mask is inverted: masked_fill fills where its mask is True, so fill where ~mask (True = may attend)"),
    ("attention", _attention_with(lambda s, m: (s if m is None else s.masked_fill(~m, 0.0)).softmax(-1)),
     "masked scores were set to 0, which still gets weight e^0 = 1: fill them with float('-inf')"),
    ("attention", _attention_with(lambda s, m: s.softmax(-1) * (1 if m is None else m)),
     "the mask is applied after the softmax, so the rows no longer sum to 1: mask the scores before the softmax"),
    ("attention", _detached_attention,
     "the output carries no gradient: no torch.no_grad() or .detach() inside attention, the model trains through it"),
    ("attention", _masked_fill_in_place_weights,
     "backward through your attention failed (one of the variables needed for gradient computation has been "
     "modified by an inplace operation: …"),
    # split_heads
    ("split_heads", stub, NOT_YET),
    ("split_heads", lambda x, nh: x.view(x.shape[0], nh, x.shape[1], -1),
     "reshaping straight to (B, nh, T, hs) mixes tokens: view as (B, T, nh, hs), then transpose(1, 2)"),
    ("split_heads", lambda x, nh: x.view(*x.shape[:2], nh, -1),
     "the result is (B, T, nh, hs) = (2, 3, 4, 5): transpose(1, 2) to bring the heads before time, (B, nh, T, hs)"),
    ("split_heads", lambda x, nh: x.view(*x.shape[:2], -1, nh).transpose(1, 2),
     "the result is (B, hs, T, nh) = (2, 5, 3, 4): nh and hs are swapped; view as (B, T, n_head, C // n_head), then "
     "transpose(1, 2)"),
    ("split_heads", lambda x, nh: x.view(*x.shape[:2], -1, nh).permute(0, 3, 1, 2),
     "each head should take a block of hs consecutive channels, not every nh-th channel: view as (B, T, nh, hs), "
     "not (B, T, hs, nh)"),
    ("split_heads", lambda x, nh: x.view(*x.shape[:2], 4, -1).transpose(1, 2),  # n_head hard-coded to 4
     "split_heads(x, 2) has shape (2, 4, 3, 5), expected (2, 2, 3, 10)"),
    # merge_heads
    ("merge_heads", stub, NOT_YET),
    ("merge_heads", lambda x: x.reshape(x.shape[0], x.shape[2], -1),
     "reshaping (B, nh, T, hs) straight to (B, T, C) mixes tokens: transpose(1, 2) first, then reshape"),
    ("merge_heads", _merge_with_view,
     ".view() fails after transpose(1, 2): the transposed tensor is not contiguous in memory; use .reshape(B, T, C) "
     "(or .contiguous().view(B, T, C))"),
    ("merge_heads", lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2], -1),
     "the heads' channels are interleaved: transpose to (B, T, nh, hs) (transpose(1, 2)), not (B, T, hs, nh), "
     "before the reshape"),
    ("merge_heads", lambda x: x.transpose(1, 2),
     "shape should be (B, T, C) = (2, 3, 20), got (2, 3, 4, 5)"),
    # self_attention
    ("self_attention", stub, NOT_YET),
    ("self_attention", _self_attention_with(causal_default=False),
     "with mask=None use the causal mask (causal_mask(T)): without it every token sees the future"),
    ("self_attention", _self_attention_with(proj=False),
     "the output projection is missing: end with module.c_proj(merge_heads(...))"),
    ("self_attention", _self_attention_with(order=(1, 0, 2)),
     "c_attn's output splits as q, k, v in that order: q, k, v = module.c_attn(x).split(module.n_embd, dim=2) "
     "(yours looks like order kqv)"),
    ("self_attention", _self_attention_with(use_mask=False),
     "the mask you are given is ignored: use it when it is not None (it already holds the causal part)"),
    ("self_attention", lambda module, x, mask=None: (_self_attention_with()(module, x, mask), None),
     "return only the output (B, T, C), not a tuple: unpack `out, _ = attention(...)`"),
    ("self_attention", lambda module, x, mask=None: _self_attention_with()(module, x.detach(), mask).detach(),
     "the output carries no gradient: no torch.no_grad() or .detach() in the forward, the model trains through it"),
    # appended last: the ids above stay as they were
    ("attention", _attention_unscaled_masked,
     "the scores are not scaled: divide q·k by sqrt(head_size) (your attention_scores)"),
    ("self_attention", _self_attention_with(causal_default=False, use_mask=False),  # never any mask
     "with mask=None use the causal mask (causal_mask(T)): without it every token sees the future"),
]


@pytest.mark.parametrize("name, answer, message", MISTAKES,
                         ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(MISTAKES)])
def test_each_mistake_gets_its_line(name, answer, message):
    assert_mistake_line(getattr(check, name)(answer), name, message)


def _attention_where(q, k, v, mask=None):  # torch.where and -1e9 instead of masked_fill and -inf
    scores = torch.einsum("...qd,...kd->...qk", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = torch.where(mask, scores, torch.tensor(-1e9))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return weights @ v, weights


def _self_attention_three_matmuls(module, x, mask=None):  # q, k, v from slices of the fused weight, fused kernel
    B, T, C = x.shape
    W, b = module.c_attn.weight, module.c_attn.bias
    q, k, v = (F.linear(x, W[i * C:(i + 1) * C], b[i * C:(i + 1) * C]) for i in range(3))
    q, k, v = (t.reshape(B, T, module.n_head, -1).permute(0, 2, 1, 3) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    return module.c_proj(y.permute(0, 2, 1, 3).reshape(B, T, C))


ALTERNATIVES = [
    ("attention_scores", A.attention_scores),
    ("attention_scores", lambda q, k: torch.matmul(q / math.sqrt(q.size(-1)), k.mT)),
    ("causal_mask", A.causal_mask),
    ("causal_mask", lambda T: torch.arange(T)[:, None] >= torch.arange(T)),
    ("padding_mask", A.padding_mask),
    ("padding_mask", lambda m: (m == 1).unsqueeze(1).unsqueeze(2)),
    ("attention", A.attention),
    ("attention", _attention_where),
    ("split_heads", A.split_heads),
    ("split_heads", lambda x, nh: x.reshape(x.shape[0], x.shape[1], nh, -1).permute(0, 2, 1, 3)),
    ("merge_heads", A.merge_heads),
    ("merge_heads", lambda x: x.transpose(1, 2).contiguous().view(x.shape[0], x.shape[2], -1)),
    ("self_attention", _self_attention_with()),
    ("self_attention", _self_attention_three_matmuls),
]


@pytest.mark.parametrize("name, answer", ALTERNATIVES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ALTERNATIVES)])
def test_correct_answers_pass(name, answer):
    assert_passes(getattr(check, name)(answer), name)


def test_crash_names_the_learners_line():
    def attention_scores(q, k):
        return q @ k  # (.., Tq, hs) @ (.., Tk, hs): no transpose
    line = str(check.attention_scores(attention_scores))
    assert line.startswith("✗ attention_scores: your code raised RuntimeError") and "return q @ k" in line, line


def test_padded_batch_check():
    torch.manual_seed(0)
    padded = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    alone = [padded[0:1], padded[1:2, 2:]]
    assert check.padded_batch(padded, alone, mask)
    alone[1] = alone[1] + 1e-3
    assert not check.padded_batch(padded, alone, mask)


def test_self_attention_check_names_the_earlier_stub():
    def split_heads(x, n_head):  # an earlier exercise, still a stub
        raise NotImplementedError()

    def self_attention(module, x, mask):
        q, k, v = module.c_attn(x).split(module.n_embd, dim=2)
        q, k, v = (split_heads(t, module.n_head) for t in (q, k, v))
        out, _ = A.attention(q, k, v, mask if mask is not None else A.causal_mask(x.shape[1]))
        return module.c_proj(A.merge_heads(out))

    result = str(check.self_attention(self_attention))
    assert result.startswith("✗") and "not implemented yet: split_heads" in result, result
    own_stub = str(check.self_attention(stub))  # the exercise itself unfinished: the plain message
    assert "not implemented yet" in own_stub and "earlier exercise" not in own_stub, own_stub
