"""Checks for notebook 07 (soap): the Kronecker factors, the eigenbasis, the rotations, Adam in the rotated basis, the
refresh, the optimizer class, and the library's parity with pytorch_optimizer.

Every reference is computed here by hand in float64 (never with gpt2lab.optim.soap). The inputs are chosen so that
the classic mistakes show: non-square and non-symmetric gradients (a transposed factor or a missing rotation back
changes the numbers or the shape), random orthogonal bases far from the identity, a large ε and weight decay (so
their placement matters), a basis whose eigenvalue estimates are out of order (so the refresh must sort), and, for
the class, steps past two refreshes, a dimension over max_precond_dim, a 1-D parameter and two param groups.
"""

from __future__ import annotations

import torch

from .core import (
    _close,
    _last_user_frame,
    check,
    compare,
    compare_with_hints,
    earlier_stubs,
    expect,
    known_mistake,
    new_tensors,
    returned_pair,
)

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=DT)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(_randn(n, n, seed=seed)).Q


def _spd(n: int, seed: int, spread: float = 10.0) -> torch.Tensor:
    """A symmetric positive definite matrix with well-separated eigenvalues from spread**0 .. spread**1."""
    q = _orthogonal(n, seed)
    return q @ torch.diag(spread ** torch.linspace(1, 0, n, dtype=DT)) @ q.T


# --- exercise 1: the Kronecker factors --------------------------------------------------------------------------------


@check("update_factors")
def update_factors(fn):
    """fn(L, R, G, beta) -> (L_new, R_new): exponential moving averages of G Gᵀ and Gᵀ G."""
    cases = [(5, 3, 0.9), (4, 4, 0.7)]  # non-square (a transposed product has the wrong shape), then square
    for seed, (m, n, beta) in enumerate(cases):
        G = _randn(m, n, seed=10 + seed) + 0.5 * torch.arange(n, dtype=DT)  # non-symmetric even when square
        L, R = _spd(m, 20 + seed), _spd(n, 30 + seed)
        with new_tensors("L = beta * L + ...", L=L, R=R, G=G):
            try:
                result = fn(L, R, G, beta)
            except RuntimeError as err:  # shapes that do not fit: almost always a transposed product
                expect("size of tensor" not in str(err), f"your code raised RuntimeError: {err}"
                       f"{_last_user_frame(err)}; with a {m}×{n} G, L is {m}×{m} (G @ G.T) and R is {n}×{n} (G.T @ G)")
                raise
            got_L, got_R = returned_pair(result, "L, R")
        ggt, gtg = G @ G.T, G.T @ G
        L_new, R_new = beta * L + (1 - beta) * ggt, beta * R + (1 - beta) * gtg
        label = f"{m}×{n} gradient, beta {beta}"
        expect(not (_close(got_L, R_new, 1e-9) and _close(got_R, L_new, 1e-9)),
               "the pair is in the wrong order: return (L, R)")
        for name, got, size, other in (("L", got_L, m, n), ("R", got_R, n, m)):
            shape = tuple(torch.as_tensor(got).shape) if isinstance(got, torch.Tensor) else None
            expect(m == n or shape != (other, other),
                   f"{name} has shape {shape}, expected {(size, size)}: L = avg of G @ G.T (m×m, over rows), "
                   "R = avg of G.T @ G (n×n, over columns)")
        compare_with_hints(f"L ({label})", got_L, L_new, 1e-9, [
            ("L averages G Gᵀ (G @ G.T, m×m) and R averages Gᵀ G: yours are swapped",
             beta * L + (1 - beta) * gtg if m == n else None),
            ("G Gᵀ is a matrix product (G @ G.T), not the elementwise square G * G",
             beta * L + (1 - beta) * G * G if m == n else None),
            ("the weights are swapped: keep β of the OLD L and add (1 − β)·G Gᵀ", (1 - beta) * L + beta * ggt),
            ("that is Shampoo's running sum L + G Gᵀ; SOAP keeps an exponential moving average β·L + (1 − β)·G Gᵀ",
             L + ggt),
            ("(1 − β) multiplies G Gᵀ once, not each factor of it", beta * L + (1 - beta) ** 2 * ggt)])
        compare_with_hints(f"R ({label})", got_R, R_new, 1e-9, [
            ("R averages Gᵀ G (G.T @ G, n×n): yours is G Gᵀ", beta * R + (1 - beta) * ggt if m == n else None),
            ("the weights are swapped: keep β of the OLD R and add (1 − β)·Gᵀ G", (1 - beta) * R + beta * gtg),
            ("that is Shampoo's running sum R + Gᵀ G; SOAP keeps an exponential moving average", R + gtg)])
    return "L and R match for a 5×3 and a non-symmetric 4×4 gradient"


