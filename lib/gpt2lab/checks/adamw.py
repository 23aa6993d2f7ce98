"""Checks for notebook 03 (adamw): the moment updates, bias correction, decoupled decay, the full step, the class.

Each ✗ line names the tensor and element that differ; when a wrong answer matches a classic mistake (no bias
correction, L2 decay added to the gradient, decay after the update, ε inside the square root...), it says so.

References are torch.optim.AdamW and hand computations, never gpt2lab's own AdamW. The functions get the caller's
real tensors and must leave them unchanged. `MyAdamW` is probed on one parameter first (unchanged parameters, NaN at
step 1, state not kept, t stuck, p.grad modified, the step's classic mistakes), then trains a tiny model with two
param groups that have their own lr and weight decay under a LambdaLR scheduler, which separates an lr read from
`self.defaults` (or a decay read from it, or one step count shared by all parameters) from the right answer.
"""

from __future__ import annotations

import contextlib

import torch

from .core import (
    _close,
    check,
    compare,
    compare_with_hints,
    earlier_stubs,
    expect,
    known_mistake,
    returned_pair,
    untouched,
)

GOLDEN = dict(  # a three-step example computed by hand (float32)
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


def _untouched_returning(what: str, **tensors):
    return untouched(f"return new tensors ({what}); the caller's tensors must stay as they were (no *=, -=, mul_, "
                     "add_ on them)", **tensors)


@check("update_moments")
def update_moments(fn):
    """fn(m, v, g, beta1, beta2) -> (m_new, v_new): the two exponential moving averages."""
    for seed, (beta1, beta2) in enumerate([(0.9, 0.999), (0.6, 0.75)]):
        m, v, g = _rand(4, 3, seed=seed), _rand(4, 3, seed=seed + 10, positive=True), _rand(4, 3, seed=seed + 20)
        with _untouched_returning("m = beta1 * m + ...", m=m, v=v, g=g):
            got_m, got_v = returned_pair(fn(m, v, g, beta1, beta2), "m, v")
        m_new, v_new = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        expect(not (_close(got_m, v_new, 1e-9) and _close(got_v, m_new, 1e-9)),
               "the pair is in the wrong order: return (m, v)")
        compare_with_hints(f"m (betas {beta1}, {beta2})", got_m, m_new, 1e-9, [
            ("m: the weights are swapped; keep β1 of the OLD m and add (1 − β1) of g", (1 - beta1) * m + beta1 * g),
            ("m is averaged with β2: the first moment uses β1", beta2 * m + (1 - beta2) * g)])
        compare_with_hints(f"v (betas {beta1}, {beta2})", got_v, v_new, 1e-9, [
            ("v averages the SQUARED gradient g∘g, not g", beta2 * v + (1 - beta2) * g),
            ("v: the weights are swapped; keep β2 of the OLD v", (1 - beta2) * v + beta2 * g * g),
            ("v is averaged with β1: the second moment uses β2", beta1 * v + (1 - beta1) * g * g),
            ("square g alone: (1 − β2)·g², not ((1 − β2)·g)²", beta2 * v + ((1 - beta2) * g) ** 2),
            ("v averages g², not the new m²", beta2 * v + (1 - beta2) * m_new**2)])
    return "m and v match for two pairs of betas"


@check("bias_correction")
def bias_correction(fn):
    """fn(m, v, beta1, beta2, t) -> (m_hat, v_hat) for step t >= 1."""
    m, v = _rand(5, seed=1), _rand(5, seed=2, positive=True)
    for beta1, beta2, t in [(0.9, 0.999, 10), (0.9, 0.999, 1), (0.8, 0.95, 25)]:
        with _untouched_returning("m_hat = m / (1 - beta1**t)", m=m, v=v):
            got_m, got_v = returned_pair(fn(m, v, beta1, beta2, t), "m_hat, v_hat")
        wrong_m = {f"m_hat at t={t}: divide by 1 − β1^t, not multiply": m * (1 - beta1**t)}
        if t > 1:  # at t = 1 the power and the product agree, and β^(t−1) = β^0 divides by zero
            wrong_m[f"m_hat at t={t}: use β1^t (a power), not β1·t"] = m / (1 - beta1 * t)
            wrong_m[f"m_hat at t={t}: use β1^t with the t you are given (it counts from 1), not β1^(t−1)"] = \
                m / (1 - beta1 ** (t - 1))
        wrong_m[f"m_hat at t={t}: use β1^t with the t you are given, not β1^(t+1)"] = m / (1 - beta1 ** (t + 1))
        compare_with_hints(f"m_hat at t={t}", got_m, m / (1 - beta1**t), 1e-9, wrong_m.items())
        compare_with_hints(f"v_hat at t={t}", got_v, v / (1 - beta2**t), 1e-9, [
            (f"v_hat at t={t}: v is corrected with β2, not β1", v / (1 - beta1**t)),
            (f"v_hat at t={t}: divide v by 1 − β2^t itself (the square root comes later)", v / (1 - beta2**t) ** 0.5)])
    return "m_hat and v_hat match at t = 10, 1 and 25"


@check("decoupled_decay")
def decoupled_decay(fn):
    """fn(theta, lr, weight_decay) -> theta shrunk by the factor (1 − lr·weight_decay)."""
    theta = _rand(6, seed=3)
    for lr, wd in [(1e-2, 0.1), (0.5, 0.3), (1e-3, 0.0)]:
        with _untouched_returning("theta * (1 - lr * weight_decay)", theta=theta):
            got = fn(theta, lr, wd)
        mistakes = [("the decay is scaled by the learning rate: θ·(1 − lr·λ), not θ·(1 − λ)", theta * (1 - wd)),
                    ("shrink θ (multiply by 1 − lr·λ); do not subtract lr·λ from it", theta - lr * wd),
                    ("you returned the amount of decay lr·λ·θ; return the shrunk θ·(1 − lr·λ)", theta * lr * wd)]
        compare_with_hints(f"decayed θ (lr {lr}, weight_decay {wd})", got, theta * (1 - lr * wd), 1e-12,
                           mistakes if wd > 0 else [])  # with λ = 0 these wrong answers coincide with the right one
    return "θ·(1 − lr·λ) for three (lr, λ) pairs, λ = 0 included"


def _buggy_update(theta, g, m, v, t, lr, beta1, beta2, eps, weight_decay, bug=None):
    """AdamW's step by hand (bug=None) and its classic wrong versions, to recognise them in a learner's answer."""
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
    theta = theta + lr * update if bug == "uphill" else theta - lr * update
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
    "uphill": "θ moved uphill: subtract the update, θ − lr·m̂/(√v̂ + ε)",
}
NAN_AT_T0 = ("at t = 0, 1 − β^t = 0 and the bias correction divides by zero; t counts from 1 (the first step is "
             "t = 1)")


