"""gpt2lab.generate against transformers' generate (greedy, beam search), KV cache vs no cache, sampling filters,
argument errors, best-of-n, wrapped and compiled-like models, and notebook 02's checks that compare against
transformers (the exercise checks against planted mistakes are in test_checks_gpt2.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_gpt2 import pair

from gpt2lab import generate as G
from gpt2lab.checks import gpt2 as check
from gpt2lab.model import GPT2, GPT2Config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return pair(tmp_path_factory.mktemp("g"), seed=0)


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """Vocab of 6 (eos = 5): eos comes up, so stopping and finished beams get exercised (seed picked for that)."""
    return pair(tmp_path_factory.mktemp("s"), seed=8, vocab_size=6, n_embd=32, n_head=2)


def _prompts(B=3, T=6, V=50257, seed=1):
    return torch.randint(0, V - 1, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf(ref, ids, mask=None, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    eos = kw.pop("eos_token_id", ref.config.eos_token_id)
    return ref.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=eos, eos_token_id=eos, **kw)


def test_greedy_20_tokens_identical(models):
    ref, ours = models
    ids = _prompts()
    got = G.generate(ours, ids, 20, eos_token_id=50256)
    assert got.shape == (3, 26)
    assert torch.equal(got, _hf(ref, ids, max_new_tokens=20))


def test_greedy_left_padded_batch_identical(models):
    ref, ours = models
    ids = _prompts(seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3], mask[2, :1] = 0, 0
    got = G.generate(ours, ids, 20, attention_mask=mask, eos_token_id=50256)
    assert torch.equal(got, _hf(ref, ids, mask, max_new_tokens=20))
    for row in range(3):  # and each prompt alone gives the same continuation
        alone = G.generate(ours, ids[row : row + 1][:, mask[row].bool()], 20)
        assert torch.equal(alone[0, -20:], got[row, -20:])


def test_greedy_stops_at_eos_and_pads(small_vocab):
    ref, ours = small_vocab
    ids = _prompts(B=4, T=5, V=6, seed=4) % 5
    got = G.generate(ours, ids, 15, eos_token_id=5)
    expected = _hf(ref, ids, max_new_tokens=15)
    assert torch.equal(got, expected)
    assert (got[:, 5:] == 5).any(), "the fixture should produce eos somewhere"


def test_generation_stops_when_every_row_ended(models):
    _, ours = models
    ids = _prompts(B=1, seed=17)
    first = int(G.generate(ours, ids, 1)[0, -1])
    assert G.generate(ours, ids, 10, eos_token_id=first).shape == (1, 7)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_matches_transformers(small_vocab, num_beams):
    ref, ours = small_vocab
    ids = _prompts(B=3, T=5, V=6, seed=5) % 5
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    got = G.generate(ours, ids, 12, num_beams=num_beams, eos_token_id=5, num_return_sequences=2, attention_mask=mask)
    expected = _hf(ref, ids, mask, max_new_tokens=12, num_beams=num_beams, num_return_sequences=2)
    assert torch.equal(got, expected)


def test_beam_search_full_vocab_no_eos(models):
    ref, ours = models
    ids = _prompts(B=2, T=4, seed=6)
    got = G.generate(ours, ids, 10, num_beams=4)
    ref.generation_config.eos_token_id = None
    try:
        expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, num_beams=4,
                                do_sample=False, pad_token_id=0)  # fmt: skip
    finally:
        ref.generation_config.eos_token_id = ref.config.eos_token_id
    assert torch.equal(got, expected)


def test_beam_search_with_and_without_cache(small_vocab):
    _, ours = small_vocab
    ids = _prompts(B=2, T=5, V=6, seed=7) % 5
    a = G.generate(ours, ids, 10, num_beams=3, eos_token_id=5)
    b = G.generate(ours, ids, 10, num_beams=3, eos_token_id=5, use_cache=False)
    assert torch.equal(a, b)


def test_cached_and_uncached_agree(models):
    _, ours = models
    ids = _prompts(seed=8)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    a = G.generate(ours, ids, 15, attention_mask=mask)
    b = G.generate(ours, ids, 15, attention_mask=mask, use_cache=False)
    assert torch.equal(a, b)
    s1 = G.generate(ours, ids, 10, do_sample=True, generator=torch.Generator().manual_seed(0))
    s2 = G.generate(ours, ids, 10, do_sample=True, use_cache=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2)


def test_cache_logits_check_passes(models):
    _, ours = models
    assert check.cache_matches(ours, _prompts(B=2, T=12, seed=9))


def test_sampling_is_seeded_and_varies(models):
    _, ours = models
    ids = _prompts(B=1, seed=10)
    a = G.generate(ours, ids, 10, do_sample=True, generator=torch.Generator().manual_seed(1))
    b = G.generate(ours, ids, 10, do_sample=True, generator=torch.Generator().manual_seed(1))
    c = G.generate(ours, ids, 10, do_sample=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_1_and_tiny_top_p_are_greedy(models):
    _, ours = models
    ids = _prompts(B=2, seed=11)
    greedy = G.generate(ours, ids, 12)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)):
        got = G.generate(ours, ids, 12, do_sample=True, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(got, greedy), kw


def test_top_p_always_keeps_top_token():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(4, 30, generator=g) * 5
        for p in (1e-9, 0.01, 0.3, 0.9, 1.0):
            out = G.top_p_filter(logits, p)
            top = logits.argmax(-1)
            assert torch.isfinite(out.gather(1, top[:, None])).all()
            kept = torch.isfinite(out)
            probs = logits.double().softmax(-1)
            assert ((probs * kept).sum(-1) >= p - 1e-6).all()  # enough mass kept
            # minimal: dropping the smallest kept token would fall below p (unless only the top one is kept)
            smallest = torch.where(kept, probs, torch.ones_like(probs)).min(-1).values
            assert (((probs * kept).sum(-1) - smallest < p + 1e-6) | (kept.sum(-1) == 1)).all()


def test_top_k_and_top_p_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
    for k in (1, 5, 50):
        assert torch.equal(G.top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.1, 0.5, 0.95):
        assert torch.equal(
            torch.isinf(G.top_p_filter(logits, p)), torch.isinf(TopPLogitsWarper(p)(None, logits.clone()))
        )


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    cold = G.next_token_distribution(logits, temperature=0.5)
    hot = G.next_token_distribution(logits, temperature=2.0)
    assert cold[0, 2] > logits.softmax(-1)[0, 2] > hot[0, 2]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, top_k=0), "top_k"),
        (dict(do_sample=True, top_k=2.5), "top_k"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number"),
        (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(do_sample=True, top_p=float("nan")), r"top_p must be a number in \(0, 1\]"),
        (dict(do_sample=True, top_k=True), "top_k"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, do_sample=True), "beam"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_return_sequences=2), "greedy"),
        (dict(best_of=3), "best_of"),
        (dict(best_of=1, do_sample=True, num_return_sequences=2), "best_of"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])), "left-padded"),
    ],
)
def test_bad_arguments_raise(models, kwargs, match):
    _, ours = models
    with pytest.raises(ValueError, match=match) as err:
        G.generate(ours, _prompts(B=1, seed=12), 3, **kwargs)
    assert "\n" not in str(err.value)  # one line


def test_sampling_pieces_reject_nan():
    logits = torch.zeros(1, 5)
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            G.apply_temperature(logits, bad)
    with pytest.raises(ValueError, match="top_p"):
        G.top_p_filter(logits, float("nan"))
    with pytest.raises(ValueError, match="top_k"):
        G.top_k_filter(logits, 0)


def test_length_and_type_errors(models):
    _, ours = models
    with pytest.raises(ValueError, match="n_positions"):
        G.generate(ours, _prompts(B=1, seed=13), 64)
    with pytest.raises(ValueError, match="max_new_tokens"):
        G.generate(ours, _prompts(B=1, seed=13), -1)
    with pytest.raises(ValueError, match="LongTensor"):
        G.generate(ours, torch.zeros(1, 3), 2)
    with pytest.raises(TypeError, match=r"cannot generate with Linear \(generate calls model\(input_ids") as err:
        G.generate(torch.nn.Linear(2, 2), _prompts(B=1), 2)
    assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match=r"expected logits \(1, 6, 50257\), got \(1, 6, 64\)"):
        G.generate(_Forwards(ours, return_hidden=True), _prompts(B=1), 2)  # hidden states are not logits
    with pytest.raises(TypeError, match="generate expects a model called as"):
        G.generate("gpt2", _prompts(B=1), 2)
    assert G.generate(ours, _prompts(B=1, seed=13)[0], 2).shape == (1, 8)  # a 1-D prompt is one row
    assert torch.equal(G.generate(ours, _prompts(B=2, seed=13), 0), _prompts(B=2, seed=13))


# ------------------------------------------------------------------------------------- wrapped and compiled models


class _Forwards(torch.nn.Module):
    """A module that holds a GPT2 and forwards to it (an adapter wrapper); notes the keywords of every call."""

    def __init__(self, inner, **fixed):
        super().__init__()
        self.inner, self.fixed, self.calls = inner, fixed, []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls.append(sorted(kwargs))
        return self.inner(input_ids, attention_mask, **kwargs, **self.fixed)


class _CompiledLike(torch.nn.Module):
    """Stands in for torch.compile's OptimizedModule (whose compile takes ~20 s on a CPU): `_orig_mod` holds the
    model, and calls go through a function of its own."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model
        self.forward_fn = model.forward

    def forward(self, *args, **kwargs):
        return self.forward_fn(*args, **kwargs)


