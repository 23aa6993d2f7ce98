"""gpt2lab.tasks: batching, the two losses against hand computations, padding invariance, generation + chrF,
predictions file, bad inputs, overfitting one batch (notebook 04's checks are tested in test_checks_finetune.py)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_tasks import PAIRS, tiny_model

from gpt2lab import metrics, tasks
from gpt2lab.data import QuoraPair
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.train import TrainConfig, train

SONNETS = [
    "From fairest creatures we desire increase,\nThat thereby beauty's rose might never die,",
    "When forty winters shall besiege thy brow\nAnd dig deep trenches in thy beauty's field,\n"
    "Thy youth's proud livery, so gazed on now,",
    "Shall I compare thee to a summer's day?",
]


@pytest.fixture
def sonnet_task(tokenizer):
    return tasks.SonnetTask(tokenizer, SONNETS, ["Shall I compare thee\nto a summer's day"],
                            ["Shall I compare thee\nto a summer's day\nThou art more lovely"], max_length=64,
                            max_new_tokens=12)


@pytest.fixture
def paraphrase_task(tokenizer):
    return tasks.ParaphraseTask(tokenizer, PAIRS, PAIRS[:3], [QuoraPair("t1", "a?", "b?", None)], max_length=128)


# ----------------------------------------------------------------------------------------------- sonnets


def test_sonnet_batches_are_right_padded_with_eos(sonnet_task, tokenizer):
    batch = sonnet_task.collate(sonnet_task.train_set[:2])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = [len(tokenizer.encode(s)) + 1 for s in SONNETS[:2]]
    assert mask.sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert ids[row, n - 1] == tokenizer.eos_token_id  # every sonnet ends with <|endoftext|>
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding


def test_sonnet_padding_does_not_change_the_loss(sonnet_task):
    model = tiny_model()
    model.eval()
    examples = sonnet_task.train_set[:2]
    batch = sonnet_task.collate(examples)
    loss = sonnet_task.loss(model, batch)
    # = the token-weighted mean of each sonnet's loss computed alone, without any padding
    total, count = 0.0, 0
    for seq in examples:
        ids = torch.tensor([seq])
        logits = model(ids)
        n = len(seq) - 1
        total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += n
    assert loss.item() == pytest.approx(total / count, abs=1e-5)
    # more padding, or a different pad token, changes nothing
    wider = {k: F.pad(v, (0, 9), value=0) for k, v in batch.items()}
    wider["input_ids"][:, -9:] = 123
    assert sonnet_task.loss(model, wider).item() == pytest.approx(loss.item(), abs=1e-6)
    # while a loss that does not mask the padding does change (so the test can fail)
    unmasked = F.cross_entropy(model(wider["input_ids"], wider["attention_mask"])[:, :-1].reshape(-1, 50257),
                               wider["input_ids"][:, 1:].reshape(-1))
    assert abs(unmasked.item() - loss.item()) > 1e-3


def test_sonnet_bad_inputs(sonnet_task, tokenizer):
    with pytest.raises(ValueError, match="empty batch"):
        sonnet_task.collate([])
    with pytest.raises(ValueError, match="one gold per prompt"):
        tasks.SonnetTask(tokenizer, SONNETS, ["a"], [], max_length=64)
    with pytest.raises(ValueError, match="at least one training sonnet"):
        tasks.SonnetTask(tokenizer, [], [], [])
    with pytest.raises(ValueError, match="no real token"):
        sonnet_task.loss(tiny_model(), {"input_ids": torch.zeros(2, 3, dtype=torch.long),
                                        "attention_mask": torch.tensor([[1, 1, 0], [0, 0, 0]])})


def test_sonnet_truncates_to_max_length(tokenizer):
    task = tasks.SonnetTask(tokenizer, ["word " * 100], [], [], max_length=16)
    assert len(task.train_set[0]) == 16


def test_generated_sonnets_start_with_the_prompt_and_score_with_chrf(sonnet_task, tokenizer):
    model = tiny_model()
    prompts = ["Shall I compare thee\nto a summer's day", "When forty winters\nshall besiege thy brow\nAnd dig"]
    greedy = sonnet_task.generate(model, prompts, do_sample=False)
    assert len(greedy) == 2
    for prompt, text in zip(prompts, greedy):
        assert text.startswith(prompt + "\n")
        assert len(text.split("\n")) <= tasks.SONNET_LINES
    # batched, left-padded generation gives each prompt the continuation it gets alone (greedy)
    alone = [sonnet_task.generate(model, [p], do_sample=False)[0] for p in prompts]
    assert alone == greedy
    # sampling with a seed is reproducible; a different seed differs
    a = sonnet_task.generate(model, prompts, seed=1, do_sample=True, temperature=1.0)
    assert a == sonnet_task.generate(model, prompts, seed=1, do_sample=True, temperature=1.0)
    assert a != sonnet_task.generate(model, prompts, seed=2, do_sample=True, temperature=1.0)
    result = sonnet_task.evaluate(model)
    hyps = sonnet_task.generate(model)
    assert result["chrf"] == pytest.approx(metrics.chrf(hyps, sonnet_task.dev_gold))
    assert math.isfinite(result["dev_loss"]) and result["dev_loss"] > 0


def test_generation_stops_at_eos(tokenizer):
    class EosGPT2(GPT2):  # always predicts <|endoftext|>
        def head(self, hidden):
            return super().head(hidden).index_fill(-1, torch.tensor([tokenizer.eos_token_id]), 1e4)

    task = tasks.SonnetTask(tokenizer, SONNETS, [], [], max_length=64, max_new_tokens=10)
    torch.manual_seed(0)
    model = EosGPT2(GPT2Config.tiny())
    out = task.generate(model, ["Line one\nline two"], do_sample=False)
    assert out == ["Line one\nline two"]  # nothing after the prompt: the model said "end" at once


def test_sonnet_task_loads_course_data(sonnet_data, tokenizer):
    task = tasks.SonnetTask.load(tokenizer, train_limit=3, dev_limit=2)
    assert len(task.train_set) == 3 and len(task.dev_prompts) == 2
    for prompt, gold in zip(task.dev_prompts, task.dev_gold):
        assert gold.startswith(prompt)  # the prompts are the gold sonnets' first 3 lines


# -------------------------------------------------------------------------------------------- paraphrase


def test_answer_tokens_are_yes_8505_no_3919(tokenizer):
    assert tokenizer.encode("yes") == [8505] and tokenizer.encode("no") == [3919]
    assert tasks.ANSWER_IDS == (3919, 8505)
    prompt = tasks.cloze_prompt("Is it?", "Is it really?")
    assert tokenizer.encode(prompt + "yes") == tokenizer.encode(prompt) + [8505]
    assert tokenizer.encode(prompt + "no") == tokenizer.encode(prompt) + [3919]


def test_one_prompt_for_every_split(paraphrase_task, tokenizer):
    pair = PAIRS[0]
    expected = tokenizer.encode(tasks.cloze_prompt(pair.sentence1, pair.sentence2))
    for split in ("train", "dev", "test"):
        as_split = QuoraPair(pair.id, pair.sentence1, pair.sentence2, None if split == "test" else pair.label)
        batch = paraphrase_task.collate([as_split])
        assert batch["input_ids"][0].tolist() == expected
        assert ("labels" in batch) == (split != "test")


def test_cloze_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50257, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # right, none, left padding
    labels = torch.tensor([1, 0, 1])
    last = [2, 4, 4]
    hand = 0.0
    for row in range(3):
        no, yes = logits[row, last[row], 3919].item(), logits[row, last[row], 8505].item()
        gold = yes if labels[row] == 1 else no
        hand += -(gold - math.log(math.exp(no) + math.exp(yes)))
    assert tasks.cloze_loss(logits, mask, labels).item() == pytest.approx(hand / 3, abs=1e-5)
    preds = [int(logits[r, last[r], 8505] > logits[r, last[r], 3919]) for r in range(3)]
    assert tasks.cloze_predict(logits, mask).tolist() == preds


def test_task_loss_reads_the_last_real_token(paraphrase_task):
    model = tiny_model()
    model.eval()
    batch = paraphrase_task.collate(PAIRS)
    full = model(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
    expected = tasks.cloze_loss(full, batch["attention_mask"], batch["labels"])
    assert paraphrase_task.loss(model, batch).item() == pytest.approx(expected.item(), abs=1e-5)

    class LogitsOnly(torch.nn.Module):  # no hidden_states/head: the task takes the full-logits path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, attention_mask=None):
            return self.inner(ids, attention_mask)

    assert paraphrase_task.loss(LogitsOnly(model), batch).item() == pytest.approx(expected.item(), abs=1e-5)


def test_left_and_right_padding_give_the_same_predictions(paraphrase_task):
    model = tiny_model(seed=3)
    right = paraphrase_task.collate(PAIRS, padding_side="right")
    left = paraphrase_task.collate(PAIRS, padding_side="left")
    assert not torch.equal(right["attention_mask"], left["attention_mask"])
    with torch.no_grad():
        a = tasks.last_token_logits(model, right["input_ids"], right["attention_mask"])[:, list(tasks.ANSWER_IDS)]
        b = tasks.last_token_logits(model, left["input_ids"], left["attention_mask"])[:, list(tasks.ANSWER_IDS)]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert paraphrase_task.predict(model, PAIRS, "right") == paraphrase_task.predict(model, PAIRS, "left")


def test_evaluate_and_predictions_file(paraphrase_task, tmp_path):
    model = tiny_model(seed=1)
    result = paraphrase_task.evaluate(model)
    preds = paraphrase_task.predict(model)
    gold = [p.label for p in paraphrase_task.dev_set]
    assert result == {"accuracy": metrics.accuracy(preds, gold), "f1": metrics.f1(preds, gold)}
    path = paraphrase_task.write_predictions(model, tmp_path / "out" / "predictions.csv", pairs=PAIRS)
    lines = path.read_text().splitlines()
    assert lines[0] == "id,label"
    assert lines[1:] == [f"{p.id},{y}" for p, y in zip(PAIRS, paraphrase_task.predict(model, PAIRS))]
    assert sorted(f.name for f in path.parent.iterdir()) == ["predictions.csv"]  # no temp file left behind
    default = paraphrase_task.write_predictions(model, tmp_path / "test.csv")  # the test split by default
    assert default.read_text().splitlines()[1].startswith("t1,")


def test_paraphrase_bad_inputs(paraphrase_task, tokenizer):
    with pytest.raises(ValueError, match="empty batch"):
        paraphrase_task.collate([])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        paraphrase_task.collate([QuoraPair("x", "a", "b", 2)])
    with pytest.raises(ValueError, match=r"'y' has label None"):
        paraphrase_task.collate([PAIRS[0], QuoraPair("y", "a", "b", None)])
    with pytest.raises(ValueError, match="no labels"):
        paraphrase_task.loss(tiny_model(), paraphrase_task.collate([QuoraPair("t", "a", "b", None)]))
    with pytest.raises(ValueError, match="cannot hold the cloze template"):
        tasks.ParaphraseTask(tokenizer, PAIRS, PAIRS, max_length=10)


def test_long_prompts_are_cut_with_a_warning(tokenizer):
    task = tasks.ParaphraseTask(tokenizer, PAIRS, PAIRS, max_length=40)
    long = QuoraPair("long", "word " * 60 + "end?", "short question?", 1)
    with pytest.warns(UserWarning, match="1 of 2 question pairs were longer than max_length 40"):
        batch = task.collate([long, PAIRS[1]])
    ids = batch["input_ids"][0].tolist()
    assert len(ids) <= 40
    suffix = tokenizer.encode(tasks.cloze_prompt("", ""))[-8:]  # the template's end survives: the answer follows it
    assert ids[len(ids) - 8 :] == suffix
    assert "short question?" in tokenizer.decode(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.collate(PAIRS[:2])  # short pairs: no warning


def test_paraphrase_task_loads_course_data(quora_data, tokenizer):
    task = tasks.ParaphraseTask.load(tokenizer, train_limit=5, dev_limit=4, test_limit=3)
    assert (len(task.train_set), len(task.dev_set), len(task.test_set)) == (5, 4, 3)
    assert all(p.label is None for p in task.test_set)


# ------------------------------------------------------------------------------------ overfit one batch


def test_overfit_one_batch_sonnets(tokenizer):
    task = tasks.SonnetTask(tokenizer, SONNETS[:2], [], [], max_length=32)
    model = tiny_model()
    record = train(model, task, torch.optim.AdamW,
                   TrainConfig(epochs=50, batch_size=2, lr=1e-2, evaluate=False, out_dir=None, progress=False,
                               log_every=1))
    first, last = record["loss_log"][0][1], record["loss_log"][-1][1]
    assert first > 8 and last < 0.05, (first, last)


def test_overfit_one_batch_paraphrase(tokenizer):
    task = tasks.ParaphraseTask(tokenizer, PAIRS, PAIRS, max_length=64)
    model = tiny_model()
    record = train(model, task, torch.optim.AdamW,
                   TrainConfig(epochs=40, batch_size=4, lr=3e-3, evaluate=False, out_dir=None, progress=False,
                               log_every=1))
    assert record["loss_log"][-1][1] < 0.02, record["loss_log"][-5:]
    assert task.evaluate(model) == {"accuracy": 1.0, "f1": 1.0}


# --------------------------------------------------------------------------------------- cloze functions
# (notebook 04's checks are tested in test_checks_finetune.py)


def test_paraphrase_task_trains_and_predicts_with_the_library_cloze_functions(paraphrase_task, monkeypatch):
    """No second copy: ParaphraseTask.loss / predict go through tasks.cloze_loss / tasks.cloze_predict."""
    model = tiny_model()
    batch = paraphrase_task.collate(PAIRS)
    calls = []
    real_loss, real_predict = tasks.cloze_loss, tasks.cloze_predict
    monkeypatch.setattr(tasks, "cloze_loss", lambda *a: calls.append("loss") or real_loss(*a))
    monkeypatch.setattr(tasks, "cloze_predict", lambda *a: calls.append("predict") or real_predict(*a))
    paraphrase_task.loss(model, batch)
    paraphrase_task.predict(model, PAIRS)
    assert calls == ["loss", "predict"]
    # a planted bug in the library copy changes the task's loss: the task has no copy of its own
    monkeypatch.setattr(tasks, "cloze_loss", lambda lg, m, lab: real_loss(lg, m, 1 - lab))
    with torch.no_grad():
        flipped = paraphrase_task.loss(model, batch).item()
    monkeypatch.setattr(tasks, "cloze_loss", real_loss)
    with torch.no_grad():
        assert flipped != pytest.approx(paraphrase_task.loss(model, batch).item(), abs=1e-6)


def test_cloze_loss_rejects_labels_of_the_wrong_shape():
    logits = torch.zeros(2, 3, 50257)
    with pytest.raises(ValueError, match="one 0/1 label per row"):
        tasks.cloze_loss(logits, torch.ones(2, 3, dtype=torch.long), torch.tensor([[1], [0]]))


# ------------------------------------------------------------------------------ wrapped models, progress bars


class Forwards(torch.nn.Module):
    """A module that holds a GPT2 and forwards to it, with GPT2's whole forward signature (an adapter wrapper)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.inner(input_ids, attention_mask, **kwargs)


