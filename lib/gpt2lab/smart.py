"""SMART: adversarial smoothness regularisation of the input embeddings and a momentum Bregman proximal term.

Built in notebook 06 (smart). Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural
Language Models through Principled Regularized Optimization" (arXiv 1911.03437). What is here, with the notebook's
sections:

    §2 symmetric_kl       l_s(P, Q) = KL(P||Q) + KL(Q||P), averaged over the distributions that count
    §3 normalize, project the ascent direction g / ||g||_inf and the projection onto the eps-ball, per token
    §4 perturb            noise init, K ascent steps, projection: the adversarial perturbation nu of the embeddings
    §6 MomentumBregman    weight * l_s(f(x; theta), f(x; theta~)) against an EMA theta~ of the trainable
                          parameters: an extra loss term AND a training-loop callback that keeps the EMA
    §7 SmartRegularizer   weight * l_s(f(x + nu), f(x)) as an extra loss term; smart_objective(task, ...) adds it
                          (and the Bregman term) to any task's loss

    prox = MomentumBregman(task, weight=1.0, beta=0.99)
    objective = smart_objective(task, weight=1.0, eps=1e-5, step_size=1e-3, noise_var=1e-5, steps=1, proximal=prox)
    train(model, objective, torch.optim.AdamW, TrainConfig(method="smart"), callbacks=[prox])

The objective is a `gpt2lab.tasks.Objective`: the loop sees a task like any other, with any optimizer, with full
fine-tuning or LoRA (only parameters with requires_grad get gradients, and the EMA holds only those).

The math (f = the task's output distributions, x = the token embeddings, from `task.embeddings`):

    R_s(theta)   = max_{||nu||_inf <= eps} l_s(f(x + nu; theta), f(x; theta))     (per token: each token's vector)
    nu_0         = N(0, noise_var^2) noise (noise_var is a standard deviation, as in smart-pytorch and MT-DNN)
    nu_{k+1}     = project(nu_k + step_size * normalize(grad_nu l_s(f(x + nu_k), f(x).detach())), eps),  K times
    loss         = task loss + weight * l_s(f(x + nu_K), f(x))        gradient through BOTH arguments

l_s compares the task's output distributions (`TaskOutputs.log_probs` rows): the ("no", "yes") answer for the
paraphrase cloze (one row per pair), the next-token distribution at every counted position for the sonnets (one
row per token; padding is masked). Padding positions of the embeddings are never perturbed.

Cost per step, K ascent steps: the task's clean forward (its logits are reused, never recomputed), K forward +
backward passes to nu only (`torch.autograd.grad`, so no parameter's .grad is touched and no weight gradient is
computed), one adversarial forward, then the loop's backward through the clean and the adversarial graphs.
`python -m gpt2lab.bench smart` measures the ratio to a plain step.

Compatibility mode (compat=True) reproduces the PyPI package smart-pytorch 0.0.4 (`SMARTLoss`), which follows
MT-DNN's code rather than the paper's Algorithm 1: after each ascent step the whole vector nu + step_size * g is
divided by its per-token inf-norm plus eps, so every token's perturbation ends with inf-norm close to 1 (eps is only
a denominator guard there), and nothing is projected. The default (compat=False) follows the paper: the gradient is
normalised, the step taken, and the result clipped to the eps-ball, so ||nu||_inf <= eps always. The same eps
number therefore means a radius in the paper mode and a guard in compat mode.

Scale. The defaults are the paper's (eps = noise_var = 1e-5, step_size = 1e-3, K = 1), chosen for BERT-sized
embeddings. GPT-2's token embeddings have entries of order 0.1, so a radius of 1e-5 moves the outputs very little
and the term is tiny: choose eps relative to that scale (notebook 06, smart, looks at the term against eps).

Dropout: every forward runs in the model's current mode (train mode while training), as MT-DNN does, so l_s also
measures dropout noise; in eval mode (or without dropout) a zero perturbation gives exactly 0.

This module knows nothing of GPT-2: the perturbation works on any function of input embeddings, and the two loss
terms on any task with `embeddings(model, batch)` and `outputs(model, batch, inputs_embeds=None)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import OneLineError


class SmartError(OneLineError, ValueError):
    """A SMART setting out of range, or a term used the wrong way: the message says which and what to do."""


# ------------------------------------------------------------------------------------------------ §2 the divergence


def symmetric_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(P||Q) + KL(Q||P) between softmax(logits_p) and softmax(logits_q), averaged over the counted rows.

    Built in notebook 06 (smart), §2. logits (..., K): softmax over the last dim gives the distributions (the
    task's logits: (B, 2) for the paraphrase answer, (B, T, V) for the next token); `mask` bool of shape
    logits.shape[:-1] says which distributions count (None: all). Computed in float32 from log_softmax as
    sum_k (p_k - q_k)(log p_k - log q_k), which is exactly 0 for equal inputs and symmetric in its arguments.
    Gradients flow into both arguments (detach one to hold it constant). No counted row: 0.
    """
    if logits_p.shape != logits_q.shape:
        raise SmartError(f"symmetric_kl compares logits of one shape, got {tuple(logits_p.shape)} and "
                         f"{tuple(logits_q.shape)}")
    if mask is not None and mask.shape != logits_p.shape[:-1]:
        raise SmartError(f"mask {tuple(mask.shape)} must be logits.shape[:-1] = {tuple(logits_p.shape[:-1])}: "
                         "one flag per distribution")
    log_p = F.log_softmax(logits_p.float(), dim=-1)  # (..., K)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    per_row = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1)  # (...,): KL(P||Q) + KL(Q||P)
    if mask is None:
        return per_row.sum() / max(per_row.numel(), 1)
    # every row computed, the uncounted ones zeroed: no boolean indexing, so no wait for the GPU (rows of padding
    # cost a little arithmetic instead)
    mask = mask.bool()
    return torch.where(mask, per_row, 0.0).sum() / mask.sum().clamp_min(1)


