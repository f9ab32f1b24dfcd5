"""The HTML report (topotorch.report) and its check in a real headless Chromium (topotorch.browser)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch

from topotorch.browser import find_chromium
from topotorch.report import build_index, build_report, graph_data, read_metrics
from topotorch.training import TrainConfig, load_run, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two short independence runs (bimt with animation, none without) in one folder."""
    root = tmp_path_factory.mktemp("runs")
    for method, anim in (("bimt", True), ("none", False)):
        train(
            TrainConfig.for_task(
                "independence",
                method=method,
                steps=400,
                swap_every=100,
                snapshot_every=100,
                out=str(root / f"ind-{method}"),
                progress=False,
                animation=anim,
            )
        )
    return root


def test_report_is_one_offline_file_with_everything(runs):
    path = build_report(runs / "ind-bimt")
    page = path.read_text()
    assert path == runs / "ind-bimt" / "report.html"
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from the network
    assert "<script src" not in page and "<link" not in page
    assert "data:image/gif;base64," in page
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    assert data["graph"]["n_edges_total"] == 4 * 20 + 20 * 20 + 20 * 2
    assert len(data["graph"]["nodes"]["x"]) == 4 + 20 + 20 + 2
    assert data["metrics"]["step"][-1] == 400 and "wiring_cost" in data["metrics"]
    assert data["ablation"][0]["name"] == "none" and len(data["ablation"][0]["per_output"]) == 2
    # no TopoLoss, no attention, no FFF: no extra panels
    assert data["maps"] is None and data["heads"] is None and data["fff"] is None
    assert not re.search(r"<h2>(Cortical maps|Attention heads|FFF regions)</h2>", page)
    figures = json.loads((runs / "ind-bimt" / "report.json").read_text())
    assert figures["q"] is not None and figures["task"] == "independence"


def test_exports_graphml_and_node_link_json(runs):
    build_report(runs / "ind-bimt")
    g = nx.read_graphml(runs / "ind-bimt" / "graph.graphml")
    d = json.loads((runs / "ind-bimt" / "graph.json").read_text())
    assert "links" in d and len(d["links"]) == g.number_of_edges() and len(d["nodes"]) == 46
    r = load_run(runs / "ind-bimt")
    w = r.model[0].weight.detach()
    i, j = (w.abs() > r.config.threshold).nonzero()[0].tolist()
    assert g.edges[f"input:{j}", f"hidden1:{i}"]["weight"] == pytest.approx(float(w[i, j]), abs=1e-6)
    assert {"module", "importance", "label"} <= set(g.nodes["input:0"])


def test_edge_cap_keeps_the_strongest(runs):
    r = load_run(runs / "ind-none")
    full = graph_data(r.graph, max_edges=10**9)
    capped = graph_data(r.graph, max_edges=50)
    assert capped["n_edges_drawn"] == 50 and capped["n_edges_total"] == full["n_edges_total"]
    w_all = sorted((abs(x) for x in full["edges"]["weight"]), reverse=True)
    assert min(abs(x) for x in capped["edges"]["weight"]) == pytest.approx(w_all[49], abs=1e-6)


