"""One-line ✓/✗ feedback for the exercises, one module per notebook.

A notebook does `from gpt2lab.checks import welcome as check` and, after an exercise, `check.tokens_per_line(fn)`.
The shared machinery (result type, tensor comparison, "not implemented yet") is in `core`.
"""

from .core import CheckResult, check, compare, expect, fail, ok

__all__ = ["CheckResult", "check", "compare", "expect", "fail", "ok"]
