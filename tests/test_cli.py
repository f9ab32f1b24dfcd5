"""The command line (topotorch.cli): listing, training, drawing, summaries and its error handling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from topotorch.cli import app
from topotorch.training import TrainConfig, train
from topotorch.visualize import ffmpeg_available

ROOT = Path(__file__).resolve().parents[1]
TASK_NAMES = [
    "compositionality",
    "digits",
    "feature-sharing",
    "independence",
    "modular-addition",
    "permutation-s4",
    "two-moons",
]
PNG = b"\x89PNG\r\n\x1a\n"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_usage_error(result, *needles: str) -> None:
    """Exit code 2, one line 'error: ...' on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not an uncaught exception
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-run") / "run"
    train(
        TrainConfig.for_task(
            "independence", steps=60, dtype="float64", swap_every=20, animation=False, progress=False, out=str(out)
        )
    )
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def test_tasks_lists_every_registered_task():
    from topotorch.tasks import TASKS

    r = invoke("tasks")
    assert r.exit_code == 0
    listed = [line.split()[0] for line in r.stdout.splitlines() if line and not line.startswith(" ")]
    assert listed == sorted(TASKS)
    assert set(TASK_NAMES) <= set(listed)  # the paper's seven MLP tasks
    assert {"in-context-regression", "modular-addition-transformer"} <= set(listed)
    assert "lam=0:0.1,5000:1.0,15000:0.1" in r.stdout  # the reference settings are shown


def test_train_short_run(tmp_path):
    out = tmp_path / "r"
    r = invoke(
        "train",
        "independence",
        "--steps",
        "30",
        "--method",
        "swap",
        "--swap-every",
        "10",
        "--no-animation",
        "--no-progress",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    assert "independence [swap] test_mse=" in r.stdout
    assert f"run folder: {out}" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 30 and s["method"] == "swap"
    assert json.loads((out / "config.json").read_text())["swap_every"] == 10
    assert not (out / "training.gif").exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["train", "nope"], ["unknown task 'nope'", "independence", "digits"]),
        (["train", "independence", "--method", "sgd"], ["unknown method 'sgd'", "bimt"]),
        (["train", "independence", "--steps", "-1"], ["steps must be a positive integer", "-1"]),
        (["train", "independence", "--lam", "bad"], ["bad schedule phase 'bad'"]),
        (["train", "independence", "--lam", "10:1e-3"], ["start at step 0"]),
        (["train", "independence", "--lr", "0"], ["lr must be a positive number"]),
        (["train", "independence", "--relocation", "magic"], ["unknown relocation 'magic'"]),
        (["train", "independence", "--dtype", "float16"], ["unknown dtype 'float16'"]),
    ],
)
def test_train_bad_input_is_a_one_line_error(args, needles, tmp_path):
    out = tmp_path / "never"
    r = invoke(*args, "--out", out, "--no-progress", "--no-animation")
    assert_usage_error(r, *needles)
    assert not out.exists()  # nothing written for a rejected run


def test_train_divergence_is_a_one_line_error(tmp_path):
    r = invoke(
        "train",
        "independence",
        "--steps",
        "50",
        "--lr",
        "1e10",
        "--dtype",
        "float32",
        "--no-progress",
        "--no-animation",
        "--out",
        tmp_path / "r",
    )
    assert_usage_error(r, "loss became", "learning rate")


def test_draw_missing_folder(tmp_path):
    assert_usage_error(invoke("draw", tmp_path / "missing"), "does not exist")


def test_draw_folder_without_config(tmp_path):
    assert_usage_error(invoke("draw", tmp_path), "not a run folder")


def test_draw_corrupted_checkpoint_without_backup(run_copy):
    for name in ("checkpoint.safetensors", "checkpoint.prev.safetensors"):
        p = run_copy / name
        p.write_bytes(p.read_bytes()[:100])
    r = invoke("draw", run_copy)
    assert_usage_error(
        r,
        "checkpoint.safetensors is corrupt",
        "checksum",
        "previous checkpoint is unusable too",
        "checkpoint.prev.safetensors",
    )


def test_draw_corrupted_checkpoint_uses_the_previous_one(run_copy):
    p = run_copy / "checkpoint.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    (run_copy / "connectivity.png").unlink()
    r = invoke("draw", run_copy)
    assert r.exit_code == 0, r.output
    err = r.stderr.strip()
    assert err.startswith("warning: ") and "\n" not in err and "using the previous checkpoint" in err, err
    assert (run_copy / "connectivity.png").read_bytes()[:8] == PNG


def test_draw_corrupted_config(run_copy):
    (run_copy / "config.json").write_text('{"task": "independ')
    assert_usage_error(invoke("draw", run_copy), "config.json", "corrupt")


def test_draw_bad_threshold(run_dir):
    assert_usage_error(invoke("draw", run_dir, "--threshold", "-1"), "threshold must be >= 0")


def test_draw_writes_png(run_copy, tmp_path):
    (run_copy / "connectivity.png").unlink()
    r = invoke("draw", run_copy)
    assert r.exit_code == 0, r.output
    assert (run_copy / "connectivity.png").read_bytes()[:8] == PNG
    assert f"wrote {run_copy / 'connectivity.png'}" in r.stdout
    other = tmp_path / "pic.png"
    r = invoke("draw", run_copy, "--threshold", "0.05", "--out", other)
    assert r.exit_code == 0, r.output
    assert other.read_bytes()[:8] == PNG


def test_summary_prints_json(run_dir):
    r = invoke("summary", run_dir)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == json.loads((run_dir / "summary.json").read_text())


def test_summary_errors(run_copy, tmp_path):
    assert_usage_error(invoke("summary", tmp_path / "missing"), "no summary.json")
    (run_copy / "summary.json").write_text("{oops")
    assert_usage_error(invoke("summary", run_copy), "summary.json", "corrupt")


@pytest.mark.slow
def test_python_m_topotorch_train_writes_the_full_run_folder(tmp_path):
    out = tmp_path / "ind"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny net: extra threads only add contention
    proc = subprocess.run(
        [sys.executable, "-m", "topotorch", "train", "independence", "--steps", "100", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"run folder: {out}" in proc.stdout
    for f in (
        "config.json",
        "metrics.csv",
        "checkpoint.safetensors",
        "checkpoint.json",
        "checkpoint.prev.safetensors",
        "snapshots.safetensors",
        "connectivity.png",
        "summary.json",
        "training.gif",
    ):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "training.gif").read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    from PIL import Image

    with Image.open(out / "training.gif") as gif:
        assert gif.n_frames > 10  # an animation, not a still
    if ffmpeg_available():
        mp4 = (out / "training.mp4").read_bytes()
        assert mp4[4:8] == b"ftyp"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 100 and summary["method"] == "bimt"
    with open(out / "metrics.csv") as f:
        assert len(f.read().strip().splitlines()) == 2  # header + the row at step 100 (log_every=100)


def test_compress_corrupted_checkpoint_says_it_used_the_previous_one(run_copy):
    p = run_copy / "checkpoint.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    r = invoke("compress", run_copy, "--threshold", "0.05", "--choose", "dense")
    assert r.exit_code == 0, r.output
    assert "using the previous checkpoint" in r.stderr, r.stderr  # was recorded and dropped
    assert (run_copy / "compact" / "report.json").exists()
