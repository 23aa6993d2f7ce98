"""Experiment reports: records -> tables (Markdown on screen, CSV), significance tests, plots.

Used in notebook 09 (experiments); `python -m gpt2lab.experiments report results/` calls `report(folder)`.

* `load_records(folder)`: every `record.json` below `folder` whose config carries the experiment block
  (`record["config"]["extra"]["experiment"]`, written by the runner). Unreadable or partial files are skipped and
  counted; records of other notebooks' runs (no experiment block) are ignored.
* `summarize(records) -> list[Row]`: one row per (size, task, method): n seeds, mean and sample std (ddof=1) of the
  dev metric, it/s, tokens/s, peak memory, trainable parameters, optimizer-state bytes and wall time. Runs of one
  method with different hyper-parameters are flagged (`MixedSettingsWarning`), never averaged silently.
* `significance(records)`: per (size, task), every method against full fine-tuning with AdamW: Welch's t-test on
  the per-seed dev metric; one-way ANOVA and Tukey's HSD across methods when every method has >= 3 seeds.
  A test that cannot be computed (too few seeds, no baseline, zero variance) says why instead of printing NaN.
* `markdown(rows, sig)`, `write_csv(rows, path, sig)`; plots `plot_curves`, `plot_metric_vs_time`, `plot_memory`
  (each returns a matplotlib Figure); `report(folder, out)` does all of it and returns the files it wrote.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

BASELINE = "full+adamw"
RECORD = "record.json"
QUICK_NOTE = "quick mode: tiny random model, numbers exercise the code, not the methods"
RUN_HINT = "python -m gpt2lab.experiments run --task paraphrase --method full+adamw --method lora+adamw --seeds 0 1 2"
NA_DASH = "–"  # an en dash: the std of a single seed

# the summarized quantities: key -> (where in the record, column title)
STATS = {
    "metric": (("best_metric", "value"), "dev metric"),
    "it_per_s": (("it_per_s",), "it/s"),
    "tokens_per_s": (("tokens_per_s",), "tokens/s"),
    "peak_memory_mb": (("peak_memory_mb",), "peak MB"),
    "trainable_params": (("params", "trainable"), "trainable params"),
    "optimizer_state_bytes": (("optimizer", "state_bytes"), "opt. state"),
    "wall_time_s": (("wall_time_s",), "wall s"),
}


class NoRecordsError(FileNotFoundError):
    """No experiment records where a report was asked for; the message says what to run."""


class MixedSettingsWarning(UserWarning):
    """One (size, task, method) group holds runs with different hyper-parameters (or weights, or world size)."""


# ---------------------------------------------------------------------------------------------- loading


def experiment_of(record: dict) -> dict | None:
    """The experiment block the runner writes into `record["config"]["extra"]`, or None (a run of another notebook)."""
    extra = (record.get("config") or {}).get("extra") or {}
    block = extra.get("experiment") if isinstance(extra, dict) else None
    return block if isinstance(block, dict) else None


def load_records(folder, verbose: bool = True) -> list[dict]:
    """Every experiment record below `folder` (recursively), sorted by path; each gets "record_path".

    A missing folder, or one without experiment records, raises `NoRecordsError` whose one line says what to run.
    Files that cannot be read or lack the required keys (a run killed while writing) are skipped and counted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NoRecordsError(f"no results folder {folder}: run `{RUN_HINT} --out {folder}` first")
    records, bad, other = [], [], 0
    for path in sorted(folder.rglob(RECORD)):
        try:
            record = json.loads(path.read_text())
            block = experiment_of(record)
            if block is None:
                other += 1
                continue
            missing = [k for k in ("task", "method", "seed") if k not in block]
            if missing or not isinstance(record.get("best_metric"), dict):
                raise KeyError(f"missing {', '.join(missing) or 'best_metric'}")
        except (OSError, ValueError, KeyError, AttributeError) as err:
            bad.append(f"{path}: {err}")
            continue
        record["record_path"] = str(path)
        records.append(record)
    if verbose and bad:
        print(f"skipped {len(bad)} unreadable or partial record file(s), e.g. {bad[0]}")
    if verbose and other:
        print(f"ignored {other} record(s) without an experiment block (runs of other notebooks)")
    if not records:
        raise NoRecordsError(f"no experiment records (record.json with config.extra.experiment) below {folder}: "
                             f"run `{RUN_HINT} --out {folder}` first")
    return records


