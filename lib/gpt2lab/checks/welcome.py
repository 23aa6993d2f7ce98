"""Checks for notebook 00 (welcome): the two warm-up exercises, `duplicate_rate` and `tokens_per_line`.

Usage in the notebook: `from gpt2lab.checks import welcome as check`, then `check.duplicate_rate(duplicate_rate)`.
Each known mistake (counting the 0s, a count instead of a fraction, a percentage, word or character counts, a
dropped empty line, stripped indentation, ...) gets its own ✗ hint; the inputs are checked for mutation.
"""

from __future__ import annotations

import numbers
import random

from ..data import QuoraPair
from ..data import duplicate_rate as reference_duplicate_rate
from ..tokenizer import load
from ..tokenizer import tokens_per_line as reference_tokens_per_line
from .core import check, compare, expect

# Two quatrains (Sonnet 18, public domain) plus an empty line and an indented couplet-style line.
SAMPLE = (
    "Shall I compare thee to a summer's day?\n"
    "Thou art more lovely and more temperate:\n"
    "\n"
    "  So long as men can breathe or eyes can see,\n"
    "  So long lives this, and this gives life to thee."
)


def _pairs(n: int, seed: int) -> list[QuoraPair]:
    rng = random.Random(seed)
    return [QuoraPair(str(i), "a?", "b?", rng.choice((0, 0, 1))) for i in range(n)]


@check("duplicate_rate")
def duplicate_rate(fn):
    """fn(pairs) -> fraction of pairs labelled 1, on 1, 7 and 400 pairs (the 7 with a rate that is not a whole
    number, so integer division shows); the list must come back as it was given."""
    for n in (1, 7, 400):
        pairs = _pairs(n, seed=0)
        before = list(pairs)
        got = fn(pairs)
        expect(pairs == before, "you modified the list of pairs (sorted, filtered or popped it in place): count "
                                "without changing it")  # fmt: skip
        expect(got is not None, "duplicate_rate returned None: did you forget to `return`?")
        if hasattr(got, "item") and getattr(got, "ndim", 1) == 0 and not isinstance(got, numbers.Number):
            expect(False, f"return a plain number (e.g. `.item()`), got a {type(got).__name__}")
        expect(isinstance(got, numbers.Real) and not isinstance(got, bool),
               f"return a number, got {type(got).__name__}")  # fmt: skip
        expected = reference_duplicate_rate(pairs)
        ones, zeros = sum(p.label for p in pairs), sum(1 - p.label for p in pairs)
        if abs(got - expected) > 1e-12:
            hints = [
                (ones, f"{got} is the number of paraphrases: divide by the number of pairs, len(pairs)"),
                (1 - expected, "that is the fraction of 0s (different questions): count the pairs labelled 1"),
                (100 * expected, "that is a percentage: return a fraction between 0 and 1"),
                (ones // n, "integer division (//) drops the fraction: use /"),
                (zeros, f"{got} is the number of 0s: count the pairs labelled 1 and divide by len(pairs)"),
            ]
            for value, hint in hints:
                expect(abs(got - value) > 1e-12, hint)
        compare(f"duplicate rate of {n} pairs", float(got), expected, atol=1e-12)
    return "the rate matches on 1, 7 and 400 pairs"


@check("tokens_per_line")
def tokens_per_line(fn, tokenizer=None):
    """fn(text, tokenizer) -> list of token counts, one per line (the empty line counts 0, indentation counts)."""
    tokenizer = tokenizer or load()
    got = fn(SAMPLE, tokenizer)
    expect(got is not None, "tokens_per_line returned None: did you forget to `return`?")
    expect(isinstance(got, list | tuple), f"return a list of ints, got {type(got).__name__}")
    lines = SAMPLE.split("\n")
    expected = reference_tokens_per_line(SAMPLE, tokenizer)
    if got and all(isinstance(g, list | tuple) for g in got):
        expect(False, "that is a list of token lists: return how many tokens each line has, len(...) of each")
    if list(got) != expected:
        hints = [
            ([len(line.split()) for line in lines], "those are word counts (str.split): count tokens, "
                                                    "len(tokenizer.encode(line))"),
            ([len(line) for line in lines], "those are character counts: count tokens, len(tokenizer.encode(line))"),
            ([n for n, line in zip(expected, lines) if line], "the empty line is missing: it counts 0, keep it "
                                                              "(one count per line)"),
            ([len(tokenizer.encode(line.strip())) for line in lines], "keep the indentation: encode each line as "
                                                                      "it is, without .strip()"),
            ([len(tokenizer.encode(line + "\n")) for line in lines], "don't count the newline: split on '\\n' and "
                                                                     "encode the line without it"),
        ]  # fmt: skip
        for value, hint in hints:
            expect(list(got) != value, hint)
    expect(len(got) == len(expected), f"got {len(got)} counts for {len(expected)} lines (split on '\\n')")
    compare("token counts per line", list(got), expected)
    return f"token counts match on all {len(expected)} lines, the empty and indented ones included"