# --- exercise 2: the eigenbasis --------------------------------------------------------------------------------------


@check("eigenbasis")
def eigenbasis(fn):
    """fn(S) -> Q: eigenvectors of the symmetric S as columns, largest eigenvalue first."""
    for seed, (n, spread) in enumerate([(5, 10.0), (4, 1e3)]):
        S = _spd(n, 40 + seed, spread)
        with new_tensors("Q = ...", S=S):
            got = fn(S)
        expect(not isinstance(got, tuple | list), "return the eigenvectors only (a matrix): torch.linalg.eigh "
                                                  "returns (eigenvalues, eigenvectors)")
        expect(isinstance(got, torch.Tensor), f"return a tensor, got {type(got).__name__}")
        expect(got.dim() == 2, f"Q has shape {tuple(got.shape)}: return the eigenvectors (an {n}×{n} matrix), not "
                               "the eigenvalues")
        compare(f"the shape of Q ({n}×{n} statistic)", torch.tensor(got.shape), torch.tensor([n, n]))
        Q = got.to(DT)
        values, vectors = torch.linalg.eigh(S)  # ascending
        right = vectors.flip(1)
        rows = "eigenvectors are the COLUMNS of eigh's result; you returned them as rows"
        known_mistake(Q.abs(), right.abs(), 1e-6, [(rows, right.T.abs()), (rows, vectors.T.abs())])  # up to signs
        compare(f"Qᵀ Q ({n}×{n} statistic; Q must be orthogonal)", Q.T @ Q, torch.eye(n, dtype=DT), atol=1e-6)
        D = Q.T @ S @ Q
        off = D - torch.diag(torch.diagonal(D))
        if off.abs().max() > 1e-6 * spread:
            known_mistake(Q.abs(), right.abs(), 1e-6, [
                ("flip the COLUMNS (Q.flip(1) or Q.flip(-1)), not the rows: each column is one eigenvector",
                 vectors.flip(0).abs())])
            i, j = divmod(int(off.abs().argmax()), n)
            expect(False, f"Qᵀ S Q is not diagonal ({n}×{n} statistic): entry [{i}, {j}] is {off[i, j].item():.3g}; "
                          "the columns of Q must be eigenvectors of S")
        diag = torch.diagonal(D)
        expect(not torch.allclose(diag, values, atol=1e-6 * spread, rtol=0),
               "the eigenvalues come out of torch.linalg.eigh ascending: flip the columns (Q.flip(1)) so the "
               "largest comes first")
        compare(f"the eigenvalues along Qᵀ S Q's diagonal ({n}×{n} statistic), largest first", diag, values.flip(0),
                atol=1e-6 * spread)
    return "orthogonal, diagonalises S, eigenvalues in descending order (two statistics)"


# --- exercise 3: rotations -------------------------------------------------------------------------------------------


def _rotation_cases():
    G = _randn(5, 3, seed=50) + 0.3
    QL, QR = _orthogonal(5, 51), _orthogonal(3, 52)
    return G, QL, QR


