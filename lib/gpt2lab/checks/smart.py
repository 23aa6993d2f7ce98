"""Check cells of notebook 06 (smart): the symmetric KL, the normalised ascent direction, the projection onto the
eps-ball, the adversarial perturbation, and the EMA update of the Bregman proximal term.

Each check feeds the learner's code small cases where the common mistakes give a different answer, and names them:
a one-way KL, averaged KLs, logits or probabilities where log-probabilities belong, padding counted, a summed or
per-class mean, bfloat16 arithmetic, a detached argument; an L2 or global normalisation, a guard that swamps tiny
gradients, NaN for a zero gradient; an L2 projection, a rescaling instead of a clip, smart-pytorch's unit-norm
rescaling; the ascent without noise (it never moves: the gradient of the divergence is 0 at nu = 0), without
normalisation, downhill, with the wrong number of steps, padding perturbed, padding counted in the divergence, noise
drawn with the variance as scale, gradients leaking into the parameters (backward instead of autograd.grad), a
perturbation returned with its graph, the clean logits recomputed; the EMA with swapped weights, a stuck update count,
parameters paired with the wrong EMA entries, a graph recorded, the parameters moved instead of the EMA.

References are computed by hand here (torch ops), never with `gpt2lab.smart`, whose copy the notebook teaches. The
learner's functions get the real tensors and must leave them unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .core import (
    _close,
    _last_user_frame,
    check,
    compare,
    compare_with_hints,
    earlier_stubs,
    expect,
    known_mistake,
    untouched,
)

# ------------------------------------------------------------------------------------------ §1 the symmetric KL


def _kl_by_hand(a: torch.Tensor, b: torch.Tensor, mask=None, variant: str = "right") -> torch.Tensor:
    """KL(P||Q) + KL(Q||P) of softmax(a), softmax(b) in float64, mean over the counted rows (or a known mistake)."""
    a, b = a.double(), b.double()
    rows_a, rows_b = (a, b) if mask is None or variant == "unmasked" else (a[mask], b[mask])
    log_p, log_q = rows_a.log_softmax(-1), rows_b.log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    terms = {
        "right": ((p - q) * (log_p - log_q)).sum(-1),
        "p_q": (p * (log_p - log_q)).sum(-1),
        "q_p": (q * (log_q - log_p)).sum(-1),
        "halved": 0.5 * ((p - q) * (log_p - log_q)).sum(-1),
        "raw_logits": ((rows_a.exp() - rows_b.exp()) * (rows_a - rows_b)).sum(-1),
        "probs_as_log": (q * (log_q - p) + p * (log_p - q)).sum(-1),
        "unmasked": ((p - q) * (log_p - log_q)).sum(-1),
    }
    per_row = terms.get(variant, terms["right"])
    if variant == "sum":
        return per_row.sum()
    if variant == "batchmean":  # F.kl_div(reduction="batchmean") on the full tensor: the sum over dim 0's size
        return per_row.sum() / a.shape[0]
    if variant == "zeros_counted":  # masked rows zeroed but counted in the mean
        return per_row.sum() / a[..., 0].numel()
    if variant == "class_mean":  # reduction="mean": over the classes too
        return per_row.sum() / (per_row.numel() * a.shape[-1])
    return per_row.sum() / max(per_row.numel(), 1)


KL_HINTS = {
    "p_q": "only KL(P‖Q) (one direction): ℓ_s is symmetric, KL(P‖Q) + KL(Q‖P)",
    "q_p": "only KL(Q‖P) (one direction): ℓ_s is symmetric, KL(P‖Q) + KL(Q‖P)",
    "halved": "you averaged the two KLs: ℓ_s is their sum, KL(P‖Q) + KL(Q‖P)",
    "raw_logits": "the logits were used as log-probabilities: take log_softmax(logits, dim=-1) first",
    "probs_as_log": "probabilities were given where log-probabilities belong: F.kl_div(input, target) takes the "
                    "LOG-probabilities as input (and probabilities as target)",
    "sum": "the KL is summed over the distributions: average it over the counted rows",
    "batchmean": "the KL is divided by the batch size only (reduction='batchmean' on (B, T, V)): average it over every "
                 "counted distribution, one per token",
    "zeros_counted": "the masked rows are zeroed but still counted in the mean: divide by the number of counted rows "
                     "(mask.sum()), not by all of them",
    "class_mean": "reduction='mean' averages over the classes too: sum over the classes (the last dim), then average "
                  "over the rows",
    "unmasked": "padding is counted: keep only the rows where mask is True (logits[mask]) before averaging",
}


def _logits(*shape, seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _lm_case():
    """(2, 4, 7) logits, right padding in row 1: its last two positions do not count, and there the two
    distributions disagree wildly (so counting them shows)."""
    p, q = _logits(2, 4, 7, seed=1), _logits(2, 4, 7, seed=2)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    q[~mask] = -4 * p[~mask]
    return p, q, mask


def _scalar(got, what: str = "the divergence") -> torch.Tensor:
    expect(torch.is_tensor(got), f"return {what} as a tensor (no .item()), got {type(got).__name__}")
    expect(got.dim() == 0, f"{what} has shape {tuple(got.shape)}, expected a scalar: one number, the mean over the "
                           "counted distributions")
    return got


def _kl_case(fn, label: str, p: torch.Tensor, q: torch.Tensor, mask) -> None:
    """One case of the symmetric_kl check: the value (with the known mistakes' hints), then both gradients."""
    given = dict(logits_p=p, logits_q=q) if mask is None else dict(logits_p=p, logits_q=q, mask=mask)
    with untouched("read the logits, do not write into them (log_softmax, not log_softmax_ or -=)", **given):
        got = _scalar(fn(p, q) if mask is None else fn(p, q, mask))
    expected = _kl_by_hand(p, q, mask)
    relative = 1e-5 * max(1.0, float(got.detach().abs()))  # a mistake's value can be large (exp of raw logits)
    known_mistake(got, expected, relative, [(KL_HINTS[v], lambda v=v: _kl_by_hand(p, q, mask, v)) for v in KL_HINTS])
    compare(f"the divergence ({label})", got.detach(), expected, atol=1e-5)
    # gradients into both arguments: the adversarial term trains through the clean AND the perturbed outputs
    a, b = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
    got = _scalar(fn(a, b) if mask is None else fn(a, b, mask))
    expect(got.requires_grad, "the divergence carries no gradient: compute it with torch operations from the "
                               "logits (no .item(), .detach() or torch.no_grad)")
    got_a, got_b = torch.autograd.grad(got, (a, b), allow_unused=True)
    ra, rb = p.double().requires_grad_(True), q.double().requires_grad_(True)
    exp_a, exp_b = torch.autograd.grad(_kl_by_hand(ra, rb, mask), (ra, rb))
    for name, g in (("logits_p", got_a), ("logits_q", got_b)):
        expect(g is not None, f"no gradient reaches {name}: do not detach either argument inside ℓ_s (the "
                              "caller detaches what it holds constant)")
    hint = ("a gradient is missing a term: differentiate both KLs through both distributions (smart-pytorch "
            "detaches the target inside each KL; here the caller detaches what it holds constant)")
    for name, g, e in (("logits_p", got_a, exp_a), ("logits_q", got_b, exp_b)):
        expect(_close(g, e, 1e-5) or not _close(got.detach(), _kl_by_hand(p, q, mask), 1e-5), hint)
        compare(f"the gradient w.r.t. {name} ({label})", g, e, atol=1e-5)


@check("symmetric_kl")
def symmetric_kl(fn):
    """fn(logits_p, logits_q, mask=None) -> scalar: mean over the counted rows of KL(P||Q) + KL(Q||P)."""
    cases = {  # the LM case first: with 2 classes, a mean over the classes would look like halving the sum
        "next-token logits (B, T, V) with padding": _lm_case(),
        "paraphrase answers (B, 2), no mask": (_logits(5, 2, seed=3), _logits(5, 2, seed=4), None),
    }
    for label, (p, q, mask) in cases.items():
        _kl_case(fn, label, p, q, mask)
    # two close distributions in bfloat16 (the logits of a model under autocast): the KL is ~1e-3, far below bf16's
    # resolution of a log-probability, so it must be computed in float32
    p = _logits(6, 50, seed=5).bfloat16()
    q = (p.float() + 0.03 * _logits(6, 50, seed=6, scale=1.0)).bfloat16()
    got = _scalar(fn(p, q))
    expected = _kl_by_hand(p, q)
    expect(got.dtype not in (torch.bfloat16, torch.float16) or _close(got.float(), expected, 2e-5),
           f"with bfloat16 logits the divergence is computed in {got.dtype}: the KL of two close distributions is "
           "far below its resolution; compute in float32 (logits.float() before log_softmax)")
    compare("the divergence of two close bfloat16 distributions (compute in float32)", got.float(), expected,
            atol=2e-5)
    return ("KL(P‖Q) + KL(Q‖P) from log_softmax, mean over the counted rows (padding left out), in float32; gradients "
            "reach both arguments")


# ------------------------------------------------------------------------------ §2 normalize and project


def _token_scales() -> torch.Tensor:
    """(2, 3, 5) gradients with very different sizes per token (1e-6 to 10), a token whose largest entry is
    negative, and an all-zero token (a padding position's gradient)."""
    g = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(7))
    scales = torch.tensor([[1.0, 10.0, 1e-6], [0.3, 0.0, 2.0]])
    g = g * scales[..., None]
    g[1, 0, 2] = -5 * g[1, 0].abs().max()  # the largest entry of this token is negative
    return g


