"""Each setting declared once (topotorch.config): field metadata -> validation, CLI options, checked task defaults."""

from __future__ import annotations

import math

import pytest
import typer
from typer.testing import CliRunner

from topotorch.cli import app
from topotorch.config import RUNTIME_FIELDS, TrainConfig, describe, settings_by_name, settings_of, validate_partial
from topotorch.tasks import TASKS, Task, register_task
from topotorch.training_fff import FFFRecipe, FFFRunConfig


def _past_bound(spec):
    """A value just outside a numeric field's declared range (None when the field has no bound)."""
    s = spec.setting
    if s.lo is not None:
        return (s.lo if s.lo_open else s.lo - 1) if spec.base is int else (s.lo if s.lo_open else s.lo - 0.5)
    if s.hi is not None:
        return s.hi + 1
    return None


BOUNDED = [
    (cls, spec)
    for cls in (TrainConfig, FFFRecipe, FFFRunConfig)
    for spec in settings_of(cls)
    if spec.base in (int, float) and _past_bound(spec) is not None
]


@pytest.mark.parametrize("cls, spec", BOUNDED, ids=[f"{c.__name__}.{s.name}" for c, s in BOUNDED])
def test_a_value_past_the_declared_range_is_refused_naming_field_and_range(cls, spec):
    bad = _past_bound(spec)
    with pytest.raises(ValueError) as e:
        cls(**{spec.name: bad})
    msg = str(e.value)
    assert msg.startswith(f"{spec.name} must be {describe(spec)}") and repr(bad) in msg, msg


@pytest.mark.parametrize("cls, spec", BOUNDED, ids=[f"{c.__name__}.{s.name}" for c, s in BOUNDED])
def test_the_declared_bound_itself_follows_the_declaration(cls, spec):
    s = spec.setting
    bound = s.lo if s.lo is not None else s.hi
    open_ = s.lo_open if s.lo is not None else s.hi_open
    value = int(bound) if spec.base is int else float(bound)
    if open_:
        with pytest.raises(ValueError, match=spec.name):
            cls(**{spec.name: value})
    else:
        assert getattr(cls(**{spec.name: value}), spec.name) == value


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("method", "sgd", "unknown method 'sgd'; use one of none, l1, local, swap, bimt"),
        ("outer_momentum", 1.0, "outer_momentum must be a number in [0, 1), got 1.0"),
        ("topo_factor", 0.5, "topo_factor must be >= 1 and finite, got 0.5"),
        ("lr", math.nan, "lr must be a positive number, got nan"),
        ("steps", True, "steps must be a positive integer, got True"),
        ("batch_size", 0, "batch_size must be a positive integer or None, got 0"),
        ("progress", "yes", "progress must be true or false, got 'yes'"),
        ("exclude", "fc1.*", "exclude must be a list of weight-name patterns (strings), got 'fc1.*'"),
        ("lam", "5:1", "schedule must start at step 0"),
        ("model_config", "x", "model_config: model config item 'x' is not KEY=VALUE"),
    ],
)
def test_validation_messages_come_from_the_declaration(field, value, message):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{field: value})
    assert message in str(e.value)


def test_runtime_fields_are_the_declared_ones():
    assert set(RUNTIME_FIELDS) == {"out", "progress", "animation", "threads"}


def _params(command: str) -> dict[str, object]:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}  # type: ignore[attr-defined]  # app is a click Group


@pytest.mark.parametrize(
    "command, classes, own",
    [
        ("train", (TrainConfig,), {"task", "resume", "overwrite"}),
        ("fff", (FFFRunConfig, FFFRecipe), {"task", "overwrite"}),
    ],
)
def test_cli_options_are_generated_from_the_fields(command, classes, own):
    params = _params(command)
    specs = [s for cls in classes for s in settings_of(cls) if s.setting.cli]
    assert set(params) == own | {s.name for s in specs}
    for spec in specs:
        p = params[spec.name]
        assert spec.option in p.opts, (spec.name, p.opts)
        assert spec.setting.help in p.help
        if spec.base is bool:
            assert p.secondary_opts == ["--no-" + spec.option[2:]]


def test_train_options_are_the_ones_it_always_had():
    """The command line keeps its option names (scripts and the README use them)."""
    opts = {o for p in _params("train").values() for o in p.opts + p.secondary_opts}
    assert opts >= {
        "--method",
        "--steps",
        "--seed",
        "--dtype",
        "--out",
        "--lr",
        "--lam",
        "--wf",
        "--l0",
        "--relocation",
        "--top-k",
        "--swap-every",
        "--threshold",
        "--batch-size",
        "--checkpoint-every",
        "--log-every",
        "--local-steps",
        "--topo-tau",
        "--topo-layers",
        "--topo-factor",
        "--group-lam",
        "--animation",
        "--no-animation",
        "--progress",
        "--no-progress",
        "--overwrite",
        "--threads",
        "--model",
        "--model-config",
        "--resume",
    }


def test_help_shows_the_declared_help_and_range():
    r = CliRunner().invoke(app, ["train", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    for spec in settings_of(TrainConfig):
        if spec.setting.cli:
            assert " ".join(spec.setting.help.split()) in text, spec.name
    assert "--top-k <int> neurons tried per layer per relocation [a positive integer]" in text
    assert "[none | l1 | local | swap | bimt]" in text


def test_cli_error_names_the_field_and_its_declared_range(tmp_path):
    r = CliRunner().invoke(app, ["train", "independence", "--topo-factor", "0.5", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2
    assert "topo_factor must be >= 1 and finite, got 0.5" in r.stderr
    r = CliRunner().invoke(app, ["fff", "two-moons", "--hard-frac", "2", "--out", str(tmp_path / "f")])
    assert r.exit_code == 2
    assert "hard_frac must be a number in [0, 1], got 2.0" in r.stderr


def test_every_builtin_task_has_valid_defaults():
    for name, factory in TASKS.items():
        if name != "shakespeare-char":  # reads its corpus; text tasks are checked when built
            validate_partial(TrainConfig, factory().defaults, f"task {name!r}")


def _task(name: str, **defaults) -> Task:
    return Task(
        name=name,
        description="a test task",
        make_data=lambda seed, dtype: None,
        make_model=lambda: None,
        loss="mse",
        defaults=defaults,
    )


@pytest.mark.parametrize(
    "defaults, message",
    [
        (dict(steps=0), "task 'bad-task': bad default steps: steps must be a positive integer, got 0"),
        (dict(lr=2e-3, method="sgd"), "task 'bad-task': bad default method: unknown method 'sgd'"),
        (dict(lam="10:1e-3"), "task 'bad-task': bad default lam: lam: schedule must start at step 0"),
        (dict(stpes=100), "task 'bad-task': unknown TrainConfig field(s) stpes"),
    ],
)
def test_registering_a_task_with_a_bad_default_is_refused(defaults, message):
    with pytest.raises(ValueError) as e:
        register_task(lambda: _task("bad-task", **defaults))
    assert message in str(e.value)
    assert "bad-task" not in TASKS  # nothing half-registered


def test_registering_a_task_with_good_defaults_works():
    try:
        register_task(lambda: _task("good-task", steps=10, lam="0:1e-3,5:1e-2", relocate_inputs=False))
        assert TASKS["good-task"]().defaults["steps"] == 10
    finally:
        TASKS.pop("good-task", None)


def test_settings_by_name_matches_the_dataclass():
    import dataclasses

    assert list(settings_by_name(TrainConfig)) == [f.name for f in dataclasses.fields(TrainConfig)]
