"""Notebook 04's checks against the mistakes learners make: each planted mistake gets its own ✗ line (asserted
word for word), correct alternative formulations pass, inputs written in place are caught, and the cloze loss is
checked through its gradient."""

import pytest
import torch
import torch.nn.functional as F
from check_helpers import NOT_YET, assert_mistake_line, assert_passes, stub

from gpt2lab import tasks
from gpt2lab.checks import finetune as check

NO, YES = 3919, 8505


def _last(mask):  # the last real position, as a learner may write it
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values


def _rows(x):
    return torch.arange(len(x))


def _targets_in_place(ids, mask):
    targets = ids[:, 1:]  # a view of the batch
    targets[(mask[:, 1:] == 0) | (mask[:, :-1] == 0)] = -100
    return targets


def _predict_at(position_of, yes=YES, no=NO):
    def cloze_predict(logits, mask):
        at = logits[_rows(mask), position_of(mask)]
        return (at[:, yes] > at[:, no]).long()
    return cloze_predict


def _predict_in_place(logits, mask):
    logits[..., :NO] = float("-inf")  # "keep only the answers", in the caller's logits
    return _predict_at(_last)(logits, mask)


def _loss_at(position_of, columns=(NO, YES), **kw):
    def cloze_loss(logits, mask, labels):
        return F.cross_entropy(logits[_rows(labels), position_of(mask)][:, list(columns)], labels, **kw)
    return cloze_loss


def _loss_wrapped_number(logits, mask, labels):
    return torch.tensor(_loss_at(_last)(logits, mask, labels).item(), requires_grad=True)


def _loss_softmax_in_place(logits, mask, labels):
    logits.sub_(logits.amax(-1, keepdim=True))  # "for stability", in the caller's logits
    return _loss_at(_last)(logits, mask, labels)


def _loss_grad_scaled(logits, mask, labels):
    """The right value, but a gradient twice as large: scaled through a detached copy."""
    loss = _loss_at(_last)(logits, mask, labels)
    return 2 * loss - loss.detach()


