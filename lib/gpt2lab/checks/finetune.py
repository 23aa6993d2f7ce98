"""Check cells of notebook 04 (finetune): the LM targets with padding masked out, the cloze prediction and loss.

Each check feeds the learner's function small hand-made cases where the common mistakes give a different
answer, and recognises them by name: targets not shifted, padding not masked, only one side of a pair masked,
-100 written into the caller's batch; the answer read at the last column or at mask.sum() - 1 instead of the last
real token, the tokens " yes"/" no" with a space, yes/no swapped, "yes" against the whole vocabulary; a loss over
the whole vocabulary, summed instead of averaged, or detached from the graph.

References are computed by hand here (shifted ids, the planted answers, a 2-way log-sum-exp and its gradient),
never with the `gpt2lab.tasks` functions the learner re-implements. The learner's function gets the real tensors
and must leave them unchanged; the cloze loss is also run backward (ParaphraseTask trains with it). A ✗ line
names a padding side only when the answer is right for the other side.
"""

from __future__ import annotations

import torch

from ..tasks import ANSWER_IDS, IGNORE_INDEX
from .core import _close, check, compare, expect, known_mistake, untouched

NO_ID, YES_ID = ANSWER_IDS  # "no" = 3919, "yes" = 8505: the answers start a line, so no leading space
SPACE_NO_ID, SPACE_YES_ID = 645, 3763  # " no", " yes": the tokens a learner may pick by mistake


def _padded_batch(seed: int = 0, vocab: int = 50):
    """Four rows of T=7: right-padded with real lengths 7, 4 and 2, and one left-padded row with 4 real tokens.
    Padding holds token vocab - 1 (as GPT-2 pads with its last token, <|endoftext|>), real tokens are 1..vocab-2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 1, (4, 7), generator=g)  # (B, T)
    mask = torch.zeros(4, 7, dtype=torch.long)
    for row, n in enumerate((7, 4, 2)):
        mask[row, :n] = 1
    mask[3, -4:] = 1  # left padding: the first real token has only padding before it
    ids = ids.masked_fill(mask == 0, vocab - 1)
    return ids, mask


@check("lm_targets")
def lm_targets(fn):
    """`fn(input_ids, attention_mask)` -> (B, T-1) next-token targets, -100 unless token t and t+1 are both real."""
    ids, mask = _padded_batch()
    real_pair = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)  # (B, T-1): the predicting and the predicted token
    expected = ids[:, 1:].masked_fill(~real_pair, IGNORE_INDEX)  # (B, T-1)
    with untouched("input_ids[:, 1:] is a view of the batch, so writing -100 into it changes the model's input; use "
                   "masked_fill (no _) or .clone() first", input_ids=ids, attention_mask=mask):
        got = fn(ids, mask)
    expect(torch.is_tensor(got), f"return a tensor, got {type(got).__name__}")
    expect(tuple(got.shape) == tuple(expected.shape),
           f"targets have shape {tuple(got.shape)}, expected {tuple(expected.shape)}: position t predicts token t+1, "
           "so there are T-1 targets per row")
    expect(got.dtype == torch.long, f"targets should be token ids of dtype torch.long (what F.cross_entropy needs for "
                                    f"class indices), got {got.dtype}")
    expect(not torch.equal(got[real_pair], ids[:, :-1][real_pair]) or torch.equal(got, expected),
           "the targets are not shifted: position t predicts token t+1, so the targets are input_ids[:, 1:]")
    expect(not torch.equal(got, ids[:, 1:]), "padding is not masked: put -100 (IGNORE_INDEX) wherever token t or "
                                             "t+1 is padding")
    expect(not torch.equal(got, ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)),
           "in the left-padded row a pad predicts the first real token: ignore the pair when token t (the predicting "
           "one) is padding too, not only when the target t+1 is")
    expect(not torch.equal(got, ids[:, 1:].masked_fill(mask[:, :-1] == 0, IGNORE_INDEX)),
           "in the right-padded rows the last real token predicts a pad: ignore the pair when the target t+1 is "
           "padding too, not only when token t is")
    fill = got[~real_pair]
    if torch.equal(got[real_pair], expected[real_pair]) and bool((fill == fill[0]).all()) and fill[0] != IGNORE_INDEX:
        expect(False, f"ignored targets should be -100 (IGNORE_INDEX), the value cross_entropy skips; yours are "
                      f"{int(fill[0])}")
    compare("targets", got, expected)
    return "targets are shifted by one and every pair touching padding is ignored (-100), right or left padding"


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position whose mask is 1, by hand."""
    T = mask.shape[1]
    return torch.tensor([max(t for t in range(T) if mask[row, t]) for row in range(mask.shape[0])])