def _torch_adamw_run(theta0: torch.Tensor, grads: list, **hyper) -> list[tuple]:
    """(θ, m, v) after each step of torch.optim.AdamW: the reference, built without gpt2lab's AdamW."""
    p = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.AdamW([p], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                            weight_decay=hyper["weight_decay"], foreach=False)
    states = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        state = opt.state[p]
        states.append((p.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()))
    return states


@check("adamw_update")
def adamw_update(fn):
    """fn(theta, g, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (theta, m, v) after step t (t from 1)."""
    with earlier_stubs(fn):
        return _adamw_update(fn)


def _adamw_update(fn):
    # 1. forty random steps in float64 against torch.optim.AdamW; a large weight decay so that misplaced decay shows
    hyper = dict(lr=3e-2, beta1=0.8, beta2=0.95, eps=1e-3, weight_decay=0.5)
    theta, m, v = _rand(4, 5, seed=7), torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4, 5, dtype=torch.float64)
    grads = [_rand(4, 5, seed=100 + t) + 0.5 for t in range(1, 41)]
    for t, (g, expected) in enumerate(zip(grads, _torch_adamw_run(theta, grads, **hyper)), start=1):
        with _untouched_returning("theta = theta - ..., not theta -= ...", theta=theta, g=g, m=m, v=v):
            got = fn(theta, g, m, v, t, **hyper)
        expect(isinstance(got, tuple | list) and len(got) == 3, "return the triple (theta, m, v)")
        got_theta = torch.as_tensor(got[0])
        expect(bool(torch.isfinite(got_theta).all()), f"θ is NaN or inf after step {t}: {NAN_AT_T0}")
        expect(not torch.equal(got_theta, theta), f"step {t} returned θ unchanged: return the updated theta")
        expect(not _close(got_theta, theta * (1 - hyper["lr"] * hyper["weight_decay"]), 1e-12),
               f"step {t} returned θ after the decay only: the Adam update is missing (theta = theta - lr * m_hat / "
               "(v_hat.sqrt() + eps))")
        known_mistake(got_theta, expected[0], 1e-9, [
            (f"step {t}: {message}", lambda bug=bug, now=(theta, g, m, v, t): _buggy_update(*now, **hyper, bug=bug)[0])
            for bug, message in BUG_HINTS.items()])
        for name, a, b, old in zip(("θ", "m", "v"), got, expected, (theta, m, v)):
            expect(name == "θ" or not _close(a, old, 0.0), f"step {t} returned the old {name}: return the updated "
                                                          f"{name} (from update_moments)")
            compare(f"{name} after step {t}", a, b, atol=1e-9)
        theta, m, v = expected
    # 2. a hand-computed three-step example, in float32
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


