"""The trainer (topotorch.training): reproducibility, the five methods, schedules, config checks,
divergence, the run folder and rebuilding a run from it."""

from __future__ import annotations

import csv
import json
import math
import warnings

import pytest
import torch

from topotorch import body as body_module
from topotorch import training as training_pkg
from topotorch.analysis import thresholded
from topotorch.checkpoint import load_checkpoint
from topotorch.objectives.wiring import wiring_cost
from topotorch.training import (
    METHODS,
    TrainConfig,
    TrainingDiverged,
    build,
    evaluate,
    load_run,
    parse_schedule,
    schedule_value,
    strategies,
    train,
)
from topotorch.visualize import load_snapshots

QUIET = dict(animation=False, progress=False)


def config(task: str = "independence", **overrides) -> TrainConfig:
    values = {"steps": 50, "dtype": "float64", **QUIET, **overrides}
    return TrainConfig.for_task(task, **values)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def positions(graph) -> dict[str, torch.Tensor]:
    return {s.name: s.positions.clone() for s in graph.spaces if s.positions is not None}


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- reproducibility ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, extra",
    [
        ("bimt", dict(steps=400, swap_every=100)),
        ("swap", dict(steps=200, swap_every=50, relocation="assign", batch_size=32)),
    ],
)
def test_float64_runs_are_bit_reproducible(method, extra, monkeypatch):
    moved = []
    orig = body_module.relocate  # Body decides relocations (topotorch.body.relocate_everywhere)

    def counting(*a, **k):
        stats = orig(*a, **k)
        moved.append(sum(stats.moved.values()))
        return stats

    monkeypatch.setattr(body_module, "relocate", counting)
    runs = [train(config(method=method, seed=3, **extra)) for _ in range(2)]
    assert sum(moved) > 0  # relocation really happened, so it is part of what is reproduced
    a, b = runs
    assert_equal_states(state(a.model), state(b.model))
    assert_equal_states(positions(a.graph), positions(b.graph))
    assert a.summary["wiring_cost"] == b.summary["wiring_cost"]
    assert a.summary["test_mse"] == b.summary["test_mse"]


def test_different_seeds_differ():
    a = train(config(seed=0))
    b = train(config(seed=1))
    assert not torch.equal(a.model[0].weight, b.model[0].weight)
    assert not torch.equal(a.data.x_train, b.data.x_train)
    assert a.summary["test_mse"] != b.summary["test_mse"]


# -- the five methods --------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_and_relocates_only_if_it_should(method, monkeypatch):
    calls = []
    orig = body_module.relocate

    def spy(graph, cfg, *a, **k):
        stats = orig(graph, cfg, *a, **k)
        calls.append((cfg.wf, sum(stats.moved.values())))
        return stats

    monkeypatch.setattr(body_module, "relocate", spy)
    seen = []
    cfg = config(method=method, steps=200, swap_every=50, lam="0:1e-2")
    _, _, fresh = build(cfg)
    start = positions(fresh)
    r = train(cfg, on_step=lambda step, model, graph: seen.append(step))
    assert seen == list(range(1, 201))
    assert math.isfinite(r.summary["test_mse"]) and r.summary["wiring_cost"] > 0
    end = positions(r.graph)
    if method in ("swap", "bimt"):
        assert len(calls) == 200 // 50
        assert all(wf == cfg.wf > 0 for wf, _ in calls)  # relocation is judged by the real wiring cost
        assert sum(n for _, n in calls) > 0
        assert any(not torch.equal(end[k], start[k]) for k in ("input", "output"))
        for k in start:  # a relocation only permutes the slots
            assert torch.equal(end[k].sort(0).values, start[k].sort(0).values)
    else:
        assert calls == []
        assert_equal_states(end, start)


def test_method_none_ignores_lambda():
    a = train(config(method="none", lam="0:1"))
    b = train(config(method="none", lam="0:1e-4"))
    assert_equal_states(state(a.model), state(b.model))
    c = train(config(method="local", lam="0:1"))
    assert not torch.equal(a.model[0].weight, c.model[0].weight)


def test_penalty_wf_per_method():
    for method, train_wf in (("none", 2.0), ("l1", 0.0), ("local", 2.0), ("swap", 0.0), ("bimt", 2.0)):
        cfg = config(method=method, wf=2.0)
        assert cfg.wiring(train=True).wf == train_wf, method
        assert cfg.wiring(train=False).wf == 2.0, method  # relocation decisions always use locality
        assert cfg.uses_relocation == (method in ("swap", "bimt"))
        assert cfg.uses_penalty == (method != "none")