def _at(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return logits[torch.arange(len(positions)), positions]  # (B, V)


def _positions(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the answer is read: right, and the classic wrong places (with their hints)."""
    T = mask.shape[1]
    return {
        "last real token": _last_real(mask),
        "the answer is read at the last column, which is padding in the right-padded rows: read it at the last real "
        "token (the last position whose mask is 1)": torch.full((mask.shape[0],), T - 1),
        "the answer is read at position mask.sum() - 1, the last real token only with right padding, not in the "
        "left-padded rows: take the last position whose mask is 1": mask.sum(1) - 1,
        "the answer is read one position after the last real token (mask.sum()): the prediction for the next token "
        "sits at the last real token itself": mask.sum(1).clamp(max=T - 1),
    }


def _both_sides(what: str, got: dict, expected: dict, atol: float) -> None:
    """compare() for the right- and left-padded case; the label names a padding side only when the other passes."""
    wrong = [side for side in got if not _close(got[side], expected[side], atol)]
    if len(wrong) == 1:
        other = next(side for side in got if side not in wrong)
        compare(f"{what} ({wrong[0]}; right when {other})", got[wrong[0]], expected[wrong[0]], atol=atol)
    for side in wrong:
        compare(what, got[side], expected[side], atol=atol)


def _cloze_logits(B=4, T=6, V=8704, seed=0):
    """Random (B, T, V) logits; V covers every token id the checks use (8505 the largest): the full 50257 would only
    make the check slower."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g)  # (B, T, V)


RIGHT = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
SIDES = {"right-padded": RIGHT, "left-padded": RIGHT.flip(1)}  # rows 1-3: the last column / mask.sum()-1 differ


@check("cloze_predict")
def cloze_predict(fn):
    """`fn(logits, attention_mask)` -> (B,) 0/1: "yes" logit > "no" logit at the last real token."""
    answers = torch.tensor([0, 1, 0, 1])  # the planted answers: no, yes, no, yes
    base = _cloze_logits()
    got, variants = {}, {}
    for side, mask in SIDES.items():
        case = base.clone()
        last = _last_real(mask)
        for row, answer in enumerate(answers.tolist()):
            for pos in range(case.shape[1]):  # every other position (the last column, the first pad) says the opposite
                case[row, pos, YES_ID], case[row, pos, NO_ID] = (-5.0, 5.0) if answer else (5.0, -5.0)
                # the tokens " yes" / " no" (with a space) agree with the answer in rows 0-1, point the other way after
                space_says_yes = bool(answer) == (row < 2)
                case[row, pos, SPACE_YES_ID], case[row, pos, SPACE_NO_ID] = (9.0, -9.0) if space_says_yes else \
                    (-9.0, 9.0)
            # row 1's "yes" tops the whole vocabulary, row 3's is beaten by " no": "argmax == yes" answers 1 then 0
            case[row, last[row], YES_ID], case[row, last[row], NO_ID] = ((12.0 if row == 1 else 3.0), -3.0) if answer \
                else (-3.0, 3.0)
        with untouched("read from the logits, do not write into them", logits=case, attention_mask=mask):
            got[side] = fn(case, mask)
        result = got[side]
        expect(torch.is_tensor(result), f"return a tensor of 0/1 predictions, got {type(result).__name__}")
        expect(tuple(result.shape) == (4,), f"predictions have shape {tuple(result.shape)}, expected (4,): one per row")
        expect(not result.is_floating_point(), f"return 0/1 integers (e.g. (yes > no).long()), got {result.dtype}")
        at_answer = _at(case, last)
        variants[side] = {
            "yes and no are swapped: predict 1 when the 'yes' logit (8505) beats the 'no' logit (3919)": 1 - answers,
            "you read the tokens ' yes' / ' no' with a leading space (3763 / 645); the answers start a line: 'yes' = "
            "8505, 'no' = 3919 (ANSWER_IDS)": (at_answer[:, SPACE_YES_ID] > at_answer[:, SPACE_NO_ID]).long(),
            "'yes' is compared with the whole vocabulary (argmax == yes); compare only the two answer logits, "
            "yes > no": (at_answer.argmax(-1) == YES_ID).long(),
        }
        for message, positions in list(_positions(mask).items())[1:]:
            at = _at(case, positions)
            variants[side][message] = (at[:, YES_ID] > at[:, NO_ID]).long()
    for message in variants["right-padded"]:  # a known mistake gives its answers on both sides, wrong on one at least
        same = all(torch.equal(got[side].long(), variants[side][message]) for side in SIDES)
        expect(not (same and any(not torch.equal(variants[side][message], answers) for side in SIDES)), message)
    _both_sides("predictions", {s: g.long() for s, g in got.items()}, {s: answers for s in SIDES}, atol=0)
    return "reads yes (8505) vs no (3919) at the last real token, for right and left padding"


def _two_way(logits: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, columns=(NO_ID, YES_ID),
             reduce="mean", grad: bool = False):
    """The cloze loss by hand (log-sum-exp of the two answer logits minus the right one), and with `grad` its
    gradient w.r.t. the logits: (softmax − one-hot) / B at the two answer logits, 0 elsewhere."""
    rows = torch.arange(len(labels))
    two = logits[rows, positions][:, list(columns)].double()  # (B, 2)
    per_row = torch.logsumexp(two, dim=1) - two[rows, labels]  # (B,)
    loss = per_row.mean() if reduce == "mean" else per_row.sum()
    if not grad:
        return loss
    grad_two = (two.softmax(dim=1) - torch.nn.functional.one_hot(labels, 2)) / len(labels)  # (B, 2)
    full = torch.zeros(logits.shape, dtype=torch.float64)
    full[rows, positions, columns[0]], full[rows, positions, columns[1]] = grad_two[:, 0], grad_two[:, 1]
    return loss, full


@check("cloze_loss")
def cloze_loss(fn):
    """`fn(logits, attention_mask, labels)` -> scalar: mean 2-way cross-entropy of ("no", "yes") at the last real
    token, checked by value and by its gradient w.r.t. the logits against a hand computation."""
    logits = _cloze_logits(seed=2)
    g = torch.Generator().manual_seed(3)
    for row in range(4):  # the answer logits: far apart, and different at every position
        logits[row, :, NO_ID] = 4 * torch.randn(6, generator=g)
        logits[row, :, YES_ID] = 4 * torch.randn(6, generator=g)
    labels = torch.tensor([1, 0, 0, 1])
    got, expected, grads, expected_grads = {}, {}, {}, {}
    for side, mask in SIDES.items():
        with untouched("read from the logits, do not write into them", logits=logits, attention_mask=mask,
                       labels=labels):
            loss = fn(logits, mask, labels)
        expect(torch.is_tensor(loss), f"return the loss as a tensor (no .item()), got {type(loss).__name__}")
        expect(loss.dim() == 0, f"the loss has shape {tuple(loss.shape)}, expected a scalar: the mean over the batch")
        got[side] = loss.detach()
        last = _last_real(mask)
        expected[side], expected_grads[side] = _two_way(logits, last, labels, grad=True)
        wrong = {
            "the cross-entropy runs over the whole vocabulary: keep only the two answer logits, "
            "logits[..., [NO_ID, YES_ID]] (a 2-way softmax)": torch.nn.functional.cross_entropy(
                _at(logits, last), torch.tensor(ANSWER_IDS)[labels]),
            "yes and no are swapped: take the columns in the order (no, yes), so that column index = label":
                _two_way(logits, last, 1 - labels),
            "you used the tokens ' no' / ' yes' with a leading space (645 / 3763); the answers start a line: 'no' = "
            "3919, 'yes' = 8505 (ANSWER_IDS)": _two_way(logits, last, labels, columns=(SPACE_NO_ID, SPACE_YES_ID)),
            "the loss is summed over the batch: take the mean (F.cross_entropy's default)":
                _two_way(logits, last, labels, reduce="sum"),
        }
        for message, positions in list(_positions(mask).items())[1:]:
            if not torch.equal(positions, last):
                wrong[message] = _two_way(logits, positions, labels)
        known_mistake(got[side], expected[side], 1e-5, wrong.items())
        # backward: ParaphraseTask trains with this loss
        leaf = logits.clone().requires_grad_(True)
        loss = fn(leaf, mask, labels)
        expect(loss.requires_grad, "the loss carries no gradient: keep it a tensor computed from the logits "
               "(no .item(), .detach() or torch.no_grad)")
        (grads[side],) = torch.autograd.grad(loss, leaf, allow_unused=True)
        expect(grads[side] is not None, "the loss does not depend on the logits through autograd: compute it from "
                                        "them with torch operations (no torch.tensor(...) around a number)")
    _both_sides("loss", got, expected, atol=1e-5)
    _both_sides("gradient of the loss w.r.t. the logits", grads, expected_grads, atol=1e-6)
    return ("2-way cross-entropy over no (3919) / yes (8505) at the last real token, mean over the batch, right and "
            "left padding; gradient w.r.t. the logits too")
