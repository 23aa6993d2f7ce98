"""Which examples make up each batch, and what a batch's loss averages over: the training loop's batching.

Built in notebook 04 (finetune), §3 (`epoch_order`: a seeded shuffle per epoch) and used by notebook 09 (experiments)
for batching by length (`length_batches`, less padding on a GPU) and for several processes (`loss_terms`: each
process weights its mean loss by its share of the global batch's loss terms). Every order here is a function of
(seed, epoch) only, never of history, so a resumed run redraws exactly the batches it had not trained on.
`gpt2lab.train` imports these; they live apart because they are the loop's one decision about data.
"""

from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example indices of one epoch: a function of (seed, epoch) only, so resuming can redo it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def example_length(task, example) -> int:
    """The length in tokens of one training example, for `length_batches` (notebook 09, experiments).

    In order: the task's own `example_length(example)`; the example itself when it is a sequence of token ids (a
    SonnetTask example); else the ids `task.encode(example)` gives (ParaphraseTask: the prompt's ids; its
    (ids, was_cut) pair is unpacked).
    """
    own = getattr(task, "example_length", None)
    if callable(own):
        return int(own(example))
    if torch.is_tensor(example) and example.dim() == 1:
        return int(example.numel())
    if isinstance(example, (list, tuple)) and example and all(isinstance(t, int) for t in example):
        return len(example)
    encode = getattr(task, "encode", None)
    if callable(encode):
        ids = encode(example)
        if isinstance(ids, tuple) and len(ids) == 2 and isinstance(ids[1], bool):
            ids = ids[0]
        return len(ids)
    raise TypeError(f"length_batching needs each example's length: task {getattr(task, 'name', task)!r} has no "
                    f"example_length(example) or encode(example), and its examples ({type(example).__name__}) are "
                    "not token ids; add example_length, or length_batching=False")


def length_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, window: int = 50) -> list[list[int]]:
    """One epoch's batches of example indices, of similar lengths: a function of (seed, epoch) only.

    Notebook 09 (experiments). The epoch's seeded order (`epoch_order`) is cut into windows of `window` batches;
    each window is sorted by length (ties keep the random order) and cut into batches; the batch order is then
    shuffled with a generator seeded by (seed, epoch). Every example is in exactly one batch, as many batches as
    random batching (only the very last window's last batch can be short), and a resumed run redraws the same
    batches. Windows (not a global sort) keep each epoch's batches different and a batch's lengths alike.
    """
    order = epoch_order(len(lengths), seed, epoch)
    span = window * batch_size
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])  # stable: ties stay random
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 2 + 1)  # a stream other than epoch_order's
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def loss_terms(task, batch: dict) -> int:
    """How many terms the task's loss on `batch` averages over: the batch's share of a global batch's normaliser.

    Used by the loop with several processes (`gpt2lab.parallel`) to weight each rank's mean loss. A task may say
    it with `loss_terms(batch)`. Otherwise: a batch with `labels` is one term per example (the cloze loss), and a
    batch without is a language-modelling batch whose terms are the positions t whose target t + 1 is real (the
    positions `gpt2lab.model.lm_loss` averages over: both t and t + 1 real, for any padding side).
    """
    own = getattr(task, "loss_terms", None)
    if callable(own):
        return int(own(batch))
    if "labels" in batch:
        return int(batch["labels"].shape[0])
    real = batch["attention_mask"].bool()  # (B, T)
    return int((real[:, :-1] & real[:, 1:]).sum())
