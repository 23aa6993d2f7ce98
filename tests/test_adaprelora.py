"""gpt2lab.optim.adaprelora: the closed form against brute-force weighted least squares and the golden example of
ALGORITHMS.md §5.11 (T5.1-T5.8), the Adafactor link against transformers' Adafactor, the statistics gathered by
hooks, the optimizer's modes, its O((m+n)·r) state (bytes counted) and exact resume through gpt2lab.train."""

from __future__ import annotations

import gc

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gpt2lab.lora import LoRALinear, add_lora, lora_pairs
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.optim import AdamW
from gpt2lab.optim.adaprelora import (
    AdaPreLoRA,
    AdaPreLoRAError,
    adafactor_statistics,
    damped,
    factor_update,
    preconditioner,
    tangent_change,
)
from gpt2lab.train import optimizer_state_bytes, train

EXACT = dict(delta_rel=0.0, delta_abs=0.0)  # the undamped formula


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def problem(m=7, n=5, r=2, seed=0):
    """Random full-rank factors, a gradient G and positive p, q (float64)."""
    g = torch.Generator().manual_seed(seed)
    B, A, G = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((m, r), (r, n), (m, n)))
    p = torch.rand(m, generator=g, dtype=torch.float64) + 0.2
    q = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    return A, B, G, p, q


def ours(A, B, G, p, q, **kw):
    return factor_update(A, B, B.T @ G, G @ A.T, p, q, **{**EXACT, **kw})


def brute_force_tangent(A, B, G, p, q):
    """argmin over vec(dA), vec(dB) of ||B dA + dB A - Z||_H, Z = G / (p q^T), by weighted lstsq; returns the
    minimiser's B dA + dB A (row-major vec: vec(B X) = (B ⊗ I) vec X, vec(Y A) = (I ⊗ Aᵀ) vec Y)."""
    m, r = B.shape
    n = A.shape[1]
    At = torch.empty(n, r, dtype=A.dtype).copy_(A.T)  # a fresh contiguous copy (kron refuses some transposed views)
    J = torch.cat([torch.kron(B, torch.eye(n, dtype=B.dtype)), torch.kron(torch.eye(m, dtype=B.dtype), At)], dim=1)
    w = torch.outer(p, q).reshape(-1).sqrt()  # sqrt of the H weights, row-major vec
    Z = (G / torch.outer(p, q)).reshape(-1)
    d = torch.linalg.lstsq(w[:, None] * J, w * Z, driver="gelsd").solution
    return (J @ d).reshape(m, n)


def projectors(A, B, p, q):
    """The H-orthogonal projectors as matrices: Π_B(X) = PB X, Π_A(X) = X PA."""
    P, Q = torch.diag(p), torch.diag(q)
    PB = B @ torch.linalg.inv(B.T @ P @ B) @ B.T @ P  # (m, m)
    PA = Q @ A.T @ torch.linalg.inv(A @ Q @ A.T) @ A  # (n, n)
    return PB, PA


# ---------------------------------------------------------------------------------------------- T5.1 projection


@pytest.mark.parametrize("m, n, r, seed", [(7, 5, 2, 0), (6, 9, 3, 1), (4, 4, 1, 2)])
def test_t5_1_equals_brute_force_weighted_least_squares(m, n, r, seed):
    A, B, G, p, q = problem(m, n, r, seed)
    dA, dB = ours(A, B, G, p, q)
    T = tangent_change(A, B, dA, dB)
    err = (T - brute_force_tangent(A, B, G, p, q)).abs().max().item()
    assert err < 1e-12, err
    PB, PA = projectors(A, B, p, q)
    Z = G / torch.outer(p, q)
    torch.testing.assert_close(T, PB @ Z + Z @ PA - PB @ Z @ PA, rtol=0, atol=1e-12)
    # the normal equations B^T P T Q = G_A and P T Q A^T = G_B
    P, Q = torch.diag(p), torch.diag(q)
    torch.testing.assert_close(B.T @ P @ T @ Q, B.T @ G, rtol=0, atol=1e-12)
    torch.testing.assert_close(P @ T @ Q @ A.T, G @ A.T, rtol=0, atol=1e-12)
    # and T is not Z itself: the projection does something
    assert (T - Z).abs().max() > 1e-2


