"""Notebook 09's checks (gpt2lab.checks.experiments): each exercise's stub reads "not implemented yet", correct
answers (the notebook's and other formulations) pass, and every planted mistake gets its exact ✗ line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from check_helpers import NOT_YET, assert_mistake_line, assert_passes, stub
from scipy import stats

from gpt2lab.checks import experiments as check
from gpt2lab.experiments import methods
from gpt2lab.optim import decay_groups

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# ------------------------------------------------------------------------------------------ the notebook's answers


def rmsprop(model, lr):
    return torch.optim.RMSprop(decay_groups(model, 0.01), lr=lr)


def welch(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    sa, sb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(sa + sb)
    df = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    return t, df


def interpret(table):
    return {"best_mean": "full+soap", "significantly_better": {"full+adamw+smart"},
            "significantly_worse": {"lora+adamw"}, "smallest_peak_memory": "lora+adamw",
            "largest_optimizer_state": "full+soap"}


# ------------------------------------------------------------------------------------------ alternatives


def rmsprop_by_hand(model, lr, weight_decay=0.01):
    """Groups written out: matrices that are not embeddings decay."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2 and id(p) not in embeddings]
    rest = [p for p in trainable if p.ndim < 2 or id(p) in embeddings]
    return torch.optim.RMSprop([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}],
                               lr=lr, alpha=0.99)


def rmsprop_group_lr(model, lr):
    return torch.optim.RMSprop(decay_groups(model, 0.01, lr=lr))


def welch_scipy(a, b):
    result = stats.ttest_ind(a, b, equal_var=False)
    return result.statistic, result.df


def welch_plain(a, b):
    def mean_var(x):
        m = sum(x) / len(x)
        return m, sum((v - m) ** 2 for v in x) / (len(x) - 1), len(x)

    (ma, va, na), (mb, vb, nb) = mean_var(a), mean_var(b)
    se2 = va / na + vb / nb
    return [(ma - mb) / se2**0.5, se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))]


def interpret_computed(table):
    base = table["full+adamw"]["accuracy"]
    p = {m: stats.ttest_ind(r["accuracy"], base, equal_var=False) for m, r in table.items() if m != "full+adamw"}
    return {"best_mean": max(table, key=lambda m: np.mean(table[m]["accuracy"])),
            "significantly_better": [m for m, r in p.items() if r.pvalue < 0.05 and r.statistic > 0],
            "significantly_worse": tuple(m for m, r in p.items() if r.pvalue < 0.05 and r.statistic < 0),
            "smallest_peak_memory": min(table, key=lambda m: table[m]["peak_memory_mb"]),
            "largest_optimizer_state": max(table, key=lambda m: table[m]["optimizer_state_mb"])}


def interpret_single_names(table):
    return {**interpret(table), "significantly_better": "full+adamw+smart", "significantly_worse": "lora+adamw"}


@pytest.fixture
def registered():
    """'rmsprop' registered with the notebook's factory for the test, the registry restored after it."""
    saved = dict(methods.OPTIMIZERS)
    methods.register_optimizer("rmsprop", rmsprop, lr={"full": 2e-5, "lora": 2e-4, "quick": 3e-3})
    yield
    methods.OPTIMIZERS.clear()
    methods.OPTIMIZERS.update(saved)


def test_new_method_passes(registered):
    line = str(check.new_method(rmsprop, "rmsprop"))
    assert line == ("✓ new_method: RMSprop over exactly the trainable parameters (full and LoRA), decay 0.01 on "
                    "matrices only, lr passed on; 'rmsprop' is registered and parses (full+rmsprop and "
                    "lora-r8-qv+rmsprop); run the grid, then pass its records to check the runs"), line


@pytest.mark.parametrize("factory", [rmsprop_by_hand, rmsprop_group_lr])
def test_new_method_alternatives_pass(factory):
    saved = dict(methods.OPTIMIZERS)
    try:
        methods.register_optimizer("rmsprop", factory, lr=1e-3)
        assert_passes(check.new_method(factory, "rmsprop"), "new_method")
    finally:
        methods.OPTIMIZERS.clear()
        methods.OPTIMIZERS.update(saved)


