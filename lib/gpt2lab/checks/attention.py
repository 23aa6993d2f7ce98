"""Checks for notebook 01 (attention): each exercise against torch's fused attention and hand-made cases.

Usage in the notebook: `from gpt2lab.checks import attention as check`, then e.g. `check.causal_mask(causal_mask)`.

How the checks are built (the rules of DESIGN.md §8):
- references are hand computations (`q @ kᵀ / 4`, channel slices, `torch.tril` spelled out) or torch's
  `F.scaled_dot_product_attention`, never the `gpt2lab.attention` functions the learner is re-implementing;
- inputs keep every size different (B=2, nh=4, T=3, hs=5; Tq=4 ≠ Tk=6 ≠ hs=16) so a swapped dimension or a scale
  by the wrong size gives a different shape or a value far beyond the tolerance;
- the learner's function gets the real tensors, and the check fails with "you modified ... in place" if it wrote
  into them; `attention` and `self_attention` are also run backward, since the model trains through them;
- each classic mistake that is cheap to recognise (no scale, scale by hs, mask not applied / inverted / filled
  with 0 / applied after the softmax, softmax over the wrong dim, a bare tensor instead of (output, weights),
  view without transpose, .view on a transposed tensor...) gets its own ✗ line.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import attention as ref
from .core import check, compare, compare_with_hints, earlier_stubs, expect, known_mistake, untouched


def _qkv(B=2, nh=3, Tq=5, Tk=5, hs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, nh, Tq, hs, generator=g), torch.randn(B, nh, Tk, hs, generator=g),
            torch.randn(B, nh, Tk, hs, generator=g))  # fmt: skip


def _tensor(got, name: str, what: str = "a tensor") -> torch.Tensor:
    expect(got is not None, f"{name} returned None: did you forget to `return`?")
    expect(torch.is_tensor(got), f"{name} should return {what}, got {type(got).__name__}")
    return got


def _lower_triangle(T: int) -> torch.Tensor:
    """(T, T) bool, True where key s <= query t: the reference causal mask, spelled out."""
    return torch.arange(T)[None, :] <= torch.arange(T)[:, None]


@check("attention_scores")
def attention_scores(fn):
    """fn(q, k) -> q @ kᵀ / sqrt(hs)."""
    q, k, _ = _qkv(Tq=4, Tk=6, hs=16)  # hs = 16, so sqrt(hs) = 4, hs, sqrt(Tq) = 2 and sqrt(Tk) all differ
    with untouched("divide a new tensor (scores / ...), not q or k themselves (q /= ...)", q=q, k=k):
        got = _tensor(fn(q, k), "attention_scores")
    raw = q @ k.transpose(-2, -1)  # (2, 3, 4, 6)
    expected = raw / 4.0
    expect(tuple(got.shape) != (2, 3, 6, 4), "scores are (B, nh, Tk, Tq) = (2, 3, 6, 4): that is k @ qᵀ; compute "
                                             "q @ kᵀ (one row per query)")
    expect(tuple(got.shape) == (2, 3, 4, 6), f"scores should be (B, nh, Tq, Tk) = (2, 3, 4, 6), got {tuple(got.shape)}")
    compare_with_hints("scores (B=2, nh=3, Tq=4, Tk=6, hs=16)", got, expected, 1e-5, {
        "the scores are not scaled: divide by sqrt(head_size), i.e. sqrt(q.shape[-1])": raw,
        "the scores are divided by the head size hs = 16: divide by its square root, sqrt(hs) = 4": raw / 16,
        "the scores are multiplied by sqrt(hs): divide by it": raw * 4,
        "the scores are divided by sqrt(Tk), the number of keys: divide by sqrt(head_size) = sqrt(q.shape[-1])":
            raw / math.sqrt(6),
        "the scores are divided by sqrt(Tq), the number of queries: divide by sqrt(head_size) = sqrt(q.shape[-1])":
            raw / 2,
        "these are softmax weights: attention_scores returns the raw scaled scores (the softmax comes in attention)":
            expected.softmax(-1),
    }.items())
    q = torch.tensor([[1.0, 0.0, 2.0, 0.0]])  # hand case, hs = 4
    k = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])  # (2, 4)
    compare("scores for q=[1,0,2,0], k=[[1,1,1,1],[0,0,1,0]]", fn(q, k), torch.tensor([[1.5, 1.0]]), atol=1e-6)
    return "q·k / sqrt(hs) matches on a hand case and on random (2, 3, 4, 6) scores"


@check("causal_mask")
def causal_mask(fn):
    """fn(T) -> bool (T, T), True where query t may attend to key s (s <= t)."""
    got = torch.as_tensor(_tensor(fn(4), "causal_mask", "a (T, T) boolean tensor"))
    if got.is_floating_point() and bool(torch.isinf(got).any()):
        expect(False, "that is an additive float mask (0 / -inf); here the mask is boolean, True = may attend: "
                      "torch.tril(torch.ones(T, T, dtype=torch.bool))")
    expect(got.dtype == torch.bool, f"the mask should be boolean (True = may attend), got dtype {got.dtype}")
    expect(got.numel() == 16, f"causal_mask(4) should be (T, T) = (4, 4), got shape {tuple(got.shape)}")
    expect(tuple(got.shape) == (4, 4), f"causal_mask(4) should be (T, T) = (4, 4), got shape {tuple(got.shape)}: "
                                       "return the plain (T, T) mask, broadcasting adds the batch and head dims")
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    compare_with_hints("causal_mask(4)", got, expected, 0, {
        "the mask is inverted: True should mean 'may attend' (lower triangle, diagonal included)": ~expected,
        "the diagonal is missing: a token may attend to itself (s <= t, not s < t)":
            expected & ~torch.eye(4, dtype=torch.bool),
        "the mask is the upper triangle: row t is the query and may see keys s <= t, the lower triangle (torch.tril)":
            expected.T,
        "every entry is True: nothing is masked, query t must not see keys s > t": torch.ones(4, 4, dtype=torch.bool),
    }.items())
    compare("causal_mask(1)", torch.as_tensor(fn(1)), torch.ones(1, 1, dtype=torch.bool))
    compare("causal_mask(7)", torch.as_tensor(fn(7)), _lower_triangle(7))
    return "lower-triangular mask (diagonal included) for T = 1, 4, 7"


@check("padding_mask")
def padding_mask(fn):
    """fn(attention_mask (B, T) of 0/1) -> bool (B, 1, 1, T)."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])  # right- and left-padded rows
    with untouched("build a new tensor (attention_mask.bool()[...]) instead of writing into it", attention_mask=mask):
        got = torch.as_tensor(_tensor(fn(mask), "padding_mask"))
    expect(got.dtype == torch.bool, f"the mask should be boolean (True = real token), got dtype {got.dtype}: "
                                    "convert with .bool() (or == 1)")
    expect(got.numel() == 10, f"expected one value per (row, position): 10 values, got shape {tuple(got.shape)}")
    shape = tuple(got.shape)
    expect(shape != (2, 1, 5, 1), "the mask is (B, 1, T, 1): that masks queries; padding removes keys, so T goes "
                                  "last: (B, 1, 1, T)")
    expect(shape != (2, 5), "the mask is (B, T): add the head and query dims, (B, 1, 1, T), e.g. "
                            "attention_mask.bool()[:, None, None, :], so it broadcasts over heads and queries")
    expect(shape == (2, 1, 1, 5),
           f"shape should be (B, 1, 1, T) = (2, 1, 1, 5) to broadcast over heads and queries, got {shape}")
    expected = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    compare_with_hints("padding_mask", got, expected, 0,
                       [("the mask is inverted: True should mark real tokens (mask == 1), not padding", ~expected)])
    return "(B, 1, 1, T) key mask, True on real tokens, for right and left padding"