def test_tasks_accept_a_wrapped_model(sonnet_task, paraphrase_task):
    model = tiny_model(seed=6).eval()
    wrapped = Forwards(model)
    for task in (sonnet_task, paraphrase_task):
        batch = task.collate(task.train_set[:3])
        embeds = task.embeddings(wrapped, batch)  # the token embedding of the GPT2 inside
        torch.testing.assert_close(embeds, task.embeddings(model, batch), atol=0, rtol=0)
        with torch.no_grad():
            expected = task.loss(model, batch).item()
            assert task.loss(wrapped, batch).item() == pytest.approx(expected, abs=1e-6)
            assert task.loss(wrapped, batch, inputs_embeds=embeds).item() == pytest.approx(expected, abs=1e-6)
    greedy = dict(do_sample=False)
    assert sonnet_task.generate(wrapped, **greedy) == sonnet_task.generate(model, **greedy)
    assert paraphrase_task.predict(wrapped, PAIRS) == paraphrase_task.predict(model, PAIRS)


def test_long_evaluations_show_a_progress_bar(paraphrase_task, sonnet_task, monkeypatch, capsys):
    model = tiny_model(seed=7)
    monkeypatch.setenv("GPT2LAB_QUICK", "0")
    paraphrase_task.predict(model, PAIRS)  # default: a bar outside quick mode
    # a bar over the 4 pairs (tqdm redraws at most every 0.1 s and leave=False clears it, so a fast run shows 0/4)
    assert re.search(r"paraphrase predict: .*\d/4 ", capsys.readouterr().err)
    paraphrase_task.evaluate(model, progress=False)
    assert capsys.readouterr().err == ""
    sonnet_task.evaluate(model)
    assert "sonnet" in capsys.readouterr().err
    monkeypatch.setenv("GPT2LAB_QUICK", "1")  # quick mode: silent unless asked
    paraphrase_task.evaluate(model)
    sonnet_task.generate(model)
    assert capsys.readouterr().err == ""
    paraphrase_task.predict(model, PAIRS, progress=True)
    assert "pair" in capsys.readouterr().err
    quiet = tasks.ParaphraseTask(paraphrase_task.tokenizer, PAIRS, PAIRS, max_length=128, progress=False)
    monkeypatch.setenv("GPT2LAB_QUICK", "0")
    quiet.evaluate(model)  # the task's own setting (what train(), which calls evaluate(model), gets)
    assert capsys.readouterr().err == ""
