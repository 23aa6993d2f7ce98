"""gpt2lab.parallel and the loop's multi-process and length-batching paths (notebook 09, experiments).

Two processes (torchrun, gloo on the CPU) training with a global batch equal one process on the same batches, for a
token-mean loss with uneven lengths across ranks and an example-mean (cloze) loss with uneven shares; only rank 0
writes files; an interrupted two-process run resumes exactly. Length batching: a function of (seed, epoch), every
example once, less padding, exact resume. All the two-process runs share one torchrun launch (its start-up is most
of the cost).
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_tasks import PAIRS, CharTokenizer, tiny_model

from gpt2lab import parallel
from gpt2lab.data import QuoraPair
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.tasks import ParaphraseTask, SonnetTask
from gpt2lab.train import TrainConfig, epoch_order, example_length, length_batches, loss_terms, train

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------ the runs both sides make


class UnevenLM(SonnetTask):
    """A character LM whose examples run from 7 to 44 tokens, so two ranks' shares hold different token counts."""

    def __init__(self, n_train: int = 11):
        line = "shall I compare thee to a summer's day? "
        texts = [f"{i}:" + line[: 4 + 7 * (i % 6)] for i in range(n_train)]
        super().__init__(CharTokenizer(), texts, ["dev a"], ["dev sonnet one, dev sonnet two"], max_length=48,
                         metric="dev_loss")

    def evaluate(self, model):
        return {"dev_loss": self.dev_loss(model)}


def lm_model(dropout: float = 0.0, seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config.tiny(vocab_size=64, n_positions=48, n_embd=32, n_head=2, dropout=dropout))


