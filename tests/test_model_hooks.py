"""Modules honoured in training as in eval: hooks fire on every submodule, replaced submodules take effect, and the
tied-weight speed path (row-sparse embedding gradient + dense head gradient) gives the gradients of plain autograd
and of transformers. Tiny random models only (no network)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn
from tiny_gpt2 import pair

from gpt2lab.model import GPT2, GPT2Config, KVCache, hf_key_map, lm_loss

V = 97


def _model(seed=0, **kw) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config.tiny(vocab_size=V, n_positions=16, **kw))


def _ids(seed=1, B=2, T=9, vocab=V):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class Scaled(nn.Module):
    """A wrapper around a submodule with its own learnable parameter: out = inner(x) * scale."""

    def __init__(self, inner: nn.Module, scale: float = 1.5):
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return self.inner(x) * self.scale


def _count_hooks(model) -> tuple[Counter, list]:
    calls = Counter()
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: calls.update([("pre", name)])))
        handles.append(module.register_forward_hook(lambda m, a, o, name=name: calls.update([("post", name)])))
    return calls, handles


def test_hooks_fire_on_every_submodule_in_training_as_in_eval():
    model = _model()
    ids = _ids()
    calls, handles = _count_hooks(model)
    model.eval()
    with torch.no_grad():
        model(ids)
    in_eval = Counter(calls)
    calls.clear()
    model.train()
    lm_loss(model(ids), ids).backward()  # gradients on: the path that used to bypass wte and lm_head
    in_training = Counter(calls)
    for h in handles:
        h.remove()
    assert in_training == in_eval
    names = {name for _, name in in_eval}
    assert {"transformer.wte", "lm_head", "transformer.ln_f", "transformer.h.1.attn.c_attn"} <= names
    assert all(n == 1 for n in in_eval.values()), "each submodule is called once per forward"
    assert names == {name for name, _ in model.named_modules()} - {"transformer", "transformer.h"}  # containers


def test_head_and_hidden_states_call_the_modules():
    model = _model()
    ids = _ids()
    calls, handles = _count_hooks(model)
    hidden = model.hidden_states(ids)
    assert calls[("post", "transformer.wte")] == 1 and calls[("post", "lm_head")] == 0
    model.head(hidden)
    assert calls[("post", "lm_head")] == 1
    for h in handles:
        h.remove()


@pytest.mark.parametrize(
    "path", ["lm_head", "transformer.wte", "transformer.h.0.attn.c_attn", "transformer.ln_f", "transformer.h.1.mlp"]
)
def test_replaced_submodule_takes_effect_in_training(path):
    model = _model()
    ids = _ids()
    model.train()
    before = model(ids).detach()
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapper = Scaled(getattr(parent, child))
    setattr(parent, child, wrapper)
    logits = model(ids)
    assert (logits - before).abs().max() > 1e-3, f"replacing {path} changed nothing in training"
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids), logits, atol=1e-6), "training and eval (no dropout) should agree"
    lm_loss(logits, ids).backward()
    assert wrapper.scale.grad is not None and wrapper.scale.grad.abs() > 0, f"no gradient reached the {path} wrapper"
    assert all(g.layout == torch.strided for g in _grads(model).values()), "every .grad is a dense tensor"
    assert KVCache.for_model(model, batch_size=1, max_length=4).k[0].shape == (1, 4, 4, 16)  # works with a wrapper


def test_forward_hook_that_changes_the_embedding_takes_effect_in_training():
    """A regularizer may perturb the token embeddings with a hook (SMART-style): the perturbation must be used."""
    model = _model().train()
    ids = _ids()
    before = model(ids).detach()
    noise = 0.1 * torch.randn(ids.shape + (64,), generator=torch.Generator().manual_seed(2))  # (B, T, C)
    handle = model.transformer.wte.register_forward_hook(lambda m, a, out: out + noise)
    logits = model(ids)
    handle.remove()
    assert (logits - before).abs().max() > 1e-3


@pytest.mark.parametrize("replace", ["none", "lm_head", "wte", "both"])
def test_gradients_equal_transformers_in_training(tmp_path, replace):
    """Default modules (fast tied-weight path) and plain nn.Linear / nn.Embedding replacements sharing the weight all
    give transformers' gradients."""
    ref, ours = pair(tmp_path, seed=3, vocab_size=V)
    if replace in ("lm_head", "both"):
        plain = nn.Linear(64, V, bias=False)
        plain.weight = ours.transformer.wte.weight
        ours.lm_head = plain
    if replace in ("wte", "both"):
        plain = nn.Embedding(V, 64)
        plain.weight = ours.transformer.wte.weight
        ours.transformer.wte = plain
        ours.lm_head.weight = plain.weight
    ours.train()
    ref.train()
    ids = _ids(seed=4, B=3, T=11)
    loss = lm_loss(ours(ids), ids)
    ref_loss = lm_loss(ref(ids).logits, ids)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    for src, (dst, transpose) in hf_key_map(ours.config.n_layer).items():
        g_ref = ref_params["transformer." + src].grad
        g_ref = g_ref.t() if transpose else g_ref
        g = ours.get_parameter(dst).grad
        assert not g.is_sparse and g.layout == torch.strided
        assert (g - g_ref).abs().max().item() < 1e-5, src


