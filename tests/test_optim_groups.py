"""gpt2lab.optim.decay_groups: no weight decay on biases, norms and embeddings, decided by name and module type
(without knowing GPT-2), checked by name on GPT-2 and on a plain torch model, and used by torch's AdamW."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.optim import AdamW, decay_groups, no_decay


def names(group):
    return sorted(name for name, _ in group["params"])


def test_gpt2_groups_by_name():
    model = GPT2(GPT2Config.tiny(n_layer=2, vocab_size=100, n_positions=16, n_embd=32))
    decayed, exempt = decay_groups(model, weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert names(decayed) == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    for i in range(2):
        expected |= {f"transformer.h.{i}.{m}" for m in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                                        "attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias",
                                                        "mlp.c_proj.bias")}
    assert names(exempt) == sorted(expected)  # the tied head is wte: listed once, not decayed
    every = {id(p) for p in model.parameters()}
    assert {id(p) for g in (decayed, exempt) for _, p in g["params"]} == every


def test_rules_on_a_model_that_is_not_gpt2():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4),
                           "conv": nn.Conv1d(4, 4, 3), "rms": nn.RMSNorm(4)})
    model.register_parameter("scale", nn.Parameter(torch.ones(4)))  # 1-D but not called bias
    assert no_decay(model) == {"emb.weight", "proj.bias", "norm.weight", "norm.bias", "conv.bias", "rms.weight",
                               "scale"}
    model["proj"].weight.requires_grad_(False)  # frozen: in no group
    decayed, exempt = decay_groups(model, 0.01, lr=1e-3)
    assert names(decayed) == ["conv.weight"] and decayed["lr"] == exempt["lr"] == 1e-3


def test_groups_feed_torch_and_our_adamw_with_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 10))
    twin = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 10))
    twin.load_state_dict(model.state_dict())
    ours = AdamW(decay_groups(model, 0.5), lr=0.1)
    theirs = torch.optim.AdamW(decay_groups(twin, 0.5), lr=0.1)
    assert ours.param_groups[0]["param_names"] == ["1.weight", "3.weight"]  # torch keeps the names
    x = torch.randint(0, 10, (4, 3))
    for net, opt in ((model, ours), (twin, theirs)):
        for _ in range(3):
            opt.zero_grad()
            net(x).logsumexp(-1).mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # decay really applied to group 0 only: a zero-gradient step shrinks 1.weight and leaves the embedding alone
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    plain = AdamW(decay_groups(model, 0.5), lr=0.1)
    plain.step()
    assert torch.allclose(model[1].weight, before["1.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(model[0].weight, before["0.weight"])


def test_optim_does_not_import_gpt2():
    code = "import sys, gpt2lab.optim; print('gpt2lab.model' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
