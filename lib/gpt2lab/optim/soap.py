"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner (Vyas et al. 2024, arXiv 2409.11321).

Built in notebook 07 (soap). For a matrix parameter W (m×n) with gradient G, Shampoo keeps two Kronecker factors,
exponential moving averages of G Gᵀ (m×m, the "left" statistic L) and Gᵀ G (n×n, the "right" one R). SOAP takes
their eigenvectors Q_L, Q_R, rotates every gradient into that basis, runs Adam there, and rotates the step back:

    first call only:  L, R ← (1 − β_s)·G Gᵀ, (1 − β_s)·Gᵀ G;  Q_L, Q_R = eigenvectors (descending), no update
    then, each step:
      G' = Q_Lᵀ G Q_R                                  the gradient in the eigenbasis
      t ← t + 1
      M ← β1·M + (1 − β1)·G'                           Adam's moments, kept in the rotated basis
      V ← β2·V + (1 − β2)·G'∘G'
      W ← W − lr·√(1 − β2^t)/(1 − β1^t) · Q_L (M ⊘ (√V + ε)) Q_Rᵀ       rotated back (HF-style ε, after the sqrt)
      W ← W·(1 − lr·λ)                                 decoupled decay, AFTER the update (as in the reference)
      L, R ← β_s·L + (1 − β_s)·G Gᵀ,  β_s·R + (1 − β_s)·Gᵀ G     only after the update: the basis a step uses
                                                                  never contains that step's own gradient
      every `precondition_frequency` steps: refresh Q_L, Q_R (below) and re-express M in the new basis

Refresh (per side, statistic S, basis Q, all in float32): the estimated eigenvalues diag(Qᵀ S Q) are sorted in
descending order, V is re-indexed by that permutation along this side's dim (a permutation, not a rotation: V
follows its approximate eigen-directions), and Q ← QR(S·Q[:, order]).Q — one step of subspace iteration warm-started
at the old basis, much cheaper than a new eigendecomposition. M is rotated exactly into the new basis.

Dimensions larger than `max_precond_dim` get no statistic (the identity basis: GPT-2's 50257-row token embedding is
rotated on its 768 side only). 1-D parameters (biases, LayerNorm) run plain Adam (HF-style ε) unless
`precondition_1d`, and their first call is skipped too. k-D tensors get one statistic per dim (the contraction of G
with itself over all the other dims); `merge_dims` first merges neighbouring small dims, as the reference does.

Semantics are those of the authors' reference (github.com/nikhilvyas/SOAP, Dec 2024), with M stored in the current
eigenbasis. One change that is exact in arithmetic: the reference rotates M back and forth at every step; here it is
rotated only when the basis changes (between refreshes Q is fixed, so the round trip is the identity). Every
statistic, basis and moment is kept in float32 (float64 for float64 parameters) whatever the parameter's dtype, and
eigh / QR always run in float32, as in the reference (keeping M and V in float32 for half-precision parameters is our
choice: the reference assumes float32 parameters). `pytorch_optimizer.SOAP` agrees within ~1e-6 in float32 (it
counts steps per param group and stores M unrotated; notebook 07, §8, compares them).

State per parameter (all tensors, so `state_dict()` resumes a run exactly): `step` (non-initial steps, a 0-d
tensor), `exp_avg` (M, rotated), `exp_avg_sq` (V, rotated), and for each preconditioned dim k `GG{k}` (its
statistic) and `Q{k}` (its basis); a dim without them uses the identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import torch
from torch import Tensor

__all__ = ["SOAP", "eigenbasis", "merged_shape", "project", "project_back", "refresh_basis"]


def merged_shape(shape: tuple, max_precond_dim: int) -> tuple:
    """The reference's `merge_dims`: merge neighbouring dims while their product stays <= max_precond_dim.

    Scan left to right with a running product; when the next dim would push it over the limit, emit the product
    (if > 1) and restart from this dim, or emit this dim alone. E.g. (64, 3, 3, 3) -> (1728,), (4, 4) -> (16,).
    """
    out, running = [], 1
    for size in shape:
        if running * size > max_precond_dim:
            if running > 1:
                out.append(running)
                running = size
            else:
                out.append(size)
                running = 1
        else:
            running *= size
    if running > 1 or not out:
        out.append(running)
    return tuple(out)


