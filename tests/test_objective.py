"""gpt2lab.tasks: the loss from given input embeddings (what SMART perturbs) and `Objective`, a task whose loss has an
extra term the training loop never hears of. Both tasks; tiny random models, no network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_tasks import PAIRS, tiny_model

from gpt2lab import tasks
from gpt2lab.train import TrainConfig, train

SONNETS = [
    "From fairest creatures we desire increase,\nThat thereby beauty's rose might never die,",
    "When forty winters shall besiege thy brow\nAnd dig deep trenches in thy beauty's field,",
    "Shall I compare thee to a summer's day?",
    "Let me not to the marriage of true minds\nAdmit impediments.",
]


@pytest.fixture(params=["sonnet", "paraphrase"])
def task(request, tokenizer):
    if request.param == "sonnet":
        return tasks.SonnetTask(tokenizer, SONNETS, ["Shall I compare thee"], ["Shall I compare thee\nto a day"],
                                max_length=64, max_new_tokens=4, generation={"do_sample": False}, progress=False)
    return tasks.ParaphraseTask(tokenizer, PAIRS, PAIRS[:2], max_length=128, progress=False)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------- loss from input embeddings


def test_loss_from_the_models_own_embeddings_is_the_loss(task):
    model = tiny_model().eval()
    batch = task.collate(task.train_set)
    embeds = task.embeddings(model, batch)  # (B, T, C)
    assert embeds.shape == (*batch["input_ids"].shape, model.config.n_embd)
    torch.testing.assert_close(embeds, model.transformer.wte.weight[batch["input_ids"]], atol=0, rtol=0)
    plain = task.loss(model, batch)
    from_embeds = task.loss(model, batch, inputs_embeds=embeds)
    assert abs(plain.item() - from_embeds.item()) <= 1e-6
    # a different embedding changes the loss: the embeddings really are what the model runs on
    assert task.loss(model, batch, inputs_embeds=embeds * 3).item() != pytest.approx(plain.item(), abs=1e-4)


def test_gradient_wrt_inputs_embeds_matches_autograd_through_wte(task):
    model = tiny_model(seed=1).eval()
    model.transformer.wte.weight.requires_grad_(False)  # only the embedding OUTPUT is a leaf here
    batch = task.collate(task.train_set)
    seen = []

    def as_leaf(module, args, out):  # the wte output of the plain forward, made a leaf to read its gradient
        seen.append(out.detach().requires_grad_())
        return seen[-1]

    handle = model.transformer.wte.register_forward_hook(as_leaf)
    try:
        task.loss(model, batch).backward()
    finally:
        handle.remove()
    assert len(seen) == 1, "the plain forward should look the tokens up through transformer.wte once"
    embeds = task.embeddings(model, batch).detach().requires_grad_()
    task.loss(model, batch, inputs_embeds=embeds).backward()
    assert embeds.grad.abs().sum() > 0
    torch.testing.assert_close(embeds.grad, seen[0].grad, atol=1e-7, rtol=1e-5)


def test_embeddings_go_through_the_wte_module(task):
    """A hook (an adapter) on the embedding module changes task.embeddings: it is called, not bypassed."""
    model = tiny_model().eval()
    batch = task.collate(task.train_set[:2])
    plain = task.embeddings(model, batch)
    handle = model.transformer.wte.register_forward_hook(lambda m, a, out: out * 2)
    try:
        torch.testing.assert_close(task.embeddings(model, batch), plain * 2)
    finally:
        handle.remove()


def test_outputs_are_the_distributions_the_loss_reads(task):
    """log_probs() rows are exactly the counted distributions: their NLL of the targets is the task loss."""
    model = tiny_model(seed=2).eval()
    batch = task.collate(task.train_set)
    out = task.outputs(model, batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B, T = ids.shape
    if task.name == "paraphrase":
        assert out.logits.shape == (B, 2) and out.mask.shape == (B,) and bool(out.mask.all())
        full = model(ids, mask)  # (B, T, V)
        last = mask.sum(1) - 1  # right padding
        torch.testing.assert_close(out.logits, full[torch.arange(B), last][:, list(tasks.ANSWER_IDS)], atol=1e-5,
                                   rtol=0)
        targets = batch["labels"]
    else:
        assert out.logits.shape == (B, T, model.config.vocab_size) and out.mask.shape == (B, T)
        lengths = mask.sum(1)
        for row in range(B):  # positions 0 .. length-2 predict a real next token
            assert out.mask[row].tolist() == [t < lengths[row] - 1 for t in range(T)]
        targets = ids[:, 1:][out.mask[:, :-1]]
    rows = out.log_probs()
    assert rows.dtype == torch.float32 and rows.shape == (int(out.mask.sum()), out.logits.shape[-1])
    assert F.nll_loss(rows, targets).item() == pytest.approx(out.loss.item(), abs=1e-6)


def test_bad_embeddings_give_one_line(task):
    model = tiny_model()
    batch = task.collate(task.train_set[:2])
    with pytest.raises(ValueError, match=r"inputs_embeds \(2, 3, 64\) must be \(B, T, C\)") as err:
        task.loss(model, batch, inputs_embeds=torch.zeros(2, 3, 64))
    assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="cannot find the token embedding of Linear"):
        tasks.token_embeddings(torch.nn.Linear(2, 2), batch["input_ids"])


def _symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(P||Q) + KL(Q||P), from (N, K) log-probabilities."""
    return ((p.exp() - q.exp()) * (p - q)).sum(-1).mean()


