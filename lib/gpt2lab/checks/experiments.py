"""Check cells of notebook 09 (experiments): a new optimizer added to the method grid, Welch's t-test written from
its formulas, and the answers read off a fixed results table.

The references are built here, never with `gpt2lab.optim.decay_groups` (the learner's factory calls it) or with
`gpt2lab.experiments.report` (which computes the same statistics for the course's tables): which parameters train
and which are exempt from weight decay is decided by walking the modules, and Welch's t and degrees of freedom are
written out from the sample means and variances (scipy's t distribution gives the p-values of the table exercise).

Inputs where mistakes show: a tiny GPT-2 trained in full (biases, LayerNorms and tied embeddings among the
trainable parameters) and with LoRA (every base weight frozen); a learning rate (3.7e-4) that is neither RMSprop's
default nor a round number. For Welch: samples of different sizes (3 and 6) and spreads (std 0.036 vs 0.002), so
the pooled-variance t (1.43) is far from Welch's (0.94), the pooled df (7) from Welch's (2.005), and ddof = 0 from
ddof = 1 (t 1.15, df 2.007); a second pair has the larger sample first. The table: the best mean (full+soap,
+0.012) comes with three seeds that disagree (p = 0.53), while a smaller gain (full+adamw+smart, +0.006) is
consistent (p = 0.03); a lower mean (lora+soap, Welch p = 0.064) is not significant either, but would be with
Student's pooled t (p = 0.030) or a one-sided p (0.032), so those two mistakes show; SMART costs peak memory but no
optimizer state, SOAP both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .core import check, earlier_stubs, expect, returned_pair

# ------------------------------------------------------------------------------------------- 1. a new method

LR = 3.7e-4  # neither RMSprop's default (0.01) nor AdamW's (1e-3): a hard-coded lr cannot pass
WEIGHT_DECAY = 0.01


def _tiny_model(lora: bool) -> nn.Module:
    """A tiny GPT-2 (64-token vocabulary: fast), with LoRA adapters on q and v when `lora`."""
    from ..lora import add_lora
    from ..model import GPT2, GPT2Config

    rng = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = GPT2(GPT2Config.tiny(vocab_size=64, n_positions=16))
    if lora:
        model = add_lora(model, rank=2, alpha=4, targets="q,v")
    torch.random.set_rng_state(rng)  # a check leaves the caller's random stream alone
    return model


def _exempt(model: nn.Module) -> set[int]:
    """ids of the parameters that take no weight decay: biases, 1-D tensors, LayerNorm and embedding parameters (the
    tied head weight is the token embedding's). Written out here, not taken from gpt2lab.optim."""
    exempt = set()
    for module in model.modules():
        for local, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm | nn.Embedding) or local.endswith("bias") or p.ndim < 2:
                exempt.add(id(p))
    return exempt