def project(x: Tensor, bases: list[Tensor | None]) -> Tensor:
    """Rotate x into the eigenbasis: Q_Lᵀ x Q_R in 2-D; in k-D, dim k is contracted with bases[k].

    A None basis is the identity for its dim. Built in notebook 07 (soap), exercise 3.
    """
    if x.dim() == 2:  # the common case, written as two matrix products
        left, right = bases
        x = x if left is None else left.T @ x  # (m, n)
        return x if right is None else x @ right  # (m, n)
    for q in bases:  # contract dim 0 with q; tensordot puts the new dim last, so after all dims the order is back
        x = x.permute(*range(1, x.dim()), 0) if q is None else torch.tensordot(x, q, dims=([0], [0]))
    return x


def project_back(x: Tensor, bases: list[Tensor | None]) -> Tensor:
    """Rotate x back to the parameter's coordinates: Q_L x Q_Rᵀ in 2-D (the inverse of `project`: Q is orthogonal)."""
    if x.dim() == 2:
        left, right = bases
        x = x if left is None else left @ x  # (m, n)
        return x if right is None else x @ right.T  # (m, n)
    for q in bases:
        x = x.permute(*range(1, x.dim()), 0) if q is None else torch.tensordot(x, q, dims=([0], [1]))
    return x


def eigenbasis(statistic: Tensor) -> Tensor:
    """Eigenvectors of a symmetric statistic as columns, largest eigenvalue first, computed in float32.

    Built in notebook 07 (soap), exercise 2. As in the reference: eigh of S + 1e-30·I (the tiny shift keeps an
    all-zero row from being a problem), float64 if float32 eigh fails to converge, columns flipped to descending
    order, returned in the statistic's dtype.
    """
    s = statistic.float()
    eye = torch.eye(s.shape[0], device=s.device, dtype=s.dtype)
    try:
        q = torch.linalg.eigh(s + 1e-30 * eye).eigenvectors  # (n, n), ascending eigenvalues
    except RuntimeError:  # ill-conditioned input on which float32 eigh does not converge
        q = torch.linalg.eigh(s.double() + 1e-30 * eye.double()).eigenvectors.float()
    return q.flip(1).to(statistic.dtype)