def test_index_compares_runs_and_cli(runs):
    path = build_index(runs)
    page = path.read_text()
    assert "ind-bimt/report.html" in page and "ind-none/report.html" in page
    cmd = [sys.executable, "-m", "topotorch", "report", str(runs / "nope")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run(
        [sys.executable, "-m", "topotorch", "report", str(runs / "ind-none"), "--max-edges", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert p.returncode == 2 and "max_edges" in p.stderr
    assert read_metrics(runs / "missing.csv") == {}


def test_report_in_headless_chromium(runs, tmp_path):
    """Chromium opens the report from file://, no console errors, graph and curves drawn; screenshot saved."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "chromium not found: `make setup` installs it (apt-get install chromium, as root); or set $CHROMIUM"
        )
    pytest.importorskip("websocket", reason="websocket-client missing: pip install -e '.[test]'")
    from topotorch.browser import Browser

    path = build_report(runs / "ind-bimt")
    shot = tmp_path / "report.png"
    with Browser(chromium) as b:
        page = b.open(path.resolve().as_uri())
        assert page.evaluate("document.body.dataset.rendered") == "yes"
        n_lines = page.evaluate("document.querySelectorAll('#graph line').length")
        n_nodes = page.evaluate("document.querySelectorAll('#graph circle').length")
        curves = page.evaluate(
            "[...document.querySelectorAll('#curves polyline')]"
            ".filter(p => p.getAttribute('points').split(' ').length > 2).length"
        )
        bbox = page.evaluate(
            "(() => { const r = document.getElementById('viewport').getBBox(); return [r.width, r.height]; })()"
        )
        gif_ok = page.evaluate(
            "(() => { const i = document.querySelector('img[alt=\"training animation\"]'); "
            "return i.complete && i.naturalWidth > 0; })()"
        )
        # zoom: a wheel event changes the viewport transform
        page.send("Input.dispatchMouseEvent", type="mouseWheel", x=300, y=300, deltaX=0, deltaY=-300)
        zoomed = page.evaluate("document.getElementById('viewport').getAttribute('transform') || ''")
        page.screenshot(shot)
        errors = page.errors
    assert errors == []
    assert n_lines == 520 and n_nodes == 46 and curves >= 4 and bbox[0] > 100 and bbox[1] > 100 and gif_ok
    assert "scale(" in zoomed
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- panels that appear when the run has them: heads (transformers), cortical maps (TopoLoss), FFF regions


def _data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))


def _tiny_run(tmp_path_factory, task: str, **kw) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("panel-runs") / task
    train(
        TrainConfig.for_task(
            task, steps=20, swap_every=10, log_every=10, out=str(out), progress=False, animation=False, **kw
        )
    )
    return out


@pytest.fixture(scope="module")
def topo_run(tmp_path_factory) -> Path:
    """A tiny TopoLoss digits run (64-100-100-10, τ = 1)."""
    return _tiny_run(tmp_path_factory, "digits", topo_tau=1.0)


@pytest.fixture(scope="module")
def mat_run(tmp_path_factory) -> Path:
    """A tiny modular-addition transformer run (1 layer, 4 heads)."""
    return _tiny_run(tmp_path_factory, "modular-addition-transformer")


def test_report_of_a_topo_run_shows_cortical_maps(topo_run):
    import base64

    page = build_report(topo_run).read_text()
    d = _data(page)
    assert "<h2>Cortical maps</h2>" in page and "<h2>Attention heads</h2>" not in page and d["heads"] is None
    layers = d["maps"]["layers"]
    assert [(m["layer"], m["sheet"]) for m in layers] == [
        ("0", [10, 10]),
        ("2", [10, 10]),
    ]  # 64-100-100-10: all but the output
    assert all(-1.0 < m["smoothness"] <= 1.0 and m["effective_dim"] >= 1.0 and len(m["classes"]) == 10 for m in layers)
    assert all(base64.b64decode(m["png"])[:8] == b"\x89PNG\r\n\x1a\n" for m in layers)
    assert json.loads((topo_run / "report.json").read_text())["smoothness"]["0"] == pytest.approx(
        layers[0]["smoothness"]
    )


def test_report_of_a_transformer_run_shows_the_head_table(mat_run):
    page = build_report(mat_run).read_text()
    d = _data(page)
    assert "<h2>Attention heads</h2>" in page and d["maps"] is None and d["fff"] is None
    heads = d["heads"]
    assert [h["name"] for h in heads] == ["none"] + [f"gpt.blocks.0.attn head {k}" for k in range(4)]
    assert all(len(h["per_output"]) == 59 and h["metric"] == "accuracy" for h in heads)
    r = load_run(mat_run)
    assert heads[0]["overall"] == pytest.approx(
        r.summary["test_accuracy"], abs=1e-9
    )  # intact row = the run's test accuracy
    assert any(h["overall"] != heads[0]["overall"] for h in heads[1:])


def test_fff_panel_leaf_usage_regions_and_knock_outs():
    from topotorch.layers.fff import FFF
    from topotorch.report import fff_panel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), FFF(2, leaf_width=4, output_width=3, depth=2))
    x = torch.randn(200, 2)
    y = torch.randint(0, 3, (200,))
    panel = fff_panel(net, x, y, "accuracy")
    assert len(panel) == 1 and panel[0]["layer"] == "1" and net.training  # mode restored
    p = panel[0]
    assert sum(row["samples"] for row in p["leaves"]) == 200 == p["usage"]["n_samples"]
    assert all(0 < row["purity"] <= 1 for row in p["leaves"]) and p["png"]
    assert len(p["ablation"]) == 1 + len(p["leaves"]) and p["ablation"][1]["samples"] == p["leaves"][0]["samples"]
    assert fff_panel(torch.nn.Linear(2, 2), x, y) is None


def test_panels_render_in_headless_chromium(topo_run, mat_run):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "chromium not found: `make setup` installs it (apt-get install chromium, as root); or set $CHROMIUM"
        )
    pytest.importorskip("websocket", reason="websocket-client missing: pip install -e '.[test]'")
    from topotorch.browser import Browser

    topo, mat = build_report(topo_run), build_report(mat_run)
    with Browser(chromium) as b:
        page = b.open(topo.resolve().as_uri())
        maps = page.evaluate(
            "[...document.querySelectorAll('#maps img')].filter(i => i.complete && i.naturalWidth > 0).length"
        )
        errors = list(page.errors)
        page = b.open(mat.resolve().as_uri())
        head_rows = page.evaluate("document.querySelectorAll('#heads tr').length")
        rendered = page.evaluate("document.body.dataset.rendered")
        errors += page.errors
    assert errors == [] and maps == 2 and head_rows == 1 + 5 and rendered == "yes"
