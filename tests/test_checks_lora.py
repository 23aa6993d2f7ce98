"""Notebook 05's exercise checks against the mistakes learners make: each planted mistake gets its own ✗ line
(asserted word for word), each stub reads "not implemented yet", correct alternative formulations pass (the
library's own LoRALinear among them), and running a check leaves the global RNG as it was."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from check_helpers import NOT_YET, assert_mistake_line, assert_passes, stub

from gpt2lab import lora
from gpt2lab.checks import lora as check

# ------------------------------------------------------------------------------------------------------ §1 the layer


class Layer(nn.Module):
    """The notebook's answer, with switches that plant one mistake each."""

    init = "right"  # "swapped", "zeros", "b_random", "a_constant", "transposed", "plain_tensors"
    freeze = True
    scale_of = staticmethod(lambda alpha, r: alpha / r)
    forward_kind = "right"

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        if self.freeze:
            base.requires_grad_(False)
        n, m = base.in_features, base.out_features
        A, B = torch.empty(rank, n), torch.zeros(m, rank)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if self.init == "swapped":
            A, B = torch.zeros(rank, n), 0.1 * torch.randn(m, rank)
        elif self.init == "zeros":
            A = torch.zeros(rank, n)
        elif self.init == "b_random":
            B = 0.1 * torch.randn(m, rank)
        elif self.init == "a_constant":
            A = torch.full((rank, n), 0.1)
        elif self.init == "transposed":
            A, B = A.T.contiguous(), B.T.contiguous()
        if self.init == "plain_tensors":
            self.A, self.B = A.requires_grad_(), B.requires_grad_()
        else:
            self.A, self.B = nn.Parameter(A), nn.Parameter(B)
        self.scale = self.scale_of(alpha, rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        A, B, s, drop = self.A, self.B, self.scale, self.dropout
        kind = self.forward_kind
        if kind == "base_dropped":
            x_t = drop(x)
            return self.base(x_t) + s * (x_t @ A.T @ B.T)
        if kind == "twice":
            return self.base(drop(x)) + s * (drop(x) @ A.T @ B.T)
        if kind == "no_dropout":
            return self.base(x) + s * (x @ A.T @ B.T)
        if kind == "after_A":
            return self.base(x) + s * (drop(x @ A.T) @ B.T)
        if kind == "on_output":
            return self.base(x) + s * drop(x @ A.T @ B.T)
        if kind == "no_bias":
            return F.linear(x, self.base.weight) + s * (drop(x) @ A.T @ B.T)
        if kind == "scale_all":
            return s * (self.base(x) + drop(x) @ A.T @ B.T)
        if kind == "adapter_only":
            return s * (drop(x) @ A.T @ B.T)
        if kind == "base_only":
            return self.base(x)
        if kind == "base_no_grad":
            with torch.no_grad():
                y = self.base(x)
            return y + s * (drop(x) @ A.T @ B.T)
        if kind == "detached_A":
            return self.base(x) + s * (drop(x) @ A.detach().T @ B.T)
        if kind == "swapped_product":
            return self.base(x) + s * (drop(x) @ B.T @ A.T)
        if kind == "in_place":
            x.mul_(1.0 + (B != 0).any())  # "harmless" scaling, in the caller's tensor (a no-op while B = 0)
            return self.base(x) + s * (drop(x) @ A.T @ B.T)
        if kind == "none":
            self.base(x) + s * (drop(x) @ A.T @ B.T)
            return None
        return self.base(x) + s * (drop(x) @ A.T @ B.T)


def layer(**switches):
    return type("MyLoRALinear", (Layer,), {k: staticmethod(v) if callable(v) else v for k, v in switches.items()})


class StubInForward(Layer):
    def forward(self, x):
        raise NotImplementedError()


class StubInInit(nn.Module):
    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        raise NotImplementedError()


LAYER_MISTAKES = [
    (StubInInit, NOT_YET),
    (StubInForward, NOT_YET),
    (layer(freeze=False),
     "the base layer still trains: freeze its weight and bias (requires_grad_(False)); only A and B train"),
    (layer(init="swapped"),
     "A and B are swapped at the start: A starts random (nn.init.kaiming_uniform_(A, a=math.sqrt(5))) and B at zero"),
    (layer(init="zeros"),
     "A and B both start at zero: then neither gets a gradient and the adapter never trains; A starts random "
     "(nn.init.kaiming_uniform_(A, a=math.sqrt(5))), only B at zero"),
    (layer(init="b_random"),
     "B should start at zero, so that B @ A = 0 and the fresh layer is exactly the base layer"),
    (layer(init="a_constant"),
     "A should start random (nn.init.kaiming_uniform_(A, a=math.sqrt(5))), not constant"),
    (layer(init="transposed"),
     "A and B are stored transposed: A is (rank, in_features) = (3, 7) and B is (out_features, rank) = (5, 3): the "
     "adapter is dropout(x) @ A.T @ B.T (B @ A then has the weight's shape (out, in))"),
    (layer(init="plain_tensors"),
     "the trainable parameters should be exactly A (3, 7) and B (5, 3) as nn.Parameter attributes (so the "
     "optimizer, state_dict and .to() see them); yours: none"),
    (layer(scale_of=lambda alpha, r: 1.0), "the adapter is not scaled: multiply it by scale = alpha / r"),
    (layer(scale_of=lambda alpha, r: alpha), "the adapter is scaled by alpha: the scale is alpha / r"),
    (layer(scale_of=lambda alpha, r: alpha / math.sqrt(r)),
     "the adapter is scaled by alpha / sqrt(r), rsLoRA's scale: LoRA's is alpha / r"),
    (layer(scale_of=lambda alpha, r: r / alpha), "the adapter is scaled by r / alpha: the scale is alpha / r"),
    (layer(forward_kind="scale_all"),
     "the scale multiplies the base output too: only the adapter path is scaled, base(x) + scale * ..."),
    (layer(forward_kind="no_bias"),
     "the bias is missing: the base path is the whole base layer, F.linear(x, weight, bias) (or base(x))"),
    (layer(forward_kind="adapter_only"), "only the adapter is returned: add the frozen base layer's output base(x)"),
    (layer(forward_kind="base_only"),
     "only the base layer's output is returned: add the adapter, scale * dropout(x) @ A.T @ B.T (the check sets B "
     "nonzero)"),
    (layer(forward_kind="base_no_grad"),
     "no gradient flows to x through the base path: compute base(x) with gradients on (no torch.no_grad or "
     ".detach()); the layers below train through it"),
    (layer(forward_kind="detached_A"),
     "no gradient reaches A: training would never update it (did you use `.data`, `.detach()` or "
     "`torch.no_grad()`?)"),
    (layer(forward_kind="swapped_product"),
     "A is (rank, in_features) = (3, 7) and B is (out_features, rank) = (5, 3): the adapter is dropout(x) @ A.T @ "
     "B.T; your code raised RuntimeError: mat1 and mat2 shapes cannot be multiplied…"),
    (layer(forward_kind="in_place"),
     "you modified x in place: compute a new tensor from x, do not write into it (the layer below needs its output)"),
    (layer(forward_kind="none"), "forward returned None: did you forget to `return`?"),
    (layer(forward_kind="base_dropped"),
     "dropout is applied to the base path too: the frozen base layer takes x itself; only the adapter's input is "
     "dropout(x)"),
    (layer(forward_kind="twice"),
     "dropout is called 2 times per forward: call it once, on the adapter's input (the base path takes x itself)"),
    (layer(forward_kind="no_dropout"),
     "dropout is never called in forward: the adapter's input is self.dropout(x)"),
    (layer(forward_kind="after_A"),
     "dropout is applied after A (to x @ A.T): apply it to x itself, the adapter's input"),
    (layer(forward_kind="on_output"),
     "dropout is applied to the adapter's output: apply it to x, the adapter's input, before A"),
]


@pytest.mark.parametrize("answer, message", LAYER_MISTAKES, ids=[f"layer-{i}" for i in range(len(LAYER_MISTAKES))])
def test_each_layer_mistake_gets_its_line(answer, message):
    assert_mistake_line(check.lora_layer(answer), "lora_layer", message)


def test_a_dropout_built_with_functional_dropout_is_asked_to_be_a_module():
    class Functional(Layer):
        def __init__(self, base, rank, alpha, dropout=0.0):
            super().__init__(base, rank, alpha, 0.0)
            self.p = dropout

        def forward(self, x):
            return self.base(x) + self.scale * (F.dropout(x, self.p, self.training) @ self.A.T @ self.B.T)

    assert_mistake_line(check.lora_layer(Functional), "lora_layer",
                        "with dropout=0.5 the layer should hold one nn.Dropout(0.5) module (self.dropout = "
                        "nn.Dropout(dropout)), found 0: keep it a module, so that hooks can see the adapter's input")


class PeftStyle(nn.Module):
    """peft's layout: the factors as bias-free nn.Linear modules, A = lora_A.weight (r, in), B = lora_B.weight."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)  # kaiming-uniform(a=sqrt(5)) already
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)  # p = 0 allowed: a module either way

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class Gaussian(Layer):
    """The paper's "random Gaussian A" (peft's init_lora_weights="gaussian": std 1/r), written with F.linear."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__(base, rank, alpha, dropout)
        with torch.no_grad():
            self.A.normal_(0.0, 1.0 / rank)

    def forward(self, x):
        y = F.linear(x, self.base.weight, self.base.bias)
        return y + F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scale