class _TwoModels(torch.nn.Module):
    """Holds two GPT2s (say a model and its EMA teacher): which one the cache is for is ambiguous."""

    def __init__(self, model, other):
        super().__init__()
        self.model_a, self.model_b = model, other
        self.calls = []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls.append(sorted(kwargs))
        return self.model_a(input_ids, attention_mask, **kwargs)


def test_find_gpt2(models):
    _, ours = models
    assert G.find_gpt2(ours) is ours
    assert G.find_gpt2(_Forwards(ours)) is ours
    assert G.find_gpt2(_CompiledLike(_Forwards(ours))) is ours
    assert G.find_gpt2(torch.nn.DataParallel(ours)) is ours
    assert G.find_gpt2(_TwoModels(ours, GPT2(GPT2Config.tiny()))) is None
    assert G.find_gpt2(torch.nn.Linear(2, 2)) is None and G.find_gpt2("gpt2") is None


@pytest.mark.parametrize("wrap", [_Forwards, _CompiledLike], ids=["wrapper", "compiled-like"])
def test_wrapped_model_generates_like_the_bare_one(models, wrap):
    _, ours = models
    ids = _prompts(seed=20)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    wrapped = wrap(ours)
    for kw in (dict(), dict(attention_mask=mask), dict(num_beams=3), dict(do_sample=True, top_k=50)):
        bare = G.generate(ours, ids, 8, generator=torch.Generator().manual_seed(0), **kw)
        got = G.generate(wrapped, ids, 8, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(got, bare), kw
    if isinstance(wrapped, _Forwards):  # the KV cache was used: one forward per token after the prompt
        assert wrapped.calls[-1] == ["cache"]


def test_without_a_known_gpt2_generation_recomputes_the_prefix(models):
    _, ours = models
    ids = _prompts(seed=21)
    two = _TwoModels(ours, GPT2(GPT2Config.tiny()))
    with pytest.raises(ValueError, match="n_positions"):  # the known wrapper still checks the length
        G.generate(_Forwards(ours), ids, 64)
    assert torch.equal(G.generate(two, ids, 10), G.generate(ours, ids, 10))
    assert two.calls and all(call == [] for call in two.calls)  # no cache: every step ran on the whole prefix


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="needs torch.compile")
def test_torch_compile_model_is_recognised_without_compiling(models):
    """torch.compile's wrapper keeps the model as `_orig_mod`; finding it needs no compilation (which is slow)."""
    _, ours = models
    assert G.find_gpt2(torch.compile(ours)) is ours


