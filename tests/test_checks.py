"""The check-cell machinery and the notebook 00 checks: each passes on the reference, fails on a stub and on a bug."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2lab import data
from gpt2lab.checks import check, compare, expect
from gpt2lab.checks import welcome as welcome_checks


@check("demo")
def _tensor_check(got, expected, atol=1e-5):
    return compare("y", got, expected, atol=atol)


def test_pass_line_has_no_machine_dependent_numbers():
    result = _tensor_check(torch.ones(2, 3) + 1e-7, torch.ones(2, 3))
    assert result.passed and bool(result)
    assert str(result) == "✓ demo: y matches the reference (6 values within 1e-05)"


def test_failure_names_element_expected_got_and_max_diff():
    got = torch.zeros(2, 3, 4)
    got[1, 2, 3] = 0.5
    result = _tensor_check(got, torch.zeros(2, 3, 4))
    assert not result.passed
    assert str(result) == "✗ demo: y[1, 2, 3]: expected 0, got 0.5 (max |diff| 0.5, atol 1e-05)"


@pytest.mark.parametrize(
    "got, expected, message",
    [
        (torch.ones(3), torch.ones(2, 3), "y has shape (3,), expected (2, 3)"),
        (None, torch.ones(1), "y is None: did you forget to `return` it?"),
        (torch.tensor([1.0, math.nan]), torch.tensor([1.0, 2.0]), "y[1]: expected 2.0, got nan"),
        (torch.tensor([0.0, -math.inf]), torch.tensor([0.0, math.inf]), "y[1]: expected inf, got -inf"),
        (torch.tensor([1, 2, 4]), torch.tensor([1, 2, 3]), "y[2]: expected 3, got 4"),
        (torch.tensor([True, False]), torch.tensor([True, True]), "y[1]: expected True, got False"),
        ("text", torch.ones(1), "y should be a tensor, got str"),
    ],
)
def test_failure_messages(got, expected, message):
    result = _tensor_check(got, expected)
    assert not result.passed and str(result) == f"✗ demo: {message}"


def test_masked_infinities_compare_equal():
    scores = torch.tensor([[0.5, -math.inf], [0.1, 0.2]])
    assert _tensor_check(scores.clone(), scores).passed


def test_stub_and_exceptions_become_one_line():
    @check("stub")
    def stubbed():
        raise NotImplementedError()

    @check("crash")
    def crashing():
        return [1, 2][5]

    @check("expectation")
    def expecting():
        expect(False, "return a list")

    assert str(stubbed()) == "✗ stub: not implemented yet (replace `raise NotImplementedError()` with your code)"
    assert str(crashing()).startswith("✗ crash: your code raised IndexError: list index out of range")
    assert str(expecting()) == "✗ expectation: return a list"


# ----------------------------------------------------------------------------- notebook 00 checks


def stub(*args):
    raise NotImplementedError()


def test_duplicate_rate_check():
    assert welcome_checks.duplicate_rate(data.duplicate_rate).passed
    assert "not implemented yet" in str(welcome_checks.duplicate_rate(stub))
    off_by_one = lambda pairs: sum(p.label for p in pairs) / (len(pairs) + 1)
    assert not welcome_checks.duplicate_rate(off_by_one).passed
    assert not welcome_checks.duplicate_rate(lambda pairs: 1 - data.duplicate_rate(pairs)).passed  # counts the 0s
    assert "return a number" in str(welcome_checks.duplicate_rate(lambda pairs: "0.4"))


def test_tokens_per_line_check(tokenizer):
    from gpt2lab.tokenizer import tokens_per_line

    assert welcome_checks.tokens_per_line(tokens_per_line, tokenizer).passed
    assert "not implemented yet" in str(welcome_checks.tokens_per_line(stub, tokenizer))
    words = lambda text, tok: [len(line.split()) for line in text.split("\n")]
    skips_empty = lambda text, tok: [len(tok.encode(line)) for line in text.split("\n") if line]
    strips = lambda text, tok: [len(tok.encode(line.strip())) for line in text.split("\n")]
    assert "line[0]: expected 11, got 8" in str(welcome_checks.tokens_per_line(words, tokenizer))
    assert "got 4 counts for 5 lines" in str(welcome_checks.tokens_per_line(skips_empty, tokenizer))
    assert "line[3]" in str(welcome_checks.tokens_per_line(strips, tokenizer))


def test_crash_line_points_at_the_students_line():
    def student(x):
        return x.no_such_attribute

    @check("crash")
    def run():
        return student(1)

    message = str(run())
    assert "AttributeError" in message and "(line" in message and "return x.no_such_attribute" in message
