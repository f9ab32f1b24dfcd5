"""Hardened inputs, property-based (hypothesis): random and malformed command lines and config values
never end in a traceback — only one clear line on stderr and a non-zero exit (or a valid run)."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace
from unittest import mock

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from topotorch import training
from topotorch.cli import app
from topotorch.tasks import TASKS, get_task
from topotorch.training import TrainConfig, TrainingDiverged

FAKE_SUMMARY = {
    "test_mse": 0.01,
    "thresholded_test_mse": 0.02,
    "test_accuracy": 0.9,
    "thresholded_test_accuracy": 0.9,
    "wiring_cost": 1.5,
    "active_weights": {"active": 3, "total": 10, "fraction": 0.3},
    "n_modules": 1,
    "modules": [{"inputs": ["x1"], "outputs": ["y1"], "neurons": 5}],
    "train_seconds": 0.1,
}


def fake_train(cfg, on_step=None, resume=False, overwrite=None):
    """Stands in for training (the property is about argument handling): validates like the real one."""
    assert isinstance(cfg, TrainConfig)
    if cfg.lr > 1:
        raise TrainingDiverged(
            "loss became nan at step 3; lower the learning rate or λ. The last checkpoint is intact."
        )
    task = get_task(cfg.task)
    m = f"test_{task.metric}"
    return SimpleNamespace(summary={**FAKE_SUMMARY, m: 0.5, f"thresholded_{m}": 0.5}, task=task)


# every option `topotorch train` declares (read from the command, so a new option is fuzzed too) and a few
# malformed ones
OPTIONS = sorted(
    {o for p in typer.main.get_command(app).commands["train"].params for o in p.opts + p.secondary_opts}  # type: ignore[attr-defined]
) + ["--help", "--bogus", "-x", "--steps=", "--lr=nan"]
VALUES = st.one_of(
    st.sampled_from(
        sorted(TASKS)
        + [
            "bimt",
            "none",
            "l1",
            "swap",
            "assign",
            "float64",
            "float16",
            "0:1e-3,50:1e-2",
            "0:1,0:2",
            "nan",
            "inf",
            "-inf",
            "1e309",
            "-0",
            "0",
            "1",
            "3",
            "",
            " ",
            "--",
            "RUN",
            "MISSING",
            "FILE",
            "999999999999999999999999",
        ]
    ),
    st.integers(-(10**25), 10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
TOKENS = st.one_of(st.sampled_from(OPTIONS), VALUES)
COMMANDS = st.sampled_from(["train", "draw", "summary", "tasks", "trian", "--help", "-h", "train digits"])


# train: well-formed option/value pairs whose values are mostly plausible, sometimes not
NUM = st.one_of(st.integers(-3, 300).map(str), st.sampled_from(["0", "1e-3", "2.5", "nan", "-1", "abc"]))
PLAUSIBLE = {
    "--method": st.sampled_from(["none", "l1", "local", "swap", "bimt", "sgd"]),
    "--steps": NUM,
    "--seed": NUM,
    "--top-k": NUM,
    "--swap-every": NUM,
    "--batch-size": NUM,
    "--checkpoint-every": NUM,
    "--log-every": NUM,
    "--local-steps": NUM,
    "--dtype": st.sampled_from(["float32", "float64", "float16"]),
    "--lr": NUM,
    "--wf": NUM,
    "--l0": NUM,
    "--threshold": NUM,
    "--lam": st.sampled_from(["0:1e-3", "0:1e-3,10:1e-2", "5:1", "0:1,0:2", "0:-1", "x", "0.1", ""]),
    "--relocation": st.sampled_from(["swap", "assign", "magic"]),
    "--resume": st.sampled_from(["RUN", "MISSING", "FILE"]),
}
PAIRS = st.dictionaries(st.sampled_from(sorted(PLAUSIBLE)), st.none(), max_size=5).flatmap(
    lambda d: st.fixed_dictionaries({k: PLAUSIBLE[k] for k in d})
)
TRAIN = st.tuples(st.one_of(st.sampled_from(sorted(TASKS)), st.text(max_size=6)), PAIRS).map(
    lambda t: ["train", t[0], "--no-progress", "--no-animation"] + [x for kv in t[1].items() for x in kv]
)


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    run = root / "run"  # a folder that looks like a run: config + summary, no checkpoint
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TrainConfig.for_task("independence", steps=5).to_dict()))
    (run / "summary.json").write_text(json.dumps(FAKE_SUMMARY))
    (root / "file").write_text("not a folder")
    return {"RUN": str(run), "MISSING": str(root / "missing"), "FILE": str(root / "file")}


def assert_clean(result) -> None:
    out = result.output + (result.stderr or "")
    assert "Traceback" not in out, out
    if result.exit_code == 0:
        return
    # a SystemExit from our own handling, not an exception escaping the command
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, repr(err)
    assert not err.startswith("error: unexpected "), err  # every failure anticipated and explained


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=COMMANDS, tokens=st.lists(TOKENS, max_size=8))
def test_random_command_lines_never_crash(places, command, tokens):
    argv = command.split() + [places.get(t, t) for t in tokens]
    with (
        mock.patch.object(training, "train", fake_train),
        mock.patch("topotorch.visualize.draw_connectivity", lambda *a, **k: None),
    ):
        result = CliRunner().invoke(app, argv)
    assert_clean(result)


FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=3), st.lists(st.integers(0, 9), max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=TRAIN)
def test_random_train_options_never_crash(places, argv):
    argv = [places.get(t, t) for t in argv]
    with mock.patch.object(training, "train", fake_train):
        result = CliRunner().invoke(app, argv)
    assert_clean(result)
    if result.exit_code == 0:  # accepted: it really was a valid configuration
        assert "run folder:" in result.stdout


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.sampled_from(FIELDS), ANY, max_size=4))
def test_random_config_values_give_valueerror_naming_the_field_or_a_valid_config(values):
    try:
        cfg = TrainConfig(**values)
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg and msg
        assert any(name in msg for name in values) or "schedule" in msg or "unknown task" in msg, (values, msg)
        return
    # accepted: every value is usable and survives the JSON round trip of a run folder
    assert math.isfinite(cfg.lr) and cfg.steps >= 1
    assert TrainConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "independence", "--steps", "abc"], "Invalid value for '--steps'"),
        (["trian"], "No such command 'trian'"),
        (["train", "independence", "--bogus"], "No such option: --bogus"),
        (["train"], "missing TASK"),
        (["train", "--resume", "/nonexistent/run"], "is not a run folder"),
        (["train", "independence", "--local-steps", "-2"], "local_steps must be a non-negative integer"),
        (["train", "independence", "--wf", "inf"], "wf must be >= 0 and finite"),
    ],
)
def test_named_bad_inputs_one_line(argv, needle):
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
