"""Run safety (issue 15): a run folder is never overwritten or mixed, no damaged file is accepted silently,
every fallback is said, the report never reads data as HTML, small runs choose their threads, and
summary.json is written before the animation is rendered."""

from __future__ import annotations

import dataclasses
import html.parser
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from topotorch import visualize
from topotorch.cli import app
from topotorch.training import TrainConfig, load_run, train

TINY = dict(
    steps=40, checkpoint_every=20, snapshot_every=10, log_every=10, swap_every=20, animation=False, progress=False
)
TRAIN_ARGS = ["--steps", "40", "--checkpoint-every", "20", "--log-every", "10", "--no-animation", "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "unexpected" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 40-step independence run with two checkpoints (20 and 40)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    train(TrainConfig.for_task("independence", **TINY, out=str(out)))
    return out


@pytest.fixture
def copy(run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ---- a run folder is never overwritten or mixed ------------------------------------------------


def test_train_out_on_an_existing_run_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "X"
    assert invoke("train", "independence", *TRAIN_ARGS, "--out", out).exit_code == 0
    before = (out / "config.json").read_text()
    r = invoke("train", "two-moons", "--steps", "5", "--no-animation", "--no-progress", "--out", out)
    one_line_error(r, str(out), "already holds a run", "--overwrite")
    assert (out / "config.json").read_text() == before  # untouched
    r = invoke("train", "two-moons", "--steps", "5", "--no-animation", "--no-progress", "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert "moved it to" in r.stderr
    old = [p for p in tmp_path.iterdir() if p.name.startswith("X.old-")]
    assert len(old) == 1 and (old[0] / "config.json").read_text() == before  # the old run, whole
    assert json.loads((out / "config.json").read_text())["task"] == "two-moons"
    assert {p.name for p in out.iterdir()} >= {"config.json", "summary.json", "checkpoint.safetensors"}
    for name in ("checkpoint.json", "checkpoint.prev.json"):  # nothing of the old run mixed in
        assert json.loads((out / name).read_text())["extra"]["config"]["task"] == "two-moons"
    one_line_error(invoke("train", "--resume", out, "--overwrite"), "--overwrite")


def test_fff_out_on_an_existing_run_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "F"
    args = [
        "fff",
        "two-moons",
        "--epochs",
        "2",
        "--training-width",
        "16",
        "--leaf-width",
        "4",
        "--no-progress",
        "--out",
        out,
    ]
    assert invoke(*args).exit_code == 0
    one_line_error(invoke(*args), "already holds a run", "--overwrite")
    r = invoke(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert len(list(tmp_path.glob("F.old-*"))) == 1


def test_resume_refuses_a_checkpoint_of_another_config(copy):
    """The issue's case: run B written over run A's folder and killed before its first checkpoint."""
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(lr=0.01, steps=60)  # B's config, A's checkpoint
    (copy / "config.json").write_text(json.dumps(cfg))
    r = invoke("train", "--resume", copy, "--no-progress", "--no-animation")
    one_line_error(r, "another run", "lr=0.002 (config.json: 0.01)", "steps=40 (config.json: 60)")
    one_line_error(invoke("draw", copy), "another run")  # readers refuse the mixed folder too


# ---- no damaged file accepted silently; every fallback said -----------------------------------


def test_resume_says_when_the_snapshot_log_is_unreadable(tmp_path):
    out = tmp_path / "S"

    class Stop(Exception):
        pass

    def stop(done, model, graph):
        if done == 30:
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig.for_task("independence", **TINY, out=str(out)), on_step=stop)
    (out / "snapshots.safetensors").write_bytes(b"garbage")
    r = invoke("train", "--resume", out, "--no-progress", "--no-animation")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stderr and "snapshots.safetensors is unreadable" in r.stderr, r.stderr


def test_fff_model_is_checksummed(tmp_path):
    out = tmp_path / "F"
    assert (
        invoke(
            "fff",
            "two-moons",
            "--epochs",
            "2",
            "--training-width",
            "16",
            "--leaf-width",
            "4",
            "--no-progress",
            "--out",
            out,
        ).exit_code
        == 0
    )
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in a weight
    (out / "model.safetensors").write_bytes(bytes(data))
    one_line_error(invoke("report", out), "model.safetensors", "checksum")
    assert json.loads((out / "model.json").read_text())["sha256"]


def test_report_says_it_fell_back_to_the_previous_checkpoint(copy):
    data = (copy / "checkpoint.safetensors").read_bytes()
    (copy / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])
    r = invoke("report", copy)
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stderr and "checkpoint.prev.safetensors" in r.stderr and "checksum" in r.stderr
    page = (copy / "report.html").read_text()
    assert 'class="notice"' in page and "using the previous checkpoint" in page  # and on the page


@pytest.mark.parametrize(
    "name,garbage",
    [
        ("metrics.csv", b"\xff\xfe\x00garbage\x00"),
        ("metrics.csv", b"step,x\n1,abc\n"),
        ("summary.json", b"\xff\xfenot json"),
        ("summary.json", b"[1, 2"),
    ],
)
def test_a_damaged_auxiliary_file_degrades_the_report_with_a_notice(copy, name, garbage):
    (copy / name).write_bytes(garbage)
    r = invoke("report", copy)
    assert r.exit_code == 0, r.output
    assert f"warning: {copy / name}" in r.stderr, r.stderr
    page = (copy / "report.html").read_text()
    notices = re.findall(r'<p class="notice">(.*?)</p>', page)
    assert notices and name in notices[0]
    assert "connectivity" in page.lower() and json.loads((copy / "report.json").read_text())["notices"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5"])
def test_draw_rejects_a_threshold_that_is_not_a_finite_non_negative_number(run, value):
    one_line_error(invoke("draw", run, "--threshold", value), "threshold")


def test_draw_into_a_missing_folder_creates_it(run, tmp_path):
    target = tmp_path / "missing" / "dir" / "x.png"
    r = invoke("draw", run, "--out", target)
    assert r.exit_code == 0, r.output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_file_of_a_run_gets_the_same_mode(run, tmp_path):
    want = 0o666 & ~_umask()
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir() if p.is_file()}
    assert {"checkpoint.safetensors", "snapshots.safetensors", "config.json"} <= set(modes)
    assert set(modes.values()) == {want}, modes
    out = tmp_path / "F"
    assert (
        invoke(
            "fff",
            "two-moons",
            "--epochs",
            "1",
            "--training-width",
            "16",
            "--leaf-width",
            "4",
            "--no-progress",
            "--out",
            out,
        ).exit_code
        == 0
    )
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {want}


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


# ---- the report never interprets data as HTML -------------------------------------------------

HOSTILE = '<img src=x onerror="window.__xss=(window.__xss||0)+1">'
HOSTILE_TASK = "<script>window.__xss=1</script>moons"


@pytest.fixture(scope="module")
def hostile_page(tmp_path_factory) -> Path:
    """A run whose neuron labels, task name, folder name and config strings are all markup."""
    from topotorch import tasks

    base = tasks.get_task("independence")
    hostile = dataclasses.replace(
        base,
        name=HOSTILE_TASK,
        input_labels=[f"{HOSTILE}{i}" for i in range(4)],
        output_labels=[f"{HOSTILE}y{i}" for i in range(2)],
    )
    mp = pytest.MonkeyPatch()
    mp.setitem(tasks.TASKS, HOSTILE_TASK, lambda: hostile)
    try:
        out = tmp_path_factory.mktemp("hostile") / HOSTILE.replace("/", "")
        train(
            TrainConfig.for_task(
                HOSTILE_TASK,
                **TINY,
                out=str(out),
                exclude=[HOSTILE],
                topo_layers="</script><script>window.__xss=1</script>",
            )
        )
        from topotorch.report import build_report

        path = build_report(out)
    finally:
        mp.undo()
    return path


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_hostile_labels_names_and_config_reach_the_page_as_text(hostile_page):
    page = hostile_page.read_text()
    parser = _Tags()
    parser.feed(page)
    assert [t for t, a in parser.tags if t == "script"] == ["script", "script"]  # only the page's own two
    assert not [a for t, a in parser.tags if t == "img" and a.get("src") == "x"]
    assert not any("onerror" in a for _, a in parser.tags)
    assert "<img src=x" not in page and "<script>window.__xss" not in page
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    assert data["graph"]["nodes"]["label"][0] == HOSTILE + "0"  # the data itself is intact
    assert HOSTILE_TASK in data["title"] and any(HOSTILE in str(v) for _, v in data["summary_rows"])
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


def test_hostile_labels_run_no_script_in_headless_chromium(hostile_page):
    from topotorch.browser import find_chromium

    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "chromium not found: `make setup` installs it (apt-get install chromium, as root); or set $CHROMIUM"
        )
    pytest.importorskip("websocket", reason="websocket-client missing: pip install -e '.[test]'")
    from topotorch.browser import Browser

    with Browser(chromium) as b:
        page = b.open(hostile_page.resolve().as_uri())
        assert page.evaluate("document.body.dataset.rendered") == "yes"
        # hover a neuron and a connection: the tooltip shows the labels
        page.evaluate(
            "document.querySelector('#graph circle')"
            ".dispatchEvent(new MouseEvent('mousemove', {clientX: 5, clientY: 5}))"
        )
        node_tip = page.evaluate("document.getElementById('tip').textContent")
        tip_tags = page.evaluate("document.getElementById('tip').querySelectorAll('img,script').length")
        edge_tips = page.evaluate("""(() => { const tip = document.getElementById('tip'), out = [];
            document.querySelectorAll('#graph line').forEach(l => {
                l.dispatchEvent(new MouseEvent('mousemove', {clientX: 5, clientY: 5}));
                if (tip.querySelector('img,script')) out.push('TAG');
                out.push(tip.textContent); });
            return out; })()""")
        time.sleep(0.5)  # an injected <img src=x> would have failed to load and run its onerror by now
        xss = page.evaluate("window.__xss === undefined ? 0 : window.__xss")
        imgs = page.evaluate("document.querySelectorAll('img[src=\"x\"]').length")
        title = page.evaluate("document.title")
        errors = page.errors
    assert xss == 0 and imgs == 0 and tip_tags == 0
    assert HOSTILE + "0" in node_tip and "TAG" not in edge_tips and any(HOSTILE in t for t in edge_tips)
    assert HOSTILE_TASK in title
    assert errors == [], errors


# ---- threads ----------------------------------------------------------------------------------


def test_small_runs_use_one_thread_and_threads_overrides(run, tmp_path):
    from topotorch.training import choose_threads

    s = json.loads((run / "summary.json").read_text())
    assert s["threads"] == 1 and "rule" in s["threads_chosen_by"]
    assert choose_threads(1e6) == 1
    assert choose_threads(1e10, cores=2, load=4.0) == 1  # a busy box: one thread even for big work
    assert choose_threads(1e10, cores=2, load=0.0) == min(2, torch.get_num_threads())
    before = torch.get_num_threads()
    out = tmp_path / "T"
    r = invoke("train", "independence", *TRAIN_ARGS, "--threads", "2", "--out", out)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["threads"] == 2 and s["threads_chosen_by"] == "--threads"
    assert torch.get_num_threads() == before  # restored
    one_line_error(invoke("train", "independence", "--threads", "0", "--out", tmp_path / "U"), "threads")
    one_line_error(invoke("fff", "two-moons", "--threads", "0", "--out", tmp_path / "V"), "threads")


# ---- rendering comes after summary.json, shows progress, and an interruption leaves a finished run ----


def test_summary_is_written_before_the_animation_and_ctrl_c_there_leaves_a_finished_run(tmp_path, monkeypatch):
    out = tmp_path / "R"
    seen = []

    def interrupted(graph, snapshots, gif_path=None, mp4_path=None, **kw):
        seen.append((out / "summary.json").exists())
        raise KeyboardInterrupt

    monkeypatch.setattr(visualize, "render_animation", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig.for_task("independence", **{**TINY, "animation": True}, out=str(out)))
    assert seen == [True]
    r = invoke("summary", out)
    assert r.exit_code == 0 and json.loads(r.stdout)["steps"] == 40


def test_an_interrupted_render_leaves_no_partial_animation_and_reports_progress(run, tmp_path, monkeypatch):
    r = load_run(run)
    snaps = visualize.load_snapshots(run / "snapshots.safetensors")
    calls = []
    n = visualize.render_animation(
        r.graph,
        snaps,
        gif_path=tmp_path / "a.gif",
        mp4_path=tmp_path / "a.mp4",
        on_frame=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(k, n) for k in range(1, n + 1)] and (tmp_path / "a.gif").exists()
    real, count = visualize._draw, [0]

    def draw_then_interrupt(*a, **k):
        count[0] += 1
        if count[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(visualize, "_draw", draw_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        visualize.render_animation(r.graph, snaps, gif_path=tmp_path / "b.gif", mp4_path=tmp_path / "b.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.mp4"]  # no b.*, no *.part.*


def test_a_real_ctrl_c_while_rendering_leaves_a_run_summary_accepts(tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "C"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "topotorch",
            "train",
            "independence",
            "--steps",
            "300",
            "--out",
            str(out),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # as from a terminal
    deadline = time.time() + 120
    while not (out / "summary.json").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # in the middle of drawing (~50 frames)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("rendering finished before the interrupt arrived")
    assert p.returncode == 130 and "the run is finished and saved" in err, err
    assert not list(out.glob("*.part.*")) and not (out / "training.gif").exists()
    r = invoke("summary", out)
    assert r.exit_code == 0 and json.loads(r.stdout)["steps"] == 300