# --------------------------------------------------------------------------- §3 the ascent direction and the ball


def normalize(g: torch.Tensor) -> torch.Tensor:
    """g / ||g||_inf per token: (..., C) -> (..., C), each token's largest entry +-1 (a zero gradient stays 0).

    Built in notebook 06 (smart), §3. The ascent direction of the paper (p = inf): the step then has the same size
    for every token, however small its gradient (near nu = 0 the gradient of l_s is tiny, its direction is not).
    """
    norm = g.abs().amax(dim=-1, keepdim=True)  # (..., 1)
    return g / norm.clamp_min(torch.finfo(g.dtype).tiny)  # a zero row divides by `tiny`, stays 0


def project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """The closest point of the eps-ball of the inf-norm per token: every entry clipped to [-eps, eps].

    Built in notebook 06 (smart), §3. For the inf-norm the ball is a box, so the projection is a clamp (the same
    whether the norm is taken per token or per sequence).
    """
    if eps < 0:
        raise SmartError(f"eps must be >= 0 (the radius of the perturbation), got {eps}")
    return delta.clamp(-eps, eps)


def inf_norm(delta: torch.Tensor) -> torch.Tensor:
    """The per-token inf-norm ||delta_t||_inf: (..., C) -> (..., 1)."""
    return delta.abs().amax(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------- §4 the perturbation


def check_settings(eps: float, step_size: float, noise_var: float, steps: int, weight: float = 1.0) -> None:
    """One line for each out-of-range SMART setting."""
    for name, value in (("eps", eps), ("step_size", step_size), ("noise_var", noise_var), ("weight", weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise SmartError(f"{name} must be a number >= 0, got {value!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise SmartError(f"steps must be a whole number >= 0 (ascent steps; the paper uses 1), got {steps!r}")


def perturb(fn: Callable[[torch.Tensor], torch.Tensor], embeds: torch.Tensor, clean: torch.Tensor,
            mask: torch.Tensor | None = None, input_mask: torch.Tensor | None = None, *, eps: float = 1e-5,
            step_size: float = 1e-3, noise_var: float = 1e-5, steps: int = 1, compat: bool = False) -> torch.Tensor:
    """The adversarial perturbation nu (B, T, C) of the embeddings, found by K steps of normalised ascent.

    Built in notebook 06 (smart), §4. fn(embeds) -> logits is the model on given embeddings; `clean` = fn(embeds)
    already computed (held constant here); `mask` says which output distributions count (see `symmetric_kl`);
    `input_mask` (B, T) 0/1 says which tokens may be perturbed (padding: 0). Draws exactly one
    torch.randn_like(embeds) from the global RNG (the noise init), then, `steps` times, one forward + backward of
    fn to nu only (so fn had better record no weight-gradient work: see `frozen`). Returns nu detached: the caller
    runs the adversarial forward fn(embeds + nu) with gradients. compat=True: smart-pytorch 0.0.4's update (see the
    module docstring), else the paper's.
    """
    check_settings(eps, step_size, noise_var, steps)
    base = embeds.detach()  # the search moves nu only; the caller's final forward differentiates through embeds
    clean = clean.detach()
    keep = torch.ones_like(base[..., :1]) if input_mask is None else input_mask[..., None].to(base.dtype)  # (B,T,1)
    delta = torch.randn_like(base) * noise_var * keep  # (B, T, C): nu_0, noise_var used as a std (as smart-pytorch)
    if not compat:
        delta = project(delta, eps)  # start inside the ball (with noise_var = eps about a third of the entries clip)
    with torch.enable_grad():  # the search needs gradients even when the caller runs without them
        for _ in range(steps):
            delta.requires_grad_(True)
            divergence = symmetric_kl(fn(base + delta), clean, mask)
            (g,) = torch.autograd.grad(divergence, delta)  # (B, T, C); parameters' .grad untouched
            with torch.no_grad():
                if compat:  # smart-pytorch: rescale nu + step * g to (almost) unit inf-norm per token, no ball
                    step = delta + step_size * g
                    delta = step / (inf_norm(step) + eps)
                else:  # the paper: a step of size step_size along g / ||g||_inf, then back into the eps-ball
                    delta = project(delta + step_size * normalize(g), eps)
                delta = delta * keep
    return delta.detach()


# ------------------------------------------------------------------------------------------ §7 the regularizer


@contextlib.contextmanager
def frozen(model: nn.Module):
    """requires_grad off for the model's trainable parameters inside the block, restored after (even on an error).

    A forward run inside records no weight-gradient work, so a backward to its inputs alone (the ascent steps)
    costs activation gradients only. Autograd skips unneeded weight gradients of its own ops anyway, but a custom
    autograd Function (our tied head) computes every gradient its inputs require; frozen, it computes none.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def base_task(task):
    """The task inside (nested) `Objective`s: the perturbed forwards must not add the extra terms again."""
    from .tasks import Objective  # imported here: tasks comes after this module in the package's layers

    while isinstance(task, Objective):
        task = task.task
    return task


class SmartRegularizer:
    """weight * l_s(f(x + nu), f(x)): the adversarial smoothness term, an extra loss for `gpt2lab.tasks.Objective`.

    Built in notebook 06 (smart), §7 (its pieces in §2-§4). Called as term(model, batch, outputs) with the clean
    `TaskOutputs` of the task's own forward (their logits are reused: no second clean forward). `task` is the task
    whose `embeddings` and `outputs` are perturbed (the one inside any Objective). Settings as in `perturb`; weight
    is the paper's lambda_s. The gradient reaches the parameters through the adversarial and the clean outputs.
    """

    name = "smart"

    def __init__(self, task, weight: float = 1.0, eps: float = 1e-5, step_size: float = 1e-3,
                 noise_var: float = 1e-5, steps: int = 1, compat: bool = False):
        check_settings(eps, step_size, noise_var, steps, weight)
        if not isinstance(compat, bool):
            raise SmartError(f"compat must be True or False, got {compat!r}")
        self.task = base_task(task)
        for needed in ("embeddings", "outputs"):
            if not callable(getattr(self.task, needed, None)):
                raise SmartError(f"SMART needs a task with {needed}(model, batch, ...) (a gpt2lab.tasks.Task); "
                                 f"{type(self.task).__name__} has none")
        self.weight, self.eps, self.step_size = float(weight), float(eps), float(step_size)
        self.noise_var, self.steps, self.compat = float(noise_var), steps, compat

    def __call__(self, model, batch: dict, outputs) -> torch.Tensor:
        if outputs is None:
            raise SmartError("the SMART term needs the task's clean outputs: use a task with outputs() "
                             "(gpt2lab.tasks.Task) inside the Objective")
        if self.weight == 0:
            return torch.zeros((), device=outputs.logits.device)
        task = self.task
        embeds = task.embeddings(model, batch)  # (B, T, C), with its graph (the embedding matrix is trained too)

        def logits(e):  # the search differentiates to nu only: parameters frozen, no weight-gradient work recorded
            with frozen(model):
                return task.outputs(model, batch, e).logits

        delta = perturb(logits, embeds, outputs.logits, outputs.mask,
                        batch.get("attention_mask"), eps=self.eps, step_size=self.step_size,
                        noise_var=self.noise_var, steps=self.steps, compat=self.compat)  # (B, T, C)
        adversarial = task.outputs(model, batch, embeds + delta)  # the one adversarial forward
        return self.weight * symmetric_kl(adversarial.logits, outputs.logits, outputs.mask)

    def describe(self) -> dict:
        return {"name": self.name, "weight": self.weight, "eps": self.eps, "step_size": self.step_size,
                "noise_var": self.noise_var, "steps": self.steps,
                "normalisation": "smart-pytorch 0.0.4 (compat)" if self.compat else "paper (inf-ball projection)"}

    def __repr__(self) -> str:
        return f"SmartRegularizer({', '.join(f'{k}={v!r}' for k, v in self.describe().items() if k != 'name')})"


def smart_objective(task, weight: float = 1.0, eps: float = 1e-5, step_size: float = 1e-3, noise_var: float = 1e-5,
                    steps: int = 1, compat: bool = False, proximal: MomentumBregman | None = None):
    """`task` with the SMART terms added to its loss: task loss + weight * R_s (+ the proximal term, when given).

    Built in notebook 06 (smart), §7. Returns a `gpt2lab.tasks.Objective` the training loop uses like any task.
    `proximal`: a `MomentumBregman`, whose term is added too; pass the same object in train(callbacks=[...]) so
    its EMA follows the training.
    """
    from .tasks import Objective  # imported here: tasks comes after this module in the package's layers

    objective = Objective(task, SmartRegularizer(task, weight, eps, step_size, noise_var, steps, compat))
    if proximal is not None:
        if not isinstance(proximal, MomentumBregman):
            raise SmartError(f"proximal must be a MomentumBregman, got {type(proximal).__name__}")
        objective = Objective(objective, proximal)
    return objective


# --------------------------------------------------------------------------------------- §6 the proximal term


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> parameter for every parameter with requires_grad (each shared tensor once, under its first name)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class _Call(nn.Module):
    """model + a function of it, as one module, so torch.func.functional_call can swap the model's parameters for
    any method the function calls (a task may call model.hidden_states and model.head, not only forward)."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(self.model, *args)


class MomentumBregman:
    """weight * l_s(f(x; theta), f(x; theta~)), theta~ an EMA of the trainable parameters; a training-loop callback.

    Built in notebook 06 (smart), §6: the momentum Bregman proximal point of the paper (a "mean teacher" trust
    region). Two roles in one object:

    * an extra loss term, term(model, batch, outputs): the clean outputs (reused) against the outputs of the same
      model with theta~ in place of its trainable parameters (a no-grad forward through torch.func.functional_call,
      which leaves the model untouched); 0 when theta = theta~ (without dropout);
    * a callback for `gpt2lab.train.train`: on_start sets theta~ = theta_0 (fresh run), on_step updates
      theta~ <- beta * theta~ + (1 - beta) * theta after every optimizer step; state_dict() holds theta~, so a
      checkpoint keeps it and a resumed run continues exactly.

    Only parameters with requires_grad are copied (with LoRA: the adapters), so the EMA costs one copy of what is
    trained. `beta` is a number or a function of the update count t = 0, 1, ... (the paper: 0.99 for the first 10%
    of the updates, then 0.999). Outside `train`, call reset(model) once and update(model) after each step.
    """

    name = "bregman"

    def __init__(self, task, weight: float = 1.0, beta: float | Callable[[int], float] = 0.99):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise SmartError(f"weight must be a number >= 0, got {weight!r}")
        if not callable(beta):
            self._check_beta(beta)
        self.task = base_task(task)
        if not callable(getattr(self.task, "outputs", None)):
            raise SmartError(f"the Bregman term needs a task with outputs(model, batch) (a gpt2lab.tasks.Task); "
                             f"{type(self.task).__name__} has none")
        self.weight, self.beta = float(weight), beta
        self.ema: dict[str, torch.Tensor] | None = None
        self.updates = 0

    @staticmethod
    def _check_beta(beta) -> float:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
            raise SmartError(f"beta must be a number in [0, 1] (or a function of the step giving one), got {beta!r}")
        return float(beta)

    # -- the EMA

    def reset(self, model: nn.Module) -> None:
        """theta~ = theta: a copy of the model's trainable parameters now."""
        self.ema = {name: p.detach().clone() for name, p in trainable_parameters(model).items()}
        self.updates = 0

    def update(self, model: nn.Module) -> None:
        """One EMA step: theta~ <- beta * theta~ + (1 - beta) * theta (after an optimizer step)."""
        ema = self._ema_for(model)
        beta = self._check_beta(self.beta(self.updates) if callable(self.beta) else self.beta)
        params = trainable_parameters(model)
        with torch.no_grad():  # one fused multiply and add over all tensors: the same numbers as tensor by tensor
            emas, values = [ema[name] for name in params], [p.detach() for p in params.values()]
            torch._foreach_mul_(emas, beta)
            torch._foreach_add_(emas, values, alpha=1 - beta)
        self.updates += 1

    def _ema_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The EMA, checked against the model's trainable parameters and moved to their device."""
        if self.ema is None:
            raise SmartError("the Bregman term has no EMA yet: pass it to train(..., callbacks=[it]), or call its "
                             "reset(model) first")
        params = trainable_parameters(model)
        if list(params) != list(self.ema):
            raise SmartError(f"the EMA holds {len(self.ema)} tensors but the model has {len(params)} trainable "
                             "parameters (or other names): call reset(model) after changing what is trained")
        for name, p in params.items():
            if self.ema[name].device != p.device or self.ema[name].dtype != p.dtype:
                self.ema[name] = self.ema[name].to(p.device, p.dtype)
        return self.ema

    # -- the loss term

    def teacher_logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The task's logits with theta~ in place of the trainable parameters (no gradient; the model unchanged)."""
        ema = self._ema_for(model)
        wrapped = _Call(model, lambda m, b: self.task.outputs(m, b).logits)
        with torch.no_grad():
            return torch.func.functional_call(wrapped, {f"model.{k}": v for k, v in ema.items()}, (batch,),
                                              strict=False, tie_weights=True)

    def __call__(self, model, batch: dict, outputs) -> torch.Tensor:
        if outputs is None:
            raise SmartError("the Bregman term needs the task's clean outputs: use a task with outputs() "
                             "(gpt2lab.tasks.Task) inside the Objective")
        if self.weight == 0:
            return torch.zeros((), device=outputs.logits.device)
        teacher = self.teacher_logits(model, batch)  # (same shape as outputs.logits), no graph
        return self.weight * symmetric_kl(outputs.logits, teacher, outputs.mask)

    # -- the callback (gpt2lab.train's Callback interface)

    def on_start(self, loop) -> None:
        if self.ema is None or loop.step == 0:  # a fresh run starts from theta~ = theta_0; a resumed one keeps it
            self.reset(loop.model)
        else:
            self._ema_for(loop.model)  # checked, and moved from the checkpoint's CPU to the model's device

    def on_step(self, loop) -> None:
        self.update(loop.model)

    def on_evaluate(self, loop) -> None:
        pass

    def on_end(self, loop) -> None:
        pass

    def state_dict(self) -> dict:
        return {"ema": self.ema, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.ema = None if state["ema"] is None else {k: v.clone() for k, v in state["ema"].items()}
        self.updates = int(state["updates"])

    def describe(self) -> dict:
        beta = getattr(self.beta, "__name__", "schedule") if callable(self.beta) else self.beta
        return {"name": self.name, "weight": self.weight, "beta": beta}

    def __repr__(self) -> str:
        return f"MomentumBregman(weight={self.weight}, beta={self.describe()['beta']!r})"


__all__ = ["SmartError", "symmetric_kl", "normalize", "project", "inf_norm", "perturb", "frozen", "SmartRegularizer",
           "smart_objective", "MomentumBregman", "trainable_parameters"]
