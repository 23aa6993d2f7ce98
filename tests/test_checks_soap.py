"""Notebook 07's checks against the mistakes learners make: each planted mistake gets its own ✗ line (asserted word
for word), each stub reads "not implemented yet", correct alternative formulations pass, and inputs written in place
are caught."""

import pytest
import torch
from check_helpers import NOT_YET, assert_mistake_line, assert_passes, stub

from gpt2lab.checks import soap as check


def factors(L, R, G, beta, bug=None):
    if bug == "transposed":
        return beta * L + (1 - beta) * G.T @ G, beta * R + (1 - beta) * G @ G.T
    if bug == "swapped_weights":
        return (1 - beta) * L + beta * G @ G.T, (1 - beta) * R + beta * G.T @ G
    if bug == "sum":
        return L + G @ G.T, R + G.T @ G
    if bug == "elementwise":
        return beta * L + (1 - beta) * G * G, beta * R + (1 - beta) * G.T @ G
    if bug == "squared_weight":
        return beta * L + (1 - beta) ** 2 * G @ G.T, beta * R + (1 - beta) * G.T @ G
    if bug == "r_wrong":
        return beta * L + (1 - beta) * G @ G.T, beta * R + (1 - beta) * G @ G.T
    if bug == "in_place":
        return L.mul_(beta).add_(G @ G.T, alpha=1 - beta), beta * R + (1 - beta) * G.T @ G
    if bug == "order":
        return beta * R + (1 - beta) * G.T @ G, beta * L + (1 - beta) * G @ G.T
    return beta * L + (1 - beta) * G @ G.T, beta * R + (1 - beta) * G.T @ G


def basis(S, bug=None):
    values, vectors = torch.linalg.eigh(S)
    if bug == "ascending":
        return vectors
    if bug == "rows":
        return vectors.flip(1).T
    if bug == "flip_rows":
        return vectors.flip(0)
    if bug == "values":
        return values.flip(0)
    if bug == "tuple":
        return torch.linalg.eigh(S)
    if bug == "random":
        return torch.linalg.qr(S + torch.ones_like(S)).Q
    return vectors.flip(1)


def rot(G, QL, QR, bug=None):
    if bug == "backwards":
        return QL @ G @ QR.T if QL is not None and QR is not None else G
    if bug == "right_transposed":
        return QL.T @ G @ QR.T
    if bug == "left_only":
        return QL.T @ G
    if bug == "no_none":
        return QL.T @ G @ QR
    G = G if QL is None else QL.T @ G
    return G if QR is None else G @ QR


def rot_back(X, QL, QR, bug=None):
    if bug == "forward":
        return rot(X, QL, QR)
    X = X if QL is None else QL @ X
    return X if QR is None else X @ QR.T


def update(p, G, M, V, QL, QR, t, lr, beta1, beta2, eps, weight_decay, bug=None):
    given = p
    g = G if bug == "unrotated" else rot(G, QL, QR)
    M = beta1 * M + (1 - beta1) * (G if bug == "m_unrotated" else g)
    V = beta2 * V + (1 - beta2) * (rot(G * G, QL, QR) if bug == "v_square_first" else g * g)
    if bug == "torch_eps":
        step = lr * (M / (1 - beta1**t)) / ((V / (1 - beta2**t)).sqrt() + eps)
    else:
        step = lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t) * M / (V.sqrt() + eps)
    if bug not in ("unrotated", "no_back"):
        step = rot_back(step, QL, QR)
    if bug == "decay_first":
        p = p * (1 - lr * weight_decay)
    if bug == "in_place":
        p = p.sub_(step)
    else:
        p = p - step
    if bug != "decay_first":
        p = p * (1 - lr * weight_decay)
    if bug == "tiny":
        p = p + 1e-6
    if bug == "unchanged":
        p = given
    return p, M, V


def update_with(bug):
    return lambda *args, **kw: update(*args, **kw, bug=bug)