# ---------------------------------------------------------------------------------------------- summary


def _get(record: dict, path: tuple) -> float:
    """The number at `path` in the record, NaN when absent or None (e.g. it/s of a run with no steps)."""
    value = record
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the finite values; std NaN below two values, both NaN with none."""
    finite = [v for v in values if math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    std = statistics.stdev(finite) if len(finite) >= 2 else math.nan
    return mean, std


@dataclass
class Row:
    """One (size, task, method) group of runs, one run per seed. `mean`/`std`/`values` are keyed like `STATS`."""

    size: str
    task: str
    method: str
    metric: str  # the dev metric's name ("accuracy", "chrf")
    seeds: list[int]
    mean: dict[str, float]
    std: dict[str, float]  # NaN for a single seed
    values: dict[str, list[float]]  # per seed, in the order of `seeds`
    weights: str = "?"
    notes: list[str] = field(default_factory=list)  # mixed settings, repeated seeds, diverged runs

    @property
    def n(self) -> int:
        return len(self.seeds)


def _identity(block: dict) -> str:
    """What must be equal for runs to be averaged: the resolved hyper-parameters, the weights, the world size."""
    return json.dumps({k: block.get(k) for k in ("settings", "weights", "world_size")}, sort_keys=True, default=repr)


def _differences(blocks: list[dict]) -> str:
    """`lr: 1e-05, 2e-05; weights: random, gpt2`: the keys whose values differ between the runs' settings."""
    flat = [{**{f"{k}": v for k, v in (b.get("settings") or {}).items()},
             "weights": b.get("weights"), "world_size": b.get("world_size")} for b in blocks]
    keys = sorted({k for f in flat for k in f})
    parts = []
    for key in keys:
        seen = []
        for f in flat:
            if f.get(key) not in seen:
                seen.append(f.get(key))
        if len(seen) > 1:
            parts.append(f"{key}: {', '.join(map(str, seen))}")
    return "; ".join(parts)


def _seed_key(seed) -> tuple:
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def _method_order(method: str) -> tuple:
    return (method != BASELINE, method)


def summarize(records: list[dict]) -> list[Row]:
    """Rows grouped by (size, task, method), the baseline first within a task. Warns on mixed settings."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        block = experiment_of(record) or {}
        key = (str(block.get("size", "?")), str(block.get("task", "?")), str(block.get("method", "?")))
        groups.setdefault(key, []).append(record)
    rows = []
    for (size, task, method), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                             _method_order(kv[0][2]))):
        runs = sorted(runs, key=lambda r: _seed_key(experiment_of(r).get("seed")))
        blocks = [experiment_of(r) for r in runs]
        values = {key: [_get(r, path) for r in runs] for key, (path, _) in STATS.items()}
        stats = {key: _mean_std(v) for key, v in values.items()}
        names = sorted({str((r.get("best_metric") or {}).get("name")) for r in runs})
        weights = sorted({str(b.get("weights")) for b in blocks})
        row = Row(size, task, method, "/".join(names), [b.get("seed") for b in blocks],
                  {k: m for k, (m, _) in stats.items()}, {k: s for k, (_, s) in stats.items()}, values,
                  "/".join(weights))
        if len({_identity(b) for b in blocks}) > 1:
            note = f"mixed settings ({_differences(blocks)}): these runs should not be averaged"
            row.notes.append(note)
            warnings.warn(f"{size}/{task}/{method}: {note}; give them separate results folders or method names",
                          MixedSettingsWarning, stacklevel=2)
        repeated = sorted({str(s) for s in row.seeds if row.seeds.count(s) > 1})
        if repeated:
            row.notes.append(f"seed {', '.join(repeated)} appears more than once (copied result folders?)")
        if missing := sum(not math.isfinite(v) for v in values["metric"]):
            row.notes.append(f"{missing} run(s) without a dev metric (no evaluation)")
        if diverged := sum(r.get("status") == "diverged" for r in runs):
            row.notes.append(f"{diverged} run(s) diverged")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- significance


@dataclass
class Comparison:
    """One method against the baseline: Welch's t-test on the per-seed dev metric. NaNs come with a `note`."""

    method: str
    n: int
    n_baseline: int
    diff: float  # mean(method) - mean(baseline)
    t: float = math.nan
    df: float = math.nan  # Welch-Satterthwaite degrees of freedom
    p: float = math.nan  # two-sided
    note: str = ""  # why t/df/p are missing, "" when they are there


