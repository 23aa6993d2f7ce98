"""gpt2lab.optim.SOAP against pytorch_optimizer.SOAP (float32) and the closed forms of the SOAP reference (arXiv
2409.11321): first call is a no-op, the second step's closed form, 1-D = HF-style AdamW, the refresh (orthogonal
basis, V permuted, M rotated exactly), large dims, merge_dims, state_dict round trip and exact resume through the
training loop, bad inputs. Notebook 07's checks are tested in test_checks_soap.py."""

from __future__ import annotations

import io

import pytest
import torch
from pytorch_optimizer import SOAP as ReferenceSOAP
from tiny_tasks import ToyTask

from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.optim import SOAP, decay_groups
from gpt2lab.optim.soap import merged_shape, project, project_back
from gpt2lab.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


RENAMED = {"max_precond_dim": "max_precondition_dim", "normalize_grads": "normalize_gradient"}  # pytorch_optimizer's


def reference(params, **kw):
    """pytorch_optimizer.SOAP with our argument names (its shampoo_beta None = ours -1)."""
    kw = {RENAMED.get(k, k): v for k, v in kw.items()}
    if kw.get("shampoo_beta", 0) < 0:
        kw["shampoo_beta"] = None
    return ReferenceSOAP(params, **kw)


def run(make, shapes, steps, seed=0, dtype=torch.float32, **kw):
    """`steps` calls of step() on random parameters with random gradients (a constant offset keeps the statistics
    well conditioned: distinct eigenvalues, so the eigenbases are unique up to sign)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    opt = make(params, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype) + 0.3
        opt.step()
    return params, opt


# a 6×4 matrix, a 4-vector, a 20×3 matrix whose 20-side is over max_precond_dim, a square one and a 3-D tensor
SHAPES = [(6, 4), (4,), (20, 3), (5, 5), (3, 4, 2)]
PARITY = {
    "defaults": dict(),
    "precondition_1d": dict(precondition_1d=True),
    "normalize_f3": dict(normalize_grads=True, precondition_frequency=3),
    "lr1e-2_b0.9-0.99_sb0.9_wd0.1_f4": dict(lr=1e-2, betas=(0.9, 0.99), shampoo_beta=0.9, weight_decay=0.1,
                                            precondition_frequency=4),
    "no_bias_correction_eps1e-3_f2": dict(correct_bias=False, eps=1e-3, precondition_frequency=2),
    "wd0_f5": dict(weight_decay=0.0, precondition_frequency=5),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_parity_with_pytorch_optimizer_over_50_steps(name, record_property):
    """T3.4, over 50 steps (a refresh at least every 10). Controlled for the known differences: float32 only
    (pytorch_optimizer runs eigh in float64 for float64 parameters), every gradient present from the first step
    (it counts steps per group), no merge_dims (its merging differs), renamed arguments."""
    kw = dict(max_precond_dim=8, **PARITY[name])
    ours, _ = run(SOAP, SHAPES, 50, **kw)
    theirs, _ = run(reference, SHAPES, 50, **kw)
    start, _ = run(SOAP, SHAPES, 0)
    diff = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    record_property("max_abs_diff", diff)
    print(f"{name}: max |ours - pytorch_optimizer| after 50 steps = {diff:.3g}")
    assert diff <= 1e-5
    assert min((a - s).abs().max().item() for a, s in zip(ours, start)) > 1e-2  # every parameter really moved


def test_t3_1_first_step_changes_nothing_even_with_weight_decay():
    params, opt = run(SOAP, SHAPES, 0, weight_decay=0.5, precondition_1d=True)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape) + 0.3
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    state = opt.state[params[0]]
    assert state["step"].item() == 0 and set(state) == {"step", "exp_avg", "exp_avg_sq", "GG0", "GG1", "Q0", "Q1"}
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(params, before))
    assert opt.state[params[0]]["step"].item() == 1


P0 = [[1.0, -2.0, 0.5], [0.3, 0.2, -0.1], [2.0, 1.0, -1.0]]
G2 = [[0.5, -1.0, 2.0], [-0.2, 0.7, 0.1], [1.5, -0.3, -0.9]]
FIRST_ROW = [0.99697006, -1.99694002, 0.49698511]


@pytest.mark.parametrize("make", [SOAP, reference], ids=["ours", "pytorch_optimizer"])
def test_t3_2_second_step_closed_form(make):
    """G1 diagonal with distinct entries: the bases are signed permutations, so step 2 is sign-like Adam."""
    p = torch.nn.Parameter(torch.tensor(P0))
    opt = make([p])  # defaults: lr 3e-3, betas (0.95, 0.95), eps 1e-8, wd 0.01
    p.grad = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    opt.step()
    p.grad = torch.tensor(G2)
    opt.step()
    g2 = torch.tensor(G2)
    closed = (torch.tensor(P0) - 3e-3 * g2 / (g2.abs() + 1e-8 / (1 - 0.95) ** 0.5)) * (1 - 3e-3 * 0.01)
    torch.testing.assert_close(p.detach(), closed, rtol=0, atol=1.2e-7)
    torch.testing.assert_close(p.detach()[0], torch.tensor(FIRST_ROW), rtol=0, atol=1.2e-7)


def test_t3_3_one_dimensional_parameter_is_hf_adamw_skipping_its_first_gradient():
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(7, generator=g) for _ in range(30)]
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.99), 1e-6, 0.1
    p = torch.nn.Parameter(torch.randn(7, generator=g))
    theta = p.detach().clone()
    opt = SOAP([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for grad in grads:
        p.grad = grad
        opt.step()
    m, v = torch.zeros(7), torch.zeros(7)
    for t, grad in enumerate(grads[1:], start=1):  # by hand: HF placement of eps, decay after the update
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        theta = (theta - lr * (1 - b2**t) ** 0.5 / (1 - b1**t) * m / (v.sqrt() + eps)) * (1 - lr * wd)
    assert (p.detach() - theta).abs().max() <= 5e-7
    assert "GG0" not in opt.state[p]


def direction_switch_grads(steps, m=6, n=4, switch=8, seed=5):
    """Gradients dominated by one rank-1 direction, then by another: the eigenvalue order changes at the refresh."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.linalg.qr(torch.randn(m, m, generator=g)).Q, torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    out = []
    for t in range(steps):
        k = 0 if t < switch else 2
        out.append(5.0 * torch.outer(u[:, k], v[:, k]) + 0.3 * torch.randn(m, n, generator=g))
    return out


