"""gpt2lab.optim.AdamW against torch.optim.AdamW and the golden numbers of ALGORITHMS.md §1 (notebook 03's checks
are tested in test_checks_adamw.py)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from gpt2lab.optim import AdamW, decay_groups
from gpt2lab.optim.adamw import adamw_foreach, adamw_single_tensor

GOLDEN_THETA3 = [0.98940921, -1.99467039, 2.97896743]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def golden(make) -> torch.Tensor:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = make([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for g in ([0.1, -0.2, 0.3], [-0.5, 0.4, 0.0], [1.0, 1.0, -1.0]):
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach()


@pytest.mark.parametrize("foreach", [None, True, False])
def test_golden_t1_2(foreach):
    got = golden(lambda params, **kw: AdamW(params, foreach=foreach, **kw))
    assert torch.allclose(got, torch.tensor(GOLDEN_THETA3), atol=1e-7, rtol=0), got


def test_golden_also_holds_for_torch():  # guards the golden numbers themselves
    assert torch.allclose(golden(torch.optim.AdamW), torch.tensor(GOLDEN_THETA3), atol=1e-7, rtol=0)


def mlp(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
        torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2),
    ).to(dtype)


def batches(n: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 8, generator=g, dtype=dtype)
        yield x, torch.stack([torch.sin(x.sum(1)), torch.cos(x[:, 0] * x[:, 1])], dim=1)


def train(model, optimizer, steps: int, seed: int = 1, start: int = 0) -> torch.Tensor:
    data = list(batches(start + steps, seed))[start:]
    for x, y in data:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return flat(model)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


SETTINGS = {
    "defaults": dict(),
    "lr1e-2_b0.8-0.99_eps1e-6_wd0.1": dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    "lr3e-4_b0.95-0.95_eps1e-10_wd0": dict(lr=3e-4, betas=(0.95, 0.95), eps=1e-10, weight_decay=0.0),
    "lr5e-2_b0-0.5_eps1e-3_wd1": dict(lr=5e-2, betas=(0.0, 0.5), eps=1e-3, weight_decay=1.0),
    "amsgrad_lr1e-2_wd0.05": dict(lr=1e-2, weight_decay=0.05, amsgrad=True),
    "groups_no_decay_lr2e-3_wd0.1": dict(lr=2e-3, weight_decay=0.1, groups=True),
    "groups_amsgrad_lr1e-3_b0.9-0.98": dict(lr=1e-3, betas=(0.9, 0.98), weight_decay=0.3, groups=True, amsgrad=True),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_parity_with_torch_after_1000_steps(name, record_property):
    kw = dict(SETTINGS[name])
    groups = kw.pop("groups", False)
    results = {}
    for label, make in {"ours": AdamW, "torch": torch.optim.AdamW}.items():
        model = mlp()
        params = decay_groups(model, kw.get("weight_decay", 1e-2)) if groups else model.parameters()
        results[label] = train(model, make(params, **kw), 1000)
    diff = (results["ours"] - results["torch"]).abs().max().item()
    record_property("max_abs_diff", diff)
    print(f"{name}: max |diff| after 1000 steps = {diff:.3g}")
    assert diff <= 1e-6
    assert (results["ours"] - flat(mlp())).abs().max() > 1e-2  # the run did move the parameters


@pytest.mark.parametrize("torch_foreach", [False, True])
def test_parity_with_both_torch_paths_random_steps(torch_foreach):
    """T1.1: 10 random steps on random tensors of several shapes, rtol 1e-6."""
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (7,), (2, 3, 4), ()]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.1, betas=(0.7, 0.9), eps=1e-6, weight_decay=0.2)
    opt_ours, opt_ref = AdamW(ours, **kw), torch.optim.AdamW(ref, foreach=torch_foreach, **kw)
    for _ in range(10):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_ref.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_single_tensor_and_foreach_paths_agree_exactly(amsgrad):
    runs = [train(m, AdamW(m.parameters(), lr=1e-2, amsgrad=amsgrad, foreach=f), 200)
            for m, f in ((mlp(), True), (mlp(), False))]
    assert torch.equal(runs[0], runs[1])


def test_functional_paths_agree_on_uneven_step_counts():
    """Parameters with different step counts (one joined later) go through foreach's per-tensor branch."""
    g = torch.Generator().manual_seed(0)
    tensors = {name: [torch.randn(3, 4, generator=g) for _ in range(2)] for name in ("p", "g", "m")}
    tensors["v"] = [torch.rand(3, 4, generator=g) for _ in range(2)]
    copies = {k: [t.clone() for t in v] for k, v in tensors.items()}
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=False)
    steps_a, steps_b = [torch.tensor(4.0), torch.tensor(0.0)], [torch.tensor(4.0), torch.tensor(0.0)]
    adamw_foreach(tensors["p"], tensors["g"], tensors["m"], tensors["v"], [], steps_a, **kw)
    adamw_single_tensor(copies["p"], copies["g"], copies["m"], copies["v"], [], steps_b, **kw)
    for a, b in zip(tensors["p"], copies["p"]):
        assert torch.equal(a, b)
    assert [s.item() for s in steps_a] == [5.0, 1.0]