@check("rotations")
def rotations(rotate, rotate_back):
    """rotate(G, QL, QR) -> QLᵀ G QR; rotate_back(X, QL, QR) -> QL X QRᵀ; a None basis leaves its side alone."""
    G, QL, QR = _rotation_cases()
    with new_tensors("G_rot = QL.T @ G @ QR", G=G, QL=QL, QR=QR):
        got = rotate(G, QL, QR)
    compare_with_hints("rotate(G, QL, QR)", got, QL.T @ G @ QR, 1e-9, [
        ("rotate goes INTO the eigenbasis: Q_Lᵀ G Q_R (you computed Q_L G Q_Rᵀ, the way back)", QL @ G @ QR.T),
        ("the right side is G Q_R (its columns are R's eigenvectors), not G Q_Rᵀ", QL.T @ G @ QR.T),
        ("the left side is Q_Lᵀ G (transpose Q_L), not Q_L G", QL @ G @ QR),
        ("rotate both sides: Q_Lᵀ G Q_R (yours rotates the left side only)", QL.T @ G),
        ("rotate both sides: Q_Lᵀ G Q_R (yours rotates the right side only)", G @ QR)])
    X = _randn(5, 3, seed=53)
    with new_tensors("X_back = QL @ X @ QR.T", X=X, QL=QL, QR=QR):
        back = rotate_back(X, QL, QR)
    compare_with_hints("rotate_back(X, QL, QR)", back, QL @ X @ QR.T, 1e-9, [
        ("rotate_back must undo rotate: Q_L X Q_Rᵀ (yours rotates forward again, Q_Lᵀ X Q_R)", QL.T @ X @ QR),
        ("rotate_back's right side is X Q_Rᵀ", QL @ X @ QR),
        ("rotate_back's left side is Q_L X", QL.T @ X @ QR.T)])
    compare("rotate_back(rotate(G)) (a round trip must give G back)", rotate_back(rotate(G, QL, QR), QL, QR), G, 1e-9)
    for what, (ql, qr), expected in (("QL = None", (None, QR), G @ QR), ("QR = None", (QL, None), QL.T @ G),
                                     ("both None (a 1-D parameter)", (None, None), G)):
        try:
            got = rotate(G, ql, qr)
        except Exception as err:
            expect(False, f"rotate with {what} raised {type(err).__name__}: {err}; a None basis means that side is "
                          "not rotated (skip it)")
        compare(f"rotate with {what} (that side is not rotated)", got, expected, 1e-9)
        try:
            back = rotate_back(expected, ql, qr)
        except Exception as err:
            expect(False, f"rotate_back with {what} raised {type(err).__name__}: {err}; a None basis means that side "
                          "is not rotated (skip it)")
        compare(f"rotate_back with {what}", back, G, 1e-9)
    return "rotate and rotate_back match Q_Lᵀ G Q_R and Q_L X Q_Rᵀ, invert each other, and skip None sides"


# --- exercise 4: Adam in the rotated basis ---------------------------------------------------------------------------


def _rot(x, ql, qr):
    x = x if ql is None else ql.T @ x
    return x if qr is None else x @ qr


def _rot_back(x, ql, qr):
    x = x if ql is None else ql @ x
    return x if qr is None else x @ qr.T


def _soap_update(p, G, M, V, QL, QR, t, lr, beta1, beta2, eps, weight_decay, bug=None):
    """The SOAP step by hand (bug=None) and its classic wrong versions."""
    rotated = bug != "unrotated"
    g = _rot(G, QL, QR) if rotated else G
    M = beta1 * M + (1 - beta1) * (G if bug == "m_unrotated" else g)
    sq = _rot(G * G, QL, QR) if bug == "v_square_first" else g * g
    V = beta2 * V + (1 - beta2) * sq
    if bug == "torch_eps":
        step = lr * (M / (1 - beta1**t)) / ((V / (1 - beta2**t)).sqrt() + eps)
    else:
        size = lr if bug == "no_bias_correction" else lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
        step = size * M / (V.sqrt() + eps)
    if rotated and bug != "no_back":
        step = _rot_back(step, QL, QR)
    if bug == "decay_first":
        p = p * (1 - lr * weight_decay)
    p = p + step if bug == "uphill" else p - step
    if bug != "decay_first":
        p = p * (1 - lr * weight_decay)
    return p, M, V