@dataclass
class TaskSignificance:
    """All tests of one (size, task): Welch per method, and ANOVA + Tukey HSD when every method has >= 3 seeds."""

    size: str
    task: str
    metric: str
    welch: dict[str, Comparison]  # method -> comparison (the baseline itself is absent)
    anova: dict | None = None  # {"F", "p", "df_between", "df_within"}
    tukey: list[dict] = field(default_factory=list)  # [{"a", "b", "diff" (mean a - mean b), "p"}]
    notes: list[str] = field(default_factory=list)  # why ANOVA/Tukey are missing


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's t-test of mean(a) - mean(b): (t, Welch-Satterthwaite df, two-sided p), via scipy."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else math.nan
    return float(result.statistic), float(getattr(result, "df", df)), float(result.pvalue)


def _compare(method: str, sample: list[float], base: list[float]) -> Comparison:
    diff = statistics.fmean(sample) - statistics.fmean(base) if sample and base else math.nan
    c = Comparison(method, len(sample), len(base), diff)
    if len(base) < 2:
        c.note = f"n/a (needs ≥2 seeds of {BASELINE})"
    elif len(sample) < 2:
        c.note = f"n/a (needs ≥2 seeds of {method})"
    elif statistics.variance(sample) == 0 and statistics.variance(base) == 0:
        # t = diff / 0: scipy gives ±inf (p = 0) or NaN; neither is a test result
        c.note = "n/a (every seed gave the same value in both methods: zero variance, no t-test)"
    else:
        c.t, c.df, c.p = welch(sample, base)
    return c


def _anova_tukey(sig: TaskSignificance, samples: dict[str, list[float]]) -> None:
    from scipy import stats

    if len(samples) < 2:
        sig.notes.append("ANOVA/Tukey HSD: n/a (needs ≥2 methods)")
        return
    short = {m: len(v) for m, v in samples.items() if len(v) < 3}
    if short:
        have = ", ".join(f"{m}: {n}" for m, n in short.items())
        sig.notes.append(f"ANOVA/Tukey HSD: n/a (needs ≥3 seeds of every method; have {have})")
        return
    if all(statistics.variance(v) == 0 for v in samples.values()):
        sig.notes.append("ANOVA/Tukey HSD: n/a (every seed of every method gave the same value: zero within-group "
                         "variance)")
        return
    methods, groups = list(samples), list(samples.values())
    anova = stats.f_oneway(*groups)
    n_total = sum(len(g) for g in groups)
    sig.anova = {"F": float(anova.statistic), "p": float(anova.pvalue), "df_between": len(groups) - 1,
                 "df_within": n_total - len(groups)}
    tukey = stats.tukey_hsd(*groups)
    for i in range(len(methods)):
        for j in range(i + 1, len(methods)):
            sig.tukey.append({"a": methods[i], "b": methods[j], "diff": float(tukey.statistic[i, j]),
                              "p": float(tukey.pvalue[i, j])})