def test_t3_5_refresh_keeps_bases_orthogonal_permutes_v_and_rotates_m_exactly():
    f = 10
    grads = direction_switch_grads(f + 1)
    p = torch.nn.Parameter(torch.zeros(6, 4))
    opt = SOAP([p], precondition_frequency=f)
    for grad in grads[:f]:  # the first call and f - 1 steps: the next step is the refresh step
        p.grad = grad
        opt.step()
    state = opt.state[p]
    b1, b2 = opt.defaults["betas"]
    old = [state["Q0"].clone(), state["Q1"].clone()]
    g = grads[f]
    g_rot = old[0].T @ g @ old[1]  # by hand: the Adam moments of step f in the old basis
    m_f = b1 * state["exp_avg"] + (1 - b1) * g_rot
    v_f = b2 * state["exp_avg_sq"] + (1 - b2) * g_rot**2
    stats = [b2 * state["GG0"] + (1 - b2) * g @ g.T, b2 * state["GG1"] + (1 - b2) * g.T @ g]
    p.grad = g
    opt.step()
    assert state["step"].item() == f
    orders = [torch.argsort((q * (s @ q)).sum(0), descending=True) for q, s in zip(old, stats)]
    assert any(not torch.equal(o, torch.arange(len(o))) for o in orders)  # the refresh did re-order
    torch.testing.assert_close(state["exp_avg_sq"], v_f[orders[0]][:, orders[1]], rtol=1e-5, atol=1e-8)
    for k, (q, s, o) in enumerate(zip(old, stats, orders)):
        new = state[f"Q{k}"]
        torch.testing.assert_close(new.T @ new, torch.eye(len(o)), rtol=0, atol=1e-5)
        expected = torch.linalg.qr(s @ q[:, o]).Q  # one power iteration from the re-ordered old basis
        torch.testing.assert_close(new.abs(), expected.abs(), rtol=0, atol=1e-5)
        assert not torch.allclose(new.abs(), q[:, o].abs(), atol=1e-3)  # the basis moved, not just re-ordered
    m_now = project_back(state["exp_avg"], [state["Q0"], state["Q1"]])
    torch.testing.assert_close(m_now, project_back(m_f, old), rtol=0, atol=1e-6)  # M: the same vector, new basis


def test_bases_change_only_at_refresh_steps():
    p = torch.nn.Parameter(torch.zeros(6, 4))
    opt = SOAP([p], precondition_frequency=3)
    changed = []
    for grad in direction_switch_grads(12, switch=4):
        q = opt.state[p].get("Q0")
        q = None if q is None else q.clone()
        p.grad = grad
        opt.step()
        if q is not None:
            changed.append(not torch.equal(q, opt.state[p]["Q0"]))
    # calls 2.. are steps t = 1..11; the basis is refreshed after steps 3, 6, 9
    assert [t for t, c in enumerate(changed, start=1) if c] == [3, 6, 9]


