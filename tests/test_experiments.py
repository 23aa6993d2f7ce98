"""gpt2lab.experiments (notebook 09): method strings and their canonical names, the optimizer registry, settings
resolution against the notebooks' values, grid files (good ones and each kind of bad key), skip-finished, exact
resume, and the quick grid end to end through the command line (then `report`). Tiny random models, few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lab.experiments import (
    OPTIMIZERS,
    Grid,
    GridError,
    Method,
    MethodError,
    grid_from_dict,
    load_grid,
    parse_method,
    register_optimizer,
    resolve_settings,
    run_one,
)
from gpt2lab.experiments.cli import main
from gpt2lab.experiments.methods import build, paper_beta
from gpt2lab.experiments.runner import experiment_block, run_name

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("text, name", [
    ("full+adamw", "full+adamw"),
    ("lora+soap", "lora-r8-qv+soap"),
    ("full+adamw+smart", "full+adamw+smart"),
    ("smart+adamw+full", "full+adamw+smart"),  # any order in, canonical order out
    ("lora-r16-qkv+adaprelora", "lora-r16-qkv+adaprelora"),
    ("smart", "full+adamw+smart"),
    ("lora", "lora-r8-qv+adamw"),
    ("soap", "full+soap"),
    ("adaprelora", "lora-r8-qv+adaprelora"),  # a LoRA-only optimizer implies LoRA
    ("LoRA-r4-a8-d0-q.k.v+lora-plus+smart", "lora-r4-a8-d0-q.k.v+lora-plus+smart"),
    ("lora-qk+scaled-adamw", "lora-r8-qk+scaled-adamw"),
    ("lora-r2-all", "lora-r2-qkv.attn_out.fc.mlp_out+adamw"),
])
def test_parse_method_canonical_names(text, name):
    method = parse_method(text)
    assert method.name == name
    assert parse_method(method.name) == method  # the canonical name parses back to the same method


def test_method_fields():
    m = parse_method("lora-r16-a64-d0.05-qkv+soap+smart")
    assert (m.base, m.optimizer, m.smart, m.rank, m.alpha, m.targets, m.dropout) == \
        ("lora", "soap", True, 16, 64.0, ("qkv",), 0.05)
    full = parse_method("full+soap")
    assert (full.rank, full.alpha, full.targets, full.dropout) == (None, None, None, None)
    assert parse_method("lora-qv") == Method("lora", "adamw", False, 8, 32, ("q", "v"), 0.1)


@pytest.mark.parametrize("text, words", [
    ("full+adaprelora", ["lora+adaprelora"]),
    ("full+lora-plus", ["lora+lora-plus"]),
    ("full+scaled-adamw", ["lora+scaled-adamw"]),
    ("full+sgd", ["unknown part 'sgd'", "adamw", "register_optimizer"]),
    ("full+lora", ["two bases"]),
    ("adamw+soap", ["two optimizers"]),
    ("smart+smart", ["smart twice"]),
    ("lora-r0", ["rank"]),
    ("lora-xyz", ["unknown LoRA target 'xyz'"]),
    ("lora-qkv.q", ["twice"]),
    ("", ["a method is a string"]),
])
def test_parse_method_errors_are_one_line(text, words):
    with pytest.raises(MethodError) as info:
        parse_method(text)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_register_optimizer_and_its_errors():
    def sgdm(model, lr):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)

    try:
        spec = register_optimizer("sgd-momentum", sgdm, lr={"full": 0.05, "lora": 0.1}, doc="SGD with momentum")
        assert OPTIMIZERS["sgd-momentum"] is spec
        assert parse_method("lora+sgd-momentum").name == "lora-r8-qv+sgd-momentum"
        assert resolve_settings(parse_method("full+sgd-momentum"), "sonnet", "full")[1]["lr"] == 0.05
        assert resolve_settings(parse_method("lora+sgd-momentum"), "sonnet", "quick")[1]["lr"] == 0.1  # no "quick"
        register_optimizer("sgd-momentum", sgdm, lr=0.2, lora_only=True)  # a rerun cell replaces it
        assert parse_method("sgd-momentum").base == "lora"
    finally:
        OPTIMIZERS.pop("sgd-momentum", None)
    for name, kwargs, word in (("Bad Name", {"lr": 1.0}, "lowercase"), ("smart", {"lr": 1.0}, "not be one of"),
                               ("ok", {"lr": -1.0}, "positive"), ("ok", {"lr": {"fast": 1.0}}, "keys")):
        with pytest.raises(MethodError, match=word):
            register_optimizer(name, sgdm, **kwargs)
    with pytest.raises(MethodError, match="callable"):
        register_optimizer("ok", "not a function", lr=1.0)
    assert "ok" not in OPTIMIZERS


# ---------------------------------------------------------------------------------------------- settings


def test_defaults_follow_the_notebooks():
    # notebook 04's real-mode lrs for full fine-tuning, 05/08's 2e-4 for LoRA, 06's SMART settings
    _, s = resolve_settings(parse_method("full+adamw"), "sonnet", "full")
    assert (s["lr"], s["epochs"], s["batch_size"], s["max_length"], s["max_new_tokens"], s["weight_decay"]) == \
        (5e-5, 10, 8, 1024, 160, 0.01)
    assert s["amp"] is None  # bf16 only on CUDA
    assert resolve_settings(parse_method("full+adamw"), "sonnet", "full", cuda=True)[1]["amp"] == "bf16"
    _, p = resolve_settings(parse_method("full+soap"), "paraphrase", "full")
    assert (p["lr"], p["batch_size"]) == (2e-5, 16)
    m, lora = resolve_settings(parse_method("lora+adaprelora"), "paraphrase", "full")
    assert (lora["lr"], lora["rank"], lora["alpha"], lora["targets"], lora["dropout"]) == (2e-4, 8, 32.0, "q,v", 0.1)
    _, smart = resolve_settings(parse_method("smart"), "sonnet", "full")
    assert (smart["smart_eps"], smart["smart_step_size"], smart["smart_noise_var"], smart["prox_weight"]) == \
        (1e-2, 1.0, 1e-2, 1.0)  # step size 100 x eps, noise variance eps
    _, tiny = resolve_settings(parse_method("smart"), "sonnet", "quick")
    assert tiny["smart_eps"] == 1e-3 and tiny["smart_step_size"] == pytest.approx(0.1)
    assert "rank" not in smart and "smart_eps" not in lora and "test_limit" not in s and "max_new_tokens" not in p


def test_overrides_in_order_and_the_limit():
    layers = [{"lr": 1.0, "rank": 4}, {"lr": 2.0, "smart_eps": 0.5}, {"lr": 3.0, "targets": "q,k,v"}]
    method, s = resolve_settings(parse_method("lora+adamw"), "sonnet", "full", layers, limit=2)
    assert s["lr"] == 3.0 and "smart_eps" not in s  # the last layer wins; SMART keys skip a method without SMART
    assert method.name == "lora-r4-q.k.v+adamw" and s["rank"] == 4  # LoRA keys change the method and its name
    assert (s["train_limit"], s["dev_limit"], s["epochs"], s["max_new_tokens"]) == (2, 2, 2, 2)  # capped at 2
    with pytest.raises(MethodError, match="unknown key 'lrr'.*known: lr, epochs"):
        resolve_settings(parse_method("full"), "sonnet", "full", [{"lrr": 1.0}])


def test_build_wires_smart_as_notebook_06(tokenizer, sonnet_data):
    from tiny_tasks import tiny_model

    from gpt2lab.smart import MomentumBregman
    from gpt2lab.tasks import SonnetTask

    task = SonnetTask.load(tokenizer, train_limit=2, dev_limit=1, max_length=32, max_new_tokens=2)
    method, s = resolve_settings(parse_method("lora+soap+smart"), "sonnet", "quick")
    built = build(method, task, tiny_model(), s, total_steps=50, seed=0)
    extra = built.objective.describe()["extra_losses"]
    assert any(term.get("eps") == 1e-3 and term.get("step_size") == pytest.approx(0.1) for term in extra)
    (prox,) = built.callbacks
    assert isinstance(prox, MomentumBregman) and prox.weight == 1.0
    assert [prox.beta(t) for t in (0, 4, 5, 49)] == [0.99, 0.99, 0.999, 0.999]  # 0.99 for the first 10% of 50
    assert paper_beta(10)(0) == 0.99 and paper_beta(10)(1) == 0.999
    trainable = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = built.factory(built.model, 1e-3)
    assert type(optimizer).__name__ == "SOAP" and {g["weight_decay"] for g in optimizer.param_groups} <= {0.01, 0.0}


# ---------------------------------------------------------------------------------------------- grids

GOOD = """
name = "mine"
tasks = ["sonnet", "quora"]
methods = ["full+adamw", "lora+soap", "smart"]
seeds = [0, 1, 2]
size = "full"
weights = "random"