ALTERNATIVES = [("welch", welch), ("welch", welch_scipy), ("welch", welch_plain),
                ("interpret", interpret), ("interpret", interpret_computed), ("interpret", interpret_single_names)]


@pytest.mark.parametrize("name, answer", ALTERNATIVES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ALTERNATIVES)])
def test_correct_answers_pass(name, answer):
    assert_passes(getattr(check, name)(answer), name)


def test_reference_welch_equals_scipy():
    for a, b in check.WELCH_CASES:
        t, df = check.welch_reference(a, b)
        result = stats.ttest_ind(a, b, equal_var=False)
        assert math.isclose(t, result.statistic, rel_tol=1e-12) and math.isclose(df, result.df, rel_tol=1e-12)


def test_table_is_designed_as_the_exercise_says():
    """Best mean not significant, a smaller consistent gain significant (scipy's Welch test, not ours)."""
    table = check.table()
    base = table["full+adamw"]["accuracy"]
    soap = stats.ttest_ind(table["full+soap"]["accuracy"], base, equal_var=False)
    smart = stats.ttest_ind(table["full+adamw+smart"]["accuracy"], base, equal_var=False)
    assert soap.pvalue > 0.3 and smart.pvalue < 0.05
    assert np.mean(table["full+soap"]["accuracy"]) > np.mean(table["full+adamw+smart"]["accuracy"]) > np.mean(base)


# ------------------------------------------------------------------------------------------ planted mistakes


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


FACTORY_MISTAKES = [
    (stub, NOT_YET),
    (lambda model, lr: torch.optim.RMSprop(_trainable(model), lr=lr, weight_decay=0.01),
     "it decays 20 bias / LayerNorm / embedding parameter(s) (e.g. transformer.h.0.attn.c_attn.bias): biases, "
     "LayerNorms and embeddings get no weight decay, the 2-D embedding tables included (notebook 03); "
     "decay_groups(model, 0.01) splits them"),
    (lambda model, lr: torch.optim.RMSprop(decay_groups(model, 0.01), lr=lr, momentum=0.9),
     "the groups set momentum: plain RMSprop keeps one state tensor per weight (the memory column relies on it); "
     "leave momentum=0 and centered=False"),
    (lambda model, lr: torch.optim.RMSprop([{"params": [p for n, p in g["params"]], "weight_decay": g["weight_decay"]}
                                            for g in decay_groups(model, 0.01)] + [
        {"params": [p for p in model.parameters() if not p.requires_grad], "weight_decay": 0.0}], lr=lr),
     "the optimizer holds 28 frozen parameter(s) under LoRA (e.g. transformer.h.0.attn.c_attn.bias): keep only those "
     "with p.requires_grad (decay_groups does)"),
    (lambda model, lr: torch.optim.RMSprop(decay_groups(model, 0.01), lr=1e-3),
     "a group has lr 0.001, expected the lr argument (0.00037): pass lr=lr"),
    (lambda model, lr: torch.optim.RMSprop(decay_groups(model, 0.01)),
     "every group has lr 0.01, RMSprop's default: pass lr=lr (the grid gives each method its own learning rate)"),
    (lambda model, lr: decay_groups(model, 0.01),
     "return an optimizer built on the groups, e.g. torch.optim.RMSprop(groups, lr=lr), not the groups themselves "
     "(a list)"),
    (lambda model, lr: None, "your factory returned None: did you forget to `return` the optimizer?"),
    (lambda model, lr: torch.optim.AdamW(decay_groups(model, 0.01), lr=lr),
     "the exercise's method is RMSprop (torch.optim.RMSprop), got AdamW"),
    (lambda model, lr: torch.optim.RMSprop(_trainable(model), lr=lr),
     "no parameter gets weight decay: the matrices should get 0.01 (decay_groups(model, 0.01))"),
    (lambda model, lr: torch.optim.RMSprop(decay_groups(model, 0.1), lr=lr),
     "the matrices get weight_decay 0.1, expected 0.01"),
    (lambda model, lr: torch.optim.RMSprop([p for p in _trainable(model) if p.ndim >= 2], lr=lr, weight_decay=0.01),
     "the optimizer leaves out 18 trainable parameter(s) (e.g. transformer.h.0.attn.c_attn.bias): every trainable "
     "parameter needs a group"),
]


