"""Checks for notebook 02 (gpt2): the model's pieces, the loaded weights against transformers, and sampling.

Usage in the notebook: `from gpt2lab.checks import gpt2 as check`, then e.g. `check.embed(embed)`.

The exercise checks follow the rules in `gpt2lab.checks` (the package docstring): they run on `_test_model()`, a tiny
GPT-2 whose weights are scaled so that context matters and GELU's tanh and erf forms differ by ~7e-4 (a freshly
initialised tiny GPT-2 is in effect a bigram model); they pass the real input tensors and fail when one is modified;
the trained pieces (embed, block, head) are run with gradients, compared parameter by parameter; and a known mistake
gets its own ✗ hint. Only the public API of `GPT2` is used: forward, embed, head, hidden_states, KVCache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import generate as gen
from ..model import GPT2, GPT2Config
from .core import check, compare, compare_gradients, compare_with_hints, expect, gradients, untouched

V, C, N_POSITIONS = 101, 32, 48  # the test model: vocabulary, width, context (48 != C: a wpe head shows by shape)


def _test_model(seed: int = 4) -> GPT2:
    """A tiny GPT-2 (2 layers, 32 channels, 4 heads, vocabulary 101) whose next token depends on the whole prefix.

    At GPT-2's initialisation (std 0.02, residual projections smaller still) attention adds almost nothing to the
    residual stream, so greedy decoding only looks at the last token: a sampler, a fresh cache per step and a cache
    filled from the last prompt token alone all reproduce its greedy path. Here attention is sharp (q, k std 0.5) and
    writes into the stream with weight (c_proj std 0.5), MLP pre-activations are O(1) (where tanh and erf GELU part
    by ~7e-4), LayerNorms and biases are non-trivial so that a skipped piece shows. The token embedding (std 0.5) is
    large enough for confident predictions, small enough that a token does not simply predict itself (the tied head),
    so greedy paths wander instead of repeating one token and sampling differs from the argmax (top probability ~0.4).
    Seed 4 gives wide argmax margins (> 0.06) on the greedy check's prompt. tests/test_checks_gpt2.py proves that
    each of those decoding mistakes changes this model's greedy tokens.
    """
    with torch.random.fork_rng():  # seeded, leaving the student's random state as it was
        torch.manual_seed(seed)
        model = GPT2(GPT2Config.tiny(n_layer=2, n_embd=C, n_head=4, vocab_size=V, n_positions=N_POSITIONS)).eval()
        _scale_weights(model)
    return model


def _scale_weights(model: GPT2) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith(("attn.c_attn.weight", "attn.c_proj.weight")):
                p.normal_(0.0, 0.5)
            elif name.endswith("mlp.c_fc.weight"):
                p.normal_(0.0, 2.0 / math.sqrt(C))
            elif name.endswith("mlp.c_proj.weight"):
                p.normal_(0.0, 1.0 / math.sqrt(4 * C))
        model.transformer.wte.weight.normal_(0.0, 0.5)
        model.transformer.wpe.weight.normal_(0.0, 0.5)


def _ids(B=2, T=9, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _detached(got):
    return got.detach() if isinstance(got, torch.Tensor) else got


def _model_untouched(model):
    """`untouched` over every parameter of the model: the student's code must not write into the weights."""
    return untouched("the model's weights must stay as they are", **dict(model.named_parameters()))


# ----------------------------------------------------------------------------------------------------------- §2 embed


# three left-padded rows with 2, 0 and 3 pad tokens: each row has its own position ids (written out by hand)
_EMBED_POSITIONS = [[0, 0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 1, 2, 3, 4, 5]]


