"""Check cells of notebook 08 (adaprelora): Adafactor's statistics and preconditioner, the H-weighted tangent
projection, the balanced closed-form factor update, the LoRA scale, and Scaled GD's preconditioned gradients.

The references are built here by brute force, never with `gpt2lab.optim.adaprelora` (which the learner
re-implements): the projection T* and the balanced pair come from weighted least squares over vec(dA), vec(dB)
(torch.linalg.lstsq on the Jacobian written as Kronecker products), then a second least-squares solve over the
r×r gauge family for the balanced member; Adafactor's second moment is written out as V = ℓ̂ ĉᵀ / ‖ℓ̂‖₁.

Inputs where mistakes show: m ≠ n (7 × 5, rank 3), so rows and columns cannot be swapped silently; p and q far
from 1 and from each other, so a forgotten or inverted weight changes the answer; r = 3, so M_B⁻¹ C M_A⁻¹ differs
from M_A⁻¹ C M_B⁻¹; a bias correction at step 3 with β₂ = 0.9 (a factor 3.7); the scale s = 2.5, so s, s², s⁻¹ and
s⁻² all differ. Named mistakes: sums of G instead of G∘G, the EMA weights swapped, means for sums, rows and
columns swapped; no bias correction, no square root, no (or a double) normalisation; the Frobenius projectors,
the overlap counted twice or not at all; the unbalanced members of the family, corrections of 1 instead of ½,
unweighted Gram matrices, K's factors swapped, H applied instead of H⁻¹; the scale forgotten or applied once;
Scaled GD's Gram matrices swapped or multiplied. Inputs are the caller's tensors and must stay unchanged.
"""

from __future__ import annotations

import torch

from .core import (
    _close,
    check,
    compare,
    compare_with_hints,
    earlier_stubs,
    expect,
    known_mistake,
    new_tensors,
    returned_pair,
)

