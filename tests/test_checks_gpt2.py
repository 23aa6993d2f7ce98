"""Notebook 02's exercise checks against planted mistakes: each mistake gets its exact ✗ line, each stub reads
"not implemented yet", correct alternative formulations pass, and the test model makes decoding mistakes visible."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from check_helpers import NOT_YET, assert_mistake_line, assert_passes, stub
from tiny_gpt2 import pair

from gpt2lab import generate as G
from gpt2lab.checks import gpt2 as check
from gpt2lab.model import KVCache

INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------- embed


def embed_ok(m, ids, pos):
    return m.transformer.wte(ids) + m.transformer.wpe(pos)


def embed_indexing_in_place_add(m, ids, pos):  # alternative: index the tables, add in place into a fresh tensor
    x = m.transformer.wte.weight[ids]
    x += m.transformer.wpe.weight[pos]
    return x


def embed_writes_positions(m, ids, pos):
    out = m.transformer.wte(ids) + m.transformer.wpe(pos)
    pos.zero_()
    return out


EMBED_MISTAKES = {
    "only wte": (lambda m, ids, pos: m.transformer.wte(ids),
                 "only the token embedding: add the position embedding wpe(position_ids)"),
    "arange positions": (lambda m, ids, pos: m.transformer.wte(ids) + m.transformer.wpe(torch.arange(ids.shape[1])),
                         "you used positions 0..T-1 and ignored position_ids: use wpe(position_ids) (under left "
                         "padding the real tokens start at position 0)"),
    "row 0's positions": (lambda m, ids, pos: m.transformer.wte(ids) + m.transformer.wpe(pos[0]),
                          "every row got the positions of row 0: position_ids is (B, T), one row of positions per "
                          "sequence"),
    "scaled by sqrt(C)": (lambda m, ids, pos: m.transformer.wte(ids) * m.config.n_embd**0.5 + m.transformer.wpe(pos),
                          "GPT-2 does not scale the token embedding by √C (the original Transformer did): just "
                          "wte(input_ids) + wpe(position_ids)"),
    "concatenated": (lambda m, ids, pos: torch.cat([m.transformer.wte(ids), m.transformer.wpe(pos)], -1),
                     "shape (3, 9, 64): add the two embeddings, don't concatenate them (B, T, C) = (3, 9, 32)"),
    ".data": (lambda m, ids, pos: m.transformer.wte.weight.data[ids] + m.transformer.wpe(pos),
              "no gradient reaches transformer.wte.weight: training would never update it (did you use `.data`, "
              "`.detach()` or `torch.no_grad()`?)"),
    "writes position_ids": (embed_writes_positions,
                            "you modified position_ids in place: position_ids and input_ids belong to the caller"),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- block


def block_ok(b, x):
    x = x + b.attn(b.ln_1(x))
    return x + b.mlp(b.ln_2(x))


def block_tanh_formula(b, x):  # alternative: the MLP written out with GPT-2's tanh formula
    x = x + b.attn(b.ln_1(x))
    h = b.mlp.c_fc(b.ln_2(x))
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    return x + b.mlp.c_proj(h)


def block_in_place(b, x):
    x += b.attn(b.ln_1(x))
    return x + b.mlp(b.ln_2(x))


def block_erf_gelu(b, x):
    x = x + b.attn(b.ln_1(x))
    return x + b.mlp.c_proj(F.gelu(b.mlp.c_fc(b.ln_2(x))))


def block_relu(b, x):
    x = x + b.attn(b.ln_1(x))
    return x + b.mlp.c_proj(F.relu(b.mlp.c_fc(b.ln_2(x))))


def block_post_ln(b, x):
    x = b.ln_1(x + b.attn(x))
    return b.ln_2(x + b.mlp(x))


def block_no_attn_residual(b, x):
    x = b.attn(b.ln_1(x))
    return x + b.mlp(b.ln_2(x))


def block_no_mlp_residual(b, x):
    x = x + b.attn(b.ln_1(x))
    return b.mlp(b.ln_2(x))


def block_ln_1_twice(b, x):
    x = x + b.attn(b.ln_1(x))
    return x + b.mlp(b.ln_1(x))


def block_parallel(b, x):
    return x + b.attn(b.ln_1(x)) + b.mlp(b.ln_2(x))


def block_returns_tuple(b, x):
    a = b.attn(b.ln_1(x))
    x = x + a
    return x + b.mlp(b.ln_2(x)), a


def block_crashes(b, x):
    return x + b.attn(b.ln_1(x.transpose(1, 2)))


BLOCK_MISTAKES = {
    "x += (in place)": (block_in_place,
                        "you modified x in place: write x = x + attn(ln_1(x)), not x += ...: the caller still needs "
                        "its x"),
    "erf GELU": (block_erf_gelu, "GELU: GPT-2 uses the tanh approximation, F.gelu(x, approximate=\"tanh\"); the exact "
                                 "(erf) GELU differs here by ~7e-4"),
    "ReLU": (block_relu, "ReLU: GPT-2's MLP uses GELU (tanh approximation), F.gelu(x, approximate=\"tanh\")"),
    "post-LN": (block_post_ln, "that is post-LayerNorm: GPT-2 normalises *before* each sub-layer, x + attn(ln_1(x))"),
    "no attention residual": (block_no_attn_residual,
                              "the residual connection around attention is missing: x = x + attn(ln_1(x))"),
    "no MLP residual": (block_no_mlp_residual, "the residual connection around the MLP is missing: x = x + "
                                               "mlp(ln_2(x))"),
    "ln_1 before the MLP": (block_ln_1_twice, "the MLP's LayerNorm is ln_2, not ln_1: x + mlp(ln_2(x))"),
    "parallel sub-layers": (block_parallel,
                            "the MLP must see the stream after the attention residual: first x = x + attn(ln_1(x)), "
                            "then x = x + mlp(ln_2(x)) with the new x (not both from the same input)"),
    "returns a tuple": (block_returns_tuple, "block output is a tuple of 2 items: return just the one tensor"),
    "crash inside torch": (block_crashes,  # cited at the student's line, not inside torch's LayerNorm
                           "your code raised RuntimeError: Given normalized_shape=[32], expected input with shape "
                           f"[*, 32], but got input of size[2, 32, 7] (line {block_crashes.__code__.co_firstlineno + 1}"
                           ": return x + b.attn(b.ln_1(x.transpose(1, 2))))"),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- head


def head_ok(m, h):
    return h @ m.transformer.wte.weight.T


HEAD_ALTERNATIVES = [
    lambda m, h: F.linear(h, m.transformer.wte.weight),
    lambda m, h: m.lm_head(h),
    lambda m, h: torch.einsum("btc,vc->btv", h, m.transformer.wte.weight),
]
HEAD_MISTAKES = {
    "ln_f again": (lambda m, h: m.transformer.ln_f(h) @ m.transformer.wte.weight.T,
                   "hidden has already been through ln_f: do not apply it again, just hidden @ wteᵀ"),
    "softmax": (lambda m, h: (h @ m.transformer.wte.weight.T).softmax(-1),
                "those are probabilities (a softmax over the vocabulary): return the logits, before any softmax"),
    "log_softmax": (lambda m, h: (h @ m.transformer.wte.weight.T).log_softmax(-1),
                    "those are log-probabilities (log_softmax): return the raw logits"),
    "scaled by 1/sqrt(C)": (lambda m, h: h @ m.transformer.wte.weight.T / math.sqrt(h.shape[-1]),
                            "don't scale the logits: no 1/√C here (that is attention's scaling)"),
    "wpe": (lambda m, h: h @ m.transformer.wpe.weight.T,
            "that used wpe (the position table): the head is tied to the token embedding wte"),
    ".data": (lambda m, h: h @ m.transformer.wte.weight.data.T,
              "no gradient reaches transformer.wte.weight: training would never update it (did you use `.data`, "
              "`.detach()` or `torch.no_grad()`?)"),
    "a new layer": (lambda m, h: torch.nn.Linear(h.shape[-1], m.config.vocab_size, bias=False)(h),
                    "your logits do not come from wte: the head is tied to the token embedding, hidden @ wteᵀ (no "
                    "new layer)"),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- greedy


def _cache(model, ids, n):
    return KVCache.for_model(model, batch_size=ids.shape[0], max_length=ids.shape[1] + n)


@torch.no_grad()
def greedy_ok(model, ids, n):
    cache = _cache(model, ids, n)
    logits = model(ids, cache=cache)
    out = ids
    for _ in range(n):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, token], 1)
        logits = model(token, cache=cache)
    return out


@torch.no_grad()
def greedy_preallocated(model, ids, n):  # alternative: a preallocated output, softmax before argmax, n calls only
    cache = _cache(model, ids, n)
    B, T = ids.shape
    out = torch.empty(B, T + n, dtype=torch.long)
    out[:, :T] = ids
    logits = model(ids, cache=cache)
    for i in range(n):
        out[:, T + i] = logits[:, -1].softmax(-1).argmax(-1)
        if i < n - 1:
            logits = model(out[:, T + i : T + i + 1], cache=cache)
    return out


def _greedy_with(step):
    """A greedy loop with one planted change: step(model, ids, n, cache, logits, out, i) -> (token, logits)."""

    @torch.no_grad()
    def run(model, ids, n):
        cache = _cache(model, ids, n)
        logits = model(ids, cache=cache)
        out = ids
        for i in range(n):
            token, logits = step(model, ids, n, cache, logits, out, i)
            out = torch.cat([out, token], 1)
        return out

    return run


def _sample(model, ids, n, cache, logits, out, i):
    token = torch.multinomial(logits[:, -1].softmax(-1), 1)
    return token, model(token, cache=cache)


def _fresh_cache(model, ids, n, cache, logits, out, i):
    token = logits[:, -1].argmax(-1, keepdim=True)
    return token, model(token, cache=_cache(model, ids, n))


def _first_position(model, ids, n, cache, logits, out, i):
    token = logits[:, 0].argmax(-1, keepdim=True)
    return token, model(token, cache=cache)


@torch.no_grad()
def greedy_last_prompt_token(model, ids, n):
    cache = _cache(model, ids, n)
    logits = model(ids[:, -1:], cache=cache)
    out = ids
    for _ in range(n):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, token], 1)
        logits = model(token, cache=cache)
    return out


@torch.no_grad()
def greedy_no_cache(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@torch.no_grad()
def greedy_prefix_into_cache(model, ids, n):
    cache = _cache(model, ids, n)
    out = ids
    for _ in range(n):
        out = torch.cat([out, model(out, cache=cache)[:, -1].argmax(-1, keepdim=True)], 1)
    return out


@torch.no_grad()
def greedy_cache_then_prefix(model, ids, n):
    cache = _cache(model, ids, n)
    logits = model(ids, cache=cache)
    for _ in range(n):
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        logits = model(ids)
    return ids


def greedy_second_to_last_no_cache(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -2].argmax(-1, keepdim=True)], 1)
    return ids


def greedy_new_tokens_only(model, ids, n):
    return greedy_ok(model, ids, n)[:, ids.shape[1] :]


def greedy_float(model, ids, n):
    return greedy_ok(model, ids, n).float()


GREEDY_MISTAKES = {
    "samples": (_greedy_with(_sample), "two runs gave different tokens: greedy takes the argmax of the last "
                                       "position's logits, it does not sample"),
    "fresh cache per step": (_greedy_with(_fresh_cache),
                             "model call 2 used a new KVCache: create one cache before the loop and pass that same "
                             "cache every step (a fresh cache forgets the prompt and earlier tokens)"),
    "cache from the last prompt token": (greedy_last_prompt_token,
                                         "model call 1 got input of shape (2, 1): feed the whole prompt first, shape "
                                         "(B, T) = (2, 4), so that the cache holds every prompt token"),
    "first position's logits": (_greedy_with(_first_position), "the first new token must come from the logits of the "
                                                               "*last* prompt position, logits[:, -1]"),
    "no cache": (greedy_no_cache, "model call 1 has no cache: pass `cache=cache` so the keys and values are stored "
                                  "and reused"),
    "whole prefix into the cache": (greedy_prefix_into_cache,
                                    "the KV cache overflowed: after the prompt, feed only the new token, model(token, "
                                    "cache=cache) with token of shape (B, 1)"),
    "cache, then the whole prefix": (greedy_cache_then_prefix,
                                     "model call 2 has no cache: pass `cache=cache` so the keys and values are stored "
                                     "and reused"),
    "new tokens only": (greedy_new_tokens_only, "you returned only the 10 new tokens: return the prompt followed by "
                                                "them, (B, T + max_new_tokens) = (2, 14)"),
    "float tokens": (greedy_float, "greedy tokens has dtype torch.float32, expected integers (torch.int64), e.g. "
                                   "token ids"),
    "second-to-last position, no cache": (greedy_second_to_last_no_cache,
                                          "model call 1 has no cache: pass `cache=cache` so the keys and values are "
                                          "stored and reused"),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- filters


def top_k_scatter(logits, k):  # alternative: scatter the top-k values into a row of -inf
    values, index = logits.topk(k, -1)
    return torch.full_like(logits, INF).scatter(-1, index, values)


def top_k_in_place(logits, k):
    kth = logits.topk(k, -1).values[..., -1:]
    logits[logits < kth] = INF
    return logits


def _kth(logits, k):
    return logits.topk(k, -1).values[..., -1:]


TOP_K_MISTAKES = {
    "in place": (top_k_in_place, "you modified logits in place: use masked_fill (not masked_fill_ or logits[...] = "
                                 "...): the caller still needs its logits"),
    "0 instead of -inf": (lambda lg, k: lg.masked_fill(lg < _kth(lg, k), 0.0),
                          "removed logits must be -inf, not 0: a logit of 0 still gets probability > 0 after the "
                          "softmax"),
    "top-k values only": (lambda lg, k: lg.topk(k, -1).values,
                          "top_k_filter returned shape (2, 2): return all V = 5 logits of each row in their original "
                          "order, with -inf for the removed ones"),
    "<= removes the k-th": (lambda lg, k: lg.masked_fill(lg <= _kth(lg, k), INF),
                            "top_k_filter(k=2) keeps 1 token in row 0: it should keep exactly the k = 2 largest"),
    "k + 1": (lambda lg, k: G.top_k_filter(lg, k + 1),
              "top_k_filter(k=2) keeps 3 tokens in row 0: it should keep exactly the k = 2 largest"),
    "over the whole batch": (lambda lg, k: lg.masked_fill(lg < lg.flatten().topk(k).values[-1], INF),
                             "top_k_filter(k=2) keeps 1 token in row 0: it should keep exactly the k = 2 largest"),
    "probabilities": (lambda lg, k: G.top_k_filter(lg, k).softmax(-1),
                      "those are probabilities: return the filtered *logits* (the softmax comes later, when "
                      "sampling)"),
}  # fmt: skip


def _top_p_with(remove_rule, keep_top=False, scatter=True):
    def run(logits, p):
        s, order = logits.sort(-1, descending=True)
        probs = s.softmax(-1)
        remove = remove_rule(probs, p)
        if keep_top:
            remove[..., 0] = False
        if not scatter:
            return s.masked_fill(remove, INF)
        return logits.masked_fill(remove.scatter(-1, order, remove), INF)

    return run


def top_p_transformers_style(logits, p):  # alternative: ascending sort, remove the tail holding <= 1 - p
    s, order = logits.sort(-1)
    remove = s.softmax(-1).cumsum(-1) <= 1 - p
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), INF)


def top_p_shifted(logits, p):  # alternative: cumsum > p, shifted right by one
    s, order = logits.sort(-1, descending=True)
    remove = s.softmax(-1).cumsum(-1) > p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), INF)


def top_p_in_place(logits, p):
    s, order = logits.sort(-1, descending=True)
    probs = s.softmax(-1)
    remove = probs.cumsum(-1) - probs >= p
    logits[remove.scatter(-1, order, remove)] = INF
    return logits


def top_p_drops_top(logits, p):
    out = G.top_p_filter(logits, p)
    return out.scatter(1, logits.argmax(-1, keepdim=True), INF) if p < 0.05 else out


_CROSSING = ("you removed the token that takes the total past p: keep it (remove a token only when the tokens ranked "
             "above it already hold p)")  # fmt: skip
TOP_P_MISTAKES = {
    "cumsum >= p": (_top_p_with(lambda probs, p: probs.cumsum(-1) >= p), _CROSSING),
    "cumsum > p, top kept": (_top_p_with(lambda probs, p: probs.cumsum(-1) > p, keep_top=True), _CROSSING),
    "sorted order": (_top_p_with(lambda probs, p: probs.cumsum(-1) - probs >= p, scatter=False),
                     "the result is in sorted order: scatter the mask back to each token's original position"),
    "in place": (top_p_in_place, "you modified logits in place: use masked_fill (not masked_fill_ or logits[...] = "
                                 "...): the caller still needs its logits"),
    "0 instead of -inf": (lambda lg, p: G.top_p_filter(lg, p).nan_to_num(neginf=0.0),
                          "removed logits must be -inf, not 0: a logit of 0 still gets probability > 0 after the "
                          "softmax"),
    "drops the top token": (top_p_drops_top, "the most likely token must always survive, even for a tiny p"),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- tests

CASES = {  # exercise -> (reference, correct alternatives, planted mistakes)
    "embed": (embed_ok, [embed_indexing_in_place_add, lambda m, ids, pos: m.embed(ids, pos)], EMBED_MISTAKES),
    "block_forward": (block_ok, [block_tanh_formula, lambda b, x: b(x)], BLOCK_MISTAKES),
    "logits_from_hidden": (head_ok, [*HEAD_ALTERNATIVES, lambda m, h: m.head(h)], HEAD_MISTAKES),
    "greedy": (greedy_ok, [greedy_preallocated, greedy_ok.__wrapped__], GREEDY_MISTAKES),  # ... without no_grad
    "top_k_filter": (G.top_k_filter, [top_k_scatter], TOP_K_MISTAKES),
    "top_p_filter": (G.top_p_filter, [top_p_transformers_style, top_p_shifted], TOP_P_MISTAKES),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_and_alternatives_pass_stub_is_not_implemented(name):
    reference, alternatives, _ = CASES[name]
    run = getattr(check, name)
    for fn in [reference, *alternatives]:
        assert_passes(run(fn), name)
    assert_mistake_line(run(stub), name, NOT_YET)


@pytest.mark.parametrize("name, mistake", [(n, m) for n, (_, _, ms) in CASES.items() for m in ms])
def test_each_planted_mistake_gets_its_line(name, mistake):
    fn, message = CASES[name][2][mistake]
    assert_mistake_line(getattr(check, name)(fn), name, message)


def test_greedy_check_leaves_the_students_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check.greedy(_greedy_with(_sample))
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------------------------------------- test model


@torch.no_grad()
def _path(model, ids, n, context):
    """Greedy tokens when each step sees only `context(ids)` of the sequence so far."""
    for _ in range(n):
        ids = torch.cat([ids, model(context(ids))[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_the_greedy_check_model_makes_decoding_mistakes_visible():
    """On the check's model, the tokens themselves (not only the call pattern) expose each decoding mistake: the next
    token depends on the whole prefix, and sampling rarely picks the argmax."""
    model, ids = check._test_model(), check._ids(B=2, T=4, seed=4)
    full = _path(model, ids, 10, lambda s: s)
    assert len(set(full[:, 4:].flatten().tolist())) >= 8  # it wanders: no single repeated token
    newest_only = _path(model, ids, 10, lambda s: s[:, -1:])  # a fresh cache per step sees one token
    assert (newest_only[:, 4:] != full[:, 4:]).sum() >= 10
    last_prompt = greedy_last_prompt_token(model, ids, 10)  # the cache never holds the earlier prompt tokens
    assert (last_prompt[:, 4:] != full[:, 4:]).sum() >= 10
    with torch.random.fork_rng():
        for seed in range(3):
            torch.manual_seed(seed)
            assert (_greedy_with(_sample)(model, ids, 10)[:, 4:] != full[:, 4:]).sum() >= 5
    with torch.no_grad():  # argmax margins wide enough that cached and uncached runs cannot disagree
        logits = torch.stack([model(full[:, : 4 + i])[:, -1] for i in range(10)])
        top2 = logits.topk(2, -1).values
        assert (top2[..., 0] - top2[..., 1]).min() > 1e-2


def test_block_check_inputs_separate_erf_and_tanh_gelu_by_ten_times_the_tolerance():
    block = check._test_model().transformer.h[0]
    x = 2.0 * torch.randn(2, 7, check.C, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = x + block.attn(block.ln_1(x))
        pre = block.mlp.c_fc(block.ln_2(h))
        gap = (block.mlp.c_proj(F.gelu(pre)) - block.mlp.c_proj(F.gelu(pre, approximate="tanh"))).abs().max()
    assert gap > 10 * 1e-5


# ----------------------------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return pair(tmp_path_factory.mktemp("c"), seed=0, vocab_size=101)  # small vocabulary: fast


def test_parity_check_reference_does_not_use_the_library_positions(models, monkeypatch):
    """A left-padding bug in position_ids_from_mask (positions 0..T-1 over the padding) must fail the parity check,
    labelled as a padding failure because the unpadded rows still agree."""
    import gpt2lab.model as model_module

    ref, ours = models
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(16))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    assert check.gpt2_matches_transformers(ours, ref, ids, mask)
    monkeypatch.setattr(model_module, "position_ids_from_mask",
                        lambda m: torch.arange(m.shape[1]).expand(m.shape[0], -1))  # fmt: skip
    result = str(check.gpt2_matches_transformers(ours, ref, ids, mask))
    assert result.startswith("✗ gpt2_matches_transformers: logits on the real tokens of the left-padded batch["), result


def test_parity_check_labels_padding_only_when_padding_failed(models):
    ref, ours = models
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(16))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    broken = type(ours)(ours.config).eval()
    broken.load_state_dict(ours.state_dict())
    with torch.no_grad():
        broken.transformer.h[1].ln_2.bias.add_(0.01)  # wrong everywhere, padded or not
    result = str(check.gpt2_matches_transformers(broken, ref, ids, mask))
    assert result.startswith("✗ gpt2_matches_transformers: logits of row 0 alone (no padding)["), result
    assert "padded batch" not in result
