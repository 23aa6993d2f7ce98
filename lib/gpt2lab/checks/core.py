"""The machinery behind every check cell: a result that prints as one line, and a strict tensor comparison.

Used by the check modules of every notebook (00 welcome onward). ✓ says what passed; ✗ says which element
differs, expected vs got, and the max abs difference; a stub that still raises NotImplementedError reads
"not implemented yet". ✓ lines never print machine-dependent floats, so nbval can compare them across machines.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sysconfig
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CheckResult:
    """passed + one line of feedback; displays as that line in a notebook and is truthy when passed."""

    name: str
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return f"{'✓' if self.passed else '✗'} {self.name}: {self.message}"

    __repr__ = __str__

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython display: the bare line
        printer.text(str(self))


def ok(name: str, message: str) -> CheckResult:
    return CheckResult(name, True, message)


def fail(name: str, message: str) -> CheckResult:
    return CheckResult(name, False, message)


def check(name: str) -> Callable:
    """Decorator for a check function returning a CheckResult (or a message string for ✓).

    Turns NotImplementedError into "not implemented yet" and any other exception raised by the student's code
    into a ✗ line naming it, so a check cell never shows a traceback for an unfinished exercise.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs) -> CheckResult:
            try:
                result = fn(*args, **kwargs)
            except NotImplementedError:
                return fail(name, "not implemented yet (replace `raise NotImplementedError()` with your code)")
            except _Mismatch as err:
                return fail(name, str(err))
            except Exception as err:  # the student's code raised: say what, and where in their code
                frame = _last_user_frame(err)
                return fail(name, f"your code raised {type(err).__name__}: {err}{frame}")
            return result if isinstance(result, CheckResult) else ok(name, str(result))

        return run

    return wrap


class _Mismatch(AssertionError):
    """Raised inside a check by `expect`/`compare(..., raise_=True)`; becomes the ✗ line."""


def expect(condition: bool, message: str) -> None:
    """Inside a @check function: stop with ✗ `message` when `condition` is false."""
    if not condition:
        raise _Mismatch(message)


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # lib/gpt2lab: frames here are ours, not the student's
# Python's own library (e.g. functools, contextlib): never the student's either
_STDLIB_DIRS = tuple({str(Path(sysconfig.get_paths()[key]).resolve()) for key in ("stdlib", "platstdlib")})


def _torch_dir() -> str:
    import torch

    return str(Path(torch.__file__).resolve().parent)


def _is_student_file(filename: str) -> bool:
    """True for the student's code (a notebook cell, a test, a script); False for frames of ours (lib/gpt2lab), of an
    installed library (torch, anything under site-/dist-packages) or of Python's standard library."""
    if filename.startswith("<") and not filename.startswith("<ipython-input"):
        return False  # <frozen importlib...>, <string>: generated code, no line to show
    path = str(Path(filename).resolve()) if not filename.startswith("<") else filename
    if path.startswith(_PACKAGE_DIR) or "-packages" in path or path.startswith(_torch_dir()):
        return False
    return not any(path.startswith(d) for d in _STDLIB_DIRS)


def _own_code(answer) -> set:
    """The code objects of the answer itself: the function, or every method the class defines."""
    members = vars(answer).values() if inspect.isclass(answer) else [answer]
    codes = set()
    for member in members:
        member = getattr(member, "__func__", member)  # staticmethod / classmethod
        code = getattr(inspect.unwrap(member), "__code__", None) if callable(member) else None
        if code is not None:
            codes.add(code)
    return codes


@contextlib.contextmanager
def earlier_stubs(answer):
    """Around a check whose answer calls earlier exercises (e.g. self_attention calls split_heads; MyAdamW calls
    adamw_step): a NotImplementedError raised in one of those becomes a ✗ naming it, instead of claiming that this
    exercise is not implemented. The answer's own stub still reads "not implemented yet" as usual."""
    try:
        yield
    except NotImplementedError as err:
        tb, raiser = err.__traceback__, None
        while tb is not None:  # the innermost frame of the student's code (not ours, not a library's)
            if _is_student_file(tb.tb_frame.f_code.co_filename):
                raiser = tb.tb_frame.f_code
            tb = tb.tb_next
        if raiser is not None and raiser not in _own_code(answer) and not raiser.co_name.startswith("<"):
            expect(False, f"not implemented yet: {raiser.co_name} (an earlier exercise, which this one calls: "
                          "finish it first)")
        raise


def _last_user_frame(err: BaseException) -> str:
    """" (line N: the line)" of the innermost frame of the student's own code in err's traceback, "" if none.

    An error raised deep inside torch (a shape mismatch in nn.Linear) is cited at the student's line that called
    torch, never at `return forward_call(...)` in torch's module machinery.
    """
    frames = [f for f in traceback.extract_tb(err.__traceback__) if _is_student_file(f.filename)]
    if not frames:
        return ""
    f = frames[-1]
    return f" (line {f.lineno}: {f.line.strip()})" if f.line else f" (line {f.lineno} of {Path(f.filename).name})"


