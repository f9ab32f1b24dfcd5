"""Training FFF / FF classifiers with the shared recipe, the run folder, and `topotorch fff`."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.utils import parametrize
from typer.testing import CliRunner

from topotorch.cli import app
from topotorch.layers import FFF
from topotorch.tasks import get_task
from topotorch.training_fff import (
    FFFRecipe,
    FFFRunConfig,
    accuracy,
    fit_classifier,
    load_fff_run,
    make_classifier,
    train_fff_run,
)

QUICK = FFFRecipe(epochs=60, batch_size=32, noise=0.1)


@pytest.fixture(scope="module")
def moons():
    d = get_task("two-moons").make_data(0, torch.float32)
    return d.x_train, d.y_train, d.x_test, d.y_test


@pytest.mark.parametrize("kind", ["ff", "fff"])
def test_both_models_learn_two_moons_and_the_fff_is_deployed_plain(moons, kind):
    xtr, ytr, xte, yte = moons
    torch.manual_seed(0)
    model = make_classifier(kind, 2, 2, training_width=16, leaf_width=2)
    fit_classifier(model, xtr, ytr, QUICK)
    assert accuracy(model.eval(), xte, yte) >= 0.9
    if kind == "fff":
        assert isinstance(model, FFF) and not parametrize.is_parametrized(model)  # shared leaves merged back
        assert not model.train_hardened and model.hard_impl_used(xte) in ("kernel", "gather", "grouped")


def test_training_is_deterministic_per_seed(moons):
    xtr, ytr, _, _ = moons
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = fit_classifier(make_classifier("fff", 2, 2, 16, 4), xtr, ytr, FFFRecipe(epochs=3), seed=3)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_the_hard_phase_trains_with_rounded_decisions(moons):
    xtr, ytr, _, _ = moons
    seen = []
    model = make_classifier("fff", 2, 2, 16, 2)
    original = model.soft_forward

    def spy(x, hard_decisions=False):
        seen.append(hard_decisions)
        return original(x, hard_decisions=hard_decisions)

    model.soft_forward = spy
    fit_classifier(model, xtr, ytr, FFFRecipe(epochs=4, batch_size=200, hard_frac=0.5, noise=0.0))
    assert seen == [False, False, True, True]  # 4 epochs of one batch: two soft, two hard


def test_a_failed_fit_returns_a_plain_model_that_trains_again(moons):
    xtr, ytr, _, _ = moons
    model = make_classifier("fff", 2, 2, 16, 2)
    with pytest.raises(FloatingPointError):
        fit_classifier(model, torch.full_like(xtr, float("nan")), ytr, FFFRecipe(epochs=1))
    assert not parametrize.is_parametrized(model) and not model.train_hardened
    fit_classifier(model, xtr, ytr, FFFRecipe(epochs=1))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="x \\(N, in\\) and y \\(N,\\)"):
        fit_classifier(make_classifier("ff", 2, 2, 8), torch.zeros(5, 2), torch.zeros(4, dtype=torch.long), QUICK)
    x = torch.full((8, 2), float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        fit_classifier(make_classifier("ff", 2, 2, 8), x, torch.zeros(8, dtype=torch.long), FFFRecipe(epochs=1))
    with pytest.raises(ValueError, match="power of two"):
        make_classifier("fff", 2, 2, training_width=24, leaf_width=8)
    with pytest.raises(ValueError, match="kind"):
        make_classifier("moe", 2, 2)  # type: ignore[arg-type]  # an unknown kind is the point
    for bad, match in [
        ({"epochs": 0}, "epochs"),
        ({"hard_frac": 2.0}, "hard_frac"),
        ({"lr": 0.0}, "lr"),
        ({"final_sharpness": 0.1}, "final_sharpness"),
    ]:
        with pytest.raises(ValueError, match=match):
            FFFRecipe(**bad)


def test_run_folder_round_trips_and_corruption_is_named(tmp_path):
    out = tmp_path / "moons"
    config = FFFRunConfig(
        task="two-moons", training_width=16, leaf_width=1, recipe=FFFRecipe(epochs=20), progress=False, out=str(out)
    )
    result = train_fff_run(config)
    for name in ("config.json", "model.safetensors", "summary.json", "leaves.md", "regions.png"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["depth"] == 4 and summary["neurons_per_sample"] == 5 and 1 <= summary["leaves_used"] <= 16
    loaded = load_fff_run(out)
    data = get_task("two-moons").make_data(0, torch.float32)
    assert (
        accuracy(loaded.model, data.x_test, data.y_test) == summary["test_accuracy"] == result.summary["test_accuracy"]
    )
    assert accuracy(loaded.model.train(), data.x_test, data.y_test) == summary["soft_test_accuracy"]
    from topotorch.report import build_report

    page = build_report(out).read_text()  # a `topotorch fff` folder gets the FFF page
    assert "FFF regions" in page and "accuracy with the leaf knocked out" in page and "data:image/png;base64," in page
    assert f"{summary['leaves_used']} of 16 leaves used" in page
    assert json.loads((out / "report.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_fff_run(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        load_fff_run(out)


def test_run_config_validation():
    with pytest.raises(ValueError, match="unknown task"):
        FFFRunConfig(task="nope")
    with pytest.raises(ValueError, match="unknown FFF run config field"):
        FFFRunConfig.from_dict({"task": "digits", "colour": "red"})
    with pytest.raises(ValueError, match="trains classifiers"):
        train_fff_run(FFFRunConfig(task="independence", progress=False))


def test_cli_trains_and_errors_are_one_line(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "fff",
            "two-moons",
            "--leaf-width",
            "2",
            "--training-width",
            "16",
            "--epochs",
            "10",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "fff on two-moons: test accuracy" in ok.output and (tmp_path / "run" / "summary.json").exists()
    bad = runner.invoke(app, ["fff", "two-moons", "--leaf-width", "3", "--no-progress", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and bad.stderr.strip().startswith("error: ") and "power of two" in bad.stderr
    assert "\n" not in bad.stderr.strip()
    other = runner.invoke(app, ["draw", str(tmp_path / "run")])  # a `topotorch train` command on an fff run
    assert other.exit_code == 2 and "is a `topotorch fff` run" in other.stderr