[settings]
batch_size = 4
amp = "none"

[task.sonnet]
epochs = 3

[method."lora-r8-qv+soap"]
lr = 1e-3
rank = 16
"""


def test_good_grid_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    grid = load_grid(path)
    assert (grid.name, grid.tasks, grid.seeds, grid.size, grid.weights) == \
        ("mine", ["sonnet", "paraphrase"], [0, 1, 2], "full", "random")
    assert [m.name for m in grid.methods] == ["full+adamw", "lora-r8-qv+soap", "full+adamw+smart"]
    assert grid.settings == {"batch_size": 4, "amp": None}
    assert len(grid.runs()) == 2 * 3 * 3
    soap = grid.methods[1]
    method, s = resolve_settings(soap, "sonnet", "full", grid.layers("sonnet", soap))
    assert (s["lr"], s["epochs"], s["batch_size"], s["amp"], method.name) == (1e-3, 3, 4, None, "lora-r16-qv+soap")
    _, p = resolve_settings(grid.methods[0], "paraphrase", "full", grid.layers("paraphrase", grid.methods[0]))
    assert (p["epochs"], p["lr"]) == (1, 2e-5)  # [task.sonnet] does not reach the paraphrase runs
    as_json = tmp_path / "mine.json"
    as_json.write_text(json.dumps({"tasks": ["paraphrase"], "methods": ["lora"], "settings": {"lr": 1}}))
    grid = load_grid(as_json)
    assert (grid.name, grid.tasks, grid.settings, grid.size) == ("mine", ["paraphrase"], {"lr": 1.0}, "quick")


@pytest.mark.parametrize("edit, words", [
    ('lrr = 1\n', ["unknown key 'lrr'", "known: name, description, tasks"]),
    ('[settings]\nlrr = 1e-4\n', ["[settings]", "unknown key 'lrr'", "known: lr, epochs"]),
    ('[settings]\nlr = "fast"\n', ["[settings]", "lr must be int or float"]),
    ('[settings]\nepochs = 1.5\n', ["epochs must be int"]),
    ('[settings]\nschedule = "cosine"\n', ["schedule must be 'constant' or 'linear'"]),
    ('[task.poems]\nepochs = 1\n', ["[task.poems]", "unknown task 'poems'", "sonnet, paraphrase"]),
    ('[task.sonnet]\nbatch = 1\n', ["[task.sonnet]", "unknown key 'batch'", "batch_size"]),
    ('[method."lora+soap"]\nrnk = 4\n', ['[method."lora+soap"]', "unknown key 'rnk'", "rank"]),
    ('[method."full+soap"]\nlr = 1\n', ['[method."full+soap"]', "names no method of this grid"]),
    ('[method."full+sgd"]\nlr = 1\n', ['[method."full+sgd"]', "unknown part 'sgd'"]),
])
def test_bad_grid_files_name_the_file_and_key(tmp_path, edit, words):
    path = tmp_path / "bad.toml"
    path.write_text('tasks = ["sonnet"]\nmethods = ["full+adamw", "lora+soap"]\n' + edit)
    with pytest.raises(GridError) as info:
        load_grid(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("d, words", [
    ({"methods": ["full+adaprelora"]}, ["methods", "lora+adaprelora"]),
    ({"seeds": [0, "1"]}, ["seeds must be a non-empty list of ints"]),
    ({"size": "huge"}, ["size must be one of quick, full"]),
    ({"tasks": []}, ["tasks must be a non-empty list"]),
    ({"weights": 3}, ["weights must be a string"]),
    ({"settings": 3}, ["[settings] must be a table"]),
])
def test_bad_grid_values(d, words):
    with pytest.raises(GridError) as info:
        grid_from_dict(d, source="g.toml")
    for word in ["grid file g.toml", *words]:
        assert word in str(info.value)


def test_builtin_grids(capsys):
    quick = load_grid("quick")
    assert (quick.name, quick.size, quick.weights, quick.seeds, quick.tasks) == \
        ("quick", "quick", "tiny", [0, 1], ["sonnet", "paraphrase"])
    default = load_grid("default")
    assert (default.size, default.seeds) == ("full", [0, 1, 2])
    paper = {f"{b}+{o}" for b in ("full", "lora-r8-qv") for o in ("adamw", "soap", "adamw+smart")}
    lora_optimizers = {"lora-r8-qv+adaprelora", "lora-r8-qv+scaled-adamw", "lora-r8-qv+lora-plus"}
    assert {m.name for m in default.methods} == paper | lora_optimizers
    assert load_grid("auto", cuda=True).name == "default" and capsys.readouterr().out == ""
    assert load_grid("auto", cuda=False).name == "quick"
    assert capsys.readouterr().out.startswith("no CUDA GPU: running the quick grid (tiny random model")
    with pytest.raises(GridError, match="no grid file"):
        load_grid("nonexistent.toml")


# ---------------------------------------------------------------------------------------------- runs


def test_run_names_keep_sizes_and_weights_apart():
    method, s = resolve_settings(parse_method("lora"), "sonnet", "quick")
    base = experiment_block("sonnet", method, 0, "quick", "tiny", s, "g")
    names = {run_name(base)}
    for key, value in (("weights", "random"), ("size", "full"), ("seed", 1), ("method", "lora-r8-qv+soap")):
        names.add(run_name({**base, key: value}))
    names.add(run_name({**base, "settings": {**s, "lr": 1.0}}))
    assert len(names) == 6
    # the budget does not change the folder: a longer run resumes the shorter one
    assert run_name({**base, "settings": {**s, "epochs": 9, "max_steps": 3}}) == run_name(base)
    assert run_name(base).startswith("sonnet-lora-r8-qv+adamw-seed0-quick-")


QUICK = dict(size="quick", verbose=True, limit=None)


def test_skip_finished(tmp_path, capsys, monkeypatch, tokenizer, quora_data):
    first = run_one("paraphrase", "lora+adamw", seed=3, out=tmp_path, **QUICK)
    assert first["status"] == "completed" and first["steps"] == 2
    block = first["config"]["extra"]["experiment"]
    assert (block["task"], block["method"], block["seed"], block["size"], block["weights"], block["world_size"]) == \
        ("paraphrase", "lora-r8-qv+adamw", 3, "quick", "tiny", 1)
    assert block["settings"]["lr"] == 3e-3 and block["grid"] == "custom"
    capsys.readouterr()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    run_dir = Path(first["run_dir"])  # keep="best" (the default): a finished run's checkpoints are deleted
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "record.json"]

    monkeypatch.setattr("gpt2lab.train.train", no_training)
    again = run_one("paraphrase", "lora+adamw", seed=3, out=tmp_path, **QUICK)
    assert capsys.readouterr().out.strip() == f"skip {first['run_name']}: finished"
    assert again == json.loads((run_dir / "record.json").read_text())
    assert len(list(tmp_path.iterdir())) == 1
    # how a run executes or what it keeps does not make it another run: still skipped
    run_one("paraphrase", "lora+adamw", seed=3, out=tmp_path, settings={"keep": "all", "compile": True}, **QUICK)
    assert capsys.readouterr().out.strip() == f"skip {first['run_name']}: finished"


def test_keep_record_deletes_best_and_a_diverged_run_keeps_all(tmp_path, tokenizer, quora_data):
    from gpt2lab.experiments.runner import prune

    kept = run_one("paraphrase", "full+adamw", seed=0, out=tmp_path, settings={"keep": "record"}, **QUICK)
    assert [p.name for p in Path(kept["run_dir"]).iterdir()] == ["record.json"]
    files = ("checkpoint.pt", "checkpoint.prev.pt", "best.pt", "record.json")
    for status, keep, left in (("diverged", "record", files), ("running", "best", files), ("completed", "all", files),
                               ("early_stopped", "best", ("best.pt", "record.json"))):
        folder = tmp_path / f"{status}-{keep}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("x")
        prune(folder, {"status": status}, keep)
        assert sorted(p.name for p in folder.iterdir()) == sorted(left), (status, keep)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, tokenizer, quora_data):
    # SMART's teacher (a stateful callback) and LoRA: the checkpoint must restore both exactly
    # 2 steps per epoch, a checkpoint after epoch 1; keep="all": the finished runs' checkpoints are compared below
    common = dict(seed=1, settings={"epochs": 2, "keep": "all"}, **QUICK)

    def interrupt(loop):
        if loop.step == 3:
            raise KeyboardInterrupt

    whole = run_one("paraphrase", "lora+adamw+smart", out=tmp_path / "a", **common)
    with pytest.raises(KeyboardInterrupt):
        run_one("paraphrase", "lora+adamw+smart", out=tmp_path / "b", callbacks=[interrupt], **common)
    (run_dir,) = (tmp_path / "b").iterdir()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "record.json").exists()
    resumed = run_one("paraphrase", "lora+adamw+smart", out=tmp_path / "b", **common)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == whole["steps"] == 4
    assert resumed["run_name"] == whole["run_name"]
    assert resumed["loss_log"] == whole["loss_log"]  # bit for bit on a CPU
    assert untimed(resumed["evals"]) == untimed(whole["evals"])  # step, epoch, train_loss, accuracy, f1, ...
    a, b = (torch.load(Path(r["run_dir"]) / "checkpoint.pt", weights_only=False) for r in (whole, resumed))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ema_a, ema_b = (c["callbacks"][0]["state"]["ema"] for c in (a, b))  # SMART's teacher
    assert ema_a and ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def untimed(entries: list[dict]) -> list[dict]:
    """Eval entries without their clock readings (the only thing a resumed run may not repeat)."""
    return [{k: v for k, v in e.items() if "time" not in k} for e in entries]


def test_a_registered_optimizer_runs_in_the_grid(tmp_path, tokenizer, quora_data):
    # notebook 09's exercise: register an optimizer, then run it like any other
    def sgdm(model, lr):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)

    try:
        register_optimizer("sgdm", sgdm, lr=1e-2)
        record = run_one("paraphrase", "lora+sgdm", out=tmp_path, **QUICK)
    finally:
        OPTIMIZERS.pop("sgdm", None)
    assert record["optimizer"]["name"] == "SGD" and record["optimizer"]["groups"][0]["lr"] == 1e-2
    assert record["config"]["extra"]["experiment"]["method"] == "lora-r8-qv+sgdm"


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('methods = ["full+adamw"]\n[settings]\nbatchsize = 2\n')
    for argv, words in ((["run", "--set", "lrr=1"], ["unknown key 'lrr'", "known: lr"]),
                        (["run", "--set", "lr"], ["key=value"]),
                        (["run", "--grid", str(bad)], [str(bad), "unknown key 'batchsize'"]),
                        (["run", "--method", "full+adaprelora"], ["lora+adaprelora"]),
                        (["run", "--task", "poems"], ["unknown task 'poems'"])):
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
        for word in words:
            assert word in err
    assert not (tmp_path / "out").exists()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GPT2LAB_LIMIT", "GPT2LAB_RESULTS")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONPATH=str(REPO / "lib"))
    return env


def test_quick_grid_end_to_end_through_the_command_line(tmp_path, capsys, monkeypatch, tokenizer, sonnet_data,
                                                        quora_data):
    monkeypatch.delenv("GPT2LAB_LIMIT", raising=False)
    out = tmp_path / "results"
    command = [sys.executable, "-m", "gpt2lab.experiments", "run", "--grid", "quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    grid = load_grid("quick")
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/record.json"))]
    assert len(records) == len(grid.runs()) == 20
    seen = {(r["config"]["extra"]["experiment"]["task"], r["config"]["extra"]["experiment"]["method"],
             r["config"]["extra"]["experiment"]["seed"]) for r in records}
    assert seen == {(t, m.name, s) for t, m, s in grid.runs()}
    assert all(r["status"] == "completed" and r["best_metric"]["value"] is not None for r in records)
    assert "tiny random GPT-2" in done.stdout
    # the same seed gives the same starting weights, whatever the method (LoRA adds adapters to that base)
    starts = {}
    for r in records:
        if not r["method"].startswith("lora"):
            starts.setdefault(r["seed"], set()).add(r["start_fingerprint"])
    assert all(len(fingerprints) == 1 for fingerprints in starts.values()) and len(starts) == 2

    # again, in this process (no second start-up): every run is skipped, and the command says so
    capsys.readouterr()
    assert main(["run", "--grid", "quick", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count(": finished") == 20 and "completed" not in again

    assert main(["report", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "full+adamw" in shown and "lora-r8-qv+adaprelora" in shown and "| 2 |" in shown  # n = 2 seeds
    assert {p.name for p in out.iterdir() if p.is_file()} >= {"report.md", "report.csv", "memory-quick.png"}
    # the quick grid keeps records only (keep = "record"): no weights left behind
    assert {p.name for p in out.glob("*/*")} == {"record.json"}


def test_grid_object_runs_in_python(tmp_path, tokenizer, sonnet_data):
    from gpt2lab.experiments import run_grid

    grid = Grid(name="tiny", tasks=["sonnet"], methods=[parse_method("full+soap")], seeds=[0])
    (record,) = run_grid(grid, tmp_path, settings={"max_steps": 1}, limit=None, verbose=False)
    assert record["steps"] == 1 and record["config"]["extra"]["experiment"]["grid"] == "tiny"
    assert record["config"]["extra"]["model"]["n_positions"] == 256