@pytest.mark.parametrize("answer, message", FACTORY_MISTAKES,
                         ids=[f"factory-{i}" for i in range(len(FACTORY_MISTAKES))])
def test_each_factory_mistake_gets_its_line(answer, message):
    assert_mistake_line(check.new_method(answer, "rmsprop"), "new_method", message)


def test_registration_mistakes(registered):
    assert_mistake_line(check.new_method(rmsprop, "rms-prop"), "new_method",
                        "'rms-prop' is not registered: call register_optimizer('rms-prop', your_factory, lr=...) "
                        "before the grid runs")
    edited = lambda model, lr: rmsprop(model, lr)  # noqa: E731  (the cell was run again, not the registration)
    assert_mistake_line(check.new_method(edited, "rmsprop"), "new_method",
                        "'rmsprop' is registered with another function: run the registration cell again after "
                        "editing your factory")
    methods.register_optimizer("rmsprop", rmsprop, lr=1e-3, lora_only=True)
    assert_mistake_line(check.new_method(rmsprop, "rmsprop"), "new_method",
                        "'rmsprop' is registered with lora_only=True: RMSprop trains any parameters, full "
                        "fine-tuning included")


def _record(method, seed=0, status="completed", value=0.5, optimizer="RMSprop", lrs=(3e-3, 3e-3), decays=(0.01, 0.0)):
    groups = [{"lr": lr, "weight_decay": wd, "n_params": 4} for lr, wd in zip(lrs, decays, strict=True)]
    return {"status": status, "best_metric": {"name": "accuracy", "value": value},
            "optimizer": {"name": optimizer, "groups": groups},
            "config": {"extra": {"experiment": {"method": method, "seed": seed, "task": "paraphrase",
                                                "settings": {"lr": 3e-3}}}}}


def test_records_pass_and_mistakes(registered):
    good = [_record("full+adamw", optimizer="AdamW"), _record("full+rmsprop", 0), _record("full+rmsprop", 1),
            _record("lora-r8-qv+unknown-opt"), _record("lora-r8-qv+rmsprop", lrs=(3e-3,), decays=(0.01,))]
    line = str(check.new_method(rmsprop, "rmsprop", good))
    assert line.startswith("✓ new_method: ") and line.endswith(
        "; 3 finished run(s) of full+rmsprop, lora-r8-qv+rmsprop in the results"), line
    cases = [
        ([_record("full+adamw", optimizer="AdamW")],
         "the results have no run of 'rmsprop': add e.g. 'full+rmsprop' to the grid's methods and run it"),
        ([_record("full+rmsprop", status="diverged", value=float("nan"))],
         "the run full+rmsprop (seed 0) diverged: try a smaller lr in register_optimizer"),
        ([_record("full+rmsprop", value=float("nan"))], "the run full+rmsprop (seed 0) has no finite dev metric"),
        ([_record("full+rmsprop", optimizer="AdamW")],
         "the run full+rmsprop (seed 0) trained with AdamW, not RMSprop: was it run before you registered yours?"),
        ({"runs": []}, "pass the grid's records (the list run_grid returns), got dict"),
        ([_record("full+rmsprop", lrs=(1e-3, 1e-3))],
         "the run full+rmsprop (seed 0) trained with lr 0.001, not the grid's 0.003: delete its folder and run the "
         "grid again (a finished run is skipped, whatever the factory now does)"),
        ([_record("full+rmsprop", decays=(0.01, 0.01))],
         "the run full+rmsprop (seed 0) trained with weight decays [0.01], not 0.01 on matrices and 0 elsewhere: "
         "delete its folder and run the grid again (a finished run is skipped, whatever the factory now does)"),
    ]
    for records, message in cases:
        assert_mistake_line(check.new_method(rmsprop, "rmsprop", records), "new_method", message)


