"""Checks for notebook 02 (gpt2): the model's pieces, the loaded weights against transformers, and sampling.

Usage in the notebook: `from gpt2lab.checks import gpt2 as check`, then e.g. `check.embed(embed)`.
"""

from __future__ import annotations

import torch

from .. import generate as gen
from ..model import GPT2, GPT2Config
from .core import check, compare, expect


def _tiny_model(seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    model = GPT2(GPT2Config.tiny(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=32)).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so that a skipped piece shows
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
        model.transformer.wte.weight.normal_(0.0, 1.0)  # peaked, context-dependent predictions for greedy
        model.transformer.wpe.weight.normal_(0.0, 0.5)
    return model


def _ids(B=2, T=9, V=101, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@check("embed")
def embed(fn):
    """fn(model, input_ids, position_ids) -> token embedding + position embedding, (B, T, C)."""
    model, ids = _tiny_model(), _ids()
    pos = torch.arange(9)[None]
    with torch.no_grad():
        got = fn(model, ids, pos)
        expect(got is not None, "embed returned None: did you forget to `return`?")
        expect(tuple(got.shape) == (2, 9, 32), f"shape should be (B, T, C) = (2, 9, 32), got {tuple(got.shape)}")
        if torch.allclose(got, model.transformer.wte(ids), atol=1e-6):
            expect(False, "only the token embedding: add the position embedding wpe(position_ids)")
        compare("embeddings", got, model.embed(ids, pos), atol=1e-6)
        shifted = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6]] * 2)  # left padding: positions follow real tokens
        compare("embeddings with given position_ids", fn(model, ids, shifted), model.embed(ids, shifted), atol=1e-6)
    return "wte(input_ids) + wpe(position_ids) matches, also with left-padding position ids"


@check("block_forward")
def block_forward(fn):
    """fn(block, x) -> x + attn(ln_1(x)), then + mlp(ln_2(...)): the pre-LayerNorm block."""
    block = _tiny_model().transformer.h[0]
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = fn(block, x)
        expect(got is not None, "block_forward returned None: did you forget to `return`?")
        post_ln = block.ln_1(x + block.attn(x))
        post_ln = block.ln_2(post_ln + block.mlp(post_ln))
        if tuple(got.shape) == tuple(x.shape) and torch.allclose(got, post_ln, atol=1e-5):
            expect(False, "that is post-LayerNorm: GPT-2 normalises *before* each sub-layer, x + attn(ln_1(x))")
        compare("block output", got, block(x), atol=1e-5)
    return "pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) matches"


@check("logits_from_hidden")
def logits_from_hidden(fn):
    """fn(model, hidden (B, T, C)) -> logits (B, T, vocab) through the head tied to wte."""
    model = _tiny_model()
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = fn(model, hidden)
        expect(got is not None, "logits_from_hidden returned None: did you forget to `return`?")
        expect(tuple(got.shape) == (2, 5, 101), f"shape should be (B, T, vocab) = (2, 5, 101), got {tuple(got.shape)}")
        compare("logits", got, model.head(hidden), atol=1e-5)
    return "hidden @ wteᵀ gives the logits (B, T, vocab)"


@check("gpt2_matches_transformers")
def gpt2_matches_transformers(ours: GPT2, reference, input_ids, attention_mask=None, atol: float = 1e-5):
    """Our logits vs transformers' GPT2LMHeadModel on the same ids (real tokens only when padded)."""
    from ..model import position_ids_from_mask

    with torch.no_grad():
        got = ours(input_ids, attention_mask)
        if attention_mask is None:
            expected = reference(input_ids).logits
            compare("logits", got, expected, atol=atol)
        else:
            pos = position_ids_from_mask(attention_mask)
            expected = reference(input_ids, attention_mask=attention_mask, position_ids=pos).logits
            real = attention_mask.bool()
            compare("logits on real tokens", got[real], expected[real], atol=atol)
    return f"logits equal transformers' GPT2LMHeadModel within {atol:g} ({got.shape[0]} x {got.shape[1]} tokens)"


@check("greedy_matches_transformers")
def greedy_matches_transformers(ours: GPT2, reference, input_ids, max_new_tokens: int = 20):
    """Greedy generation of our model vs transformers' generate: identical tokens."""
    eos = reference.generation_config.eos_token_id  # both stop at end-of-text, if it comes
    got = gen.generate(ours, input_ids, max_new_tokens, eos_token_id=eos)
    expected = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    compare("greedy tokens", got, expected)
    return f"greedy generation identical to transformers for {max_new_tokens} tokens"


