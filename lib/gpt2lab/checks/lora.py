"""Check cells of notebook 05 (lora): the LoRA layer, the q,v adapters on GPT-2's fused qkv projection, merge and
unmerge.

Each check runs the learner's code on small hand-made cases where the common mistakes give a different answer, and
names them: the base left trainable, A and B swapped or both zero at the start, B not zero at the start, the scale
forgotten or taken as alpha, alpha / sqrt(r) or r / alpha instead of alpha / r, dropout on the base path, after A, on
the adapter's output or called twice, the bias dropped, the base output computed without gradients; v's delta in
the k block, q and v swapped, x~ @ B @ A for x~ @ A.T @ B.T (square blocks let it run), a k block that is not zero;
a merge without the scale, with the delta transposed (transformers' Conv1D layout) or written into the caller's
weight, an unmerge that adds the delta again or subtracts it unscaled.

Inputs are chosen so that those mistakes show: B is nonzero (so a missing scale or a transposed product changes the
output), alpha / r = 1.5 differs from alpha, alpha / sqrt(r) and r / alpha, the q, k and v blocks get different
values, and the layer with dropout runs in train mode with p = 0.5. The references are written here with torch ops
(F.linear, @, torch.cat), never with `gpt2lab.lora`, whose layer the learner re-implements; the dropout mask is the
one the learner's own nn.Dropout drew (read through a forward hook), so the check needs no copy of torch's RNG.
Trained pieces (the layer, the fused delta) are run with gradients and compared parameter by parameter. The checks
leave the global RNG as they found it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .core import (
    _close,
    _last_user_frame,
    check,
    compare,
    compare_gradients,
    compare_with_hints,
    expect,
    gradients,
    known_mistake,
    untouched,
)

IN, OUT, RANK, ALPHA = 7, 5, 3, 4.5  # the layer: scale alpha / r = 1.5, apart from alpha, alpha/sqrt(r), r/alpha
SCALE = ALPHA / RANK
C, R_QV, QV_SCALE = 6, 2, 1.5  # the fused projection: C -> 3C = [q | k | v], rank 2 pairs on q and v
P_DROP = 0.5


@contextlib.contextmanager
def _own_rng():
    """The check draws (the learner's A init, dropout masks) from the global RNG under a fixed seed, then puts the
    notebook's RNG state back, so running a check cell never changes what the next cell draws."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _randn(*shape, seed: int, std: float = 1.0) -> torch.Tensor:
    return std * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _input(*shape, seed: int) -> torch.Tensor:
    """A non-leaf input that requires grad, like an activation inside a model being trained."""
    return _randn(*shape, seed=seed).requires_grad_() * 1.0


def _call(fn, *args, shapes: str):
    """fn(*args); a shape error raised by the learner's code gets `shapes` (what each tensor's shape is) in front."""
    try:
        return fn(*args)
    except RuntimeError as err:
        text = str(err).split("\n")[0]
        if not isinstance(err, NotImplementedError) and ("shape" in text or "size of tensor" in text):
            expect(False, f"{shapes}; your code raised RuntimeError: {text}{_last_user_frame(err)}")
        raise


# ------------------------------------------------------------------------------------------------------ §1 the layer

_LAYER_SHAPES = (f"A is (rank, in_features) = ({RANK}, {IN}) and B is (out_features, rank) = ({OUT}, {RANK}): the "
                 "adapter is dropout(x) @ A.T @ B.T")  # fmt: skip


_SCALED_BASE = "the scale multiplies the base output too: only the adapter path is scaled, base(x) + scale * ..."
_NO_BIAS = "the bias is missing: the base path is the whole base layer, F.linear(x, weight, bias) (or base(x))"
_ADAPTER_ONLY = "only the adapter is returned: add the frozen base layer's output base(x)"


def _base_layer(seed: int) -> nn.Linear:
    base = nn.Linear(IN, OUT)
    with torch.no_grad():
        base.weight.copy_(_randn(OUT, IN, seed=seed, std=0.5))
        base.bias.copy_(_randn(OUT, seed=seed + 1))  # O(1): a dropped bias shows
    return base


def _factors(layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """The learner's A (rank, in) and B (out, rank), found by shape among the trainable parameters (any names)."""
    trainable = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    names = ", ".join(f"{n} {tuple(p.shape)}" for n, p in trainable) or "none"
    shapes = sorted(tuple(p.shape) for _, p in trainable)
    expect(shapes != sorted([(IN, RANK), (RANK, OUT)]),
           f"A and B are stored transposed: {_LAYER_SHAPES} (B @ A then has the weight's shape (out, in))")
    expect(len(trainable) == 2 and shapes == sorted([(RANK, IN), (OUT, RANK)]),
           f"the trainable parameters should be exactly A ({RANK}, {IN}) and B ({OUT}, {RANK}) as nn.Parameter "
           f"attributes (so the optimizer, state_dict and .to() see them); yours: {names}")  # fmt: skip
    (A,) = [p for _, p in trainable if tuple(p.shape) == (RANK, IN)]
    (B,) = [p for _, p in trainable if tuple(p.shape) == (OUT, RANK)]
    return A, B


def _layer_output(layer, x, base: nn.Linear, what: str):
    W0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    with untouched("compute a new tensor from x, do not write into it (the layer below needs its output)", x=x):
        with untouched("the base layer's weights stay as they are (frozen)", weight=base.weight, bias=base.bias):
            y = _call(layer, x, shapes=_LAYER_SHAPES)
    expect(y is not None, "forward returned None: did you forget to `return`?")
    expect(torch.is_tensor(y), f"forward should return a tensor, got {type(y).__name__}")
    expect(tuple(y.shape) == (*x.shape[:-1], OUT),
           f"{what} has shape {tuple(y.shape)}, expected {(*x.shape[:-1], OUT)} = (..., out_features)")
    return y, W0, b0


@check("lora_layer")
def lora_layer(cls):
    """`cls(base, rank, alpha, dropout)` -> a module computing base(x) + (alpha/rank) * dropout(x) @ A.T @ B.T.

    Checked: the base is frozen and A, B are the only trainable parameters; A starts random and B at zero, so the
    fresh layer gives the base's output; with nonzero A and B the output and the gradients of x, A and B match a
    hand computation, first without dropout, then with nn.Dropout(0.5) in train mode (the mask is the one the
    learner's dropout module drew, read with a forward hook).
    """
    with _own_rng():
        base = _base_layer(seed=1)
        with untouched("wrap the base layer, do not change its weights", weight=base.weight, bias=base.bias):
            layer = cls(base, RANK, ALPHA, 0.0)
        expect(isinstance(layer, nn.Module), f"{getattr(cls, '__name__', cls)}(...) should build an nn.Module, got "
                                             f"{type(layer).__name__}")  # fmt: skip
        expect(not base.weight.requires_grad and not base.bias.requires_grad,
               "the base layer still trains: freeze its weight and bias (requires_grad_(False)); only A and B train")
        A, B = _factors(layer)
        a_zero, b_zero = not A.detach().any(), not B.detach().any()
        expect(not (a_zero and not b_zero), "A and B are swapped at the start: A starts random "
               "(nn.init.kaiming_uniform_(A, a=math.sqrt(5))) and B at zero")  # fmt: skip
        expect(not (a_zero and b_zero), "A and B both start at zero: then neither gets a gradient and the adapter "
               "never trains; A starts random (nn.init.kaiming_uniform_(A, a=math.sqrt(5))), only B at zero")
        expect(b_zero, "B should start at zero, so that B @ A = 0 and the fresh layer is exactly the base layer")
        expect(bool((A.detach() != A.detach().flatten()[0]).any()),
               "A should start random (nn.init.kaiming_uniform_(A, a=math.sqrt(5))), not constant")

        x = _input(2, 4, IN, seed=3)  # (B, T, in)
        y, W0, b0 = _layer_output(layer, x, base, "the output")
        base_out = F.linear(x, W0, b0)  # (B, T, out)
        compare_with_hints("output of the fresh layer (B = 0: the base layer's output)", y.detach(), base_out, 1e-6,
                           [(_SCALED_BASE, SCALE * base_out), (_NO_BIAS, base_out - b0),
                            (_ADAPTER_ONLY, torch.zeros_like(base_out))])  # fmt: skip

        # nonzero factors: every path of the formula shows
        with torch.no_grad():
            A.copy_(_randn(RANK, IN, seed=4, std=0.6))
            B.copy_(_randn(OUT, RANK, seed=5, std=0.6))
        layer.eval()
        y, W0, b0 = _layer_output(layer, x, base, "the output")
        base_out = F.linear(x, W0, b0)  # (B, T, out)
        adapter = x @ A.T @ B.T  # (B, T, out), unscaled
        expected = base_out + SCALE * adapter
        mistakes = [
            ("the adapter is not scaled: multiply it by scale = alpha / r", base_out + adapter),
            ("the adapter is scaled by alpha: the scale is alpha / r", base_out + ALPHA * adapter),
            ("the adapter is scaled by alpha / sqrt(r), rsLoRA's scale: LoRA's is alpha / r",
             base_out + ALPHA / RANK**0.5 * adapter),
            ("the adapter is scaled by r / alpha: the scale is alpha / r", base_out + RANK / ALPHA * adapter),
            (_SCALED_BASE, SCALE * expected),
            (_NO_BIAS, expected - b0),
            (_ADAPTER_ONLY, SCALE * adapter),
            ("only the base layer's output is returned: add the adapter, scale * dropout(x) @ A.T @ B.T (the check "
             "sets B nonzero)", base_out),
        ]  # fmt: skip
        compare_with_hints("output (nonzero A and B, no dropout)", y.detach(), expected, 1e-5, mistakes)
        params = {"x": x, "A": A, "B": B}
        got_grads, exp_grads = gradients(y, params), gradients(expected, params)
        known_mistake(got_grads["x"], exp_grads["x"], 1e-5, [
            ("no gradient flows to x through the base path: compute base(x) with gradients on (no torch.no_grad or "
             ".detach()); the layers below train through it", lambda: gradients(SCALE * adapter, {"x": x})["x"])])
        compare_gradients(got_grads, exp_grads)

        # dropout: the learner's own nn.Dropout draws the mask; a hook hands us what it saw and gave
        base = _base_layer(seed=11)
        layer = cls(base, RANK, ALPHA, P_DROP)
        drops = [m for m in layer.modules() if isinstance(m, nn.Dropout)]
        expect(len(drops) == 1 and drops[0].p == P_DROP,
               f"with dropout={P_DROP} the layer should hold one nn.Dropout({P_DROP}) module (self.dropout = "
               f"nn.Dropout(dropout)), found {len(drops)}: keep it a module, so that hooks can see the adapter's "
               f"input")  # fmt: skip
        A, B = _factors(layer)
        with torch.no_grad():
            A.copy_(_randn(RANK, IN, seed=12, std=0.6))
            B.copy_(_randn(OUT, RANK, seed=13, std=0.6))
        seen = []
        hook = drops[0].register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
        layer.train()
        x = _input(3, 5, IN, seed=14)
        try:
            y, W0, b0 = _layer_output(layer, x, base, "the output in train mode")
        finally:
            hook.remove()
        expect(len(seen) > 0, "dropout is never called in forward: the adapter's input is self.dropout(x)")
        expect(len(seen) == 1, f"dropout is called {len(seen)} times per forward: call it once, on the adapter's "
                               f"input (the base path takes x itself)")  # fmt: skip
        dropped_in, x_tilde = seen[0]
        width = dropped_in.shape[-1] if dropped_in.dim() else None
        expect(width != RANK, "dropout is applied after A (to x @ A.T): apply it to x itself, the adapter's input")
        expect(width != OUT, "dropout is applied to the adapter's output: apply it to x, the adapter's input, "
                             "before A")  # fmt: skip
        expect(dropped_in.shape == x.shape and _close(dropped_in, x, 0.0),
               "dropout should be applied to x itself (the layer's input), before A")
        base_out = F.linear(x, W0, b0)
        expected = base_out + SCALE * (x_tilde @ A.T @ B.T)
        mistakes = [("dropout is applied to the base path too: the frozen base layer takes x itself; only the "
                     "adapter's input is dropout(x)", F.linear(x_tilde, W0, b0) + SCALE * (x_tilde @ A.T @ B.T))]
        compare_with_hints(f"output with dropout (p={P_DROP}, train mode)", y.detach(), expected, 1e-5, mistakes)
        params = {"x": x, "A": A, "B": B}
        compare_gradients(gradients(y, params), gradients(expected, params))
    return ("frozen base, A random and B = 0 at the start (the base layer's output), scale alpha / r, dropout on the "
            "adapter's input only; outputs and gradients of x, A, B match")


# ----------------------------------------------------------------------------------------- §2 q and v on fused qkv

_QV_SHAPES = (f"each A is (r, C) = ({R_QV}, {C}) and each B is (C, r) = ({C}, {R_QV}); a block's delta is "
              "scale * x_tilde @ A.T @ B.T, (..., C)")  # fmt: skip


def _qv_case():
    x_tilde = _input(2, 3, C, seed=21)  # (B, T, C)
    factors = {name: _randn(*shape, seed=seed, std=0.7).requires_grad_()
               for name, shape, seed in (("A_q", (R_QV, C), 22), ("B_q", (C, R_QV), 23), ("A_v", (R_QV, C), 24),
                                         ("B_v", (C, R_QV), 25))}  # fmt: skip
    return x_tilde, factors


def _block(x, A, B, scale=QV_SCALE):
    return scale * (x @ A.T @ B.T)  # (..., C)


@check("fused_qv_delta")
def fused_qv_delta(fn):
    """`fn(x_tilde, adapters, scale)` with adapters = {"q": (A_q, B_q), "v": (A_v, B_v)} -> the (..., 3C) delta of the
    fused q|k|v projection: scale * x~ A_q^T B_q^T in [0:C), zeros in k's [C:2C), scale * x~ A_v^T B_v^T in [2C:3C).

    Checked with different q and v factors (so every block is told apart), then the gradients of x~ and the four
    factors (the delta is trained)."""
    x, f = _qv_case()
    adapters = {"q": (f["A_q"], f["B_q"]), "v": (f["A_v"], f["B_v"])}
    with untouched("build a new tensor (torch.cat or zeros + slices), do not write into the inputs", x_tilde=x,
                   **f):  # fmt: skip
        got = _call(fn, x, adapters, QV_SCALE, shapes=_QV_SHAPES)
    expect(got is not None, "fused_qv_delta returned None: did you forget to `return`?")
    expect(torch.is_tensor(got), f"return a tensor, got {type(got).__name__}")
    shape = (*x.shape[:-1], 3 * C)
    expect(tuple(got.shape) != (*x.shape[:-1], 2 * C),
           f"the delta has width 2C = {2 * C}, expected 3C = {3 * C}: the fused output is [q | k | v], so a zero k "
           f"block sits between q's and v's deltas")  # fmt: skip
    expect(tuple(got.shape) == shape, f"the delta has shape {tuple(got.shape)}, expected {shape} = (..., 3C): q's "
           f"delta in [0:C), zeros in k's [C:2C), v's in [2C:3C)")  # fmt: skip
    dq, dv = _block(x, f["A_q"], f["B_q"]), _block(x, f["A_v"], f["B_v"])  # (B, T, C) each
    zero = torch.zeros_like(dq)
    expected = torch.cat([dq, zero, dv], dim=-1)  # (B, T, 3C)
    mistakes = [
        (f"v's delta is in the k block: the fused output is [q | k | v], so v's columns are [2C:3C) = [{2 * C}:"
         f"{3 * C}) and k's [C:2C) stay zero", torch.cat([dq, dv, zero], dim=-1)),
        (f"q and v are swapped: q's delta goes to columns [0:C) = [0:{C}), v's to [2C:3C) = [{2 * C}:{3 * C})",
         torch.cat([dv, zero, dq], dim=-1)),
        ("the deltas are not scaled: multiply each by scale", torch.cat([dq, zero, dv], dim=-1) / QV_SCALE),
        ("A and B are swapped: a block's delta is x_tilde @ A.T @ B.T (A is (r, C), B is (C, r)); with square blocks "
         "x_tilde @ B @ A runs too, but it is another map", torch.cat(
             [QV_SCALE * (x @ f["B_q"] @ f["A_q"]), zero, QV_SCALE * (x @ f["B_v"] @ f["A_v"])], dim=-1)),
        ("the same delta is written into every block: q's goes to [0:C) only, v's to [2C:3C) only, k's block is zero",
         torch.cat([dq, dq, dq], dim=-1)),
    ]  # fmt: skip
    got_values = got.detach()
    known_mistake(got_values, expected, 1e-5, mistakes)
    if _close(got_values[..., :C], dq, 1e-5) and _close(got_values[..., 2 * C:], dv, 1e-5):
        expect(_close(got_values[..., C:2 * C], zero, 1e-5),
               f"the k block [C:2C) = [{C}:{2 * C}) is not zero: k has no adapter (only q and v do)")
    compare("delta (q | k | v)", got_values, expected)
    params = {"x_tilde": x, **f}
    compare_gradients(gradients(got, params), gradients(expected, params))
    return "q's delta in [0:C), zeros in k's [C:2C), v's in [2C:3C), scaled; gradients of x_tilde and the factors too"


# ------------------------------------------------------------------------------------------- §3 merge and unmerge


@check("merge_qv")
def merge_qv(merge, unmerge):
    """`merge(weight, adapters, scale)` -> W0 + the q,v delta (rows of the (3C, C) weight); `unmerge(merged,
    adapters, scale)` -> W0 again (within 1e-5). Both return new tensors; unmerge is given the reference's merged
    weight, so each is checked on its own."""
    _, f = _qv_case()
    f = {k: v.detach() for k, v in f.items()}
    adapters = {"q": (f["A_q"], f["B_q"]), "v": (f["A_v"], f["B_v"])}
    W0 = _randn(3 * C, C, seed=31)  # (3C, C) = (out, in), nn.Linear's layout
    dq, dv = QV_SCALE * f["B_q"] @ f["A_q"], QV_SCALE * f["B_v"] @ f["A_v"]  # (C, C) each: square, like GPT-2's
    zero = torch.zeros(C, C)

    def rows(q, k, v):
        return torch.cat([q, k, v], dim=0)  # (3C, C)

    expected = W0 + rows(dq, zero, dv)
    shapes = f"weight is (3C, C) = ({3 * C}, {C}), (out, in); a block's delta is scale * B @ A, (C, C)"
    with untouched("return a new tensor (W0 + delta): the caller keeps W0 (the library keeps a copy so that "
                   "unmerge gives it back)", weight=W0, **f):  # fmt: skip
        got = _call(merge, W0, adapters, QV_SCALE, shapes=shapes)
    mistakes = [
        ("merge adds B @ A without the scale: the adapter's output is scale * x~ @ A.T @ B.T, so the weight gains "
         "scale * B @ A", W0 + rows(dq, zero, dv) / QV_SCALE),
        ("the delta is transposed: nn.Linear's weight is (out, in), and scale * B @ A is (out, in) already; (B @ A).T "
         "is the layout of transformers' Conv1D", W0 + rows(dq.T, zero, dv.T)),
        ("v's delta is in the k rows: the weight's rows are [q | k | v] (the output's columns), so v's are [2C:3C)",
         W0 + rows(dq, dv, zero)),
        ("q and v are swapped: q's delta goes to rows [0:C), v's to rows [2C:3C)", W0 + rows(dv, zero, dq)),
        ("only the delta is returned: the merged weight is W0 + delta", rows(dq, zero, dv)),
        ("the delta is subtracted: merge adds it, W0 + scale * B @ A", W0 - rows(dq, zero, dv)),
    ]  # fmt: skip
    expect(got is not None, "merge returned None: did you forget to `return`?")
    compare_with_hints("merged weight", got, expected, 1e-5, mistakes)

    merged = expected.clone()
    with untouched("return a new tensor (merged - delta)", merged=merged):
        back = _call(unmerge, merged, adapters, QV_SCALE, shapes=shapes)
    mistakes = [
        ("unmerge adds the delta again: subtract scale * B @ A from the rows merge changed",
         merged + rows(dq, zero, dv)),
        ("unmerge subtracts B @ A without the scale: merge added scale * B @ A, so subtract exactly that",
         merged - rows(dq, zero, dv) / QV_SCALE),
        ("unmerge returns the merged weight unchanged: subtract scale * B @ A from the q and v rows", merged),
        ("unmerge subtracts the transposed delta: subtract scale * B @ A itself, as merge added it",
         merged - rows(dq.T, zero, dv.T)),
        ("unmerge subtracts v's delta from the k rows: v's rows are [2C:3C)", merged - rows(dq, dv, zero)),
    ]  # fmt: skip
    expect(back is not None, "unmerge returned None: did you forget to `return`?")
    compare_with_hints("unmerged weight (should be W0 again)", back, W0, 1e-5, mistakes)
    return ("merge adds scale * B @ A to the q and v rows of W0 (k untouched), unmerge gives W0 back (within 1e-5: "
            "rounding, not bit for bit)")
