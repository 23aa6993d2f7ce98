"""gpt2lab.optim.lora_baselines: Scaled GD / Scaled AdamW against hand computations of ALGORITHMS.md §6.1 (and
torch's AdamW where the two agree), LoRA+'s groups against peft's create_loraplus_optimizer, exact resume."""

from __future__ import annotations

import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

from gpt2lab.lora import LoRALinear, add_lora
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.optim.adaprelora import LoRAOptimizerError, factor_update
from gpt2lab.optim.lora_baselines import LoRAPlus, ScaledAdamW, ScaledGD, lora_plus_groups, scaled_gradients
from gpt2lab.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def factors(m=7, n=5, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64) for s in ((m, r), (r, n), (m, n)))


def test_scaled_gradients_project_on_each_factor_separately():
    """s = 1, δ = 0, full rank: B ∇̃A = P_B G and ∇̃B A = G P_A; their sum counts P_B G P_A twice."""
    B, A, G = factors()
    gA, gB = scaled_gradients(A, B, B.T @ G, G @ A.T)
    PB = B @ torch.linalg.inv(B.T @ B) @ B.T
    PA = A.T @ torch.linalg.inv(A @ A.T) @ A
    torch.testing.assert_close(B @ gA, PB @ G, rtol=0, atol=1e-12)
    torch.testing.assert_close(gB @ A, G @ PA, rtol=0, atol=1e-12)
    # AdaPreLoRA with the identity metric removes exactly the double-counted overlap
    ones_m, ones_n = torch.ones(7, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    dA, dB = factor_update(A, B, B.T @ G, G @ A.T, ones_m, ones_n, delta_rel=0.0, delta_abs=0.0)
    torch.testing.assert_close(B @ gA + gB @ A - (B @ dA + dB @ A), PB @ G @ PA, rtol=0, atol=1e-12)


def test_scaled_gradients_damping_and_singular_fallback():
    B, A, G = factors(seed=1)
    gA, gB = scaled_gradients(A, B, B.T @ G, G @ A.T, delta=0.5)
    eye = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(gA, torch.linalg.inv(B.T @ B + 0.5 * eye) @ B.T @ G, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gB, G @ A.T @ torch.linalg.inv(A @ A.T + 0.5 * eye), rtol=1e-12, atol=1e-12)
    zero = torch.zeros_like(B)
    gA0, gB0 = scaled_gradients(A, zero, torch.ones_like(A), G @ A.T, delta=0.0)  # BᵀB = 0: the identity
    assert torch.equal(gA0, torch.ones_like(A)) and torch.isfinite(gB0).all()


def lora_layer(m=6, n=5, r=2, alpha=None, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(torch.nn.Linear(n, m, dtype=torch.float64), {"all": slice(0, m)}, rank=r, alpha=alpha)
    for t in (layer.weight, layer.bias):
        t.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B["all"].normal_()
    return layer


def batch(layer, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(8, layer.in_features, generator=g, dtype=torch.float64),
            torch.randn(8, layer.out_features, generator=g, dtype=torch.float64))


def test_scaled_gd_steps_by_hand():
    layer = lora_layer()
    lr, wd, delta = 0.1, 0.2, 1e-3
    opt = ScaledGD(torch.nn.Sequential(layer), lr=lr, weight_decay=wd, delta=delta)
    A, B = layer.lora_A["all"], layer.lora_B["all"]
    eye = torch.eye(2, dtype=torch.float64)
    for t in range(3):
        x, y = batch(layer, t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(layer(x), y).backward()
        A0, B0 = A.detach().clone(), B.detach().clone()
        expected_A = A0 * (1 - lr * wd) - lr * torch.linalg.inv(B0.T @ B0 + delta * eye) @ A.grad
        expected_B = B0 * (1 - lr * wd) - lr * B.grad @ torch.linalg.inv(A0 @ A0.T + delta * eye)
        opt.step()
        torch.testing.assert_close(A.detach(), expected_A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(B.detach(), expected_B, rtol=1e-12, atol=1e-12)


def test_scaled_gd_w_change_double_counts_the_overlap():
    """First-order W-change of Scaled GD is −lr·s²(P_B G + G P_A) (finite differences, s = 2)."""
    layer = lora_layer(alpha=4.0)  # s = 2
    s = layer.scale
    x, y = batch(layer, 0)
    out = layer(x)
    out.retain_grad()
    torch.nn.functional.mse_loss(out, y).backward()
    G = out.grad.T @ x  # (m, n)
    A, B = layer.lora_A["all"], layer.lora_B["all"]
    A0, B0 = A.detach().clone(), B.detach().clone()
    PB = B0 @ torch.linalg.inv(B0.T @ B0) @ B0.T
    PA = A0.T @ torch.linalg.inv(A0 @ A0.T) @ A0
    errors = []
    for lr in (1e-4, 1e-5):
        gA, gB = scaled_gradients(A0, B0, A.grad, B.grad)
        W_change = s * ((B0 - lr * gB) @ (A0 - lr * gA) - B0 @ A0)
        errors.append((W_change / -lr - s**2 * (PB @ G + G @ PA)).abs().max().item())
    assert errors[1] < 1e-4 and 5 < errors[0] / errors[1] < 20, errors


def test_scaled_adamw_two_steps_by_hand():
    layer = lora_layer(seed=2)
    lr, (b1, b2), eps, wd, delta = 1e-2, (0.9, 0.98), 1e-6, 0.1, 1e-4
    opt = ScaledAdamW(torch.nn.Sequential(layer), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, delta=delta)
    A, B = layer.lora_A["all"], layer.lora_B["all"]
    eye = torch.eye(2, dtype=torch.float64)
    moments = {"A": (0.0, 0.0), "B": (0.0, 0.0)}
    for t in (1, 2):
        x, y = batch(layer, t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(layer(x), y).backward()
        A0, B0 = A.detach().clone(), B.detach().clone()
        pre = {"A": torch.linalg.inv(B0.T @ B0 + delta * eye) @ A.grad,
               "B": B.grad @ torch.linalg.inv(A0 @ A0.T + delta * eye)}
        expected = {}
        for key, p0 in (("A", A0), ("B", B0)):
            m, v = moments[key]
            m, v = b1 * m + (1 - b1) * pre[key], b2 * v + (1 - b2) * pre[key] ** 2
            moments[key] = (m, v)
            step = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
            expected[key] = p0 - lr * wd * p0 - step * m / (v.sqrt() + eps)
        opt.step()
        torch.testing.assert_close(A.detach(), expected["A"], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(B.detach(), expected["B"], rtol=1e-12, atol=1e-13)


def tiny_lora_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = GPT2(GPT2Config.tiny(vocab_size=64, n_positions=48, n_embd=32, n_head=2, dropout=dropout))
    torch.manual_seed(1)
    return add_lora(model, rank=4, alpha=8, targets="q,v", dropout=dropout)


def test_scaled_adamw_other_parameters_are_torch_adamw_when_eps_is_negligible():
    """HF-style (ε added to the uncorrected √v) and torch's AdamW agree when ε is negligible (not 0: the A factors
    start with zero gradients, and 0/0 is NaN): the non-pair parameters' path."""
    model = tiny_lora_model()
    head = model.transformer.ln_f.weight.requires_grad_(True)
    opt = ScaledAdamW(model, lr=1e-2, betas=(0.9, 0.98), eps=1e-12, weight_decay=0.1)
    assert [g["kind"] for g in opt.param_groups] == ["lora_pairs", "plain"]
    copy = torch.nn.Parameter(head.detach().clone())
    ref = torch.optim.AdamW([copy], lr=1e-2, betas=(0.9, 0.98), eps=1e-12, weight_decay=0.1)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        opt.zero_grad()
        model(ids).square().mean().backward()
        copy.grad = head.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(head, copy, rtol=1e-6, atol=1e-7)


def test_scaled_adamw_survives_b_zero_at_init():
    model = tiny_lora_model()
    opt = ScaledAdamW(model, lr=1e-3, delta=0.0)  # the reference's undamped inverse: the identity at B = 0
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(ids).square().mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_lora_plus_groups_match_peft():
    model = tiny_lora_model()
    model.transformer.ln_f.weight.requires_grad_(True)  # a LayerNorm weight: peft puts 1-D tensors with B
    model.transformer.h[1].mlp.c_fc.bias.requires_grad_(True)  # a bias: B's lr, no decay
    model.transformer.h[1].mlp.c_proj.weight.requires_grad_(True)  # a matrix: A's group
    ours = lora_plus_groups(model, lr=2e-4, ratio=16.0, weight_decay=0.05)
    peft_opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16.0,
                                         loraplus_weight_decay=0.05)
    theirs = [g for g in peft_opt.param_groups if g["params"]]
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        assert [id(p) for _, p in a["params"]] == [id(p) for p in b["params"]]
        assert (a["lr"], a["weight_decay"]) == (b["lr"], b["weight_decay"])
    assert ours[1]["lr"] / ours[0]["lr"] == 16.0
    assert all("lora_B" in n for n, _ in ours[1]["params"] if n.endswith((".q", ".v")))
    opt = LoRAPlus(model, lr=2e-4, weight_decay=0.05)
    assert [g["lr"] for g in opt.param_groups] == [2e-4, 16 * 2e-4, 16 * 2e-4]


def test_one_line_errors():
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3))
    for make in (lambda: ScaledGD(plain, lr=0.1), lambda: ScaledAdamW(plain), lambda: LoRAPlus(plain, lr=0.1)):
        with pytest.raises(LoRAOptimizerError, match=r"^no LoRA \(A, B\) pairs found") as err:
            make()
        assert "\n" not in str(err.value)
    with pytest.raises(LoRAOptimizerError, match="ratio = lr_B / lr_A must be >= 1"):
        LoRAPlus(tiny_lora_model(), lr=1e-3, ratio=0.5)
    with pytest.raises(LoRAOptimizerError, match="ScaledAdamW: betas must be a pair"):
        ScaledAdamW(tiny_lora_model(), betas=(0.9,))


@pytest.mark.parametrize("make", [ScaledAdamW, LoRAPlus], ids=["ScaledAdamW", "LoRAPlus"])
def test_resume_through_train_is_exact(make, tmp_path):
    from test_train import ToyTask, assert_same_params, toy_config

    full = tiny_lora_model(dropout=0.1)
    train(full, ToyTask(), make, toy_config(tmp_path / "full", lr=1e-3, epochs=2, eval_every=None))

    def interrupt(loop):
        if loop.step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_lora_model(dropout=0.1), ToyTask(), make, toy_config(tmp_path / "cut", lr=1e-3, epochs=2,
                                                                          eval_every=None), callbacks=[interrupt])
    resumed = tiny_lora_model(dropout=0.1)
    record = train(resumed, ToyTask(), make, toy_config(tmp_path / "cut", lr=1e-3, epochs=2, eval_every=None,
                                                         resume=True))
    assert record["resumed_from_step"] == 4
    assert_same_params(full, resumed)
