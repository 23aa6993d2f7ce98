"""Notebook 06's checks against the mistakes learners make: each planted mistake gets its own ✗ line (asserted word
for word), correct alternative formulations pass (gpt2lab.smart's own copy among them), inputs written in place and
gradients leaking into the parameters are caught, and a crash names the learner's line."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from check_helpers import NOT_YET, assert_mistake_line, assert_passes, stub

from gpt2lab import smart
from gpt2lab.checks import smart as check

# ------------------------------------------------------------------------------------------ symmetric_kl


def _rows(logits_p, logits_q, mask):
    if mask is not None:
        logits_p, logits_q = logits_p[mask], logits_q[mask]
    return F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)


def _kl(direction="both", reduce="mean", cast=True, detach=False):
    def symmetric_kl(logits_p, logits_q, mask=None):
        if not cast:
            lp, lq = (logits_p[mask], logits_q[mask]) if mask is not None else (logits_p, logits_q)
            lp, lq = lp.log_softmax(-1), lq.log_softmax(-1)
        else:
            lp, lq = _rows(logits_p, logits_q, mask)
        p, q = lp.exp(), lq.exp()
        if detach:  # smart-pytorch's sym_kl_loss: each KL differentiated through its log-prob argument only
            per = (q.detach() * (lq.detach() - lp)).sum(-1) + (p.detach() * (lp.detach() - lq)).sum(-1)
        elif direction == "pq":
            per = (p * (lp - lq)).sum(-1)
        elif direction == "qp":
            per = (q * (lq - lp)).sum(-1)
        else:
            per = ((p - q) * (lp - lq)).sum(-1)
        return per.sum() if reduce == "sum" else per.mean()
    return symmetric_kl


def _kl_unmasked(logits_p, logits_q, mask=None):
    return _kl()(logits_p, logits_q)


def _kl_zeros_counted(logits_p, logits_q, mask=None):
    lp, lq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    per = ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1)
    return (per * mask).mean() if mask is not None else per.mean()


def _kl_div_probs(logits_p, logits_q, mask=None):
    """F.kl_div given probabilities as its input (it wants log-probabilities)."""
    lp, lq = _rows(logits_p, logits_q, mask)
    p, q = lp.exp(), lq.exp()
    return (F.kl_div(p, q, reduction="sum") + F.kl_div(q, p, reduction="sum")) / p.shape[0]


def _kl_div_batchmean(logits_p, logits_q, mask=None):
    """F.kl_div(batchmean) on the whole (B, T, V) tensor, padding zeroed: divides by B only."""
    lp, lq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    if mask is not None:
        lp, lq = lp * mask[..., None], lq * mask[..., None]  # masked rows become uniform-ish zeros... both equal
    return (F.kl_div(lq, lp, reduction="batchmean", log_target=True)
            + F.kl_div(lp, lq, reduction="batchmean", log_target=True))


def _kl_class_mean(logits_p, logits_q, mask=None):
    """F.kl_div(reduction="mean") both ways: a mean over the classes too."""
    lp, lq = _rows(logits_p, logits_q, mask)
    return ((lp.exp() - lq.exp()) * (lp - lq)).mean()


def _kl_raw_logits(logits_p, logits_q, mask=None):
    a, b = (logits_p[mask], logits_q[mask]) if mask is not None else (logits_p, logits_q)
    return ((a.exp() - b.exp()) * (a - b)).sum(-1).mean()


def _kl_halved(logits_p, logits_q, mask=None):
    return _kl()(logits_p, logits_q, mask) / 2


def _kl_in_place(logits_p, logits_q, mask=None):
    logits_p -= logits_p.amax(-1, keepdim=True)  # "for stability", in the caller's logits
    return _kl()(logits_p, logits_q, mask)


def _kl_item(logits_p, logits_q, mask=None):
    return _kl()(logits_p, logits_q, mask).item()


def _kl_rewrapped(logits_p, logits_q, mask=None):
    return torch.tensor(_kl()(logits_p, logits_q, mask).item(), requires_grad=True)


def _kl_per_row(logits_p, logits_q, mask=None):
    lp, lq = _rows(logits_p, logits_q, mask)
    return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1)


def _kl_crash(logits_p, logits_q, mask=None):
    lp, lq = _rows(logits_p, logits_q, mask)
    return (lp.exp() * lq.T).sum()  # a shape error in the learner's own line


# --------------------------------------------------------------------------------------- normalize / project


def _normalize_l2(g):
    return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _normalize_guard(g):
    return g / (g.abs().amax(dim=-1, keepdim=True) + 1e-6)


def _normalize_nan(g):
    return g / g.abs().amax(dim=-1, keepdim=True)


def _normalize_in_place(g):
    g /= g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    return g


def _normalize_no_abs(g):
    return g / g.amax(dim=-1, keepdim=True)


def _project_inf_rescale(delta, eps):
    return delta * (eps / delta.abs().amax(dim=-1, keepdim=True)).clamp(max=1.0)


def _project_in_place(delta, eps):
    return delta.clamp_(-eps, eps)


# ------------------------------------------------------------------------------------------------ perturb


def _perturb(noise="std", start_noise=True, normalise="token", sign=1.0, ball="inf", input_mask_used=True,
             output_mask_used=True, backward=False, detach_result=True, extra_steps=0, recompute_clean=False,
             restart=False, in_place=False):
    """A perturb() with one thing changed (the defaults give the right answer)."""

    def perturb(fn, embeds, clean, mask=None, input_mask=None, *, eps=1e-5, step_size=1e-3, noise_var=1e-5, steps=1):
        keep = torch.ones_like(embeds[..., :1]) if input_mask is None or not input_mask_used else \
            input_mask[..., None].to(embeds.dtype)
        scale = noise_var if noise == "std" else math.sqrt(noise_var)
        delta = torch.randn_like(embeds) * scale * keep
        if not start_noise:
            delta = torch.zeros_like(embeds)
        delta = smart.project(delta, eps)
        if recompute_clean:
            clean = fn(embeds)
        if in_place:
            embeds.add_(0.0 * delta + 1.0)  # "shift the embeddings", in the caller's tensor
        base = embeds.detach()
        for _ in range(steps + extra_steps):
            delta.requires_grad_(True)
            divergence = smart.symmetric_kl(fn(base + delta), clean.detach(), mask if output_mask_used else None)
            if backward:
                divergence.backward()
                g = delta.grad
            else:
                (g,) = torch.autograd.grad(divergence, delta)
            with torch.no_grad():
                if normalise == "token":
                    direction = smart.normalize(g)
                elif normalise == "global":
                    direction = g / g.abs().max()
                else:
                    direction = g
                start = torch.zeros_like(delta) if restart else delta
                moved = start + sign * step_size * direction
                if ball == "inf":
                    delta = smart.project(moved, eps)
                else:
                    delta = moved * (eps / moved.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
                delta = delta * keep
        return delta.detach() if detach_result else delta.requires_grad_(True) * 1.0

    return perturb


def _perturb_with_stub_normalize(fn, embeds, clean, mask=None, input_mask=None, *, eps=1e-5, step_size=1e-3,
                                 noise_var=1e-5, steps=1):
    def normalize(g):  # the earlier exercise, not done yet
        raise NotImplementedError()

    delta = smart.project(torch.randn_like(embeds) * noise_var, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(smart.symmetric_kl(fn(embeds.detach() + delta), clean.detach(), mask), delta)
        delta = smart.project(delta.detach() + step_size * normalize(g), eps)
    return delta


def _perturb_no_grad_flag(fn, embeds, clean, mask=None, input_mask=None, *, eps=1e-5, step_size=1e-3,
                          noise_var=1e-5, steps=1):
    delta = torch.randn_like(embeds) * noise_var  # never told to require grad
    for _ in range(steps):
        (g,) = torch.autograd.grad(smart.symmetric_kl(fn(embeds.detach() + delta), clean, mask), delta)
        delta = smart.project(delta + step_size * smart.normalize(g), eps)
    return delta


def _perturb_crash(fn, embeds, clean, mask=None, input_mask=None, *, eps=1e-5, step_size=1e-3, noise_var=1e-5,
                   steps=1):
    delta = torch.randn_like(embeds) * noise_var
    return delta @ embeds  # a shape error in the learner's own line


# ----------------------------------------------------------------------------------------------- bregman_update


class _Bregman(smart.MomentumBregman):
    """The update with one thing changed, chosen by the class attribute `bug`."""

    bug = None

    def update(self, model):
        beta = self.beta(self.updates) if callable(self.beta) else self.beta
        if self.bug == "swapped":
            beta = 1 - beta
        params = dict(smart.trainable_parameters(model))
        if self.bug == "zip":
            params = dict(zip(self.ema, model.parameters()))
        for name, p in params.items():
            if self.bug == "graph":
                self.ema[name] = beta * self.ema[name] + (1 - beta) * p
            elif self.bug == "alias":
                self.ema[name] = p
            elif self.bug == "param_moves":
                with torch.no_grad():
                    p.mul_(beta).add_(self.ema[name], alpha=1 - beta)
            elif self.bug == "not_stored":
                _ = beta * self.ema[name] + (1 - beta) * p.detach()
            else:
                with torch.no_grad():
                    self.ema[name].mul_(beta).add_(p, alpha=1 - beta)
        if self.bug != "stuck":
            self.updates += 1


def _bregman(bug):
    return type(f"Bregman_{bug}", (_Bregman,), {"bug": bug})


class _BregmanStub(smart.MomentumBregman):
    def update(self, model):
        raise NotImplementedError()


class _BregmanNewTensors(smart.MomentumBregman):
    """A correct alternative: new tensors stored in the dict (out of place), the schedule read from self.updates."""

    def update(self, model):
        beta = self.beta(self.updates) if callable(self.beta) else self.beta
        for name, p in smart.trainable_parameters(model).items():
            self.ema[name] = beta * self.ema[name] + (1 - beta) * p.detach()
        self.updates += 1


MISTAKES = [
    # symmetric_kl
    ("symmetric_kl", stub, NOT_YET),
    ("symmetric_kl", _kl(direction="pq"), "only KL(P‖Q) (one direction): ℓ_s is symmetric, KL(P‖Q) + KL(Q‖P)"),
    ("symmetric_kl", _kl(direction="qp"), "only KL(Q‖P) (one direction): ℓ_s is symmetric, KL(P‖Q) + KL(Q‖P)"),
    ("symmetric_kl", _kl_halved, "you averaged the two KLs: ℓ_s is their sum, KL(P‖Q) + KL(Q‖P)"),
    ("symmetric_kl", _kl_raw_logits,
     "the logits were used as log-probabilities: take log_softmax(logits, dim=-1) first"),
    ("symmetric_kl", _kl_div_probs,
     "probabilities were given where log-probabilities belong: F.kl_div(input, target) takes the LOG-probabilities "
     "as input (and probabilities as target)"),
    ("symmetric_kl", _kl(reduce="sum"), "the KL is summed over the distributions: average it over the counted rows"),
    ("symmetric_kl", _kl_class_mean,
     "reduction='mean' averages over the classes too: sum over the classes (the last dim), then average over the "
     "rows"),
    ("symmetric_kl", _kl_unmasked,
     "padding is counted: keep only the rows where mask is True (logits[mask]) before averaging"),
    ("symmetric_kl", _kl_zeros_counted,
     "the masked rows are zeroed but still counted in the mean: divide by the number of counted rows (mask.sum()), "
     "not by all of them"),
    ("symmetric_kl", _kl_div_batchmean,
     "the KL is divided by the batch size only (reduction='batchmean' on (B, T, V)): average it over every counted "
     "distribution, one per token"),
    ("symmetric_kl", _kl(detach=True),
     "a gradient is missing a term: differentiate both KLs through both distributions (smart-pytorch detaches the "
     "target inside each KL; here the caller detaches what it holds constant)"),
    ("symmetric_kl", lambda p, q, mask=None: _kl()(p, q.detach(), mask),
     "no gradient reaches logits_q: do not detach either argument inside ℓ_s (the caller detaches what it holds "
     "constant)"),
    ("symmetric_kl", _kl(cast=False),
     "with bfloat16 logits the divergence is computed in torch.bfloat16: the KL of two close distributions is far "
     "below its resolution; compute in float32 (logits.float() before log_softmax)"),
    ("symmetric_kl", _kl_in_place,
     "you modified logits_p in place: read the logits, do not write into them (log_softmax, not log_softmax_ or -=)"),
    ("symmetric_kl", _kl_item, "return the divergence as a tensor (no .item()), got float"),
    ("symmetric_kl", _kl_per_row,
     "the divergence has shape (5,), expected a scalar: one number, the mean over the counted distributions"),
    ("symmetric_kl", _kl_rewrapped, "no gradient reaches logits_p: do not detach either argument inside ℓ_s (the "
                                    "caller detaches what it holds constant)"),
    ("symmetric_kl", _kl_crash, "your code raised RuntimeError: …"),
    # normalize
    ("normalize", stub, NOT_YET),
    ("normalize", _normalize_l2,
     "the gradient is normalised by its L2 norm: the inf-norm's direction divides by the largest |entry| per token "
     "(g.abs().amax(dim=-1, keepdim=True))"),
    ("normalize", lambda g: g / g.abs().max(),
     "the gradient is normalised over the whole tensor: divide each token's vector by its own largest |entry| (max "
     "over the last dim only, keepdim=True)"),
    ("normalize", _normalize_no_abs,
     "a token whose gradient is all 0 (a padding position) gives NaN: guard the division (norm.clamp_min(tiny)) so "
     "that it stays 0"),
    ("normalize", lambda g: g / g.amax(dim=-1, keepdim=True).clamp_min(1e-30),
     "a negative entry is the largest in size here: take the max of |g| (g.abs().amax(...)), not of g"),
    ("normalize", lambda g: g.sign(),
     "sign(g) is the limit of many steps, not the direction: keep the relative sizes, g / ||g||_inf"),
    ("normalize", lambda g: g / g.abs().amax(dim=1, keepdim=True).clamp_min(1e-30),
     "the max runs over the wrong dim: per token means over the channels, the last dim (dim=-1)"),
    ("normalize", _normalize_nan,
     "a token whose gradient is all 0 (a padding position) gives NaN: guard the division (norm.clamp_min(tiny)) so "
     "that it stays 0"),
    ("normalize", _normalize_guard,
     "the token with gradient ~1e-6 gets largest entry 0.581, not 1: the guard against 0 (+1e-6?) swamps tiny "
     "gradients (and near nu = 0 every gradient is tiny); only clamp the norm at a tiny value "
     "(norm.clamp_min(1e-30))"),
    ("normalize", _normalize_in_place,
     "you modified g in place: return a new tensor (g / ..., not g /= ... or div_)"),
    ("normalize", lambda g: (g / g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30))[..., :-1],
     "the direction has shape (2, 3, 4), expected (2, 3, 5): one vector per token, like g"),
    # project
    ("project", stub, NOT_YET),
    ("project", lambda d, eps: d * (eps / d.norm(dim=-1, keepdim=True)).clamp(max=1.0),
     "that is the projection onto an L2 ball: the paper's ball is the inf-norm's, so clip every entry to [-eps, eps]"),
    ("project", _project_inf_rescale,
     "you scaled the token's vector into the ball: that point is inside, but not the closest one; for the inf-norm "
     "the closest point clips each entry to [-eps, eps]"),
    ("project", lambda d, eps: d / (d.abs().amax(dim=-1, keepdim=True) + eps),
     "that is smart-pytorch's rescaling delta / (‖delta‖∞ + eps), which gives every token an inf-norm near 1: the "
     "paper projects onto the eps-ball, clipping each entry to [-eps, eps]"),
    ("project", lambda d, eps: d.clamp(max=eps), "negative entries must be clipped too, at -eps"),
    ("project", lambda d, eps: eps * d.sign(),
     "entries already inside the ball must stay as they are: clip, do not push every entry to ±eps"),
    ("project", lambda d, eps: d * min(1.0, eps / float(d.abs().max())),
     "the whole tensor is scaled by one factor: project each token (each entry, for the inf-norm) on its own"),
    ("project", _project_in_place, "you modified delta in place: return a new tensor (clamp, not clamp_)"),
    ("project", lambda d, eps: d.clamp(-eps, eps) + 1e-3 * (d.abs() < 0.1), "the projection (eps = 0.3)[…"),
    # perturb
    ("perturb", stub, NOT_YET),
    ("perturb", _perturb_with_stub_normalize,
     "not implemented yet: normalize (an earlier exercise, which this one calls: finish it first)"),
    ("perturb", _perturb(start_noise=False),
     "nu is 0: at nu = 0 the divergence is at its minimum and its gradient is exactly 0, so the ascent never moves; "
     "start from the noise, torch.randn_like(embeds) * noise_var (eps 0.5, step_size 0.3, noise_var 0.12, steps 3)"),
    ("perturb", _perturb(normalise="none"),
     "the step uses the raw gradient, which is tiny near nu = 0: normalise it per token (normalize(g)) so that every "
     "token moves by step_size (eps 0.5, step_size 0.3, noise_var 0.12, steps 3)"),
    ("perturb", _perturb(sign=-1.0),
     "that is a descent step (nu - step_size * ...): nu must go UP the divergence, nu + step_size * normalize(g) "
     "(eps 0.5, step_size 0.3, noise_var 0.12, steps 3)"),
    ("perturb", _perturb(normalise="global"),
     "the gradient is normalised over the whole batch: divide each token's gradient by its own inf-norm (normalize, "
     "exercise 2) (eps 0.5, step_size 0.3, noise_var 0.12, steps 3)"),
    ("perturb", _perturb(ball="l2"),
     "nu is projected onto an L2 ball: the paper's ball is the inf-norm's, every entry clipped to [-eps, eps] "
     "(project, exercise 3) (eps 0.5, step_size 0.3, noise_var 0.12, steps 3)"),
    ("perturb", _perturb(input_mask_used=False),
     "padding tokens are perturbed: multiply nu by input_mask[..., None] (the noise too), so padding stays 0 (eps "
     "0.5, step_size 0.3, noise_var 0.12, steps 3)"),
    ("perturb", _perturb(output_mask_used=False),
     "the divergence in the search counts padding positions: pass `mask` to symmetric_kl (eps 0.5, step_size 0.3, "
     "noise_var 0.12, steps 3)"),
    ("perturb", _perturb(restart=True),
     "each step restarts from 0 instead of moving the current nu: nu <- project(nu + step_size * normalize(g), eps) "
     "(eps 0.5, step_size 0.3, noise_var 0.12, steps 3)"),
    ("perturb", _perturb(noise="variance"),
     "the noise was scaled by sqrt(noise_var): noise_var is used as a standard deviation here (as in smart-pytorch), "
     "randn_like(embeds) * noise_var (eps 0.5, step_size 0.3, noise_var 0.12, steps 3)"),
    ("perturb", _perturb(extra_steps=1),
     "the model was called 4 times for 3 ascent steps: one forward per step (the clean logits are given: do not "
     "recompute them)"),
    ("perturb", _perturb(recompute_clean=True),
     "the model was called 4 times for 3 ascent steps: one forward per step (the clean logits are given: do not "
     "recompute them)"),
    ("perturb", _perturb(backward=True),
     "the search put gradients into the model's parameters (mix, out.grad): take the gradient with "
     "torch.autograd.grad(divergence, nu), not .backward(), so the optimizer sees only the training loss"),
    ("perturb", _perturb(detach_result=False),
     "nu is returned with a graph (requires_grad): return it detached (nu.detach()); the caller runs the adversarial "
     "forward through embeds + nu"),
    ("perturb", _perturb(in_place=True),
     "you modified embeds in place: the caller still needs them: work on new tensors (embeds + nu, not embeds += nu)"),
    ("perturb", _perturb_no_grad_flag,
     "nu records no graph when you differentiate the divergence: call nu.requires_grad_(True) before the forward, on "
     "a fresh leaf (nu.detach()) at every step (line …"),
    ("perturb", _perturb_crash, "your code raised RuntimeError: …"),
    # bregman_update
    ("bregman_update", _BregmanStub, NOT_YET),
    ("bregman_update", _bregman("swapped"),
     "the weights are swapped: θ~ keeps β of itself and moves (1 − β) toward θ (beta 0.9, update 0)"),
    ("bregman_update", _bregman("not_stored"),
     "θ~ did not change: update self.ema (in place, or store the new tensors in it) (beta 0.9, update 0)"),
    ("bregman_update", _bregman("zip"),
     "θ~ is paired with the wrong parameters: the EMA holds only the trainable ones (requires_grad), by name "
     "(trainable_parameters(model)) (beta 0.9, update 0)"),
    ("bregman_update", _bregman("stuck"),
     "self.updates is not advanced: a β schedule is a function of the update count t, so count every update "
     "(self.updates += 1) (a beta schedule (0.5 at update 0, 0.8 after), update 1)"),
    ("bregman_update", _bregman("graph"),
     "θ~['a'] records a graph (requires_grad): update it under torch.no_grad() or from p.detach(), or every step's "
     "graph is kept alive"),
    ("bregman_update", _bregman("alias"),
     "θ~['a'] is the parameter itself (the same tensor): it would follow θ exactly; keep the EMA's own tensors and "
     "update them"),
    ("bregman_update", _bregman("param_moves"),
     "you modified a in place: only θ~ moves: read the parameters (p.detach()), never write into them"),
    ("bregman_update", _bregman(None)(SimpleNamespace(outputs=lambda *args: None)),
     "pass your class (a subclass of MomentumBregman), not an instance"),
]


@pytest.mark.parametrize("name, answer, message", MISTAKES,
                         ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(MISTAKES)])
def test_each_mistake_gets_its_line(name, answer, message):
    assert_mistake_line(getattr(check, name)(answer), name, message)


def _kl_two_kl_divs(logits_p, logits_q, mask=None):
    """F.kl_div both ways with log_target (the textbook reading of the formula)."""
    lp, lq = _rows(logits_p, logits_q, mask)
    n = lp.shape[0]
    return (F.kl_div(lq, lp, reduction="sum", log_target=True) + F.kl_div(lp, lq, reduction="sum", log_target=True)) / n


def _kl_weighted_mask(logits_p, logits_q, mask=None):
    """Every row computed, then a masked mean (mask as weights)."""
    lp, lq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    per = ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1)
    if mask is None:
        return per.mean()
    return (per * mask).sum() / mask.sum()


def _perturb_paper(fn, embeds, clean, mask=None, input_mask=None, *, eps=1e-5, step_size=1e-3, noise_var=1e-5,
                   steps=1):
    """The paper's Algorithm 1 as written: the noise is not projected first (the check keeps it inside the ball)."""
    keep = 1.0 if input_mask is None else input_mask[..., None].to(embeds.dtype)
    delta = torch.randn_like(embeds) * noise_var * keep
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(smart.symmetric_kl(fn(embeds.detach() + delta), clean.detach(), mask), delta)
        delta = (delta.detach() + step_size * g / g.abs().amax(-1, keepdim=True).clamp_min(1e-30)).clamp(-eps, eps)
        delta = delta * keep
    return delta


