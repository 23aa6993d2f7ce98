"""The LoRA-optimizer baselines of notebook 08 (adaprelora): Scaled GD / Scaled AdamW and LoRA+.

Built in notebook 08 (adaprelora), §6. Notation as in notebook 05 (lora): W = W0 + s·B A, B (m, r), A (r, n);
∇A, ∇B are autograd's factor gradients.

* **Scaled GD / Scaled AdamW** (Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation
  Models", ICML 2024, arXiv 2402.02347): precondition each factor's gradient by the other factor's Gram matrix,

      ∇̃A = (Bᵀ B + δI)⁻¹ ∇A  (r, n)        ∇̃B = ∇B (A Aᵀ + δI)⁻¹  (m, r),

  both from the pre-step factors. Scaled GD steps A ← A − lr·∇̃A, B ← B − lr·∇̃B; Scaled AdamW feeds ∇̃A, ∇̃B to
  AdamW's moments. The first-order W-change of Scaled GD is −lr·s²(P_B G + G P_A) with the orthogonal projectors
  P_B = B(BᵀB)⁻¹Bᵀ, P_A = Aᵀ(AAᵀ)⁻¹A: the overlap P_B G P_A is counted twice, which AdaPreLoRA's balanced update
  (`gpt2lab.optim.adaprelora`) does not do.
  Differences from the authors' code (pilancilab/Riemannian_Preconditioned_LoRA, `SGDr` / `AdamWr`): there the
  preconditioner is undamped (torch.inverse, the identity when it fails, e.g. at B = 0 where ∇A = 0 anyway) and,
  in the GPT-2 code, B's preconditioner is built from the already-updated A; here both come from the pre-step
  factors, with an optional damping δ (default 1e-6; the identity is still used when a solve fails). A fork of
  that code defaults to no bias correction with a `reg` δ. Defaults follow `AdamWr`: lr 1e-3, betas (0.9, 0.98),
  eps 1e-6, no weight decay, bias-corrected HF-style step lr·√(1 − β₂ᵗ)/(1 − β₁ᵗ) with denominator √v + ε, the
  decay p ← p − lr·λ·p just before each update. The LoRA scale s is not compensated (as in the reference).
* **LoRA+** (Hayou, Ghosh, Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv 2402.12354): AdamW
  with a larger learning rate for B, lr_B = ratio·lr_A (ratio ≈ 16). `lora_plus_groups` builds the param groups
  exactly as peft's `create_loraplus_optimizer` does; `LoRAPlus(model, lr)` is AdamW over them.

Every class takes a model with adapters (`gpt2lab.lora.add_lora`) or a list of pairs (`find_pairs`), and works as
a factory of `gpt2lab.train.train` (`train(model, task, ScaledAdamW, config)`); parameters that are not LoRA
factors get the plain version of the method (SGD, AdamW).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .adamw import AdamW
from .adaprelora import LoRAOptimizerError, _named, find_pairs

__all__ = ["LoRAPlus", "ScaledAdamW", "ScaledGD", "lora_plus_groups", "scaled_gradients"]


def _solve_or_identity(M: Tensor, rhs: Tensor) -> Tensor:
    """M⁻¹ rhs, or rhs itself when M is singular (the reference's fallback)."""
    solution, info = torch.linalg.solve_ex(M, rhs)
    return solution if info.item() == 0 and torch.isfinite(solution).all() else rhs


def scaled_gradients(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, delta: float = 0.0) -> tuple[Tensor, Tensor]:
    """Riemannian-preconditioned factor gradients ((BᵀB + δI)⁻¹ ∇A (r, n), ∇B (AAᵀ + δI)⁻¹ (m, r)).

    Built in notebook 08 (adaprelora), §6 exercise. Zhang & Pilanci (arXiv 2402.02347). Computed in float32 or
    wider; a singular Gram matrix (B = 0 at init with δ = 0) leaves that gradient unpreconditioned.
    """
    r = A.shape[0]
    assert B.shape[1] == r and grad_A.shape == A.shape and grad_B.shape == B.shape
    dtype = torch.promote_types(A.dtype, torch.float32)
    A, B, grad_A, grad_B = (t.to(dtype) for t in (A, B, grad_A, grad_B))
    eye = torch.eye(r, dtype=dtype, device=A.device)
    gA = _solve_or_identity(B.T @ B + delta * eye, grad_A)  # (r, n)
    gB = _solve_or_identity(A @ A.T + delta * eye, grad_B.T).T  # (m, r); A Aᵀ is symmetric
    return gA, gB


class _PairOptimizer(torch.optim.Optimizer):
    """Param groups: one of the pairs (A0, B0, A1, B1, ...; kind "lora_pairs"), then the other trainable
    parameters (kind "plain"). Subclasses define `_update(param, direction, state, group)`."""

    def __init__(self, model, defaults: dict):
        pairs = find_pairs(model)
        module = model if isinstance(model, nn.Module) else None
        pair_params = [t for pair in pairs for t in (pair.A, pair.B)]
        groups = [{"params": _named(module, pair_params), "kind": "lora_pairs"}]
        if module is not None:
            held = {id(t) for t in pair_params}
            rest = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in held]
            if rest:
                groups.append({"params": rest, "kind": "plain"})
        super().__init__(groups, defaults)
        self.pairs = pairs

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "lora_pairs":
                for A, B in zip(params[0::2], params[1::2]):
                    if A.grad is None and B.grad is None:
                        continue
                    gA = torch.zeros_like(A) if A.grad is None else A.grad
                    gB = torch.zeros_like(B) if B.grad is None else B.grad
                    dA, dB = scaled_gradients(A.detach(), B.detach(), gA, gB, group["delta"])  # pre-step factors
                    self._update(A, dA, self.state[A], group)
                    self._update(B, dB, self.state[B], group)
            else:
                for p in params:
                    if p.grad is not None:
                        self._update(p, p.grad, self.state[p], group)
        return loss