def test_projectors_commute_and_are_idempotent():
    A, B, G, p, q = problem()
    PB, PA = projectors(A, B, p, q)
    Z = G / torch.outer(p, q)
    torch.testing.assert_close(PB @ PB, PB, rtol=0, atol=1e-12)
    torch.testing.assert_close(PA @ PA, PA, rtol=0, atol=1e-12)
    torch.testing.assert_close((PB @ Z) @ PA, PB @ (Z @ PA), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- T5.2 balance


def h_norm2(X, p, q):
    return (torch.outer(p, q) * X * X).sum()


def test_t5_2_balance_is_the_unique_minimiser():
    A, B, G, p, q = problem(seed=3)
    dA, dB = ours(A, B, G, p, q)
    r = A.shape[0]

    def phi(X):
        return h_norm2(B @ (dA - X @ A) - (dB + B @ X) @ A, p, q)

    X0 = torch.zeros(r, r, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(phi(X0), X0)
    assert grad.abs().max() < 1e-12, grad
    g = torch.Generator().manual_seed(4)
    T = tangent_change(A, B, dA, dB)
    for _ in range(5):
        X = torch.randn(r, r, generator=g, dtype=torch.float64) * 0.3
        assert phi(X) > phi(torch.zeros(r, r, dtype=torch.float64))
        torch.testing.assert_close(tangent_change(A, B, dA - X @ A, dB + B @ X), T, rtol=0, atol=1e-12)


def test_t5_2_balance_map_sends_the_alpha_0_member_to_ours():
    A, B, G, p, q = problem(seed=5)
    P, Q = torch.diag(p), torch.diag(q)
    MB, MA = B.T @ P @ B, A @ Q @ A.T
    C = B.T @ G @ A.T
    K = torch.linalg.inv(MB) @ C @ torch.linalg.inv(MA)
    dA0 = torch.linalg.inv(MB) @ B.T @ G @ torch.linalg.inv(Q)  # alpha = 0: the ScaledGD-like A
    dB0 = torch.linalg.inv(P) @ G @ A.T @ torch.linalg.inv(MA) - B @ K
    X = 0.5 * torch.linalg.inv(MB) @ B.T @ P @ (B @ dA0 - dB0 @ A) @ Q @ A.T @ torch.linalg.inv(MA)
    dA, dB = ours(A, B, G, p, q)
    torch.testing.assert_close(dA0 - X @ A, dA, rtol=0, atol=1e-12)
    torch.testing.assert_close(dB0 + B @ X, dB, rtol=0, atol=1e-12)


def test_coefficients_one_and_one_are_not_a_least_squares_solution():
    """The two ½ corrections must sum to 1: 1 and 1 gives T* − B K A (the ½ is not decoration)."""
    A, B, G, p, q = problem(seed=6)
    dA, dB = ours(A, B, G, p, q)
    P, Q = torch.diag(p), torch.diag(q)
    K = torch.linalg.inv(B.T @ P @ B) @ B.T @ G @ A.T @ torch.linalg.inv(A @ Q @ A.T)
    wrong = tangent_change(A, B, dA - 0.5 * K @ A, dB - 0.5 * B @ K)
    assert (wrong - brute_force_tangent(A, B, G, p, q)).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ T5.3 invariances


def test_t5_3_gauge_covariance():
    A, B, G, p, q = problem(seed=7)
    S = torch.tensor([[1.3, 0.4], [-0.2, 0.7]], dtype=torch.float64)
    dA, dB = ours(A, B, G, p, q)
    dA2, dB2 = ours(torch.linalg.solve(S, A), B @ S, G, p, q)
    torch.testing.assert_close(dA2, torch.linalg.solve(S, dA), rtol=0, atol=1e-12)
    torch.testing.assert_close(dB2, dB @ S, rtol=0, atol=1e-12)
    torch.testing.assert_close(tangent_change(torch.linalg.solve(S, A), B @ S, dA2, dB2),
                               tangent_change(A, B, dA, dB), rtol=0, atol=1e-12)


def test_t5_3_only_the_product_p_q_matters():
    A, B, G, p, q = problem(seed=8)
    dA, dB = ours(A, B, G, p, q)
    dA2, dB2 = ours(A, B, G, 3.7 * p, q / 3.7)
    torch.testing.assert_close(dA2, dA, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(dB2, dB, rtol=1e-12, atol=1e-13)


def test_t5_3_gradient_scale_invariance_with_statistics_from_the_same_stream():
    A, B, G, _, _ = problem(seed=9)
    results = []
    for c in (1.0, 0.01, 250.0):
        row, col = adafactor_statistics(c * G, eps1=0.0)
        p, q = preconditioner(0.001 * row, 0.001 * col, step=1, beta2=0.999)  # one EMA step from zero
        results.append(ours(A, B, c * G, p, q))
    for dA, dB in results[1:]:
        torch.testing.assert_close(dA, results[0][0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(dB, results[0][1], rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------ T5.4 Adafactor link


def test_t5_4_preconditioned_direction_is_transformers_adafactor():
    """Z = G / (p q^T) is the step of transformers' Adafactor (first step, no clipping, no relative step)."""
    _, _, G, _, _ = problem(m=6, n=4, seed=10)
    theta = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.float64))
    theta.grad = G.clone()
    opt = transformers.optimization.Adafactor([theta], lr=1.0, eps=(1e-30, 1e-3), clip_threshold=1e30,
                                              scale_parameter=False, relative_step=False, warmup_init=False)
    opt.step()
    row, col = adafactor_statistics(G)
    beta2 = 0.999  # any: bias correction removes it at step 1, as Adafactor's β2_1 = 0 does
    p, q = preconditioner((1 - beta2) * row, (1 - beta2) * col, step=1, beta2=beta2)
    Z = G / torch.outer(p, q)
    torch.testing.assert_close(-theta.detach(), Z, rtol=1e-12, atol=1e-14)
    V = torch.outer(row, col) / row.sum()  # l c^T / ||l||_1
    torch.testing.assert_close(Z, G / V.sqrt(), rtol=1e-12, atol=1e-14)


def test_t5_4_identity_metric_gives_the_frobenius_tangent_projection():
    A, B, G, _, _ = problem(seed=11)
    one_m, one_n = torch.ones(B.shape[0], dtype=torch.float64), torch.ones(A.shape[1], dtype=torch.float64)
    T = tangent_change(A, B, *ours(A, B, G, one_m, one_n))
    PB = B @ torch.linalg.inv(B.T @ B) @ B.T
    PA = A.T @ torch.linalg.inv(A @ A.T) @ A
    torch.testing.assert_close(T, PB @ G + G @ PA - PB @ G @ PA, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ T5.5 init, damping


def test_t5_5_b_zero_with_damping_is_exact():
    A, B, G, p, q = problem(seed=12)
    B = torch.zeros_like(B)
    for kw, atol in ((dict(), 1e-5), (dict(delta_rel=0.0, delta_abs=1e-12), 1e-10)):
        dA, dB = factor_update(A, B, B.T @ G, G @ A.T, p, q, **kw)
        assert torch.equal(dA, torch.zeros_like(dA))  # G_A = 0 and C = 0 exactly
        _, PA = projectors(A, torch.eye(B.shape[0], B.shape[1], dtype=torch.float64), p, q)
        Z = G / torch.outer(p, q)
        torch.testing.assert_close(dB @ A, Z @ PA, rtol=atol, atol=atol)


def test_damping_formula():
    M = torch.tensor([[2.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    lam = 0.1 * 6.0 / 2 + 0.5
    torch.testing.assert_close(damped(M, 0.1, 0.5), M + lam * torch.eye(2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ T5.6 scale


def test_t5_6_scale_handling_makes_the_w_change_t_star():
    A, B, G, p, q = problem(seed=13)
    s = 2.5
    dA, dB = factor_update(A, B, s * B.T @ G, s * G @ A.T, p, q, scale=s, **EXACT)  # autograd's gradients
    T_star = brute_force_tangent(A, B, G, p, q)
    errors = []
    for eta in (1e-3, 1e-4):
        W_change = s * ((B - eta * dB) @ (A - eta * dA) - B @ A)
        errors.append((W_change / -eta - T_star).abs().max().item())
    assert errors[1] < 2e-3 and 7 < errors[0] / errors[1] < 13, errors  # error proportional to eta
    # without the s^-2 the W-change is s^2 times too large
    dA_raw, dB_raw = factor_update(A, B, s * B.T @ G, s * G @ A.T, p, q, scale=s, scale_invariant=False, **EXACT)
    torch.testing.assert_close(s * tangent_change(A, B, dA_raw, dB_raw), s**2 * T_star, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------ T5.7 golden


GOLDEN = dict(
    B=[[1.0], [2.0], [0.0]], A=[[1.0, -1.0]], G=[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]],
    ell=[1.0, 4.0, 2.0], c=[2.0, 5.0], p=[0.37796447, 0.75592895, 0.53452248], q=[1.41421356, 2.23606798],
    M_B=3.40168026, M_A=3.65028154, C=-3.0,
    dA=[[0.32867110, 0.40507251]], dB=[[0.84560871], [-0.48320498], [0.0]],
    T=[[1.17427981, -0.44053620], [0.17413722, 1.29335001], [0.0, 0.0]],
)


def golden_tensors():
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in GOLDEN.items()}


def test_t5_7_golden_example():
    g = golden_tensors()
    A, B, G = g["A"], g["B"], g["G"]
    row, col = adafactor_statistics(G)
    torch.testing.assert_close(row, g["ell"], rtol=0, atol=1e-12)
    torch.testing.assert_close(col, g["c"], rtol=0, atol=1e-12)
    p, q = preconditioner(0.1 * row, 0.1 * col, step=1, beta2=0.9)  # bias-corrected: beta is irrelevant
    torch.testing.assert_close(p, g["p"], rtol=0, atol=1e-8)
    torch.testing.assert_close(q, g["q"], rtol=0, atol=1e-8)
    assert abs((B.T @ torch.diag(p) @ B).item() - GOLDEN["M_B"]) < 1e-8
    assert abs((A @ torch.diag(q) @ A.T).item() - GOLDEN["M_A"]) < 1e-8
    assert (B.T @ G @ A.T).item() == GOLDEN["C"]
    dA, dB = ours(A, B, G, p, q)
    torch.testing.assert_close(dA, g["dA"], rtol=0, atol=1e-8)
    torch.testing.assert_close(dB, g["dB"], rtol=0, atol=1e-8)
    torch.testing.assert_close(tangent_change(A, B, dA, dB), g["T"], rtol=0, atol=1e-8)


def golden_layer(dtype=torch.float64):
    """A LoRALinear (3 outputs, 2 inputs, r = 1, s = 1) with the golden B, A, and a loss whose dL/dW is golden G."""
    g = golden_tensors()
    layer = LoRALinear(torch.nn.Linear(2, 3, dtype=dtype), {"all": slice(0, 3)}, rank=1)
    for t in (layer.weight, layer.bias):
        t.requires_grad_(False)
    with torch.no_grad():
        layer.lora_A["all"].copy_(g["A"])
        layer.lora_B["all"].copy_(g["B"])
    x = torch.eye(2, dtype=dtype)  # token t is e_t, so G[:, t] = dL/dy_t

    def loss():
        return (layer(x) * g["G"].T.to(dtype)).sum()

    return layer, loss


def test_t5_7_golden_example_through_the_optimizer():
    layer, loss = golden_layer()
    opt = AdaPreLoRA(torch.nn.Sequential(layer), lr=1e-2, mode="sgd", betas=(0.9, 0.5), **EXACT)
    A0, B0 = layer.lora_A["all"].detach().clone(), layer.lora_B["all"].detach().clone()
    loss().backward()
    opt.step()
    g = golden_tensors()
    torch.testing.assert_close((A0 - layer.lora_A["all"].detach()) / 1e-2, g["dA"], rtol=0, atol=1e-8)
    torch.testing.assert_close((B0 - layer.lora_B["all"].detach()) / 1e-2, g["dB"], rtol=0, atol=1e-8)
    state = opt.state[layer.lora_B["all"]]
    torch.testing.assert_close(state["row_sq"], 0.5 * g["ell"], rtol=0, atol=1e-12)  # (1 − β2)·ℓ
    torch.testing.assert_close(opt.state[layer.lora_A["all"]]["col_sq"], 0.5 * g["c"], rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------------- T5.8 memory of step()


class CreatedShapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def lora_layer(m=48, n=40, r=2, seed=0, dropout=0.0, alpha=None, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = LoRALinear(torch.nn.Linear(n, m, dtype=dtype), {"all": slice(0, m)}, rank=r, alpha=alpha,
                       dropout=dropout)
    for t in (layer.weight, layer.bias):
        t.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B["all"].normal_(0, 0.1)  # trained a little: B != 0
    return layer


def run_steps(layer, opt, steps, seed=1, tokens=12, clip=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(tokens, layer.in_features, generator=g, dtype=layer.weight.dtype)
        target = torch.randn(tokens, layer.out_features, generator=g, dtype=layer.weight.dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(layer(x), target).backward()
        if clip is not None:
            for p in layer.parameters():
                if p.grad is not None:
                    p.grad.mul_(clip)
        opt.step()


@pytest.mark.parametrize("mode", ["sgd", "factor_momentum", "scaled_adamw"])
def test_t5_8_step_makes_no_m_by_n_tensor_and_state_is_o_m_plus_n_r(mode):
    m, n, r = 48, 40, 2
    layer = lora_layer(m, n, r)
    opt = AdaPreLoRA(torch.nn.Sequential(layer), lr=1e-3, mode=mode)
    run_steps(layer, opt, 2)
    x = torch.randn(12, n)
    opt.zero_grad()
    layer(x).square().sum().backward()
    with CreatedShapes() as seen:
        opt.step()
    biggest = max(torch.Size(s).numel() for s in seen.shapes)
    assert (m, n) not in seen.shapes and biggest <= (m + n) * r, (biggest, sorted(set(seen.shapes)))
    # persistent state, in bytes: l (m) and c (n) and two step counts, plus the factor moments
    moments = {"sgd": 0, "factor_momentum": 1, "scaled_adamw": 2}[mode]
    expected = 4 * (m + n) + 2 * 4 + moments * 4 * r * (m + n)
    assert optimizer_state_bytes(opt) == expected
    adamw = AdamW(layer.parameters(), lr=1e-3)  # LoRA-AdamW: two moments per factor
    run_steps(layer, adamw, 1)
    assert optimizer_state_bytes(adamw) == 2 * 4 * r * (m + n) + 2 * 4
    assert optimizer_state_bytes(opt) - optimizer_state_bytes(adamw) == 4 * (m + n) + (moments - 2) * 4 * r * (m + n)


# ----------------------------------------------------------------------------------- statistics through hooks


@pytest.mark.parametrize("stats", ["transient", "gram"])
def test_hooks_gather_the_statistics_of_the_weight_gradient(stats):
    """With dropout on: G = δ^T x~ (x~ the dropped-out input), ∇A = s B^T G and ∇B = s G A^T (exactly as autograd)."""
    layer = lora_layer(m=9, n=7, r=3, dropout=0.5, alpha=6.0).double()
    layer.train()
    opt = AdaPreLoRA(torch.nn.Sequential(layer), lr=1e-3, stats=stats)
    seen = {}
    layer.lora_dropout.register_forward_hook(lambda mod, args, out: seen.update(x=out))
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    y = layer(x)
    y.retain_grad()
    (y.sin() * torch.arange(9.0)).sum().backward()
    G = y.grad.reshape(-1, 9).T @ seen["x"].reshape(-1, 7)  # (m, n)
    A, B = layer.lora_A["all"], layer.lora_B["all"]
    torch.testing.assert_close(A.grad, layer.scale * B.detach().T @ G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B.grad, layer.scale * G @ A.detach().T, rtol=1e-10, atol=1e-12)
    row, col, gat, passes = opt._stats.gathered[0]
    expected_row, expected_col = adafactor_statistics(G, eps1=0.0)
    assert row.dtype == torch.float64  # a float64 layer's statistics stay in float64 (float32 at least)
    torch.testing.assert_close(row, expected_row, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(col, expected_col, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gat, G @ A.detach().T, rtol=1e-10, atol=1e-12)
    assert passes == 1


def test_fused_layer_pairs_see_their_own_column_slices():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 9), {"q": slice(0, 3), "v": slice(6, 9)}, rank=2)
    model = torch.nn.Sequential(layer).requires_grad_(False)
    for pair in lora_pairs(model):
        pair.A.requires_grad_(True)
        pair.B.requires_grad_(True)
    opt = AdaPreLoRA(model, lr=1e-3)
    x = torch.randn(10, 6)
    y = model(x)
    y.retain_grad()
    (y.tanh() * torch.arange(9.0)).sum().backward()
    for i, pair in enumerate(lora_pairs(model)):
        G = y.grad[:, pair.out_slice].T @ x
        torch.testing.assert_close(opt._stats.gathered[i][0], (G * G).sum(1))
        torch.testing.assert_close(opt._stats.gathered[i][1], (G * G).sum(0))


def test_gradient_only_passes_are_ignored_and_zero_grad_clears():
    """torch.autograd.grad through the adapters (an adversarial inner step) adds nothing to the statistics."""
    layer = lora_layer(m=5, n=4, r=2)
    opt = AdaPreLoRA(torch.nn.Sequential(layer), lr=1e-3)
    x = torch.randn(6, 4, requires_grad=True)
    torch.autograd.grad(layer(x).square().sum(), x)
    assert opt._stats.gathered == {}
    layer(x.detach()).sum().backward()
    reference = [t.clone() for t in opt._stats.gathered[0][:3]]
    opt.zero_grad()
    assert opt._stats.gathered == {}
    torch.autograd.grad(layer(x).square().sum(), x)
    layer(x.detach()).sum().backward()
    for a, b in zip(opt._stats.gathered[0][:3], reference):
        assert torch.equal(a, b)


def test_a_second_backward_before_step_is_refused_in_one_line():
    layer = lora_layer(m=5, n=4, r=2)
    opt = AdaPreLoRA(torch.nn.Sequential(layer), lr=1e-3)
    x = torch.randn(6, 4)
    layer(x).sum().backward()
    layer(x).square().sum().backward()
    with pytest.raises(AdaPreLoRAError, match=r"^0\.all: 2 backward passes since the last step; .*no gradient "
                                              r"accumulation\)$"):
        opt.step()


def test_scaled_gradients_give_the_same_first_step():
    """Clipping (or a loss scaler) multiplies the factor gradients: the statistics follow (ρ), and by the scale
    invariance the first step does not change."""
    layers = [lora_layer(seed=3) for _ in range(2)]
    for layer, clip in zip(layers, (None, 0.05)):
        run_steps(layer, AdaPreLoRA(torch.nn.Sequential(layer), lr=1e-2, mode="sgd"), 1, clip=clip)
    for a, b in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_hooks_go_with_the_optimizer():
    layer = lora_layer()
    opt = AdaPreLoRA(torch.nn.Sequential(layer), lr=1e-3)
    assert layer._forward_hooks and layer.lora_dropout._forward_hooks
    del opt
    gc.collect()
    assert not layer._forward_hooks and not layer.lora_dropout._forward_hooks
    assert not layer.lora_B["all"]._post_accumulate_grad_hooks


def test_no_statistics_for_a_pair_with_gradients_is_an_error():
    layer = lora_layer()
    x = torch.randn(3, 40)
    loss = layer(x).sum()  # forward before the optimizer exists: no hooks saw it
    opt = AdaPreLoRA(torch.nn.Sequential(layer), lr=1e-3)
    loss.backward()
    with pytest.raises(AdaPreLoRAError, match="saw no backward pass through its module"):
        opt.step()


# ----------------------------------------------------------------------------------------------- the modes


def test_sgd_step_equals_the_functional_form_with_decay():
    layer = lora_layer(m=8, n=6, r=2, alpha=4.0).double()
    lr, wd, beta2 = 0.05, 0.3, 0.9
    opt = AdaPreLoRA(torch.nn.Sequential(layer), lr=lr, mode="sgd", betas=(0.0, beta2), weight_decay=wd)
    A, B = layer.lora_A["all"], layer.lora_B["all"]
    g = torch.Generator().manual_seed(0)
    ell, c = torch.zeros(8, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for t in range(1, 4):
        x = torch.randn(5, 6, generator=g, dtype=torch.float64)
        opt.zero_grad()
        y = layer(x)
        y.retain_grad()
        y.pow(3).sum().backward()
        G = y.grad.T @ x
        row, col = adafactor_statistics(G)
        ell, c = beta2 * ell + (1 - beta2) * row, beta2 * c + (1 - beta2) * col
        p, q = preconditioner(ell, c, t, beta2)
        dA, dB = factor_update(A.detach(), B.detach(), A.grad, B.grad, p, q, scale=2.0)
        expected = (A.detach() * (1 - lr * wd) - lr * dA, B.detach() * (1 - lr * wd) - lr * dB)
        opt.step()
        torch.testing.assert_close(A.detach(), expected[0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(B.detach(), expected[1], rtol=1e-9, atol=1e-11)


def test_factor_momentum_with_beta1_zero_is_algorithm_1_and_its_first_step_too():
    runs = {}
    for name, mode, beta1 in (("sgd", "sgd", 0.9), ("fm0", "factor_momentum", 0.0), ("fm", "factor_momentum", 0.9)):
        layer = lora_layer(seed=5).double()
        opt = AdaPreLoRA(torch.nn.Sequential(layer), lr=1e-2, mode=mode, betas=(beta1, 0.99))
        run_steps(layer, opt, 1)
        first = [p.detach().clone() for p in layer.parameters()]
        run_steps(layer, opt, 4, seed=2)
        runs[name] = first, [p.detach().clone() for p in layer.parameters()]
    for a, b, c in zip(runs["sgd"][0], runs["fm0"][0], runs["fm"][0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    for a, b in zip(runs["sgd"][1], runs["fm0"][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert any((a - c).abs().max() > 1e-4 for a, c in zip(runs["sgd"][1], runs["fm"][1]))  # momentum does act


def test_scaled_adamw_mode_first_step_is_adams_on_the_closed_form():
    layers = [lora_layer(seed=6).double() for _ in range(2)]
    lr, eps = 1e-2, 1e-8
    ref = AdaPreLoRA(torch.nn.Sequential(layers[0]), lr=1.0, mode="sgd")
    run_steps(layers[0], ref, 1)
    run_steps(layers[1], AdaPreLoRA(torch.nn.Sequential(layers[1]), lr=lr, mode="scaled_adamw", eps=eps), 1)
    start = lora_layer(seed=6).double()
    for p0, p_sgd, p_adam in zip(start.parameters(), layers[0].parameters(), layers[1].parameters()):
        if not p0.requires_grad:
            continue
        d = p0 - p_sgd  # the closed-form direction (lr 1)
        torch.testing.assert_close(p_adam, p0 - lr * d / (d.abs() + eps), rtol=1e-9, atol=1e-12)


def test_other_trainable_parameters_use_adamw():
    torch.manual_seed(0)
    model = add_lora(GPT2(GPT2Config.tiny(vocab_size=64, n_positions=16, n_embd=32, n_head=2)), rank=2)
    model.transformer.ln_f.weight.requires_grad_(True)
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(True)
    opt = AdaPreLoRA(model, lr=1e-2, other_weight_decay=0.1)
    kinds = [(g["kind"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    assert kinds == [("lora_pairs", 0.0, 8), ("adamw", 0.1, 1), ("adamw", 0.0, 1)]
    others = [model.transformer.h[0].mlp.c_fc.weight, model.transformer.ln_f.weight]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in others]
    ref = torch.optim.AdamW([{"params": copies[:1], "weight_decay": 0.1}, {"params": copies[1:], "weight_decay": 0.0}],
                            lr=1e-2)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        model(ids).square().mean().backward()
        for c, p in zip(copies, others):
            c.grad = p.grad.clone()
        opt.step()
        ref.step()
    for c, p in zip(copies, others):
        torch.testing.assert_close(p, c, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------- errors


def test_one_line_errors():
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(AdaPreLoRAError, match=r"^no LoRA \(A, B\) pairs found: add adapters first"):
        AdaPreLoRA(plain, lr=1e-3)
    layer = lora_layer()
    for kw, match in ((dict(mode="adam"), "mode must be one of sgd, scaled_adamw, factor_momentum"),
                      (dict(betas=(0.9, 1.0)), "betas must be a pair"), (dict(lr=-1.0), "lr must be >= 0"),
                      (dict(stats="full"), "stats must be one of transient, gram"),
                      (dict(weight_decay=-0.1), "weight_decay must be >= 0")):
        with pytest.raises(AdaPreLoRAError, match=match) as err:
            AdaPreLoRA(torch.nn.Sequential(layer), **{"lr": 1e-3, **kw})
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------- the loop


def tiny_lora_model(seed=0):
    torch.manual_seed(seed)
    model = GPT2(GPT2Config.tiny(vocab_size=64, n_positions=48, n_embd=32, n_head=2, dropout=0.1))
    torch.manual_seed(1)  # the same adapters whatever the base seed
    return add_lora(model, rank=4, alpha=8, targets="q,v", dropout=0.1)


def test_resume_through_train_is_exact(tmp_path):
    from test_train import ToyTask, assert_same_params, same_metrics, toy_config

    full = tiny_lora_model()
    full_record = train(full, ToyTask(), AdaPreLoRA, toy_config(tmp_path / "full", lr=1e-3))
    assert full_record["optimizer"]["name"] == "AdaPreLoRA"

    def interrupt(loop):
        if loop.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_lora_model(), ToyTask(), AdaPreLoRA, toy_config(tmp_path / "cut", lr=1e-3), callbacks=[interrupt])
    ckpt = torch.load(tmp_path / "cut" / "toy" / "checkpoint.pt", weights_only=False)
    kept = [s for s in ckpt["optimizer"]["state"].values() if "row_sq" in s or "col_sq" in s]
    assert len(kept) == 8 and all(s["step"].item() == 6 for s in kept)  # 2 layers × (q, v) × (A, B)
    resumed = tiny_lora_model()
    record = train(resumed, ToyTask(), AdaPreLoRA, toy_config(tmp_path / "cut", lr=1e-3, resume=True))
    assert record["resumed_from_step"] == 6
    assert_same_params(full, resumed)
    assert same_metrics(record, full_record)
    moved = tiny_lora_model()
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), moved.parameters()))


def test_resume_without_the_statistics_would_differ(tmp_path):
    """The equality above is not vacuous: dropping ℓ and c from the checkpoint changes the result."""
    from test_train import ToyTask, toy_config

    full = tiny_lora_model()
    train(full, ToyTask(), AdaPreLoRA, toy_config(tmp_path / "full", lr=1e-3))

    def interrupt(loop):
        if loop.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_lora_model(), ToyTask(), AdaPreLoRA, toy_config(tmp_path / "cut", lr=1e-3), callbacks=[interrupt])
    path = tmp_path / "cut" / "toy" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    for s in ckpt["optimizer"]["state"].values():
        for key in ("row_sq", "col_sq"):
            if key in s:
                s[key].zero_()
    torch.save(ckpt, path)
    (tmp_path / "cut" / "toy" / "checkpoint.prev.pt").unlink(missing_ok=True)
    resumed = tiny_lora_model()
    train(resumed, ToyTask(), AdaPreLoRA, toy_config(tmp_path / "cut", lr=1e-3, resume=True))
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))


def test_factory_form_in_the_loop():
    from test_train import ToyTask, toy_config

    model = tiny_lora_model()

    def make(model, lr):
        return AdaPreLoRA(model, lr, mode="sgd")

    record = train(model, ToyTask(), make, toy_config(None, lr=1e-3, max_steps=3, evaluate=False))
    assert record["status"] == "completed" and record["optimizer"]["groups"][0]["mode"] == "sgd"


def test_bench_smoke(capsys):
    """python -m gpt2lab.bench lora_optim --tiny runs and reports the extra state as 4 bytes per m + n."""
    from gpt2lab.bench import lora_optim

    assert lora_optim.main(["--tiny", "--repeats", "1", "--settings", "adamw,adaprelora"]) == 0
    out = capsys.readouterr().out
    assert "adaprelora" in out and "AdaPreLoRA's extra state: 2,048 bytes; 4 bytes x the sum of m + n over its " \
                                  "pairs = 2,048" in out, out