@check("embed")
def embed(fn):
    """fn(model, input_ids, position_ids) -> token embedding + position embedding, (B, T, C).

    Run with gradients on the real (not cloned) inputs of a left-padded batch whose rows have different pad counts.
    """
    model, ids = _test_model(), _ids(B=3)
    pos = torch.tensor(_EMBED_POSITIONS)
    wte, wpe = model.transformer.wte, model.transformer.wpe
    with untouched("position_ids and input_ids belong to the caller", input_ids=ids, position_ids=pos):
        with _model_untouched(model):
            got = fn(model, ids, pos)
    expect(got is not None, "embed returned None: did you forget to `return`?")
    shape = (3, 9, C)
    if isinstance(got, torch.Tensor) and tuple(got.shape) == (3, 9, 2 * C):
        expect(False, f"shape {tuple(got.shape)}: add the two embeddings, don't concatenate them (B, T, C) = {shape}")
    with torch.no_grad():
        expected = model.embed(ids, pos)
        mistakes = [
            ("only the token embedding: add the position embedding wpe(position_ids)", lambda: wte(ids)),
            ("you used positions 0..T-1 and ignored position_ids: use wpe(position_ids) (under left padding the "
             "real tokens start at position 0)", lambda: wte(ids) + wpe(torch.arange(9))[None]),
            ("every row got the positions of row 0: position_ids is (B, T), one row of positions per sequence",
             lambda: wte(ids) + wpe(pos[0])[None]),
            ("GPT-2 does not scale the token embedding by √C (the original Transformer did): just "
             "wte(input_ids) + wpe(position_ids)", lambda: wte(ids) * math.sqrt(C) + wpe(pos)),
        ]  # fmt: skip
        compare_with_hints("embeddings (3 left-padded rows with 2, 0 and 3 pads)", _detached(got), expected, 1e-6,
                           mistakes)  # fmt: skip
    params = {"transformer.wte.weight": wte.weight, "transformer.wpe.weight": wpe.weight}
    compare_gradients(gradients(got, params), gradients(model.embed(ids, pos), params), atol=1e-5)
    with torch.no_grad():  # positions shared by the whole batch, (1, T), as an unpadded batch passes them
        one = torch.arange(9)[None]
        compare("embeddings with (1, T) position_ids", fn(model, ids, one), model.embed(ids, one), atol=1e-6)
    return "wte(input_ids) + wpe(position_ids) matches, per-row left-padding positions and gradients included"


# ----------------------------------------------------------------------------------------------------------- §3 block


@check("block_forward")
def block_forward(fn):
    """fn(block, x) -> x + attn(ln_1(x)), then + mlp(ln_2(...)): the pre-LayerNorm block.

    x is a non-leaf tensor that requires grad, as inside a model being trained: writing into it (`x += ...`) is then
    allowed by autograd and caught here; the gradients of every block parameter and of x are compared.
    """
    block = _test_model().transformer.h[0]
    x_leaf = (2.0 * torch.randn(2, 7, C, generator=torch.Generator().manual_seed(2))).requires_grad_()
    x = x_leaf * 1.0  # (B, T, C), a non-leaf like a block's input in a model
    with untouched("write x = x + attn(ln_1(x)), not x += ...: the caller still needs its x", x=x):
        with _model_untouched(block):
            got = fn(block, x)
    expect(got is not None, "block_forward returned None: did you forget to `return`?")
    ln_1, attn, ln_2, mlp = block.ln_1, block.attn, block.ln_2, block.mlp

    def with_activation(act):  # the right block, but with another activation inside the MLP
        h = x + attn(ln_1(x))
        return h + mlp.c_proj(act(mlp.c_fc(ln_2(h))))

    with torch.no_grad():
        expected = block(x)
        h = x + attn(ln_1(x))
        mistakes = [
            ("that is post-LayerNorm: GPT-2 normalises *before* each sub-layer, x + attn(ln_1(x))",
             lambda: (lambda p: ln_2(p + mlp(p)))(ln_1(x + attn(x)))),
            ("the residual connection around attention is missing: x = x + attn(ln_1(x))",
             lambda: (lambda a: a + mlp(ln_2(a)))(attn(ln_1(x)))),
            ("the residual connection around the MLP is missing: x = x + mlp(ln_2(x))", lambda: mlp(ln_2(h))),
            ("the MLP's LayerNorm is ln_2, not ln_1: x + mlp(ln_2(x))", lambda: h + mlp(ln_1(h))),
            ("the MLP must see the stream after the attention residual: first x = x + attn(ln_1(x)), then "
             "x = x + mlp(ln_2(x)) with the new x (not both from the same input)", lambda: h + mlp(ln_2(x))),
            ("GELU: GPT-2 uses the tanh approximation, F.gelu(x, approximate=\"tanh\"); the exact (erf) GELU "
             "differs here by ~7e-4", lambda: with_activation(F.gelu)),
            ("ReLU: GPT-2's MLP uses GELU (tanh approximation), F.gelu(x, approximate=\"tanh\")",
             lambda: with_activation(F.relu)),
        ]  # fmt: skip
        compare_with_hints("block output", _detached(got), expected, 1e-5, mistakes)
    params = {"x": x_leaf, **{name: p for name, p in block.named_parameters()}}
    compare_gradients(gradients(got, params), gradients(block(x), params), atol=1e-4)
    return "pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) matches, gradients included"


