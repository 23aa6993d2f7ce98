"""Notebook 08's checks (gpt2lab.checks.adaprelora): each exercise's stub reads "not implemented yet", correct
answers (the notebook's and another formulation) pass, and every planted mistake gets its exact ✗ line."""

from __future__ import annotations

import pytest
import torch
from check_helpers import NOT_YET, assert_mistake_line, assert_passes, stub

from gpt2lab.checks import adaprelora as check

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------ the notebook's answers


def statistics(row_sq, col_sq, G, beta2):
    S = G * G
    return beta2 * row_sq + (1 - beta2) * S.sum(dim=1), beta2 * col_sq + (1 - beta2) * S.sum(dim=0)


def pq(row_sq, col_sq, step, beta2):
    ell, c = row_sq / (1 - beta2**step), col_sq / (1 - beta2**step)
    return (ell / ell.sum()).sqrt(), c.sqrt()


def projection(A, B, Z, p, q):
    P, Q = torch.diag(p), torch.diag(q)
    PB = B @ torch.linalg.solve(B.T @ P @ B, B.T @ P)
    PA = Q @ A.T @ torch.linalg.solve(A @ Q @ A.T, A)
    return PB @ Z + Z @ PA - PB @ Z @ PA


def balanced(A, B, G_A, G_B, p, q):
    MB, MA = B.T @ (p[:, None] * B), (A * q) @ A.T
    K = torch.linalg.solve(MB, G_A @ A.T) @ torch.linalg.inv(MA)
    dA = torch.linalg.solve(MB, G_A) / q - 0.5 * K @ A
    dB = G_B @ torch.linalg.inv(MA) / p[:, None] - 0.5 * B @ K
    return dA, dB


def lora_update(A, B, grad_A, grad_B, p, q, scale):
    dA, dB = balanced(A, B, grad_A, grad_B, p, q)
    return dA / scale**2, dB / scale**2


def scaled(A, B, grad_A, grad_B):
    return torch.linalg.solve(B.T @ B, grad_A), torch.linalg.solve(A @ A.T, grad_B.T).T


# ------------------------------------------------------------------------------------------ alternatives


def statistics_einsum(row_sq, col_sq, G, beta2):
    return (row_sq.lerp(torch.einsum("ij,ij->i", G, G), 1 - beta2),
            col_sq.lerp(torch.einsum("ij,ij->j", G, G), 1 - beta2))


def pq_other_split(row_sq, col_sq, step, beta2):
    """Only the product matters: the ‖ℓ̂‖₁ on q's side."""
    ell, c = row_sq / (1 - beta2**step), col_sq / (1 - beta2**step)
    return ell.sqrt(), (c / ell.sum()).sqrt()


def projection_from_factors(A, B, Z, p, q):
    """T* = B M_B⁻¹ (Bᵀ G) Q⁻¹ + P⁻¹ (G Aᵀ) M_A⁻¹ A − B K A with G = P Z Q."""
    G = p[:, None] * Z * q
    MB, MA = B.T @ torch.diag(p) @ B, A @ torch.diag(q) @ A.T
    K = torch.linalg.inv(MB) @ B.T @ G @ A.T @ torch.linalg.inv(MA)
    return B @ torch.linalg.inv(MB) @ (B.T @ G) / q + (G @ A.T @ torch.linalg.inv(MA) @ A) / p[:, None] - B @ K @ A


def balanced_projector_form(A, B, G_A, G_B, p, q):
    """ΔA = M_B⁻¹ G_A Q⁻¹ (I − ½ 𝒫_A), ΔB = (I − ½ 𝒫_B) P⁻¹ G_B M_A⁻¹."""
    P, Q = torch.diag(p), torch.diag(q)
    MB, MA = B.T @ P @ B, A @ Q @ A.T
    PA = Q @ A.T @ torch.linalg.inv(MA) @ A  # (n, n)
    PB = B @ torch.linalg.inv(MB) @ B.T @ P  # (m, m)
    dA = torch.linalg.inv(MB) @ G_A @ torch.linalg.inv(Q) @ (torch.eye(len(q), dtype=q.dtype) - 0.5 * PA)
    dB = (torch.eye(len(p), dtype=p.dtype) - 0.5 * PB) @ torch.linalg.inv(P) @ G_B @ torch.linalg.inv(MA)
    return dA, dB