def _pair(result) -> tuple[torch.Tensor, torch.Tensor]:
    """attention's (output, weights), with a targeted message for a bare tensor or a swapped pair."""
    expect(result is not None, "attention returned None: did you forget to `return weights @ v, weights`?")
    if torch.is_tensor(result):
        expect(False, f"attention returned one tensor of shape {tuple(result.shape)}; return the pair "
                      "(output, weights): `return weights @ v, weights`")
    expect(isinstance(result, tuple | list) and len(result) == 2,
           f"attention should return the pair (output, weights), got {type(result).__name__}")
    return tuple(result)


def _masked_weights(scores: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The classic wrong ways to apply a boolean mask, for the hints."""
    return {
        "the mask is not applied: masked keys must get zero weight (scores.masked_fill(~mask, float('-inf')) "
        "before the softmax)": scores.softmax(-1),
        "the mask is inverted: masked_fill fills where its mask is True, so fill where ~mask (True = may attend)":
            scores.masked_fill(mask, float("-inf")).softmax(-1),
        "masked scores were set to 0, which still gets weight e^0 = 1: fill them with float('-inf')":
            scores.masked_fill(~mask, 0.0).softmax(-1),
        "the mask is applied after the softmax, so the rows no longer sum to 1: mask the scores before the softmax":
            scores.softmax(-1) * mask,
    }


@check("attention")
def attention(fn):
    """fn(q, k, v, mask) -> (output, weights); compared with F.scaled_dot_product_attention and a hand softmax."""
    with earlier_stubs(fn):
        return _attention(fn)


def _attention(fn):
    # 1. no mask, Tq = 4 queries, Tk = 6 keys, hs = 8: every dimension has its own size
    q, k, v = _qkv(Tq=4, Tk=6, hs=8, seed=1)
    with untouched("compute new tensors (scores = ..., masked_fill without _), leave q, k, v as they are",
                   q=q, k=k, v=v):
        out, weights = _pair(fn(q, k, v, None))
    expect(not (torch.is_tensor(out) and tuple(out.shape) == (2, 3, 4, 6)),
           "the pair is in the wrong order: return (output, weights), output first")
    weights = _tensor(weights, "attention (weights)")
    expect(tuple(weights.shape) == (2, 3, 4, 6), f"weights should be (B, nh, Tq, Tk) = (2, 3, 4, 6), got "
                                                 f"{tuple(weights.shape)}")  # fmt: skip
    raw = q @ k.transpose(-2, -1)  # (B, nh, Tq, Tk)
    scores = raw / math.sqrt(8)
    compare_with_hints("weights without a mask", weights, scores.softmax(-1), 1e-5, {
        "softmax over the wrong dim: normalise over the keys (dim=-1), so that each query's row sums to 1":
            scores.softmax(-2),
        "the weights are the scores themselves: apply the softmax over the keys, F.softmax(scores, dim=-1)": scores,
        "the scores are not scaled: divide q·k by sqrt(head_size) (your attention_scores)": raw.softmax(-1),
        "the scores are divided by hs: divide by sqrt(hs) (your attention_scores)": (raw / 8).softmax(-1),
    }.items())
    compare("output without a mask", out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)

    # 2. the causal mask, (Tq, Tk) = (6, 6)
    q, k, v = _qkv(Tq=6, Tk=6, hs=8, seed=2)
    causal = _lower_triangle(6)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    with untouched("invert a copy (~mask), do not change the mask you are given", mask=causal):
        out, weights = _pair(fn(q, k, v, causal))
    expected = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    known_mistake(weights, expected, 1e-5, _masked_weights(scores, causal).items())
    compare("weights on future tokens (causal mask)", weights.masked_select(~causal), torch.zeros(2 * 3 * 15), atol=0)
    compare("weights with the causal mask", weights, expected, atol=1e-5)
    compare("output with the causal mask", out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)

    # 3. causal AND padding (B, 1, T, T), one right- and one left-padded row; a query always sees its own key
    pad = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]).bool()[:, None, None, :]  # (B, 1, 1, T)
    both = causal & (pad | torch.eye(6, dtype=torch.bool))  # (B, 1, T, T)
    out, weights = _pair(fn(q, k, v, both))
    compare("output with causal + padding mask", out, F.scaled_dot_product_attention(q, k, v, attn_mask=both),
            atol=1e-5)

    # 4. backward: the model trains through attention
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = _pair(fn(*leaves, causal))
    expect(out.requires_grad, "the output carries no gradient: no torch.no_grad() or .detach() inside attention, "
                              "the model trains through it")
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    try:
        grads = torch.autograd.grad((out * direction).sum(), leaves, allow_unused=True)
    except RuntimeError as err:
        expect(False, f"backward through your attention failed ({str(err).split('.')[0]}): an in-place operation "
                      "(e.g. masked_fill_) overwrote a tensor autograd needs; use the out-of-place version")
    torch_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch_out = F.scaled_dot_product_attention(*torch_leaves, is_causal=True)
    expected = torch.autograd.grad((torch_out * direction).sum(), torch_leaves)
    for name, got_grad, exp_grad in zip("qkv", grads, expected):
        expect(got_grad is not None, f"the output does not depend on {name} through autograd: keep every step a "
                                     "torch operation on the inputs")
        compare(f"gradient w.r.t. {name} (causal mask)", got_grad, exp_grad, atol=1e-5)
    return ("output, weights and gradients match torch's scaled_dot_product_attention (no mask, causal, "
            "causal + padding)")


def _split_by_hand(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, nh, T, hs): head h takes channels h*hs .. (h+1)*hs - 1."""
    hs = x.shape[-1] // n_head
    return torch.stack([x[..., h * hs:(h + 1) * hs] for h in range(n_head)], dim=1)


@check("split_heads")
def split_heads(fn):
    """fn(x (B, T, C), n_head) -> (B, nh, T, hs)."""
    B, T, nh, hs = 2, 3, 4, 5  # all different, so each wrong order has its own shape
    x = torch.arange(B * T * nh * hs, dtype=torch.float32).view(B, T, nh * hs)
    with untouched("view/transpose make new tensors; do not write into x", x=x):
        got = _tensor(fn(x, nh), "split_heads")
    shape = tuple(got.shape)
    expect(shape != (B, T, nh, hs), f"the result is (B, T, nh, hs) = {shape}: transpose(1, 2) to bring the heads "
                                    "before time, (B, nh, T, hs)")
    expect(shape != (B, hs, T, nh), f"the result is (B, hs, T, nh) = {shape}: nh and hs are swapped; view as "
                                    "(B, T, n_head, C // n_head), then transpose(1, 2)")
    expect(shape == (B, nh, T, hs), f"shape should be (B, nh, T, hs) = {(B, nh, T, hs)}, got {shape}")
    compare_with_hints("split_heads(x, 4)", got, _split_by_hand(x, nh), 0, {
        "reshaping straight to (B, nh, T, hs) mixes tokens: view as (B, T, nh, hs), then transpose(1, 2)":
            x.view(B, nh, T, hs),
        "each head should take a block of hs consecutive channels, not every nh-th channel: view as (B, T, nh, hs), "
        "not (B, T, hs, nh)": x.view(B, T, hs, nh).permute(0, 3, 1, 2),
    }.items())
    compare("split_heads(x, 2)", fn(x, 2), _split_by_hand(x, 2), atol=0)
    return "(B, T, C) -> (B, nh, T, hs): head h of token t holds channels h*hs .. (h+1)*hs - 1"


@check("merge_heads")
def merge_heads(fn):
    """fn(x (B, nh, T, hs)) -> (B, T, C), the inverse of split_heads."""
    B, nh, T, hs = 2, 4, 3, 5
    x = torch.randn(B, nh, T, hs, generator=torch.Generator().manual_seed(2))
    with untouched("transpose/reshape make new tensors; do not write into x", x=x):
        try:
            got = fn(x)
        except RuntimeError as err:
            if "view size is not compatible" in str(err):
                expect(False, ".view() fails after transpose(1, 2): the transposed tensor is not contiguous in "
                              "memory; use .reshape(B, T, C) (or .contiguous().view(B, T, C))")
            raise
    got = _tensor(got, "merge_heads")
    expect(tuple(got.shape) == (B, T, nh * hs), f"shape should be (B, T, C) = {(B, T, nh * hs)}, "
                                                f"got {tuple(got.shape)}")
    expected = torch.cat([x[:, h] for h in range(nh)], dim=-1)  # (B, T, C): head 0's channels, then head 1's, ...
    compare_with_hints("merge_heads(x)", got, expected, 0, {
        "reshaping (B, nh, T, hs) straight to (B, T, C) mixes tokens: transpose(1, 2) first, then reshape":
            x.reshape(B, T, nh * hs),
        "the heads' channels are interleaved: transpose to (B, T, nh, hs) (transpose(1, 2)), not (B, T, hs, nh), "
        "before the reshape": x.permute(0, 2, 3, 1).reshape(B, T, nh * hs),
    }.items())
    y = torch.randn(B, T, nh * hs, generator=torch.Generator().manual_seed(3))
    compare("merge_heads(split_heads(y))", fn(_split_by_hand(y, nh)), y, atol=0)
    return "(B, nh, T, hs) -> (B, T, C), and merge_heads undoes split_heads"


def _self_attention_by_hand(module, x, mask, order=(0, 1, 2), proj=True):
    """The reference forward from the module's weights and torch's fused kernel (no gpt2lab code); `order` and `proj`
    build the wrong answers the hints recognise."""
    B, T, C = x.shape
    nh = module.n_head
    qkv = F.linear(x, module.c_attn.weight, module.c_attn.bias).split(C, dim=2)  # 3 x (B, T, C)
    q, k, v = (qkv[i].view(B, T, nh, C // nh).transpose(1, 2) for i in order)  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, nh, T, hs)
    y = y.transpose(1, 2).reshape(B, T, C)
    return F.linear(y, module.c_proj.weight, module.c_proj.bias) if proj else y


@check("self_attention")
def self_attention(fn):
    """fn(module, x, mask) -> (B, T, C): the CausalSelfAttention forward, written with the module's weights."""
    with earlier_stubs(fn):
        return _self_attention(fn)


def _self_attention(fn):
    torch.manual_seed(3)
    module = ref.CausalSelfAttention(n_embd=24, n_head=3).eval()  # only a holder of c_attn, c_proj, n_head, n_embd
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        expected = _self_attention_by_hand(module, x, None)
        with untouched("compute new tensors from x, do not write into it", x=x):
            got = fn(module, x, None)
        expect(not isinstance(got, tuple | list), "return only the output (B, T, C), not a tuple: unpack "
                                                  "`out, _ = attention(...)`")
        got = _tensor(got, "self_attention")
        expect(tuple(got.shape) == (2, 7, 24), f"the output should be (B, T, C) = (2, 7, 24), got {tuple(got.shape)}")
        wrong = {
            "with mask=None use the causal mask (causal_mask(T)): without it every token sees the future":
                _self_attention_by_hand(module, x, torch.ones(7, 7, dtype=torch.bool)),
            "the output projection is missing: end with module.c_proj(merge_heads(...))":
                _self_attention_by_hand(module, x, None, proj=False),
        }
        for order in [(1, 0, 2), (0, 2, 1), (2, 1, 0), (1, 2, 0), (2, 0, 1)]:
            wrong["c_attn's output splits as q, k, v in that order: q, k, v = module.c_attn(x).split(module.n_embd, "
                  f"dim=2) (yours looks like order {''.join('qkv'[i] for i in order)})"] = \
                _self_attention_by_hand(module, x, None, order=order)
        compare_with_hints("self-attention output (mask=None, so causal)", got, expected, 1e-5, wrong.items())

        attention_mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])  # row 1 is left-padded
        pad = attention_mask.bool()[:, None, None, :]
        mask = _lower_triangle(7) & (pad | torch.eye(7, dtype=torch.bool))  # (B, 1, T, T)
        with untouched("invert a copy (~mask), do not change the mask you are given", mask=mask):
            got = _tensor(fn(module, x, mask), "self_attention")
        real = attention_mask.bool()
        expected = _self_attention_by_hand(module, x, mask)
        ignored = ("the mask you are given is ignored: use it when it is not None (it already holds the causal "
                   "part)", _self_attention_by_hand(module, x, None)[real])
        compare_with_hints("self-attention output on real tokens, with a padding mask (left-padded row)", got[real],
                           expected[real], 1e-5, [ignored])

    # backward: the model trains through this forward
    leaf = x.clone().requires_grad_(True)
    got = fn(module, leaf, None)
    expect(torch.is_tensor(got) and got.requires_grad, "the output carries no gradient: no torch.no_grad() or "
                                                       ".detach() in the forward, the model trains through it")
    direction = torch.randn(got.shape, generator=torch.Generator().manual_seed(4))
    (grad,) = torch.autograd.grad((got * direction).sum(), leaf)
    reference_leaf = x.clone().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad((_self_attention_by_hand(module, reference_leaf, None) * direction).sum(),
                                           reference_leaf)
    compare("gradient w.r.t. x (mask=None)", grad, expected_grad, atol=1e-5)
    return ("fused qkv -> heads -> attention -> merge -> c_proj matches torch's fused kernel, with and without "
            "padding, gradients included")


@check("padded_batch")
def padded_batch(outputs_padded, outputs_alone, attention_mask):
    """The padded batch's outputs on real tokens equal each sequence run alone."""
    for row, alone in enumerate(outputs_alone):
        real = attention_mask[row].bool()
        compare(f"row {row} on its real tokens", outputs_padded[row][real], alone[0], atol=1e-5)
    return f"padded batch = {len(outputs_alone)} sequences run alone, on every real token"