def test_a_smart_like_term_compares_clean_and_perturbed_distributions(task):
    """What notebook 06 builds on: perturb task.embeddings, rerun task.outputs, compare log_probs() row by row."""
    model = tiny_model(seed=3).eval()
    batch = task.collate(task.train_set)
    clean = task.outputs(model, batch)
    embeds = task.embeddings(model, batch)
    same = task.outputs(model, batch, inputs_embeds=embeds)
    assert _symmetric_kl(clean.log_probs(), same.log_probs()).item() == pytest.approx(0.0, abs=1e-6)
    noise = 0.5 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))
    perturbed = task.outputs(model, batch, inputs_embeds=embeds + noise)
    divergence = _symmetric_kl(clean.log_probs(), perturbed.log_probs())
    assert divergence.item() > 1e-6
    divergence.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------- Objective


def test_objective_delegates_everything_but_the_loss(task):
    def l2_of_the_head(model, batch, outputs):
        return 1e-3 * model.transformer.ln_f.weight.pow(2).sum()

    obj = tasks.Objective(task, l2_of_the_head)
    assert (obj.name, obj.metric, obj.higher_is_better) == (task.name, task.metric, task.higher_is_better)
    assert obj.train_set is task.train_set and obj.dev_set is task.dev_set
    batch, expected = obj.collate(task.train_set[:2]), task.collate(task.train_set[:2])
    assert batch.keys() == expected.keys() and all(torch.equal(batch[k], expected[k]) for k in batch)
    model = tiny_model().eval()
    assert obj.evaluate(model) == task.evaluate(model)  # the dev metrics know nothing of the extra term
    assert obj.describe() == {**task.describe(), "extra_losses": [{"name": "l2_of_the_head"}]}
    twice = tasks.Objective(obj, lambda m, b, o: o.logits.mean(), name="mean_logit")
    assert twice.describe()["extra_losses"] == [{"name": "l2_of_the_head"}, {"name": "mean_logit"}]
    with torch.no_grad():
        base = task.loss(model, batch).item()
        l2 = l2_of_the_head(model, batch, None).item()
        mean_logit = task.outputs(model, batch).logits.mean().item()
        assert obj.loss(model, batch).item() == pytest.approx(base + l2, abs=1e-6)
        assert twice.loss(model, batch).item() == pytest.approx(base + l2 + mean_logit, abs=1e-5)


def test_objective_term_sees_the_clean_outputs_and_its_gradient_flows(task):
    model = tiny_model(seed=4).eval()
    batch = task.collate(task.train_set)
    seen = []

    class Confidence:
        """Minus the mean max log-probability: depends on the model through the clean outputs."""

        def __call__(self, model, batch, outputs):
            seen.append(outputs)
            return -0.1 * outputs.log_probs().max(dim=-1).values.mean()

        def describe(self):
            return {"name": "confidence", "weight": 0.1}

    term = Confidence()
    obj = tasks.Objective(task, term)
    obj.loss(model, batch).backward()
    both = _grads(model)
    assert len(seen) == 1 and seen[0].logits.requires_grad
    torch.testing.assert_close(seen[0].logits, task.outputs(model, batch).logits, atol=0, rtol=0)
    model.zero_grad()
    task.loss(model, batch).backward()
    task_only = _grads(model)
    model.zero_grad()
    term(model, batch, task.outputs(model, batch)).backward()
    term_only = _grads(model)
    for name in task_only:
        torch.testing.assert_close(both[name], task_only[name] + term_only[name], atol=1e-6, rtol=1e-4)
    assert any((term_only[n] != 0).any() for n in term_only)
    assert obj.describe()["extra_losses"] == [{"name": "confidence", "weight": 0.1}]