# ----------------------------------------------------------------------------------------------------------- §4 head


def _untied(got, model) -> bool:
    """True when the output depends on parameters but no gradient from it reaches wte (a new, untied layer)."""
    with torch.enable_grad():
        return got.requires_grad and gradients(got, {"wte": model.transformer.wte.weight})["wte"] is None


@check("logits_from_hidden")
def logits_from_hidden(fn):
    """fn(model, hidden (B, T, C) after ln_f) -> logits (B, T, vocab) through the head tied to wte, with gradients."""
    model = _test_model()
    with torch.no_grad():  # the real final hidden states: they have been through ln_f already
        hidden_leaf = model.hidden_states(_ids(B=2, T=5, seed=3)).requires_grad_()
    hidden = hidden_leaf * 1.0  # (B, T, C), a non-leaf as in a model: writing into it is caught, not an autograd error
    with untouched("hidden belongs to the caller", hidden=hidden), _model_untouched(model):
        got = fn(model, hidden)
    expect(got is not None, "logits_from_hidden returned None: did you forget to `return`?")
    if isinstance(got, torch.Tensor) and tuple(got.shape) == (2, 5, N_POSITIONS):
        expect(False, "that used wpe (the position table): the head is tied to the token embedding wte")
    with torch.no_grad():
        expected = model.head(hidden)
        mistakes = [
            ("hidden has already been through ln_f: do not apply it again, just hidden @ wteᵀ",
             lambda: model.head(model.transformer.ln_f(hidden))),
            ("those are probabilities (a softmax over the vocabulary): return the logits, before any softmax",
             lambda: expected.softmax(-1)),
            ("those are log-probabilities (log_softmax): return the raw logits", lambda: expected.log_softmax(-1)),
            ("don't scale the logits: no 1/√C here (that is attention's scaling)",
             lambda: expected / math.sqrt(C)),
            ("your logits do not come from wte: the head is tied to the token embedding, hidden @ wteᵀ (no new "
             "layer)", lambda: _detached(got) if _untied(got, model) else None),
        ]  # fmt: skip
        compare_with_hints("logits", _detached(got), expected, 1e-5, mistakes)
    params = {"transformer.wte.weight": model.transformer.wte.weight, "hidden": hidden_leaf}
    compare_gradients(gradients(got, params), gradients(model.head(hidden), params), atol=1e-4)
    return "hidden @ wteᵀ gives the logits (B, T, vocab), and the gradient reaches wte"


# ----------------------------------------------------------------------------------------------------------- §5 parity


