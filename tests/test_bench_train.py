"""The fine-tuning benchmark (notebook 09, GPU path): it runs on a CPU with a tiny model, compares the two models on
the same weights and batches, and its FLOPs, MFU and epoch estimate equal hand computations (timings never asserted)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from gpt2lab.bench import __main__ as dispatcher
from gpt2lab.bench import train as bench

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS, BATCH, PEAK = 24, 4, 0.5


@pytest.fixture(scope="module")
def run(quora_data, tmp_path_factory):
    """One tiny run through the dispatcher, as a user types it: (printed text, the --json numbers)."""
    path = tmp_path_factory.mktemp("bench") / "train.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = dispatcher.main(["train", "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                                "--batch-size", str(BATCH), "--train-limit", str(PAIRS), "--peak-tflops", str(PEAK),
                                "--json", str(path)])  # fmt: skip
    assert code == 0
    return out.getvalue(), json.loads(path.read_text())


def test_both_models_measured_side_by_side(run):
    text, numbers = run
    for name in ("ours", "transformers"):
        assert f"  {name} " in text
        r = numbers["models"][name]
        assert r["steps"] == 2 and len(r["batches"]) == 2 and r["seconds"] > 0
        assert r["padded_tokens"] >= r["real_tokens"] > 0
        assert r["real_tokens_per_s"] == pytest.approx(r["real_tokens"] / r["seconds"])
    # the same batches for both: same shapes, same real tokens
    assert numbers["models"]["ours"]["batches"] == numbers["models"]["transformers"]["batches"]
    assert "ratio ours/transformers (step time) = " in text and "target >= 45%" in text and "ESTIMATE" in text
    ours, theirs = numbers["models"]["ours"]["step_s"], numbers["models"]["transformers"]["step_s"]
    assert numbers["ratio_ours_over_transformers"] == pytest.approx(ours / theirs)


def test_same_weights_same_first_loss(run):
    _, numbers = run
    a, b = numbers["models"]["ours"]["first_loss"], numbers["models"]["transformers"]["first_loss"]
    assert abs(a - b) < 1e-4 and a > 0


def test_first_loss_equals_cloze_loss_on_transformers_logits(quora_data, tokenizer):
    """Ours through the task (head at the answer only) = the cloze loss on transformers' full logits."""
    from gpt2lab.bench.model import build_pair
    from gpt2lab.model import GPT2Config
    from gpt2lab.tasks import ParaphraseTask, cloze_loss

    config = GPT2Config.tiny(n_positions=512)
    torch.manual_seed(0)
    ours, ref = build_pair(config, "cpu")
    task = ParaphraseTask.load(tokenizer, train_limit=BATCH, dev_limit=1, test_limit=1, max_length=512)
    batch = task.collate(task.train_set)
    with torch.no_grad():
        theirs = cloze_loss(ref(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["attention_mask"], batch["labels"])  # fmt: skip
        assert abs(task.loss(ours.eval(), batch).item() - theirs.item()) < 1e-4


def test_non_embedding_params_counted_with_torch():
    """N of gpt2-small = the blocks' matrices of transformers' model, counted parameter by parameter."""
    import transformers

    from gpt2lab.model import GPT2Config

    with torch.device("meta"):  # shapes only: no 124M allocation
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    counted = sum(p.numel() for name, p in hf.transformer.h.named_parameters() if p.dim() == 2)
    assert counted == 84_934_656
    assert bench.non_embedding_params(GPT2Config.from_name("gpt2")) == counted


def test_flops_formula_by_hand():
    from gpt2lab.model import GPT2Config

    config = GPT2Config.from_name("gpt2")
    n, L, d, V = 84_934_656, 12, 768, 50257
    padded, useful = bench.batch_flops(config, [100, 60], 100)
    row = lambda t: t * (6 * n + 12 * L * d * t) + 6 * V * d  # noqa: E731  (PaLM: 6N + 12*L*H*Q*T per token)
    assert padded == 2 * row(100)
    assert useful == row(100) + row(60)
    assert 6 * n * 100 == 50_960_793_600  # the dominant term, multiplied out


def test_mfu_is_achieved_over_peak(run):
    _, numbers = run
    cfg = numbers["model"]
    n, L, d, V = 12 * cfg["n_layer"] * cfg["n_embd"] ** 2, cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"]
    assert numbers["peak_tflops"] == PEAK
    for r in numbers["models"].values():
        flops = sum(rows * (width * (6 * n + 12 * L * d * width) + 6 * V * d) for rows, width, _ in r["batches"])
        assert r["flops"] == pytest.approx(flops, rel=1e-12)
        assert r["achieved_tflops"] == pytest.approx(flops / r["seconds"] / 1e12)
        assert r["mfu"] == pytest.approx(flops / r["seconds"] / (PEAK * 1e12))
        assert r["useful_mfu"] <= r["mfu"]


def test_epoch_estimate_is_tokens_over_tokens_per_s(run, tokenizer):
    from gpt2lab import data
    from gpt2lab.tasks import cloze_prompt

    _, numbers = run
    est = numbers["epoch_estimate"]
    pairs = data.load_quora("train", limit=PAIRS, verbose=False).pairs
    tokens = sum(len(tokenizer.encode(cloze_prompt(p.sentence1, p.sentence2))) for p in pairs)
    assert est["tokens_counted"] == tokens and est["pairs_counted"] == PAIRS
    assert est["epoch_pairs"] == bench.FULL_TRAIN_PAIRS and est["scaled"]  # --train-limit: scaled to the full split
    assert est["epoch_tokens"] == pytest.approx(tokens * bench.FULL_TRAIN_PAIRS / PAIRS)
    assert est["seconds"] == pytest.approx(est["epoch_tokens"] / numbers["models"]["ours"]["real_tokens_per_s"])


def test_mfu_not_available_on_cpu_without_peak():
    assert bench.peak_tflops("cpu", None)[0] is None
    assert bench.peak_tflops("cpu", 2.0)[0] == 2.0


def test_minimal_loop_times_the_same_batches(quora_data, tokenizer):
    """--loop minimal: the loop's step on batches collated beforehand; the loop's first batch order."""
    from gpt2lab.model import GPT2
    from gpt2lab.tasks import ParaphraseTask
    from gpt2lab.train import epoch_order

    args = bench._parse(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "2"])
    task = ParaphraseTask.load(tokenizer, train_limit=8, dev_limit=1, test_limit=1, max_length=512)
    torch.manual_seed(0)
    model = GPT2(bench.model_config(args))
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    seconds, masks = bench.time_minimal_loop(model, task, args)
    assert seconds > 0 and len(masks) == 2
    order = epoch_order(8, 0, 0)
    expected = task.collate([task.train_set[i] for i in order[2:4]])["attention_mask"]  # the first timed batch
    assert torch.equal(masks[0], expected)
    assert not torch.equal(before, model.transformer.h[0].mlp.c_fc.weight)  # it trained