def significance(records_or_rows: list) -> dict[tuple[str, str], TaskSignificance]:
    """{(size, task): TaskSignificance}: each method vs full+adamw (Welch), and ANOVA + Tukey HSD across methods.

    Takes records (from `load_records`) or rows (from `summarize`); only finite per-seed dev metrics count.
    """
    rows = records_or_rows if all(isinstance(r, Row) for r in records_or_rows) else summarize(records_or_rows)
    result = {}
    for row in rows:
        key = (row.size, row.task)
        if key not in result:
            result[key] = TaskSignificance(row.size, row.task, row.metric, {})
    for (size, task), sig in result.items():
        samples = {r.method: _finite(r.values["metric"]) for r in rows if (r.size, r.task) == (size, task)}
        base = samples.get(BASELINE, [])
        for method, sample in samples.items():
            if method != BASELINE:
                sig.welch[method] = _compare(method, sample, base)
        _anova_tukey(sig, {m: s for m, s in samples.items() if s})
    return result


# ---------------------------------------------------------------------------------------------- formatting


def byte_unit(n: float) -> tuple[str, int]:
    """The unit to show `n` bytes in: ("MiB", 2**20) for 3,145,728."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return unit, size
    return "B", 1


def _spec(kind: str, scale: float) -> str:
    """The format of a column's numbers, chosen from the size of its mean (so mean and std share decimals)."""
    if kind == "metric":
        return ".4f" if abs(scale) < 2 else ".2f"  # accuracy/F1 in [0, 1], chrF in [0, 100]
    if kind in ("trainable_params", "tokens_per_s") or abs(scale) >= 100:
        return ",.0f"
    return ",.1f" if abs(scale) >= 10 else ".2f"  # it/s, peak MB, wall s


def _num(x: float, kind: str, scale: float | None = None) -> str:
    """One number in the format of its column; `scale` (default x) picks the decimals."""
    if not math.isfinite(x):
        return NA_DASH
    scale = x if scale is None or not math.isfinite(scale) else scale
    if kind == "optimizer_state_bytes":
        unit, size = byte_unit(scale)
        return f"{x:.0f} B" if size == 1 else f"{x / size:.1f} {unit}"
    return format(x, _spec(kind, scale))


def _cell(row: Row, key: str) -> str:
    """`mean ± std`; the std is "–" for a single seed and left out for exact constants (parameter counts)."""
    mean, std = row.mean[key], row.std[key]
    if key in ("trainable_params", "optimizer_state_bytes") and (std == 0 or row.n == 1):
        return _num(mean, key)
    return f"{_num(mean, key)} ± {_num(std, key, mean) if math.isfinite(std) else NA_DASH}"


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _delta(row: Row, sig: TaskSignificance | None, scale: float) -> str:
    if row.method == BASELINE:
        return "(baseline)"
    c = sig.welch.get(row.method) if sig else None
    if c is None:
        return f"n/a (needs ≥2 seeds of {BASELINE})"
    if not math.isfinite(c.diff):
        return c.note or f"n/a (no dev metric for {row.method})"
    diff = ("+" if c.diff >= 0 else "") + _num(c.diff, "metric", scale)
    return f"{diff}; {c.note}" if c.note else f"{diff} ({_p(c.p)}, t={c.t:.2f}, df={c.df:.1f})"


def size_header(size: str, weights: str) -> str:
    """The line above a size's tables: what the numbers are worth."""
    if size == "quick":
        return f"**size: quick** ({QUICK_NOTE})"
    line = f"**size: {size}** (weights: {weights})"
    if "random" in weights:
        line += ": random gpt2-shaped weights, speed and memory are real, the dev metric is not"
    return line