def _factory_problems(fn, lora: bool) -> None:
    """Run the factory on a tiny model and stop with the first thing wrong with the optimizer it returns."""
    where = " under LoRA" if lora else ""
    model = _tiny_model(lora)
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)  # a tied parameter goes by its first name
    opt = fn(model, LR)
    expect(opt is not None, "your factory returned None: did you forget to `return` the optimizer?")
    if isinstance(opt, list | tuple):
        expect(False, f"return an optimizer built on the groups, e.g. torch.optim.RMSprop(groups, lr=lr), not the "
                      f"groups themselves (a {type(opt).__name__})")  # fmt: skip
    expect(isinstance(opt, torch.optim.Optimizer), f"return a torch.optim.Optimizer, got {type(opt).__name__}")
    expect(isinstance(opt, torch.optim.RMSprop), f"the exercise's method is RMSprop (torch.optim.RMSprop), got "
                                                 f"{type(opt).__name__}")
    extra_state = [k for k in ("momentum", "centered") if any(g.get(k) for g in opt.param_groups)]
    expect(not extra_state, f"the groups set {' and '.join(extra_state)}: plain RMSprop keeps one state tensor per "
                            "weight (the memory column relies on it); leave momentum=0 and centered=False")  # fmt: skip
    seen = {id(p): group for group in opt.param_groups for p in group["params"]}  # torch refuses duplicates
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    frozen = sorted(names[i] for i in seen if i not in trainable)
    expect(not frozen, f"the optimizer holds {len(frozen)} frozen parameter(s){where} (e.g. "
                       f"{frozen[0] if frozen else ''}): keep only those with p.requires_grad (decay_groups does)")
    missing = sorted(names[i] for i in trainable if i not in seen)
    expect(not missing, f"the optimizer leaves out {len(missing)} trainable parameter(s){where} (e.g. "
                        f"{missing[0] if missing else ''}): every trainable parameter needs a group")  # fmt: skip
    lrs = sorted({float(g["lr"]) for g in opt.param_groups})
    if lrs == [0.01]:
        expect(False, "every group has lr 0.01, RMSprop's default: pass lr=lr (the grid gives each method its own "
                      "learning rate)")  # fmt: skip
    wrong_lr = [x for x in lrs if not math.isclose(x, LR, rel_tol=1e-9)]
    expect(not wrong_lr, f"a group has lr {wrong_lr[0] if wrong_lr else 0:g}, expected the lr argument ({LR:g}): "
                         "pass lr=lr")  # fmt: skip
    exempt = _exempt(model)
    decayed = sorted(names[i] for i, g in seen.items() if i in exempt and g.get("weight_decay", 0.0) != 0.0)
    expect(not decayed, f"it decays {len(decayed)} bias / LayerNorm / embedding parameter(s){where} (e.g. "
                        f"{decayed[0] if decayed else ''}): biases, LayerNorms and embeddings get no weight decay, the "
                        f"2-D embedding tables included (notebook 03); decay_groups(model, {WEIGHT_DECAY}) "
                        "splits them")  # fmt: skip
    decays = sorted({float(g.get("weight_decay", 0.0)) for i, g in seen.items() if i not in exempt})
    expect(decays != [0.0], f"no parameter gets weight decay{where}: the matrices should get {WEIGHT_DECAY} "
                            f"(decay_groups(model, {WEIGHT_DECAY}))")  # fmt: skip
    expect(decays == [WEIGHT_DECAY], f"the matrices get weight_decay {', '.join(f'{d:g}' for d in decays)}{where}, "
                                     f"expected {WEIGHT_DECAY}")  # fmt: skip
    # one step on a toy loss: the optimizer must move the weights, to finite values
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.arange(24).reshape(2, 12) % 64  # (B, T)
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    moved = [n for n, p in after.items() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    expect(bool(moved), f"one optimizer step changed no trainable weight{where}")
    expect(all(torch.isfinite(p).all() for p in after.values()), f"one optimizer step made a weight NaN or inf{where}")


def _registered(fn, name: str) -> str:
    """Stop unless `name` is registered with `fn` and parses in full and LoRA methods; the parsed names."""
    from ..experiments import methods as experiments

    registry = experiments.OPTIMIZERS
    expect(name in registry, f"'{name}' is not registered: call register_optimizer('{name}', your_factory, lr=...) "
                             "before the grid runs")  # fmt: skip
    entry = registry[name]
    registered = getattr(entry, "factory", entry)
    expect(registered is fn, f"'{name}' is registered with another function: run the registration cell again "
                             "after editing your factory")  # fmt: skip
    expect(not getattr(entry, "lora_only", False), f"'{name}' is registered with lora_only=True: RMSprop trains any "
                                                   "parameters, full fine-tuning included")  # fmt: skip
    parsed = []
    for text in (f"full+{name}", f"lora+{name}"):
        try:
            method = experiments.parse_method(text)
        except ValueError as err:
            expect(False, f"'{text}' does not parse: {err}")
        expect(method.optimizer == name, f"'{text}' parses with optimizer '{method.optimizer}', expected '{name}'")
        parsed.append(method.name)
    return " and ".join(parsed)


def _experiment(record: dict) -> dict:
    return ((record.get("config") or {}).get("extra") or {}).get("experiment") or {}


def _runs(records, name: str) -> str:
    """Stop unless the grid's records hold finished runs of the new optimizer; a summary of them."""
    from ..experiments import methods as experiments

    expect(isinstance(records, list | tuple), f"pass the grid's records (the list run_grid returns), got "
                                              f"{type(records).__name__}")
    ours = []
    for record in records:
        method = _experiment(record).get("method")
        try:
            optimizer = experiments.parse_method(method).optimizer if method else None
        except ValueError:  # a method of an optimizer this session has not registered: not ours
            optimizer = None
        if optimizer == name:
            ours.append(record)
    expect(bool(ours), f"the results have no run of '{name}': add e.g. 'full+{name}' to the grid's methods and run it")
    for record in ours:
        label = f"{_experiment(record)['method']} (seed {_experiment(record).get('seed')})"
        expect(record.get("status") != "diverged", f"the run {label} diverged: try a smaller lr in register_optimizer")
        value = (record.get("best_metric") or {}).get("value")
        expect(value is not None and math.isfinite(value), f"the run {label} has no finite dev metric")
        expect((record.get("optimizer") or {}).get("name") == "RMSprop", f"the run {label} trained with "
               f"{(record.get('optimizer') or {}).get('name')}, not RMSprop: was it run before you registered yours?")
        # a finished run is skipped when the grid runs again, so a run of an earlier, wrong factory would stay
        stale = "delete its folder and run the grid again (a finished run is skipped, whatever the factory now does)"
        lr = (_experiment(record).get("settings") or {}).get("lr")
        groups = (record.get("optimizer") or {}).get("groups") or []
        lrs = sorted({g.get("lr") for g in groups})
        if lr is not None:
            expect(all(math.isclose(x, lr, rel_tol=1e-9) for x in lrs), f"the run {label} trained with lr "
                   f"{', '.join(f'{x:g}' for x in lrs)}, not the grid's {lr:g}: {stale}")  # fmt: skip
        decays = {g.get("weight_decay") for g in groups}
        full = experiments.parse_method(_experiment(record)["method"]).base == "full"  # biases and LayerNorms train
        right = decays == {0.0, WEIGHT_DECAY} if full else WEIGHT_DECAY in decays and decays <= {0.0, WEIGHT_DECAY}
        expect(not groups or right, f"the run {label} trained with weight decays {sorted(decays)}, not "
                                    f"{WEIGHT_DECAY} on matrices and 0 elsewhere: {stale}")  # fmt: skip
    methods = sorted({_experiment(r)["method"] for r in ours})
    return f"{len(ours)} finished run(s) of {', '.join(methods)} in the results"


@check("new_method")
def new_method(fn, name: str = "rmsprop", records=None):
    """fn(model, lr) -> an RMSprop over the trainable parameters, weight decay 0.01 on matrices only; registered under
    `name`; with `records` (what run_grid returned), the grid's runs of it finished with a dev metric."""
    _factory_problems(fn, lora=False)
    _factory_problems(fn, lora=True)
    parsed = _registered(fn, name)
    message = (f"RMSprop over exactly the trainable parameters (full and LoRA), decay {WEIGHT_DECAY} on matrices only, "
               f"lr passed on; '{name}' is registered and parses ({parsed})")
    if records is None:
        return message + "; run the grid, then pass its records to check the runs"
    return message + "; " + _runs(records, name)


# ------------------------------------------------------------------------------------------- 2a. Welch's t-test


def _mean_var(x, ddof: int = 1) -> tuple[float, float, int]:
    x = [float(v) for v in x]
    n = len(x)
    m = sum(x) / n
    return m, sum((v - m) ** 2 for v in x) / (n - ddof), n


def welch_reference(a, b, ddof: int = 1) -> tuple[float, float]:
    """Welch's t = (mean a − mean b) / √(va/na + vb/nb) and the Welch–Satterthwaite df, written out."""
    ma, va, na = _mean_var(a, ddof)
    mb, vb, nb = _mean_var(b, ddof)
    sa, sb = va / na, vb / nb  # squared standard errors of each mean
    return (ma - mb) / math.sqrt(sa + sb), (sa + sb) ** 2 / (sa**2 / (na - 1) + sb**2 / (nb - 1))


def _pooled(a, b) -> tuple[float, float]:
    ma, va, na = _mean_var(a)
    mb, vb, nb = _mean_var(b)
    sp2 = ((na - 1) * va + (nb - 1) * vb) / (na + nb - 2)
    return (ma - mb) / math.sqrt(sp2 * (1 / na + 1 / nb)), na + nb - 2


# different sizes and spreads: pooled t and df, ddof=0 and the simplified dfs all differ from Welch's by > 1e-3
WELCH_CASES = (
    ([0.91, 0.86, 0.93], [0.880, 0.882, 0.879, 0.881, 0.878, 0.883]),
    ([41.2, 40.1, 39.8, 42.0, 40.5], [38.0, 43.9]),
)
WELCH_TOL = 1e-6


def _number(x, what: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        expect(False, f"{what} should be a number, got {type(x).__name__}")
    return 0.0  # unreachable


@check("welch")
def welch(fn):
    """fn(a, b) -> (t, df): Welch's t statistic of mean(a) − mean(b) and its Welch–Satterthwaite degrees of freedom."""
    for a, b in WELCH_CASES:
        got = returned_pair(fn(list(a), list(b)), "t, df")
        t, df = _number(got[0], "t"), _number(got[1], "df")
        exp_t, exp_df = welch_reference(a, b)
        label = f"(a has {len(a)} values, b has {len(b)})"
        close = lambda x, y: abs(x - y) <= WELCH_TOL * max(1.0, abs(y))  # noqa: E731
        expect(not (close(t, exp_df) and close(df, exp_t)), f"you returned (df, t) {label}: return (t, df)")
        if not close(t, exp_t):
            pooled_t = _pooled(a, b)[0]
            expect(not close(t, -exp_t), f"t has the wrong sign {label}: t = (mean(a) − mean(b)) / se, a first")
            expect(not close(t, pooled_t), f"t {label} is Student's, with a pooled variance: Welch gives each sample "
                                           "its own, se = √(var(a)/na + var(b)/nb)")  # fmt: skip
            expect(not close(t, welch_reference(a, b, ddof=0)[0]), f"t {label} uses ddof=0: take the sample "
                   "variances, divided by n − 1 (np.var(x, ddof=1); np.var's default is ddof=0)")
            ma, va, na = _mean_var(a)
            mb, vb, nb = _mean_var(b)
            expect(not close(t, (ma - mb) / (va / na + vb / nb)), f"t {label}: divide by the standard error, the "
                   "square root of var(a)/na + var(b)/nb")
            expect(not close(t, (ma - mb) / math.sqrt(va + vb)), f"t {label}: divide each variance by its sample "
                   "size: se = √(var(a)/na + var(b)/nb)")
            expect(not close(t, (ma - mb) / (math.sqrt(va / na) + math.sqrt(vb / nb))), f"t {label}: add the "
                   "variances of the means, then take the root: √(var(a)/na + var(b)/nb), not √(va/na) + √(vb/nb)")
            expect(False, f"t {label}: expected {exp_t:.6g}, got {t:.6g}")
        if not close(df, exp_df):
            na, nb = len(a), len(b)
            expect(not 0 <= df <= 1, f"df = {df:.6g} {label} looks like a p-value: scipy's ttest_ind result is "
                   "(statistic, pvalue); return (r.statistic, r.df), or compute df from the formula")
            expect(not close(df, na + nb - 2), f"df = na + nb − 2 = {na + nb - 2} {label} is the pooled test's: "
                   "Welch's is (sa + sb)² / (sa²/(na − 1) + sb²/(nb − 1)) with sa = var(a)/na, sb = var(b)/nb")
            expect(not close(df, min(na, nb) - 1), f"df = min(na, nb) − 1 {label} is the conservative textbook "
                   "bound: use the Welch–Satterthwaite formula")
            expect(not close(df, welch_reference(a, b, ddof=0)[1]), f"df {label} uses ddof=0 variances: take the "
                   "sample variances, divided by n − 1")
            _, va, _ = _mean_var(a)
            _, vb, _ = _mean_var(b)
            sa, sb = va / na, vb / nb
            expect(not close(df, (sa + sb) ** 2 / (sa**2 / na + sb**2 / nb)), f"df {label}: each term of the "
                   "denominator divides by n − 1, not n: sa²/(na − 1) + sb²/(nb − 1)")
            expect(not close(df, (sa + sb) ** 2 / (sa**2 + sb**2)), f"df {label}: divide sa² by na − 1 and sb² by "
                   "nb − 1 in the denominator")
            expect(not close(df, (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))), f"df {label}: use the "
                   "squared standard errors sa = var(a)/na and sb = var(b)/nb, not the variances")
            expect(False, f"df {label}: expected {exp_df:.6g}, got {df:.6g}")
    return "t and df match the Welch–Satterthwaite formulas on samples of unequal sizes and spreads"


# ------------------------------------------------------------------------------------------- 2b. reading a table

BASELINE = "full+adamw"
# dev accuracy on paraphrase detection, 3 seeds each; peak memory (MB) and optimizer state (MB), per method.
# Synthetic numbers, shaped like gpt2-small's (124M parameters: AdamW's two moments take ~1 GB in float32).
TABLE = {
    "full+adamw": {"accuracy": [0.880, 0.883, 0.878], "peak_memory_mb": 4810, "optimizer_state_mb": 995},
    "full+soap": {"accuracy": [0.902, 0.861, 0.915], "peak_memory_mb": 5620, "optimizer_state_mb": 1630},
    "full+adamw+smart": {"accuracy": [0.886, 0.889, 0.885], "peak_memory_mb": 6950, "optimizer_state_mb": 995},
    "lora+adamw": {"accuracy": [0.861, 0.866, 0.858], "peak_memory_mb": 3020, "optimizer_state_mb": 2.4},
    "lora+soap": {"accuracy": [0.871, 0.866, 0.855], "peak_memory_mb": 3060, "optimizer_state_mb": 3.1},
}
QUESTIONS = {
    "best_mean": "the method with the highest mean accuracy (a name)",
    "significantly_better": f"the methods better than {BASELINE} by a two-sided Welch t-test at p < 0.05 (a set)",
    "significantly_worse": f"the methods worse than {BASELINE} by a two-sided Welch t-test at p < 0.05 (a set)",
    "smallest_peak_memory": "the method with the smallest peak memory (a name)",
    "largest_optimizer_state": "the method whose optimizer state is largest (a name)",
}


def table() -> dict:
    """A copy of the fixed results table of notebook 09's exercise 2: {method: {accuracy: [3 seeds], ...}}."""
    return {m: {k: list(v) if isinstance(v, list) else v for k, v in row.items()} for m, row in TABLE.items()}


def _mean(x) -> float:
    return sum(x) / len(x)


def _p_value(method: str) -> tuple[float, float, float]:
    """(t, df, two-sided p) of Welch's test of `method` against the baseline, from the reference above and scipy's
    t distribution."""
    from scipy import stats

    t, df = welch_reference(TABLE[method]["accuracy"], TABLE[BASELINE]["accuracy"])
    return t, df, float(2 * stats.t.sf(abs(t), df))


def _student_p(method: str) -> float:
    """Two-sided p of Student's pooled-variance t-test of `method` against the baseline (a common mistake's answer)."""
    from scipy import stats

    return float(stats.ttest_ind(TABLE[method]["accuracy"], TABLE[BASELINE]["accuracy"]).pvalue)


def _names(value, key: str) -> set[str]:
    """An answer as a set of method names (a single name is a set of one); unknown names stop the check."""
    if isinstance(value, str):
        value = {value}
    expect(isinstance(value, set | list | tuple | frozenset), f"answers['{key}'] should be a set of method names, got "
                                                              f"{type(value).__name__}")
    names = set(value)
    for name in names:
        expect(name in TABLE, f"answers['{key}']: '{name}' is not a method of the table; use one of "
                              f"{', '.join(TABLE)}")
    return names


def _one_name(answers: dict, key: str) -> str:
    value = answers[key]
    expect(isinstance(value, str), f"answers['{key}'] should be one method name (a string), got "
                                   f"{type(value).__name__}")
    expect(value in TABLE, f"answers['{key}']: '{value}' is not a method of the table; use one of {', '.join(TABLE)}")
    return value


def _describe(method: str) -> str:
    acc = TABLE[method]["accuracy"]
    gain = _mean(acc) - _mean(TABLE[BASELINE]["accuracy"])
    std = math.sqrt(_mean_var(acc)[1])
    _, _, p = _p_value(method)
    return f"{gain:+.3f} over {BASELINE}, std {std:.3f} over 3 seeds, Welch p = {p:.2g}"


@check("interpret")
def interpret(fn):
    """fn(table) -> {question: answer} for QUESTIONS, answered from the fixed table (`table()`)."""
    given = table()
    with earlier_stubs(fn):  # an answer computed with the learner's welch, still a stub: name it
        answers = fn(given)
    expect(answers is not None, "your function returned None: did you forget to `return` the answers?")
    expect(isinstance(answers, dict), f"return a dict of answers, got {type(answers).__name__}")
    for key in QUESTIONS:
        expect(key in answers, f"answers has no '{key}' ({QUESTIONS[key]}): answer every question")
    expect(given == TABLE, "your function changed the table it was given: read it, do not modify it")

    best = _one_name(answers, "best_mean")
    top = max(TABLE, key=lambda m: _mean(TABLE[m]["accuracy"]))
    if best != top:
        expect(False, f"best_mean: {best} has mean {_mean(TABLE[best]['accuracy']):.4f}, and one method's is higher: "
                      "the question is about the mean alone, not about significance")  # fmt: skip
    for key, sign in (("significantly_better", 1), ("significantly_worse", -1)):
        got = _names(answers[key], key)
        expect(BASELINE not in got, f"{key}: {BASELINE} is the baseline: compare the other methods with it")
        expected = {m for m in TABLE if m != BASELINE and _p_value(m)[2] < 0.05 and sign * _p_value(m)[0] > 0}
        for method in sorted(got - expected):
            t, _, p = _p_value(method)
            if p >= 0.05 and (_student_p(method) < 0.05 or p / 2 < 0.05):
                expect(False, f"{key}: {method} is not significant by Welch's two-sided test ({_describe(method)}); "
                              "only Student's pooled t (scipy's ttest_ind default) or a one-sided p would call it "
                              "so: use p = 2 * t.sf(abs(t), df) with Welch's t and df")  # fmt: skip
            if p < 0.05:  # significant, but the other way
                expect(False, f"{key}: {method} differs significantly ({_describe(method)}) but in the other "
                              "direction")  # fmt: skip
            expect(False, f"{key}: {method} is not significant ({_describe(method)}): with 3 seeds that spread, the "
                          "difference could be chance")  # fmt: skip
        for method in sorted(expected - got):
            expect(False, f"{key}: {method} is missing ({_describe(method)}): a small difference, but its seeds "
                          "agree, so it is unlikely to be chance")  # fmt: skip
    peak = _one_name(answers, "smallest_peak_memory")
    lowest = min(TABLE, key=lambda m: TABLE[m]["peak_memory_mb"])
    expect(peak == lowest, f"smallest_peak_memory: {peak} peaks at {TABLE[peak]['peak_memory_mb']} MB; another method "
                           "peaks lower (the peak memory column)")  # fmt: skip
    state = _one_name(answers, "largest_optimizer_state")
    largest = max(TABLE, key=lambda m: TABLE[m]["optimizer_state_mb"])
    if state != largest and "smart" in state:
        expect(False, f"largest_optimizer_state: SMART's extra forward and backward passes raise the peak memory, "
                      f"not the optimizer state: {state}'s optimizer is AdamW, with AdamW's state")  # fmt: skip
    expect(state == largest, f"largest_optimizer_state: {state} keeps {TABLE[state]['optimizer_state_mb']:g} MB of "
                             "optimizer state; another method keeps more (the optimizer state column)")  # fmt: skip
    return ("all five answers are right: the best mean is not significant with 3 seeds that disagree, a small "
            "consistent gain is; SOAP costs optimizer state, SMART peak memory")


__all__ = ["QUESTIONS", "TABLE", "interpret", "new_method", "table", "welch", "welch_reference"]
