"""gpt2lab.lora against peft (outputs and adapter gradients, targets qkv and all, within 1e-5 in fp32), the layer's
math for q,v (the delta sits in the q and v column blocks only), init, scale, dropout, merge/unmerge (bitwise
restore), adapter files and their errors, the module contract (hooks, .to, dtypes, state_dict), and training
through gpt2lab.train (checkpoints hold only the adapters; exact resume). No network: tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_gpt2 import pair
from tiny_tasks import ToyTask

from gpt2lab import lora
from gpt2lab.lora import LoRAError, LoRALinear, add_lora, lora_pairs, lora_state_dict, merge, unmerge
from gpt2lab.model import GPT2, GPT2Config, lm_loss
from gpt2lab.train import TrainConfig, train

ATOL = 1e-5
V = 1000  # vocabulary of the tiny models (smaller than GPT-2's: faster, same code paths)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed=0, **overrides) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config.tiny(vocab_size=V, n_positions=32, **overrides)).eval()


def ids(seed=1, B=2, T=11):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=3, std=0.2):
    """Nonzero adapters (B starts at zero, which would hide most mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_pairs(model):
            p.A.copy_(torch.randn(p.A.shape, generator=g) * std)
            p.B.copy_(torch.randn(p.B.shape, generator=g) * std)
    return model


def lora_names(model):
    return sorted(n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)


# ------------------------------------------------------------------------------------------------ parity with peft


@pytest.mark.parametrize("targets,peft_modules", [("qkv", ["c_attn"]), ("all", ["c_attn", "c_proj", "c_fc"])])
def test_outputs_and_adapter_gradients_match_peft(tmp_path, targets, peft_modules):
    import peft

    ref, ours = pair(tmp_path, seed=0, vocab_size=V)  # transformers GPT-2 (Conv1D) and ours, same weights
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=peft_modules, fan_in_fan_out=True,
                             lora_dropout=0.0, bias="none")  # fmt: skip
    ref = peft.get_peft_model(ref, config).eval()
    add_lora(ours, 4, alpha=12, targets=targets)
    theirs = dict(ref.named_parameters())
    pairs = lora_pairs(ours)
    assert len(pairs) == 2 * (1 if targets == "qkv" else 4)
    assert len([n for n, p in theirs.items() if p.requires_grad]) == 2 * len(pairs)
    g = torch.Generator().manual_seed(7)
    matched = []
    for p in pairs:  # the same nonzero values in both: peft's lora_A.weight is (r, in) and lora_B.weight (out, r) for
        module = p.name.rsplit(".", 1)[0]  # Conv1D layers too (fan_in_fan_out transposes only the base weight)
        A, B = (theirs[f"base_model.model.{module}.lora_{x}.default.weight"] for x in "AB")
        assert A.shape == p.A.shape and B.shape == p.B.shape and p.scale == ref.base_model.model.get_submodule(
            module).scaling["default"] == 3.0  # fmt: skip
        with torch.no_grad():
            for mine, other in ((p.A, A), (p.B, B)):
                value = torch.randn(mine.shape, generator=g) * 0.3
                mine.copy_(value)
                other.copy_(value)
        matched.append((p, A, B))
    x = ids(B=3, T=13)
    got, expected = ours(x), ref(input_ids=x).logits
    logits_err = (got - expected).abs().max().item()
    with torch.no_grad(), ref.disable_adapter():
        assert (got - ref(input_ids=x).logits).abs().max().item() > 1e-2  # the adapters do change the output
    lm_loss(got, x).backward()
    lm_loss(expected, x).backward()
    grad_err = max((mine.grad - other.grad).abs().max().item() for p, A, B in matched
                   for mine, other in ((p.A, A), (p.B, B)))  # fmt: skip
    assert min(t.grad.abs().max().item() for p, _, _ in matched for t in (p.A, p.B)) > 1e-4  # gradients not vacuous
    print(f"peft parity, targets={targets}: max |logits error| {logits_err:.2e}, max |adapter grad error| "
          f"{grad_err:.2e}")  # fmt: skip
    assert logits_err < ATOL and grad_err < ATOL