def lora_update_scaled_gradients(A, B, grad_A, grad_B, p, q, scale):
    """Unscale the gradients (G_A = ∇A / s), then one more s⁻¹ for the W-change's own s."""
    dA, dB = balanced(A, B, grad_A / scale, grad_B / scale, p, q)
    return dA / scale, dB / scale


ALTERNATIVES = [
    ("update_statistics", statistics), ("update_statistics", statistics_einsum),
    ("preconditioner", pq), ("preconditioner", pq_other_split),
    ("tangent_projection", projection), ("tangent_projection", projection_from_factors),
    ("balanced_update", balanced), ("balanced_update", balanced_projector_form),
    ("lora_update", lora_update), ("lora_update", lora_update_scaled_gradients),
    ("scaled_gradients", scaled),
    ("scaled_gradients", lambda A, B, gA, gB: (torch.linalg.inv(B.T @ B) @ gA, gB @ torch.linalg.pinv(A @ A.T))),
]


@pytest.mark.parametrize("name, answer", ALTERNATIVES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ALTERNATIVES)])
def test_correct_answers_pass(name, answer):
    assert_passes(getattr(check, name)(answer), name)


# ------------------------------------------------------------------------------------------ planted mistakes


def _balanced_with(a_coef=0.5, b_coef=0.5, weighted=True, swap_k=False, inverse=True):
    def fn(A, B, G_A, G_B, p, q):
        P = p if weighted else torch.ones_like(p)
        Q = q if weighted else torch.ones_like(q)
        MB, MA = B.T @ (P[:, None] * B), (A * Q) @ A.T
        C = G_A @ A.T
        first, second = (MA, MB) if swap_k else (MB, MA)
        K = torch.linalg.inv(first) @ C @ torch.linalg.inv(second)
        hq, hp = (1 / q, 1 / p) if inverse else (q, p)
        return (torch.linalg.solve(MB, G_A) * hq - a_coef * K @ A,
                G_B @ torch.linalg.inv(MA) * hp[:, None] - b_coef * B @ K)

    return fn


def _projection_frobenius(A, B, Z, p, q):
    return projection(A, B, Z, torch.ones_like(p), torch.ones_like(q))


def _projection_twice(A, B, Z, p, q):
    P, Q = torch.diag(p), torch.diag(q)
    PB = B @ torch.linalg.solve(B.T @ P @ B, B.T @ P)
    PA = Q @ A.T @ torch.linalg.solve(A @ Q @ A.T, A)
    return PB @ Z + Z @ PA


def _projection_only_b(A, B, Z, p, q):
    P = torch.diag(p)
    return B @ torch.linalg.solve(B.T @ P @ B, B.T @ P) @ Z


def _lora_times(power):
    def fn(A, B, grad_A, grad_B, p, q, scale):
        dA, dB = balanced(A, B, grad_A, grad_B, p, q)
        return dA * scale**power, dB * scale**power

    return fn


def _statistics_in_place(row_sq, col_sq, G, beta2):
    row_sq.mul_(beta2).add_((1 - beta2) * (G * G).sum(1))
    return row_sq, beta2 * col_sq + (1 - beta2) * (G * G).sum(0)


def _lora_calls_stub(A, B, grad_A, grad_B, p, q, scale):
    dA, dB = balanced_update(A, B, grad_A, grad_B, p, q)  # exercise 4, still a stub
    return dA / scale**2, dB / scale**2


def balanced_update(A, B, G_A, G_B, p, q):  # the name the notebook's stub has
    raise NotImplementedError()


SUM_SQUARES = "sum the squares G∘G (G * G), not G itself"
NOT_BALANCED = ("B dA + dB A is right, but this is not the balanced member: split the overlap, ½ K A from dA and ½ B K "
                "from dB")