def test_objective_rejects_a_term_that_is_not_a_scalar(task):
    obj = tasks.Objective(task, lambda m, b, o: o.logits, name="logits")
    with pytest.raises(ValueError, match="extra loss 'logits' must return a scalar tensor"):
        obj.loss(tiny_model(), task.collate(task.train_set[:2]))
    with pytest.raises(TypeError, match="extra must be a function"):
        tasks.Objective(task, 3.0)


def _config(**kw):
    return TrainConfig(**{"epochs": 1, "batch_size": 2, "max_steps": 3, "lr": 1e-3, "out_dir": None,
                          "progress": False, **kw})


def test_train_runs_an_objective_without_knowing(task):
    calls = []

    def weight_norm(model, batch, outputs):
        calls.append(batch["input_ids"].shape[0])
        return 0.01 * sum(p.pow(2).sum() for p in model.transformer.h[0].parameters())

    record = train(tiny_model(), tasks.Objective(task, weight_norm), torch.optim.AdamW, _config(epochs=2))
    assert record["steps"] == 3 and record["status"] == "completed"
    assert calls == [2, 2, 2]  # once per training step; evaluate (after epoch 1 and at the end) never calls it
    assert record["task"]["extra_losses"] == [{"name": "weight_norm"}]


def test_a_zero_term_trains_exactly_like_the_task(task):
    """The loop cannot tell an Objective with a zero term from the task: same weights after the same steps."""
    plain, wrapped = tiny_model(seed=5), tiny_model(seed=5)
    train(plain, task, torch.optim.AdamW, _config(evaluate=False))
    zero = tasks.Objective(task, lambda m, b, o: 0.0 * o.loss, name="zero")
    train(wrapped, zero, torch.optim.AdamW, _config(evaluate=False))
    for (name, a), b in zip(plain.state_dict().items(), wrapped.state_dict().values()):
        assert torch.equal(a, b), name


def test_objective_over_a_task_with_only_a_loss():
    """The loop's minimal task (loss(model, batch), no outputs): the term gets outputs=None; no inputs_embeds."""

    class LossOnly:
        name, metric, higher_is_better, train_set = "toy", "loss", False, [0, 1]

        def loss(self, model, batch):
            return model.weight.sum()

        def describe(self):
            return {"name": "toy"}

    model = torch.nn.Linear(2, 2)
    obj = tasks.Objective(LossOnly(), lambda m, b, o: m.bias.sum() if o is None else None, name="bias")
    assert obj.loss(model, {}).item() == pytest.approx((model.weight.sum() + model.bias.sum()).item())
    with pytest.raises(TypeError, match="task 'toy' has no outputs"):
        obj.loss(model, {}, inputs_embeds=torch.zeros(1, 1, 2))
    assert obj.describe() == {"name": "toy", "extra_losses": [{"name": "bias"}]}


def test_objective_passes_on_only_the_keywords_its_task_takes():
    """The loop offers progress=False to an evaluate that takes it; the wrapper takes **kwargs, its task may not."""

    class NoProgress:
        name, metric, higher_is_better, train_set = "toy", "loss", False, [0, 1]

        def loss(self, model, batch):
            return model.weight.sum()

        def evaluate(self, model):
            return {"loss": 1.0}

    class WithProgress(NoProgress):
        def evaluate(self, model, progress=None):
            return {"loss": 0.0 if progress is False else 1.0}

    model = torch.nn.Linear(2, 2)
    assert tasks.Objective(NoProgress(), lambda m, b, o: 0).evaluate(model, progress=False) == {"loss": 1.0}
    assert tasks.Objective(WithProgress(), lambda m, b, o: 0).evaluate(model, progress=False) == {"loss": 0.0}


def test_objectives_that_differ_only_in_a_terms_settings_get_different_run_names(tmp_path, tokenizer):
    """Two SMART-like runs with another weight on the term must not share a folder (resume would load the other)."""

    class Term:
        def __init__(self, weight):
            self.weight = weight

        def __call__(self, model, batch, outputs):
            return self.weight * outputs.logits.float().pow(2).mean()

        def describe(self):
            return {"name": "term", "weight": self.weight}

    task = tasks.ParaphraseTask(tokenizer, PAIRS, PAIRS[:2], max_length=128, progress=False)
    names = []
    for weight in (0.1, 0.2, 0.1):
        torch.manual_seed(0)
        record = train(tiny_model(), tasks.Objective(task, Term(weight)), torch.optim.AdamW,
                       _config(out_dir=str(tmp_path), max_steps=1, overwrite=True))
        names.append(record["run_name"])
    assert names[0] != names[1] and names[0] == names[2]
    torch.manual_seed(0)
    plain = train(tiny_model(), task, torch.optim.AdamW, _config(out_dir=str(tmp_path), max_steps=1))
    assert plain["run_name"] not in names