# ------------------------------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("targets", ["q,v", "qkv", "all", ("k", "fc", "mlp_out")])
def test_fresh_adapters_leave_the_logits_bit_for_bit(targets):
    model, x = tiny(), ids()
    with torch.no_grad():
        before = model(x)
        add_lora(model, 4, targets=targets)
        assert torch.equal(model(x), before)


def test_qv_delta_sits_only_in_the_q_and_v_column_blocks():
    model = tiny()
    C = model.config.n_embd
    attn = model.transformer.h[0].attn
    base_w, base_b = attn.c_attn.weight.detach().clone(), attn.c_attn.bias.detach().clone()
    randomize(add_lora(model, 3, alpha=5, targets="q,v"))
    layer = attn.c_attn
    assert isinstance(layer, LoRALinear) and list(layer.slices) == ["q", "v"]
    assert layer.slices == {"q": slice(0, C), "v": slice(2 * C, 3 * C)}
    x = torch.randn(2, 5, C)
    y = layer(x)
    y0 = F.linear(x, base_w, base_b)
    assert torch.equal(y[..., C : 2 * C], y0[..., C : 2 * C])  # k untouched, bit for bit
    s = 5 / 3
    for key, cols in layer.slices.items():  # q and v: the formula, written out
        expected = y0[..., cols] + s * x @ layer.lora_A[key].T @ layer.lora_B[key].T
        assert (y[..., cols] - expected).abs().max() < ATOL
        assert (y[..., cols] - y0[..., cols]).abs().max() > 1e-2
    dW = layer.delta_weight()  # (3C, C) in W coordinates
    assert torch.equal(dW[C : 2 * C], torch.zeros(C, C))
    assert (dW[:C] - s * layer.lora_B["q"] @ layer.lora_A["q"]).abs().max() < 1e-6
    merge(model)
    assert torch.equal(layer.weight[C : 2 * C], base_w[C : 2 * C])  # merging adds nothing to the k rows
    assert not torch.equal(layer.weight[:C], base_w[:C]) and not torch.equal(layer.weight[2 * C :], base_w[2 * C :])


def test_merge_matches_unmerged_and_unmerge_restores_bit_for_bit():
    model, x = tiny(), ids()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    randomize(add_lora(model, 4, alpha=8, targets="all", dropout=0.3)).eval()
    with torch.no_grad():
        unmerged = model(x)
        merge(model)
        merge(model)  # twice is once
        assert all(m.merged for _, m in lora.lora_modules(model))
        merged = model(x)
        assert (merged - unmerged).abs().max() < ATOL
        assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, originals["transformer.h.0.mlp.c_fc.weight"])
        unmerge(model)
        unmerge(model)
        for name, p in model.named_parameters():
            if name in originals:
                assert torch.equal(p, originals[name]), f"{name} not restored exactly"
        assert torch.equal(model(x), unmerged)
    assert "weight_before_merge" not in str(list(model.state_dict()))  # the copy is never saved


def test_merge_and_unmerge_in_bfloat16_restore_exactly():
    model = tiny().to(torch.bfloat16)
    w = model.transformer.h[1].attn.c_attn.weight.detach().clone()
    randomize(add_lora(model, 2, targets="q,v"))
    assert lora_pairs(model)[0].A.dtype == torch.bfloat16
    merge(model)
    unmerge(model)
    assert torch.equal(model.transformer.h[1].attn.c_attn.weight, w)


def test_doubling_alpha_doubles_the_delta_and_rslora_scale():
    x = torch.randn(3, 64)
    deltas = []
    for alpha in (3.0, 6.0):
        torch.manual_seed(0)
        layer = randomize_layer(LoRALinear(torch.nn.Linear(64, 48), {"all": slice(0, 48)}, rank=4, alpha=alpha))
        deltas.append(layer(x) - F.linear(x, layer.weight, layer.bias))
        assert layer.scale == alpha / 4
    assert (deltas[1] - 2 * deltas[0]).abs().max() < 1e-6 and deltas[0].abs().max() > 1e-2
    rs = LoRALinear(torch.nn.Linear(8, 8), {"all": slice(0, 8)}, rank=16, alpha=8, rslora=True)
    assert rs.scale == 8 / math.sqrt(16) == 2.0
    assert add_lora(tiny(), 9, targets="qkv", rslora=True).transformer.h[0].attn.c_attn.scale == 9 / 3
    assert add_lora(tiny(), 8).transformer.h[0].attn.c_attn.scale == 1.0  # alpha defaults to rank