def gradients(output, params: dict) -> dict:
    """Backpropagate a fixed random projection of `output` (any tensor the exercise returns) to `params`
    ({name: tensor}); return {name: gradient, or None where none arrives}.

    A check whose exercise is trained runs it with gradients on and compares these with the reference's
    (`compare_gradients`): an answer built from `.data`, `.detach()` or under `torch.no_grad()` gives the right
    numbers but trains nothing. The projection (seeded, so the same for the student's run and the reference's) makes
    every output element matter, unlike `.sum()`, whose gradient is blind to, e.g., a permutation of the output.
    Used by the checks of notebook 02 (embed, block_forward, logits_from_hidden).
    """
    import torch

    names = list(params)
    if not isinstance(output, torch.Tensor) or not output.requires_grad:
        return dict.fromkeys(names)
    weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(0), dtype=output.dtype)
    grads = torch.autograd.grad((output * weight.to(output.device)).sum(), [params[n] for n in names],
                                allow_unused=True, retain_graph=True)  # the reference's run may share the inputs' graph
    return dict(zip(names, grads))


def compare_gradients(got: dict, expected: dict, atol: float = 1e-5) -> str:
    """Compare `gradients(...)` of the student's output with the reference's; ✗ names the first parameter whose
    gradient is missing ("did you use .data or .detach()?") or differs (element, expected vs got). Notebook 02."""
    for name, exp in expected.items():
        if exp is None:
            continue
        expect(got.get(name) is not None, f"no gradient reaches {name}: training would never update it (did you use "
                                          f"`.data`, `.detach()` or `torch.no_grad()`?)")  # fmt: skip
        compare(f"gradient of {name}", got[name], exp, atol=atol)
    return f"gradients of {', '.join(n for n, e in expected.items() if e is not None)} match"


def _close(got, expected, atol: float) -> bool:
    """Same shape and values within atol (NaN where the other has NaN); False for anything that is not a tensor of
    that shape (None, a tuple, ...). Only recognises a known answer, right or wrong: `compare` gives the ✗ line."""
    import torch

    try:
        got, expected = torch.as_tensor(got).detach(), torch.as_tensor(expected).detach()
    except Exception:
        return False
    if got.shape != expected.shape:
        return False
    if not (got.is_floating_point() and expected.is_floating_point()):
        return bool(torch.equal(got, expected))
    return bool(torch.allclose(got.double().cpu(), expected.double().cpu(), rtol=0.0, atol=atol, equal_nan=True))


def known_mistake(got, expected, atol: float = 1e-5, mistakes=()) -> None:
    """When `got` is a wrong tensor and equals what a known mistake produces, stop with that mistake's hint.

    mistakes: (hint, output) pairs (or a {hint: output} dict's items()), output a tensor or a function computing it
    (only called on a mismatch). The first hint whose output matches `got` (within atol) and differs from `expected`
    wins; otherwise nothing happens, and the caller's `compare` gives the generic line. Used where other comparisons
    come between the hints and the final one (notebook 01's causal mask, notebook 04's cloze loss).
    """
    import torch

    if isinstance(got, torch.Tensor) and not _close(got, expected, atol):
        for hint, output in mistakes:
            output = output() if callable(output) else output
            if _close(got, output, atol) and not _close(output, expected, atol):
                raise _Mismatch(hint)