def refresh_basis(statistic: Tensor, basis: Tensor, exp_avg_sq: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """One power iteration + QR from the old basis; returns (new basis, V re-indexed along `dim`).

    Built in notebook 07 (soap), exercise 5. The estimated eigenvalues diag(Qᵀ S Q) give the order; V's entries
    follow their directions by that permutation only (the deliberate SOAP approximation: V is not rotated).
    """
    s, q = statistic.float(), basis.float()
    sq = s @ q  # (n, n): S Q, used for the eigenvalue estimates and as the power-iteration step
    estimated = (q * sq).sum(dim=0)  # (n,): qᵢᵀ S qᵢ, the diagonal of Qᵀ S Q
    order = torch.argsort(estimated, descending=True)
    exp_avg_sq = exp_avg_sq.index_select(dim, order)
    new_basis = torch.linalg.qr(sq.index_select(1, order)).Q  # S·Q[:, order] = (S Q)[:, order]
    return new_basis.to(basis.dtype), exp_avg_sq


class SOAP(torch.optim.Optimizer):
    """SOAP (arXiv 2409.11321): Adam in the eigenbasis of Shampoo's Kronecker factors, refreshed every few steps.

    Built in notebook 07 (soap). Arguments and defaults are the authors' reference's (`shampoo_beta` < 0 or None
    means β2). The first `step()` a parameter gets only builds its statistics and basis; the parameter does not move.
    Parameters whose `.grad` is None are skipped. Works with param groups (e.g. `gpt2lab.optim.decay_groups`) and
    with the training loop's factory: `lambda model, lr: SOAP(decay_groups(model, 0.01), lr=lr)`.
    `data_format` (channels-last 4-D convolutions) is not supported: tensors are taken as laid out.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
                        shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        merge_dims=merge_dims, precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                        correct_bias=correct_bias)  # fmt: skip
        _validate(**defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        _validate(**{k: v for k, v in param_group.items() if k in self.defaults})  # a group's own overrides
        super().add_param_group(param_group)

    # --- per-parameter pieces -------------------------------------------------------------------------------------

    @staticmethod
    def _shape(p: Tensor, group: dict) -> tuple:
        """The shape the preconditioner sees: merged dims (merge_dims) or the parameter's own."""
        if p.dim() >= 2 and group["merge_dims"]:
            return merged_shape(tuple(p.shape), group["max_precond_dim"])
        return tuple(p.shape)

    @staticmethod
    def _bases(state: dict, ndim: int) -> list[Tensor | None]:
        return [state.get(f"Q{k}") for k in range(ndim)]

    def _init_state(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        """First call: zero moments, the statistics of this gradient and their eigenbases; the parameter stays."""
        work = _work_dtype(p)
        state["step"] = torch.tensor(0.0)  # counts the steps that update p (not this one)
        state["exp_avg"] = torch.zeros_like(p, dtype=work, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=work, memory_format=torch.contiguous_format)
        shape = self._shape(p, group)
        limit = group["max_precond_dim"]
        for k, size in enumerate(shape):
            if size <= limit and (p.dim() >= 2 or group["precondition_1d"]):
                # statistics in torch's default dtype (float32), whatever the parameter's, as in the reference
                state[f"GG{k}"] = torch.zeros(size, size, device=p.device, dtype=_stat_dtype(p))
        self._update_statistics(grad.to(work).reshape(shape), state, group)
        for k in range(len(shape)):
            if f"GG{k}" in state:
                state[f"Q{k}"] = eigenbasis(state[f"GG{k}"])

    @staticmethod
    def _update_statistics(grad: Tensor, state: dict, group: dict) -> None:
        """L ← β_s·L + (1 − β_s)·G Gᵀ and R ← β_s·R + (1 − β_s)·Gᵀ G (k-D: G contracted over every other dim)."""
        beta = _shampoo_beta(group)
        for k in range(grad.dim()):
            stat = state.get(f"GG{k}")
            if stat is None:
                continue
            if grad.dim() == 2 and stat.dtype == grad.dtype:  # one fused pass: β·S + (1 − β)·(G Gᵀ or Gᵀ G)
                g = grad if k == 0 else grad.T  # (size, other)
                stat.addmm_(g, g.T, beta=beta, alpha=1 - beta)
            elif grad.dim() == 1:
                stat.lerp_(torch.outer(grad, grad).to(stat.dtype), 1 - beta)
            else:
                others = [*chain(range(k), range(k + 1, grad.dim()))]
                stat.lerp_(torch.tensordot(grad, grad, dims=[others, others]).to(stat.dtype), 1 - beta)

    def _step_param(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        """One SOAP step for one parameter (after its first call)."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        shape = self._shape(p, group)
        bases = [None if q is None else q.to(state["exp_avg"].dtype) for q in self._bases(state, len(shape))]
        g = grad.to(state["exp_avg"].dtype).reshape(shape)  # a view for float32 parameters
        m, v = state["exp_avg"].view(shape), state["exp_avg_sq"].view(shape)

        g_rot = project(g, bases)  # (shape): the gradient in the eigenbasis
        state["step"] += 1
        t = state["step"].item()
        m.lerp_(g_rot, 1 - beta1)  # M = β1 M + (1 − β1) G'
        v.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)  # V = β2 V + (1 − β2) G'∘G'
        denom = v.sqrt().add_(eps)  # ε after the sqrt and not bias-corrected (HF-style Adam)
        step_size = lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t) if group["correct_bias"] else lr
        update = project_back(m / denom, bases)  # (shape): Adam's step, rotated back
        if group["normalize_grads"]:
            update = update / (1e-30 + update.square().mean().sqrt())
        update = update.reshape(p.shape)
        if p.dtype == update.dtype:
            p.add_(update, alpha=-step_size)
            if wd > 0:
                p.mul_(1 - lr * wd)  # decay the already-updated p, with the raw lr (the reference's order)
        else:  # half-precision parameter: one rounding to its dtype at the end
            p.copy_(p.to(update.dtype).add_(update, alpha=-step_size).mul_(1 - lr * wd if wd > 0 else 1.0))

        # the preconditioner sees this gradient only now, after the update
        self._update_statistics(g, state, group)
        if t % group["precondition_frequency"] == 0:
            m_orig = project_back(m, bases)  # M in the parameter's coordinates (old basis)
            v = state["exp_avg_sq"].view(shape)
            for k in range(len(shape)):
                if f"GG{k}" in state:
                    state[f"Q{k}"], v = refresh_basis(state[f"GG{k}"], state[f"Q{k}"], v, k)
            state["exp_avg_sq"] = v.reshape(p.shape)
            new_bases = [None if q is None else q.to(m.dtype) for q in self._bases(state, len(shape))]
            state["exp_avg"] = project(m_orig, new_bases).reshape(p.shape).contiguous()  # exactly in the new basis

    @torch.no_grad()
    def step(self, closure=None):
        """One SOAP step for every parameter with a gradient (a parameter's first call only builds its basis)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    what = "a sparse gradient" if p.grad.is_sparse else "a complex parameter"
                    raise RuntimeError(f"SOAP got {what} (param group {i}, parameter {j}); it needs dense real "
                                       "tensors: use nn.Embedding(sparse=False), or another optimizer for it")
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, p.grad, state, group)
                    continue  # the first call never moves p: the basis must not contain the gradient it rotates
                self._step_param(p, p.grad, state, group)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, except that state tensors keep their saved dtype (torch casts them to the parameter's dtype:
        a bfloat16 parameter would lose its float32 statistics and bases, and resuming would not be exact)."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor) and key != "step" and value.dtype != self.state[p][key].dtype:
                    self.state[p][key] = value.to(device=p.device)


def _work_dtype(p: Tensor) -> torch.dtype:
    """M, V and the projections: float32 for half-precision parameters, else the parameter's dtype."""
    return torch.promote_types(p.dtype, torch.float32)


def _stat_dtype(p: Tensor) -> torch.dtype:
    """Statistics and bases: torch's default dtype (float32), or float64 for a float64 parameter."""
    return torch.promote_types(torch.get_default_dtype(), _work_dtype(p))


def _shampoo_beta(group: dict) -> float:
    beta = group["shampoo_beta"]
    return group["betas"][1] if beta is None or beta < 0 else beta


def _validate(lr=None, betas=None, shampoo_beta=None, eps=None, weight_decay=None, precondition_frequency=None,
              max_precond_dim=None, **_) -> None:
    """One-line ValueErrors for hyperparameters outside their meaningful ranges."""
    if lr is not None and not lr >= 0.0:
        raise ValueError(f"SOAP: lr must be >= 0, got {lr}")
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"SOAP: betas must be a pair (beta1, beta2), got {betas!r}")
        for name, beta in zip(("beta1", "beta2"), betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"SOAP: {name} must be in [0, 1), got {beta}")
    if shampoo_beta is not None and not shampoo_beta < 1.0:
        raise ValueError(f"SOAP: shampoo_beta must be < 1 (a negative value or None means beta2), got {shampoo_beta}")
    if eps is not None and not eps >= 0.0:
        raise ValueError(f"SOAP: eps must be >= 0, got {eps}")
    if weight_decay is not None and not weight_decay >= 0.0:
        raise ValueError(f"SOAP: weight_decay must be >= 0, got {weight_decay}")
    for name, value in (("precondition_frequency", precondition_frequency), ("max_precond_dim", max_precond_dim)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"SOAP: {name} must be an integer >= 1, got {value!r}")