UPDATE_HINTS = {
    "unrotated": "looks like plain Adam on G: rotate the gradient into the eigenbasis first, G' = Q_Lᵀ G Q_R",
    "no_back": "the step M ⊘ (√V + ε) lives in the eigenbasis: rotate it back (rotate_back) before subtracting it "
               "from p",
    "v_square_first": "V averages the square of the ROTATED gradient, G'∘G' (rotate, then square)",
    "m_unrotated": "M averages the rotated gradient G' (it is kept in the eigenbasis), not G",
    "torch_eps": "ε goes after the square root of the uncorrected V, √V + ε, with both bias corrections in the step "
                 "size lr·√(1 − β2^t)/(1 − β1^t) (torch's AdamW places ε after correcting v: a different number)",
    "decay_first": "SOAP decays after the update: p ← (p − step)·(1 − lr·λ) (torch's AdamW decays first)",
    "no_bias_correction": "the bias correction is missing: the step size is lr·√(1 − β2^t)/(1 − β1^t)",
    "uphill": "p moved uphill: subtract the step",
}


@check("soap_update")
def soap_update(fn):
    """fn(p, G, M, V, QL, QR, t, lr, beta1, beta2, eps, weight_decay) -> (p, M, V), M and V in the eigenbasis."""
    with earlier_stubs(fn):
        return _soap_update_check(fn)


def _soap_update_check(fn):
    hyper = dict(lr=3e-2, beta1=0.8, beta2=0.9, eps=1e-3, weight_decay=0.5)  # large ε and λ: placement shows
    for label, seed, t, with_right in (("both sides rotated, t=3", 60, 3, True), ("Q_R = None, t=1", 70, 1, False)):
        p, G = _randn(5, 3, seed=seed), _randn(5, 3, seed=seed + 1) * torch.tensor([3.0, 0.3, 1.0], dtype=DT)
        M, V = 0.1 * _randn(5, 3, seed=seed + 2), 0.05 * torch.rand(5, 3, generator=_gen(seed + 3), dtype=DT)
        QL, QR = _orthogonal(5, seed + 4), _orthogonal(3, seed + 5) if with_right else None
        with new_tensors("p = p - ..., not p -= ...", p=p, G=G, M=M, V=V):
            got = fn(p, G, M, V, QL, QR, t, **hyper)
        expect(isinstance(got, tuple | list) and len(got) == 3, "return the triple (p, M, V)")
        expected = _soap_update(p, G, M, V, QL, QR, t, **hyper)
        known_mistake(got[0], expected[0], 1e-9, [
            (f"{message} ({label})",
             lambda bug=bug, now=(p, G, M, V, QL, QR, t): _soap_update(*now, **hyper, bug=bug)[0])
            for bug, message in UPDATE_HINTS.items()])
        expect(bool(torch.isfinite(torch.as_tensor(got[0])).all()),
               f"p is NaN or inf ({label}): a square root of a negative number, or a division by 1 − β^0 = 0 (t counts "
               "from 1)")
        known_mistake(got[1], expected[1], 1e-9, [
            (f"{UPDATE_HINTS['m_unrotated']} ({label})", _soap_update(p, G, M, V, QL, QR, t, **hyper,
                                                                       bug="m_unrotated")[1])])
        for name, a, b in zip(("p", "M", "V"), got, expected):
            compare(f"{name} ({label})", a, b, atol=1e-9)
    return "p, M and V match a hand computation (both sides rotated, and one side not)"


# --- exercise 5: the refresh -----------------------------------------------------------------------------------------


