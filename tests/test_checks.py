"""The check-cell machinery and the notebook 00 checks: each passes on the reference, fails on a stub and on a bug."""

from __future__ import annotations

import math

import pytest
import torch
from check_helpers import NOT_YET, assert_mistake_line, stub

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


def _count(pairs):
    return sum(p.label for p in pairs)


def _sorts_in_place(pairs):
    pairs.sort(key=lambda p: p.label)
    return _count(pairs) / len(pairs)


DUPLICATE_RATE_MISTAKES = {  # planted mistake -> the exact ✗ line
    "count": (_count, "1 is the number of paraphrases: divide by the number of pairs, len(pairs)"),
    "counts the 0s": (lambda pairs: 1 - data.duplicate_rate(pairs),
                      "that is the fraction of 0s (different questions): count the pairs labelled 1"),
    "percentage": (lambda pairs: 100 * data.duplicate_rate(pairs),
                   "that is a percentage: return a fraction between 0 and 1"),
    "integer division": (lambda pairs: _count(pairs) // len(pairs), "integer division (//) drops the fraction: use /"),
    "off by one": (lambda pairs: _count(pairs) / (len(pairs) + 1),
                   "duplicate rate of 7 pairs: expected 0.142857, got 0.125 (max |diff| 0.0178571, atol 1e-12)"),
    "string": (lambda pairs: "0.4", "return a number, got str"),
    "tensor": (lambda pairs: torch.tensor([float(p.label) for p in pairs]).mean(),
               "return a plain number (e.g. `.item()`), got a Tensor"),
    "sorts in place": (_sorts_in_place, "you modified the list of pairs (sorted, filtered or popped it in place): "
                                        "count without changing it"),
    "no return": (lambda pairs: None, "duplicate_rate returned None: did you forget to `return`?"),
}  # fmt: skip


def test_duplicate_rate_check_passes_reference_and_alternatives():
    import statistics

    import numpy as np

    assert str(welcome_checks.duplicate_rate(data.duplicate_rate)) == "✓ duplicate_rate: the rate matches on 1, 7 " \
                                                                     "and 400 pairs"  # fmt: skip
    for alternative in (lambda pairs: np.mean([p.label for p in pairs]),
                        lambda pairs: statistics.mean(p.label for p in pairs),
                        lambda pairs: sum(p.label == 1 for p in pairs) / len(pairs)):  # fmt: skip
        assert welcome_checks.duplicate_rate(alternative).passed
    assert_mistake_line(welcome_checks.duplicate_rate(stub), "duplicate_rate", NOT_YET)


@pytest.mark.parametrize("mistake", list(DUPLICATE_RATE_MISTAKES))
def test_duplicate_rate_check_names_each_mistake(mistake):
    fn, message = DUPLICATE_RATE_MISTAKES[mistake]
    assert_mistake_line(welcome_checks.duplicate_rate(fn), "duplicate_rate", message)


TOKENS_PER_LINE_MISTAKES = {  # planted mistake -> the exact ✗ line
    "words": (lambda text, tok: [len(line.split()) for line in text.split("\n")],
              "those are word counts (str.split): count tokens, len(tokenizer.encode(line))"),
    "characters": (lambda text, tok: [len(line) for line in text.split("\n")],
                   "those are character counts: count tokens, len(tokenizer.encode(line))"),
    "skips the empty line": (lambda text, tok: [len(tok.encode(line)) for line in text.split("\n") if line],
                             "the empty line is missing: it counts 0, keep it (one count per line)"),
    "strips": (lambda text, tok: [len(tok.encode(line.strip())) for line in text.split("\n")],
               "keep the indentation: encode each line as it is, without .strip()"),
    "counts the newline": (lambda text, tok: [len(tok.encode(line + "\n")) for line in text.split("\n")],
                           "don't count the newline: split on '\\n' and encode the line without it"),
    "token lists": (lambda text, tok: [tok.encode(line) for line in text.split("\n")],
                    "that is a list of token lists: return how many tokens each line has, len(...) of each"),
    "generator": (lambda text, tok: (len(tok.encode(line)) for line in text.split("\n")),
                  "return a list of ints, got generator"),
    "no return": (lambda text, tok: None, "tokens_per_line returned None: did you forget to `return`?"),
}  # fmt: skip


def test_tokens_per_line_check_passes_reference_and_alternatives(tokenizer):
    from gpt2lab.tokenizer import tokens_per_line

    assert welcome_checks.tokens_per_line(tokens_per_line, tokenizer).passed
    assert welcome_checks.tokens_per_line(lambda text, tok: [len(tok.tokens(line)) for line in text.splitlines()],
                                          tokenizer).passed  # fmt: skip
    assert_mistake_line(welcome_checks.tokens_per_line(stub, tokenizer), "tokens_per_line", NOT_YET)


@pytest.mark.parametrize("mistake", list(TOKENS_PER_LINE_MISTAKES))
def test_tokens_per_line_check_names_each_mistake(mistake, tokenizer):
    fn, message = TOKENS_PER_LINE_MISTAKES[mistake]
    assert_mistake_line(welcome_checks.tokens_per_line(fn, tokenizer), "tokens_per_line", message)


def test_crash_line_points_at_the_students_line():
    def student(x):
        return x.no_such_attribute

    @check("crash")
    def run():
        return student(1)

    message = str(run())
    assert "AttributeError" in message and "(line" in message and "return x.no_such_attribute" in message


def test_crash_inside_torch_names_the_students_line_not_torchs():
    """A shape error raised deep inside an nn.Module (torch's `return forward_call(...)`, F.linear) is cited at the
    student's own line that called the module."""
    layer = torch.nn.Linear(4, 3)

    def student(x):
        hidden = x.transpose(0, 1)
        return layer(hidden)  # the student's line: (4, 2) is fine, but (2, 5) -> layer fails inside torch

    @check("crash")
    def run():
        return student(torch.ones(5, 2))

    message = str(run())
    assert message.startswith("✗ crash: your code raised RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    cited = message.rsplit("(line ", 1)[1]
    assert cited.split(": ", 1)[1].startswith("return layer(hidden)"), message
    assert "forward_call" not in message


def test_compare_names_tuple_and_dtype_mistakes():
    result = _tensor_check((torch.ones(2), torch.ones(2)), torch.ones(2))
    assert str(result) == "✗ demo: y is a tuple of 2 items: return just the one tensor"
    result = _tensor_check(torch.ones(2, dtype=torch.long), torch.ones(2))
    assert str(result).startswith("✗ demo: y has dtype torch.int64, expected floating point (torch.float32)")
    result = _tensor_check(torch.ones(2), torch.ones(2, dtype=torch.long))
    assert str(result) == "✗ demo: y has dtype torch.float32, expected integers (torch.int64), e.g. token ids"


def test_gradients_helpers_name_a_missing_gradient():
    from gpt2lab.checks import compare_gradients, gradients

    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(2, 3)
    params = {"w": w}

    @check("grad")
    def run(out):
        return compare_gradients(gradients(out, params), gradients(x @ w, params))

    assert run(x @ w).passed
    assert str(run(x @ w.data)).startswith("✗ grad: no gradient reaches w: training would never update it")
    assert str(run(x @ (2 * w))).startswith("✗ grad: gradient of w[")