def fresh(S, Q, V, dim, bug=None):
    est = torch.diagonal(Q @ S @ Q.T if bug == "rows" else Q.T @ S @ Q)
    order = torch.argsort(est, descending=bug != "ascending")
    if bug == "eigh":
        return torch.linalg.eigh(S).eigenvectors.flip(1), V.index_select(dim, order)
    if bug == "no_power":
        Q = Q[:, order]
    elif bug == "q_times_s":
        Q = torch.linalg.qr(Q[:, order] @ S).Q
    elif bug == "no_qr":
        Q = S @ Q[:, order]
    else:
        Q = torch.linalg.qr(S @ Q[:, order]).Q
    if bug == "v_kept":
        return Q, V
    if bug == "v_other_dim":
        return Q, V.index_select(1 - dim, order)
    return Q, V.index_select(dim, order)


class MySOAP(torch.optim.Optimizer):
    """The notebook's class (its solution), with planted mistakes."""

    bug = None

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=10,
                 max_precond_dim=10000):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim))

    @torch.no_grad()
    def step(self):
        bug = self.bug
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = self.defaults["lr"] if bug == "defaults_lr" else group["lr"]
            wd = self.defaults["weight_decay"] if bug == "defaults_lr" else group["weight_decay"]
            for p in group["params"]:
                G = p.grad
                state = {} if bug == "fresh" else self.state[p]
                if not state:
                    limit = 10**9 if bug == "no_limit" else group["max_precond_dim"]
                    two_d = p.dim() == 2
                    L = torch.zeros(p.shape[0], p.shape[0], dtype=p.dtype) if two_d and p.shape[0] <= limit else None
                    R = torch.zeros(p.shape[1], p.shape[1], dtype=p.dtype) if two_d and p.shape[1] <= limit else None
                    state.update(t=0, M=torch.zeros_like(p), V=torch.zeros_like(p), L=L, R=R)
                    _factors(state, G, beta2)
                    state["QL"] = None if L is None else basis(state["L"])
                    state["QR"] = None if R is None else basis(state["R"])
                    if bug != "moves_first":
                        continue
                if bug == "t_after":
                    t = state["t"]
                    state["t"] += 1
                else:
                    state["t"] += 1
                    t = state["t"]
                new_p, state["M"], state["V"] = update(p, G, state["M"], state["V"], state["QL"], state["QR"], t, lr,
                                                       beta1, beta2, group["eps"], wd)
                if bug == "copy":
                    p = new_p
                else:
                    p.copy_(new_p)
                _factors(state, G, beta2)
                due = (state["t"] + (1 if bug == "refresh_late" else 0)) % group["precondition_frequency"] == 0
                if due and bug != "no_refresh":
                    M = rot_back(state["M"], state["QL"], state["QR"])
                    V = state["V"]
                    if state["L"] is not None:
                        state["QL"], V = fresh(state["L"], state["QL"], V, 0)
                    if state["R"] is not None:
                        state["QR"], V = fresh(state["R"], state["QR"], V, 1)
                    if bug != "v_dropped":
                        state["V"] = V
                    if bug != "m_stale":
                        state["M"] = rot(M, state["QL"], state["QR"])


def _factors(state, G, beta):
    if state["L"] is not None:
        state["L"] = beta * state["L"] + (1 - beta) * G @ G.T
    if state["R"] is not None:
        state["R"] = beta * state["R"] + (1 - beta) * G.T @ G


def _optimizer_with(bug):
    return type(f"MySOAP_{bug}", (MySOAP,), {"bug": bug})


class _NotebookStub(torch.optim.Optimizer):
    """The notebook's stub: the NotImplementedError inside the loops of step()."""

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=10,
                 max_precond_dim=10000):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for _p in group["params"]:
                raise NotImplementedError()