def randomize_layer(layer, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in layer.slices:
            layer.lora_B[key].copy_(torch.randn(layer.lora_B[key].shape, generator=g))
    return layer


def test_dropout_acts_on_the_adapter_input_only_and_once():
    torch.manual_seed(0)
    layer = randomize_layer(LoRALinear(torch.nn.Linear(32, 24), {"all": slice(0, 24)}, rank=4, dropout=1.0))
    x = torch.randn(5, 32)
    base = F.linear(x, layer.weight, layer.bias)
    layer.train()
    assert torch.equal(layer(x), base)  # p = 1: the adapter path contributes exactly 0, the base path is intact
    layer.eval()
    assert (layer(x) - base).abs().max() > 1e-2
    torch.manual_seed(0)
    layer = randomize_layer(LoRALinear(torch.nn.Linear(32, 24), {"all": slice(0, 24)}, rank=4, dropout=0.5)).train()
    seen = []
    layer.lora_dropout.register_forward_hook(lambda m, inp, out: seen.append(out))
    y = layer(x)
    assert len(seen) == 1  # called once: a hook on lora_dropout sees x~
    x_tilde = seen[0]
    assert (x_tilde == 0).any() and not torch.equal(x_tilde, x)
    expected = base + layer.scale * x_tilde @ layer.lora_A["all"].T @ layer.lora_B["all"].T
    assert (y - expected).abs().max() < ATOL


def test_a_layer_built_directly_freezes_its_base_checks_its_settings_and_follows_autocast():
    base = torch.nn.Linear(16, 24)
    layer = randomize_layer(LoRALinear(base, {"q": slice(0, 8), "v": slice(16, 24)}, rank=2))
    assert layer.weight is base.weight and not base.weight.requires_grad and not base.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.q", "lora_A.v", "lora_B.q",
                                                                           "lora_B.v"]  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the untouched block's zeros follow the adapters' dtype
        assert layer(torch.randn(3, 16)).dtype == torch.bfloat16
    for kw, pattern in ((dict(rank=0), "rank must be a positive integer"), (dict(rank=2, dropout=-0.1), "dropout")):
        with pytest.raises(LoRAError, match=pattern):
            LoRALinear(torch.nn.Linear(4, 4), {"all": slice(0, 4)}, **kw)


def test_trainable_count_matches_the_formula_on_gpt2_small_shapes():
    for r, expected in ((4, 147_456), (8, 294_912)):
        with torch.device("meta"):  # shapes only: no memory, no time
            model = GPT2(GPT2Config.from_name("gpt2"))
        add_lora(model, r, targets="q,v")
        report = lora.parameter_report(model)
        assert report["trainable"] == expected == 12 * 2 * r * (768 + 768)
        assert report["total"] == 124_439_808 + expected  # gpt2's 124M (tied head counted once) + the factors
        assert report["fraction"] == expected / report["total"]
        assert str(report) == f"trainable parameters: {expected:,} of {report['total']:,} " \
                              f"({100 * report['fraction']:.3f}%)"  # fmt: skip


def test_init_kaiming_bound_b_zero_and_seeded():
    model = add_lora(tiny(), 8, targets="all")
    for p in lora_pairs(model):
        n = p.A.shape[1]
        assert p.A.abs().max() <= 1 / math.sqrt(n) and p.A.abs().max() > 0.8 / math.sqrt(n)  # U(-1/sqrt n, 1/sqrt n)
        assert p.A.std() > 0.4 / math.sqrt(n)  # spread over the interval, not a constant
        assert torch.equal(p.B, torch.zeros_like(p.B))
    torch.manual_seed(4)
    a = add_lora(tiny(), 2)
    torch.manual_seed(4)
    b = add_lora(tiny(), 2)
    assert all(torch.equal(p.A, q.A) for p, q in zip(lora_pairs(a), lora_pairs(b)))


