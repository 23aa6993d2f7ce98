"""Checks for notebook 00 (welcome): the two warm-up exercises."""

from __future__ import annotations

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


@check("tokens_per_line")
def tokens_per_line(fn, tokenizer=None):
    """fn(text, tokenizer) -> list of token counts, one per line (the empty line counts 0)."""
    tokenizer = tokenizer or load()
    got = fn(SAMPLE, tokenizer)
    expect(isinstance(got, list | tuple), f"return a list of ints, got {type(got).__name__}")
    expected = reference_tokens_per_line(SAMPLE, tokenizer)
    expect(len(got) == len(expected), f"got {len(got)} counts for {len(expected)} lines (split on '\\n')")
    compare("token counts per line", list(got), expected)
    return f"token counts match on all {len(expected)} lines, the empty and indented ones included"


@check("duplicate_rate")
def duplicate_rate(fn):
    """fn(pairs) -> fraction of pairs labelled 1."""
    rng = random.Random(0)
    for n in (1, 7, 400):
        pairs = [QuoraPair(str(i), "a?", "b?", rng.choice((0, 0, 1))) for i in range(n)]
        got = fn(pairs)
        expect(isinstance(got, int | float), f"return a number, got {type(got).__name__}")
        compare(f"duplicate rate of {n} pairs", float(got), reference_duplicate_rate(pairs), atol=1e-12)
    return "the rate matches on 1, 7 and 400 pairs"