def markdown(rows: list[Row], sig: dict | None = None) -> str:
    """One table per (size, task), then the ANOVA/Tukey lines and any notes (mixed settings, missing tests)."""
    sig = significance(rows) if sig is None else sig
    lines, last_size = ["# Experiments report", ""], None
    for size, task in dict.fromkeys((r.size, r.task) for r in rows):
        group = [r for r in rows if (r.size, r.task) == (size, task)]
        if size != last_size:
            lines += [size_header(size, "/".join(sorted({r.weights for r in rows if r.size == size}))), ""]
            last_size = size
        s = sig.get((size, task))
        metric = group[0].metric
        scale = max((abs(r.mean["metric"]) for r in group if math.isfinite(r.mean["metric"])), default=0.0)
        lines += [f"## {task} ({size})", "",
                  f"| method | n | dev {metric} mean ± std | Δ vs {BASELINE} (p, Welch) | it/s | tokens/s | peak MB "
                  "| trainable params | opt. state | wall s |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in group:
            flag = " ⚠" if any(n.startswith("mixed settings") for n in r.notes) else ""
            cells = [f"{r.method}{flag}", str(r.n), _cell(r, "metric"), _delta(r, s, scale)]
            cells += [_cell(r, k) for k in STATS if k != "metric"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if s is not None and s.anova is not None:
            a = s.anova
            lines.append(f"One-way ANOVA across methods: F({a['df_between']}, {a['df_within']}) = {a['F']:.3f}, "
                         f"{_p(a['p'])}.")
            pairs = "; ".join(f"{t['a']} vs {t['b']}: Δ={'+' if t['diff'] >= 0 else ''}"
                              f"{_num(t['diff'], 'metric', scale)}, {_p(t['p'])}" for t in s.tukey)
            lines.append(f"Tukey HSD (pairs, Δ = first − second): {pairs}.")
        for note in (s.notes if s is not None else []):
            lines.append(f"{note}.")
        for r in group:
            lines += [f"Note: {r.method}: {note}." for note in r.notes]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _raw(x) -> str:
    """A CSV cell: repr of a finite float (exact round trip), "" for missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return repr(float(x)) if isinstance(x, float) else str(x)


def csv_columns() -> list[str]:
    stats = [f"{k}_{part}" for k in STATS for part in ("mean", "std")]
    return ["size", "task", "method", "metric", "n", "seeds", "weights", *stats, "diff_vs_baseline", "welch_t",
            "welch_df", "welch_p", "welch_note", "tukey_p_vs_baseline", "anova_F", "anova_p", "notes"]


def write_csv(rows: list[Row], path, sig: dict | None = None) -> Path:
    """One line per (size, task, method): raw means and stds (no formatting), and the p-values. Returns the path."""
    sig = significance(rows) if sig is None else sig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns())
        writer.writeheader()
        for r in rows:
            s = sig.get((r.size, r.task))
            c = s.welch.get(r.method) if s else None
            tukey = [t["p"] for t in (s.tukey if s else []) if {t["a"], t["b"]} == {r.method, BASELINE}]
            line = {"size": r.size, "task": r.task, "method": r.method, "metric": r.metric, "n": r.n,
                    "seeds": " ".join(map(str, r.seeds)), "weights": r.weights, "notes": "; ".join(r.notes),
                    "diff_vs_baseline": _raw(c.diff if c else None), "welch_t": _raw(c.t if c else None),
                    "welch_df": _raw(c.df if c else None), "welch_p": _raw(c.p if c else None),
                    "welch_note": c.note if c else "", "tukey_p_vs_baseline": _raw(tukey[0] if tukey else None),
                    "anova_F": _raw(s.anova["F"] if s and s.anova else None),
                    "anova_p": _raw(s.anova["p"] if s and s.anova else None)}
            for k in STATS:
                line[f"{k}_mean"], line[f"{k}_std"] = _raw(r.mean[k]), _raw(r.std[k])
            writer.writerow(line)
    return path


# ---------------------------------------------------------------------------------------------- plots


def _of_task(records: list[dict], task: str, size: str | None) -> dict[str, list[dict]]:
    """{label: records} for one task; the label is the method, plus the size when several sizes are present."""
    chosen = [r for r in records if (experiment_of(r) or {}).get("task") == task
              and (size is None or (experiment_of(r) or {}).get("size") == size)]
    sizes = {experiment_of(r).get("size") for r in chosen}
    groups: dict[str, list[dict]] = {}
    for r in chosen:
        block = experiment_of(r)
        label = block["method"] if len(sizes) == 1 else f"{block['method']} ({block.get('size')})"
        groups.setdefault(label, []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: _method_order(kv[0])))


def _band(ax, xs: dict, ys: dict, label: str) -> None:
    """Mean over seeds as a line, min-max over seeds as a band; `xs`/`ys` map an alignment key to per-seed lists."""
    keys = sorted(ys)
    x = [statistics.fmean(xs[k]) for k in keys]
    line, = ax.plot(x, [statistics.fmean(ys[k]) for k in keys], marker="o", markersize=3, label=label)
    if any(len(ys[k]) > 1 for k in keys):
        ax.fill_between(x, [min(ys[k]) for k in keys], [max(ys[k]) for k in keys], color=line.get_color(), alpha=0.2)


def _metric_name(runs: list[dict]) -> str:
    return str((runs[0].get("best_metric") or {}).get("name", "metric"))


def _title(task: str, records: list[dict], what: str) -> str:
    sizes = {(experiment_of(r) or {}).get("size") for r in records}
    return f"{task}: {what}" + ("\n(quick mode: tiny random model)" if sizes == {"quick"} else "")


def plot_curves(records: list[dict], task: str, size: str | None = None):
    """Dev metric against epoch, one line per method (mean over seeds) with a min-max band. Returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4))
    ax = fig.add_subplot()
    groups = _of_task(records, task, size)
    metric = "metric"
    for label, runs in groups.items():
        metric = _metric_name(runs)
        xs, ys = {}, {}
        for run in runs:
            for e in run.get("evals") or []:
                if isinstance(e.get(metric), int | float):
                    key = round(float(e["epoch"]), 6)  # runs of one config evaluate at the same epochs
                    xs.setdefault(key, []).append(float(e["epoch"]))
                    ys.setdefault(key, []).append(float(e[metric]))
        if ys:
            _band(ax, xs, ys, label)
    ax.set(xlabel="epoch", ylabel=f"dev {metric}", title=_title(task, [r for g in groups.values() for r in g],
                                                                   "dev metric per epoch (mean, min–max of seeds)"))
    if ax.lines:
        ax.legend(fontsize="small")
    return fig