def test_only_the_factors_require_grad_and_names_pair_up():
    model = add_lora(tiny(), 4, targets="q,v,fc")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == lora_names(model) and len(trainable) == 2 * 2 * 3
    assert "transformer.h.0.attn.c_attn.lora_A.q" in trainable and "transformer.h.1.mlp.c_fc.lora_B.all" in trainable
    pairs = lora_pairs(model)
    assert [p.name for p in pairs[:3]] == ["transformer.h.0.attn.c_attn.q", "transformer.h.0.attn.c_attn.v",
                                           "transformer.h.0.mlp.c_fc.all"]  # fmt: skip
    p = pairs[1]
    assert p.A.shape == (4, 64) and p.B.shape == (64, 4) and p.out_slice == slice(128, 192) and p.scale == 1.0
    assert p.module is model.transformer.h[0].attn.c_attn and p.A is p.module.lora_A["v"]
    assert pairs[2].B.shape == (256, 4) and pairs[2].out_slice == slice(0, 256)
    model.train()
    lm_loss(model(ids()), ids()).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


# --------------------------------------------------------------------------------------------- the module contract


def test_the_wrapper_is_a_module_state_dict_to_and_dtype():
    model = tiny()
    base_keys = list(model.state_dict())
    w = model.transformer.h[0].attn.c_attn.weight
    add_lora(model, 2, targets="q,v")
    layer = model.transformer.h[0].attn.c_attn
    assert layer.weight is w and isinstance(layer, torch.nn.Linear)  # the base's own Parameter, taken over
    keys = list(model.state_dict())
    assert [k for k in keys if "lora_" not in k] == base_keys  # base keys unchanged, in order
    assert sorted(k for k in keys if "lora_" in k) == lora_names(model)
    randomize(model)
    x = ids()
    with torch.no_grad():
        y = model(x)
        model.to(torch.float64)
        assert all(p.dtype == torch.float64 for p in model.parameters())
        assert (model(x).float() - y).abs().max() < 1e-4
        merge(model)
        assert layer.weight_before_merge.dtype == torch.float64
        model.to(torch.float32)  # the copy kept by merge follows .to()
        assert layer.weight_before_merge.dtype == torch.float32
        unmerge(model)
    fresh = add_lora(tiny(), 2, targets="q,v")
    fresh.load_state_dict(model.state_dict())  # the usual state_dict round trip
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_hooks_fire_on_the_wrapped_module_with_and_without_grad():
    model = randomize(add_lora(tiny(), 4, targets="q,v")).train()
    layer = model.transformer.h[1].attn.c_attn
    calls = []

    def zero_out(module, inputs, output):  # a forward hook that replaces the output must take effect
        calls.append(output.shape)
        return torch.zeros_like(output)

    x = ids()
    handle = layer.register_forward_hook(zero_out)
    seen = []
    layer.lora_dropout.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        hooked = model(x)
    lm_loss(model(x), x).backward()
    handle.remove()
    assert calls == [(2, 11, 192)] * 2 and seen == [(2, 11, 64)] * 2
    assert layer.lora_A["q"].grad is None  # its output was replaced by zeros: no path from the loss to it
    assert model.transformer.h[0].attn.c_attn.lora_A["q"].grad.abs().max() > 0
    with torch.no_grad():
        assert not torch.equal(hooked, model(x))


def test_lora_after_full_training_trains_only_the_adapters(tmp_path):
    model = tiny_train_model()
    train(model, ToyTask(), torch.optim.AdamW, toy_config(None, epochs=1))  # full fine-tuning first
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, 2, targets="q,v", dropout=0.1)
    record = train(model, ToyTask(), torch.optim.AdamW, toy_config(None, epochs=1, method="lora-r2-qv"))
    assert record["status"] == "completed"
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), f"{name} moved"
    assert all(p.B.abs().max() > 0 for p in lora_pairs(model))  # the wrappers were used and trained


# ------------------------------------------------------------------------------------------------- adapter files