def _check(name: str, lr: float, weight_decay: float, delta: float) -> None:
    for what, value in (("lr", lr), ("weight_decay", weight_decay), ("delta", delta)):
        if not value >= 0.0:
            raise LoRAOptimizerError(f"{name}: {what} must be >= 0, got {value}")


class ScaledGD(_PairOptimizer):
    """Scaled GD (Riemannian-preconditioned SGD for LoRA; the reference's `SGDr`). Notebook 08, §6.

    Per pair: A ← A(1 − lr·λ) − lr·(BᵀB + δI)⁻¹∇A and B ← B(1 − lr·λ) − lr·∇B(AAᵀ + δI)⁻¹ (pre-step factors);
    other parameters: SGD with the same decoupled decay. State: none.
    """

    def __init__(self, model, lr: float, weight_decay: float = 0.0, delta: float = 1e-6):
        _check("ScaledGD", lr, weight_decay, delta)
        super().__init__(model, dict(lr=lr, weight_decay=weight_decay, delta=delta))

    def _update(self, param: Tensor, direction: Tensor, state: dict, group: dict) -> None:
        if group["weight_decay"] != 0:
            param.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, first (as SGDr)
        param.sub_(direction.to(param.dtype), alpha=group["lr"])


class ScaledAdamW(_PairOptimizer):
    """Scaled AdamW (Riemannian-preconditioned AdamW for LoRA; the reference's `AdamWr`). Notebook 08, §6.

    AdamW moments of the preconditioned gradients (`scaled_gradients`), HF style: m ← β₁m + (1 − β₁)g̃,
    v ← β₂v + (1 − β₂)g̃², p ← p − lr·λ·p, p ← p − lr·√(1 − β₂ᵗ)/(1 − β₁ᵗ) · m / (√v + ε) (without the two
    corrections when correct_bias=False). Other parameters: the same AdamW on their raw gradients. State per
    factor: "step", "exp_avg", "exp_avg_sq", as LoRA-AdamW.
    """

    def __init__(self, model, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                 weight_decay: float = 0.0, delta: float = 1e-6, correct_bias: bool = True):  # fmt: skip
        _check("ScaledAdamW", lr, weight_decay, delta)
        if len(tuple(betas)) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise LoRAOptimizerError(f"ScaledAdamW: betas must be a pair (beta1, beta2) in [0, 1), got {betas!r}")
        super().__init__(model, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta,
                                     correct_bias=correct_bias))  # fmt: skip

    def _update(self, param: Tensor, direction: Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        t = state["step"].item()
        g = direction.to(param.dtype)
        state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
        if group["weight_decay"] != 0:
            param.add_(param, alpha=-group["lr"] * group["weight_decay"])  # just before the update (AdamWr)
        param.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-step_size)


def lora_plus_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """LoRA+'s param groups, as peft's `create_loraplus_optimizer` builds them. Notebook 08, §6.

    Trainable parameters only, as (name, parameter) pairs: the A factors and every other matrix at lr with
    `weight_decay`; the B factors at ratio·lr with `weight_decay`; 1-D parameters also at ratio·lr (peft's rule,
    kept for parity), with no decay when they are biases or LayerNorm parameters. Empty groups are left out.
    (peft's fourth group, LoRA on embedding layers at lr 1e-6, never occurs: gpt2lab.lora adapts linear layers.)
    """
    if not ratio >= 1.0:
        raise LoRAOptimizerError(f"LoRA+: ratio = lr_B / lr_A must be >= 1 (the paper uses about 16), got {ratio}")
    if not any("lora_B" in n for n, p in model.named_parameters() if p.requires_grad):
        raise LoRAOptimizerError("no LoRA (A, B) pairs found: add adapters first (gpt2lab.lora.add_lora(model, "
                                 "rank=8)) or train this model with AdamW")  # fmt: skip
    in_norm = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    a, b, b_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            decays = id(p) not in in_norm and "bias" not in name
            (b if decays else b_no_decay).append((name, p))
        else:
            a.append((name, p))
    groups = [{"params": a, "lr": lr, "weight_decay": weight_decay},
              {"params": b, "lr": lr * ratio, "weight_decay": weight_decay},
              {"params": b_no_decay, "lr": lr * ratio, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class LoRAPlus(AdamW):
    """AdamW over `lora_plus_groups`: B factors at ratio·lr. Notebook 08, §6. `LoRAPlus(model, lr)` is also a
    factory for `gpt2lab.train.train`."""

    def __init__(self, model: nn.Module, lr: float, ratio: float = 16.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):  # fmt: skip
        super().__init__(lora_plus_groups(model, lr, ratio, weight_decay), lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay)  # fmt: skip