MISTAKES = [
    # update_statistics
    ("update_statistics", stub, NOT_YET),
    ("update_statistics", lambda r, c, G, b: (b * r + (1 - b) * G.sum(1), b * c + (1 - b) * G.sum(0)), SUM_SQUARES),
    ("update_statistics", lambda r, c, G, b: (b * r + (1 - b) * G.abs().sum(1), c),
     "sum the squares G∘G, not the absolute values"),
    ("update_statistics", lambda r, c, G, b: (b * r + (1 - b) * G.sum(1) ** 2, c),
     "square each entry, then sum: (G * G).sum(1), not G.sum(1) ** 2"),
    ("update_statistics", lambda r, c, G, b: ((1 - b) * r + b * (G * G).sum(1), c),
     "the EMA weights are swapped: keep β2 of the old statistics and add (1 − β2) of the new sums"),
    ("update_statistics", lambda r, c, G, b: (b * r + (1 - b) * (G * G).mean(1), c),
     "use sums over each row, not means (the normalisation comes in the next exercise)"),
    ("update_statistics", lambda r, c, G, b: ((G * G).sum(1), (G * G).sum(0)),
     "the old statistics are lost: it is an average over steps, β2·row_sq + (1 − β2)·(new sums)"),
    ("update_statistics", lambda r, c, G, b: (b * c + (1 - b) * (G * G).sum(0), b * r + (1 - b) * (G * G).sum(1)),
     "rows and columns are swapped: row_sq has one entry per row of G (7,), summed over the columns (dim=1); col_sq "
     "one per column (5,), summed over the rows (dim=0)"),
    ("update_statistics", lambda r, c, G, b: (statistics(r, c, G, b)[0], b * c + (1 - b) * (G * G).mean(0)),
     "use sums over each column, not means"),
    ("update_statistics", _statistics_in_place,
     "you modified row_sq in place: return new tensors (row_sq = beta2 * row_sq + ...); the caller's tensors must "
     "stay as they were"),
    ("update_statistics", lambda r, c, G, b: statistics(r, c, G, b)[0], "return a pair (row_sq, col_sq), got Tensor"),
    ("update_statistics", lambda r, c, G, b: (statistics(r, c, G, b)[0] * 1.01, c), "row_sq (beta2 0.999)[…"),
    # preconditioner
    ("preconditioner", stub, NOT_YET),
    ("preconditioner", lambda r, c, t, b: ((r / r.sum()).sqrt(), c.sqrt()),
     "divide ℓ and c by 1 − β2^step first (bias correction): both start at zero"),
    ("preconditioner", lambda r, c, t, b: pq(r, c, t - 1, b),
     "bias correction: use 1 − β2^step with step = 3, not step − 1"),
    ("preconditioner", lambda r, c, t, b: tuple(x**2 for x in pq(r, c, t, b)),
     "p qᵀ must be √V̂: take the square roots of the normalised statistics"),
    ("preconditioner", lambda r, c, t, b: ((r / (1 - b**t)).sqrt(), (c / (1 - b**t)).sqrt()),
     "normalise by ‖ℓ̂‖₁, the sum of ℓ̂: V̂ = ℓ̂ ĉᵀ / ‖ℓ̂‖₁"),
    ("preconditioner", lambda r, c, t, b: ((r / r.mean()).sqrt(), (c / (1 - b**t)).sqrt()),
     "normalise by the sum ‖ℓ̂‖₁, not by the mean"),
    ("preconditioner", lambda r, c, t, b: ((r / r.sum()).sqrt(), (c / c.sum()).sqrt()),
     "normalise once: V̂ = ℓ̂ ĉᵀ / ‖ℓ̂‖₁, not ℓ̂/‖ℓ̂‖₁ times ĉ/‖ĉ‖₁"),
    ("preconditioner", lambda r, c, t, b: pq(r, c, t, b)[::-1],
     "p has shape (5,), expected (7,): p has one entry per row of W (m = 7), q one per column (n = 5)"),
    ("preconditioner", lambda r, c, t, b: (pq(r, c, t, b)[0] * 1.1, pq(r, c, t, b)[1]),
     "the product p qᵀ (step 3, beta2 0.9)[…"),
    # tangent_projection
    ("tangent_projection", stub, NOT_YET),
    ("tangent_projection", _projection_frobenius,
     "these are the Frobenius projectors; weight them by the metric: Π_B = B (Bᵀ P B)⁻¹ Bᵀ P and Π_A = Q Aᵀ "
     "(A Q Aᵀ)⁻¹ A, with P = Diag(p), Q = Diag(q)"),
    ("tangent_projection", _projection_twice, "Π_B Z + Π_A Z counts the overlap Π_B Π_A Z twice: subtract it once"),
    ("tangent_projection", _projection_only_b, "only Π_B Z: add the part B cannot reach, Π_A Z − Π_B Π_A Z"),
    ("tangent_projection", lambda A, B, Z, p, q: Z, "T* (the projection of Z)[…"),
    ("tangent_projection", lambda A, B, Z, p, q: Z.mul_(0.5),
     "you modified Z in place: return new tensors (T = ...); the caller's tensors must stay as they were"),
    # balanced_update
    ("balanced_update", stub, NOT_YET),
    ("balanced_update", _balanced_with(0.0, 0.0),
     "the overlap B K A is counted twice: subtract ½ K A from dA and ½ B K from dB"),
    ("balanced_update", _balanced_with(1.0, 1.0),
     "the two corrections must add up to one K: ½ K A and ½ B K, not 1 each"),
    ("balanced_update", _balanced_with(0.0, 1.0), NOT_BALANCED),
    ("balanced_update", _balanced_with(1.0, 0.0), NOT_BALANCED),
    ("balanced_update", _balanced_with(weighted=False),
     "weight the Gram matrices: M_B = Bᵀ P B and M_A = A Q Aᵀ (P = Diag(p), Q = Diag(q))"),
    ("balanced_update", _balanced_with(swap_k=True),
     "K = M_B⁻¹ C M_A⁻¹ (M_B⁻¹ on the left, on B's side), not M_A⁻¹ C M_B⁻¹"),
    ("balanced_update", _balanced_with(inverse=False),
     "apply H⁻¹: divide G_A's columns by q and G_B's rows by p (not multiply)"),
    ("balanced_update", lambda *args: balanced(*args)[::-1],
     "the pair is in the wrong order: return (dA, dB), dA shaped like A (r, n) and dB like B (m, r)"),
    ("balanced_update", lambda *args: (balanced(*args)[0] * 1.01, balanced(*args)[1]),
     "B dA + dB A (the W-direction T*)[…"),
    # lora_update
    ("lora_update", stub, NOT_YET),
    ("lora_update", _lora_times(0),
     "the W-change s·(B dA + dB A) is s²·T* (s = 2.5): multiply the update by s⁻²"),
    ("lora_update", _lora_times(-1),
     "the W-change s·(B dA + dB A) is s·T* (s = 2.5): one factor s⁻¹ is missing (the gradients carry one s and the "
     "W-change another: multiply by s⁻²)"),
    ("lora_update", _lora_times(-3),
     "the W-change s·(B dA + dB A) is T*/s (s = 2.5): multiply by s⁻² once, not s⁻³ (did you also divide the "
     "gradients by s?)"),
    ("lora_update", _lora_times(2), "the W-change s·(B dA + dB A) is s⁴·T* (s = 2.5): multiply by s⁻², not by s²"),
    ("lora_update", _lora_calls_stub,
     "not implemented yet: balanced_update (an earlier exercise, which this one calls: finish it first)"),
    # scaled_gradients
    ("scaled_gradients", stub, NOT_YET),
    ("scaled_gradients", lambda A, B, gA, gB: (torch.linalg.solve(A @ A.T, gA), scaled(A, B, gA, gB)[1]),
     "A's gradient is preconditioned by B's Gram matrix (BᵀB)⁻¹ (A's step moves W through B), not (AAᵀ)⁻¹"),
    ("scaled_gradients", lambda A, B, gA, gB: (B.T @ B @ gA, scaled(A, B, gA, gB)[1]),
     "multiply by the inverse (BᵀB)⁻¹ (torch.linalg.solve(B.T @ B, grad_A)), not by BᵀB"),
    ("scaled_gradients", lambda A, B, gA, gB: (scaled(A, B, gA, gB)[0], gB @ torch.linalg.inv(B.T @ B)),
     "B's gradient is preconditioned by A's Gram matrix (AAᵀ)⁻¹, not (BᵀB)⁻¹"),
    ("scaled_gradients", lambda A, B, gA, gB: (scaled(A, B, gA, gB)[0], gB @ (A @ A.T)),
     "multiply by the inverse (AAᵀ)⁻¹, not by AAᵀ"),
    ("scaled_gradients", lambda A, B, gA, gB: (gA, gB), "B gA (should be P_B G)[…"),
]


@pytest.mark.parametrize("name, answer, message", MISTAKES,
                         ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(MISTAKES)])
def test_each_mistake_gets_its_line(name, answer, message):
    assert_mistake_line(getattr(check, name)(answer), name, message)


def test_a_crash_names_the_learners_line():
    def crashes(A, B, G_A, G_B, p, q):
        return torch.linalg.solve(B.T @ B, G_A) / p, G_B  # p is (m,), G_A's columns are n: a shape error

    line = str(check.balanced_update(crashes))
    assert line.startswith("✗ balanced_update: your code raised RuntimeError") and "(line " in line, line


def test_checks_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    for name, answer in ALTERNATIVES[::2]:
        getattr(check, name)(answer)
    assert torch.equal(torch.random.get_rng_state(), state)