def test_l1_training_does_not_depend_on_wf_but_local_does():
    l1 = [train(config(method="l1", wf=wf, lam="0:1e-2")) for wf in (1.0, 4.0)]
    assert_equal_states(state(l1[0].model), state(l1[1].model))
    local = [train(config(method="local", wf=wf, lam="0:1e-2")) for wf in (1.0, 4.0)]
    assert not torch.equal(local[0].model[0].weight, local[1].model[0].weight)
    assert not torch.equal(l1[0].model[0].weight, local[0].model[0].weight)


@pytest.mark.parametrize("relocating, penalty_twin", [("swap", "l1"), ("bimt", "local")])
def test_relocating_methods_train_like_their_twin_until_the_first_relocation(relocating, penalty_twin):
    every = 30
    got = {}
    for method in (relocating, penalty_twin):
        train(
            config(method=method, steps=every, swap_every=every, lam="0:1e-2"),
            on_step=lambda s, model, g, m=method: got.__setitem__(m, state(model)) if s == every - 1 else None,
        )
    assert_equal_states(got[relocating], got[penalty_twin])


def test_bimt_wires_cheaper_than_none():
    common = dict(steps=300, swap_every=50, lam="0:1e-2", dtype="float32")
    none = train(config(method="none", **common))
    bimt = train(config(method="bimt", **common))
    assert bimt.summary["wiring_cost"] < 0.5 * none.summary["wiring_cost"]
    assert bimt.summary["active_weights"]["active"] < none.summary["active_weights"]["active"]


# -- λ schedules -------------------------------------------------------------------------------


def test_parse_schedule_phases_and_values():
    ph = parse_schedule("0:1e-3, 5000:1e-2,15000:1e-3")
    assert ph == [(0, 1e-3), (5000, 1e-2), (15000, 1e-3)]
    assert [schedule_value(ph, s) for s in (0, 4999, 5000, 14999, 15000, 10**7)] == [1e-3, 1e-3, 1e-2, 1e-2, 1e-3, 1e-3]
    assert parse_schedule(0.5) == [(0, 0.5)]
    assert parse_schedule(2) == [(0, 2.0)]
    assert parse_schedule("0.25") == [(0, 0.25)]
    assert parse_schedule("0:0") == [(0, 0.0)]
    assert parse_schedule([[0, 1], [10, 2]]) == [(0, 1.0), (10, 2.0)]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("abc", "bad schedule phase 'abc'"),
        ("0:1,10:x", "bad schedule phase '10:x'"),
        ("", "bad schedule phase"),
        ("5:1e-3", "must start at step 0"),
        ("0:1,10:2,5:3", "must increase"),
        ("0:1,0:2", "must increase"),
        ("0:-1", "finite and >= 0"),
        ("0:1,10:nan", "finite and >= 0"),
        ("0:inf", "finite and >= 0"),
        (-0.1, "finite and >= 0"),
        ([], "empty schedule"),
    ],
)
def test_parse_schedule_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule(spec)


def test_schedule_drives_the_logged_lambda(tmp_path):
    r = train(config(lam="0:0.1,20:0.2,40:0", log_every=10, out=str(tmp_path)))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # the λ logged at step `done` is the one used for the update that reached it (step done-1)
    logged = [(int(x["step"]), float(x["lambda"])) for x in rows]
    assert logged == [(10, 0.1), (20, 0.1), (30, 0.2), (40, 0.2), (50, 0.0)]
    assert r.summary["steps"] == 50


# -- config validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task="mnist"), r"unknown task 'mnist'; known tasks: .*independence"),
        (dict(method="sgd"), r"unknown method 'sgd'; use one of none, l1, local, swap, bimt"),
        (dict(dtype="float16"), "unknown dtype 'float16'"),
        (dict(relocation="magic"), "unknown relocation 'magic'"),
        (dict(steps=0), "steps must be a positive integer, got 0"),
        (dict(steps=-5), "steps must be a positive integer"),
        (dict(steps=2.5), "steps must be a positive integer"),
        (dict(swap_every=0), "swap_every must be a positive integer"),
        (dict(lr=0.0), "lr must be a positive number"),
        (dict(lr=-1e-3), "lr must be a positive number"),
        (dict(lr=float("nan")), "lr must be a positive number"),
        (dict(lr=float("inf")), "lr must be a positive number"),
        (dict(lam="bad"), "bad schedule phase 'bad'"),
        (dict(lam="100:1e-3"), "must start at step 0"),
        (dict(lam="0:-1"), "finite and >= 0"),
        (dict(l0=-0.1), "l0 must be >= 0"),
        (dict(wf=-1.0), "wf must be >= 0"),
        (dict(metric="cosine"), "unknown metric 'cosine'; use 'l1' or 'l2'"),
        (dict(batch_size=0), "batch_size must be a positive integer or None"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(threshold=0.0), "threshold must be a positive number"),
    ],
)
def test_config_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_for_task_unknown_field_and_unknown_task():
    with pytest.raises(ValueError, match=r"unknown config field\(s\): lamda, stpes"):
        TrainConfig.for_task("independence", stpes=10, lamda="0:1")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        TrainConfig.for_task("nope")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainConfig.for_task("independence", steps=-1)


