"""gpt2lab.experiments.report on synthetic records (no training): means and stds, Welch, ANOVA and Tukey against
hand computations and scipy called directly, the Markdown and CSV, warnings, "n/a" cases, plots."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
from scipy import stats

from gpt2lab.experiments import report
from gpt2lab.experiments.report import BASELINE, MixedSettingsWarning, NoRecordsError

# per-seed dev accuracy of three methods, 3 seeds each (different spreads, so Welch's df is not an integer)
ACC = {"full+adamw": [0.85, 0.86, 0.84], "lora+adamw": [0.80, 0.83, 0.79], "full+soap": [0.87, 0.86, 0.88]}


def make_record(task="paraphrase", method=BASELINE, seed=0, value=0.85, *, size="quick", settings=None,
                metric="accuracy", it=10.0, tok=1000.0, mem=100.0, trainable=1000, state=4096, wall=5.0,
                steps=10, train_time=4.0, evals=None, status="completed") -> dict:
    evals = evals if evals is not None else [
        {"step": 5, "epoch": 0.5, "train_loss": 1.0, metric: value - 0.1},
        {"step": 10, "epoch": 1.0, "train_loss": 0.5, metric: value}]
    block = {"task": task, "method": method, "seed": seed, "size": size, "weights": "random",
             "settings": settings if settings is not None else {"lr": 1e-5}, "grid": "test", "world_size": 1}
    return {"run_name": f"{task}-{method}-seed{seed}", "status": status, "config": {"extra": {"experiment": block}},
            "steps": steps, "best_metric": {"name": metric, "value": value, "step": steps}, "evals": evals,
            "train_time_s": train_time, "wall_time_s": wall, "it_per_s": it, "tokens_per_s": tok,
            "peak_memory_mb": mem, "optimizer": {"name": "AdamW", "state_bytes": state},
            "params": {"trainable": trainable, "total": 2 * trainable}, "seed": seed}


def write(folder, records: list[dict]) -> None:
    for i, r in enumerate(records):
        block = r["config"]["extra"]["experiment"]
        run = folder / block["size"] / f"{block['task']}-{block['method']}-seed{block['seed']}-{i}"
        run.mkdir(parents=True)
        (run / "record.json").write_text(json.dumps(r))


def grid_records(acc=ACC) -> list[dict]:
    out = []
    for m, values in acc.items():
        for seed, v in enumerate(values):
            out.append(make_record(method=m, seed=seed, value=v, it=10.0 + seed + len(m) / 10, tok=1000.0 * (seed + 1),
                                   mem=100.0 + 7 * seed, trainable=1_234_567 if m.startswith("full") else 24_576,
                                   state=3 * 2**20 if m.startswith("full") else 4096, wall=5.0 + seed / 4))
    return out


def test_summarize_means_and_stds_equal_a_hand_computation(tmp_path):
    records = grid_records()
    write(tmp_path, records)
    rows = report.summarize(report.load_records(tmp_path))
    assert [r.method for r in rows] == [BASELINE, "full+soap", "lora+adamw"]  # baseline first
    fields = {"metric": ("best_metric", "value"), "it_per_s": ("it_per_s",), "tokens_per_s": ("tokens_per_s",),
              "peak_memory_mb": ("peak_memory_mb",), "trainable_params": ("params", "trainable"),
              "optimizer_state_bytes": ("optimizer", "state_bytes"), "wall_time_s": ("wall_time_s",)}
    for row in rows:
        runs = [r for r in records if r["config"]["extra"]["experiment"]["method"] == row.method]
        assert row.n == 3 and row.seeds == [0, 1, 2] and row.metric == "accuracy" and (row.size, row.task) == (
            "quick", "paraphrase")
        for key, path in fields.items():
            values = []
            for r in runs:
                v = r
                for k in path:
                    v = v[k]
                values.append(v)
            assert row.mean[key] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert row.std[key] == pytest.approx(statistics.stdev(values), rel=1e-12, abs=1e-15)
    assert rows[0].mean["metric"] == pytest.approx(0.85) and rows[0].std["metric"] == pytest.approx(0.01)


def test_welch_equals_the_formula(tmp_path):
    sig = report.significance(grid_records())[("quick", "paraphrase")]
    assert BASELINE not in sig.welch
    for method in ("lora+adamw", "full+soap"):
        a, b = ACC[method], ACC[BASELINE]
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        p = 2 * stats.t.sf(abs(t), df)
        c = sig.welch[method]
        assert (c.t, c.df, c.p) == (pytest.approx(t, rel=1e-9), pytest.approx(df, rel=1e-9), pytest.approx(p, rel=1e-9))
        assert c.diff == pytest.approx(statistics.mean(a) - statistics.mean(b)) and c.note == ""
    assert sig.welch["lora+adamw"].df != round(sig.welch["lora+adamw"].df)  # Welch, not the pooled n1+n2-2


def test_anova_and_tukey_equal_hand_computation_and_scipy(tmp_path):
    sig = report.significance(grid_records())[("quick", "paraphrase")]
    groups = [ACC[BASELINE], ACC["full+soap"], ACC["lora+adamw"]]  # the rows' order
    everything = [v for g in groups for v in g]
    grand = statistics.mean(everything)
    ss_between = sum(len(g) * (statistics.mean(g) - grand) ** 2 for g in groups)
    ss_within = sum((v - statistics.mean(g)) ** 2 for g in groups for v in g)
    k, n = len(groups), len(everything)
    f = (ss_between / (k - 1)) / (ss_within / (n - k))
    assert sig.anova["F"] == pytest.approx(f, rel=1e-9)
    assert sig.anova["p"] == pytest.approx(stats.f.sf(f, k - 1, n - k), rel=1e-9)
    assert (sig.anova["df_between"], sig.anova["df_within"]) == (2, 6)
    tukey = stats.tukey_hsd(*groups)
    names = [BASELINE, "full+soap", "lora+adamw"]
    got = {(t["a"], t["b"]): t for t in sig.tukey}
    assert len(got) == 3
    for i in range(3):
        for j in range(i + 1, 3):
            pair = got[(names[i], names[j])]
            assert pair["p"] == pytest.approx(tukey.pvalue[i, j], rel=1e-9)
            assert pair["diff"] == pytest.approx(statistics.mean(groups[i]) - statistics.mean(groups[j]))


def test_markdown_shows_the_expected_numbers(tmp_path):
    rows = report.summarize(grid_records())
    sig = report.significance(rows)
    text = report.markdown(rows, sig)
    assert report.QUICK_NOTE in text and "## paraphrase (quick)" in text
    assert "| method | n | dev accuracy mean ± std | Δ vs full+adamw (p, Welch) |" in text
    base = next(line for line in text.splitlines() if line.startswith(f"| {BASELINE} "))
    assert "| 3 | 0.8500 ± 0.0100 | (baseline) |" in base
    assert "1,234,567" in base and "3.0 MiB" in base  # params with separators, bytes in MiB
    assert "2,000 ± 1,000" in base  # tokens/s 1000, 2000, 3000
    lora = next(line for line in text.splitlines() if line.startswith("| lora+adamw "))
    c = sig[("quick", "paraphrase")].welch["lora+adamw"]
    diff = statistics.mean(ACC["lora+adamw"]) - 0.85
    assert f"{diff:.4f} (p={c.p:.3f}, t={c.t:.2f}, df={c.df:.1f})" in lora and "24,576" in lora and "4.0 KiB" in lora
    a = sig[("quick", "paraphrase")].anova
    assert f"One-way ANOVA across methods: F(2, 6) = {a['F']:.3f}, p={a['p']:.3f}." in text
    tukey = stats.tukey_hsd(ACC[BASELINE], ACC["lora+adamw"], ACC["full+soap"])  # p of a pair: same with 3 groups
    assert f"full+adamw vs lora+adamw: Δ=+0.0433, p={tukey.pvalue[0, 1]:.3f}" in text
    assert "nan" not in text.lower()


def test_csv_round_trips(tmp_path):
    rows = report.summarize(grid_records() + [make_record(method="lora+soap", value=0.8)])
    sig = report.significance(rows)
    path = report.write_csv(rows, tmp_path / "out" / "report.csv", sig)
    with open(path, newline="") as f:
        lines = list(csv.DictReader(f))
    assert [line["method"] for line in lines] == [r.method for r in rows]
    for line, row in zip(lines, rows, strict=True):
        for key in report.STATS:
            assert float(line[f"{key}_mean"]) == row.mean[key]
            assert line[f"{key}_std"] == "" if row.n == 1 else float(line[f"{key}_std"]) == row.std[key]
        assert int(line["n"]) == row.n
    lora = next(line for line in lines if line["method"] == "lora+adamw")
    welch = sig[("quick", "paraphrase")].welch["lora+adamw"]
    assert float(lora["welch_p"]) == welch.p and float(lora["welch_df"]) == welch.df
    single = next(line for line in lines if line["method"] == "lora+soap")
    assert single["welch_p"] == "" and "needs ≥2 seeds of lora+soap" in single["welch_note"]
    assert single["anova_p"] == ""  # lora+soap has 1 seed: no ANOVA


def test_mixed_settings_are_flagged_not_averaged_silently(tmp_path):
    records = [make_record(seed=0, value=0.8, settings={"lr": 1e-5}), make_record(seed=1, value=0.9,
                                                                                 settings={"lr": 2e-5})]
    with pytest.warns(MixedSettingsWarning, match=r"full\+adamw: mixed settings \(lr: 1e-05, 2e-05\)"):
        rows = report.summarize(records)
    text = report.markdown(rows)
    assert "full+adamw ⚠" in text and "mixed settings (lr: 1e-05, 2e-05)" in text


def test_missing_or_empty_folder_is_one_line_that_says_what_to_run(tmp_path, capsys):
    for folder in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(NoRecordsError) as err:
            report.load_records(folder)
        assert "\n" not in str(err.value) and "python -m gpt2lab.experiments run" in str(err.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "record.json").write_text(json.dumps({"config": {"extra": {}}}))  # another notebook's run
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "record.json").write_text('{"config": {"extra": {"experi')  # killed while writing
    write(tmp_path, [make_record()])
    assert len(report.load_records(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "skipped 1 unreadable or partial record file(s)" in out and "ignored 1 record(s)" in out


def test_single_seeds_and_missing_baseline_say_na(tmp_path):
    rows = report.summarize([make_record(method="lora+adamw", value=0.8)])
    text = report.markdown(rows)
    assert "0.8000 ± –" in text and "n/a (needs ≥2 seeds of full+adamw)" in text
    assert "ANOVA/Tukey HSD: n/a (needs ≥2 methods)" in text
    rows = report.summarize([make_record(value=0.85), make_record(method="lora+adamw", value=0.8),
                             make_record(method="lora+adamw", seed=1, value=0.82)])
    text = report.markdown(rows)
    assert "n/a (needs ≥2 seeds of full+adamw)" in text and "needs ≥3 seeds of every method" in text
    assert "nan" not in text.lower()


def test_constant_samples_are_explained_not_nan(tmp_path):
    records = [make_record(method=m, seed=s, value=0.5) for m in (BASELINE, "lora+adamw") for s in range(3)]
    rows = report.summarize(records)
    sig = report.significance(rows)
    assert "zero variance" in sig[("quick", "paraphrase")].welch["lora+adamw"].note
    text = report.markdown(rows, sig)
    assert "+0.0000; n/a (every seed gave the same value" in text and "zero within-group variance" in text
    assert "nan" not in text.lower()


def test_plots_have_one_line_or_bar_per_method(tmp_path):
    records = grid_records()
    fig = report.plot_curves(records, "paraphrase")
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and [line.get_label() for line in ax.lines] == [BASELINE, "full+soap", "lora+adamw"]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.75, 0.85])  # mean over seeds at epochs 0.5, 1
    assert ax.get_ylabel() == "dev accuracy"

    fig = report.plot_metric_vs_time(records, "paraphrase")
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and "interpolated" in ax.get_xlabel()
    assert list(ax.lines[0].get_xdata()) == pytest.approx([2.0, 4.0])  # train_time 4 s over 10 steps, evals at 5, 10
    timed = [make_record(seed=s, evals=[{"step": 10, "epoch": 1.0, "train_loss": 0.1, "accuracy": 0.9,
                                         "train_time_s": 3.0 + s, "wall_time_s": 6.0}]) for s in range(2)]
    ax = report.plot_metric_vs_time(timed, "paraphrase").axes[0]
    assert ax.get_xlabel() == "training time (s)" and list(ax.lines[0].get_xdata()) == pytest.approx([3.5])
    assert report.plot_metric_vs_time(timed, "paraphrase", clock="wall").axes[0].lines[0].get_xdata()[0] == 6.0
    # the loop's layout: times in `eval_times`, one entry per evaluation, beside `evals`
    beside = [make_record(seed=s, evals=[{"step": 10, "epoch": 1.0, "train_loss": 0.1, "accuracy": 0.9}])
              for s in range(2)]
    for s, run in enumerate(beside):
        run["eval_times"] = [{"step": 10, "train_time_s": 5.0 + 2 * s, "wall_time_s": 8.0}]
    ax = report.plot_metric_vs_time(beside, "paraphrase").axes[0]
    assert ax.get_xlabel() == "training time (s)" and list(ax.lines[0].get_xdata()) == pytest.approx([6.0])

    rows = report.summarize(records)
    fig = report.plot_memory(rows)
    assert [len(ax.patches) for ax in fig.axes] == [3, 3]
    assert fig.axes[0].patches[0].get_height() == pytest.approx(107.0)  # peak MB 100, 107, 114
    assert fig.axes[1].patches[0].get_height() == pytest.approx(3.0)  # 3 MiB of optimizer state


def test_report_writes_markdown_csv_and_plots(tmp_path, capsys):
    write(tmp_path / "results", grid_records() + [make_record(task="sonnet", metric="chrf", value=41.25)])
    paths = report.report(tmp_path / "results", tmp_path / "report")
    assert set(paths) == {"markdown", "csv", "curves-paraphrase-quick", "time-paraphrase-quick",
                          "curves-sonnet-quick", "time-sonnet-quick", "memory-quick"}
    assert all(p.exists() and p.parent == tmp_path / "report" for p in paths.values())
    text = paths["markdown"].read_text()
    assert text in capsys.readouterr().out and "## sonnet (quick)" in text and "41.25 ± –" in text