def test_a_crash_names_the_learners_line():
    def crashes(model, lr):
        groups = decay_groups(model, 0.01)
        return torch.optim.RMSprop(groups[2], lr=lr)  # only two groups: IndexError

    line = str(check.new_method(crashes, "rmsprop"))
    assert line.startswith("✗ new_method: your code raised IndexError: list index out of range (line "), line
    assert line.endswith(": return torch.optim.RMSprop(groups[2], lr=lr)  # only two groups: IndexError)"), line


def _welch_with(t_fn=None, df_fn=None):
    def fn(a, b):
        t, df = welch(a, b)
        return (t_fn(a, b) if t_fn else t), (df_fn(a, b) if df_fn else df)

    return fn


def _mv(x, ddof=1):
    x = np.asarray(x, dtype=float)
    return x.mean(), x.var(ddof=ddof), len(x)


def _pooled_t(a, b):
    (ma, va, na), (mb, vb, nb) = _mv(a), _mv(b)
    sp2 = ((na - 1) * va + (nb - 1) * vb) / (na + nb - 2)
    return (ma - mb) / math.sqrt(sp2 * (1 / na + 1 / nb))


def _welch_ddof0(a, b):
    (ma, va, na), (mb, vb, nb) = _mv(a, 0), _mv(b, 0)
    sa, sb = va / na, vb / nb
    return (ma - mb) / math.sqrt(sa + sb), (sa + sb) ** 2 / (sa**2 / (na - 1) + sb**2 / (nb - 1))


def _se_parts(a, b):
    (ma, va, na), (mb, vb, nb) = _mv(a), _mv(b)
    return ma - mb, va / na, vb / nb, va, vb, na, nb