IN_PLACE = "the caller's tensors must stay as they were"
MISTAKES = [
    # update_factors
    ("update_factors", (stub,), NOT_YET),
    ("update_factors", (lambda L, R, G, b: factors(L, R, G, b, "transposed"),),
     "your code raised RuntimeError: The size of tensor a (5) must match the size of tensor b (3) at non-singleton "
     "dimension 1 (line 14: return beta * L + (1 - beta) * G.T @ G, beta * R + (1 - beta) * G @ G.T); with a 5×3 G, "
     "L is 5×5 (G @ G.T) and R is 3×3 (G.T @ G)"),
    ("update_factors", (lambda L, R, G, b: (G.T @ G, G @ G.T),),
     "L has shape (3, 3), expected (5, 5): L = avg of G @ G.T (m×m, over rows), R = avg of G.T @ G (n×n, over "
     "columns)"),
    ("update_factors", (lambda L, R, G, b: factors(L, R, G, b, "swapped_weights"),),
     "the weights are swapped: keep β of the OLD L and add (1 − β)·G Gᵀ"),
    ("update_factors", (lambda L, R, G, b: factors(L, R, G, b, "sum"),),
     "that is Shampoo's running sum L + G Gᵀ; SOAP keeps an exponential moving average β·L + (1 − β)·G Gᵀ"),
    ("update_factors", (lambda L, R, G, b: factors(L, R, G, b, "squared_weight"),),
     "(1 − β) multiplies G Gᵀ once, not each factor of it"),
    ("update_factors", (lambda L, R, G, b: factors(L, R, G, b, "order"),),
     "the pair is in the wrong order: return (L, R)"),
    ("update_factors", (lambda L, R, G, b: factors(L, R, G, b, "in_place"),),
     f"you modified L in place: return new tensors (L = beta * L + ...); {IN_PLACE}"),
    ("update_factors", (lambda L, R, G, b: (factors(L, R, G, b)[0], G.T @ G),), "R (5×3 gradient, beta 0.9)[…"),
    # the square case: a transposed, elementwise or wrong R factor keeps its shape
    ("update_factors", (lambda L, R, G, b: factors(L, R, G, b, "elementwise") if G.shape[0] == G.shape[1]
                        else factors(L, R, G, b),),
     "G Gᵀ is a matrix product (G @ G.T), not the elementwise square G * G"),
    ("update_factors", (lambda L, R, G, b: factors(L, R, G, b, "transposed") if G.shape[0] == G.shape[1]
                        else factors(L, R, G, b),),
     "L averages G Gᵀ (G @ G.T, m×m) and R averages Gᵀ G: yours are swapped"),
    ("update_factors", (lambda L, R, G, b: factors(L, R, G, b, "r_wrong") if G.shape[0] == G.shape[1]
                        else factors(L, R, G, b),), "R averages Gᵀ G (G.T @ G, n×n): yours is G Gᵀ"),
    # eigenbasis
    ("eigenbasis", (stub,), NOT_YET),
    ("eigenbasis", (lambda S: basis(S, "ascending"),),
     "the eigenvalues come out of torch.linalg.eigh ascending: flip the columns (Q.flip(1)) so the largest comes "
     "first"),
    ("eigenbasis", (lambda S: basis(S, "rows"),),
     "eigenvectors are the COLUMNS of eigh's result; you returned them as rows"),
    ("eigenbasis", (lambda S: basis(S, "flip_rows"),),
     "flip the COLUMNS (Q.flip(1) or Q.flip(-1)), not the rows: each column is one eigenvector"),
    ("eigenbasis", (lambda S: basis(S, "values"),),
     "Q has shape (5,): return the eigenvectors (an 5×5 matrix), not the eigenvalues"),
    ("eigenbasis", (lambda S: basis(S, "tuple"),),
     "return the eigenvectors only (a matrix): torch.linalg.eigh returns (eigenvalues, eigenvectors)"),
    ("eigenbasis", (lambda S: basis(S, "random"),), "Qᵀ S Q is not diagonal (5×5 statistic): entry […"),
    ("eigenbasis", (lambda S: torch.linalg.eigh(S.mul_(1.0)).eigenvectors.flip(1) + 0 * S.add_(1.0),),
     f"you modified S in place: return new tensors (Q = ...); {IN_PLACE}"),
    # rotations
    ("rotations", (stub, rot_back), NOT_YET),
    ("rotations", (lambda G, QL, QR: rot(G, QL, QR, "backwards"), rot_back),
     "rotate goes INTO the eigenbasis: Q_Lᵀ G Q_R (you computed Q_L G Q_Rᵀ, the way back)"),
    ("rotations", (lambda G, QL, QR: rot(G, QL, QR, "right_transposed"), rot_back),
     "the right side is G Q_R (its columns are R's eigenvectors), not G Q_Rᵀ"),
    ("rotations", (lambda G, QL, QR: rot(G, QL, QR, "left_only"), rot_back),
     "rotate both sides: Q_Lᵀ G Q_R (yours rotates the left side only)"),
    ("rotations", (rot, lambda X, QL, QR: rot_back(X, QL, QR, "forward")),
     "rotate_back must undo rotate: Q_L X Q_Rᵀ (yours rotates forward again, Q_Lᵀ X Q_R)"),
    ("rotations", (lambda G, QL, QR: rot(G, QL, QR, "no_none"), rot_back),
     "rotate with QL = None raised AttributeError: 'NoneType' object has no attribute 'T'; a None basis means that "
     "side is not rotated (skip it)"),
    ("rotations", (lambda G, QL, QR: rot(G.add_(1e-3), QL, QR), rot_back),
     f"you modified G in place: return new tensors (G_rot = QL.T @ G @ QR); {IN_PLACE}"),
    # soap_update
    ("soap_update", (stub,), NOT_YET),
    ("soap_update", (update_with("unrotated"),),
     "looks like plain Adam on G: rotate the gradient into the eigenbasis first, G' = Q_Lᵀ G Q_R (both sides "
     "rotated, t=3)"),
    ("soap_update", (update_with("no_back"),),
     "the step M ⊘ (√V + ε) lives in the eigenbasis: rotate it back (rotate_back) before subtracting it from p (both "
     "sides rotated, t=3)"),
    ("soap_update", (update_with("v_square_first"),),
     "V averages the square of the ROTATED gradient, G'∘G' (rotate, then square) (both sides rotated, t=3)"),
    ("soap_update", (update_with("m_unrotated"),),
     "M averages the rotated gradient G' (it is kept in the eigenbasis), not G (both sides rotated, t=3)"),
    ("soap_update", (update_with("torch_eps"),),
     "ε goes after the square root of the uncorrected V, √V + ε, with both bias corrections in the step size "
     "lr·√(1 − β2^t)/(1 − β1^t) (torch's AdamW places ε after correcting v: a different number) (both sides rotated, "
     "t=3)"),
    ("soap_update", (update_with("decay_first"),),
     "SOAP decays after the update: p ← (p − step)·(1 − lr·λ) (torch's AdamW decays first) (both sides rotated, t=3)"),
    ("soap_update", (update_with("in_place"),),
     f"you modified p in place: return new tensors (p = p - ..., not p -= ...); {IN_PLACE}"),
    ("soap_update", (update_with("tiny"),), "p (both sides rotated, t=3)[…"),
    ("soap_update", (update_with("unchanged"),), "p (both sides rotated, t=3)[…"),
    # refresh
    ("refresh", (stub,), NOT_YET),
    ("refresh", (lambda S, Q, V, d: fresh(S, Q, V, d, "v_kept"),),
     "V must follow its directions: re-order it along dim by the same permutation as Q's columns (left factor, dim 0)"),
    ("refresh", (lambda S, Q, V, d: fresh(S, Q, V, d, "v_other_dim"),),
     "V is re-ordered along dim (this factor's side of the parameter), not the other one (left factor, dim 0)"),
    ("refresh", (lambda S, Q, V, d: fresh(S, Q, V, d, "ascending"),),
     "sort the estimated eigenvalues in DESCENDING order (largest first), like the eigenbasis (left factor, dim 0)"),
    ("refresh", (lambda S, Q, V, d: fresh(S, Q, V, d, "rows"),),
     "the estimated eigenvalue of column i is qᵢᵀ S qᵢ: the diagonal of Qᵀ S Q (not Q S Qᵀ) (left factor, dim 0)"),
    ("refresh", (lambda S, Q, V, d: fresh(S, Q, V, d, "no_power"),),
     "after re-ordering, take one power-iteration step: the QR of S @ Q[:, order] (left factor, dim 0)"),
    ("refresh", (lambda S, Q, V, d: fresh(S, Q, V, d, "eigh"),),
     "the refresh is one power iteration from the old basis (QR of S Q), not a new eigendecomposition: cheaper, and "
     "the columns stay matched with V's entries (left factor, dim 0)"),
    ("refresh", (lambda S, Q, V, d: fresh(S, Q, V, d, "q_times_s"),),
     "multiply S @ Q (S acts on the columns of Q), not Q @ S (left factor, dim 0)"),
    ("refresh", (lambda S, Q, V, d: fresh(S, Q, V, d, "no_qr"),),
     "Q_new is not orthogonal (left factor, dim 0): finish with torch.linalg.qr(...).Q"),
    ("refresh", (lambda S, Q, V, d: fresh(S, Q, V.mul_(1.0).add_(1.0), d),),
     f"you modified V in place: return new tensors (Q_new = ..., V_new = V.index_select(...)); {IN_PLACE}"),
    ("refresh", (lambda S, Q, V, d: fresh(S, Q, V, 0),),
     "V is re-ordered along dim (this factor's side of the parameter), not the other one (right factor, dim 1)"),
    # soap_optimizer (the notebook's MySOAP)
    ("soap_optimizer", (_NotebookStub,), NOT_YET),
    ("soap_optimizer", (_optimizer_with("moves_first"),),
     "the 4×4 weight moved at the first step(): the first step() must only build L, R and the bases (and leave the "
     "parameter where it is): the basis must never contain the gradient it rotates"),
    ("soap_optimizer", (_optimizer_with("fresh"),),
     "the 4×4 weight never moved: the state restarts at every step: keep it in self.state[p] between calls (every "
     "call looked like a first call)"),
    ("soap_optimizer", (_optimizer_with("no_refresh"),),
     "the 4×4 weight, call 5: the bases never change: after the parameter step, when state['t'] % "
     "precondition_frequency == 0, refresh them"),
    ("soap_optimizer", (_optimizer_with("refresh_late"),),
     "the 4×4 weight, call 4: the refresh comes one step late: t counts the steps that moved p (the first call is "
     "not one), and the refresh follows step t when t % precondition_frequency == 0"),
    ("soap_optimizer", (_optimizer_with("m_stale"),),
     "the 4×4 weight, call 5: at a refresh M must move to the new basis: rotate_back with the old bases, then rotate "
     "with the new ones (V is only re-ordered)"),
    ("soap_optimizer", (_optimizer_with("v_dropped"),),
     "the 4×4 weight, call 5: keep the re-ordered V that refresh returns (state['V'] = ...)"),
    ("soap_optimizer", (_optimizer_with("no_limit"),),
     "the 3×6 weight (group 1), call 2: a dim larger than max_precond_dim gets no factor and no rotation (None): the "
     "3×6 weight's 6 side is over the limit of 5"),
    ("soap_optimizer", (_optimizer_with("defaults_lr"),),
     "the 3×6 weight (group 1), call 2: the learning rate (or weight decay) comes from self.defaults instead of the "
     "param group: each group sets its own"),
    ("soap_optimizer", (_optimizer_with("t_after"),),
     "your code raised ZeroDivisionError: float division by zero (line 77: step = lr * (1 - beta2**t) ** 0.5 / (1 - "
     "beta1**t) * M / (V.sqrt() + eps)) at call 2: count the step (state['t'] += 1) before soap_update, so that t = 1 "
     "at the first step that moves p"),
    ("soap_optimizer", (_optimizer_with("copy"),),
     "the 4×4 weight never moved: the state restarts at every step: keep it in self.state[p] between calls (every "
     "call looked like a first call)"),
    ("soap_optimizer", (lambda params, **kw: object(),), "your class should subclass torch.optim.Optimizer"),
]