def test_large_dims_get_the_identity_and_1d_only_with_precondition_1d():
    params, opt = run(SOAP, [(7, 4), (3, 7), (4,), (9,)], 3, max_precond_dim=5, precondition_1d=True)
    keys = [sorted(k for k in opt.state[p] if k.startswith(("GG", "Q"))) for p in params]
    assert keys == [["GG1", "Q1"], ["GG0", "Q0"], ["GG0", "Q0"], []]
    assert opt.state[params[0]]["GG1"].shape == (4, 4) and opt.state[params[1]]["Q0"].shape == (3, 3)
    _, plain = run(SOAP, [(4,)], 2)
    assert not any(k.startswith("GG") for k in plain.state[next(iter(plain.state))])


def test_projections_invert_each_other_in_2d_and_3d():
    g = torch.Generator().manual_seed(0)
    qs = [torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q for n in (3, 4, 2)]
    x = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    bases = [qs[0], None, qs[2]]
    y = project(x, bases)
    by_hand = torch.einsum("abc,ai,cj->ibj", x, qs[0], qs[2])  # contract dims 0 and 2 with their bases
    torch.testing.assert_close(y, by_hand)
    torch.testing.assert_close(project_back(y, bases), x)
    m = torch.randn(3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(project(m, [qs[0], qs[1]]), qs[0].T @ m @ qs[1])
    torch.testing.assert_close(project_back(m, [None, qs[1]]), m @ qs[1].T)


@pytest.mark.parametrize("shape, merged", [((64, 3, 3, 3), (1728,)), ((4, 4), (16,)), ((768, 2304), (768, 2304)),
                                           ((20000, 5), (20000, 5)), ((2, 3, 20000), (6, 20000)), ((1, 1), (1,))])
def test_merged_shape_follows_the_reference(shape, merged):
    assert merged_shape(shape, 10000) == merged


def test_merge_dims_runs_the_merged_tensor():
    """A (4, 3, 2) tensor merged to (24,) is preconditioned exactly like a 24-vector with precondition_1d."""
    a, _ = run(SOAP, [(4, 3, 2)], 25, merge_dims=True, precondition_frequency=4)
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3, 2, generator=g).reshape(24))
    opt = SOAP([p], precondition_1d=True, precondition_frequency=4)
    for _ in range(25):
        p.grad = (torch.randn(4, 3, 2, generator=g) + 0.3).reshape(24)
        opt.step()
    torch.testing.assert_close(a[0].detach().reshape(24), p.detach(), rtol=0, atol=1e-6)


def test_a_parameter_whose_gradient_appears_later_skips_its_own_first_step():
    """The reference's per-parameter semantics (pytorch_optimizer would update it in the same call)."""
    a, b = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2, 2))
    opt = SOAP([a, b])
    for t in range(4):
        a.grad = torch.randn(3, 2)
        b.grad = torch.randn(2, 2) if t >= 2 else None
        opt.step()
        if t == 2:
            assert torch.equal(b.detach(), torch.ones(2, 2)) and opt.state[b]["step"].item() == 0
    assert opt.state[a]["step"].item() == 3 and opt.state[b]["step"].item() == 1


def test_state_dict_round_trip_continues_bit_for_bit():
    kw = dict(precondition_frequency=3, max_precond_dim=5, precondition_1d=True, weight_decay=0.1)
    full, _ = run(SOAP, SHAPES, 20, seed=2, **kw)
    params, opt = run(SOAP, SHAPES, 0, seed=2, **kw)
    g = torch.Generator().manual_seed(2)
    [torch.randn(s, generator=g) for s in SHAPES]  # the draws run() made for the initial values
    grads = [[torch.randn(p.shape, generator=g) + 0.3 for p in params] for _ in range(20)]
    for step in grads[:11]:
        for p, grad in zip(params, step):
            p.grad = grad
        opt.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors, ints and floats only
    assert all(isinstance(v, torch.Tensor) for s in saved["optim"]["state"].values() for v in s.values())
    fresh = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = SOAP(fresh, **kw)
    opt2.load_state_dict(saved["optim"])
    for step in grads[11:]:
        for p, grad in zip(fresh, step):
            p.grad = grad
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(fresh, full))


def test_bfloat16_parameter_keeps_float32_state_through_load_state_dict():
    params, opt = run(SOAP, [(6, 4)], 12, dtype=torch.bfloat16, precondition_frequency=5)
    state = opt.state[params[0]]
    assert all(state[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "GG0", "Q1"))
    assert torch.isfinite(params[0].float()).all()
    twin = torch.nn.Parameter(params[0].detach().clone())
    opt2 = SOAP([twin], precondition_frequency=5)
    opt2.load_state_dict(opt.state_dict())
    assert all(opt2.state[twin][k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "GG0", "Q1"))
    assert torch.equal(opt2.state[twin]["Q0"], state["Q0"])


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2(GPT2Config.tiny(vocab_size=64, n_positions=48, n_embd=32, n_head=2, dropout=0.1))