MISTAKES = [
    # lm_targets
    ("lm_targets", stub, NOT_YET),
    ("lm_targets", lambda ids, mask: ids[:, 1:],
     "padding is not masked: put -100 (IGNORE_INDEX) wherever token t or t+1 is padding"),
    ("lm_targets", lambda ids, mask: ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100),
     "in the left-padded row a pad predicts the first real token: ignore the pair when token t (the predicting one) "
     "is padding too, not only when the target t+1 is"),
    ("lm_targets", lambda ids, mask: ids[:, 1:].masked_fill(mask[:, :-1] == 0, -100),
     "in the right-padded rows the last real token predicts a pad: ignore the pair when the target t+1 is padding "
     "too, not only when token t is"),
    ("lm_targets", lambda ids, mask: ids[:, :-1].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100),
     "the targets are not shifted: position t predicts token t+1, so the targets are input_ids[:, 1:]"),
    ("lm_targets", lambda ids, mask: ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), 0),
     "ignored targets should be -100 (IGNORE_INDEX), the value cross_entropy skips; yours are 0"),
    ("lm_targets", lambda ids, mask: ids.masked_fill(mask == 0, -100),
     "targets have shape (4, 7), expected (4, 6): position t predicts token t+1, so there are T-1 targets per row"),
    ("lm_targets", lambda ids, mask: ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100).float(),
     "targets should be token ids of dtype torch.long (what F.cross_entropy needs for class indices), got "
     "torch.float32"),
    ("lm_targets", lambda ids, mask: ids[:, 1:].tolist(), "return a tensor, got list"),
    ("lm_targets", _targets_in_place,
     "you modified input_ids in place: input_ids[:, 1:] is a view of the batch, so writing -100 into it changes the "
     "model's input; use masked_fill (no _) or .clone() first"),
    ("lm_targets", lambda ids, mask: _targets_in_place(ids.clone(), mask) + (torch.arange(6) == 2),  # no hint
     "targets[0, 2]: …"),
    # cloze_predict
    ("cloze_predict", stub, NOT_YET),
    ("cloze_predict", _predict_at(lambda m: torch.full((len(m),), m.shape[1] - 1)),
     "the answer is read at the last column, which is padding in the right-padded rows: read it at the last real "
     "token (the last position whose mask is 1)"),
    ("cloze_predict", _predict_at(lambda m: m.sum(1) - 1),
     "the answer is read at position mask.sum() - 1, the last real token only with right padding, not in the "
     "left-padded rows: take the last position whose mask is 1"),
    ("cloze_predict", _predict_at(lambda m: m.sum(1).clamp(max=m.shape[1] - 1)),
     "the answer is read one position after the last real token (mask.sum()): the prediction for the next token "
     "sits at the last real token itself"),
    ("cloze_predict", _predict_at(_last, yes=3763, no=645),
     "you read the tokens ' yes' / ' no' with a leading space (3763 / 645); the answers start a line: 'yes' = 8505, "
     "'no' = 3919 (ANSWER_IDS)"),
    ("cloze_predict", _predict_at(_last, yes=NO, no=YES),
     "yes and no are swapped: predict 1 when the 'yes' logit (8505) beats the 'no' logit (3919)"),
    ("cloze_predict", lambda lg, m: (lg[_rows(m), _last(m)].argmax(-1) == YES).long(),
     "'yes' is compared with the whole vocabulary (argmax == yes); compare only the two answer logits, yes > no"),
    ("cloze_predict", lambda lg, m: (lg[_rows(m), _last(m), YES] > lg[_rows(m), _last(m), NO]).float(),
     "return 0/1 integers (e.g. (yes > no).long()), got torch.float32"),
    ("cloze_predict", lambda lg, m: torch.zeros(len(m), dtype=torch.long), "predictions[1]: expected 1, got 0"),
    ("cloze_predict", _predict_in_place,
     "you modified logits in place: read from the logits, do not write into them"),
    # cloze_loss
    ("cloze_loss", stub, NOT_YET),
    ("cloze_loss", lambda lg, m, lab: F.cross_entropy(lg[_rows(lab), _last(m)], torch.tensor([NO, YES])[lab]),
     "the cross-entropy runs over the whole vocabulary: keep only the two answer logits, logits[..., [NO_ID, YES_ID]] "
     "(a 2-way softmax)"),
    ("cloze_loss", _loss_at(_last, columns=(YES, NO)),
     "yes and no are swapped: take the columns in the order (no, yes), so that column index = label"),
    ("cloze_loss", lambda lg, m, lab: _loss_at(_last)(lg, m, 1 - lab),
     "yes and no are swapped: take the columns in the order (no, yes), so that column index = label"),
    ("cloze_loss", _loss_at(lambda m: torch.full((len(m),), m.shape[1] - 1)),
     "the answer is read at the last column, which is padding in the right-padded rows: read it at the last real "
     "token (the last position whose mask is 1)"),
    ("cloze_loss", _loss_at(lambda m: m.sum(1) - 1),
     "the answer is read at position mask.sum() - 1, the last real token only with right padding, not in the "
     "left-padded rows: take the last position whose mask is 1"),
    ("cloze_loss", _loss_at(_last, reduction="sum"),
     "the loss is summed over the batch: take the mean (F.cross_entropy's default)"),
    ("cloze_loss", _loss_at(_last, columns=(645, 3763)),
     "you used the tokens ' no' / ' yes' with a leading space (645 / 3763); the answers start a line: 'no' = 3919, "
     "'yes' = 8505 (ANSWER_IDS)"),
    ("cloze_loss", _loss_at(_last, reduction="none"),
     "the loss has shape (4,), expected a scalar: the mean over the batch"),
    ("cloze_loss", lambda lg, m, lab: _loss_at(_last)(lg, m, lab).item(),
     "return the loss as a tensor (no .item()), got float"),
    ("cloze_loss", lambda lg, m, lab: _loss_at(_last)(lg.detach(), m, lab),
     "the loss carries no gradient: keep it a tensor computed from the logits (no .item(), .detach() or "
     "torch.no_grad)"),
    ("cloze_loss", _loss_wrapped_number,
     "the loss does not depend on the logits through autograd: compute it from them with torch operations (no "
     "torch.tensor(...) around a number)"),
    ("cloze_loss", _loss_grad_scaled, "gradient of the loss w.r.t. the logits[…"),
    ("cloze_loss", _loss_softmax_in_place,
     "you modified logits in place: read from the logits, do not write into them"),
    ("cloze_loss", lambda lg, m, lab: _loss_at(_last)(lg, m, lab) + 1e-3 * (m[:, -1] == 0).any(),  # wrong if right-pad
     "loss (right-padded; right when left-padded): …"),
    # two mistakes at once (appended last: the ids above stay as they were)
    ("lm_targets", lambda ids, mask: ids[:, :-1].masked_fill(mask[:, 1:] == 0, -100),
     "the targets are not shifted: position t predicts token t+1, so the targets are input_ids[:, 1:]"),
    ("lm_targets", lambda ids, mask: ids[:, 1:].masked_fill(mask[:, 1:] == 0, 0),
     "targets[1, 3]: expected -100, got 0"),
]