@check("beam_matches_transformers")
def beam_matches_transformers(ours: GPT2, reference, input_ids, num_beams: int = 4, max_new_tokens: int = 20):
    """Beam search of our model vs transformers' generate(num_beams=...): the same best beam, token for token."""
    eos = reference.generation_config.eos_token_id
    got = gen.generate(ours, input_ids, max_new_tokens, num_beams=num_beams, eos_token_id=eos)
    expected = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                  num_beams=num_beams, do_sample=False, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    compare("beam-search tokens", got, expected)
    return f"beam search ({num_beams} beams) picks the same tokens as transformers for {max_new_tokens} tokens"


@check("greedy")
def greedy(fn):
    """fn(model, input_ids, max_new_tokens) -> prompt + greedy tokens, using the KV cache."""
    model, ids = _tiny_model(), _ids(B=2, T=4, seed=4)
    calls = []  # (input shape, cache given?) of every model(...) call the student makes

    def record(module, args, kwargs):
        input_ids = args[0] if args else kwargs.get("input_ids")
        calls.append((tuple(input_ids.shape) if input_ids is not None else None, kwargs.get("cache") is not None))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            got = fn(model, ids, 10)
    finally:
        hook.remove()
    expect(got is not None, "greedy returned None: did you forget to `return`?")
    compare("greedy tokens", got, gen.generate(model, ids, 10))
    # right tokens are not enough: the exercise is to use the cache, i.e. feed each new token alone
    expect(len(calls) > 0, "greedy never called the model")
    for i, (shape, cached) in enumerate(calls, start=1):
        expect(cached, f"model call {i} has no cache: pass `cache=cache` so the keys and values are stored and reused")
        if i > 1:
            expect(shape == (2, 1), f"model call {i} got input of shape {shape}: after the prompt, feed only the new "
                                    f"token, shape (B, 1) = (2, 1); the cache already holds the rest")  # fmt: skip
    return "greedy decoding with the KV cache (one new token per step) gives the same 10 tokens as the reference"


@check("cache_matches")
def cache_matches(model: GPT2, input_ids):
    """Logits fed one token at a time through the KV cache equal one full forward."""
    from ..model import KVCache

    with torch.no_grad():
        full = model(input_ids)
        cache = KVCache.for_model(model, input_ids.shape[0], input_ids.shape[1])
        steps = [model(input_ids[:, t : t + 1], cache=cache) for t in range(input_ids.shape[1])]
    compare("cached logits", torch.cat(steps, dim=1), full, atol=1e-4)
    return f"token-by-token logits with the KV cache equal the full forward ({input_ids.shape[1]} positions)"


@check("top_k_filter")
def top_k_filter(fn):
    """fn(logits (B, V), k) -> logits with all but the k largest per row set to -inf."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.5], [0.0, -1.0, 4.0, 1.0, 1.5]])
    got = fn(logits.clone(), 2)
    expect(got is not None, "top_k_filter returned None: did you forget to `return`?")
    inf = float("-inf")
    compare("top_k_filter(k=2)", got, torch.tensor([[inf, 3.0, inf, inf, 2.5], [inf, inf, 4.0, inf, 1.5]]), atol=0)
    compare("top_k_filter(k=1)", fn(logits.clone(), 1), gen.top_k_filter(logits, 1), atol=0)
    compare("top_k_filter(k=5) keeps everything", fn(logits.clone(), 5), logits, atol=0)
    return "keeps the k largest logits per row, -inf elsewhere (k = 1, 2, 5)"


@check("top_p_filter")
def top_p_filter(fn):
    """fn(logits (B, V), p) -> nucleus filtering; the top token always survives."""
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.9, 0.04, 0.03, 0.03]])
    logits = probs.log()
    inf = float("-inf")
    got = fn(logits.clone(), 0.7)
    expect(got is not None, "top_p_filter returned None: did you forget to `return`?")
    expected = logits.clone()  # row 0 keeps 0.5 + 0.3 >= 0.7; row 1 keeps 0.9 alone
    expected[0, [1, 3]] = inf
    expected[1, 1:] = inf
    compare("top_p_filter(p=0.7)", got, expected, atol=1e-6)
    tiny = fn(logits.clone(), 0.01)
    expect(bool(torch.isfinite(tiny[:, 0]).all()), "the most likely token must always survive, even for a tiny p")
    compare("top_p_filter(p=0.01)", tiny, gen.top_p_filter(logits, 0.01), atol=1e-6)
    compare("top_p_filter(p=1.0) keeps everything", fn(logits.clone(), 1.0), logits, atol=1e-6)
    return "keeps the smallest set of top tokens with probability >= p (the top token always)"
