"""The two fine-tuning tasks, each as data -> batches -> loss -> evaluation, for the one training loop.

Built in notebook 04 (finetune); the embedding interface and `Objective` serve the method notebooks (06 smart).
A task is anything with:

    name, metric, higher_is_better    what to call it, which dev number early stopping watches
    train_set                         a list of examples (the loop shuffles their indices)
    collate(examples) -> batch        a dict of (B, T) LongTensors, at least input_ids and attention_mask
    loss(model, batch) -> scalar      the training loss on one batch
    evaluate(model) -> dict           dev metrics (floats)
    describe() -> dict                what to store in the run record

Both tasks here (subclasses of `Task`) also compute their loss from given input embeddings, so a regulariser can
perturb the embeddings without knowing the task (SMART: Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning
for Pre-trained Natural Language Models through Principled Regularized Optimization", arXiv 1911.03437):

    embeddings(model, batch) -> (B, T, C)   the model's token embeddings of batch["input_ids"], looked up through
                                            its `transformer.wte` module (so hooks and adapters on it apply);
                                            no position embeddings: the model adds those to inputs_embeds
    outputs(model, batch, inputs_embeds=None) -> TaskOutputs(logits, mask, loss), from ONE forward:
        logits  the task's output logits; softmax over the last dim gives the output distributions to compare
                  ParaphraseTask: (B, 2) ("no", "yes") logits at the last real token
                  SonnetTask:     (B, T, V) next-token logits at every position
        mask    bool, logits.shape[:-1]: which of those distributions count
                  ParaphraseTask: (B,) all True;  SonnetTask: (B, T) the positions whose next token is a real
                  target (the same ones lm_loss averages over)
        loss    the task loss from this same forward (None for a batch without labels)
      `TaskOutputs.log_probs()` -> (N, K) float32 log-probabilities of the N counted distributions: SMART's
      symmetric KL compares these rows between a clean and a perturbed forward (one row per pair for paraphrase,
      one per token for the LM) and averages over N.
    loss(model, batch, inputs_embeds=None)  = outputs(...).loss; with inputs_embeds = embeddings(model, batch) it is
                                            the very same number as the plain loss

`Objective(task, extra)` is itself a task whose loss is task.loss + extra(model, batch, outputs): an added term
(a regulariser) the training loop never hears of. `extra` receives the clean TaskOutputs of the same forward.

Models: every call goes through the model's public API, `model(input_ids, attention_mask, inputs_embeds=...)
-> logits (B, T, V)` (ParaphraseTask uses `hidden_states` + `head` when the model has them), so a module that wraps
a GPT2 and forwards to it, or torch.compile(model), works too. The token embedding of a wrapped model is that of
the GPT2 `gpt2lab.generate.find_gpt2` finds inside (or the model's own `get_input_embeddings()`, when it has one).

Long evaluations (`ParaphraseTask.predict` / `evaluate`, `SonnetTask.generate` / `evaluate`) show a `tqdm.auto`
progress bar that disappears when done (leave=False). `progress=` on the call, else the task's own `progress`
(constructor), decides; None (the default) means on, except in quick mode (GPT2LAB_QUICK), where it is silent.

SonnetTask (§2, §4): causal language modelling on the training sonnets. Batches are right-padded; padding is
masked out of the loss (`gpt2lab.model.lm_loss`, notebook 02). Evaluation continues the first 3 lines of every
held-out sonnet with a sampling strategy from `gpt2lab.generate`, and scores the whole sonnets (the 3 given
lines + the generated ones) against the gold dev sonnets with chrF.

ParaphraseTask (§5): Quora duplicate detection as a cloze. ONE prompt, used identically for train, dev
and test, asks the question and the model's next token is read: "yes" (id 8505) or "no" (id 3919). The loss
is cross-entropy over those two logits at the last real token (`cloze_loss`); the prediction is the larger of the
two (`cloze_predict`). The task calls exactly these two functions.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import metrics
from .environment import quick_mode
from .generate import find_gpt2
from .model import lm_loss

IGNORE_INDEX = -100  # the target value F.cross_entropy skips (what gpt2lab.model.lm_loss puts on padding)

# ------------------------------------------------------------------------------------------------ helpers


def model_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Call the model and return its logits (B, T, V). (Objects with a `.logits` field are unwrapped too.)

    With `inputs_embeds` (B, T, C) the model runs on those instead of looking up input_ids (which it then gets as
    None). The keyword is passed only when given, so models without it still work for the plain loss.
    """
    if inputs_embeds is None:
        out = model(input_ids, attention_mask=attention_mask)
    else:
        out = model(None, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
    return out.logits if hasattr(out, "logits") else out


def token_embeddings(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's own token embeddings of input_ids (B, T) -> (B, T, C), through its embedding MODULE.

    Used by `Task.embeddings` (notebook 06, smart). The module is the model's `get_input_embeddings()` when it has
    one, else the `transformer.wte` of the GPT2 inside it (`find_gpt2`: the model itself, a wrapper's GPT2,
    torch.compile's `_orig_mod`). Calling the module (not indexing its weight) keeps hooks and adapters on it.
    """
    if hasattr(model, "get_input_embeddings"):
        wte = model.get_input_embeddings()
    else:
        base = find_gpt2(model)
        if base is None:
            raise TypeError(f"cannot find the token embedding of {type(model).__name__}: it holds no (or several) "
                            "gpt2lab GPT2; give it a get_input_embeddings() method returning the embedding module")
        wte = base.transformer.wte
    return wte(input_ids)  # (B, T, C)


def check_embeds(input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None) -> None:
    """One line when given input embeddings do not belong to the batch: they must be (B, T, C) for (B, T) ids."""
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[:2] != input_ids.shape):
        raise ValueError(f"inputs_embeds {tuple(inputs_embeds.shape)} must be (B, T, C) for input_ids "
                         f"{tuple(input_ids.shape)}: one embedding per token of the batch")


def progress_bar(total: int, desc: str, unit: str, progress: bool | None):
    """A tqdm.auto bar for a long evaluation, gone when done (leave=False) so notebook outputs do not change.

    `progress` None: on, except in quick mode (GPT2LAB_QUICK), where evaluations take seconds. Use it as a context
    manager and call `bar.update(n)`.
    """
    from tqdm.auto import tqdm

    show = not quick_mode() if progress is None else bool(progress)
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not show, dynamic_ncols=True)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict, device) -> dict:
    """Move every tensor of a batch to `device` (other values pass through)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off and no gradients inside the block; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row (B,), for right AND left padding alike."""
    B, T = attention_mask.shape
    positions = torch.arange(T, device=attention_mask.device).expand(B, T)  # (B, T)
    # padding positions count as -1, so the max is the last position whose mask is 1
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values  # (B,)


def check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """One-line errors for the batch shapes every loss here expects."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be (B, T)")
    if input_ids.shape[0] == 0:
        raise ValueError("empty batch: at least one example is needed")
    if (attention_mask.sum(dim=1) == 0).any():
        row = int((attention_mask.sum(dim=1) == 0).nonzero()[0])
        raise ValueError(f"row {row} of the batch has no real token (its attention_mask is all 0)")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` so that a reader never sees half a file: temp file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX and Windows when both are on one filesystem
    return path


# ------------------------------------------------------------------------------------- the task interface


@dataclass
class TaskOutputs:
    """What one forward of a task gives: output logits, which of them count, and the task loss.

    Built for notebook 06 (smart); see the module docstring for the shapes of each task. `mask` has the shape of
    `logits` without its last dim; `loss` is None for a batch without labels.
    """

    logits: torch.Tensor
    mask: torch.Tensor
    loss: torch.Tensor | None = None

    def log_probs(self) -> torch.Tensor:
        """(N, K) float32 log-softmax of the N counted distributions: the rows a divergence compares."""
        return F.log_softmax(self.logits[self.mask].float(), dim=-1)  # (N, K)


class Task:
    """What both tasks share: the token embeddings and the loss from given input embeddings.

    Built for notebook 06 (smart). A subclass writes `outputs(model, batch, inputs_embeds=None) -> TaskOutputs`;
    `loss` is that forward's loss, so the plain loss and the loss from `embeddings(model, batch)` are one code path.
    """

    name: str
    metric: str
    higher_is_better: bool

    def embeddings(self, model, batch: dict) -> torch.Tensor:
        """The model's token embeddings of the batch (B, T, C): what SMART perturbs, then passes as inputs_embeds."""
        return token_embeddings(model, batch["input_ids"])  # (B, T, C)

    def outputs(self, model, batch: dict, inputs_embeds: torch.Tensor | None = None) -> TaskOutputs:
        raise NotImplementedError

    def loss(self, model, batch: dict, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The task loss on one batch, from the token ids or, when given, from `inputs_embeds` (B, T, C)."""
        out = self.outputs(model, batch, inputs_embeds)
        if out.loss is None:
            raise ValueError(f"the {self.name} batch gives no loss (no labels?)")
        return out.loss


class Objective:
    """A task whose loss has an extra term: loss = task.loss + extra(model, batch, outputs).

    Built for the method notebooks (06 smart: the adversarial and the Bregman terms). The training loop sees a task
    like any other: name, metric, train_set, collate, evaluate (the task's own metrics, no extra term) and every
    other attribute come from `task`; `describe()` adds the term to the run record under "extra_losses" (its
    `describe()` dict when it has one, else its name). `extra(model, batch, outputs)` returns a scalar tensor and
    receives the clean `TaskOutputs` of the same forward (with their graph), so it needs no second clean forward.
    Objectives nest: Objective(Objective(task, a), b) adds both terms.
    """

    def __init__(self, task, extra: Callable, name: str | None = None):
        if not callable(extra):
            raise TypeError(f"extra must be a function (model, batch, outputs) -> scalar, got {type(extra).__name__}")
        self.task, self.extra = task, extra
        self.extra_name = name or getattr(extra, "name", None) or getattr(extra, "__name__", type(extra).__name__)

    name = property(lambda self: self.task.name)
    metric = property(lambda self: self.task.metric)
    higher_is_better = property(lambda self: self.task.higher_is_better)
    train_set = property(lambda self: self.task.train_set)

    def collate(self, examples, *args, **kwargs) -> dict:
        return self.task.collate(examples, *args, **kwargs)

    def evaluate(self, model, *args, **kwargs) -> dict:
        # Pass on only the keywords the wrapped task takes: the loop offers progress=False to any evaluate that takes
        # `progress`, and this wrapper's **kwargs takes everything.
        params = inspect.signature(self.task.evaluate).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        return self.task.evaluate(model, *args, **kwargs)

    def embeddings(self, model, batch: dict) -> torch.Tensor:
        return self.task.embeddings(model, batch)

    def outputs(self, model, batch: dict, inputs_embeds: torch.Tensor | None = None) -> TaskOutputs:
        """The task's outputs, with the extra term added to their loss."""
        out = self.task.outputs(model, batch, inputs_embeds)
        if out.loss is None:
            return out
        term = self.extra(model, batch, out)
        if not torch.is_tensor(term) or term.dim() != 0:
            shape = tuple(term.shape) if torch.is_tensor(term) else type(term).__name__
            raise ValueError(f"extra loss {self.extra_name!r} must return a scalar tensor, got {shape}")
        return replace(out, loss=out.loss + term)

    def loss(self, model, batch: dict, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self.task, "outputs"):
            return Task.loss(self, model, batch, inputs_embeds)
        # a task with only loss(model, batch): the extra term gets no outputs
        if inputs_embeds is not None:
            raise TypeError(f"task {self.name!r} has no outputs(): its loss cannot take inputs_embeds")
        return self.task.loss(model, batch) + self.extra(model, batch, None)

    def describe(self) -> dict:
        record = dict(self.task.describe())
        term = dict(self.extra.describe()) if hasattr(self.extra, "describe") else {"name": self.extra_name}
        record["extra_losses"] = [*record.get("extra_losses", []), term]
        return record

    def __getattr__(self, attr):  # everything else (predict, generate, dev_set, tokenizer, ...) is the task's
        if attr == "task":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.task, attr)

    def __repr__(self) -> str:
        return f"Objective({self.task!r} + {self.extra_name})"


# ---------------------------------------------------------------------------------------------- sonnets

SONNET_LINES = 14  # the generated sonnet is cut to this many lines


class SonnetTask(Task):
    """Causal LM fine-tuning on the training sonnets; chrF of sonnets continued from their first 3 lines.

    Built in notebook 04 (finetune), §2 and §4. `generation` holds keyword arguments for
    `gpt2lab.generate.generate` (temperature, top_k, top_p, num_beams, do_sample); sampling draws from a generator
    seeded by `generate(seed=...)` (0 by default), so a model's dev sonnets and chrF are reproducible.
    `progress` (None: on except in quick mode) shows a bar while the dev sonnets are generated.
    """

    name = "sonnet"

    def __init__(
        self,
        tokenizer,
        train_texts: Sequence[str],
        dev_prompts: Sequence[str],
        dev_gold: Sequence[str],
        max_length: int = 1024,
        max_new_tokens: int = 160,
        generation: dict | None = None,
        metric: str = "chrf",
        gen_batch_size: int = 16,
        progress: bool | None = None,
    ):
        if not train_texts:
            raise ValueError("SonnetTask needs at least one training sonnet")
        if len(dev_prompts) != len(dev_gold):
            raise ValueError(f"{len(dev_prompts)} dev prompts but {len(dev_gold)} gold sonnets: one gold per prompt")
        if metric not in ("chrf", "dev_loss"):
            raise ValueError(f"metric must be 'chrf' or 'dev_loss', not {metric!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.gen_batch_size = gen_batch_size
        self.progress = progress
        self.generation = dict(generation or {"do_sample": True, "temperature": 0.8, "top_p": 0.9})
        self.metric, self.higher_is_better = metric, metric == "chrf"
        self.train_set = [self.encode(t) for t in train_texts]
        self.dev_prompts, self.dev_gold = list(dev_prompts), list(dev_gold)
        self.dev_set = [self.encode(t) for t in self.dev_gold]

    @classmethod
    def load(cls, tokenizer=None, train_limit: int | None = None, dev_limit: int | None = None, **kwargs):
        """The course data: training sonnets 1-131, dev prompts and gold sonnets 132-143 (limits cut subsets)."""
        from . import data
        from . import tokenizer as tok

        tokenizer = tokenizer or tok.load()
        train = [s.text for s in data.load_sonnets("train")[:train_limit]]
        prompts = [s.text for s in data.load_sonnets("dev")[:dev_limit]]
        gold = [s.text for s in data.load_sonnets("dev", gold=True)[:dev_limit]]
        return cls(tokenizer, train, prompts, gold, **kwargs)

    def encode(self, text: str) -> list[int]:
        """A sonnet's token ids followed by <|endoftext|> (so the model learns where a sonnet ends).

        Longer than max_length: cut to its first max_length tokens (a sonnet is ~150 tokens, so this only
        happens with the tiny quick-mode models).
        """
        return (self.tokenizer.encode(text) + [self.tokenizer.eos_token_id])[: self.max_length]

    def collate(self, examples: Sequence[list[int]]) -> dict:
        """Right-padded batch: input_ids and attention_mask, both (B, T)."""
        if len(examples) == 0:
            raise ValueError("empty batch: at least one sonnet is needed")
        width = max(len(e) for e in examples)
        ids = torch.full((len(examples), width), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
        for row, seq in enumerate(examples):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def outputs(self, model, batch: dict, inputs_embeds: torch.Tensor | None = None) -> TaskOutputs:
        """Next-token logits (B, T, V), the (B, T) positions whose target is a real token, and the LM loss.

        The loss is the mean next-token cross-entropy over the real tokens of a right-padded batch (padding is
        -100, `lm_loss`). With `inputs_embeds` (B, T, C) the model runs on those instead of the token lookup.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        check_batch(ids, mask)
        check_embeds(ids, inputs_embeds)
        logits = model_logits(model, ids, mask, inputs_embeds)  # (B, T, V)
        real = mask.bool()
        counted = F.pad(real[:, :-1] & real[:, 1:], (0, 1), value=False)  # (B, T): t and t + 1 both real
        return TaskOutputs(logits, counted, lm_loss(logits, ids, mask))

    def dev_loss(self, model, batch_size: int = 8) -> float:
        """Token-weighted LM loss on the gold dev sonnets (teacher forcing): a smooth curve beside chrF."""
        device, total, count = model_device(model), 0.0, 0
        with eval_mode(model):
            for i in range(0, len(self.dev_set), batch_size):
                batch = to_device(self.collate(self.dev_set[i : i + batch_size]), device)
                n = int(batch["attention_mask"][:, 1:].sum())  # real targets (right padding)
                total += float(self.loss(model, batch)) * n
                count += n
        return total / max(count, 1)

    def generate(self, model, prompts: Sequence[str] | None = None, seed: int | None = 0,
                 progress: bool | None = None, **overrides) -> list[str]:
        """Whole sonnets: each prompt (3 lines) + its continuation, cut at <|endoftext|> and at 14 lines.

        Built in notebook 04 (finetune), §4. `overrides` replace entries of `self.generation` for this call;
        `seed` seeds a generator of its own for the sampling (None: torch's global RNG). Prompts are generated in
        batches of `gen_batch_size`, left-padded as `gpt2lab.generate` expects. `progress`: a bar over the prompts
        (None: the task's `progress`).
        """
        from .generate import generate

        settings = {**self.generation, **overrides}
        prompts = [p.rstrip("\n") + "\n" for p in (self.dev_prompts if prompts is None else prompts)]
        if not prompts:
            raise ValueError("no prompts to continue")
        device, eos = model_device(model), self.tokenizer.eos_token_id
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        sonnets = []
        show = self.progress if progress is None else progress
        with eval_mode(model), progress_bar(len(prompts), f"{self.name} dev", "sonnet", show) as bar:
            for i in range(0, len(prompts), self.gen_batch_size):
                chunk = prompts[i : i + self.gen_batch_size]
                # the last max_length // 2 prompt tokens at most, so there is room to write
                ids, mask = self.tokenizer.encode_batch(chunk, padding_side="left", max_length=None)
                ids, mask = ids[:, -(self.max_length // 2) :], mask[:, -(self.max_length // 2) :]  # (B, T)
                room = min(self.max_new_tokens, self.max_length - ids.shape[1])
                out = generate(model, ids.to(device), room, attention_mask=mask.to(device), eos_token_id=eos,
                               generator=generator, **settings)  # (B, T + new)
                for prompt, row in zip(chunk, out[:, ids.shape[1] :].tolist()):
                    if eos in row:
                        row = row[: row.index(eos)]
                    text = prompt + self.tokenizer.decode(row)
                    sonnets.append("\n".join(text.rstrip().split("\n")[:SONNET_LINES]))
                bar.update(len(chunk))
        return sonnets

    def evaluate(self, model, progress: bool | None = None) -> dict:
        """chrF of the generated dev sonnets against the gold ones, and the dev LM loss."""
        hypotheses = self.generate(model, progress=progress)
        return {"chrf": metrics.chrf(hypotheses, self.dev_gold), "dev_loss": self.dev_loss(model)}

    def describe(self) -> dict:
        return {"name": self.name, "train": len(self.train_set), "dev": len(self.dev_prompts),
                "max_length": self.max_length, "max_new_tokens": self.max_new_tokens,
                "generation": self.generation, "metric": self.metric}


# ------------------------------------------------------------------------------------------- paraphrase

# ONE prompt for every split. It ends with a newline, so the answer is the first word of a new line and the
# tokenizer writes it without a leading space: "yes" = 8505, "no" = 3919 (asserted in ParaphraseTask).
CLOZE_PROMPT = 'Question 1: "{s1}"\nQuestion 2: "{s2}"\nAre these two questions asking the same thing, yes or no?\n'
NO_ID, YES_ID = 3919, 8505
ANSWER_IDS = (NO_ID, YES_ID)  # column 0 = "no" = label 0, column 1 = "yes" = label 1, so argmax = label


def cloze_prompt(sentence1: str, sentence2: str) -> str:
    """The paraphrase question as text; the model's next token should be "yes" or "no"."""
    return CLOZE_PROMPT.format(s1=sentence1, s2=sentence2)


def last_token_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits at the last real token of each row, (B, V).

    A GPT2 (anything with `hidden_states` and `head`) runs its blocks, then the head on those B positions only:
    the same numbers as slicing the full (B, T, V) logits, without the head over every position (most of a
    small model's cost). Other models: full logits, then the slice. `inputs_embeds` (B, T, C) replaces the token
    lookup (input_ids still give the shapes).
    """
    check_batch(input_ids, attention_mask)
    check_embeds(input_ids, inputs_embeds)
    last = last_token_index(attention_mask)  # (B,)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if hasattr(model, "hidden_states") and hasattr(model, "head"):
        if inputs_embeds is None:
            hidden = model.hidden_states(input_ids, attention_mask)  # (B, T, C)
        else:
            hidden = model.hidden_states(None, attention_mask, inputs_embeds=inputs_embeds)  # (B, T, C)
        return model.head(hidden[rows, last])  # (B, V)
    return model_logits(model, input_ids, attention_mask, inputs_embeds)[rows, last]  # (B, V)


def answer_logits(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) logits of ("no", "yes") read at the last real token of each row (any padding side)."""
    last = last_token_index(attention_mask)  # (B,)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last][:, list(ANSWER_IDS)]  # (B, 2)


def cloze_loss(logits: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the two answer logits (a 2-way softmax over "no"/"yes"), averaged over the batch.

    Built in notebook 04 (finetune), §5; ParaphraseTask.loss calls this function. logits (B, T, V), attention_mask
    (B, T) with any padding side, labels (B,) 0/1. We use the two answer logits, not the whole vocabulary: the
    prediction compares exactly these two, so the loss trains exactly what is measured.
    """
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels {tuple(labels.shape)} must be (B,) = ({logits.shape[0]},): one 0/1 label per row")
    return F.cross_entropy(answer_logits(logits, attention_mask).float(), labels)


def cloze_predict(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """1 where "yes" beats "no" at the last real token, else 0: (B,).

    Built in notebook 04 (finetune), §5; ParaphraseTask.predict calls this function.
    """
    return answer_logits(logits, attention_mask).argmax(dim=-1)


def last_position_only(last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits of the last real tokens -> (B, 1, V) logits and their (B, 1) all-real mask.

    `last_token_logits` runs the head at the last real token only; seen as a batch of one-position rows, those
    logits go through the very same cloze_loss / cloze_predict as full (B, T, V) logits would.
    """
    return last[:, None, :], torch.ones(last.shape[0], 1, dtype=torch.long, device=last.device)  # (B, 1, V), (B, 1)


class ParaphraseTask(Task):
    """Quora duplicate-question detection as a yes/no cloze. Built in notebook 04 (finetune), §5.

    Prompts longer than `max_length` tokens: the longer question is cut token by token until the prompt fits,
    with one warning per batch saying how many were cut (the template and the answer position are never cut).
    `progress` (None: on except in quick mode) shows a bar while the dev pairs are predicted.
    """

    name = "paraphrase"
    metric, higher_is_better = "accuracy", True

    def __init__(self, tokenizer, train_pairs, dev_pairs, test_pairs=(), max_length: int = 1024,
                 eval_batch_size: int = 32, progress: bool | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eval_batch_size = eval_batch_size
        self.progress = progress
        self.train_set, self.dev_set, self.test_set = list(train_pairs), list(dev_pairs), list(test_pairs)
        self._lengths: dict = {}  # pair -> prompt tokens, for example_length
        self._check_answer_tokens()
        self._overhead = len(tokenizer.encode(cloze_prompt("", "")))
        if self._overhead + 2 > max_length:
            raise ValueError(f"max_length {max_length} cannot hold the cloze template ({self._overhead} tokens)")

    def _check_answer_tokens(self) -> None:
        """The answer must be ONE token appended to the prompt's tokens: "yes" 8505 / "no" 3919."""
        prompt = cloze_prompt("How do I learn Python?", "What is the best way to learn Python?")
        ids = self.tokenizer.encode(prompt)
        for word, expected in (("no", NO_ID), ("yes", YES_ID)):
            full = self.tokenizer.encode(prompt + word)
            if full != ids + [expected]:
                raise ValueError(f"the tokenizer does not write the answer {word!r} as the single token {expected} "
                                 f"after the prompt (got {full[len(ids) - 1:]}); is it GPT-2's BPE?")

    @classmethod
    def load(cls, tokenizer=None, train_limit: int | None = None, dev_limit: int | None = None,
             test_limit: int | None = None, **kwargs):
        """The course data: Quora train / dev (labelled) and test (unlabelled); limits cut subsets."""
        from . import data
        from . import tokenizer as tok

        tokenizer = tokenizer or tok.load()
        train = data.load_quora("train", limit=train_limit).pairs
        dev = data.load_quora("dev", limit=dev_limit).pairs
        test = data.load_quora("test", limit=test_limit).pairs
        return cls(tokenizer, train, dev, test, **kwargs)

    def encode(self, pair) -> tuple[list[int], bool]:
        """Prompt ids of one pair, and whether a question had to be cut to fit max_length."""
        s1, s2 = pair.sentence1, pair.sentence2
        ids = self.tokenizer.encode(cloze_prompt(s1, s2))
        if len(ids) <= self.max_length:
            return ids, False
        t1, t2 = self.tokenizer.encode(s1), self.tokenizer.encode(s2)
        while len(ids) > self.max_length:  # cut the longer question by the excess, re-encode, repeat
            excess = len(ids) - self.max_length
            if len(t1) >= len(t2):
                t1 = t1[: max(len(t1) - excess, 0)]
            else:
                t2 = t2[: max(len(t2) - excess, 0)]
            ids = self.tokenizer.encode(cloze_prompt(self.tokenizer.decode(t1), self.tokenizer.decode(t2)))
        return ids, True

    def example_length(self, pair) -> int:
        """Tokens of one pair's prompt, for batching by length (`gpt2lab.batches`, notebook 09). Kept once measured:
        the runs of a grid share this task, and tokenising 141k pairs takes about 15 s."""
        length = self._lengths.get(pair)
        if length is None:
            length = self._lengths[pair] = len(self.encode(pair)[0])
        return length

    def collate(self, pairs, padding_side: str = "right") -> dict:
        """input_ids, attention_mask (B, T) and labels (B,) (labels only when every pair has one)."""
        if len(pairs) == 0:
            raise ValueError("empty batch: at least one question pair is needed")
        labels = [p.label for p in pairs]
        labelled = any(label is not None for label in labels)
        if labelled:
            bad = next((i for i, label in enumerate(labels)
                        if isinstance(label, bool) or label not in (0, 1)), None)
            if bad is not None:
                raise ValueError(f"pair {pairs[bad].id!r} has label {labels[bad]!r}: labels must be 0 or 1")
        encoded = [self.encode(p) for p in pairs]
        cut = sum(c for _, c in encoded)
        if cut:
            warnings.warn(f"{cut} of {len(pairs)} question pairs were longer than max_length {self.max_length} "
                          "tokens: their longer question was cut to fit", stacklevel=2)
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(pairs), width), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)  # (B, T)
        for row, (seq, _) in enumerate(encoded):
            span = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
            ids[row, span] = torch.tensor(seq, dtype=torch.long)
            mask[row, span] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if labelled:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)  # (B,)
        return batch

    def outputs(self, model, batch: dict, inputs_embeds: torch.Tensor | None = None) -> TaskOutputs:
        """("no", "yes") logits (B, 2) at the last real token, all B counted, and the cloze loss (with labels).

        With `inputs_embeds` (B, T, C) the model runs on those instead of the token lookup.
        """
        last = last_token_logits(model, batch["input_ids"], batch["attention_mask"], inputs_embeds)  # (B, V)
        logits, mask = last_position_only(last)  # (B, 1, V), (B, 1)
        # the same number as cloze_loss on the full (B, T, V) logits, without the head over every position
        loss = cloze_loss(logits, mask, batch["labels"]) if "labels" in batch else None
        answers = answer_logits(logits, mask)  # (B, 2)
        return TaskOutputs(answers, torch.ones(answers.shape[0], dtype=torch.bool, device=answers.device), loss)

    def loss(self, model, batch: dict, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy over the two answer logits (`cloze_loss`), from the token ids or from `inputs_embeds`."""
        if "labels" not in batch:
            raise ValueError("this batch has no labels (test pairs?): the loss needs labelled pairs")
        return super().loss(model, batch, inputs_embeds)

    def predict(self, model, pairs=None, padding_side: str = "right", progress: bool | None = None) -> list[int]:
        """0/1 predictions (1 = duplicate) for `pairs` (default: the dev pairs).

        `progress`: a bar over the pairs (None: the task's `progress`; the full dev set is 20,212 pairs).
        """
        pairs = self.dev_set if pairs is None else list(pairs)
        if not pairs:
            raise ValueError("no pairs to predict")
        device, preds = model_device(model), []
        show = self.progress if progress is None else progress
        with eval_mode(model), progress_bar(len(pairs), f"{self.name} predict", "pair", show) as bar:
            for i in range(0, len(pairs), self.eval_batch_size):
                chunk = pairs[i : i + self.eval_batch_size]
                batch = to_device(self.collate(chunk, padding_side=padding_side), device)
                last = last_token_logits(model, batch["input_ids"], batch["attention_mask"])  # (B, V)
                preds += cloze_predict(*last_position_only(last)).tolist()
                bar.update(len(chunk))
        return preds

    def evaluate(self, model, progress: bool | None = None) -> dict:
        """Accuracy and F1 (positive = duplicate) on the dev pairs."""
        pred, gold = self.predict(model, progress=progress), [p.label for p in self.dev_set]
        return {"accuracy": metrics.accuracy(pred, gold), "f1": metrics.f1(pred, gold)}

    def write_predictions(self, model, path: str | os.PathLike, pairs=None) -> Path:
        """CSV `id,label` for the test pairs (or `pairs`), written atomically. Returns the path."""
        pairs = self.test_set if pairs is None else list(pairs)
        preds = self.predict(model, pairs)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id", "label"])
        writer.writerows((p.id, y) for p, y in zip(pairs, preds))
        return atomic_write_text(path, buffer.getvalue())

    def describe(self) -> dict:
        return {"name": self.name, "train": len(self.train_set), "dev": len(self.dev_set),
                "test": len(self.test_set), "max_length": self.max_length, "prompt": CLOZE_PROMPT,
                "answer_ids": {"no": NO_ID, "yes": YES_ID}, "loss": "cross-entropy over the two answer logits"}