LABEL = "(a has 3 values, b has 6)"
WELCH_MISTAKES = [
    (stub, NOT_YET),
    (lambda a, b: welch(b, a), f"t has the wrong sign {LABEL}: t = (mean(a) − mean(b)) / se, a first"),
    (_welch_with(t_fn=_pooled_t), f"t {LABEL} is Student's, with a pooled variance: Welch gives each sample its own, "
                                  "se = √(var(a)/na + var(b)/nb)"),
    (_welch_ddof0, f"t {LABEL} uses ddof=0: take the sample variances, divided by n − 1 (np.var(x, ddof=1); "
                   "np.var's default is ddof=0)"),
    (_welch_with(t_fn=lambda a, b: (lambda d, sa, sb, *_: d / (sa + sb))(*_se_parts(a, b))),
     f"t {LABEL}: divide by the standard error, the square root of var(a)/na + var(b)/nb"),
    (_welch_with(t_fn=lambda a, b: (lambda d, sa, sb, va, vb, *_: d / math.sqrt(va + vb))(*_se_parts(a, b))),
     f"t {LABEL}: divide each variance by its sample size: se = √(var(a)/na + var(b)/nb)"),
    (_welch_with(t_fn=lambda a, b: (lambda d, sa, sb, *_: d / (math.sqrt(sa) + math.sqrt(sb)))(*_se_parts(a, b))),
     f"t {LABEL}: add the variances of the means, then take the root: √(var(a)/na + var(b)/nb), not √(va/na) + "
     "√(vb/nb)"),
    (_welch_with(t_fn=lambda a, b: welch(a, b)[0] * 1.001), f"t {LABEL}: expected 0.93612, got 0.937056"),
    (_welch_with(df_fn=lambda a, b: len(a) + len(b) - 2),
     f"df = na + nb − 2 = 7 {LABEL} is the pooled test's: Welch's is (sa + sb)² / (sa²/(na − 1) + sb²/(nb − 1)) "
     "with sa = var(a)/na, sb = var(b)/nb"),
    (_welch_with(df_fn=lambda a, b: min(len(a), len(b)) - 1),
     f"df = min(na, nb) − 1 {LABEL} is the conservative textbook bound: use the Welch–Satterthwaite formula"),
    (_welch_with(df_fn=lambda a, b: _welch_ddof0(a, b)[1]),
     f"df {LABEL} uses ddof=0 variances: take the sample variances, divided by n − 1"),
    (_welch_with(df_fn=lambda a, b: (lambda d, sa, sb, va, vb, na, nb: (sa + sb) ** 2 / (sa**2 / na + sb**2 / nb))(
        *_se_parts(a, b))), f"df {LABEL}: each term of the denominator divides by n − 1, not n: sa²/(na − 1) + "
                            "sb²/(nb − 1)"),
    (_welch_with(df_fn=lambda a, b: (lambda d, sa, sb, *_: (sa + sb) ** 2 / (sa**2 + sb**2))(*_se_parts(a, b))),
     f"df {LABEL}: divide sa² by na − 1 and sb² by nb − 1 in the denominator"),
    (lambda a, b: welch(a, b)[::-1], f"you returned (df, t) {LABEL}: return (t, df)"),
    (lambda a, b: tuple(stats.ttest_ind(a, b, equal_var=False)),
     f"df = 0.447806 {LABEL} looks like a p-value: scipy's ttest_ind result is (statistic, pvalue); return "
     "(r.statistic, r.df), or compute df from the formula"),
    (_welch_with(df_fn=lambda a, b: (lambda d, sa, sb, va, vb, na, nb: (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (
        nb - 1)))(*_se_parts(a, b))),
     f"df {LABEL}: use the squared standard errors sa = var(a)/na and sb = var(b)/nb, not the variances"),
    (lambda a, b: welch(a, b)[0], "return a pair (t, df), got float64"),
    (lambda a, b: (welch(a, b)[0], "two"), "df should be a number, got str"),
    (lambda a, b: (welch(a, b)[0], None), "df should be a number, got NoneType"),
]


@pytest.mark.parametrize("answer, message", WELCH_MISTAKES, ids=[f"welch-{i}" for i in range(len(WELCH_MISTAKES))])
def test_each_welch_mistake_gets_its_line(answer, message):
    assert_mistake_line(check.welch(answer), "welch", message)


def _answers(**changes):
    def fn(table):
        return {**interpret(table), **changes}

    return fn


def _drop(key):
    def fn(table):
        answers = interpret(table)
        del answers[key]
        return answers

    return fn


def _edits_table(table):
    table["full+soap"]["accuracy"].pop()
    return interpret(table)


def _interpret_with_stub(table):
    t, df = welch_stub(table["full+soap"]["accuracy"], table["full+adamw"]["accuracy"])  # exercise 2a, a stub
    return interpret(table)


def welch_stub(a, b):  # the notebook's welch before it is written
    raise NotImplementedError()


def _interpret_student(table):
    """The answers with Student's pooled t (scipy's default), the mistake §5 warns about: lora+soap comes out worse."""
    answers = interpret(table)
    base = table["full+adamw"]["accuracy"]
    answers["significantly_worse"] = {m for m, row in table.items() if m != "full+adamw" and (
        lambda r: r.pvalue < 0.05 and r.statistic < 0)(stats.ttest_ind(row["accuracy"], base))}
    return answers