@pytest.mark.parametrize("name, answer, message", MISTAKES,
                         ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(MISTAKES)])
def test_each_mistake_gets_its_line(name, answer, message):
    assert_mistake_line(getattr(check, name)(answer), name, message)


def _loss_bce(logits, mask, labels):  # binary cross-entropy on yes - no: the same loss, written differently
    at = logits[_rows(labels), _last(mask)]
    return F.binary_cross_entropy_with_logits(at[:, YES] - at[:, NO], labels.float())


def _loss_log_softmax(logits, mask, labels):
    last = torch.stack([row.nonzero().max() for row in mask])
    two = logits[_rows(labels), last][:, [NO, YES]].log_softmax(-1)
    return -two.gather(1, labels[:, None]).mean()


def _loss_float_columns(logits, mask, labels):  # the library's last_token_index, the two columns cast to float
    return F.cross_entropy(logits[_rows(labels), tasks.last_token_index(mask)][:, [NO, YES]].float(), labels)


ALTERNATIVES = [
    ("lm_targets", lambda ids, mask: ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)),
    ("lm_targets", lambda ids, mask: torch.where((mask[:, 1:] * mask[:, :-1]).bool(), ids[:, 1:], -100)),
    ("lm_targets", lambda ids, mask: (lambda t: t.__setitem__((mask[:, 1:] * mask[:, :-1]) == 0, -100) or t)(
        ids[:, 1:].clone())),
    ("cloze_predict", tasks.cloze_predict),
    ("cloze_predict", lambda lg, m: lg[_rows(m), _last(m)][:, [NO, YES]].argmax(-1)),
    ("cloze_predict", lambda lg, m: lg[_rows(m), _last(m)][:, YES] > lg[_rows(m), _last(m)][:, NO]),  # bool
    ("cloze_loss", tasks.cloze_loss),
    ("cloze_loss", _loss_at(_last)),
    ("cloze_loss", _loss_bce),
    ("cloze_loss", _loss_log_softmax),
    ("cloze_loss", _loss_float_columns),
]


@pytest.mark.parametrize("name, answer", ALTERNATIVES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ALTERNATIVES)])
def test_correct_answers_pass(name, answer):
    assert_passes(getattr(check, name)(answer), name)


def test_lm_targets_check_agrees_with_lm_loss_under_left_padding():
    """The notebook's targets and gpt2lab.model.lm_loss mask the same pairs, also for left-padded rows."""
    from gpt2lab.model import lm_loss

    ids, mask = check._padded_batch()
    assert mask[3, 0] == 0 and mask[3, -1] == 1  # the check really has a left-padded row
    targets = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), tasks.IGNORE_INDEX)
    logits = torch.randn(*ids.shape, 50, generator=torch.Generator().manual_seed(5))
    by_targets = F.cross_entropy(logits[:, :-1].reshape(-1, 50), targets.reshape(-1), ignore_index=-100)
    assert by_targets.item() == pytest.approx(lm_loss(logits, ids, mask).item(), abs=1e-6)