def test_for_task_uses_task_defaults_and_ignores_none(tmp_path):
    cfg = TrainConfig.for_task("modular-addition", steps=None, lr=None, seed=4)
    assert cfg.dtype == "float64" and cfg.agg == "mean" and cfg.steps == 20000 and cfg.lr == 1e-3 and cfg.seed == 4
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_json(tmp_path / "c.json") == cfg
    (tmp_path / "d.json").write_text(json.dumps({**cfg.to_dict(), "bogus": 1}))
    with pytest.raises(ValueError, match=r"unknown config field.*bogus"):
        TrainConfig.from_json(tmp_path / "d.json")


# -- divergence --------------------------------------------------------------------------------


def test_huge_learning_rate_raises_training_diverged(tmp_path):
    cfg = config(dtype="float32", lr=1e10, steps=100, checkpoint_every=1, out=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf|-inf) at step \d+.*learning rate"):
            train(cfg)
    assert issubclass(TrainingDiverged, RuntimeError)
    assert not (tmp_path / "summary.json").exists()
    step = json.loads((tmp_path / "checkpoint.json").read_text())["step"]
    assert 1 <= step < 100
    r = load_run(tmp_path)  # the last checkpoint is still a loadable run
    assert r.summary == {}


def test_nan_loss_keeps_the_last_checkpoint_intact(tmp_path, monkeypatch):
    orig = strategies.task_loss  # the strategies compute the step's loss
    calls = {"n": 0}

    def poisoned(task, out, y):
        calls["n"] += 1
        loss = orig(task, out, y)
        return loss * float("nan") if calls["n"] > 35 else loss

    monkeypatch.setattr(strategies, "task_loss", poisoned)
    at = {}
    cfg = config(method="bimt", steps=100, swap_every=10, checkpoint_every=10, log_every=10, out=str(tmp_path))
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 35\b"):
        train(cfg, on_step=lambda s, model, g: at.__setitem__(s, (state(model), positions(g))))
    assert not (tmp_path / "summary.json").exists()
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [10, 20, 30]  # flushed and closed
    _, model, graph = build(cfg)
    meta = load_checkpoint(tmp_path / "checkpoint", model, None, graph)
    assert meta["step"] == 30
    assert_equal_states(state(model), at[30][0])
    assert_equal_states(positions(graph), at[30][1])


# -- the run folder ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = config(method="bimt", steps=200, swap_every=50, log_every=50, snapshot_every=20, out=str(out))
    return train(cfg), out