def _schedule(step: int) -> float:
    """Warm-up over 3 steps, then a linear decay: the lr changes at every one of the first steps."""
    return (step + 1) / 3 if step < 3 else max(0.1, 1 - step / 60)


def _groups(model: torch.nn.Module) -> list[dict]:
    """Weights decay with their own lr; biases and the LayerNorm take the defaults and do not decay."""
    return [{"params": [model[0].weight, model[3].weight], "lr": 3e-2},
            {"params": [model[0].bias, model[1].weight, model[1].bias, model[3].bias], "weight_decay": 0.0}]


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, scheduled: bool = True) -> None:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule) if scheduled else None
    g = torch.Generator().manual_seed(1)
    with _one_thread():
        for _ in range(steps):
            x = torch.randn(8, 6, generator=g, dtype=torch.float64)
            y = torch.sin(x.sum(dim=1, keepdim=True))
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()


def _simulate(theta0, grads, lrs, hyper, bug=None, fresh=False, t_of=lambda t: t):
    """θ after each step of a hand-written AdamW (or of one of its wrong versions) on one parameter."""
    theta, m, v = theta0, torch.zeros_like(theta0), torch.zeros_like(theta0)
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if fresh:  # state not kept between steps
            m, v = torch.zeros_like(theta), torch.zeros_like(theta)
        theta, m, v = _buggy_update(theta, g, m, v, t_of(t), lr, *hyper["betas"], hyper["eps"],
                                    hyper["weight_decay"], bug=bug)
        out.append(theta)
    return out


OPTIMIZER_HINTS = {  # variant of the hand simulation -> hint
    "fresh": "the moments restart at every step: keep m, v and t in self.state[p] between steps (state = "
             "self.state[p]), not in local variables",
    "t_stuck": "the step count t stays at 1: increment state['t'] at every step (and keep it in self.state[p])",
    **{bug: message for bug, message in BUG_HINTS.items()},
}


def _probe(cls) -> None:
    """One parameter, one group, five steps against torch.optim.AdamW, with a hint for each classic mistake."""
    hyper = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.5)
    theta0 = _rand(4, 5, seed=7)
    grads = [_rand(4, 5, seed=200 + t) + 0.5 for t in range(5)]
    p = torch.nn.Parameter(theta0.clone())
    optimizer = cls([p], **hyper)
    expect(isinstance(optimizer, torch.optim.Optimizer), "your class should subclass torch.optim.Optimizer")
    reference = torch.nn.Parameter(theta0.clone())
    torch_opt = torch.optim.AdamW([reference], **hyper, foreach=False)
    lrs = [hyper["lr"]] * len(grads)
    variants = {"fresh": _simulate(theta0, grads, lrs, hyper, fresh=True, t_of=lambda t: 1),
                "t_stuck": _simulate(theta0, grads, lrs, hyper, t_of=lambda t: 1),
                **{bug: _simulate(theta0, grads, lrs, hyper, bug=bug) for bug in BUG_HINTS}}
    for t, g in enumerate(grads, start=1):
        before = p.detach().clone()
        p.grad, reference.grad = g.clone(), g.clone()
        optimizer.step()
        torch_opt.step()
        got = p.detach()
        expect(bool(torch.isfinite(got).all()), f"the parameter is NaN or inf after step {t}: "
                                                "count the step (state['t'] += 1) before calling adamw_step; "
                                                + NAN_AT_T0)
        expect(not torch.equal(got, before), f"step {t} never changed the parameters: did you write into a copy "
                                             "(p = ...) instead of updating p in place with p.copy_(new_p)?")
        known_mistake(got, reference.detach(), 1e-9,
                      [(f"step {t}: {OPTIMIZER_HINTS[name]}", path[t - 1]) for name, path in variants.items()])
        expect(torch.equal(p.grad, g), f"step {t} changed p.grad in place: leave the gradient as it is (AdamW's "
                                       "decay shrinks θ, it never enters the gradient)")
        compare(f"the parameter after step {t} (one group, lr {hyper['lr']:g})", got, reference.detach(), atol=1e-9)


