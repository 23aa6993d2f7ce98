"""AdamW written from its equations, with the exact semantics of `torch.optim.AdamW`.

Built in notebook 03 (adamw). The spec is ALGORITHMS.md §1. For every parameter θ with gradient g, step t:

    t ← t + 1
    θ ← θ · (1 − lr·λ)                          decoupled decay, scaled by lr, applied BEFORE the Adam update
    m ← β1·m + (1 − β1)·g                       first moment (momentum)
    v ← β2·v + (1 − β2)·g∘g                     second moment (per-coordinate scale)
    θ ← θ − lr/(1 − β1^t) · m ⊘ (√v / √(1 − β2^t) + ε)      bias-corrected Adam update

With amsgrad, v in the last line is replaced by the running maximum of all v so far.

Two implementations of the same step live here and are tested to agree bit for bit:

* `adamw_single_tensor`: one parameter at a time, the version notebook 03 builds line by line;
* `adamw_foreach`: the same operations on whole lists of tensors with torch's `_foreach_*` ops, grouped by
  (device, dtype). One kernel launch per operation per group instead of one per parameter: this is what makes it
  fast on a GPU with hundreds of parameter tensors.

The operations (and their order) mirror torch's so that rounding matches too: `m.lerp_(g, 1 − β1)` computes
β1·m + (1 − β1)·g with one rounding, and √v is divided by √(1 − β2^t) before ε is added (placing ε elsewhere,
as some Adam variants do, changes results; see ALGORITHMS.md §1, "Variant to know about").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["AdamW", "adamw_foreach", "adamw_single_tensor", "adamw_update"]


def adamw_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
) -> None:
    """One AdamW step, one parameter at a time, in place. Built in notebook 03 (adamw), §7 (`MyAdamW`).

    `steps` holds each parameter's step count as a 0-d tensor (torch's state format); it is incremented here.
    """
    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq = grads[i], exp_avgs[i], exp_avg_sqs[i]
        steps[i] += 1
        t = steps[i].item()

        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)  # decoupled: the decay never enters m or v
        exp_avg.lerp_(grad, 1 - beta1)  # m = β1 m + (1 − β1) g
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v = β2 v + (1 − β2) g²

        bias_correction1 = 1 - beta1**t  # m and v start at 0, so early averages are too small by these factors
        bias_correction2 = 1 - beta2**t
        step_size = lr / bias_correction1
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            exp_avg_sq = max_exp_avg_sqs[i]
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)  # √v̂ + ε
        param.addcdiv_(exp_avg, denom, value=-step_size)  # θ −= lr · m̂ / (√v̂ + ε)


def adamw_update(
    theta: Tensor, grad: Tensor, m: Tensor, v: Tensor, t: int,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One AdamW step on one tensor, out of place: returns the new (theta, m, v); t is this step's number (from 1).

    Built in notebook 03 (adamw), §5 (exercise 4); the notebook's plots and race use this library copy.
    """
    theta, m, v = theta.clone(), m.clone(), v.clone()
    steps = [torch.tensor(float(t - 1), dtype=_scalar_dtype())]  # incremented to t inside
    adamw_single_tensor([theta], [grad], [m], [v], [], steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=weight_decay, amsgrad=False)
    return theta, m, v


def _group_by_device_and_dtype(tensor_lists: list[list[Tensor]]) -> list[list[list[Tensor]]]:
    """Split parallel lists of tensors so that every sub-list shares one (device, dtype): foreach ops need that."""
    index: dict[tuple, list[int]] = defaultdict(list)
    for i, param in enumerate(tensor_lists[0]):
        index[(param.device, param.dtype)].append(i)
    return [[[tensors[i] for i in idx] if tensors else [] for tensors in tensor_lists] for idx in index.values()]


def adamw_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
) -> None:
    """The same step as `adamw_single_tensor` on whole tensor lists (one `_foreach_*` call per operation).

    Explained in notebook 03 (adamw), §7. Same arguments; every operation matches the single-tensor line above it.
    """
    if not params:
        return
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], steps]
    for p, g, m, v, vmax, s in _group_by_device_and_dtype(lists):
        torch._foreach_add_(s, 1)  # the step counters live on the CPU, one 0-d tensor per parameter
        ts = [step.item() for step in s]

        if weight_decay != 0:
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)

        if amsgrad:
            torch._foreach_maximum_(vmax, v)
            v = vmax
        denom = torch._foreach_sqrt(v)
        if all(t == ts[0] for t in ts):  # the usual case: one scalar per op instead of a list of them
            t = ts[0]
            torch._foreach_div_(denom, (1 - beta2**t) ** 0.5)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(p, m, denom, -(lr / (1 - beta1**t)))
        else:  # parameters that joined training later (or were loaded) have their own counts
            torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in ts])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(p, m, denom, [-(lr / (1 - beta1**t)) for t in ts])


class AdamW(torch.optim.Optimizer):
    """AdamW with torch semantics (bias-corrected moments, decoupled decay θ ← θ(1 − lr·λ) before the update).

    Built in notebook 03 (adamw), §4–§7. Same arguments and state format (`step`, `exp_avg`, `exp_avg_sq`,
    `max_exp_avg_sq`) as `torch.optim.AdamW`, so state dicts move between the two. `foreach=None` (default)
    and True use the `_foreach_*` path; False runs one parameter at a time (the notebook's version).
    Parameters whose `.grad` is None are skipped and get no state.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        foreach: bool | None = None,
    ) -> None:
        _validate(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, foreach=foreach)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # groups may override any default; check the overrides with the same one-line errors
        _validate(**{k: param_group[k] for k in ("lr", "betas", "eps", "weight_decay") if k in param_group})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("foreach", None)

    def _collect(self, group: dict, group_index: int) -> tuple[list[Tensor], ...]:
        """The parameters of a group that have a gradient, with their state (created on first use)."""
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"AdamW got a sparse gradient (param group {group_index}, parameter {j}); it needs dense "
                    "gradients: use nn.Embedding(sparse=False) or torch.optim.SparseAdam"
                )
            state = self.state[p]
            if len(state) == 0:
                # the step count is a 0-d float tensor on the CPU, as in torch's AdamW, so state dicts interchange
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            real = torch.view_as_real if torch.is_complex(p) else (lambda x: x)  # complex: update re and im parts
            params.append(real(p))
            grads.append(real(p.grad))
            exp_avgs.append(real(state["exp_avg"]))
            exp_avg_sqs.append(real(state["exp_avg_sq"]))
            if group["amsgrad"]:
                max_exp_avg_sqs.append(real(state["max_exp_avg_sq"]))
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a gradient; returns closure() when given one."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            tensors = self._collect(group, i)
            beta1, beta2 = group["betas"]
            update = adamw_single_tensor if group["foreach"] is False else adamw_foreach
            update(
                *tensors,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"],
            )
        return loss


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _validate(lr=None, betas=None, eps=None, weight_decay=None) -> None:
    """One-line ValueErrors for hyperparameters outside their meaningful ranges."""
    if lr is not None and not lr >= 0.0:
        raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
    if betas is not None:
        if len(betas) != 2:
            raise ValueError(f"AdamW: betas must be a pair (beta1, beta2), got {betas!r}")
        for name, beta in zip(("beta1", "beta2"), betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"AdamW: {name} must be in [0, 1), got {beta}")
    if eps is not None and not eps >= 0.0:
        raise ValueError(f"AdamW: eps must be >= 0, got {eps}")
    if weight_decay is not None and not weight_decay >= 0.0:
        raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay}")