M, N, R = 7, 5, 3  # W is (M, N); A (R, N), B (M, R)
SCALE = 2.5
ATOL = 1e-9


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _problem(seed: int = 0):
    """Full-rank A, B, a gradient G and an Adafactor (p, q) from a short stream of gradients (so ‖ℓ‖₁ = ‖c‖₁)."""
    A, B, G = _rand(R, N, seed=seed), _rand(M, R, seed=seed + 1), _rand(M, N, seed=seed + 2)
    row, col = torch.zeros(M, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    for t in range(3):
        g = _rand(M, N, seed=seed + 10 + t) * torch.linspace(0.2, 3.0, N, dtype=torch.float64)  # uneven columns
        row, col = 0.9 * row + 0.1 * (g * g).sum(1), 0.9 * col + 0.1 * (g * g).sum(0)
    row, col = row / (1 - 0.9**3), col / (1 - 0.9**3)
    p, q = (row / row.sum()).sqrt(), col.sqrt()  # p ~ 0.2-0.6, q ~ 1-6: multiplying for dividing shows
    return A, B, G, p, q


# ------------------------------------------------------------------------------------------- 1. the statistics


@check("update_statistics")
def update_statistics(fn):
    """fn(row_sq, col_sq, G, beta2) -> (row_sq, col_sq): EMAs of the row sums and column sums of G∘G."""
    for seed, beta2 in ((0, 0.999), (1, 0.5)):
        row, col = _rand(M, seed=seed).abs(), _rand(N, seed=seed + 5).abs()
        G = _rand(M, N, seed=seed + 9)
        with new_tensors("row_sq = beta2 * row_sq + ...", row_sq=row, col_sq=col, G=G):
            got_row, got_col = returned_pair(fn(row, col, G, beta2), "row_sq, col_sq")
        S = G * G
        exp_row, exp_col = beta2 * row + (1 - beta2) * S.sum(1), beta2 * col + (1 - beta2) * S.sum(0)
        for got in (got_row, got_col):
            expect(torch.is_tensor(got), f"return tensors, got {type(got).__name__}")
        expect(not (tuple(got_row.shape) == (N,) and tuple(got_col.shape) == (M,)),
               f"rows and columns are swapped: row_sq has one entry per row of G ({M},), summed over the columns "
               f"(dim=1); col_sq one per column ({N},), summed over the rows (dim=0)")  # fmt: skip
        label = f"(beta2 {beta2})"
        compare_with_hints(f"row_sq {label}", got_row, exp_row, ATOL, [
            ("sum the squares G∘G (G * G), not G itself", beta2 * row + (1 - beta2) * G.sum(1)),
            ("sum the squares G∘G, not the absolute values", beta2 * row + (1 - beta2) * G.abs().sum(1)),
            ("square each entry, then sum: (G * G).sum(1), not G.sum(1) ** 2", beta2 * row + (1 - beta2) * G.sum(1)**2),
            ("the EMA weights are swapped: keep β2 of the old statistics and add (1 − β2) of the new sums",
             (1 - beta2) * row + beta2 * S.sum(1)),
            ("use sums over each row, not means (the normalisation comes in the next exercise)",
             beta2 * row + (1 - beta2) * S.mean(1)),
            ("the old statistics are lost: it is an average over steps, β2·row_sq + (1 − β2)·(new sums)",
             (1 - beta2) * S.sum(1)),
            ("the old statistics are lost: it is an average over steps, β2·row_sq + (1 − β2)·(new sums)", S.sum(1)),
        ])  # fmt: skip
        compare_with_hints(f"col_sq {label}", got_col, exp_col, ATOL, [
            ("sum the squares G∘G (G * G), not G itself", beta2 * col + (1 - beta2) * G.sum(0)),
            ("use sums over each column, not means", beta2 * col + (1 - beta2) * S.mean(0)),
            ("the EMA weights are swapped: keep β2 of the old statistics", (1 - beta2) * col + beta2 * S.sum(0)),
        ])
    return "row and column statistics match for β2 = 0.999 and 0.5"


# ------------------------------------------------------------------------------------------- 2. p and q


@check("preconditioner")
def preconditioner(fn):
    """fn(row_sq, col_sq, step, beta2) -> (p (m,), q (n,)) with p qᵀ = √V̂, V̂ = ℓ̂ ĉᵀ / ‖ℓ̂‖₁ (bias-corrected)."""
    g = torch.Generator().manual_seed(3)
    row, col = torch.zeros(M, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    beta2, step = 0.9, 3
    for _ in range(step):  # statistics of a real stream: ‖ℓ‖₁ = ‖c‖₁
        G = torch.randn(M, N, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, N, dtype=torch.float64)
        row, col = beta2 * row + (1 - beta2) * (G * G).sum(1), beta2 * col + (1 - beta2) * (G * G).sum(0)
    with new_tensors("ell_hat = row_sq / (1 - beta2**step)", row_sq=row, col_sq=col):
        p, q = returned_pair(fn(row, col, step, beta2), "p, q")
    for name, got, size in (("p", p, M), ("q", q, N)):
        expect(torch.is_tensor(got), f"{name} should be a tensor, got {type(got).__name__}")
        expect(tuple(got.shape) == (size,), f"{name} has shape {tuple(got.shape)}, expected ({size},): p has one "
                                            f"entry per row of W (m = {M}), q one per column (n = {N})")
    ell, c = row / (1 - beta2**step), col / (1 - beta2**step)
    sqrt_V = (torch.outer(ell, c) / ell.sum()).sqrt()  # (m, n) √V̂, written out
    raw = torch.outer(row, col) / row.sum()  # V without bias correction
    compare_with_hints(f"the product p qᵀ (step {step}, beta2 {beta2})", torch.outer(p, q), sqrt_V, ATOL, [
        ("divide ℓ and c by 1 − β2^step first (bias correction): both start at zero", raw.sqrt()),
        (f"bias correction: use 1 − β2^step with step = {step}, not step − 1",
         (torch.outer(row, col) / row.sum() / (1 - beta2 ** (step - 1))).sqrt()),
        ("p qᵀ must be √V̂: take the square roots of the normalised statistics", sqrt_V**2),
        ("normalise by ‖ℓ̂‖₁, the sum of ℓ̂: V̂ = ℓ̂ ĉᵀ / ‖ℓ̂‖₁", torch.outer(ell, c).sqrt()),
        ("normalise by the sum ‖ℓ̂‖₁, not by the mean", (torch.outer(ell, c) / ell.mean()).sqrt()),
        ("normalise once: V̂ = ℓ̂ ĉᵀ / ‖ℓ̂‖₁, not ℓ̂/‖ℓ̂‖₁ times ĉ/‖ĉ‖₁",
         (torch.outer(ell / ell.sum(), c / c.sum())).sqrt()),
    ])  # fmt: skip
    return "p qᵀ = √V̂ (any split of the scalar between p and q is fine; we use p = √(ℓ̂/‖ℓ̂‖₁), q = √ĉ)"


# ------------------------------------------------------------------------------------------- brute force


def _jacobian(A, B) -> torch.Tensor:
    """(m·n, r·n + m·r): vec(B dA + dB A) = J [vec dA; vec dB] (row-major vec)."""
    n, m = A.shape[1], B.shape[0]
    At = torch.empty(n, A.shape[0], dtype=A.dtype).copy_(A.T)
    return torch.cat([torch.kron(B, torch.eye(n, dtype=B.dtype)), torch.kron(torch.eye(m, dtype=B.dtype), At)], 1)


def _lstsq(X, y) -> torch.Tensor:
    return torch.linalg.lstsq(X, y, driver="gelsd").solution


def _brute_force(A, B, Z, p, q):
    """A minimiser (dA, dB) of ||B dA + dB A − Z||_H by weighted least squares, and its T* = B dA + dB A."""
    m, n, r = B.shape[0], A.shape[1], A.shape[0]
    w = torch.outer(p, q).reshape(-1).sqrt()
    J = _jacobian(A, B)
    d = _lstsq(w[:, None] * J, w * Z.reshape(-1))
    return d[: r * n].reshape(r, n), d[r * n :].reshape(m, r), (J @ d).reshape(m, n)


def _balanced_reference(A, B, Z, p, q):
    """The member (dA − XA, dB + BX) minimising ||B dA' − dB' A||_H, by a second least-squares solve over X."""
    dA, dB, T = _brute_force(A, B, Z, p, q)
    w = torch.outer(p, q).reshape(-1).sqrt()
    D = (B @ dA - dB @ A).reshape(-1)  # the imbalance at X = 0; at X it is D − 2 vec(B X A)
    At = torch.empty(A.shape[1], A.shape[0], dtype=A.dtype).copy_(A.T)
    X = _lstsq(w[:, None] * 2 * torch.kron(B, At), w * D).reshape(A.shape[0], A.shape[0])
    return dA - X @ A, dB + B @ X, T


def _unbalanced(A, B, G, p, q, a_coef: float, b_coef: float, weighted: bool = True, swap_k: bool = False,
                inverse: bool = True):  # fmt: skip
    """The closed form with other coefficients (or other mistakes), to recognise them in a learner's answer."""
    P = torch.diag(p) if weighted else torch.eye(len(p), dtype=p.dtype)
    Q = torch.diag(q) if weighted else torch.eye(len(q), dtype=q.dtype)
    MB, MA = B.T @ P @ B, A @ Q @ A.T
    C = B.T @ G @ A.T
    K = torch.linalg.inv(MA) @ C @ torch.linalg.inv(MB) if swap_k else torch.linalg.inv(MB) @ C @ torch.linalg.inv(MA)
    Hq, Hp = (1 / q, 1 / p) if inverse else (q, p)
    dA = torch.linalg.inv(MB) @ (B.T @ G) * Hq - a_coef * K @ A
    dB = (G @ A.T @ torch.linalg.inv(MA)) * Hp[:, None] - b_coef * B @ K
    return dA, dB


# ------------------------------------------------------------------------------------------- 3. the projection


@check("tangent_projection")
def tangent_projection(fn):
    """fn(A, B, Z, p, q) -> T* (m, n): the H-orthogonal projection of Z onto {B X + Y A}."""
    A, B, G, p, q = _problem(0)
    Z = G / torch.outer(p, q)
    with new_tensors("T = ...", A=A, B=B, Z=Z, p=p, q=q):
        T = fn(A, B, Z, p, q)
    _, _, expected = _brute_force(A, B, Z, p, q)
    P, Q = torch.diag(p), torch.diag(q)
    PB = B @ torch.linalg.inv(B.T @ P @ B) @ B.T @ P
    PA = Q @ A.T @ torch.linalg.inv(A @ Q @ A.T) @ A
    FB = B @ torch.linalg.pinv(B)
    FA = torch.linalg.pinv(A) @ A
    compare_with_hints("T* (the projection of Z)", T, expected, 1e-8, [
        ("these are the Frobenius projectors; weight them by the metric: Π_B = B (Bᵀ P B)⁻¹ Bᵀ P and "
         "Π_A = Q Aᵀ (A Q Aᵀ)⁻¹ A, with P = Diag(p), Q = Diag(q)", FB @ Z + Z @ FA - FB @ Z @ FA),
        ("Π_B Z + Π_A Z counts the overlap Π_B Π_A Z twice: subtract it once", PB @ Z + Z @ PA),
        ("subtract the overlap Π_B Π_A Z once, not twice", PB @ Z + Z @ PA - 2 * PB @ Z @ PA),
        ("only Π_B Z: add the part B cannot reach, Π_A Z − Π_B Π_A Z", PB @ Z),
        ("only Π_A Z: add Π_B Z − Π_B Π_A Z", Z @ PA),
        ("Π_B Π_A Z is only the overlap: T* = Π_B Z + Π_A Z − Π_B Π_A Z", PB @ Z @ PA),
        ("the projectors are transposed: Π_B = B M_B⁻¹ Bᵀ P (P on the right) and Π_A = Q Aᵀ M_A⁻¹ A (Q on the left)",
         PB.T @ Z + Z @ PA.T - PB.T @ Z @ PA.T),
    ])  # fmt: skip
    return "T* equals the brute-force weighted least-squares solution"


# ------------------------------------------------------------------------------------------- 4. balanced update


@check("balanced_update")
def balanced_update(fn):
    """fn(A, B, G_A, G_B, p, q) -> (dA (r, n), dB (m, r)): the balanced minimiser (s = 1, no damping)."""
    A, B, G, p, q = _problem(1)
    G_A, G_B = B.T @ G, G @ A.T
    with new_tensors("dA = ...", A=A, B=B, G_A=G_A, G_B=G_B, p=p, q=q):
        dA, dB = returned_pair(fn(A, B, G_A, G_B, p, q), "dA, dB")
    for name, got, shape in (("dA", dA, (R, N)), ("dB", dB, (M, R))):
        expect(torch.is_tensor(got), f"{name} should be a tensor, got {type(got).__name__}")
        expect(not (tuple(dA.shape) == (M, R) and tuple(dB.shape) == (R, N)), "the pair is in the wrong order: "
               "return (dA, dB), dA shaped like A (r, n) and dB like B (m, r)")
        expect(tuple(got.shape) == shape, f"{name} has shape {tuple(got.shape)}, expected {shape} (like "
                                          f"{'A' if name == 'dA' else 'B'})")
    exp_A, exp_B, T = _balanced_reference(A, B, G / torch.outer(p, q), p, q)
    got_T = B @ dA + dB @ A
    hints = [
        ("the overlap B K A is counted twice: subtract ½ K A from dA and ½ B K from dB", (0.0, 0.0)),
        ("the two corrections must add up to one K: ½ K A and ½ B K, not 1 each", (1.0, 1.0)),
        ("B dA + dB A is right, but this is not the balanced member: split the overlap, ½ K A from dA and ½ B K "
         "from dB", (0.0, 1.0)),
        ("B dA + dB A is right, but this is not the balanced member: split the overlap, ½ K A from dA and ½ B K "
         "from dB", (1.0, 0.0)),
    ]
    pair = torch.cat([dA.reshape(-1), dB.reshape(-1)])
    expected = torch.cat([exp_A.reshape(-1), exp_B.reshape(-1)])

    def flat(*args, **kw):
        a, b = _unbalanced(A, B, G, p, q, *args, **kw)
        return torch.cat([a.reshape(-1), b.reshape(-1)])

    known_mistake(pair, expected, 1e-8, [(hint, lambda c=c: flat(*c)) for hint, c in hints] + [
        ("weight the Gram matrices: M_B = Bᵀ P B and M_A = A Q Aᵀ (P = Diag(p), Q = Diag(q))",
         lambda: flat(0.5, 0.5, weighted=False)),
        ("K = M_B⁻¹ C M_A⁻¹ (M_B⁻¹ on the left, on B's side), not M_A⁻¹ C M_B⁻¹", lambda: flat(0.5, 0.5, swap_k=True)),
        ("apply H⁻¹: divide G_A's columns by q and G_B's rows by p (not multiply)",
         lambda: flat(0.5, 0.5, inverse=False)),
    ])  # fmt: skip
    compare("B dA + dB A (the W-direction T*)", got_T, T, atol=1e-8)
    compare("dA", dA, exp_A, atol=1e-8)
    compare("dB", dB, exp_B, atol=1e-8)
    return "B dA + dB A is the H-projection T* and (dA, dB) is the balanced member (brute-force least squares)"


# ------------------------------------------------------------------------------------------- 5. the scale


@check("lora_update")
def lora_update(fn):
    """fn(A, B, grad_A, grad_B, p, q, scale) -> (dA, dB) with s·(B dA + dB A) = T* for autograd's gradients."""
    with earlier_stubs(fn):
        return _lora_update(fn)


def _lora_update(fn):
    A, B, G, p, q = _problem(2)
    s = SCALE
    grad_A, grad_B = s * B.T @ G, s * G @ A.T  # what autograd gives for W = W0 + s B A
    with new_tensors("dA = ... / scale**2", A=A, B=B, grad_A=grad_A, grad_B=grad_B, p=p, q=q):
        dA, dB = returned_pair(fn(A, B, grad_A, grad_B, p, q, s), "dA, dB")
    exp_A, exp_B, T = _balanced_reference(A, B, G / torch.outer(p, q), p, q)
    exp_A, exp_B = exp_A / s, exp_B / s  # balanced(∇)·s⁻² = balanced(G)·s⁻¹
    expect(torch.is_tensor(dA) and torch.is_tensor(dB), "return two tensors (dA, dB)")
    expect(tuple(dA.shape) == (R, N) and tuple(dB.shape) == (M, R),
           f"dA should be ({R}, {N}) like A and dB ({M}, {R}) like B, got {tuple(dA.shape)}, {tuple(dB.shape)}")
    change = s * (B @ dA + dB @ A)  # the first-order W-change per unit of lr
    known_mistake(change, T, 1e-8, [
        (f"the W-change s·(B dA + dB A) is s²·T* (s = {s}): multiply the update by s⁻²", s**2 * T),
        (f"the W-change s·(B dA + dB A) is s·T* (s = {s}): one factor s⁻¹ is missing (the gradients carry one s "
         "and the W-change another: multiply by s⁻²)", s * T),
        (f"the W-change s·(B dA + dB A) is T*/s (s = {s}): multiply by s⁻² once, not s⁻³ (did you also divide the "
         "gradients by s?)", T / s),
        (f"the W-change s·(B dA + dB A) is s⁴·T* (s = {s}): multiply by s⁻², not by s²", s**4 * T),
    ])  # fmt: skip
    compare("the W-change s·(B dA + dB A)", change, T, atol=1e-8)
    compare("dA", dA, exp_A, atol=1e-8)
    compare("dB", dB, exp_B, atol=1e-8)
    return f"with s = {s} the W-change is T* and the pair is the balanced one, scaled by s⁻²"


# ------------------------------------------------------------------------------------------- 6. Scaled GD


@check("scaled_gradients")
def scaled_gradients(fn):
    """fn(A, B, grad_A, grad_B) -> ((BᵀB)⁻¹ grad_A, grad_B (AAᵀ)⁻¹)."""
    A, B, G, _, _ = _problem(3)
    grad_A, grad_B = B.T @ G, G @ A.T
    with new_tensors("gA = ...", A=A, B=B, grad_A=grad_A, grad_B=grad_B):
        gA, gB = returned_pair(fn(A, B, grad_A, grad_B), "gA, gB")
    for name, got, shape in (("gA", gA, (R, N)), ("gB", gB, (M, R))):
        expect(torch.is_tensor(got), f"{name} should be a tensor, got {type(got).__name__}")
        expect(tuple(got.shape) == shape, f"{name} has shape {tuple(got.shape)}, expected {shape}")
    PB = B @ torch.linalg.pinv(B)  # orthogonal projectors, by the pseudo-inverse
    PA = torch.linalg.pinv(A) @ A
    BtB, AAt = B.T @ B, A @ A.T
    compare_with_hints("B gA (should be P_B G)", B @ gA, PB @ G, 1e-8, [
        ("A's gradient is preconditioned by B's Gram matrix (BᵀB)⁻¹ (A's step moves W through B), not (AAᵀ)⁻¹",
         B @ torch.linalg.inv(AAt) @ grad_A),
        ("multiply by the inverse (BᵀB)⁻¹ (torch.linalg.solve(B.T @ B, grad_A)), not by BᵀB", B @ BtB @ grad_A),
    ])  # fmt: skip
    compare_with_hints("gB A (should be G P_A)", gB @ A, G @ PA, 1e-8, [
        ("B's gradient is preconditioned by A's Gram matrix (AAᵀ)⁻¹, not (BᵀB)⁻¹", grad_B @ torch.linalg.inv(BtB) @ A),
        ("multiply by the inverse (AAᵀ)⁻¹, not by AAᵀ", grad_B @ AAt @ A),
    ])  # fmt: skip
    expect(_close(gA, torch.linalg.solve(BtB, grad_A), 1e-8), "gA should be (BᵀB)⁻¹ grad_A")
    return "B gA = P_B G and gB A = G P_A: each factor's step is an orthogonal projection of G"