def compare_with_hints(what: str, got, expected, atol: float = 1e-5, mistakes=()) -> str:
    """`compare`, but when `got` is wrong and equals what a known mistake produces, the ✗ line is that mistake's hint
    (`known_mistake`), e.g. ("hidden has already been through ln_f: ...", lambda: model.head(model.transformer.ln_f(
    hidden))). Used by the checks of notebooks 01-03 (post-LN block, erf GELU, ln_f applied twice, unscattered top-p,
    an unscaled score, a swapped moment, ...).
    """
    known_mistake(got, expected, atol, mistakes)
    return compare(what, got, expected, atol=atol)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def compare(what: str, got, expected, atol: float = 1e-5, rtol: float = 0.0) -> str:
    """Compare a tensor (or array/number) with the reference; return a ✓ message or raise the ✗ line.

    Checks type, shape, NaN/inf, then values; on a mismatch names the first worst element, expected vs got and
    the max abs difference, e.g. "scores[0, 2, 1]: expected 0.25, got 0.5 (max |diff| 0.25, atol 1e-05)".
    """
    import torch

    if got is None:
        raise _Mismatch(f"{what} is None: did you forget to `return` it?")
    if isinstance(got, tuple) and any(isinstance(g, torch.Tensor) for g in got):
        raise _Mismatch(f"{what} is a tuple of {len(got)} items: return just the one tensor")
    try:
        got_t = torch.as_tensor(got)
    except Exception as err:
        raise _Mismatch(f"{what} should be a tensor, got {type(got).__name__}") from err
    exp_t = torch.as_tensor(expected)
    if tuple(got_t.shape) != tuple(exp_t.shape):
        raise _Mismatch(f"{what} has shape {tuple(got_t.shape)}, expected {tuple(exp_t.shape)}")
    if exp_t.is_floating_point() and not (got_t.is_floating_point() or got_t.is_complex()):
        raise _Mismatch(f"{what} has dtype {got_t.dtype}, expected floating point ({exp_t.dtype}): an integer or "
                        "boolean result has lost the values")  # fmt: skip
    if exp_t.dtype not in (torch.bool,) and not exp_t.is_floating_point() and got_t.is_floating_point():
        raise _Mismatch(f"{what} has dtype {got_t.dtype}, expected integers ({exp_t.dtype}), e.g. token ids")
    if exp_t.dtype == torch.bool or not exp_t.is_floating_point():
        equal = torch.equal(got_t.to(exp_t.dtype), exp_t)
        if not equal:
            bad = (got_t.to(exp_t.dtype) != exp_t).nonzero()[0].tolist()
            idx = ", ".join(map(str, bad))
            raise _Mismatch(f"{what}[{idx}]: expected {exp_t[tuple(bad)].item()}, got {got_t[tuple(bad)].item()}")
        return f"{what} matches exactly ({exp_t.numel()} values)"
    got_f, exp_f = got_t.detach().double().cpu(), exp_t.detach().double().cpu()
    finite_expected = torch.isfinite(exp_f)
    if not torch.equal(torch.isfinite(got_f), finite_expected):
        bad = (torch.isfinite(got_f) != finite_expected).nonzero()[0].tolist()
        idx = ", ".join(map(str, bad))
        raise _Mismatch(f"{what}[{idx}]: expected {exp_f[tuple(bad)].item()}, got {got_f[tuple(bad)].item()}")
    diff = torch.where(finite_expected, (got_f - exp_f).abs(), torch.zeros_like(got_f))
    # infinities (e.g. -inf in masked scores) must agree in sign
    inf_mismatch = ~finite_expected & (got_f != exp_f)
    if inf_mismatch.any():
        bad = inf_mismatch.nonzero()[0].tolist()
        idx = ", ".join(map(str, bad))
        raise _Mismatch(f"{what}[{idx}]: expected {exp_f[tuple(bad)].item()}, got {got_f[tuple(bad)].item()}")
    tolerance = atol + rtol * exp_f.abs()
    if diff.numel() and (diff > tolerance).any():
        worst = int(torch.argmax(diff - tolerance))
        bad = list(torch.unravel_index(torch.tensor(worst), diff.shape)) if diff.dim() else []
        bad = [int(i) for i in bad]
        idx = f"[{', '.join(map(str, bad))}]" if bad else ""
        raise _Mismatch(
            f"{what}{idx}: expected {_fmt(exp_f[tuple(bad)].item())}, got {_fmt(got_f[tuple(bad)].item())} "
            f"(max |diff| {_fmt(diff.max().item())}, atol {atol:g})"
        )
    return f"{what} matches the reference ({exp_t.numel()} values within {atol:g})"


@contextlib.contextmanager
def untouched(hint: str = "", **tensors):
    """Around a call of the student's function, given the real input tensors (not clones): ✗ "you modified NAME in
    place" when one of them changed, so a write into the caller's batch or state cannot pass unseen. `hint` says
    what to do instead, e.g. "use masked_fill (not masked_fill_) or work on a clone". Used by the checks of
    notebooks 01, 03 and 04."""
    before = {name: t.detach().clone() for name, t in tensors.items()}
    yield
    for name, t in tensors.items():
        same = t.shape == before[name].shape and bool((t.detach() == before[name]).all())
        expect(same, f"you modified {name} in place{': ' + hint if hint else ''}")


def returned_pair(got, what: str) -> tuple:
    """✗ "return a pair (WHAT), got TYPE" unless the student's function returned two things; the pair as a tuple.
    Used by the checks of notebooks 03, 07 and 08."""
    expect(isinstance(got, tuple | list) and len(got) == 2, f"return a pair ({what}), got {type(got).__name__}")
    return tuple(got)


def new_tensors(what: str, **tensors):
    """`untouched` for an exercise that must return new tensors (WHAT) and leave the caller's as they were.
    Used by the checks of notebooks 07 and 08."""
    return untouched(f"return new tensors ({what}); the caller's tensors must stay as they were", **tensors)