def _hand_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted by hand (real tokens from 0, padding 0): the reference must not use the library's
    position_ids_from_mask, which is part of what is being checked."""
    rows = []
    for row in attention_mask.tolist():
        seen, positions = 0, []
        for m in row:
            positions.append(max(seen - 1, 0) if not m else seen)
            seen += int(bool(m))
        rows.append(positions)
    return torch.tensor(rows)


@check("gpt2_matches_transformers")
def gpt2_matches_transformers(ours: GPT2, reference, input_ids, attention_mask=None, atol: float = 1e-5):
    """Our logits vs transformers' GPT2LMHeadModel on the same ids (real tokens only when padded).

    With a mask, each row is first compared alone without padding, so that a ✗ mentions padding only when the
    unpadded rows agree and the padded batch does not.
    """
    with torch.no_grad():
        if attention_mask is None:
            got = ours(input_ids)
            compare("logits", got, reference(input_ids).logits, atol=atol)
        else:
            for b in range(input_ids.shape[0]):
                alone = input_ids[b : b + 1, attention_mask[b].bool()]  # (1, real tokens of row b)
                compare(f"logits of row {b} alone (no padding)", ours(alone), reference(alone).logits, atol=atol)
            got = ours(input_ids, attention_mask)
            pos = _hand_positions(attention_mask)
            expected = reference(input_ids, attention_mask=attention_mask, position_ids=pos).logits
            real = attention_mask.bool()
            side = "left-" if bool((~real[:, 0]).any()) else "right-" if bool((~real[:, -1]).any()) else ""
            compare(f"logits on the real tokens of the {side}padded batch", got[real], expected[real], atol=atol)
    return f"logits equal transformers' GPT2LMHeadModel within {atol:g} ({got.shape[0]} x {got.shape[1]} tokens)"


# ------------------------------------------------------------------------------------------------------- §6 decoding


def _reference_greedy(model: GPT2, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy tokens the slow, obvious way (the whole prefix every step, no cache): independent of KVCache."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


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
    """fn(model, input_ids, max_new_tokens) -> prompt + greedy tokens, using the KV cache.

    On `_test_model()`, where every earlier token changes the next one. The model's calls are recorded (input
    shape, which cache), so that the hint names the call that went wrong: no cache, a new cache, the prompt not fed
    whole, or more than the new token fed after it. Two runs under different seeds tell sampling from argmax.
    """
    model, ids, n = _test_model(), _ids(B=2, T=4, seed=4), 10
    calls = []  # (input shape, cache object or None) of every model(...) call the student makes

    def record(module, args, kwargs):
        input_ids = args[0] if args else kwargs.get("input_ids")
        calls.append((tuple(input_ids.shape) if input_ids is not None else None, kwargs.get("cache")))

    def run(seed):
        calls.clear()
        hook = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.random.fork_rng(), torch.no_grad():  # seeded, and the student's own RNG left as it was
                torch.manual_seed(seed)
                return fn(model, ids, n)
        except ValueError as err:
            expect("KV cache is full" not in str(err), "the KV cache overflowed: after the prompt, feed only the new "
                                                       "token, model(token, cache=cache) with token of shape (B, 1)")
            raise
        finally:
            hook.remove()

    with untouched("input_ids belongs to the caller: build a new tensor with torch.cat", input_ids=ids):
        got = run(0)
    expect(got is not None, "greedy returned None: did you forget to `return`?")
    if isinstance(got, torch.Tensor) and tuple(got.shape) == (2, n):
        expect(False, f"you returned only the {n} new tokens: return the prompt followed by them, (B, T + "
                      f"max_new_tokens) = (2, {4 + n})")  # fmt: skip
    # how the model was called: the exercise is to use the cache, i.e. fill it with the prompt, then one token a step
    expect(len(calls) > 0, "greedy never called the model (call it as model(ids, cache=cache))")
    first_shape, cache = calls[0]
    expect(cache is not None, "model call 1 has no cache: pass `cache=cache` so the keys and values are stored and "
                              "reused")  # fmt: skip
    expect(first_shape == (2, 4), f"model call 1 got input of shape {first_shape}: feed the whole prompt first, "
                                  f"shape (B, T) = (2, 4), so that the cache holds every prompt token")  # fmt: skip
    for i, (shape, other) in enumerate(calls[1:], start=2):
        expect(other is not None, f"model call {i} has no cache: pass `cache=cache` so the keys and values are "
                                  f"stored and reused")  # fmt: skip
        expect(other is cache, f"model call {i} used a new KVCache: create one cache before the loop and pass that "
                               f"same cache every step (a fresh cache forgets the prompt and earlier tokens)")
        expect(shape == (2, 1), f"model call {i} got input of shape {shape}: after the prompt, feed only the new "
                                f"token, shape (B, 1) = (2, 1); the cache already holds the rest")  # fmt: skip
    expected = _reference_greedy(model, ids, n)
    if isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(expected.shape) and not torch.equal(got, expected):
        expect(torch.equal(got[:, :4], ids), "the first T = 4 columns must be the prompt, unchanged")
        again = run(1)
        expect(again is None or torch.equal(got, again), "two runs gave different tokens: greedy takes the argmax "
                                                         "of the last position's logits, it does not sample")
        with torch.no_grad():
            first_from = [model(ids)[:, t].argmax(-1) for t in range(4)]
        expect(not any(torch.equal(got[:, 4], f) for f in first_from[:-1]) or torch.equal(got[:, 4], first_from[-1]),
               "the first new token must come from the logits of the *last* prompt position, logits[:, -1]")
    compare("greedy tokens", got, expected)
    return f"greedy decoding with the KV cache (one new token per step) gives the same {n} tokens as the reference"


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


# ------------------------------------------------------------------------------------------------------- §7 sampling

_INF = float("-inf")
_ZERO_HINT = "removed logits must be -inf, not 0: a logit of 0 still gets probability > 0 after the softmax"
_PROBS_HINT = "those are probabilities: return the filtered *logits* (the softmax comes later, when sampling)"


def _filter_shape_and_kind(got, logits, name):
    """The mistakes a filter's output shows whatever its values: wrong shape, zeros for -inf, probabilities."""
    expect(got is not None, f"{name} returned None: did you forget to `return`?")
    if not isinstance(got, torch.Tensor):
        return
    if got.dim() == 2 and got.shape[0] == logits.shape[0] and got.shape[1] < logits.shape[1]:
        expect(False, f"{name} returned shape {tuple(got.shape)}: return all V = {logits.shape[1]} logits of each row "
                      f"in their original order, with -inf for the removed ones")  # fmt: skip
    if tuple(got.shape) == tuple(logits.shape) and got.is_floating_point():
        if bool((got >= 0).all()) and torch.allclose(got.sum(-1), torch.ones(got.shape[0]), atol=1e-4):
            expect(False, _PROBS_HINT)
        if bool(torch.isfinite(got).all()) and bool((got == 0).any()) and not bool((logits == 0).any()):
            expect(False, _ZERO_HINT)