def cloze_pairs(n: int) -> list:
    """n labelled Quora-style pairs of different lengths (PAIRS with longer and longer first questions)."""
    return [QuoraPair(f"{p.id}{k}", p.sentence1 + " Really?" * k, p.sentence2, p.label)
            for k in range(n // len(PAIRS) + 1) for p in PAIRS][:n]


# SGD, not Adam, for runs compared within float rounding: Adam divides by sqrt(v), so on a parameter whose true
# gradient is zero (the key bias: softmax ignores it) the rounding noise of summing in another order becomes a
# full-size step. SGD keeps a rounding difference at rounding size.
OPTIMIZER = functools.partial(torch.optim.SGD, momentum=0.9)


def scenario(name: str, out_dir=None, tokenizer=None, **overrides):
    """(model, task, config) of one test run. 11 sonnets / 7 pairs in global batches of 4: the last batch of each
    epoch is short, so in two processes one rank gets 2 examples and the other 1."""
    base = dict(epochs=2, batch_size=4, lr=0.3, eval_every=2, seed=5, progress=False, log_every=1,
                schedule="linear", warmup_steps=1, out_dir=None if out_dir is None else str(out_dir), run_name=name)
    if name.startswith("lm"):
        model, task = lm_model(dropout=0.1 if "dropout" in name else 0.0), UnevenLM()
        base.update(checkpoint_every=2)
    else:  # the cloze: an example-mean loss; accuracy ties on a random model, so keep the last weights
        model = tiny_model(seed=1)
        task = ParaphraseTask(tokenizer, cloze_pairs(7), PAIRS, max_length=128, progress=False)
        base.update(restore_best=False)
    base.update(overrides)
    return model, task, TrainConfig(**base)


# ------------------------------------------------------------------------------------------ the two processes

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import gpt2lab.train as train_module
    from gpt2lab import parallel, runs
    from gpt2lab.lora import add_lora
    from gpt2lab.optim import AdaPreLoRA
    from test_parallel import OPTIMIZER, scenario
    from gpt2lab.train import train

    rank, world, device = parallel.init_from_env()
    out = {out!r}
    writes = []  # every file this process writes through the loop

    def logged(fn, what):
        def wrapper(*args, **kwargs):
            writes.append(what)
            return fn(*args, **kwargs)
        return wrapper

    runs.save_checkpoint = logged(runs.save_checkpoint, "checkpoint")
    runs.atomic_save = logged(runs.atomic_save, "best")
    train_module.atomic_write_text = logged(train_module.atomic_write_text, "record")
    runs.RunLock.__enter__ = logged(runs.RunLock.__enter__, "lock")

    result = {{"rank": rank, "world": world, "device": str(device), "records": {{}}}}
    tokenizer = None
    if {cloze!r}:
        from gpt2lab import tokenizer as tok
        tokenizer = tok.load()
    for name in ["lm", "lm-dropout"] + (["cloze"] if {cloze!r} else []):
        model, task, config = scenario(name, out + "/runs", tokenizer)
        result["records"][name] = train(model, task, OPTIMIZER, config)
        torch.save(model.state_dict(), f"{{out}}/{{name}}-rank{{rank}}.pt")

    def interrupt(loop):  # on every rank, after the same step
        if loop.step == 3:
            raise KeyboardInterrupt

    model, task, config = scenario("lm-dropout-resumed", out + "/runs")
    try:
        train(model, task, OPTIMIZER, config, callbacks=[interrupt])
    except KeyboardInterrupt:
        pass
    model, task, config = scenario("lm-dropout-resumed", out + "/runs", resume=True)
    torch.nn.init.normal_(model.transformer.wte.weight)  # other weights: all must come from the checkpoint
    result["records"]["resumed"] = train(model, task, OPTIMIZER, config)
    torch.save(model.state_dict(), f"{{out}}/resumed-rank{{rank}}.pt")

    model, task, config = scenario("lm")
    try:
        train(add_lora(model, rank=2), task, lambda model, lr: AdaPreLoRA(model, lr), config)
    except ValueError as err:
        result["refused"] = str(err)
    result["writes"] = writes
    with open(f"{{out}}/rank{{rank}}.json", "w") as f:
        json.dump(result, f, default=str)
    parallel.destroy()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, request):
    """One torchrun launch of 2 gloo processes running every scenario; returns (out folder, rank 0's and rank 1's
    results). The cloze scenario runs when the GPT-2 tokenizer is available."""
    try:
        request.getfixturevalue("tokenizer")
        cloze = True
    except pytest.skip.Exception:
        cloze = False
    out = tmp_path_factory.mktemp("ddp")
    script = out / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), out=str(out), cloze=cloze))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks, cloze


def one_process(name, tokenizer=None):
    model, task, config = scenario(name, tokenizer=tokenizer)
    record = train(model, task, OPTIMIZER, config)
    return model, record


def assert_close_weights(state: dict, model, rel=1e-5):
    """Every tensor within `rel` of the model's, relative to its norm (summing in another order rounds otherwise;
    after 6 steps the largest gap seen is 1e-6)."""
    for name, p in model.state_dict().items():
        gap = float((state[name] - p).norm() / p.norm().clamp_min(1e-12))
        assert gap < rel, f"{name} differs by {gap:.2e} of its norm"


def losses(record) -> list:
    return [loss for _, loss in record["loss_log"]]


@pytest.mark.parametrize("name", ["lm", "cloze"])
def test_two_processes_equal_one_process_with_the_same_global_batch(two_processes, name, request):
    out, (rank0, rank1), cloze = two_processes
    if name == "cloze" and not cloze:
        pytest.skip("the cloze needs the GPT-2 tokenizer (GPT2LAB_DATA)")
    tokenizer = request.getfixturevalue("tokenizer") if name == "cloze" else None
    model, record = one_process(name, tokenizer)
    two = rank0["records"][name]
    assert two["world_size"] == 2 and record["world_size"] == 1
    assert two["steps"] == record["steps"] == (6 if name == "lm" else 4)
    assert [s for s, _ in two["loss_log"]] == [s for s, _ in record["loss_log"]]
    assert losses(two) == pytest.approx(losses(record), rel=1e-6)
    assert two["tokens"] == record["tokens"]  # summed over ranks
    metric = "dev_loss" if name == "lm" else "accuracy"
    assert [e[metric] for e in two["evals"]] == pytest.approx([e[metric] for e in record["evals"]], rel=1e-6)
    for r in (0, 1):  # both ranks end with the one-process weights (after restore_best for the LM)
        assert_close_weights(torch.load(out / f"{name}-rank{r}.pt"), model)
    assert rank1["records"][name] == two  # the other rank returns rank 0's record