def _perturb_library(fn, embeds, clean, mask=None, input_mask=None, **settings):
    return smart.perturb(fn, embeds, clean, mask, input_mask, **settings)


ALTERNATIVES = [
    ("symmetric_kl", smart.symmetric_kl),
    ("symmetric_kl", _kl()),
    ("symmetric_kl", _kl_two_kl_divs),
    ("symmetric_kl", _kl_weighted_mask),
    ("normalize", smart.normalize),
    ("normalize", lambda g: g / g.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)),
    ("normalize", lambda g: torch.nan_to_num(g / g.norm(p=float("inf"), dim=-1, keepdim=True))),
    ("project", smart.project),
    ("project", lambda d, eps: torch.clamp(d, min=-eps, max=eps)),
    ("project", lambda d, eps: d.sign() * d.abs().clamp(max=eps)),
    ("perturb", _perturb()),
    ("perturb", _perturb_paper),
    ("perturb", _perturb_library),
    ("bregman_update", smart.MomentumBregman),
    ("bregman_update", _bregman(None)),
    ("bregman_update", _BregmanNewTensors),
]


@pytest.mark.parametrize("name, answer", ALTERNATIVES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ALTERNATIVES)])
def test_correct_answers_pass(name, answer):
    assert_passes(getattr(check, name)(answer), name)


@pytest.mark.parametrize("name, answer, line", [("symmetric_kl", _kl_crash, "lq.T"),
                                                ("perturb", _perturb_crash, "delta @ embeds"),
                                                ("perturb", _perturb_no_grad_flag, "torch.autograd.grad(")])
def test_the_crash_line_names_the_learners_line(name, answer, line):
    message = str(getattr(check, name)(answer))
    assert "(line " in message and line in message, message


def test_the_perturb_check_separates_its_near_misses():
    """Every planted perturb mistake is far (>> the check's atol 1e-5) from the right nu on the check's first
    setting, so none can pass by accident."""
    model, ids, input_mask, mask = check._perturb_case()
    embeds = model.wte[ids]
    clean = model(embeds)
    noise = check._noise(embeds, 0) * 0.12
    right = check._search(model, embeds, clean, mask, input_mask, noise, 0.5, 0.3, 3)
    for bug in check.PERTURB_HINTS:
        wrong = check._search(model, embeds, clean, mask, input_mask, noise, 0.5, 0.3, 3, bug)
        assert (wrong - right).abs().max() > 1e-3, bug