@check("normalize")
def normalize(fn):
    """fn(g) -> g / ||g||_inf per token (over the last dim), a zero token staying 0."""
    g = _token_scales()
    with untouched("return a new tensor (g / ..., not g /= ... or div_)", g=g):
        got = fn(g)
    expect(torch.is_tensor(got), f"return a tensor, got {type(got).__name__}")
    expect(tuple(got.shape) == tuple(g.shape), f"the direction has shape {tuple(got.shape)}, expected "
                                              f"{tuple(g.shape)}: one vector per token, like g")
    norm = g.abs().amax(dim=-1, keepdim=True)  # (B, T, 1)
    expected = torch.where(norm > 0, g / norm.clamp_min(1e-30), torch.zeros_like(g))
    zero = norm[..., 0] == 0  # (B, T): the all-zero token
    expect(bool(torch.isfinite(got[zero]).all()), "a token whose gradient is all 0 (a padding position) gives NaN: "
                                                  "guard the division (norm.clamp_min(tiny)) so that it stays 0")
    tiny = got[0, 2].abs().max()
    expect(not _close(got[~zero], expected[~zero], 1e-5) or _close(got, expected, 1e-5),
           "the zero token must stay 0: divide by the clamped norm, do not replace it")
    mistakes = [
        ("the gradient is normalised by its L2 norm: the inf-norm's direction divides by the largest |entry| per "
         "token (g.abs().amax(dim=-1, keepdim=True))", lambda: g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)),
        ("the gradient is normalised over the whole tensor: divide each token's vector by its own largest |entry| "
         "(max over the last dim only, keepdim=True)", lambda: g / g.abs().max()),
        ("a negative entry is the largest in size here: take the max of |g| (g.abs().amax(...)), not of g",
         lambda: torch.where(zero[..., None], 0.0, g / g.amax(dim=-1, keepdim=True))),
        ("sign(g) is the limit of many steps, not the direction: keep the relative sizes, g / ||g||_inf",
         lambda: g.sign()),
        ("the max runs over the wrong dim: per token means over the channels, the last dim (dim=-1)",
         lambda: g / g.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)),
    ]
    known_mistake(got, expected, 1e-5, mistakes)
    expect(not (0 < tiny < 0.999 and _close(got[0, :2], expected[0, :2], 1e-5)),
           f"the token with gradient ~1e-6 gets largest entry {tiny:.3g}, not 1: the guard against 0 (+1e-6?) swamps "
           "tiny gradients (and near nu = 0 every gradient is tiny); only clamp the norm at a tiny value "
           "(norm.clamp_min(1e-30))")
    compare("the normalised direction", got, expected, atol=1e-5)
    return "g / ‖g‖∞ per token (each token's largest |entry| becomes 1), a zero gradient stays 0"