@pytest.mark.parametrize("name", ["lm", "cloze"])
def test_per_rank_means_would_not_be_enough(name, request):
    """Not vacuous: on the short last batch of an epoch (shares of 2 and 1 examples) the plain average of the two
    ranks' mean losses misses the global mean by far more than the tolerance above, for the token mean (uneven
    lengths) as for the example mean (uneven shares); weighting by `loss_terms` gives it back."""
    tokenizer = request.getfixturevalue("tokenizer") if name == "cloze" else None
    model, task, config = scenario(name, tokenizer=tokenizer)
    n = len(task.train_set)
    idx = epoch_order(n, config.seed, 0)[(n - 1) // 4 * 4 :]  # (11 or 7 examples: the last 3)
    shares = [task.collate([task.train_set[i] for i in parallel.shard(idx, r, 2)]) for r in (0, 1)]
    with torch.no_grad():
        whole = float(task.loss(model, task.collate([task.train_set[i] for i in idx])))
        halves = [float(task.loss(model, batch)) for batch in shares]
    assert abs(sum(halves) / 2 - whole) > 100 * 1e-6 * whole
    terms = [loss_terms(task, batch) for batch in shares]
    by_hand = [len(parallel.shard(idx, r, 2)) if name == "cloze"  # examples; else targets: each sonnet's tokens - 1
               else sum(len(task.train_set[i]) - 1 for i in parallel.shard(idx, r, 2)) for r in (0, 1)]
    assert terms == by_hand and len(idx) == 3
    assert sum(h * t for h, t in zip(halves, terms)) / sum(terms) == pytest.approx(whole, rel=1e-6)


def test_only_rank_0_writes_files_and_other_ranks_get_its_record(two_processes):
    out, (rank0, rank1), _ = two_processes
    assert rank0["world"] == rank1["world"] == 2 and rank0["device"] == "cpu"
    assert rank1["writes"] == []
    assert {"lock", "checkpoint", "best", "record"} <= set(rank0["writes"])
    record = json.loads((out / "runs" / "lm" / "record.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 6 and not (out / "runs" / "lm" / "lock.json").exists()


def test_an_interrupted_two_process_run_resumes_exactly(two_processes):
    """Dropout on: each rank's RNG is saved in rank 0's checkpoint and restored on its own rank."""
    out, (rank0, rank1), _ = two_processes
    full, resumed = rank0["records"]["lm-dropout"], rank0["records"]["resumed"]
    assert resumed["resumed_from_step"] == 2
    for key in ("evals", "loss_log", "epochs", "best_metric", "steps", "status"):
        assert resumed[key] == full[key], key
    for r in (0, 1):
        a, b = torch.load(out / f"lm-dropout-rank{r}.pt"), torch.load(out / f"resumed-rank{r}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(full) != losses(rank0["records"]["lm"])  # dropout was on: the RNG mattered


def test_adaprelora_is_refused_with_several_processes(two_processes):
    _, (rank0, rank1), _ = two_processes
    for result in (rank0, rank1):
        assert "AdaPreLoRA cannot train with 2 processes" in result["refused"]
        assert "\n" not in result["refused"]


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parallel.init_from_env() == (0, 1, None)
    assert (parallel.rank(), parallel.world_size(), parallel.is_main()) == (0, 1, True)
    parallel.barrier()  # no-op
    assert parallel.broadcast_object({"a": 1}) == {"a": 1}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        parallel.init_from_env()


# ------------------------------------------------------------------------------------------- length batching


def padding(batches, lengths) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_batches_are_a_seeded_partition_with_less_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (1003,), generator=g).tolist()
    batches = length_batches(lengths, 8, seed=3, epoch=1)
    assert batches == length_batches(lengths, 8, seed=3, epoch=1)  # a function of (seed, epoch)
    assert batches != length_batches(lengths, 8, seed=3, epoch=2) != length_batches(lengths, 8, seed=4, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(1003))  # every example once
    assert len(batches) == math.ceil(1003 / 8) and sorted(len(b) for b in batches)[1:] == [8] * 125
    order = epoch_order(1003, 3, 1)
    random_batches = [order[i : i + 8] for i in range(0, 1003, 8)]
    assert padding(batches, lengths) < padding(random_batches, lengths) / 10
    for start in range(0, 1003, 400):  # within each window of 50 batches, the batches come from a sorted order
        window = set(order[start : start + 400])
        inside = sorted((b for b in batches if set(b) <= window), key=lambda b: lengths[b[0]])
        flat = [lengths[i] for b in inside for i in sorted(b, key=lambda i: lengths[i])]
        assert flat == sorted(flat)


def test_example_length_of_both_tasks(tokenizer):
    lm = UnevenLM()
    assert [example_length(lm, ex) for ex in lm.train_set] == [len(lm.collate([ex])["input_ids"][0])
                                                               for ex in lm.train_set]
    cloze = ParaphraseTask(tokenizer, cloze_pairs(5), PAIRS, max_length=128)
    assert [example_length(cloze, p) for p in cloze.train_set] == [int(cloze.collate([p])["attention_mask"].sum())
                                                                   for p in cloze.train_set]
    with pytest.raises(TypeError, match="example_length"):
        example_length(object(), 3.5)
    # measured once per pair: the runs of a grid share the task, so the training set is tokenised once
    cloze.encode = lambda pair: pytest.fail("a pair's length was measured twice")
    assert [example_length(cloze, p) for p in cloze.train_set] == [cloze._lengths[p] for p in cloze.train_set]


def test_train_draws_length_batches_and_resumes_exactly(tmp_path):
    seen = []  # the training batches train() collates, as example indices
    task = UnevenLM(n_train=23)
    collate = task.collate

    def spy(examples):
        if all(e in task.train_set for e in examples):  # not the dev batches of dev_loss
            seen.append([task.train_set.index(e) for e in examples])
        return collate(examples)

    task.collate = spy
    config = dict(length_batching=True, epochs=2, checkpoint_every=2, run_name="lb")
    model, _, cfg = scenario("lm-dropout", tmp_path / "a", **config)
    full = train(model, task, OPTIMIZER, cfg)
    lengths = [len(e) for e in task.train_set]
    expected = length_batches(lengths, 4, 5, 0) + length_batches(lengths, 4, 5, 1)
    assert seen == expected
    assert expected[:6] != [epoch_order(23, 5, 0)[i : i + 4] for i in range(0, 23, 4)]  # not the random batches
    assert full["steps"] == 12 and full["config"]["length_batching"] is True

    def interrupt(loop):
        if loop.step == 7:
            raise KeyboardInterrupt

    model2, _, cfg2 = scenario("lm-dropout", tmp_path / "b", **config)
    with pytest.raises(KeyboardInterrupt):
        train(model2, task, OPTIMIZER, cfg2, callbacks=[interrupt])
    resumed_model, _, cfg3 = scenario("lm-dropout", tmp_path / "b", resume=True, **config)
    torch.nn.init.normal_(resumed_model.transformer.wte.weight)
    resumed = train(resumed_model, task, OPTIMIZER, cfg3)
    assert resumed["resumed_from_step"] == 6
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), resumed_model.state_dict().values()))
    assert {k: resumed[k] for k in ("evals", "loss_log", "epochs")} == {k: full[k] for k in ("evals", "loss_log",
                                                                                             "epochs")}