def test_sparse_rows_trick_gives_the_plain_dense_gradient(monkeypatch):
    """The fast path (embedding sends only its rows, the head's dense gradient takes them in) is really taken, and
    .grad is the same dense tensor as with plain modules."""
    fast, plain = _model(seed=5), _model(seed=5)
    emb = nn.Embedding(V, 64)
    emb.weight = plain.transformer.wte.weight
    plain.transformer.wte = emb
    ids = _ids(seed=6)
    sparse_made = []
    real_sparse = torch.sparse_coo_tensor
    monkeypatch.setattr(torch, "sparse_coo_tensor", lambda *a, **k: sparse_made.append(1) or real_sparse(*a, **k))
    lm_loss(fast(ids), ids).backward()
    assert sparse_made, "the row-sparse gradient path was not used"
    lm_loss(plain(ids), ids).backward()
    g_fast, g_plain = _grads(fast), _grads(plain)
    assert g_fast.keys() == g_plain.keys()
    for n in g_fast:
        assert g_fast[n].layout == torch.strided, n
        assert (g_fast[n] - g_plain[n]).abs().max() < 1e-6, n
    lm_loss(fast(ids), ids).backward()  # accumulating into an existing .grad
    assert (fast.transformer.wte.weight.grad - 2 * g_plain["transformer.wte.weight"]).abs().max() < 1e-6


def test_dense_gradient_when_the_loss_skips_the_logits():
    """A loss built from a hooked hidden state (the logits unused) gets no head gradient: the embedding must then send
    an ordinary dense gradient, not sparse rows."""
    fast = _model(seed=7)
    ids = _ids(seed=8)
    seen = {}
    fast.transformer.ln_f.register_forward_hook(lambda m, a, out: seen.__setitem__("hidden", out))
    fast(ids)
    seen["hidden"].pow(2).mean().backward()
    g = fast.transformer.wte.weight.grad
    assert g.layout == torch.strided
    plain = _model(seed=7)
    plain.hidden_states(ids).pow(2).mean().backward()
    assert (g - plain.transformer.wte.weight.grad).abs().max() < 1e-6


def test_head_gradient_from_an_earlier_pass_is_not_counted():
    """retain_graph: a first backward that runs the head but not the embedding, then one that runs only the
    embedding. The second must not assume the head's dense gradient joins it."""
    model = _model(seed=9)
    ids = _ids(seed=10)
    seen = {}
    model.transformer.ln_f.register_forward_hook(lambda m, a, out: seen.__setitem__("hidden", out))
    loss = lm_loss(model(ids), ids)
    c_attn = model.transformer.h[1].attn.c_attn.weight
    loss.backward(inputs=[c_attn], retain_graph=True)  # the head's backward runs; the embedding's does not
    seen["hidden"].sum().backward(inputs=[model.transformer.wte.weight])
    assert model.transformer.wte.weight.grad.layout == torch.strided


def test_frozen_tied_weight_and_untied_head():
    model = _model(seed=11)
    ids = _ids(seed=12)
    model.transformer.wte.weight.requires_grad_(False)  # e.g. LoRA freezes the embeddings
    lm_loss(model(ids), ids).backward()
    assert model.transformer.wte.weight.grad is None
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    untied = _model(seed=11)
    untied.lm_head.weight = nn.Parameter(untied.transformer.wte.weight.detach().clone())  # a separate head matrix
    lm_loss(untied(ids), ids).backward()
    assert untied.lm_head.weight.grad.layout == torch.strided
    assert untied.transformer.wte.weight.grad.layout == torch.strided
    # the embedding's gradient alone is nonzero only on the looked-up rows
    unused = torch.ones(V, dtype=torch.bool)
    unused[ids.flatten()] = False
    assert untied.transformer.wte.weight.grad[unused].abs().max() == 0


def test_state_dict_keys_unchanged():
    model = _model()
    keys = list(model.state_dict())
    assert keys[0] == "transformer.wte.weight" and keys[-1] == "lm_head.weight"
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.transformer.wte, nn.Embedding)


def test_subclass_overriding_head_and_embed_is_used_in_training():
    """forward goes through `self.embed` and `self.head`, so a subclass that overrides them (with the public
    signatures) changes training as it changes eval."""

    class Shifted(GPT2):
        def embed(self, input_ids, position_ids, inputs_embeds=None):
            return super().embed(input_ids, position_ids, inputs_embeds) * 2

        def head(self, hidden):
            return super().head(hidden) + 1.0

    base, sub = _model(seed=13), Shifted(GPT2Config.tiny(vocab_size=V, n_positions=16))
    sub.load_state_dict(base.state_dict())
    ids = _ids(seed=14)
    with torch.no_grad():
        expected = sub.eval()(ids)
    logits = sub.train()(ids)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert (logits - base(ids)).abs().max() > 0.5
    lm_loss(logits, ids).backward()
    assert sub.transformer.wte.weight.grad.layout == torch.strided