def _eval_times(run: dict, clock: str) -> tuple[list[float], bool]:
    """Cumulative seconds at each evaluation; (times, measured). The loop records them in `eval_times`, one entry
    {step, train_time_s, wall_time_s} per entry of `evals` (beside it, so that comparing two runs' evals ignores
    times). Without them (older records) the run's total is spread evenly over its steps (time ~ step * total /
    steps) and measured is False."""
    evals = run.get("evals") or []
    key = f"{clock}_time_s"
    times = run.get("eval_times")
    if isinstance(times, list) and len(times) == len(evals) and evals and all(
            isinstance(t, dict) and isinstance(t.get(key), int | float) for t in times):
        return [float(t[key]) for t in times], True
    if evals and all(isinstance(e.get(key), int | float) for e in evals):  # times inside the entries
        return [float(e[key]) for e in evals], True
    total, steps = run.get(key), run.get("steps")
    if not isinstance(total, int | float) or not steps:
        return [math.nan] * len(evals), False
    return [total * e["step"] / steps for e in evals], False


def plot_metric_vs_time(records: list[dict], task: str, size: str | None = None, clock: str = "train"):
    """Dev metric against cumulative time (clock "train": optimizer steps only; "wall": everything), one line per
    method, mean over seeds at each evaluation with a min-max band. Returns the Figure."""
    from matplotlib.figure import Figure

    if clock not in ("train", "wall"):
        raise ValueError(f"clock={clock!r}: use 'train' (optimizer steps only) or 'wall' (everything)")
    fig = Figure(figsize=(6.4, 4))
    ax = fig.add_subplot()
    groups = _of_task(records, task, size)
    metric, measured = "metric", True
    for label, runs in groups.items():
        metric = _metric_name(runs)
        xs, ys = {}, {}
        for run in runs:
            times, exact = _eval_times(run, clock)
            measured &= exact
            for e, t in zip(run.get("evals") or [], times, strict=True):
                if isinstance(e.get(metric), int | float) and math.isfinite(t):
                    xs.setdefault(e["step"], []).append(t)  # aligned by step: seeds differ in speed
                    ys.setdefault(e["step"], []).append(float(e[metric]))
        if ys:
            _band(ax, xs, ys, label)
    what = "training time" if clock == "train" else "wall time"
    xlabel = f"{what} (s)" if measured else f"{what} (s, interpolated: run total × step / steps)"
    ax.set(xlabel=xlabel, ylabel=f"dev {metric}",
           title=_title(task, [r for g in groups.values() for r in g], f"dev metric against {what}"))
    if ax.lines:
        ax.legend(fontsize="small")
    return fig


