"""gpt2lab.smart: the symmetric KL, the perturbation (eps-ball, normalised ascent), compat mode against smart-pytorch's
SMARTLoss, the momentum Bregman term and its EMA, composition with LoRA and other optimizers, exact resume through
the training loop, one-line errors, and a smoke run of `python -m gpt2lab.bench smart`. Tiny random models only."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import smart_pytorch
import torch
import torch.nn.functional as F
from test_train import ToyTask, assert_same_params, toy_config, toy_model
from tiny_tasks import PAIRS, tiny_model

from gpt2lab import lora, smart, tasks
from gpt2lab.train import train


class Toy(ToyTask):
    """The training loop's character-level LM task (dropout 0.1 model), taking the loop's progress option."""

    def evaluate(self, model, progress=None):
        return super().evaluate(model)


def toy_batch(task, n=3, length=None):
    examples = task.train_set[:n] if length is None else [e[:length] for e in task.train_set[:n]]
    return task.collate(examples)


def reference_sym_kl(a, b, mask=None):
    """KL(P||Q) + KL(Q||P) averaged over rows, written with F.kl_div (the reference, not the code under test)."""
    if mask is not None:
        a, b = a[mask], b[mask]
    la, lb = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    rows = F.kl_div(lb, la, log_target=True, reduction="none").sum(-1) + \
        F.kl_div(la, lb, log_target=True, reduction="none").sum(-1)
    return rows.mean()


@pytest.fixture(params=["lm", "cloze"])
def case(request):
    """(task, model in eval mode, batch) for each loss shape: the char LM and the paraphrase cloze."""
    if request.param == "lm":
        task = Toy()
        return task, toy_model().eval(), toy_batch(task)
    task = tasks.ParaphraseTask(request.getfixturevalue("tokenizer"), PAIRS, PAIRS[:2], max_length=128, progress=False)
    return task, tiny_model(seed=3).eval(), task.collate(PAIRS)


# ---------------------------------------------------------------------------------------------- symmetric KL


def test_symmetric_kl_values_match_smart_pytorch():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    value = smart.symmetric_kl(p.log(), q.log())
    assert value.item() == pytest.approx(0.8788897, abs=1e-6)
    assert smart_pytorch.sym_kl_loss(q.log(), p.log()).item() == pytest.approx(value.item(), abs=1e-6)
    assert smart.symmetric_kl(q.log(), p.log()).item() == pytest.approx(value.item(), abs=1e-7)  # symmetric
    assert smart.symmetric_kl(p.log(), p.log()).item() == 0.0
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, 11, generator=g), torch.randn(4, 5, 11, generator=g)
    mask = torch.rand(4, 5, generator=g) > 0.4
    n = int(mask.sum())
    ours = smart.symmetric_kl(a, b, mask)
    # smart-pytorch sums over rows (reduction "sum"): ours is its mean over the counted rows
    assert ours.item() == pytest.approx(smart_pytorch.sym_kl_loss(a[mask], b[mask]).item() / n, rel=1e-5)
    assert ours.item() == pytest.approx(reference_sym_kl(a, b, mask).item(), rel=1e-5)
    assert smart.symmetric_kl(a, b, torch.zeros(4, 5, dtype=torch.bool)).item() == 0.0  # nothing counted


def test_symmetric_kl_gradient_flows_into_both_arguments():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 7, generator=g, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, 7, generator=g, dtype=torch.double, requires_grad=True)
    torch.autograd.gradcheck(lambda x, y: reference_sym_kl(x, y), (a, b))
    smart.symmetric_kl(a, b).backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    reference_sym_kl(a, b).backward()
    torch.testing.assert_close(ga, a.grad.float().double(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gb, b.grad.float().double(), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- normalize, project


def test_normalize_and_project():
    g = torch.tensor([[[3.0, -6.0, 1.5], [0.0, 0.0, 0.0]], [[1e-30, -2e-30, 0.0], [0.5, 0.25, -0.25]]])
    n = smart.normalize(g)
    torch.testing.assert_close(n, torch.tensor([[[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]],
                                                [[0.5, -1.0, 0.0], [1.0, 0.5, -0.5]]]))
    d = torch.tensor([[0.3, -0.01, 0.02]])
    torch.testing.assert_close(smart.project(d, 0.02), torch.tensor([[0.02, -0.01, 0.02]]))
    assert smart.inf_norm(g).shape == (2, 2, 1)


# ---------------------------------------------------------------------------------------------- the regularizer


def test_regularizer_is_zero_without_perturbation_and_positive_with(case):
    task, model, batch = case
    out = task.outputs(model, batch)
    assert smart.SmartRegularizer(task, eps=0.0, step_size=1e-2, steps=2)(model, batch, out).item() == 0.0
    assert smart.SmartRegularizer(task, noise_var=0.0, steps=0)(model, batch, out).item() == 0.0
    assert smart.SmartRegularizer(task, weight=0.0, eps=1.0)(model, batch, out).item() == 0.0
    torch.manual_seed(0)
    positive = smart.SmartRegularizer(task, eps=1e-2, step_size=1e-2, noise_var=1e-3)(model, batch, out)
    assert positive.item() > 1e-9
    # the weight scales the term (same seed, same perturbation)
    torch.manual_seed(0)
    doubled = smart.SmartRegularizer(task, weight=2.0, eps=1e-2, step_size=1e-2, noise_var=1e-3)(model, batch, out)
    assert doubled.item() == pytest.approx(2 * positive.item(), rel=1e-6)


def test_perturbation_stays_in_the_eps_ball_and_off_the_padding():
    task, model = Toy(), toy_model().eval()
    batch = task.collate([task.train_set[0], task.train_set[1][:20], task.train_set[2][:9]])  # right-padded
    out = task.outputs(model, batch)
    embeds = task.embeddings(model, batch)
    fn = lambda e: task.outputs(model, batch, e).logits
    for eps, noise, steps in ((1e-3, 1e-2, 0), (1e-3, 1e-2, 1), (2e-2, 1e-5, 3), (0.5, 1.0, 2)):
        torch.manual_seed(0)
        delta = smart.perturb(fn, embeds, out.logits, out.mask, batch["attention_mask"], eps=eps, step_size=1e-1,
                              noise_var=noise, steps=steps)
        assert delta.shape == embeds.shape and not delta.requires_grad
        norms = smart.inf_norm(delta)[..., 0]  # (B, T)
        assert norms.max() <= torch.tensor(eps), (eps, noise, steps)  # eps as float32, like delta
        assert (norms[batch["attention_mask"] == 0] == 0).all()  # padding is never perturbed
        if steps:  # step_size >> eps: every token that moves a counted output ends on the ball's surface
            # (the last real token of a row predicts nothing counted: its gradient is 0 and it keeps its noise)
            torch.testing.assert_close(norms[out.mask], torch.full_like(norms[out.mask], eps))


def test_one_ascent_step_is_the_clipped_normalised_gradient():
    """noise 0, one step: nu = project(step_size * g / ||g||_inf, eps), g the gradient at nu = 0 (computed here)."""
    task, model = Toy(), toy_model(seed=2).eval()
    batch = toy_batch(task, length=30)
    out = task.outputs(model, batch)
    embeds = task.embeddings(model, batch).detach()
    target = out.logits.detach().roll(1, dims=-1)  # another target, so the gradient at nu = 0 is not 0
    fn = lambda e: task.outputs(model, batch, e).logits
    zero = torch.zeros_like(embeds, requires_grad=True)
    loss = reference_sym_kl(fn(embeds + zero), target, out.mask)
    (g,) = torch.autograd.grad(loss, zero)
    g = g.float()
    moved = out.mask  # (B, T): the tokens whose gradient is not 0 (the last one of a row predicts nothing counted)
    expected = (1e-2 * g[moved] / g[moved].abs().amax(-1, keepdim=True)).clamp(-1e-3, 1e-3)
    delta = smart.perturb(fn, embeds, target, out.mask, eps=1e-3, step_size=1e-2, noise_var=0.0, steps=1)
    torch.testing.assert_close(delta[moved], expected, atol=1e-7, rtol=0)  # 1e-4 of eps: float32 vs float64 g
    assert (delta[~moved] == 0).all()
    eps32 = torch.tensor(1e-3)
    assert (delta[moved].abs().amax(-1) == eps32).all()  # each token's largest entry lands on the surface
    on_surface = delta.abs() == eps32
    assert on_surface.sum() > moved.sum() and (delta.sign()[on_surface] == g.sign()[on_surface]).all()


def test_search_leaves_gradients_and_requires_grad_alone(case):
    task, model, batch = case
    out = task.outputs(model, batch)
    params = dict(model.named_parameters())
    params["transformer.h.0.attn.c_attn.weight"].grad = torch.ones_like(params["transformer.h.0.attn.c_attn.weight"])
    fn = lambda e: task.outputs(model, batch, e).logits
    smart.perturb(fn, task.embeddings(model, batch), out.logits, out.mask, eps=1e-2, steps=2)
    for name, p in params.items():
        assert p.grad is None or name == "transformer.h.0.attn.c_attn.weight", name
    assert (params["transformer.h.0.attn.c_attn.weight"].grad == 1).all()
    with smart.frozen(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match="boom"), smart.frozen(model):
        raise RuntimeError("boom")
    assert all(p.requires_grad for p in model.parameters())  # restored after an error too


def test_gradients_reach_the_parameters_through_both_branches(case):
    task, model, batch = case
    reg = smart.SmartRegularizer(task, eps=1e-2, step_size=1e-2, noise_var=1e-3)
    torch.manual_seed(0)
    reg(model, batch, task.outputs(model, batch)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight",
                 "transformer.ln_f.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    both = {n: g.clone() for n, g in grads.items() if g is not None}
    model.zero_grad(set_to_none=True)
    out = task.outputs(model, batch)  # the same perturbation, the clean branch held constant
    torch.manual_seed(0)
    reg(model, batch, tasks.TaskOutputs(out.logits.detach(), out.mask, out.loss)).backward()
    one = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(not torch.allclose(both[n], one[n]) for n in one)  # the clean branch contributes its own gradient


# ---------------------------------------------------------------------------------------------- compat mode


def test_compat_mode_equals_smart_pytorch(case):
    """Same model function, same noise (one randn_like after the same seed), K = 0, 1, 3 ascent steps.

    With the same divergence in SMARTLoss the perturbation procedure is compared alone: equal bit for bit. With an
    independent float64 divergence (F.kl_div) the whole term agrees to float32 rounding.
    """
    task, model, batch = case
    if task.name == "sonnet":  # smart-pytorch knows no padding: unpadded rows
        batch = toy_batch(task, length=25)
    out = task.outputs(model, batch)
    mask, params = out.mask, list(model.parameters())
    settings = dict(step_size=1e-3, noise_var=1e-5)
    fn = lambda e: task.outputs(model, batch, e).logits
    for steps in (0, 1, 3):
        torch.manual_seed(steps)
        ours = smart.SmartRegularizer(task, eps=1e-6, steps=steps, compat=True, **settings)(model, batch, out)
        ours_grads = torch.autograd.grad(ours, params, retain_graph=True)
        for name, divergence, tol in (("same l_s", lambda a, b: smart.symmetric_kl(a, b, mask), 0.0),
                                      ("float64 l_s", lambda a, b: reference_sym_kl(a, b, mask).float(), 1e-6)):
            reference = smart_pytorch.SMARTLoss(fn, divergence, num_steps=steps, epsilon=1e-6, **settings)
            torch.manual_seed(steps)
            theirs = reference(task.embeddings(model, batch), out.logits)
            theirs_grads = torch.autograd.grad(theirs, params, retain_graph=True)
            error = abs(ours.item() - theirs.item())
            grad_error = max((a - b).abs().max().item() for a, b in zip(ours_grads, theirs_grads))
            print(f"compat {task.name} K={steps} {name}: ours {ours.item():.9g} smart-pytorch {theirs.item():.9g} "
                  f"|diff| {error:.3g}, max grad diff {grad_error:.3g}")
            assert error <= tol * max(1.0, abs(theirs.item())), (steps, name)
            assert grad_error <= 100 * tol, (steps, name)
        assert theirs.item() > 1e-4 or steps == 0  # the ascent moved: not a comparison of zeros


def test_compat_mode_leaves_unit_norm_tokens_not_the_eps_ball():
    task, model = Toy(), toy_model().eval()
    batch = toy_batch(task, length=25)
    out = task.outputs(model, batch)
    torch.manual_seed(0)
    delta = smart.perturb(lambda e: task.outputs(model, batch, e).logits, task.embeddings(model, batch),
                          out.logits, out.mask, eps=1e-6, step_size=1e-3, noise_var=1e-5, steps=1, compat=True)
    norms = smart.inf_norm(delta)
    # ||u|| / (||u|| + eps) with ||u|| ~ 1e-5: about 0.9 per token, nowhere near eps = 1e-6
    assert norms.min().item() > 0.5 and norms.max().item() < 1.0


# ---------------------------------------------------------------------------------------------- the Bregman term


def test_bregman_is_zero_at_the_ema_and_positive_away_from_it(case):
    task, model, batch = case
    prox = smart.MomentumBregman(task, weight=1.0, beta=0.5)
    prox.reset(model)
    assert prox(model, batch, task.outputs(model, batch)).item() == 0.0
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(0.05)
    value = prox(model, batch, task.outputs(model, batch))
    assert value.item() > 0 and value.requires_grad


def test_teacher_logits_are_those_of_a_model_holding_the_ema(case):
    task, model, batch = case
    prox = smart.MomentumBregman(task)
    prox.reset(model)
    g = torch.Generator().manual_seed(0)
    for v in prox.ema.values():  # an EMA away from the model, the tied embedding/head included
        v.add_(0.02 * torch.randn(v.shape, generator=g))
    teacher = copy.deepcopy(model)
    teacher.load_state_dict(prox.ema, strict=False)
    assert teacher.lm_head.weight is teacher.transformer.wte.weight
    expected = task.outputs(teacher, batch).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.testing.assert_close(prox.teacher_logits(model, batch), expected, atol=0, rtol=0)
    for k, v in model.state_dict().items():  # the model itself untouched
        assert torch.equal(v, before[k]), k


def test_ema_update_math_and_schedule():
    model = toy_model()
    prox = smart.MomentumBregman(Toy(), beta=lambda t: 0.5 if t < 1 else 0.9)
    prox.reset(model)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = dict(theta0)
    for t, beta in enumerate((0.5, 0.9, 0.9)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (t + 1))
        prox.update(model)
        expected = {n: beta * expected[n] + (1 - beta) * p.detach() for n, p in model.named_parameters()}
        for n in expected:
            torch.testing.assert_close(prox.ema[n], expected[n], atol=1e-7, rtol=0)
    assert prox.updates == 3
    assert set(prox.ema) == {n for n, _ in model.named_parameters()}  # the tied head is the embedding: once


def test_ema_copies_only_the_trainable_parameters():
    model = toy_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("transformer.ln_f."))
    prox = smart.MomentumBregman(Toy())
    prox.reset(model)
    assert sorted(prox.ema) == ["transformer.ln_f.bias", "transformer.ln_f.weight"]
    lora_model = lora.add_lora(toy_model(), rank=2, targets="q,v")
    prox.reset(lora_model)
    names = sorted(prox.ema)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


# ---------------------------------------------------------------------------------------------- composition, resume


def smart_run(tmp_path, model, make_optimizer=torch.optim.AdamW, interrupt_at=None, resume=False, **config):
    """SMART + Bregman through the loop; returns the model, the record and the Bregman callback."""
    task = Toy()
    prox = smart.MomentumBregman(task, weight=0.5, beta=lambda t: 0.5 if t < 3 else 0.9)
    objective = smart.smart_objective(task, weight=2.0, eps=1e-2, step_size=1e-2, noise_var=1e-3, proximal=prox)
    callbacks = [prox]
    if interrupt_at is not None:
        def interrupt(loop):
            if loop.step == interrupt_at:
                raise KeyboardInterrupt
        callbacks.append(interrupt)
    record = train(model, objective, make_optimizer, toy_config(tmp_path, resume=resume, **config), callbacks)
    return model, record, prox


def assert_exact_resume(tmp_path, make_model, make_optimizer=torch.optim.AdamW, monkeypatch=None):
    """8 steps in one go == 5 steps interrupted (last checkpoint: step 4) + resumed, weights and EMA bit for bit.

    With `monkeypatch`: also resumes a copy of the interrupted run without restoring the EMA, which must differ
    (the equality is not vacuous).
    """
    config = dict(epochs=2)
    full, full_record, full_prox = smart_run(tmp_path / "full", make_model(), make_optimizer, **config)
    with pytest.raises(KeyboardInterrupt):
        smart_run(tmp_path / "cut", make_model(), make_optimizer, interrupt_at=5, **config)
    if monkeypatch is not None:
        shutil.copytree(tmp_path / "cut", tmp_path / "forgetful")
    resumed, record, prox = smart_run(tmp_path / "cut", make_model(seed=9), make_optimizer, resume=True, **config)
    assert record["resumed_from_step"] == 4 and record["steps"] == full_record["steps"] == 8
    assert_same_params(full, resumed)
    assert full_prox.updates == prox.updates == 8
    for k, v in full_prox.ema.items():
        assert torch.equal(v, prox.ema[k]), k
    assert [e["dev_loss"] for e in record["evals"]] == [e["dev_loss"] for e in full_record["evals"]]
    assert record["loss_log"] == full_record["loss_log"]
    if monkeypatch is not None:
        monkeypatch.setattr(smart.MomentumBregman, "load_state_dict", lambda self, state: None)
        forgetful, _, _ = smart_run(tmp_path / "forgetful", make_model(), make_optimizer, resume=True, **config)
        assert any(not torch.equal(p, q) for p, q in zip(full.parameters(), forgetful.parameters()))
    return full, full_record, full_prox


def test_exact_resume_with_smart_and_bregman(tmp_path, monkeypatch):
    full, record, prox = assert_exact_resume(tmp_path, toy_model, monkeypatch=monkeypatch)
    assert [t["name"] for t in record["task"]["extra_losses"]] == ["smart", "bregman"]
    # the regularised run is another run than the plain one, and the EMA lags the weights
    plain = toy_model()
    train(plain, Toy(), torch.optim.AdamW, toy_config(None, evaluate=False, epochs=2))
    assert any(not torch.equal(p, q) for p, q in zip(full.parameters(), plain.parameters()))
    assert any(not torch.equal(prox.ema[n], p) for n, p in full.named_parameters())


def lora_model(seed=0):
    model = toy_model(seed=0)  # one base (the checkpoint fingerprints it); the adapters come from the seed
    torch.manual_seed(seed)
    return lora.add_lora(model, rank=2, alpha=4, targets="q,v")


def test_exact_resume_with_lora_and_smart(tmp_path):
    full, _, prox = assert_exact_resume(tmp_path, lora_model)
    assert prox.ema and all(".lora_" in n for n in prox.ema)
    ckpt = torch.load(tmp_path / "cut" / "toy" / "checkpoint.pt", weights_only=False)
    assert ckpt["callbacks"][0]["name"] == "MomentumBregman"
    assert sorted(ckpt["callbacks"][0]["state"]["ema"]) == sorted(prox.ema)  # only the adapters' EMA is saved
    fresh = lora_model()
    for (name, p), q in zip(full.named_parameters(), fresh.parameters()):
        if not p.requires_grad:  # the frozen base did not move
            assert torch.equal(p, q), name


def test_composes_with_sgd():
    sgd = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)
    model, record, prox = smart_run(None, toy_model(), sgd, max_steps=4, evaluate=False)
    assert record["status"] == "completed" and record["optimizer"]["name"] == "SGD" and prox.updates == 4
    plain = toy_model()
    train(plain, Toy(), sgd, toy_config(None, max_steps=4, evaluate=False))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


# ---------------------------------------------------------------------------------------------- errors, bench


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=-1e-5), r"eps must be a number >= 0"),
    (dict(steps=-1), r"steps must be a whole number >= 0"),
    (dict(steps=1.5), r"steps must be a whole number >= 0"),
    (dict(noise_var=-1.0), r"noise_var must be a number >= 0"),
    (dict(step_size=float("nan")), r"step_size must be a number >= 0"),
    (dict(weight=-2), r"weight must be a number >= 0"),
    (dict(compat="yes"), r"compat must be True or False"),
])
def test_bad_settings_get_one_line(kwargs, message):
    with pytest.raises(smart.SmartError, match=message) as err:
        smart.smart_objective(Toy(), **kwargs)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_bregman_misuse_gets_one_line():
    task, model = Toy(), toy_model()
    with pytest.raises(smart.SmartError, match=r"beta must be a number in \[0, 1\]"):
        smart.MomentumBregman(task, beta=1.5)
    prox = smart.MomentumBregman(task, beta=lambda t: 2.0)
    batch = toy_batch(task)
    with pytest.raises(smart.SmartError, match=r"no EMA yet: pass it to train\(\.\.\., callbacks=\[it\]\)"):
        prox(model, batch, task.outputs(model, batch))
    prox.reset(model)
    with pytest.raises(smart.SmartError, match=r"beta must be a number in \[0, 1\]"):
        prox.update(model)
    model.transformer.wpe.weight.requires_grad_(False)
    with pytest.raises(smart.SmartError, match=r"call reset\(model\) after changing what is trained"):
        prox(model, batch, task.outputs(model, batch))
    with pytest.raises(smart.SmartError, match=r"proximal must be a MomentumBregman"):
        smart.smart_objective(task, proximal=object())
    with pytest.raises(smart.SmartError, match=r"needs a task with embeddings"):
        smart.SmartRegularizer(object())
    with pytest.raises(smart.SmartError, match=r"symmetric_kl compares logits of one shape"):
        smart.symmetric_kl(torch.zeros(2, 3), torch.zeros(3, 3))
    assert math.isfinite(smart.symmetric_kl(torch.zeros(2, 3), torch.zeros(2, 3)).item())


def test_bench_smart_tiny_runs(capsys):
    from gpt2lab.bench import __main__ as dispatcher

    assert dispatcher.main(["smart", "--tiny", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    for line in ("lm: tiny", "cloze: tiny", "smart K=1 ", "smart K=1 + bregman", "ratio to plain"):
        assert line in out, line