def _refresh(S, Q, V, dim, bug=None):
    """The refresh by hand (bug=None) and its classic wrong versions."""
    est = torch.diagonal(Q @ S @ Q.T) if bug == "rows" else torch.diagonal(Q.T @ S @ Q)
    order = torch.argsort(est, descending=bug != "ascending")
    if bug == "eigh":
        return torch.linalg.eigh(S).eigenvectors.flip(1), V.index_select(dim, order)
    if bug == "no_power":
        new = Q[:, order]
    elif bug == "q_times_s":
        new = torch.linalg.qr(Q[:, order] @ S).Q
    else:
        new = torch.linalg.qr(S @ Q[:, order]).Q
    if bug == "v_kept":
        return new, V
    return new, V.index_select(1 - dim if bug == "v_other_dim" else dim, order)


REFRESH_HINTS = {
    "v_kept": "V must follow its directions: re-order it along dim by the same permutation as Q's columns",
    "v_other_dim": "V is re-ordered along dim (this factor's side of the parameter), not the other one",
    "ascending": "sort the estimated eigenvalues in DESCENDING order (largest first), like the eigenbasis",
    "rows": "the estimated eigenvalue of column i is qᵢᵀ S qᵢ: the diagonal of Qᵀ S Q (not Q S Qᵀ)",
    "no_power": "after re-ordering, take one power-iteration step: the QR of S @ Q[:, order]",
    "eigh": "the refresh is one power iteration from the old basis (QR of S Q), not a new eigendecomposition: "
            "cheaper, and the columns stay matched with V's entries",
    "q_times_s": "multiply S @ Q (S acts on the columns of Q), not Q @ S",
}