class Library(nn.Module):
    """The library's own LoRALinear with one pair on the whole output."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        base.requires_grad_(False)
        self.inner = lora.LoRALinear(base, {"all": slice(0, base.out_features)}, rank, alpha, dropout)

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("answer", [Layer, PeftStyle, Gaussian, Library], ids=lambda a: a.__name__)
def test_correct_layers_pass(answer):
    assert_passes(check.lora_layer(answer), "lora_layer")


def test_checks_leave_the_global_rng_as_they_found_it():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    check.lora_layer(Layer)
    assert torch.equal(torch.random.get_rng_state(), before)


# ----------------------------------------------------------------------------------------- §2 q and v on fused qkv


def qv_delta(x, adapters, scale):
    (A_q, B_q), (A_v, B_v) = adapters["q"], adapters["v"]
    dq = scale * (x @ A_q.T @ B_q.T)  # (..., C)
    dv = scale * (x @ A_v.T @ B_v.T)
    return torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)


def qv_delta_slices(x, adapters, scale):  # alternative: zeros, then the two blocks written by slice
    (A_q, B_q), (A_v, B_v) = adapters["q"], adapters["v"]
    C = B_q.shape[0]
    out = x.new_zeros(*x.shape[:-1], 3 * C)
    out[..., :C] = scale * F.linear(F.linear(x, A_q), B_q)
    out[..., 2 * C:] = scale * F.linear(F.linear(x, A_v), B_v)
    return out


def qv_delta_weights(x, adapters, scale):  # alternative: one (3C, C) delta weight, k rows zero
    (A_q, B_q), (A_v, B_v) = adapters["q"], adapters["v"]
    dW = torch.cat([B_q @ A_q, torch.zeros(B_q.shape[0], A_q.shape[1]), B_v @ A_v])
    return scale * F.linear(x, dW)


def qv_delta_library(x, adapters, scale):
    """The library's LoRALinear on a (3C, C) layer whose base is zero, called with the given factors (so the
    gradients reach them)."""
    (A_q, B_q), (A_v, B_v) = adapters["q"], adapters["v"]
    C = B_q.shape[0]
    base = nn.Linear(C, 3 * C)
    nn.init.zeros_(base.weight)
    nn.init.zeros_(base.bias)
    layer = lora.LoRALinear(base, {"q": slice(0, C), "v": slice(2 * C, 3 * C)}, A_q.shape[0])
    layer.scale = scale
    factors = {"lora_A.q": A_q, "lora_B.q": B_q, "lora_A.v": A_v, "lora_B.v": B_v}
    return torch.func.functional_call(layer, factors, (x,))


def _with(q=(None, None), k=(None, None), v=(None, None)):
    """A delta built from block functions (x, A, B) -> (..., C); None gives zeros."""
    def delta(x, adapters, scale):
        (A_q, B_q), (A_v, B_v) = adapters["q"], adapters["v"]
        zero = torch.zeros(*x.shape[:-1], B_q.shape[0])
        pick = {"q": (A_q, B_q), "v": (A_v, B_v)}
        blocks = [zero if which is None else fn(x, *pick[which]) * scale for which, fn in (q, k, v)]
        return torch.cat(blocks, dim=-1)
    return delta


def _right(x, A, B):
    return x @ A.T @ B.T


def _swapped(x, A, B):
    return x @ B @ A


N = (None, None)
QV_MISTAKES = [
    (stub, NOT_YET),
    (_with(q=("q", _right), k=("v", _right), v=N),
     "v's delta is in the k block: the fused output is [q | k | v], so v's columns are [2C:3C) = [12:18) and k's "
     "[C:2C) stay zero"),
    (_with(q=("v", _right), k=N, v=("q", _right)),
     "q and v are swapped: q's delta goes to columns [0:C) = [0:6), v's to [2C:3C) = [12:18)"),
    (lambda x, a, s: qv_delta(x, a, 1.0), "the deltas are not scaled: multiply each by scale"),
    (_with(q=("q", _swapped), k=N, v=("v", _swapped)),
     "A and B are swapped: a block's delta is x_tilde @ A.T @ B.T (A is (r, C), B is (C, r)); with square blocks "
     "x_tilde @ B @ A runs too, but it is another map"),
    (_with(q=("q", _right), k=("q", _right), v=("v", _right)),
     "the k block [C:2C) = [6:12) is not zero: k has no adapter (only q and v do)"),
    (_with(q=("q", _right), k=("q", _right), v=("q", _right)),
     "the same delta is written into every block: q's goes to [0:C) only, v's to [2C:3C) only, k's block is zero"),
    (lambda x, a, s: qv_delta(x, a, s)[..., [*range(6), *range(12, 18)]],
     "the delta has width 2C = 12, expected 3C = 18: the fused output is [q | k | v], so a zero k block sits between "
     "q's and v's deltas"),
    (lambda x, a, s: qv_delta(x, a, s)[..., :6],
     "the delta has shape (2, 3, 6), expected (2, 3, 18) = (..., 3C): q's delta in [0:C), zeros in k's [C:2C), v's "
     "in [2C:3C)"),
    (lambda x, a, s: qv_delta(x.detach(), a, s),
     "no gradient reaches x_tilde: training would never update it (did you use `.data`, `.detach()` or "
     "`torch.no_grad()`?)"),
    (lambda x, a, s: qv_delta(x, {"q": (a["q"][0].data, a["q"][1]), "v": a["v"]}, s),
     "no gradient reaches A_q: training would never update it (did you use `.data`, `.detach()` or "
     "`torch.no_grad()`?)"),
    (lambda x, a, s: x @ a["q"][1] @ a["q"][0].T,
     "each A is (r, C) = (2, 6) and each B is (C, r) = (6, 2); a block's delta is scale * x_tilde @ A.T @ B.T, "
     "(..., C); your code raised RuntimeError: mat1 and mat2 shapes cannot be multiplied…"),
    (lambda x, a, s: qv_delta(x.mul_(2.0), a, s),
     "you modified x_tilde in place: build a new tensor (torch.cat or zeros + slices), do not write into the inputs"),
    (lambda x, a, s: None, "fused_qv_delta returned None: did you forget to `return`?"),
    (lambda x, a, s: qv_delta(x, a, s) + 1e-3, "delta (q | k | v)[…"),
]


@pytest.mark.parametrize("answer, message", QV_MISTAKES, ids=[f"qv-{i}" for i in range(len(QV_MISTAKES))])
def test_each_fused_delta_mistake_gets_its_line(answer, message):
    assert_mistake_line(check.fused_qv_delta(answer), "fused_qv_delta", message)


@pytest.mark.parametrize("answer", [qv_delta, qv_delta_slices, qv_delta_weights, qv_delta_library],
                         ids=lambda a: a.__name__)
def test_correct_fused_deltas_pass(answer):
    assert_passes(check.fused_qv_delta(answer), "fused_qv_delta")


# ------------------------------------------------------------------------------------------- §3 merge and unmerge


def _rows(weight, adapters, scale, q="q", k=None, v="v", transpose=False, sign=1.0):
    C = weight.shape[1]
    out = weight.clone()
    for block, which in enumerate((q, k, v)):
        if which is not None:
            A, B = adapters[which]
            d = scale * (B @ A)
            out[block * C:(block + 1) * C] += sign * (d.T if transpose else d)
    return out


def merge_ok(weight, adapters, scale):
    return _rows(weight, adapters, scale)


def unmerge_ok(merged, adapters, scale):
    return _rows(merged, adapters, scale, sign=-1.0)


def merge_by_cat(weight, adapters, scale):  # alternative: the (3C, C) delta built with torch.cat, then added
    (A_q, B_q), (A_v, B_v) = adapters["q"], adapters["v"]
    return weight + scale * torch.cat([B_q @ A_q, torch.zeros_like(B_q @ A_q), B_v @ A_v])


def unmerge_by_cat(merged, adapters, scale):
    return 2 * merged - merge_by_cat(merged, adapters, scale)


def merge_in_place(weight, adapters, scale):
    weight[:] = _rows(weight, adapters, scale)
    return weight


MERGE_MISTAKES = [
    (stub, unmerge_ok, NOT_YET),
    (merge_ok, stub, NOT_YET),
    (lambda w, a, s: _rows(w, a, 1.0), unmerge_ok,
     "merge adds B @ A without the scale: the adapter's output is scale * x~ @ A.T @ B.T, so the weight gains "
     "scale * B @ A"),
    (lambda w, a, s: _rows(w, a, s, transpose=True), unmerge_ok,
     "the delta is transposed: nn.Linear's weight is (out, in), and scale * B @ A is (out, in) already; (B @ A).T is "
     "the layout of transformers' Conv1D"),
    (lambda w, a, s: _rows(w, a, s, k="v", v=None), unmerge_ok,
     "v's delta is in the k rows: the weight's rows are [q | k | v] (the output's columns), so v's are [2C:3C)"),
    (lambda w, a, s: _rows(w, a, s, q="v", v="q"), unmerge_ok,
     "q and v are swapped: q's delta goes to rows [0:C), v's to rows [2C:3C)"),
    (lambda w, a, s: _rows(w, a, s) - w, unmerge_ok, "only the delta is returned: the merged weight is W0 + delta"),
    (lambda w, a, s: _rows(w, a, s, sign=-1.0), unmerge_ok,
     "the delta is subtracted: merge adds it, W0 + scale * B @ A"),
    (merge_in_place, unmerge_ok,
     "you modified weight in place: return a new tensor (W0 + delta): the caller keeps W0 (the library keeps a copy "
     "so that unmerge gives it back)"),
    (lambda w, a, s: None, unmerge_ok, "merge returned None: did you forget to `return`?"),
    (merge_ok, lambda m, a, s: _rows(m, a, s), "unmerge adds the delta again: subtract scale * B @ A from the rows "
                                               "merge changed"),
    (merge_ok, lambda m, a, s: _rows(m, a, 1.0, sign=-1.0),
     "unmerge subtracts B @ A without the scale: merge added scale * B @ A, so subtract exactly that"),
    (merge_ok, lambda m, a, s: m.clone(),
     "unmerge returns the merged weight unchanged: subtract scale * B @ A from the q and v rows"),
    (merge_ok, lambda m, a, s: _rows(m, a, s, transpose=True, sign=-1.0),
     "unmerge subtracts the transposed delta: subtract scale * B @ A itself, as merge added it"),
    (merge_ok, lambda m, a, s: _rows(m, a, s, k="v", v=None, sign=-1.0),
     "unmerge subtracts v's delta from the k rows: v's rows are [2C:3C)"),
    (merge_ok, lambda m, a, s: m.sub_(_rows(m, a, s) - m),
     "you modified merged in place: return a new tensor (merged - delta)"),
    (merge_ok, lambda m, a, s: None, "unmerge returned None: did you forget to `return`?"),
    (lambda w, a, s: w + s * a["q"][1] @ a["q"][0], unmerge_ok,
     "weight is (3C, C) = (18, 6), (out, in); a block's delta is scale * B @ A, (C, C); your code raised "
     "RuntimeError: The size of tensor a (18) must match…"),
]


@pytest.mark.parametrize("merge, unmerge, message", MERGE_MISTAKES,
                         ids=[f"merge-{i}" for i in range(len(MERGE_MISTAKES))])
def test_each_merge_mistake_gets_its_line(merge, unmerge, message):
    assert_mistake_line(check.merge_qv(merge, unmerge), "merge_qv", message)


@pytest.mark.parametrize("merge, unmerge", [(merge_ok, unmerge_ok), (merge_by_cat, unmerge_by_cat)],
                         ids=["slices", "cat"])
def test_correct_merges_pass(merge, unmerge):
    assert_passes(check.merge_qv(merge, unmerge), "merge_qv")


def test_the_library_merge_passes_the_merge_check():
    """gpt2lab.lora's merge on a (3C, C) layer with q,v pairs gives the weight the check expects."""

    def merge(weight, adapters, scale):
        C = weight.shape[1]
        layer = lora.LoRALinear(nn.Linear(C, 3 * C), {"q": slice(0, C), "v": slice(2 * C, 3 * C)}, 2)
        with torch.no_grad():
            layer.weight.copy_(weight)
            for key, (A, B) in adapters.items():
                layer.lora_A[key].copy_(A)
                layer.lora_B[key].copy_(B)
        layer.scale = scale
        layer.merge()
        return layer.weight.detach().clone()

    assert_passes(check.merge_qv(merge, unmerge_ok), "merge_qv")