@pytest.mark.parametrize("name, answers, message", MISTAKES,
                         ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(MISTAKES)])
def test_each_mistake_gets_its_line(name, answers, message):
    assert_mistake_line(getattr(check, name)(*answers), name, message)


def _svd_basis(S):
    return torch.linalg.svd(S).U  # S is symmetric positive definite: its left singular vectors, descending


def _einsum_rotations():
    return (lambda G, QL, QR: G if QL is None and QR is None else
            torch.einsum("ai,ab->ib", QL, G) if QR is None else
            G @ QR if QL is None else torch.einsum("ai,ab,bj->ij", QL, G, QR),
            lambda X, QL, QR: rot(X, None if QL is None else QL.T, None if QR is None else QR.T))


def _update_in_one_line(p, G, M, V, QL, QR, t, lr, beta1, beta2, eps, weight_decay):
    g = rot(G, QL, QR)
    M, V = M.lerp(g, 1 - beta1), V * beta2 + (1 - beta2) * g.square()
    size = lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
    return (p - size * rot_back(M / (V.sqrt() + eps), QL, QR)) * (1 - lr * weight_decay), M, V


def _refresh_with_permutation_matrix(S, Q, V, dim):
    order = torch.argsort((Q * (S @ Q)).sum(0), descending=True)
    P = torch.eye(len(order), dtype=Q.dtype)[:, order]  # Q @ P re-orders the columns
    Q_new, R = torch.linalg.qr(S @ Q @ P)
    V_new = P.T @ V if dim == 0 else V @ P
    return -Q_new, V_new  # a QR is defined up to column signs


