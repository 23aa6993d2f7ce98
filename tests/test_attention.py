"""gpt2lab.attention against torch's fused attention and hand cases (notebook 01's checks are tested in
test_checks_attention.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import attention as A


def _qkv(B=2, nh=3, Tq=6, Tk=6, hs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, t, hs, generator=g) for t in (Tq, Tk, Tk)]


def test_scores_hand_case():
    q = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    k = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    assert torch.allclose(A.attention_scores(q, k), torch.tensor([[3 / 2, 2 / 2]]))


def test_causal_mask_with_cache_offset():
    assert A.causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert torch.equal(A.causal_mask(5), torch.tril(torch.ones(5, 5, dtype=torch.bool)))
    with pytest.raises(AssertionError, match="at least as many keys"):
        A.causal_mask(3, 2)


def test_combined_mask_keeps_rows_non_empty():
    mask = A.combined_mask(torch.tensor([[0, 0, 1, 1]]), 4)
    assert mask.shape == (1, 1, 4, 4)
    assert mask.any(-1).all(), "every query needs at least one key, or softmax gives NaN"
    assert mask[0, 0, 3].tolist() == [False, False, True, True]


@pytest.mark.parametrize("masked", ["none", "causal", "padded"])
def test_written_out_attention_matches_sdpa(masked):
    q, k, v = _qkv()
    mask = {"none": None, "causal": A.causal_mask(6),
            "padded": A.combined_mask(torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]), 6)}[masked]  # fmt: skip
    out, w = A.attention(q, k, v, mask)
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max() < 1e-6
    assert torch.allclose(w.sum(-1), torch.ones(2, 3, 6))


def test_split_merge_roundtrip_and_layout():
    x = torch.randn(2, 5, 12)
    heads = A.split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    assert torch.equal(heads[1, 2, 4], x[1, 4, 8:12])
    assert torch.equal(A.merge_heads(heads), x)


def _module_pair(seed=0, C=32, nh=4):
    torch.manual_seed(seed)
    return A.CausalSelfAttention(C, nh).eval()


def test_module_fast_path_equals_written_out():
    m = _module_pair()
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        fast = m(x)
        slow, weights = m(x, return_weights=True)
    assert (fast - slow).abs().max() < 1e-6
    assert weights.shape == (3, 4, 10, 10)


def test_module_matches_hand_written_heads():
    m = _module_pair(seed=1)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        q, k, v = m.c_attn(x).split(32, dim=2)
        out, _ = A.attention(*(A.split_heads(t, 4) for t in (q, k, v)), A.causal_mask(6))
        expected = m.c_proj(A.merge_heads(out))
        assert (m(x) - expected).abs().max() < 1e-6


def test_padded_batch_equals_unpadded_sequences():
    m = _module_pair(seed=2)
    lengths = [7, 4, 2]
    seqs = [torch.randn(1, n, 32) for n in lengths]
    for side in ("right", "left"):
        x = torch.zeros(3, 7, 32)
        mask = torch.zeros(3, 7, dtype=torch.long)
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            span = slice(0, n) if side == "right" else slice(7 - n, 7)
            x[row, span], mask[row, span] = s[0], 1
        with torch.no_grad():
            out = m(x, A.combined_mask(mask, 7))
            assert torch.isfinite(out).all()
            for row, s in enumerate(seqs):
                assert (out[row][mask[row].bool()] - m(s)[0]).abs().max() < 1e-5, (side, row)


def test_dropout_on_weights_only_in_training():
    m = A.CausalSelfAttention(16, 2, dropout=0.5)
    x = torch.randn(1, 5, 16)
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


def test_scaling_constant():
    q, k, _ = _qkv(hs=64)
    assert torch.allclose(A.attention_scores(q, k) * math.sqrt(64), q @ k.transpose(-2, -1), atol=1e-5)