def _deltas() -> tuple[torch.Tensor, float]:
    """(2, 3, 5) perturbations around an eps of 0.3: some entries inside, some beyond, one token wholly inside."""
    delta = 0.4 * torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(8))
    delta[0, 1] = delta[0, 1].clamp(-0.25, 0.25)  # wholly inside: must come back unchanged
    return delta, 0.3


@check("project")
def project(fn):
    """fn(delta, eps) -> the closest point of the inf-norm eps-ball per token: every entry clipped to [-eps, eps]."""
    delta, eps = _deltas()
    with untouched("return a new tensor (clamp, not clamp_)", delta=delta):
        got = fn(delta, eps)
    expect(torch.is_tensor(got), f"return a tensor, got {type(got).__name__}")
    expect(tuple(got.shape) == tuple(delta.shape), f"the projection has shape {tuple(got.shape)}, expected "
                                                  f"{tuple(delta.shape)}: one vector per token, like delta")
    expected = torch.maximum(torch.minimum(delta, torch.tensor(eps)), torch.tensor(-eps))
    l2 = delta.norm(dim=-1, keepdim=True)
    inf = delta.abs().amax(dim=-1, keepdim=True)
    mistakes = [
        ("that is the projection onto an L2 ball: the paper's ball is the inf-norm's, so clip every entry to "
         "[-eps, eps]", lambda: delta * (eps / l2).clamp(max=1.0)),
        ("you scaled the token's vector into the ball: that point is inside, but not the closest one; for the "
         "inf-norm the closest point clips each entry to [-eps, eps]", lambda: delta * (eps / inf).clamp(max=1.0)),
        ("that is smart-pytorch's rescaling delta / (‖delta‖∞ + eps), which gives every token an inf-norm near 1: "
         "the paper projects onto the eps-ball, clipping each entry to [-eps, eps]", lambda: delta / (inf + eps)),
        ("negative entries must be clipped too, at -eps", lambda: delta.clamp(max=eps)),
        ("entries already inside the ball must stay as they are: clip, do not push every entry to ±eps",
         lambda: eps * delta.sign()),
        ("the whole tensor is scaled by one factor: project each token (each entry, for the inf-norm) on its own",
         lambda: delta * min(1.0, eps / float(delta.abs().max()))),
    ]
    compare_with_hints(f"the projection (eps = {eps})", got, expected, 1e-6, mistakes)
    return "every entry clipped to [-eps, eps]: the closest point of the inf-norm ball, tokens inside unchanged"