@check("adamw_optimizer")
def adamw_optimizer(cls):
    """cls(params, lr, betas, eps, weight_decay) is a torch.optim.Optimizer; compared with torch.optim.AdamW."""
    with earlier_stubs(cls):
        return _adamw_optimizer(cls)


def _adamw_optimizer(cls):
    _probe(cls)  # 1. one parameter, five steps: the classic mistakes, each with its hint
    # 2. a tiny model, two param groups (their own lr; no decay on biases and LayerNorm) and an lr scheduler
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    steps = 60
    ours, reference = _tiny_model(), _tiny_model()
    _train(ours, cls(_groups(ours), **hyper), steps)
    _train(reference, torch.optim.AdamW(_groups(reference), **hyper, foreach=False), steps)
    wrong = {  # hint -> (what the wrong optimizer is built from, whether the scheduler reaches it)
        "the learning rate comes from self.defaults (or the constructor) instead of group['lr']: each param group, "
        "and the scheduler, set their own": (lambda groups: torch.optim.AdamW(
            [{k: x for k, x in g.items() if k != "lr"} for g in groups], **hyper, foreach=False), False),
        "weight_decay comes from self.defaults instead of group['weight_decay']: the biases and LayerNorm group "
        "must not decay": (lambda groups: torch.optim.AdamW(
            [{k: x for k, x in g.items() if k != "weight_decay"} for g in groups], **hyper, foreach=False), True),
        "the step count t grows once per parameter, not once per step: keep one count per parameter, "
        "in self.state[p]": (lambda groups: _SharedCountAdamW(groups, **hyper), True),
    }

    def trained(make, scheduled, name):  # trained only when a parameter differs from the reference
        variant = _tiny_model()
        _train(variant, make(_groups(variant)), steps, scheduled)  # an lr not read from the group: no schedule
        return dict(variant.named_parameters())[name]

    named = dict(reference.named_parameters())
    group_of = {id(p): i for i, group in enumerate(_groups(ours)) for p in group["params"]}
    for name, got in ours.named_parameters():
        compare_with_hints(f"{name} after {steps} steps (param group {group_of[id(got)]}, lr from the group and a "
                           "scheduler)", got, named[name], 1e-9,
                           [(message, lambda make=make, scheduled=scheduled, name=name: trained(make, scheduled, name))
                            for message, (make, scheduled) in wrong.items()])
    return (f"one parameter over 5 steps, then {steps} steps of a tiny model with two param groups (own lr, no decay "
            "on biases/LayerNorm) and an lr scheduler, match torch.optim.AdamW (float64)")


class _SharedCountAdamW(torch.optim.Optimizer):
    """A classic wrong MyAdamW, to recognise it: one step counter for the whole optimizer, incremented per parameter."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.t = 0

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(m=torch.zeros_like(p), v=torch.zeros_like(p))
                self.t += 1
                new, state["m"], state["v"] = _buggy_update(p, p.grad, state["m"], state["v"], self.t, group["lr"],
                                                            *group["betas"], group["eps"], group["weight_decay"])
                p.copy_(new)


@check("torch_parity")
def torch_parity(ours, theirs, atol: float = 1e-6):
    """Weights trained with gpt2lab.optim.AdamW vs the same run with torch.optim.AdamW."""
    compare("weights trained with gpt2lab.optim.AdamW vs torch.optim.AdamW", ours, theirs, atol=atol)
    return f"all {torch.as_tensor(theirs).numel()} weights agree with torch.optim.AdamW within {atol:g}"