@check("top_k_filter")
def top_k_filter(fn):
    """fn(logits (B, V), k) -> logits with all but the k largest per row set to -inf (the input left as it is)."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.5], [0.2, -1.0, 4.0, 1.0, 1.5]])  # per-row k-th values differ
    expected = {
        1: torch.tensor([[_INF, 3.0, _INF, _INF, _INF], [_INF, _INF, 4.0, _INF, _INF]]),
        2: torch.tensor([[_INF, 3.0, _INF, _INF, 2.5], [_INF, _INF, 4.0, _INF, 1.5]]),
        5: logits.clone(),
    }
    for k in (2, 1, 5):
        with untouched("use masked_fill (not masked_fill_ or logits[...] = ...): the caller still needs its logits",
                       logits=logits):  # fmt: skip
            got = fn(logits, k)
        _filter_shape_and_kind(got, logits, "top_k_filter")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(logits.shape):
            kept = torch.isfinite(got).sum(-1).tolist()
            for row, count in enumerate(kept):
                expect(count == k, f"top_k_filter(k={k}) keeps {count} token{'s' * (count != 1)} in row {row}: it "
                                   f"should keep exactly the k = {k} largest")  # fmt: skip
        compare(f"top_k_filter(k={k})", got, expected[k], atol=0)
    return "keeps the k largest logits per row, -inf elsewhere (k = 1, 2, 5), input untouched"


@check("top_p_filter")
def top_p_filter(fn):
    """fn(logits (B, V), p) -> nucleus filtering; the top token always survives (the input left as it is)."""
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.9, 0.04, 0.03, 0.03], [0.15, 0.1, 0.45, 0.3]])
    logits = probs.log()  # unsorted rows, so that the mask must be scattered back to the original order
    expected = logits.clone()  # p = 0.7: row 0 keeps 0.5 + 0.3; row 1 keeps 0.9 alone; row 2 keeps 0.45 + 0.3
    expected[0, [1, 3]] = _INF
    expected[1, 1:] = _INF
    expected[2, [0, 1]] = _INF
    hint = "use masked_fill (not masked_fill_ or logits[...] = ...): the caller still needs its logits"
    with untouched(hint, logits=logits):
        got = fn(logits, 0.7)
    _filter_shape_and_kind(got, logits, "top_p_filter")
    sorted_logits = logits.sort(-1, descending=True).values
    crossing = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)  # takes the total past p
    crossing_hint = ("you removed the token that takes the total past p: keep it (remove a token only when the tokens "
                     "ranked above it already hold p)")  # fmt: skip
    mistakes = [
        (crossing_hint, expected.masked_fill(crossing, _INF)),
        (crossing_hint, expected.masked_fill(crossing & (logits < logits.max(-1, keepdim=True).values), _INF)),
        ("the result is in sorted order: scatter the mask back to each token's original position",
         sorted_logits.masked_fill(torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool), _INF)),
    ]  # fmt: skip
    compare_with_hints("top_p_filter(p=0.7)", got, expected, 1e-6, mistakes)
    with untouched(hint, logits=logits):
        tiny = fn(logits, 0.01)
    expect(bool(torch.isfinite(tiny.gather(1, logits.argmax(-1, keepdim=True))).all())
           if isinstance(tiny, torch.Tensor) and tiny.shape == logits.shape else True,
           "the most likely token must always survive, even for a tiny p")  # fmt: skip
    top_only = torch.full_like(logits, _INF).scatter(1, logits.argmax(-1, keepdim=True), logits.max(-1, keepdim=True)
                                                     .values)  # fmt: skip
    compare("top_p_filter(p=0.01)", tiny, top_only, atol=1e-6)
    with untouched(hint, logits=logits):
        everything = fn(logits, 1.0)
    compare("top_p_filter(p=1.0) keeps everything", everything, logits, atol=1e-6)
    return "keeps the smallest set of top tokens with probability >= p (the top token always), input untouched"