def char_task():
    return ToyTask()


def make_soap(model, lr):
    """The loop's factory: SOAP over decay_groups (no decay on biases, LayerNorms, embeddings); refreshes every 3."""
    return SOAP(decay_groups(model, weight_decay=0.01), lr=lr, precondition_frequency=3)


def soap_config(out_dir, **overrides):
    return TrainConfig(**{**dict(epochs=3, batch_size=3, lr=3e-3, eval_every=3, checkpoint_every=2, run_name="soap",
                                 out_dir=None if out_dir is None else str(out_dir), progress=False, log_every=1,
                                 schedule="linear", warmup_steps=2), **overrides})


def test_resume_through_the_training_loop_is_exact(tmp_path):
    """Interrupted after a refresh (the checkpoint at step 6 holds refreshed bases), resumed from it: the same
    weights and metrics as an uninterrupted run. Runs through decay_groups and the model-seeing factory."""
    full_model = tiny_gpt2()
    full = train(full_model, char_task(), make_soap, soap_config(None))
    assert full["optimizer"]["name"] == "SOAP" and full["optimizer"]["state_bytes"] > 0

    def interrupt(loop):
        if loop.step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_gpt2(), char_task(), make_soap, soap_config(tmp_path), callbacks=[interrupt])
    assert torch.load(tmp_path / "soap" / "checkpoint.pt", weights_only=False)["state"]["step"] == 6
    resumed_model = tiny_gpt2(seed=99)
    record = train(resumed_model, char_task(), make_soap, soap_config(tmp_path, resume=True))
    assert record["resumed_from_step"] == 6
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    assert record["evals"] == full["evals"] and record["loss_log"] == full["loss_log"]
    assert full["evals"][-1]["dev_loss"] < full["evals"][0]["dev_loss"]


def test_param_groups_use_their_own_lr_and_weight_decay():
    a, b = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(4, 3))
    opt = SOAP([{"params": [a]}, {"params": [b], "lr": 0.0, "weight_decay": 0.0}], lr=1e-2, weight_decay=0.5)
    for _ in range(5):
        a.grad, b.grad = torch.randn(4, 3), torch.randn(4, 3)
        opt.step()
    assert torch.equal(b.detach(), torch.ones(4, 3)) and not torch.equal(a.detach(), torch.ones(4, 3))


def test_closure_is_called_and_its_loss_returned():
    p = torch.nn.Parameter(torch.ones(3, 2))

    def closure():
        loss = (p**2).sum()
        loss.backward()
        return loss

    opt = SOAP([p])
    assert opt.step(closure).item() == 6.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), "lr must be >= 0, got -0.001"),
    (dict(betas=(1.0, 0.95)), r"beta1 must be in \[0, 1\), got 1.0"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(shampoo_beta=1.0), "shampoo_beta must be < 1"),
    (dict(eps=-1.0), "eps must be >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(precondition_frequency=0), "precondition_frequency must be an integer >= 1, got 0"),
    (dict(precondition_frequency=2.5), "precondition_frequency must be an integer >= 1, got 2.5"),
    (dict(max_precond_dim=-1), "max_precond_dim must be an integer >= 1"),
])
def test_bad_arguments_give_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        SOAP([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith("SOAP: ")


def test_bad_param_group_override_is_rejected():
    with pytest.raises(ValueError, match="SOAP: weight_decay must be >= 0"):
        SOAP([{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": -1.0}])


def test_sparse_gradient_gives_a_clear_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="SOAP got a sparse gradient \\(param group 0, parameter 0\\)") as info:
        SOAP(emb.parameters()).step()
    assert "\n" not in str(info.value)


def test_bench_soap_section_runs_on_tiny_shapes(capsys):
    """`python -m gpt2lab.bench optim --small` times SOAP against pytorch_optimizer's (timings never asserted)."""
    from gpt2lab.bench import optim as bench

    result = bench.run_soap(small=True, steps=3, frequency=3)
    assert set(result["median"]) == {"ours", "reference"} and result["ratio"] > 0
    assert all(len(kinds["plain"]) == 2 and len(kinds["refresh"]) == 1 for kinds in result["times"].values())
    assert bench.main(["--small", "--repeats", "1", "--steps", "1", "--soap-steps", "1"]) == 0
    assert "ratio ours / pytorch_optimizer: plain" in capsys.readouterr().out