def test_parameter_joining_late_matches_torch():
    """A parameter without a gradient is skipped (no state); when it gets one, its own step count starts at 1."""
    runs = {}
    for label, make in {"ours": AdamW, "torch": torch.optim.AdamW}.items():
        model = mlp()
        opt = make(model.parameters(), lr=1e-2, weight_decay=0.1)
        head = model[5].weight
        data = list(batches(30))
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if i < 10:
                head.grad = None
                if label == "ours" and i == 9:
                    assert head not in opt.state or len(opt.state[head]) == 0
            opt.step()
        runs[label] = flat(model)
    assert (runs["ours"] - runs["torch"]).abs().max() <= 1e-6


def test_mixed_dtypes_in_one_group_match_torch():
    g = torch.Generator().manual_seed(5)
    make = lambda: [torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(1))),
                    torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64))]
    ours, ref = make(), make()
    opt_ours, opt_ref = AdamW(ours, lr=0.05), torch.optim.AdamW(ref, lr=0.05, foreach=True)
    for _ in range(20):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g, dtype=a.dtype)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_ref.step()
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_complex_parameter_matches_torch():
    g = torch.Generator().manual_seed(6)
    ours = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.complex64))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt_ours, opt_ref = AdamW([ours], lr=0.05), torch.optim.AdamW([ref], lr=0.05)
    for _ in range(10):
        ours.grad = torch.randn(5, generator=g, dtype=torch.complex64)
        ref.grad = ours.grad.clone()
        opt_ours.step()
        opt_ref.step()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_t1_3_constant_gradient_moves_lr_per_step():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = AdamW([p], lr=1e-2, weight_decay=0.0)
    g = torch.tensor([3.0, -0.2, 1e-3, -50.0])
    previous = p.detach().clone()
    for _ in range(5):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach() - previous, -1e-2 * g.sign(), rtol=1e-4, atol=0)
        previous = p.detach().clone()


@pytest.mark.parametrize("foreach", [True, False])
def test_zero_gradients_stay_finite_and_only_decay(foreach):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = AdamW([p], lr=1e-2, weight_decay=0.1, foreach=foreach)
    for _ in range(50):
        p.grad = torch.zeros(3)
        opt.step()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0, 0.5]) * (1 - 1e-3) ** 50)


def test_resume_from_state_dict_equals_uninterrupted():
    kw = dict(lr=3e-3, betas=(0.85, 0.99), weight_decay=0.1, amsgrad=True)
    model = mlp()
    uninterrupted = train(model, AdamW(decay_groups(model, 0.1), **{**kw, "weight_decay": 0.1}), 60)

    model = mlp()
    opt = AdamW(decay_groups(model, 0.1), **kw)
    train(model, opt, 25)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    del model, opt
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = mlp(seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt = AdamW(decay_groups(resumed, 0.1), **kw)
    opt.load_state_dict(saved["optim"])
    assert torch.equal(train(resumed, opt, 35, start=25), uninterrupted)


def test_state_dict_interchanges_with_torch():
    """Same state format as torch.optim.AdamW: a torch checkpoint resumes in ours, with identical results."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 10)
    state = copy.deepcopy(opt.state_dict())  # state_dict() shares its tensors with the live optimizer
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    ours = AdamW(twin.parameters(), lr=1e-2)
    ours.load_state_dict(state)
    assert torch.equal(train(twin, ours, 10, start=10), train(model, opt, 10, start=10))
    assert set(ours.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_closure_is_called_and_its_loss_returned():
    model = mlp()
    opt = AdamW(model.parameters())
    x, y = next(batches(1))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0


def test_sparse_gradient_gives_a_clear_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient.*param group 0, parameter 0"):
        AdamW(emb.parameters()).step()


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), "lr must be >= 0, got -0.001"),
    (dict(betas=(1.0, 0.999)), r"beta1 must be in \[0, 1\), got 1.0"),
    (dict(betas=(0.9, -0.1)), r"beta2 must be in \[0, 1\), got -0.1"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(eps=-1e-8), "eps must be >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(lr=float("nan")), "lr must be >= 0, got nan"),
])
def test_bad_arguments_give_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    assert "\n" not in str(info.value)


def test_bad_param_group_override_is_rejected():
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": -1.0}])


def test_decay_groups_exempt_biases_and_layernorm():
    model = mlp()
    model[0].bias.requires_grad_(False)
    decay, no_decay = decay_groups(model, 0.3)
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert {id(p) for _, p in decay["params"]} == {id(model[i].weight) for i in (0, 3, 5)}
    assert {id(p) for _, p in no_decay["params"]} == {id(p) for p in (model[1].weight, model[1].bias, model[3].bias,
                                                                    model[5].bias)}


def test_no_decay_group_really_does_not_decay():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = AdamW([{"params": [p]}, {"params": [q], "weight_decay": 0.0}], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        p.grad, q.grad = torch.zeros(3), torch.zeros(3)
        opt.step()
    assert torch.equal(q.detach(), torch.ones(3))
    assert math.isclose(p[0].item(), 0.95**3, rel_tol=1e-6)
