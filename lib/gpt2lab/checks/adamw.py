"""Checks for notebook 03 (adamw): the moment updates, bias correction, decoupled decay, the full step, the class.

Each ✗ line names the tensor and element that differ; when a wrong answer matches a classic mistake (no bias
correction, L2 decay added to the gradient, decay after the update, ε inside the square root...), it says so.
"""

from __future__ import annotations

import contextlib

import torch

from ..optim.adamw import AdamW
from ..optim.adamw import adamw_update as reference_update
from .core import check, compare, earlier_stubs, expect

GOLDEN = dict(  # a hand-computed three-step example (float32); the spec's test T1.2 (ALGORITHMS.md §1)
    theta0=[1.0, -2.0, 3.0],
    grads=[[0.1, -0.2, 0.3], [-0.5, 0.4, 0.0], [1.0, 1.0, -1.0]],
    hyper=dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1),
    theta3=[0.98940921, -1.99467039, 2.97896743],
)


def _rand(*shape, seed: int, positive: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) if positive else torch.randn(shape, generator=g,
                                                                                        dtype=torch.float64)
    return x


def _pair(got, what: str) -> tuple:
    expect(isinstance(got, tuple | list) and len(got) == 2, f"return a pair ({what}), got {type(got).__name__}")
    return tuple(got)


def _close(a, b, atol: float) -> bool:
    try:
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        return a.shape == b.shape and bool(torch.allclose(a, b, atol=atol, rtol=0))
    except Exception:
        return False


def _hint(got, variants: dict[str, torch.Tensor], atol: float) -> None:
    """Stop with a targeted message when `got` equals a known wrong answer."""
    for message, wrong in variants.items():
        expect(not _close(got, wrong, atol), message)


@check("update_moments")
def update_moments(fn):
    """fn(m, v, g, beta1, beta2) -> (m_new, v_new): the two exponential moving averages."""
    for seed, (beta1, beta2) in enumerate([(0.9, 0.999), (0.6, 0.75)]):
        m, v, g = _rand(4, 3, seed=seed), _rand(4, 3, seed=seed + 10, positive=True), _rand(4, 3, seed=seed + 20)
        got_m, got_v = _pair(fn(m.clone(), v.clone(), g.clone(), beta1, beta2), "m, v")
        _hint(got_m, {"m: the weights are swapped; keep β1 of the OLD m and add (1 − β1) of g":
                      (1 - beta1) * m + beta1 * g}, 1e-9)
        compare(f"m (betas {beta1}, {beta2})", got_m, beta1 * m + (1 - beta1) * g, atol=1e-9)
        _hint(got_v, {"v averages the SQUARED gradient g∘g, not g": beta2 * v + (1 - beta2) * g,
                      "v: the weights are swapped; keep β2 of the OLD v": (1 - beta2) * v + beta2 * g * g}, 1e-9)
        compare(f"v (betas {beta1}, {beta2})", got_v, beta2 * v + (1 - beta2) * g * g, atol=1e-9)
    return "m and v match for two pairs of betas"


@check("bias_correction")
def bias_correction(fn):
    """fn(m, v, beta1, beta2, t) -> (m_hat, v_hat) for step t >= 1."""
    m, v = _rand(5, seed=1), _rand(5, seed=2, positive=True)
    for beta1, beta2, t in [(0.9, 0.999, 10), (0.9, 0.999, 1), (0.8, 0.95, 25)]:
        got_m, got_v = _pair(fn(m.clone(), v.clone(), beta1, beta2, t), "m_hat, v_hat")
        wrong_m = {f"m_hat at t={t}: divide by 1 − β1^t, not multiply": m * (1 - beta1**t)}
        if t > 1:  # at t = 1 the power and the product agree
            wrong_m[f"m_hat at t={t}: use β1^t (a power), not β1·t"] = m / (1 - beta1 * t)
        _hint(got_m, wrong_m, 1e-9)
        compare(f"m_hat at t={t}", got_m, m / (1 - beta1**t), atol=1e-9)
        _hint(got_v, {f"v_hat at t={t}: v is corrected with β2, not β1": v / (1 - beta1**t),
                      f"v_hat at t={t}: divide v by 1 − β2^t itself (the square root comes later)":
                      v / (1 - beta2**t) ** 0.5}, 1e-9)
        compare(f"v_hat at t={t}", got_v, v / (1 - beta2**t), atol=1e-9)
    return "m_hat and v_hat match at t = 10, 1 and 25"


@check("decoupled_decay")
def decoupled_decay(fn):
    """fn(theta, lr, weight_decay) -> theta shrunk by the factor (1 − lr·weight_decay)."""
    theta = _rand(6, seed=3)
    for lr, wd in [(1e-2, 0.1), (0.5, 0.3), (1e-3, 0.0)]:
        got = fn(theta.clone(), lr, wd)
        if wd > 0:  # with λ = 0 these wrong answers coincide with the right one
            _hint(got, {"the decay is scaled by the learning rate: θ·(1 − lr·λ), not θ·(1 − λ)": theta * (1 - wd),
                        "shrink θ (multiply by 1 − lr·λ); do not subtract lr·λ from it": theta - lr * wd}, 1e-12)
        compare(f"decayed θ (lr {lr}, weight_decay {wd})", got, theta * (1 - lr * wd), atol=1e-12)
    return "θ·(1 − lr·λ) for three (lr, λ) pairs, λ = 0 included"