# ---------------------------------------------------------------------------------------- §3 the perturbation


class _Probe(nn.Module):
    """A small model of input embeddings (B, T, C) -> logits (B, T, K): position t sees the tokens <= t (a causal
    mean of tanh features), so padding positions at the end influence only later, uncounted outputs. Its own
    embedding table makes the embeddings carry a graph to a parameter, as a GPT-2's do."""

    def __init__(self, vocab: int = 11, C: int = 6, K: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.wte = nn.Parameter(torch.randn(vocab, C, generator=g))
        self.mix = nn.Parameter(torch.randn(C, 8, generator=g) / 2)
        self.out = nn.Parameter(torch.randn(8, K, generator=g) * 2)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(embeds @ self.mix)  # (B, T, 8)
        counts = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)[None, :, None]
        return (h.cumsum(dim=1) / counts) @ self.out  # (B, T, K)


def _perturb_case():
    """The probe, ids (3, 5) right-padded to 5, 3 and 4 real tokens, the counted outputs (t and t+1 real)."""
    model = _Probe()
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 10, 10], [9, 1, 5, 2, 10]])
    input_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    real = input_mask.bool()
    mask = F.pad(real[:, :-1] & real[:, 1:], (0, 1), value=False)  # (B, T)
    return model, ids, input_mask, mask