def test_adapter_file_round_trip_into_a_plain_base_and_into_a_wrapped_one(tmp_path):
    model = randomize(add_lora(tiny(), 4, alpha=8, targets="q,v,attn_out", dropout=0.1)).eval()
    x = ids()
    with torch.no_grad():
        expected = model(x)
    path = lora.save_lora(model, tmp_path / "adapters.pt")
    state = lora_state_dict(model)
    assert sorted(k for k in state if k != lora.META_KEY) == lora_names(model)
    meta = state[lora.META_KEY]
    assert (meta["rank"], meta["alpha"], meta["targets"], meta["dropout"]) == (4, 8.0, ["q", "v", "attn_out"], 0.1)
    assert path.stat().st_size < 0.2 * sum(p.numel() * 4 for p in model.parameters())  # adapters only
    plain = tiny().eval()  # the same base, no adapters: load_lora adds them
    rng = torch.get_rng_state()
    lora.load_lora_file(plain, path)
    assert torch.equal(torch.get_rng_state(), rng)  # loading does not shift the global RNG
    wrapped = add_lora(tiny(), 4, alpha=8, targets="q,v,attn_out").eval()  # fresh random A: overwritten
    lora.load_lora(wrapped, state)
    merged = merge(randomize(add_lora(tiny(), 4, alpha=8, targets="q,v,attn_out"), seed=11)).eval()
    lora.load_lora(merged, state)  # loading into a merged model re-merges the loaded adapters
    with torch.no_grad():
        assert torch.equal(plain(x), expected) and torch.equal(wrapped(x), expected)
        assert (merged(x) - expected).abs().max() < ATOL and all(m.merged for _, m in lora.lora_modules(merged))
    assert lora_state_dict(merged)[lora.META_KEY]["base_fingerprint"] == meta["base_fingerprint"]  # as before merge


def test_adapter_file_errors_are_one_line(tmp_path):
    state = lora_state_dict(add_lora(tiny(), 4, targets="q,v"))
    cases = [
        (lambda: lora.load_lora(tiny(seed=1), state), r"trained on another base model \(fingerprint [0-9a-f]{16}, "
                                                      r"this model's is [0-9a-f]{16}\); load the same base weights"),
        (lambda: lora.load_lora(add_lora(tiny(), 8, targets="q,v"), state), r"adapter rank 4 does not match this "
                                                                            r"model's LoRA rank 8"),
        (lambda: lora.load_lora(add_lora(tiny(), 4, targets="qkv"), state),
         r"adapter targets \['q', 'v'\] does not match this model's LoRA targets \['qkv'\]"),
        (lambda: lora.load_lora(add_lora(tiny(), 4, alpha=2, targets="q,v"), state), r"adapter alpha 4.0 does not"),
        (lambda: lora.load_lora(tiny(), {"x": torch.zeros(1)}), r"not a LoRA adapter state \(no 'lora_meta' entry\)"),
        (lambda: lora.load_lora_file(tiny(), tmp_path / "nope.pt"), r"no adapter file at .*nope.pt; write one with"),
    ]  # fmt: skip
    for fn, pattern in cases:
        with pytest.raises(LoRAError, match=pattern) as err:
            fn()
        assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_bad_settings_are_one_line_errors_listing_the_choices():
    valid = "choose from q, k, v, qkv, attn_out, fc, mlp_out, all"
    cases = [
        (dict(rank=0), r"LoRA rank must be a positive integer \(1, 2, 4, 8, 16, ...\), not 0"),
        (dict(rank=-2), r"not -2"),
        (dict(rank=2.5), r"not 2.5"),
        (dict(targets="q,x"), rf"unknown LoRA target 'x'; {valid}$"),
        (dict(targets=["query"]), rf"unknown LoRA target 'query'; {valid}$"),
        (dict(targets=""), rf"no LoRA target given; {valid}"),
        (dict(targets="q,qkv"), r"adapt the fused q\|k\|v projection twice"),
        (dict(targets="all,v"), r"adapt the fused q\|k\|v projection twice"),
        (dict(dropout=1.5), r"dropout must be a probability in \[0, 1\], not 1.5"),
        (dict(alpha=0), r"alpha must be a positive number \(or None for alpha = rank\), not 0"),
    ]
    for kw, pattern in cases:
        model = tiny()
        with pytest.raises(LoRAError, match=pattern) as err:
            add_lora(model, **{"rank": 4, **kw})
        assert "\n" not in str(err.value)
        assert all(p.requires_grad for p in model.parameters()) and not lora.lora_modules(model)  # untouched
    with pytest.raises(LoRAError, match="already has LoRA adapters"):
        add_lora(add_lora(tiny(), 2), 2)
    with pytest.raises(LoRAError, match=r"no nn.Linear named \*.attn.c_attn in this model"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2)
    with pytest.raises(LoRAError, match="has no LoRA adapters; call gpt2lab.lora.add_lora"):
        lora_state_dict(tiny())
    assert lora.parse_targets("v, q") == ("q", "v") and lora.parse_targets(("all",)) == ("qkv", "attn_out", "fc",
                                                                                          "mlp_out")  # fmt: skip


