"""Check cells of notebook 04 (finetune): the LM targets with padding masked out, the cloze prediction and loss.

Each check feeds the learner's function small hand-made cases where the common mistakes give a different
answer: targets not shifted, padding not masked, masked one position off, or only right padding handled; the
answer read at the last column instead of the last real token, the wrong answer tokens, yes/no swapped; a loss over
the whole vocabulary, summed instead of averaged, or detached from the graph.
"""

from __future__ import annotations

import torch

from ..model import lm_loss
from ..tasks import ANSWER_IDS, IGNORE_INDEX
from ..tasks import cloze_loss as reference_cloze_loss
from ..tasks import cloze_predict as reference_cloze_predict
from .core import check, compare, expect


def _padded_batch(seed: int = 0, vocab: int = 50):
    """Four rows of T=7: right-padded with real lengths 7, 4 and 2, and one left-padded row with 4 real tokens
    (padding filled with token 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (4, 7), generator=g)  # (B, T)
    mask = torch.zeros(4, 7, dtype=torch.long)
    for row, n in enumerate((7, 4, 2)):
        mask[row, :n] = 1
    mask[3, -4:] = 1  # left padding: the first real token has only padding before it
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@check("lm_targets")
def lm_targets(fn):
    """`fn(input_ids, attention_mask)` -> (B, T-1) next-token targets, -100 unless token t and t+1 are both real."""
    ids, mask = _padded_batch()
    real_pair = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)  # (B, T-1): the predicting and the predicted token
    expected = ids[:, 1:].masked_fill(~real_pair, IGNORE_INDEX)  # (B, T-1)
    got = fn(ids.clone(), mask.clone())
    expect(torch.is_tensor(got), f"return a tensor, got {type(got).__name__}")
    expect(tuple(got.shape) == tuple(expected.shape),
           f"targets have shape {tuple(got.shape)}, expected {tuple(expected.shape)}: position t predicts token t+1, "
           "so there are T-1 targets per row")
    compare("targets (rows 0-2 right-padded)", got[:3].long(), expected[:3])
    compare("targets (row 3 left-padded: a pad cannot predict the first real token)", got[3:].long(), expected[3:])
    # and the loss with these targets is the masked LM loss of notebook 02
    logits = torch.randn(4, 7, 50, generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), got.long().reshape(-1),
                                             ignore_index=IGNORE_INDEX)
    compare("loss with your targets", loss, lm_loss(logits, ids, mask), atol=1e-6)
    return ("targets are shifted by one and every pair touching padding is ignored (-100), right or left padding: "
            "the loss matches gpt2lab.model.lm_loss")


@check("cloze_predict")
def cloze_predict(fn):
    """`fn(logits, attention_mask)` -> (B,) 0/1: "yes" logit > "no" logit at the last real token."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 6, 50257
    logits = torch.randn(B, T, V, generator=g)  # (B, T, V)
    no, yes = ANSWER_IDS
    # the last column and the real answer position disagree on purpose, in both directions
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    left = right.flip(1)
    for name, mask in (("right-padded", right), ("left-padded", left)):
        case = logits.clone()
        for row in range(B):
            last = int(mask[row].nonzero().max())
            answer = row % 2  # the real answer alternates: no, yes, no, yes
            case[row, last, yes], case[row, last, no] = (3.0, -3.0) if answer else (-3.0, 3.0)
            for pos in range(T):
                if pos != last:  # every other position (the last column, the first pad) says the opposite
                    case[row, pos, yes], case[row, pos, no] = (-5.0, 5.0) if answer else (5.0, -5.0)
                # and the tokens " yes" / " no" (with a space: 3763 / 645) point the other way everywhere
                case[row, pos, 3763], case[row, pos, 645] = (-9.0, 9.0) if answer else (9.0, -9.0)
        expected = reference_cloze_predict(case, mask)
        expect(expected.tolist() == [0, 1, 0, 1], "internal: the reference disagrees with the planted answers")
        got = fn(case.clone(), mask.clone())
        expect(torch.is_tensor(got), f"return a tensor of 0/1 predictions, got {type(got).__name__}")
        expect(tuple(got.shape) == (B,), f"predictions have shape {tuple(got.shape)}, expected ({B},): one per row")
        compare(f"predictions ({name})", got.long(), expected)
    return "reads yes (8505) vs no (3919) at the last real token, for right and left padding"


@check("cloze_loss")
def cloze_loss(fn):
    """`fn(logits, attention_mask, labels)` -> scalar: mean 2-way cross-entropy of ("no", "yes") at the last real
    token, the same number as gpt2lab.tasks.cloze_loss (the one ParaphraseTask trains with)."""
    B, T, V = 4, 6, 50257
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(2))  # (B, T, V)
    no, yes = ANSWER_IDS
    g = torch.Generator().manual_seed(3)
    for row in range(B):  # the answer logits: far apart, and different at every position
        logits[row, :, no] = 4 * torch.randn(T, generator=g)
        logits[row, :, yes] = 4 * torch.randn(T, generator=g)
    labels = torch.tensor([1, 0, 0, 1])
    # right padding: the last real token is not the last column (rows 1-3); left padding: it is, and mask.sum() - 1
    # is not
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    for name, mask in (("right-padded", right), ("left-padded", right.flip(1))):
        expected = reference_cloze_loss(logits, mask, labels)
        got = fn(logits.clone().requires_grad_(True), mask.clone(), labels.clone())
        expect(torch.is_tensor(got), f"return the loss as a tensor (no .item()), got {type(got).__name__}")
        expect(got.dim() == 0, f"the loss has shape {tuple(got.shape)}, expected a scalar: the mean over the batch")
        expect(got.requires_grad, "the loss carries no gradient: keep it a tensor computed from the logits "
               "(no .item(), .detach() or torch.no_grad)")
        compare(f"loss ({name})", got.detach().float(), expected, atol=1e-5)
    return "2-way cross-entropy over no (3919) / yes (8505) at the last real token, mean over the batch, right and left"
