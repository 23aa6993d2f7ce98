"""gpt2lab.metrics against sacrebleu (chrF) and hand-computed confusion counts (accuracy, F1)."""

from __future__ import annotations

import pytest
import torch
from sacrebleu.metrics import CHRF

from gpt2lab import metrics

HYPS = ["the cat sat on the mat", "Shall I compare thee to a summer's day?", "hello"]
REFS = ["the cat is on the mat", "Shall I compare thee to a summers day", "hello there, world"]


def test_chrf_equals_sacrebleu_corpus_score():
    expected = CHRF().corpus_score(HYPS, [REFS]).score
    assert metrics.chrf(HYPS, REFS) == pytest.approx(expected, abs=1e-12)
    # corpus-level, not the mean of sentence scores (the two differ on this corpus)
    sentence_mean = sum(CHRF().sentence_score(h, [r]).score for h, r in zip(HYPS, REFS)) / len(HYPS)
    assert abs(metrics.chrf(HYPS, REFS) - sentence_mean) > 1e-3


def test_chrf_known_values():
    assert metrics.chrf(["identical text"], ["identical text"]) == pytest.approx(100.0)
    assert metrics.chrf(["xyz"], ["abc"]) == pytest.approx(0.0)
    assert metrics.chrf(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(
        CHRF().sentence_score("the cat sat on the mat", ["the cat is on the mat"]).score
    )
    assert isinstance(metrics.chrf(HYPS, REFS), float)


@pytest.mark.parametrize(
    "hyps, refs, match",
    [
        (["a", "b"], ["a"], "one reference per hypothesis"),
        ([], [], "at least one"),
        ([[1, 2]], ["a"], "expected a str"),
    ],
)
def test_chrf_bad_input(hyps, refs, match):
    with pytest.raises((ValueError, TypeError), match=match) as err:
        metrics.chrf(hyps, refs)
    assert "\n" not in str(err.value)


PRED = [1, 0, 1, 1, 0, 0, 1, 0]
GOLD = [1, 0, 0, 1, 1, 0, 1, 1]
# by hand: TP = 3 (0, 3, 6), TN = 2 (1, 5), FP = 1 (2), FN = 2 (4, 7)


def test_confusion_matrix_by_hand():
    assert metrics.confusion_matrix(PRED, GOLD) == [[2, 1], [2, 3]]


def test_accuracy_and_f1_by_hand():
    assert metrics.accuracy(PRED, GOLD) == pytest.approx(5 / 8)
    precision, recall = 3 / 4, 3 / 5
    assert metrics.f1(PRED, GOLD) == pytest.approx(2 * precision * recall / (precision + recall))
    assert metrics.f1(PRED, GOLD) == pytest.approx(6 / 9)


def test_metrics_accept_tensors_and_edge_cases():
    assert metrics.accuracy(torch.tensor(PRED), torch.tensor(GOLD)) == pytest.approx(5 / 8)
    assert metrics.f1([0, 0], [0, 0]) == 0.0  # no positive anywhere: 0 by convention
    assert metrics.f1([1, 1], [1, 1]) == 1.0
    assert metrics.accuracy([1.0, 0.0], [1, 1]) == 0.5
    # F1 is about the positive class: flipping every label changes it, accuracy stays
    flipped = metrics.f1([1 - p for p in PRED], [1 - g for g in GOLD])
    assert flipped == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))


@pytest.mark.parametrize("fn", [metrics.accuracy, metrics.f1, metrics.confusion_matrix])
@pytest.mark.parametrize(
    "pred, gold, match",
    [
        ([1, 0], [1], "differ in length"),
        ([], [], "empty"),
        ([2, 0], [1, 0], r"pred\[0\] is 2"),
        ([1, 0], [1, -1], r"gold\[1\] is -1"),
        ([True, False], [1, 0], "labels must be 0"),
    ],
)
def test_classification_bad_input(fn, pred, gold, match):
    with pytest.raises(ValueError, match=match) as err:
        fn(pred, gold)
    assert "\n" not in str(err.value)