def test_the_base_fingerprint_is_the_training_loops():
    from gpt2lab.runs import weights_fingerprint

    model = tiny()
    plain = lora.base_fingerprint(model)
    assert plain == weights_fingerprint(model.named_parameters()) == lora.weights_fingerprint(model.named_parameters())
    randomize(add_lora(model, 2, targets="all"))
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    assert lora.base_fingerprint(model) == plain == weights_fingerprint(frozen)  # what train() checks on resume
    merge(model)
    assert lora.base_fingerprint(model) == plain != weights_fingerprint(frozen)  # the base as it was before merging


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_factors_follow_the_base_and_merge_is_exact():
    cpu = randomize(add_lora(tiny(), 4, alpha=8, targets="q,v,fc"))
    x = ids()
    with torch.no_grad():
        expected = cpu(x)
    model = cpu.to("cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    with torch.no_grad():
        got = model(x.cuda())
        assert (got.cpu() - expected).abs().max() < 1e-4
        merge(model)
        assert (model(x.cuda()) - got).abs().max() < 1e-4
        unmerge(model)
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, w)
    fresh = add_lora(tiny().cuda(), 4, alpha=8, targets="q,v,fc")
    assert lora_pairs(fresh)[0].A.device.type == "cuda"
    lora.load_lora(fresh, lora_state_dict(model))
    with torch.no_grad():
        assert torch.equal(fresh(x.cuda()), model(x.cuda()))


# ---------------------------------------------------------------------------------------- training through the loop


def tiny_train_model(seed=0):
    torch.manual_seed(seed)  # dropout on in the base and the adapters: resume must restore the RNG too
    return GPT2(GPT2Config.tiny(vocab_size=64, n_positions=48, n_embd=32, n_head=2, dropout=0.1))


def lora_train_model(base_seed=0, lora_seed=0):
    model = tiny_train_model(base_seed)
    torch.manual_seed(lora_seed)
    return add_lora(model, 4, alpha=8, targets="q,v", dropout=0.1)


def toy_config(out_dir, **overrides):
    base = dict(epochs=3, batch_size=3, lr=3e-3, eval_every=3, checkpoint_every=2, method="lora-r4-qv",
                out_dir=None if out_dir is None else str(out_dir), run_name="toy", progress=False, log_every=1,
                schedule="linear", warmup_steps=2)  # fmt: skip
    base.update(overrides)
    return TrainConfig(**base)


def test_training_with_lora_checkpoints_only_the_adapters_and_resumes_exactly(tmp_path):
    full = lora_train_model()
    full_record = train(full, ToyTask(), torch.optim.AdamW, toy_config(tmp_path / "full"))
    assert full_record["evals"][-1]["dev_loss"] < full_record["evals"][0]["dev_loss"]

    def interrupt(loop):
        if loop.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(lora_train_model(), ToyTask(), torch.optim.AdamW, toy_config(tmp_path), callbacks=[interrupt])
    ckpt = torch.load(tmp_path / "toy" / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["step"] == 6
    assert sorted(ckpt["model"]) == lora_names(full)  # the adapters, nothing of the base
    resumed = lora_train_model(lora_seed=99)  # other initial A: the adapters must come from the checkpoint
    record = train(resumed, ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True))
    assert record["resumed_from_step"] == 6
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs after resuming"
    keys = ("evals", "epochs", "loss_log", "best_metric", "steps", "status")
    assert {k: record[k] for k in keys} == {k: full_record[k] for k in keys}
    with pytest.raises(ValueError, match=r"frozen base weights \(fingerprint"):  # another base is refused
        train(lora_train_model(base_seed=1), ToyTask(), torch.optim.AdamW, toy_config(tmp_path, resume=True))


# ------------------------------------------------------------------------------------------------------ benchmark


def test_bench_lora_tiny_runs(capsys):
    from gpt2lab.bench import __main__ as dispatcher

    assert dispatcher.main(["lora", "--tiny", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "full fine-tuning" in out and "r=1 " in out and "r=4 " in out
    assert "time ratio" in out and "memory ratio" in out