def _buggy_update(theta, g, m, v, t, lr, beta1, beta2, eps, weight_decay, bug):
    """Classic wrong versions of the step, to recognise them in a student's answer."""
    if bug == "coupled":
        g = g + weight_decay * theta
    elif bug != "decay_after":
        theta = theta * (1 - (weight_decay if bug == "decay_unscaled" else lr * weight_decay))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bc1, bc2 = (1.0, 1.0) if bug == "no_bias_correction" else (1 - beta1**t, 1 - beta2**t)
    if bug == "eps_inside":
        update = (m / bc1) / torch.sqrt(v / bc2 + eps)
    elif bug == "no_sqrt_bc2":
        update = (m / bc1) / (v.sqrt() / bc2 + eps)
    else:
        update = (m / bc1) / ((v / bc2).sqrt() + eps)
    theta = theta - lr * update
    if bug == "decay_after":
        theta = theta * (1 - lr * weight_decay)
    return theta, m, v


BUG_HINTS = {
    "no_bias_correction": "looks like the bias correction is missing: divide m by 1 − β1^t and v by 1 − β2^t",
    "coupled": "looks like L2 decay added to the gradient (Adam + L2); AdamW shrinks θ directly, outside m and v",
    "decay_after": "looks like the decay is applied after the Adam update; torch's AdamW decays θ first",
    "decay_unscaled": "looks like the decay is not scaled by lr: θ·(1 − lr·λ)",
    "eps_inside": "looks like ε is inside the square root: use √v̂ + ε",
    "no_sqrt_bc2": "looks like √v is divided by 1 − β2^t; divide by its square root √(1 − β2^t)",
}


@check("adamw_update")
def adamw_update(fn):
    """fn(theta, g, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (theta, m, v) after step t (t from 1)."""
    with earlier_stubs(fn):
        return _adamw_update(fn)


def _adamw_update(fn):
    # 1. forty random steps in float64, large weight decay so that misplaced decay shows
    hyper = dict(lr=3e-2, beta1=0.8, beta2=0.95, eps=1e-3, weight_decay=0.5)
    theta, m, v = _rand(4, 5, seed=7), torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4, 5, dtype=torch.float64)
    for t in range(1, 41):
        g = _rand(4, 5, seed=100 + t) + 0.5
        expected = reference_update(theta, g, m, v, t, **hyper)
        got = fn(theta.clone(), g.clone(), m.clone(), v.clone(), t, **hyper)
        expect(isinstance(got, tuple | list) and len(got) == 3, "return the triple (theta, m, v)")
        if not _close(got[0], expected[0], 1e-9):
            for bug, message in BUG_HINTS.items():
                wrong = _buggy_update(theta, g, m, v, t, **hyper, bug=bug)[0]
                expect(not _close(got[0], wrong, 1e-9), f"step {t}: {message}")
        for name, a, b in zip(("θ", "m", "v"), got, expected):
            compare(f"{name} after step {t}", a, b, atol=1e-9)
        theta, m, v = expected
    # 2. a hand-computed three-step example, in float32 (the spec's test T1.2)
    theta = torch.tensor(GOLDEN["theta0"])
    m, v = torch.zeros(3), torch.zeros(3)
    for t, grad in enumerate(GOLDEN["grads"], start=1):
        got = fn(theta.clone(), torch.tensor(grad), m.clone(), v.clone(), t, **GOLDEN["hyper"])
        expect(isinstance(got, tuple | list) and len(got) == 3, "return the triple (theta, m, v)")
        theta, m, v = got
    compare("θ after the three steps of the hand-computed example", theta, torch.tensor(GOLDEN["theta3"]), atol=1e-6)
    return "matches a hand-computed three-step example and 40 random float64 steps of torch's AdamW"


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model.double()


@contextlib.contextmanager
def _one_thread():
    """A 200-weight model runs fastest on one thread (and a busy shared machine hurts two threads most)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with _one_thread():
        return _train_loop(model, optimizer, steps, g)


def _train_loop(model, optimizer, steps, g) -> torch.Tensor:
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        y = torch.sin(x.sum(dim=1, keepdim=True))
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@check("adamw_optimizer")
def adamw_optimizer(cls):
    """cls(params, lr, betas, eps, weight_decay) is a torch.optim.Optimizer; 100 steps vs the library AdamW."""
    with earlier_stubs(cls):
        return _adamw_optimizer(cls)


def _adamw_optimizer(cls):
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)

    def groups(model):  # weights decay, biases and the LayerNorm do not
        return [{"params": [model[0].weight, model[3].weight]},
                {"params": [model[0].bias, model[1].weight, model[1].bias, model[3].bias], "weight_decay": 0.0}]

    ours = _tiny_model()
    optimizer = cls(groups(ours), **hyper)
    expect(isinstance(optimizer, torch.optim.Optimizer), "your class should subclass torch.optim.Optimizer")
    got = _train(ours, optimizer, 100)
    reference = _tiny_model()
    expected = _train(reference, AdamW(groups(reference), **hyper), 100)
    compare("parameters after 100 steps (two param groups, no decay on biases/LayerNorm)", got, expected, atol=1e-9)
    return "100 steps with two param groups match the library AdamW (float64)"


@check("torch_parity")
def torch_parity(ours, theirs, atol: float = 1e-6):
    """Weights trained with gpt2lab.optim.AdamW vs the same run with torch.optim.AdamW."""
    compare("weights trained with gpt2lab.optim.AdamW vs torch.optim.AdamW", ours, theirs, atol=atol)
    return f"all {torch.as_tensor(theirs).numel()} weights agree with torch.optim.AdamW within {atol:g}"