def _signs_like(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """got with each column's sign flipped to agree with ref's (a QR is only defined up to column signs)."""
    signs = torch.sign((got * ref).sum(0))
    return got * torch.where(signs == 0, torch.ones_like(signs), signs)


@check("refresh")
def refresh(fn):
    """fn(S, Q, V, dim) -> (Q_new, V_new): re-order by estimated eigenvalues, one power iteration + QR."""
    for label, dim, seed in (("left factor, dim 0", 0, 80), ("right factor, dim 1", 1, 90)):
        S = _spd(5, seed, spread=20.0)
        true = torch.linalg.eigh(S).eigenvectors.flip(1)
        # an old basis near the eigenbasis, columns shuffled: its eigenvalue estimates are out of order
        Q = torch.linalg.qr(true + 0.15 * _randn(5, 5, seed=seed + 1)).Q[:, torch.tensor([3, 0, 4, 1, 2])]
        V = torch.rand(5, 5, generator=_gen(seed + 2), dtype=DT) + torch.arange(5, dtype=DT)[:, None]  # not symmetric
        with new_tensors("Q_new = ..., V_new = V.index_select(...)", S=S, Q=Q, V=V):
            got_Q, got_V = returned_pair(fn(S, Q, V, dim), "Q_new, V_new")
        exp_Q, exp_V = _refresh(S, Q, V, dim)
        compare(f"the shape of Q_new ({label})", torch.tensor(torch.as_tensor(got_Q).shape), torch.tensor([5, 5]))
        got_Q = torch.as_tensor(got_Q).to(DT)
        wrong = {bug: _refresh(S, Q, V, dim, bug) for bug in REFRESH_HINTS}
        for bug, (q, _) in wrong.items():
            if bug in ("v_kept", "v_other_dim"):
                continue
            known_mistake(_signs_like(got_Q, q), exp_Q, 1e-8, [(f"{REFRESH_HINTS[bug]} ({label})", q)])
        expect(_close(got_Q.T @ got_Q, torch.eye(5, dtype=DT), 1e-6),
               f"Q_new is not orthogonal ({label}): finish with torch.linalg.qr(...).Q")
        compare(f"Q_new ({label}; up to column signs)", _signs_like(got_Q, exp_Q), exp_Q, atol=1e-8)
        compare_with_hints(f"V_new ({label})", got_V, exp_V, 1e-12, [
            (f"{REFRESH_HINTS[bug]} ({label})", wrong[bug][1]) for bug in ("v_kept", "v_other_dim", "ascending",
                                                                           "rows")])
    return "Q_new and V_new match a hand computation for a left and a right factor"


# --- exercise 6: the optimizer class ---------------------------------------------------------------------------------


def _problem():
    """Three parameters: 4×4 (both sides; square, so the first gradient already makes both factors full rank and
    the eigenbases unique up to signs), 3×6 with max_precond_dim 5 (its 6 side over the limit), a 3-vector."""
    shapes = [(4, 4), (3, 6), (3,)]
    start = [_randn(*s, seed=100 + i) for i, s in enumerate(shapes)]
    scale = [torch.tensor([2.0, 0.5, 1.0, 1.5], dtype=DT), torch.linspace(0.5, 2.0, 6, dtype=DT),
             torch.tensor([1.0, 0.1, 3.0], dtype=DT)]
    grads = [[_randn(*s, seed=200 + 10 * k + i) * scale[i] + 0.2 for i, s in enumerate(shapes)] for k in range(9)]
    return start, grads


HYPER = dict(lr=2e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3, precondition_frequency=3, max_precond_dim=5)
GROUP_LRS = (2e-2, 5e-3)  # group 0: the 4×4 and the vector; group 1: the 3×6, its own lr and no decay


def _groups(params):
    return [{"params": [params[0], params[2]]}, {"params": [params[1]], "lr": GROUP_LRS[1], "weight_decay": 0.0}]


def _simulate(start, grads, bug=None):
    """Parameters after each step() call of SOAP by hand (float64 eigh), or of one of its wrong versions."""
    f, limit = HYPER["precondition_frequency"], HYPER["max_precond_dim"]
    beta1, beta2 = HYPER["betas"]
    group = [(HYPER["lr"], HYPER["weight_decay"]), (GROUP_LRS[1], 0.0), (HYPER["lr"], HYPER["weight_decay"])]
    if bug == "defaults_lr":
        group = [(HYPER["lr"], HYPER["weight_decay"])] * 2 + [(HYPER["lr"], HYPER["weight_decay"])]
    params, states, out = [p.clone() for p in start], [None] * len(start), []
    for gs in grads:
        for i, G in enumerate(gs):
            lr, wd = group[i]
            st = states[i]
            if st is None or bug == "fresh":
                st = states[i] = {"t": 0, "M": torch.zeros_like(G), "V": torch.zeros_like(G)}
                for side, size in (("L", G.shape[0] if G.dim() == 2 else 0), ("R", G.shape[-1] if G.dim() == 2 else 0)):
                    use = G.dim() == 2 and (size <= limit or bug == "no_limit")
                    st[side] = torch.zeros(size, size, dtype=DT) if use else None
                _factors(st, G, beta2)
                st["QL"], st["QR"] = (None if st[s] is None else torch.linalg.eigh(st[s]).eigenvectors.flip(1)
                                      for s in ("L", "R"))
                if bug != "moves_first":
                    continue
            st["t"] += 1
            t = st["t"]
            params[i], st["M"], st["V"] = _soap_update(params[i], G, st["M"], st["V"], st["QL"], st["QR"], t, lr,
                                                       beta1, beta2, HYPER["eps"], wd)
            _factors(st, G, beta2)
            if bug != "no_refresh" and (t + (1 if bug == "refresh_late" else 0)) % f == 0:
                m_orig = _rot_back(st["M"], st["QL"], st["QR"])
                for k, side, q in ((0, "L", "QL"), (1, "R", "QR")):
                    if st[side] is not None:
                        st[q], v = _refresh(st[side], st[q], st["V"], k)
                        st["V"] = st["V"] if bug == "v_dropped" else v
                st["M"] = st["M"] if bug == "m_stale" else _rot(m_orig, st["QL"], st["QR"])
        out.append([p.clone() for p in params])
    return out


def _factors(st, G, beta):
    if st["L"] is not None:
        st["L"] = beta * st["L"] + (1 - beta) * G @ G.T
    if st["R"] is not None:
        st["R"] = beta * st["R"] + (1 - beta) * G.T @ G


CLASS_HINTS = {
    "moves_first": "the first step() must only build L, R and the bases (and leave the parameter where it is): "
                   "the basis must never contain the gradient it rotates",
    "fresh": "the state restarts at every step: keep it in self.state[p] between calls",
    "no_refresh": "the bases never change: after the parameter step, when state['t'] % precondition_frequency == 0, "
                  "refresh them",
    "refresh_late": "the refresh comes one step late: t counts the steps that moved p (the first call is not one), "
                    "and the refresh follows step t when t % precondition_frequency == 0",
    "m_stale": "at a refresh M must move to the new basis: rotate_back with the old bases, then rotate with the new "
               "ones (V is only re-ordered)",
    "v_dropped": "keep the re-ordered V that refresh returns (state['V'] = ...)",
    "no_limit": "a dim larger than max_precond_dim gets no factor and no rotation (None): the 3×6 weight's 6 side "
                "is over the limit of 5",
    "defaults_lr": "the learning rate (or weight decay) comes from self.defaults instead of the param group: each "
                   "group sets its own",
}


@check("soap_optimizer")
def soap_optimizer(cls):
    """cls(params, lr, betas, eps, weight_decay, precondition_frequency, max_precond_dim): 2-D and 1-D params."""
    with earlier_stubs(cls):
        return _soap_optimizer(cls)


def _soap_optimizer(cls):
    start, grads = _problem()
    params = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer = cls(_groups(params), **HYPER)
    expect(isinstance(optimizer, torch.optim.Optimizer), "your class should subclass torch.optim.Optimizer")
    expected = _simulate(start, grads)
    variants: dict = {}  # the wrong versions, simulated only when an answer differs (the check stays fast)

    def variant(bug, call, i):
        if bug not in variants:
            variants[bug] = _simulate(start, grads, bug)
        return variants[bug][call - 1][i]

    names = ["the 4×4 weight", "the 3×6 weight (group 1)", "the 3-vector"]
    for call, gs in enumerate(grads, start=1):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        try:
            optimizer.step()
        except ZeroDivisionError as err:
            expect(False, f"your code raised ZeroDivisionError: {err}{_last_user_frame(err)} at call {call}: count the "
                          "step (state['t'] += 1) before soap_update, so that t = 1 at the first step that moves p")
        if call == 1:
            for p, s, name in zip(params, start, names):
                expect(torch.equal(p.detach(), s), f"{name} moved at the first step(): {CLASS_HINTS['moves_first']}")
        for i, (p, name) in enumerate(zip(params, names)):
            got = p.detach()
            expect(bool(torch.isfinite(got).all()), f"{name} is NaN or inf after call {call}: t must be 1 at the "
                                                    "first step that moves p (it counts from 0 at the first call)")
            if call > 1:
                expect(not torch.equal(got, start[i]),
                       f"{name} never moved: {CLASS_HINTS['fresh']} (every call looked like a first call)")
            known_mistake(got, expected[call - 1][i], 1e-8,
                          [(f"{name}, call {call}: {message}", lambda bug=bug, call=call, i=i: variant(bug, call, i))
                           for bug, message in CLASS_HINTS.items()])
            compare(f"{name} after call {call}", got, expected[call - 1][i], atol=1e-8)
    return (f"{len(grads)} calls (first call builds, 2 refreshes, a side over max_precond_dim, a 1-D parameter, two "
            "param groups) match a hand computation")



# --- library parity --------------------------------------------------------------------------------------------------


@check("library_parity")
def library_parity(ours, theirs, atol: float = 1e-5):
    """Weights trained with gpt2lab.optim.SOAP vs the same run with pytorch_optimizer.SOAP (float32)."""
    compare("weights trained with gpt2lab.optim.SOAP vs pytorch_optimizer.SOAP", ours, theirs, atol=atol)
    return f"all {torch.as_tensor(theirs).numel()} weights agree with pytorch_optimizer.SOAP within {atol:g}"