def plot_memory(rows: list[Row], task: str | None = None, size: str | None = None):
    """Bars per method: peak memory (MB, left) and optimizer state (KiB/MiB/GiB, right), mean with std error bars.
    Returns the Figure; one bar per row on each axis."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if (task is None or r.task == task) and (size is None or r.size == size)]
    several = len({(r.size, r.task) for r in rows}) > 1
    labels = [f"{r.task}/{r.method}" + (f" ({r.size})" if len({r.size for r in rows}) > 1 else "") if several
              else r.method for r in rows]
    fig = Figure(figsize=(max(6.4, 1.2 * len(rows) + 2), 4))
    left, right = fig.subplots(1, 2)
    x = range(len(rows))
    unit, per_unit = byte_unit(max((r.mean["optimizer_state_bytes"] for r in rows
                                    if math.isfinite(r.mean["optimizer_state_bytes"])), default=0.0))
    for ax, key, scale, ylabel in ((left, "peak_memory_mb", 1, "peak memory (MB)"),
                                   (right, "optimizer_state_bytes", per_unit, f"optimizer state ({unit})")):
        means = [r.mean[key] / scale if math.isfinite(r.mean[key]) else 0.0 for r in rows]
        errs = [r.std[key] / scale if math.isfinite(r.std[key]) else 0.0 for r in rows]
        ax.bar(x, means, yerr=errs, capsize=3, color=[f"C{i % 10}" for i in x])
        ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize="small")
        ax.set_ylabel(ylabel)
    sizes = {r.size for r in rows}
    fig.suptitle("memory per method" + (f" · {task}" if task else "")
                 + (" (quick mode: tiny random model)" if sizes == {"quick"} else ""))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- all of it


def report(folder, out=None, verbose: bool = True) -> dict[str, Path]:
    """Load the records below `folder`, print the Markdown tables, write report.md, report.csv and the plots
    (PNG) into `out` (default: `folder`). Returns {"markdown", "csv", "curves-<task>-<size>", "time-<task>-<size>",
    "memory-<size>": path}."""
    records = load_records(folder, verbose=verbose)
    rows = summarize(records)
    sig = significance(rows)
    text = markdown(rows, sig)
    if verbose:
        print(text)
    out = Path(folder if out is None else out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "csv": out / "report.csv"}
    paths["markdown"].write_text(text)
    write_csv(rows, paths["csv"], sig)
    for size, task in dict.fromkeys((r.size, r.task) for r in rows):
        for name, plot in (("curves", plot_curves), ("time", plot_metric_vs_time)):
            paths[f"{name}-{task}-{size}"] = out / f"{name}-{task}-{size}.png"
            plot(records, task, size).savefig(paths[f"{name}-{task}-{size}"], dpi=110)
    for size in dict.fromkeys(r.size for r in rows):
        paths[f"memory-{size}"] = out / f"memory-{size}.png"
        plot_memory(rows, size=size).savefig(paths[f"memory-{size}"], dpi=110)
    if verbose:
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths
