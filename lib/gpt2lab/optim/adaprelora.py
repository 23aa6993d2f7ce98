"""AdaPreLoRA: the factor update whose W-change is the Adafactor direction projected onto what LoRA can reach.

Built in notebook 08 (adaprelora). Liu, Bian, Cai, "AdaPreLoRA" (arXiv 2605.08734). Notation as in notebook 05
(lora): W = W0 + s·B A with B (m, r), A (r, n), s = alpha / r; G = dL/dW (m, n) is the gradient of the effective
weight; autograd gives the factor gradients ∇A = s·Bᵀ G (r, n) and ∇B = s·G Aᵀ (m, r).

The idea, in the notebook's order:

1. **LoRA's Jacobian is rank-deficient.** (dA, dB) ↦ B dA + dB A has a kernel of dimension r² (the gauge
   (B, A) ~ (B S, S⁻¹ A)), so "the factor step that moves W along a chosen direction" is a least-squares problem
   with a whole family of solutions.
2. **The target is Adafactor's direction.** With row and column statistics ℓ (m) and c (n), EMAs of the row and
   column sums of G∘G, Adafactor's rank-1 second moment is V̂ = ℓ̂ ĉᵀ / ‖ℓ̂‖₁, and its direction
   Z = G ⊘ √V̂ = P⁻¹ G Q⁻¹ with P = Diag(p), Q = Diag(q), p = √(ℓ̂/‖ℓ̂‖₁), q = √ĉ (`preconditioner`).
3. **Least squares in the H-metric** ‖X‖²_H = Σ p_i q_j X_ij²: min ‖B dA + dB A − Z‖_H. Every minimiser moves W by
   T* = the H-orthogonal projection of Z onto the tangent space {B X + Y A}; the normal equations involve G only
   through the factor gradients, so the full G is never needed in the step.
4. **The balanced member.** Among the r²-dimensional family, the one minimising ‖B dA − dB A‖²_H is unique and
   has coefficients ½ (`factor_update`):

       M_B = Bᵀ P B,  M_A = A Q Aᵀ  (r, r),   C = ∇A Aᵀ,   K = M_B⁻¹ C M_A⁻¹
       ΔA = M_B⁻¹ ∇A ⊘ qᵀ − ½ K A          ΔB = (∇B M_A⁻¹) ⊘ p − ½ B K

   times s⁻² (so the first-order W-change is −lr·T* whatever s and r), then A ← A − lr·ΔA, B ← B − lr·ΔB.

With P = Q = I the W-direction is LoRA-Pro's Frobenius tangent projection P_B G + G P_A − P_B G P_A; Scaled GD
(`gpt2lab.optim.lora_baselines`) instead moves W by P_B G + G P_A, counting the overlap twice.

Numerics and cost. The r×r solves are damped, (M + λI) with λ = δ_rel·tr(M)/r + δ_abs (at B = 0, M_B = 0 and
the damped solve gives the exact answer: ΔA = 0 and ΔB A is the projection of Z onto {Y A}), in float32 or wider.
Persistent state per pair is ℓ (m) and c (n), plus AdamW's two moments of the factor steps in the Adam variant
(2·r·(m+n), as LoRA-AdamW and Scaled AdamW): O((m+n)·r).
The statistics need the row and column sums of G∘G, which autograd never forms (it computes ∇A, ∇B directly).
`AdaPreLoRA` gathers them with hooks on the LoRA module during backward: x~ from `module.lora_dropout`'s output,
δ = dL/dy from the module output's column slice, then per matrix either G = δᵀ x~ formed transiently and reduced
at once (`stats="transient"`, one (m, n) matrix alive at a time) or the Gram identity
rowsum(G∘G) = diag(δᵀ (X~ X~ᵀ) δ), colsum(G∘G) = diag(X~ᵀ (δ δᵀ) X~) (`stats="gram"`, (N, N) for N tokens).
`step()` itself only makes O((m+n)·r) tensors.

What is inferred (the paper's text available to us states the structure, not every detail; marked INFERRED in the
code): the normalisation of V̂ and its split into p, q (only the product p qᵀ matters), bias correction of ℓ and c,
ε₁ = 1e-30 and β₂, the s⁻² scale handling, the damping, decoupled weight decay, and all of the Adam variant.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from ..data import OneLineError
from .adamw import adamw_foreach
from .groups import no_decay

__all__ = ["AdaPreLoRA", "AdaPreLoRAError", "LoRAOptimizerError", "adafactor_statistics", "damped", "factor_update",
           "find_pairs", "preconditioner", "tangent_change"]

MODES = ("sgd", "scaled_adamw", "factor_momentum")
STATS = ("transient", "gram")


class LoRAOptimizerError(OneLineError, ValueError):
    """Bad settings, or a model without LoRA pairs, for a LoRA-pair optimizer: the message says what to do."""


AdaPreLoRAError = LoRAOptimizerError


# ------------------------------------------------------------------------------------ the closed form (notebook §2-§4)


def adafactor_statistics(G: Tensor, eps1: float = 1e-30) -> tuple[Tensor, Tensor]:
    """Row and column sums of S = G∘G + ε₁ for one gradient G (m, n): returns (row (m,), col (n,)).

    Built in notebook 08 (adaprelora), exercise 1. The EMAs of these are Adafactor's statistics ℓ and c
    (Shazeer & Stern 2018, arXiv 1804.04235); ε₁ keeps rows and columns that got no gradient positive.
    """
    assert G.dim() == 2, f"G must be (m, n), got {tuple(G.shape)}"
    S = G * G  # (m, n)
    m, n = G.shape
    return S.sum(dim=1) + n * eps1, S.sum(dim=0) + m * eps1  # (m,), (n,)


def preconditioner(row_sq: Tensor, col_sq: Tensor, step: int = 0, beta2: float = 0.999,
                   bias_correction: bool = True) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The two diagonals (p (m,), q (n,)) with p qᵀ = √V̂, V̂ = ℓ̂ ĉᵀ / ‖ℓ̂‖₁ (Adafactor's rank-1 second moment).

    Built in notebook 08, exercise 1. row_sq = ℓ, col_sq = c are the EMAs after `step` updates; with
    bias_correction they are divided by 1 − β₂^step first (INFERRED: the paper's text does not say; it changes
    early step sizes, not directions). p = √(ℓ̂/‖ℓ̂‖₁), q = √ĉ (INFERRED split: only the product matters).
    """
    if bias_correction and step > 0:
        correction = 1 - beta2**step
        row_sq, col_sq = row_sq / correction, col_sq / correction
    p = (row_sq / row_sq.sum(dim=-1, keepdim=True)).sqrt()  # (m,) (or (P, m) for P pairs at once)
    q = col_sq.sqrt()  # (n,)
    return p, q


def damped(M: Tensor, delta_rel: float = 1e-6, delta_abs: float = 1e-12) -> Tensor:
    """M + λI with λ = δ_rel·tr(M)/r + δ_abs (INFERRED knob, not from the paper): a singular M_B (B = 0 at init)
    becomes solvable, and the solve then gives the exact answer there (ΔA = 0, see `factor_update`)."""
    r = M.shape[-1]
    lam = delta_rel * torch.diagonal(M, dim1=-2, dim2=-1).sum(-1) / r + delta_abs  # one λ per matrix of a batch
    return M + lam[..., None, None] * torch.eye(r, dtype=M.dtype, device=M.device)  # (..., r, r)


def factor_update(A: Tensor, B: Tensor, G_A: Tensor, G_B: Tensor, p: Tensor, q: Tensor, *, scale: float = 1.0,
                  C: Tensor | None = None, delta_rel: float = 1e-6, delta_abs: float = 1e-12,
                  scale_invariant: bool = True) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The balanced closed-form factor update (ΔA (r, n), ΔB (m, r)); the step is A − lr·ΔA, B − lr·ΔB.

    Built in notebook 08 (adaprelora), exercises 2-3. A (r, n), B (m, r); G_A (r, n) and G_B (m, r) the factor
    gradients: with scale=1 the unscaled BᵀG and G Aᵀ; with the LoRA scale s, autograd's ∇A = s·BᵀG and
    ∇B = s·G Aᵀ, and the result is multiplied by s⁻² (scale_invariant=True, INFERRED default) so that
    B ΔA + ΔB A = T*/s and the W-change s·(B ΔA + ΔB A) is T* for every s. p (m,), q (n,) the diagonals of the
    Adafactor preconditioner (`preconditioner`). C (r, r) defaults to G_A Aᵀ (= Bᵀ G_B); the momentum variant passes
    its own. The r×r matrices are damped (`damped`; delta_rel = delta_abs = 0 for the undamped formula). Computed
    in float32 or wider, and returned in that dtype. Leading batch dimensions (P pairs of one shape) are allowed.
    """
    *batch, r, n = A.shape
    m = B.shape[-2]
    assert B.shape[-2:] == (m, r) and G_A.shape[-2:] == (r, n) and G_B.shape[-2:] == (m, r), \
        f"shapes A {tuple(A.shape)}, B {tuple(B.shape)}, G_A {tuple(G_A.shape)}, G_B {tuple(G_B.shape)}"
    assert p.shape[-1] == m and q.shape[-1] == n, f"p must be ({m},), q ({n},); got {tuple(p.shape)}, {tuple(q.shape)}"
    dtype = torch.promote_types(A.dtype, torch.float32)  # the solves in float32 even under bf16 (or fp64 if given)
    A, B, G_A, G_B, p, q = (t.to(dtype) for t in (A, B, G_A, G_B, p, q))
    p, q = p[..., :, None], q[..., None, :]  # (m, 1) divides rows, (1, n) divides columns
    C = G_A @ A.mT if C is None else C.to(dtype)  # (r, r) = Bᵀ G Aᵀ (times s)
    M_B = damped(B.mT @ (p * B), delta_rel, delta_abs)  # (r, r) Bᵀ P B + λI
    M_A = damped((A * q) @ A.mT, delta_rel, delta_abs)  # (r, r) A Q Aᵀ + λI
    K = _solve(M_A, _solve(M_B, C).mT).mT  # (r, r) M_B⁻¹ C M_A⁻¹ (M_A is symmetric)
    dA = _solve(M_B, G_A / q) - 0.5 * K @ A  # (r, n)  ΠB part minus half the overlap
    dB = _solve(M_A, G_B.mT).mT / p - 0.5 * B @ K  # (m, r)  ΠA part minus the other half
    if scale_invariant and scale != 1.0:
        dA, dB = dA / scale**2, dB / scale**2  # INFERRED: without it the effective lr grows as s²
    return dA, dB


def _solve(M: Tensor, rhs: Tensor) -> Tensor:
    """M⁻¹ rhs for (batches of) r×r matrices, without torch.linalg.solve's singularity check, which waits for the GPU
    (a singular undamped M gives inf or nan instead of an error)."""
    return torch.linalg.solve_ex(M, rhs)[0]


def tangent_change(A: Tensor, B: Tensor, dA: Tensor, dB: Tensor) -> Tensor:
    """B dA + dB A (m, n): the first-order change of B A for the factor changes (dA, dB) (the Jacobian J)."""
    return B @ dA + dB @ A


# ---------------------------------------------------------------------------------------------------- the pairs


def find_pairs(model_or_pairs) -> list:
    """The (A, B) pairs to optimise: `gpt2lab.lora.lora_pairs(model)` for a model, or the given pairs.

    A pair is anything with `.A` (r, n) and `.B` (m, r) parameters, `.scale`, `.name`, `.module` (the layer whose
    forward runs `module.lora_dropout` once on its input and returns the output) and `.out_slice` (the output
    columns the pair writes); duck-typed, so adapters other than `gpt2lab.lora`'s work too.
    """
    if isinstance(model_or_pairs, nn.Module):
        from ..lora import lora_pairs

        pairs = lora_pairs(model_or_pairs)
    else:
        pairs = list(model_or_pairs)
    if not pairs:
        raise LoRAOptimizerError("no LoRA (A, B) pairs found: add adapters first (gpt2lab.lora.add_lora(model, "
                                 "rank=8)) or train this model with AdamW")
    for pair in pairs:
        r = pair.A.shape[0]
        if pair.A.dim() != 2 or pair.B.dim() != 2 or pair.B.shape[1] != r:
            raise LoRAOptimizerError(f"pair {getattr(pair, 'name', '?')}: A must be (r, n) and B (m, r), got "
                                     f"{tuple(pair.A.shape)} and {tuple(pair.B.shape)}")
    return pairs


def _named(model: nn.Module | None, params: list[Tensor]) -> list:
    """(name, parameter) tuples when the model is known (the names travel in the state dict), else the tensors."""
    if model is None:
        return params
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for p in params]


# ------------------------------------------------------------------------------------- statistics through hooks


class _Statistics:
    """Row/column sums of G∘G for every pair, gathered during backward by hooks on the LoRA modules.

    Per forward (with gradients on) the hook on `module.lora_dropout` keeps x~ and the hook on `module` puts a
    tensor hook on its output. In backward that hook receives dL/dy, takes each pair's column slice δ, and
    reduces G = δᵀ x~ at once (or through the Gram identity) to (rowsum, colsum, G Aᵀ), tagged with the backward
    pass. A backward pass counts when it accumulates into B.grad (a post-accumulate-grad hook on B): passes that
    only compute other gradients (torch.autograd.grad, e.g. an adversarial regulariser's inner step) are dropped.
    The hooks hold the optimizer only weakly: deleting it removes them.
    """

    def __init__(self, pairs: list, stats: str):
        self.pairs, self.stats = pairs, stats
        self.index = {id(pair.A): i for i, pair in enumerate(pairs)}
        self.pending: dict[int, list] = {}  # pair index -> [(task id, row, col, gat)] not yet confirmed
        self.clear()
        self.inputs: dict[int, Tensor] = {}  # id(module) -> x~ of the forward in progress
        self.handles = []
        ref = weakref.ref(self)
        by_module: dict[int, tuple[nn.Module, list[int]]] = {}
        for i, pair in enumerate(pairs):
            module = getattr(pair, "module", None)
            if module is None or not hasattr(module, "lora_dropout") or not hasattr(pair, "out_slice"):
                raise LoRAOptimizerError(f"pair {getattr(pair, 'name', i)} has no LoRA module with lora_dropout and "
                                         "out_slice: AdaPreLoRA needs them to gather its statistics (use "
                                         "gpt2lab.lora.lora_pairs)")
            by_module.setdefault(id(module), (module, []))[1].append(i)
        for key, (module, idx) in by_module.items():
            self.handles.append(module.lora_dropout.register_forward_hook(
                lambda mod, args, out, key=key: _call(ref, "on_input", key, out)))
            self.handles.append(module.register_forward_hook(
                lambda mod, args, out, key=key, idx=tuple(idx): _call(ref, "on_output", key, idx, out)))
        for i, pair in enumerate(pairs):
            self.handles.append(pair.B.register_post_accumulate_grad_hook(
                lambda param, i=i: _call(ref, "on_accumulated", i)))

    def clear(self) -> None:
        """Forget what was gathered since the last step (called by step() and zero_grad())."""
        self.gathered: dict[int, list] = {}  # pair index -> [row, col, gat, number of passes]
        self.pending.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __del__(self):
        self.remove()

    # hooks ------------------------------------------------------------------------------------------------
    def on_input(self, key: int, x_tilde: Tensor) -> None:
        if torch.is_grad_enabled():  # an evaluation forward has no backward: keep nothing
            self.inputs[key] = x_tilde

    def on_output(self, key: int, idx: tuple, y: Tensor) -> None:
        x_tilde = self.inputs.pop(key, None)
        if x_tilde is None or not isinstance(y, Tensor) or not y.requires_grad:
            return  # merged, or no gradient will flow
        ref = weakref.ref(self)
        y.register_hook(lambda grad: _call(ref, "on_grad", idx, x_tilde, grad))

    def on_grad(self, idx: tuple, x_tilde: Tensor, grad: Tensor) -> None:
        task = torch._C._current_graph_task_id()
        dtype = torch.promote_types(x_tilde.dtype, torch.float32)  # float32 under bf16 autocast, float64 kept
        x = x_tilde.detach().reshape(-1, x_tilde.shape[-1]).to(dtype)  # (N, n) tokens flattened
        for i in idx:
            pair = self.pairs[i]
            delta = grad.detach()[..., pair.out_slice].reshape(-1, pair.B.shape[0]).to(dtype)  # (N, m) dL/dy slice
            A = pair.A.detach().to(dtype)  # (r, n)
            if self.stats == "transient":
                G = delta.T @ x  # (m, n): alive only inside this call
                S = G * G
                row, col, gat = S.sum(dim=1), S.sum(dim=0), G @ A.T  # (m,), (n,), (m, r)
                del G, S
            else:  # Gram identity: never an (m, n) matrix, (N, N) ones instead
                row = ((x @ x.T) @ delta * delta).sum(dim=0)  # (m,) diag(δᵀ X~X~ᵀ δ)
                col = ((delta @ delta.T) @ x * x).sum(dim=0)  # (n,) diag(X~ᵀ δδᵀ X~)
                gat = delta.T @ (x @ A.T)  # (m, r)
            self.pending.setdefault(i, []).append((task, row, col, gat))

    def on_accumulated(self, i: int) -> None:
        task = torch._C._current_graph_task_id()
        entries = self.pending.pop(i, [])
        mine = [e for e in entries if e[0] == task]  # this backward's contributions (several forwards may share it)
        if not mine:
            return
        row = sum(e[1] for e in mine)
        col = sum(e[2] for e in mine)
        gat = sum(e[3] for e in mine)
        if i in self.gathered:
            self.gathered[i][3] += 1  # a second backward pass before step(): refused there (see step)
        else:
            self.gathered[i] = [row, col, gat, 1]


def _call(ref, method: str, *args):
    """Call a method of the statistics object if it still exists (the hooks hold it weakly)."""
    target = ref()
    if target is not None:
        getattr(target, method)(*args)


# ---------------------------------------------------------------------------------------------------- optimizer


class AdaPreLoRA(torch.optim.Optimizer):
    """AdaPreLoRA for LoRA pairs, AdamW for every other trainable parameter. Built in notebook 08 (adaprelora), §5.

        optimizer = AdaPreLoRA(model, lr=5e-4)              # model with adapters (gpt2lab.lora.add_lora)
        train(model, task, AdaPreLoRA, config)              # as a factory: called as AdaPreLoRA(model, config.lr)

    Liu, Bian, Cai (arXiv 2605.08734). Per pair and step t (details in the module docstring):

    1. statistics: ℓ ← β₂ℓ + (1−β₂)·rowsum(G∘G + ε₁), c likewise with column sums, from hooks (see `_Statistics`);
       p, q from `preconditioner` (bias-corrected).
    2. direction (`mode`):
       * "sgd" (Algorithm 1): `factor_update` of the gradients ∇A, ∇B;
       * "scaled_adamw" (the Adam variant, default; INFERRED: the paper's Algorithm 2 is not in the text we have,
         only that it keeps the peak memory of Scaled AdamW): Algorithm 1's (ΔA, ΔB) fed as gradients into AdamW's
         bias-corrected moments (β₁, β₂, eps), like Scaled AdamW does with its preconditioned gradients. This
         bounds the per-entry factor steps, which Algorithm 1 does not: right after B = 0, ‖B‖ = O(lr), so B ΔA
         being an O(1) projection makes ΔA = O(1/lr). State: twice the factors, plus ℓ and c.
       * "factor_momentum" (INFERRED alternative, from "two-sided diagonal whitening on momentum"): bias-corrected
         EMAs m_A, m_B of ∇A, ∇B (β₁) in place of the gradients, with C = ½(m̂_A Aᵀ + Bᵀ m̂_B) (the two estimates
         of Bᵀ Ḡ Aᵀ differ once A, B move; their mean is our choice); β₁ = 0 is Algorithm 1 exactly. Beware: it
         carries Algorithm 1's O(1/lr) first step of A on for ~1/(1 − β₁) steps, and the momentum, gathered at
         other factors, stops matching the current ones; on notebook 08's toy it diverges where "sgd" and
         "scaled_adamw" converge.
    3. decoupled weight decay A, B ← (1 − lr·λ)(A, B) (INFERRED form), then A ← A − lr·ΔA, B ← B − lr·ΔB, both
       from the same pre-step factors.

    Arguments: `model` (with adapters) or a list of pairs (see `find_pairs`); lr; betas = (β₁, β₂): β₁ for the
    momentum, β₂ for the statistics (and AdamW's second moment in "scaled_adamw"); eps (AdamW's, "scaled_adamw"
    and the other parameters); eps1 = ε₁; delta_rel, delta_abs (`damped`); scale_invariant (s⁻², INFERRED
    default True); bias_correction of ℓ, c (INFERRED); stats ("transient" or "gram"); weight_decay for the pairs;
    other_weight_decay for the non-pair parameters' AdamW (no decay on biases, norms, embeddings).

    The gradient scale. The statistics come from dL/dy as backpropagated, the step from the factors' .grad. When
    these differ by a factor (gradient clipping, a loss scaler's unscaling), the statistics are rescaled by
    ρ² with ρ = ⟨∇B, s·G Aᵀ⟩ / ‖s·G Aᵀ‖², so that the preconditioner sees the gradient the step uses.

    One backward pass per step: a second pass that accumulates into the factors' .grad before step() (gradient
    accumulation) is refused in step(), since the statistics need the square of the summed gradient. State
    (`state_dict`): per pair, "step", "col_sq" (n) with A and "step", "row_sq" (m) with B, plus per factor
    "exp_avg" ("factor_momentum") or "exp_avg" and "exp_avg_sq" ("scaled_adamw"); AdamW's state for the rest.
    Call `remove_hooks()` (or delete the optimizer) to stop gathering statistics.
    """

    def __init__(self, model, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, mode: str = "scaled_adamw", eps1: float = 1e-30,
                 delta_rel: float = 1e-6, delta_abs: float = 1e-12, scale_invariant: bool = True,
                 bias_correction: bool = True, stats: str = "transient", other_weight_decay: float = 0.01):  # fmt: skip
        _validate(lr, betas, eps, weight_decay, mode, stats, delta_rel, delta_abs, other_weight_decay)
        pairs = find_pairs(model)
        module = model if isinstance(model, nn.Module) else None
        pair_params = [t for pair in pairs for t in (pair.A, pair.B)]  # A0, B0, A1, B1, ...
        settings = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode, eps1=eps1,
                        delta_rel=delta_rel, delta_abs=delta_abs, scale_invariant=scale_invariant,
                        bias_correction=bias_correction, kind="lora_pairs", scales=[float(p.scale) for p in pairs])
        groups = [{"params": _named(module, pair_params), **settings}]
        if module is not None:  # the other trainable parameters (a head, biases): AdamW
            held = {id(t) for t in pair_params}
            exempt = no_decay(module)
            rest = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in held]
            for decay, chosen in ((other_weight_decay, [(n, p) for n, p in rest if n not in exempt]),
                                  (0.0, [(n, p) for n, p in rest if n in exempt])):
                if chosen:
                    groups.append({"params": chosen, "lr": lr, "betas": tuple(betas), "eps": eps,
                                   "weight_decay": decay, "kind": "adamw"})
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.pairs = pairs
        self._stats = _Statistics(pairs, stats)

    def remove_hooks(self) -> None:
        """Stop gathering statistics (the optimizer cannot step after this)."""
        self._stats.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._stats.clear()  # statistics of a discarded backward pass must not reach the next step

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every pair with gradients (and AdamW for the rest); returns closure() when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("kind") == "lora_pairs":
                self._step_pairs(group)
            else:
                self._step_adamw(group)
        self._stats.clear()
        return loss

    def _step_pairs(self, group: dict) -> None:
        """Check every pair with gradients, then step the pairs in batches of one shape (few kernel launches)."""
        params, batches = group["params"], {}
        for i in range(len(params) // 2):
            A, B, s = params[2 * i], params[2 * i + 1], group["scales"][i]
            if A.grad is None and B.grad is None:
                continue
            gathered = self._stats.gathered.get(self._stats.index[id(A)])
            name = getattr(self.pairs[i], "name", f"pair {i}")
            if gathered is None:
                raise LoRAOptimizerError(f"{name} has gradients but AdaPreLoRA saw no backward pass through its "
                                         "module: build the optimizer before the forward pass, and unmerge the "
                                         "adapters")
            if gathered[3] > 1:
                raise LoRAOptimizerError(f"{name}: {gathered[3]} backward passes since the last step; AdaPreLoRA's "
                                         "statistics need the gradient of the whole step: call step() after each "
                                         "backward (no gradient accumulation)")
            t = int(self.state[A]["step"].item()) + 1 if self.state[A] else 1
            key = (tuple(A.shape), tuple(B.shape), A.dtype, A.device, s, t)
            batches.setdefault(key, []).append((A, B, gathered))
        for (_, _, _, _, s, t), batch in batches.items():
            self._step_batch(group, batch, s, t)

    def _step_batch(self, group: dict, batch: list, s: float, t: int) -> None:
        """One step for P pairs of the same shapes: the r×r algebra on stacked (P, ...) tensors."""
        beta1, beta2 = group["betas"]
        As, Bs = [a for a, _, _ in batch], [b for _, b, _ in batch]
        dtype = torch.promote_types(As[0].dtype, torch.float32)
        stA, stB = [self.state[a] for a in As], [self.state[b] for b in Bs]
        for st, param, stat in [*zip(stA, As, ("col_sq",) * len(As)), *zip(stB, Bs, ("row_sq",) * len(Bs))]:
            if not st:
                st["step"] = torch.tensor(0.0)
                size = param.shape[1] if stat == "col_sq" else param.shape[0]
                st[stat] = torch.zeros(size, dtype=dtype, device=param.device)  # c (n,) with A, ℓ (m,) with B
                if group["mode"] != "sgd":
                    st["exp_avg"] = torch.zeros_like(param, dtype=dtype)
                if group["mode"] == "scaled_adamw":
                    st["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype)
        torch._foreach_add_([st["step"] for st in stA + stB], 1.0)
        A = torch.stack([a.detach() for a in As]).to(dtype)  # (P, r, n)
        B = torch.stack([b.detach() for b in Bs]).to(dtype)  # (P, m, r)
        gA = torch.stack([a.grad if a.grad is not None else torch.zeros_like(a) for a in As]).to(dtype)  # (P, r, n)
        gB = torch.stack([b.grad if b.grad is not None else torch.zeros_like(b) for b in Bs]).to(dtype)  # (P, m, r)
        row = torch.stack([g[0] for _, _, g in batch]).to(dtype)  # (P, m) rowsum(G∘G) of this step
        col = torch.stack([g[1] for _, _, g in batch]).to(dtype)  # (P, n)
        gat = torch.stack([g[2] for _, _, g in batch]).to(dtype)  # (P, m, r) G Aᵀ
        n, m = A.shape[-1], B.shape[-2]

        # 1. statistics of the gradient this step uses (ρ: clipping / loss scaling, see the class docstring)
        sgat = s * gat  # (P, m, r) what ∇B would be without clipping or loss scaling
        norm2 = (sgat * sgat).sum((-2, -1))  # (P,)
        rho2 = torch.where(norm2 > 0, ((gB * sgat).sum((-2, -1)) / norm2.clamp_min(1e-30)) ** 2, 1.0)  # no GPU sync
        rows, cols = [st["row_sq"] for st in stB], [st["col_sq"] for st in stA]
        torch._foreach_mul_(rows, beta2)  # ℓ ← β₂ℓ + (1 − β₂)(ρ² rowsum + n ε₁), c likewise
        torch._foreach_add_(rows, list((rho2[:, None] * row + n * group["eps1"]).unbind(0)), alpha=1 - beta2)
        torch._foreach_mul_(cols, beta2)
        torch._foreach_add_(cols, list((rho2[:, None] * col + m * group["eps1"]).unbind(0)), alpha=1 - beta2)
        p, q = preconditioner(torch.stack(rows), torch.stack(cols), t, beta2, group["bias_correction"])  # (P,m) (P,n)

        # 2. the direction
        kw = dict(scale=s, delta_rel=group["delta_rel"], delta_abs=group["delta_abs"],
                  scale_invariant=group["scale_invariant"])
        if group["mode"] == "factor_momentum":
            # INFERRED (Algorithm 2 reconstructed): momentum in factor space, H from the raw gradients
            moments = [st["exp_avg"] for st in stA + stB]
            torch._foreach_lerp_(moments, [*gA.unbind(0), *gB.unbind(0)], 1 - beta1)
            mA = torch.stack(moments[: len(As)]) / (1 - beta1**t)  # (P, r, n) bias-corrected
            mB = torch.stack(moments[len(As) :]) / (1 - beta1**t)  # (P, m, r)
            C = 0.5 * (mA @ A.mT + B.mT @ mB)  # (P, r, r) INFERRED: the mean of the two estimates
            dA, dB = factor_update(A, B, mA, mB, p, q, C=C, **kw)
            directions = [*dA.unbind(0), *dB.unbind(0)]
        else:
            dA, dB = factor_update(A, B, gA, gB, p, q, **kw)
            directions = [*dA.unbind(0), *dB.unbind(0)]
            if group["mode"] == "scaled_adamw":  # INFERRED alternative: AdamW's moments of (ΔA, ΔB)
                directions = _adam_directions([*stA, *stB], directions, beta1, beta2, group["eps"], t)

        # 3. decoupled decay, then the step, both from the pre-step factors
        lr, wd, params = group["lr"], group["weight_decay"], [*As, *Bs]
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)  # INFERRED form: AdamW's decoupled decay
        torch._foreach_add_(params, [d.to(param.dtype) for d, param in zip(directions, params)], alpha=-lr)

    def _step_adamw(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                      eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=False)


def _adam_directions(states: list, directions: list, beta1: float, beta2: float, eps: float, t: int) -> list:
    """m̂ / (√v̂ + ε) of the moments of each direction, updated in its `state` (AdamW's arithmetic without the lr)."""
    m, v = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
    torch._foreach_lerp_(m, directions, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, directions, directions, 1 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, (1 - beta2**t) ** 0.5)
    torch._foreach_add_(denom, eps)
    out = torch._foreach_div(m, denom)
    torch._foreach_div_(out, 1 - beta1**t)
    return out


def _validate(lr, betas, eps, weight_decay, mode, stats, delta_rel, delta_abs, other_weight_decay) -> None:
    """One-line errors for settings outside their meaningful ranges."""
    if not lr >= 0.0:
        raise LoRAOptimizerError(f"AdaPreLoRA: lr must be >= 0, got {lr}")
    if len(tuple(betas)) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise LoRAOptimizerError(f"AdaPreLoRA: betas must be a pair (beta1, beta2) in [0, 1), got {betas!r}")
    if mode not in MODES:
        raise LoRAOptimizerError(f"AdaPreLoRA: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if stats not in STATS:
        raise LoRAOptimizerError(f"AdaPreLoRA: stats must be one of {', '.join(STATS)}, got {stats!r}")
    for name, value in (("eps", eps), ("weight_decay", weight_decay), ("delta_rel", delta_rel),
                        ("delta_abs", delta_abs), ("other_weight_decay", other_weight_decay)):
        if not value >= 0.0:
            raise LoRAOptimizerError(f"AdaPreLoRA: {name} must be >= 0, got {value}")
