"""Run folders (topotorch.runs): an explicit kind in run.json, one open that dispatches on it, old folders guessed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from topotorch.config import TrainConfig
from topotorch.runs import RUN_KINDS, RunKind, open_config, open_run, register_run_kind, run_kind
from topotorch.training import TrainResult, train
from topotorch.training_fff import FFFRecipe, FFFRunConfig, FFFRunResult, train_fff_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    train(
        TrainConfig.for_task(
            "independence",
            steps=20,
            swap_every=10,
            dtype="float64",
            animation=False,
            progress=False,
            out=str(base / "train"),
        )
    )
    train_fff_run(
        FFFRunConfig(
            task="two-moons",
            training_width=4,
            leaf_width=2,
            recipe=FFFRecipe(epochs=2),
            progress=False,
            out=str(base / "fff"),
        )
    )
    return {"train": base / "train", "fff": base / "fff"}


@pytest.mark.parametrize(
    "kind, result, config", [("train", TrainResult, TrainConfig), ("fff", FFFRunResult, FFFRunConfig)]
)
def test_a_new_run_folder_says_its_kind_and_opens_by_it(runs, kind, result, config):
    assert json.loads((runs[kind] / "run.json").read_text())["kind"] == kind
    assert run_kind(runs[kind]) == kind
    assert isinstance(open_run(runs[kind]), result)
    assert isinstance(open_config(runs[kind], kind=kind), config)


def test_asking_for_another_kind_names_both(runs):
    with pytest.raises(ValueError, match="is a `topotorch fff` run, not a `topotorch train` run"):
        open_run(runs["fff"], kind="train")
    with pytest.raises(ValueError, match="is a `topotorch fff` run, not a `topotorch train` run"):
        TrainConfig.from_json(runs["fff"] / "config.json")


@pytest.mark.parametrize("kind", ["train", "fff"])
def test_folders_from_before_run_json_still_open_by_the_old_guess(runs, kind, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs[kind], old)
    (old / "run.json").unlink()
    assert run_kind(old) == kind
    assert open_config(old).to_dict() == open_config(runs[kind]).to_dict()


def test_the_kind_wins_over_what_the_config_looks_like(runs, tmp_path):
    """A train folder whose run.json says train is train, whatever keys its config has (no guessing)."""
    folder = tmp_path / "odd"
    shutil.copytree(runs["train"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert run_kind(folder) == "train"
    (folder / "run.json").write_text(json.dumps({"kind": "fff"}))
    with pytest.raises(ValueError, match="is a `topotorch fff` run"):
        open_config(folder, kind="train")
    assert cfg["task"] == "independence"


def test_a_registered_kind_and_its_alias_in_an_old_config(tmp_path):
    seen = []
    register_run_kind(
        RunKind(
            "toy",
            open=lambda d: seen.append(d) or "opened",
            config=lambda d: "cfg",
            aliases=("topotorch.toy.run/1",),
            command="topotorch toy",
        )
    )
    try:
        (tmp_path / "config.json").write_text(json.dumps({"kind": "topotorch.toy.run/1", "x": 1}))
        assert run_kind(tmp_path) == "toy" and open_run(tmp_path) == "opened" and seen == [tmp_path]
        (tmp_path / "run.json").write_text(json.dumps({"kind": "toy"}))
        assert open_config(tmp_path) == "cfg"
    finally:
        RUN_KINDS.pop("toy")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "run.json is corrupt"),
        ('{"kind": 3}', "does not say the run's kind"),
        ('{"kind": "nope"}', "unknown run kind 'nope'; known kinds: fff, train"),
    ],
)
def test_a_bad_run_json_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        run_kind(tmp_path)


def test_missing_folder_and_non_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        open_run(tmp_path)