def test_num_return_sequences_grouped_by_prompt(models):
    _, ours = models
    ids = _prompts(B=2, seed=14)
    out = G.generate(ours, ids, 5, do_sample=True, num_return_sequences=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 11)
    assert torch.equal(out[:3, :6], ids[0].expand(3, 6)) and torch.equal(out[3:, :6], ids[1].expand(3, 6))


def test_best_of_n_picks_highest_mean_logprob(small_vocab):
    _, ours = small_vocab
    ids = _prompts(B=2, T=4, V=6, seed=15) % 5
    n = 6
    best, scores = G.best_of_n(ours, ids, n, 10, eos_token_id=5, generator=torch.Generator().manual_seed(3))
    # the same n samples, drawn again with the same generator, scored independently by a full forward
    samples = G.generate(ours, ids, 10, do_sample=True, num_return_sequences=n, eos_token_id=5,
                         generator=torch.Generator().manual_seed(3))  # fmt: skip
    all_scores = G.score_sequences(ours, samples, 4, eos_token_id=5).view(2, n)
    assert torch.allclose(scores, all_scores.max(1).values, atol=1e-5)
    for row in range(2):
        winner = samples.view(2, n, -1)[row, all_scores[row].argmax()]
        assert torch.equal(best[row, : winner.shape[0]], winner)
    via_generate = G.generate(ours, ids, 10, do_sample=True, best_of=n, eos_token_id=5,
                              generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(via_generate, best)


def test_generate_on_fresh_tiny_config():
    model = GPT2(GPT2Config.tiny()).eval()
    out = G.generate(model, torch.tensor([[50256]]), 8, do_sample=True, top_k=50, top_p=0.9, temperature=0.8)
    assert out.shape == (1, 9) and out.dtype == torch.long


# ----------------------------------------------------------------------------- notebook 02 checks
# The checks that compare against transformers, on this file's models; the exercise checks (embed ... greedy, top-k,
# top-p) against planted mistakes are in test_checks_gpt2.py.


def test_transformers_checks(models):
    ref, ours = models
    ids = _prompts(B=2, seed=16)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    assert check.gpt2_matches_transformers(ours, ref, ids)
    assert check.gpt2_matches_transformers(ours, ref, ids, mask)
    assert check.greedy_matches_transformers(ours, ref, ids, 20)
    broken = GPT2(ours.config).eval()
    broken.load_state_dict(ours.state_dict())
    with torch.no_grad():
        broken.transformer.h[1].ln_2.bias.add_(0.01)  # a planted bug in one weight
    assert not check.gpt2_matches_transformers(broken, ref, ids)


def test_beam_check(small_vocab, monkeypatch):
    ref, ours = small_vocab
    ids = _prompts(B=1, T=5, V=6, seed=5) % 5
    assert check.beam_matches_transformers(ours, ref, ids, num_beams=3, max_new_tokens=12)
    real_beam_search = G.beam_search
    monkeypatch.setattr(G, "beam_search", lambda *a, **kw: real_beam_search(*a, **{**kw, "length_penalty": 0.0}))
    bad = check.beam_matches_transformers(ours, ref, ids, num_beams=3, max_new_tokens=12)  # planted: no length norm
    assert not bad and "beam-search tokens" in str(bad), str(bad)


def test_cache_and_greedy_checks_catch_bugs(models, monkeypatch):
    ref, ours = models
    ids = _prompts(B=1, seed=18)
    broken = GPT2(ours.config).eval()
    broken.load_state_dict(ours.state_dict())
    with torch.no_grad():
        broken.transformer.ln_f.weight.neg_()  # a sign error before the head
    assert not check.greedy_matches_transformers(broken, ref, ids, 10)
    from gpt2lab.model import KVCache

    monkeypatch.setattr(KVCache, "update", lambda self, layer, k, v: (k, v))  # forgets the past
    assert not check.cache_matches(ours, ids)