def test_run_folder_contents(run):
    result, out = run
    names = {p.name for p in out.iterdir()}
    for f in (
        "config.json",
        "metrics.csv",
        "checkpoint.safetensors",
        "checkpoint.json",
        "snapshots.safetensors",
        "connectivity.png",
        "summary.json",
    ):
        assert f in names, f
    assert not any(n.endswith(".tmp") for n in names)
    assert "training.gif" not in names  # animation=False
    assert json.loads((out / "config.json").read_text()) == result.config.to_dict()
    assert (out / "connectivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 200


def test_metrics_csv(run):
    result, out = run
    with open(out / "metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "step",
        "lambda",
        "train_loss",
        "task_loss",
        "penalty",
        "wiring_cost",
        "test_mse",
        "active_weight_fraction",
        "seconds",
    ]
    assert [int(r[0]) for r in rows[1:]] == [50, 100, 150, 200]
    for r in rows[1:]:
        values = [float(v) for v in r]
        assert all(math.isfinite(v) for v in values)
        assert values[1] == 1e-3  # the task's λ schedule at these steps
        assert values[2] == pytest.approx(values[3] + values[1] * values[4], rel=1e-6)  # task + λ·penalty
        assert values[5] > 0
        assert 0 < values[7] <= 1
    assert float(rows[-1][5]) == pytest.approx(result.summary["wiring_cost"], rel=1e-6)
    assert float(rows[-1][6]) == pytest.approx(result.summary["test_mse"], rel=1e-9)


def test_snapshots_file(run):
    result, out = run
    snaps = load_snapshots(out / "snapshots.safetensors")
    assert [s.step for s in snaps] == list(range(0, 201, 20))
    last = snaps[-1]
    assert torch.equal(last.weights["0.weight"], result.model[0].weight.detach().float())
    assert torch.equal(last.positions["input"], result.graph.space("input").positions)


def test_summary_json(run):
    result, out = run
    s = json.loads((out / "summary.json").read_text())
    for key in ("test_mse", "thresholded_test_mse", "active_weights", "modules", "n_modules", "wiring_cost"):
        assert key in s, key
    assert s["n_modules"] == len(s["modules"]) >= 1
    assert set(s["active_weights"]) == {"active", "total", "fraction"}
    assert s["active_weights"]["total"] == 4 * 20 + 20 * 20 + 20 * 2
    assert 0 < s["active_weights"]["active"] <= s["active_weights"]["total"]
    assert s["wiring_cost"] > 0 and s["test_mse"] >= 0 and s["thresholded_test_mse"] >= 0
    for m in s["modules"]:
        assert set(m["inputs"]) <= {"x1", "x2", "x3", "x4"} and set(m["outputs"]) <= {"y1", "y2"}
    assert s["task"] == "independence" and s["method"] == "bimt" and s["steps"] == 200
    assert s == json.loads(json.dumps(result.summary))


def test_load_run_rebuilds_the_trained_model(run):
    result, out = run
    r = load_run(out)
    assert r.config == result.config
    assert r.summary == json.loads((out / "summary.json").read_text())
    assert_equal_states(state(r.model), state(result.model))
    assert abs(evaluate(r.task, r.model, r.data.x_test, r.data.y_test) - r.summary["test_mse"]) <= 1e-6
    with thresholded(r.graph, r.config.threshold):
        thr = evaluate(r.task, r.model, r.data.x_test, r.data.y_test)
    assert abs(thr - r.summary["thresholded_test_mse"]) <= 1e-6
    # relocated inputs/outputs sit where training left them, not on the fresh layout
    _, _, fresh = build(r.config)
    assert not torch.equal(result.graph.space("input").positions, fresh.space("input").positions)
    assert_equal_states(positions(r.graph), positions(result.graph))
    cost = float(wiring_cost(r.graph, r.config.wiring(train=False)).detach())
    assert cost == pytest.approx(r.summary["wiring_cost"], rel=1e-9)


def test_load_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_run(tmp_path)


# -- the package's shape: one loop, strategies, callbacks; no import of a higher floor ------------


def test_callbacks_see_every_step_in_order_and_draw_false_draws_nothing(tmp_path):
    from topotorch.training import Callback, DistContext, strategy_name

    class Recorder(Callback):
        def __init__(self):
            self.seen = []

        def on_begin(self, run):
            self.seen.append(("begin", run.start))

        def on_step(self, run, step, loss):
            self.seen.append(("step", step, run.body.step))  # the body has counted the step already

        def on_end(self, run, summary):
            self.seen.append(("end", "summary.json" in {p.name for p in tmp_path.iterdir()}))

        def close(self):
            self.seen.append(("close",))

    rec = Recorder()
    train(config(steps=5, log_every=5, out=str(tmp_path)), callbacks=[rec], draw=False)
    assert rec.seen == [("begin", 0), *[("step", s, s + 1) for s in range(5)], ("close",), ("end", True)]
    assert not (tmp_path / "connectivity.png").exists()  # no drawing: visualize draws nothing
    assert [strategy_name(DistContext(w), config(local_steps=h)) for w, h in ((1, 0), (2, 0), (1, 5), (2, 5))] == [
        "single",
        "ddp",
        "diloco",
        "diloco",
    ]


def test_trainer_never_imports_a_higher_floor_and_its_functions_are_short():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    higher = ("topotorch.cli", "topotorch.report", "topotorch.experiments", "topotorch.training_fff")
    code = "import sys, topotorch.training; print(sorted(m for m in sys.modules if m.startswith('topotorch.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "topotorch.visualize" not in loaded and not any(h in loaded for h in higher), loaded
    for path in sorted((Path(training_pkg.__file__).parent).glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith(higher) for n in names), (path.name, node.lineno)
                if node in top:  # pictures only when drawn: never at import
                    assert not any(n.startswith("topotorch.visualize") for n in names), (path.name, node.lineno)
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno + 1 <= 60, (path.name, node.name)