INTERPRET_MISTAKES = [
    (stub, NOT_YET),
    (_interpret_student, "significantly_worse: lora+soap is not significant by Welch's two-sided test (-0.016 over "
                         "full+adamw, std 0.008 over 3 seeds, Welch p = 0.064); only Student's pooled t (scipy's "
                         "ttest_ind default) or a one-sided p would call it so: use p = 2 * t.sf(abs(t), df) with "
                         "Welch's t and df"),
    (_interpret_with_stub, "not implemented yet: welch_stub (an earlier exercise, which this one calls: finish it "
                           "first)"),
    (_answers(best_mean="full+adamw+smart"), "best_mean: full+adamw+smart has mean 0.8867, and one method's is "
                                             "higher: the question is about the mean alone, not about significance"),
    (_answers(significantly_better={"full+soap", "full+adamw+smart"}),
     "significantly_better: full+soap is not significant (+0.012 over full+adamw, std 0.028 over 3 seeds, Welch p = "
     "0.53): with 3 seeds that spread, the difference could be chance"),
    (_answers(significantly_better=set()),
     "significantly_better: full+adamw+smart is missing (+0.006 over full+adamw, std 0.002 over 3 seeds, Welch p = "
     "0.03): a small difference, but its seeds agree, so it is unlikely to be chance"),
    (_answers(significantly_better={"full+adamw+smart", "lora+adamw"}),
     "significantly_better: lora+adamw differs significantly (-0.019 over full+adamw, std 0.004 over 3 seeds, Welch "
     "p = 0.0046) but in the other direction"),
    (_answers(significantly_worse={"lora+adamw", "lora+soap"}),
     "significantly_worse: lora+soap is not significant by Welch's two-sided test (-0.016 over full+adamw, std 0.008 "
     "over 3 seeds, Welch p = 0.064); only Student's pooled t (scipy's ttest_ind default) or a one-sided p would call "
     "it so: use p = 2 * t.sf(abs(t), df) with Welch's t and df"),
    (_answers(significantly_worse=[]),
     "significantly_worse: lora+adamw is missing (-0.019 over full+adamw, std 0.004 over 3 seeds, Welch p = 0.0046): "
     "a small difference, but its seeds agree, so it is unlikely to be chance"),
    (_answers(significantly_better={"full+adamw", "full+adamw+smart"}),
     "significantly_better: full+adamw is the baseline: compare the other methods with it"),
    (_answers(smallest_peak_memory="lora+soap"),
     "smallest_peak_memory: lora+soap peaks at 3060 MB; another method peaks lower (the peak memory column)"),
    (_answers(largest_optimizer_state="full+adamw+smart"),
     "largest_optimizer_state: SMART's extra forward and backward passes raise the peak memory, not the optimizer "
     "state: full+adamw+smart's optimizer is AdamW, with AdamW's state"),
    (_answers(largest_optimizer_state="full+adamw"),
     "largest_optimizer_state: full+adamw keeps 995 MB of optimizer state; another method keeps more (the optimizer "
     "state column)"),
    (_answers(best_mean="soap"), "answers['best_mean']: 'soap' is not a method of the table; use one of full+adamw, "
                                 "full+soap, full+adamw+smart, lora+adamw, lora+soap"),
    (_answers(best_mean=["full+soap"]), "answers['best_mean'] should be one method name (a string), got list"),
    (_answers(significantly_better=0.03), "answers['significantly_better'] should be a set of method names, got "
                                          "float"),
    (_drop("smallest_peak_memory"), "answers has no 'smallest_peak_memory' (the method with the smallest peak memory "
                                    "(a name)): answer every question"),
    (lambda table: list(interpret(table).values()), "return a dict of answers, got list"),
    (lambda table: None, "your function returned None: did you forget to `return` the answers?"),
    (_edits_table, "your function changed the table it was given: read it, do not modify it"),
]


@pytest.mark.parametrize("answer, message", INTERPRET_MISTAKES,
                         ids=[f"interpret-{i}" for i in range(len(INTERPRET_MISTAKES))])
def test_each_interpret_mistake_gets_its_line(answer, message):
    assert_mistake_line(check.interpret(answer), "interpret", message)


def test_checks_leave_the_global_rng_alone(registered):
    state = torch.random.get_rng_state()
    check.new_method(rmsprop, "rmsprop")
    check.welch(welch)
    assert torch.equal(torch.random.get_rng_state(), state)