def _search(fn, embeds, clean, mask, input_mask, noise, eps, step_size, steps, bug=None):
    """The perturbation by hand (paper: normalised ascent, clip to the ball), or one of its known mistakes."""
    keep = input_mask[..., None].to(embeds.dtype) if bug != "padding" else torch.ones_like(embeds[..., :1])
    base, clean = embeds.detach(), clean.detach()
    delta = torch.zeros_like(base) if bug == "no_noise" else (noise * keep).clamp(-eps, eps)
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        out = fn(base + delta)
        rows = (slice(None),) if bug == "output_mask" else (mask,)
        a, b = out[rows].double(), clean[rows].double()
        log_p, log_q = a.log_softmax(-1), b.log_softmax(-1)
        divergence = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()
        (g,) = torch.autograd.grad(divergence, delta)
        g = g.to(base.dtype)
        with torch.no_grad():
            if bug == "unnormalized":
                direction = g
            elif bug == "global_norm":
                direction = g / g.abs().max().clamp_min(1e-30)
            else:
                direction = g / g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
            start = torch.zeros_like(delta) if bug == "restart" else delta
            moved = start - step_size * direction if bug == "descent" else start + step_size * direction
            if bug == "l2_ball":
                delta = moved * (eps / moved.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
            else:
                delta = moved.clamp(-eps, eps)
            delta = delta * keep
    return delta.detach()


PERTURB_HINTS = {
    "no_noise": "nu is 0: at nu = 0 the divergence is at its minimum and its gradient is exactly 0, so the ascent "
                "never moves; start from the noise, torch.randn_like(embeds) * noise_var",
    "unnormalized": "the step uses the raw gradient, which is tiny near nu = 0: normalise it per token "
                    "(normalize(g)) so that every token moves by step_size",
    "descent": "that is a descent step (nu - step_size * ...): nu must go UP the divergence, nu + step_size * "
               "normalize(g)",
    "global_norm": "the gradient is normalised over the whole batch: divide each token's gradient by its own "
                   "inf-norm (normalize, exercise 2)",
    "l2_ball": "nu is projected onto an L2 ball: the paper's ball is the inf-norm's, every entry clipped to "
               "[-eps, eps] (project, exercise 3)",
    "padding": "padding tokens are perturbed: multiply nu by input_mask[..., None] (the noise too), so padding "
               "stays 0",
    "output_mask": "the divergence in the search counts padding positions: pass `mask` to symmetric_kl",
    "restart": "each step restarts from 0 instead of moving the current nu: nu <- project(nu + step_size * "
               "normalize(g), eps)",
}


def _noise(embeds, seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.randn_like(embeds)


def _counting(model):
    """fn(embeds) -> the probe's logits, and the list its calls are counted in."""
    calls = []

    def fn(embeds):
        calls.append(1)
        return model(embeds)

    return fn, calls


@check("perturb")
def perturb(fn):
    """fn(f, embeds, clean, mask, input_mask, eps=, step_size=, noise_var=, steps=) -> nu (B, T, C), detached."""
    with earlier_stubs(fn):
        return _perturb(fn)


def _perturb(fn):
    settings = [  # (eps, step_size, noise_var, steps, seed): the noise stays inside the ball, so projecting it first
        (0.5, 0.3, 0.12, 3, 0),  # or not gives the same nu; steps > 1 with unsaturated entries; and no ascent at all
        (0.5, 0.3, 0.12, 0, 1),
        (0.05, 1.0, 0.01, 1, 2),  # step_size >> eps: one step ends at eps * sign(g) (the paper's regime)
    ]
    for eps, step_size, noise_var, steps, seed in settings:
        _perturb_case_run(fn, eps, step_size, noise_var, steps, seed)
    return ("noise, then normalised ascent steps clipped to the eps-ball, padding left at 0, gradients only to nu "
            "(no parameter's .grad touched), returned detached")


def _perturb_case_run(fn, eps: float, step_size: float, noise_var: float, steps: int, seed: int) -> None:
    """One setting of the perturb check, on a fresh probe: side effects first, then nu against the hand search."""
    model, ids, input_mask, mask = _perturb_case()
    label = f"eps {eps}, step_size {step_size}, noise_var {noise_var}, steps {steps}"
    embeds = model.wte[ids]  # (B, T, C), with a graph to the embedding table
    clean = model(embeds)  # (B, T, K), with a graph to every parameter
    noise = _noise(embeds, seed) * noise_var
    assert bool((noise.abs() < eps).all()), "the check's noise must stay inside the ball"
    f, calls = _counting(model)
    with untouched("the caller still needs them: work on new tensors (embeds + nu, not embeds += nu)",
                   embeds=embeds, clean=clean, mask=mask, input_mask=input_mask), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            got = fn(f, embeds, clean, mask, input_mask, eps=eps, step_size=step_size, noise_var=noise_var,
                     steps=steps)
        except RuntimeError as err:  # the classic one: autograd.grad asked for a tensor that records no graph
            expect("does not require grad" not in str(err),
                   f"nu records no graph when you differentiate the divergence: call nu.requires_grad_(True) before "
                   f"the forward, on a fresh leaf (nu.detach()) at every step{_last_user_frame(err)}")
            raise
    expect(torch.is_tensor(got), f"return nu as a tensor, got {type(got).__name__}")
    expect(tuple(got.shape) == tuple(embeds.shape), f"nu has shape {tuple(got.shape)}, expected "
                                                    f"{tuple(embeds.shape)}: one vector per token, like embeds")
    leaked = [name for name, p in model.named_parameters() if p.grad is not None]
    expect(not leaked, f"the search put gradients into the model's parameters ({', '.join(leaked)}.grad): take "
                       "the gradient with torch.autograd.grad(divergence, nu), not .backward(), so the optimizer "
                       "sees only the training loss")
    expect(not got.requires_grad, "nu is returned with a graph (requires_grad): return it detached (nu.detach()); "
                                  "the caller runs the adversarial forward through embeds + nu")
    expect(len(calls) == steps, f"the model was called {len(calls)} times for {steps} ascent steps: one forward "
                                "per step (the clean logits are given: do not recompute them)")
    expect(bool((got.abs() <= eps + 1e-6).all()),
           f"nu leaves the eps-ball ({label}): largest |entry| {got.abs().max():.3g} > eps; project after every step")

    def search(noise=noise, steps=steps, bug=None):
        return _search(f, embeds, clean, mask, input_mask, noise, eps, step_size, steps, bug)

    wrong = [(f"{hint} ({label})", lambda bug=bug: search(bug=bug)) for bug, hint in PERTURB_HINTS.items()]
    if noise_var ** 0.5 < eps:
        wrong.append((f"the noise was scaled by sqrt(noise_var): noise_var is used as a standard deviation here (as "
                      f"in smart-pytorch), randn_like(embeds) * noise_var ({label})",
                      lambda: search(noise=noise / noise_var * noise_var ** 0.5)))
    wrong += [(f"nu took {k} ascent steps, expected steps = {steps} ({label})", lambda k=k: search(steps=k))
              for k in range(5) if k != steps]
    expected = search()
    known_mistake(got, expected, 1e-5, wrong)
    compare(f"nu ({label})", got, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------- §4 the EMA update


class _Pair(nn.Module):
    """Three parameters of one shape, the middle one frozen (as a LoRA base weight is)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(10)
        self.a = nn.Parameter(torch.randn(3, 4, generator=g))
        self.frozen = nn.Parameter(torch.randn(3, 4, generator=g), requires_grad=False)
        self.b = nn.Parameter(torch.randn(3, 4, generator=g))


class _NoTask:
    """The proximal term needs a task only for its loss; the EMA update never calls it."""

    name = "probe"

    def outputs(self, model, batch, inputs_embeds=None):
        raise AssertionError("the EMA update should not run the task")


def _move(model: nn.Module, seed: int) -> dict:
    """An optimizer step, seen from outside: every trainable parameter moves; the new values by name."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@check("bregman_update")
def bregman_update(cls):
    """cls(task, weight, beta) is a MomentumBregman whose update(model) moves the EMA: t~ <- beta t~ + (1 - beta) t."""
    from ..smart import MomentumBregman  # the class the exercise subclasses (its reset and state are not checked)

    expect(isinstance(cls, type) and issubclass(cls, MomentumBregman),
           "pass your class (a subclass of MomentumBregman), not an instance")
    schedules = {"beta 0.9": 0.9, "a beta schedule (0.5 at update 0, 0.8 after)": lambda t: 0.5 if t == 0 else 0.8}
    for label, beta in schedules.items():
        model = _Pair()
        prox = cls(_NoTask(), weight=1.0, beta=beta)
        prox.reset(model)
        ema = {name: t.clone() for name, t in prox.ema.items()}  # θ~ = θ0, by name
        expect(sorted(ema) == ["a", "b"], "reset() changed: the EMA should hold the trainable parameters a and b")
        for t in range(3):
            theta = _move(model, seed=20 + t)
            params = dict(model.named_parameters())
            with untouched("only θ~ moves: read the parameters (p.detach()), never write into them", **params):
                prox.update(model)
            b = beta(t) if callable(beta) else beta
            wrong = {
                "the weights are swapped: θ~ keeps β of itself and moves (1 − β) toward θ":
                    {n: (1 - b) * ema[n] + b * theta[n] for n in ema},
                "θ~ did not change: update self.ema (in place, or store the new tensors in it)": ema,
                "θ~ is set to θ: it should move only (1 − β) of the way": theta,
                "θ~ is paired with the wrong parameters: the EMA holds only the trainable ones (requires_grad), "
                "by name (trainable_parameters(model))": {"a": b * ema["a"] + (1 - b) * theta["a"],
                                                          "b": b * ema["b"] + (1 - b) * model.frozen.detach()},
            }
            if callable(beta) and t > 0:
                wrong["self.updates is not advanced: a β schedule is a function of the update count t, so count "
                      "every update (self.updates += 1)"] = {n: beta(0) * ema[n] + (1 - beta(0)) * theta[n]
                                                             for n in ema}
            expected = {n: b * ema[n] + (1 - b) * theta[n] for n in ema}
            expect(isinstance(prox.ema, dict) and sorted(prox.ema) == ["a", "b"],
                   "self.ema should stay a dict holding the trainable parameters' averages by name ('a', 'b')")
            for name in ("a", "b"):
                got = prox.ema[name]
                expect(got is not params[name] and (not torch.is_tensor(got) or got.data_ptr() != params[name]
                                                    .data_ptr()),
                       f"θ~[{name!r}] is the parameter itself (the same tensor): it would follow θ exactly; keep "
                       "the EMA's own tensors and update them")
                expect(not (torch.is_tensor(got) and got.requires_grad),
                       f"θ~[{name!r}] records a graph (requires_grad): update it under torch.no_grad() or from "
                       "p.detach(), or every step's graph is kept alive")
            for hint, values in wrong.items():
                expect(not all(_close(prox.ema[n], values[n], 1e-6) for n in ema)
                       or all(_close(prox.ema[n], expected[n], 1e-6) for n in ema), f"{hint} ({label}, update {t})")
            for name in ("a", "b"):
                compare(f"θ~[{name!r}] after update {t} ({label})", prox.ema[name], expected[name], atol=1e-6)
            ema = {n: prox.ema[n].detach().clone() for n in ema}
    return "θ~ ← β θ~ + (1 − β) θ for the trainable parameters only, with a constant β and with a β schedule"