ALTERNATIVES = [
    ("update_factors", (factors,)),
    ("update_factors", (lambda L, R, G, b: (L.lerp(G @ G.T, 1 - b), torch.einsum("ki,kj->ij", G, G) * (1 - b) + b * R),
                        )),
    ("eigenbasis", (basis,)),
    ("eigenbasis", (_svd_basis,)),
    ("rotations", (rot, rot_back)),
    ("rotations", _einsum_rotations()),
    ("soap_update", (update,)),
    ("soap_update", (_update_in_one_line,)),
    ("refresh", (fresh,)),
    ("refresh", (_refresh_with_permutation_matrix,)),
    ("soap_optimizer", (MySOAP,)),
]


@pytest.mark.parametrize("name, answers", ALTERNATIVES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ALTERNATIVES)])
def test_correct_answers_pass(name, answers):
    assert_passes(getattr(check, name)(*answers), name)


def test_soap_update_check_names_the_earlier_stub():
    def rotate(G, QL, QR):  # exercise 3, still a stub
        raise NotImplementedError()

    def soap_update(p, G, M, V, QL, QR, t, lr, beta1, beta2, eps, weight_decay):
        g = rotate(G, QL, QR)
        return p - lr * g, M, V

    result = str(check.soap_update(soap_update))
    assert result.startswith("✗") and "not implemented yet: rotate (an earlier exercise" in result, result


def test_library_parity_line():
    ours = torch.ones(3, 2)
    assert_passes(check.library_parity(ours, ours + 1e-7), "library_parity")
    assert_mistake_line(check.library_parity(ours, ours + 1e-3), "library_parity",
                        "weights trained with gpt2lab.optim.SOAP vs pytorch_optimizer.SOAP[…")


def test_the_class_check_would_see_a_refresh_and_the_limit():
    """The hand reference really refreshes (the bases change between calls 4 and 5) and the 3×6 weight's 6 side is
    left alone: a check that cannot see these would pass wrong answers."""
    start, grads = check._problem()
    plain = check._simulate(start, grads)
    assert not torch.allclose(plain[5][0], check._simulate(start, grads, "no_refresh")[5][0], atol=1e-6)
    assert not torch.allclose(plain[1][1], check._simulate(start, grads, "no_limit")[1][1], atol=1e-6)
