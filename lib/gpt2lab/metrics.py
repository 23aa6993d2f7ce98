"""The course's metrics: chrF for generated sonnets, accuracy / F1 / confusion matrix for paraphrase detection.

Used in notebook 04 (finetune), §4 (chrF) and §5 (classification); none of them is an exercise there. chrF is
sacrebleu's CHRF with its default settings (character 6-grams, beta 2, no word n-grams), scored at the corpus level,
so our numbers are comparable with anyone else's who calls sacrebleu. The classification metrics are a few lines
each, written out so the arithmetic is visible; the positive class (label 1) is "the two questions are duplicates".
"""

from __future__ import annotations

from collections.abc import Sequence


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (0-100) of `hypotheses` against one reference each, with sacrebleu's defaults.

    Used in notebook 04 (finetune), §4.
    """
    from sacrebleu.metrics import CHRF

    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"chrf needs one reference per hypothesis: got {len(hypotheses)} hypotheses "
                         f"and {len(references)} references")
    if not hypotheses:
        raise ValueError("chrf needs at least one hypothesis (got an empty list)")
    for name, texts in (("hypotheses", hypotheses), ("references", references)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"chrf: {name}[{bad}] is a {type(texts[bad]).__name__}, expected a str (decode ids first)")
    # sacrebleu takes a list of reference *streams*: one stream holding one reference per hypothesis
    return float(CHRF().corpus_score(hypotheses, [references]).score)


def _labels(values, name: str) -> list[int]:
    """A flat list of 0/1 ints from a list, tuple, numpy array or tensor; a one-line error otherwise."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    values = list(values)
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or v not in (0, 1):  # 1.0 == 1 is accepted, True/False and 2 are not
            raise ValueError(f"{name}[{i}] is {v!r}: labels must be 0 (not duplicate) or 1 (duplicate)")
        out.append(int(v))
    return out


def _pair(pred, gold) -> tuple[list[int], list[int]]:
    p, g = _labels(pred, "pred"), _labels(gold, "gold")
    if len(p) != len(g):
        raise ValueError(f"pred and gold differ in length ({len(p)} vs {len(g)}): one prediction per example")
    if not p:
        raise ValueError("no predictions to score (pred and gold are empty)")
    return p, g


def confusion_matrix(pred, gold) -> list[list[int]]:
    """[[TN, FP], [FN, TP]]: row = gold label, column = predicted label (0 then 1).

    Used in notebook 04 (finetune), §5.
    """
    p, g = _pair(pred, gold)
    m = [[0, 0], [0, 0]]
    for pi, gi in zip(p, g):
        m[gi][pi] += 1
    return m


def accuracy(pred, gold) -> float:
    """Fraction of predictions equal to the gold label. Used in notebook 04 (finetune), §5."""
    p, g = _pair(pred, gold)
    return sum(pi == gi for pi, gi in zip(p, g)) / len(p)


def f1(pred, gold) -> float:
    """Binary F1 of the positive class (1 = duplicate): 2·TP / (2·TP + FP + FN).

    When there is no positive anywhere (TP = FP = FN = 0) precision and recall are undefined; we return 0.0,
    the usual convention. Used in notebook 04 (finetune), §5.
    """
    (_, fp), (fn, tp) = confusion_matrix(pred, gold)
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0
