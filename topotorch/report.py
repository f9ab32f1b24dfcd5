"""One self-contained, offline HTML report per run, and an index page comparing runs.

``build_report(run_dir)`` writes into the run folder:

* ``report.html`` — one file, no network access needed (data, scripts and styles inline, the
  training GIF embedded as base64): the connectivity graph (pan with the mouse, zoom with the
  wheel, hover a neuron for its importance and module, hover a connection for its weight;
  neurons coloured by module), training curves from ``metrics.csv``, the animation, the
  metrics table, module ablations per output/class, the paper's embedding-module ablation
  for token tasks, and the exact formula when the thresholded net is small; and, when the
  run has them, a head-ablation table (transformers: each attention head knocked out alone,
  metric per class), cortical maps (TopoLoss runs, ``topo_tau > 0``: class-selectivity t-maps
  of each sheet as embedded PNGs, with smoothness and effective dimensionality) and FFF regions
  (models with FFF layers: leaf usage, leaf purity, leaf knock-outs, the region picture for 2-D inputs);
* ``graph.graphml`` and ``graph.json`` (networkx node-link data with a ``links`` key) — every
  connection with |w| > the run's threshold;
* ``report.json`` — the figures the index page compares (Q, modules, metrics).

Big networks draw only the ``max_edges`` strongest connections (by |w|).
``build_index(runs_dir)`` builds every run's report and ``runs_dir/index.html``.

    >>> build_report("runs/ind")  # -> runs/ind/report.html
    >>> build_index("runs")  # -> runs/index.html
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from topotorch.analysis import structure
from topotorch.analysis.ablation import (
    ablation_table,
    attention_layers,
    embedding_module_ablation,
    head_ablation_table,
    leaf_ablation_table,
    module_groups,
)
from topotorch.analysis.modularity import detect_communities, importance
from topotorch.checkpoint import FallbackWarning
from topotorch.graph import SpatialGraph, active_mask, aggregate

MAX_GIF_BYTES = 20_000_000
# the extra panels (heads, maps, FFF) evaluate at most this many test samples, and at most
# PANEL_POSITIONS labelled positions (a text model's sequence of 64 characters counts 64)
PANEL_SAMPLES = 2000
PANEL_POSITIONS = 4096


def _finite(v: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: Path) -> dict[str, list[float]]:
    """metrics.csv as columns of floats ({} when the file is missing); a damaged file raises ``ValueError``
    naming it and the problem. Usage: ``read_metrics(run / "metrics.csv")``."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        if len(rows) < 2:
            return {}
        header, body = (
            rows[0],
            np.array(
                [[float(x) if x not in ("", "nan") else np.nan for x in r] for r in rows[1:] if len(r) == len(rows[0])],
                dtype=np.float64,
            ),
        )
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:
        raise ValueError(f"{path} is unreadable: {' '.join(str(e).split())[:200]}") from None
    return {h: body[:, i].tolist() for i, h in enumerate(header)} if body.size else {}


def _metrics_or_notice(path: Path, notices: list[str]) -> dict[str, list[float]]:
    """:func:`read_metrics`, or {} plus a notice (and a FallbackWarning) naming the file when it is damaged."""
    try:
        return read_metrics(path)
    except ValueError as e:
        msg = f"{e}; training curves left out"
        notices.append(msg)
        warnings.warn(msg, FallbackWarning, stacklevel=2)
        return {}


def _noting(notices: list[str], fn, *args, **kwargs):
    """Run ``fn`` recording its UserWarnings (a fallback checkpoint, an unreadable summary.json) as page
    notices; each is warned again so the command line reports it too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = fn(*args, **kwargs)
    for w in caught:
        if issubclass(w.category, UserWarning):
            notices.append(" ".join(str(w.message).split()))
    for w in caught:  # outside the recording block: reaches the caller's filters / the CLI
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace every ``__KEY__`` of ``template`` in one pass: text put in is never scanned again (a run
    named ``__DATA__`` stays a name)."""
    import re

    return re.sub(r"__(TITLE|GIF|PANELS|DATA|NOTICES)__", lambda m: values.get(m.group(1), m.group(0)), template)


def _json_for_script(obj: Any) -> str:
    """JSON for a ``<script type="application/json">`` block: no ``<``, ``>`` or ``&`` left raw, so no label,
    task name or config string can close the block or open a tag (JSON.parse reads the escapes back)."""
    return json.dumps(_finite(obj)).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _notices_html(notices: list[str]) -> str:
    return "".join(f'<p class="notice">{html.escape(n)}</p>' for n in notices)


def graph_layout(graph: SpatialGraph) -> dict[str, np.ndarray]:
    """2-D drawing coordinates per space with coordinates: (N, 2) of (x, height).

    Planar layers are drawn in an oblique projection (x + 0.35·y, height + 0.55·y) so a
    3-D network reads as stacked sheets; line layers then sit at y = 0.5 like the 3-D drawing.
    """
    placed = [(s, s.positions) for s in graph.spaces if s.positions is not None]
    planar = any(pos.shape[1] >= 2 for _, pos in placed)
    out = {}
    for s, pos in placed:
        p = pos.to(torch.float64).numpy()
        x = p[:, 0]
        y = p[:, 1] if p.shape[1] >= 2 else np.full(len(p), 0.5 if planar else 0.0)
        out[s.name] = (
            np.stack([x + 0.35 * y, s.height + 0.55 * y], 1) if planar else np.stack([x, np.full(len(p), s.height)], 1)
        )
    return out


def _edges(graph: SpatialGraph, node_offset: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All connections between drawn neurons: (source node, target node, signed Σw)."""
    src, tgt, val = [], [], []
    for c in graph.connections:
        if c.target not in node_offset or c.source not in node_offset:
            continue
        w = graph.tensor(c.weight).detach()
        nt, ns = graph.space(c.target).size, graph.space(c.source).size
        signed = aggregate(w, c, nt, ns, absolute=False).to("cpu", torch.float64)
        t, s = signed.nonzero(as_tuple=True)
        src.append(s.numpy() + node_offset[c.source])
        tgt.append(t.numpy() + node_offset[c.target])
        val.append(signed[t, s].numpy())
    if not src:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(src), np.concatenate(tgt), np.concatenate(val)


def graph_data(graph: SpatialGraph, membership: dict[str, np.ndarray] | None = None, max_edges: int = 5000) -> dict:
    """Nodes and the ``max_edges`` strongest edges of the connectivity graph, ready for the page.

    Usage: ``graph_data(g, detect_communities(g).membership)``.
    """
    layout = graph_layout(graph)
    imp = importance(graph)
    nodes: dict[str, list] = {"space": [], "index": [], "label": [], "x": [], "y": [], "module": [], "importance": []}
    offset, total = {}, 0
    for s in graph.spaces:
        if s.name not in layout:
            continue
        offset[s.name] = total
        total += s.size
        nodes["space"] += [s.name] * s.size
        nodes["index"] += list(range(s.size))
        nodes["label"] += structure.neuron_labels(s)
        nodes["x"] += np.round(layout[s.name][:, 0], 5).tolist()
        nodes["y"] += np.round(layout[s.name][:, 1], 5).tolist()
        mem = membership.get(s.name) if membership else None
        nodes["module"] += mem.tolist() if mem is not None else [-1] * s.size
        nodes["importance"] += np.round(imp[s.name].numpy(), 6).tolist()
    src, tgt, val = _edges(graph, offset)
    n_all = len(val)
    if n_all > max_edges:
        keep = np.argpartition(-np.abs(val), max_edges - 1)[:max_edges]
        src, tgt, val = src[keep], tgt[keep], val[keep]
    order = np.argsort(np.abs(val))  # strongest drawn last (on top)
    spaces = [
        {"name": s.name, "size": s.size, "role": s.role, "height": s.height} for s in graph.spaces if s.name in layout
    ]
    return {
        "nodes": nodes,
        "edges": {
            "source": src[order].tolist(),
            "target": tgt[order].tolist(),
            "weight": np.round(val[order], 6).tolist(),
        },
        "n_edges_total": int(n_all),
        "n_edges_drawn": len(val),
        "spaces": spaces,
    }


def to_networkx(graph: SpatialGraph, threshold: float = 0.0, membership: dict[str, np.ndarray] | None = None):
    """The connectivity graph as a networkx DiGraph (nodes "space:index"; edges with |w| > threshold).

    Node attributes: space, index, label, role, x, y, module, importance; edge: weight (signed Σw).
    Usage: ``nx.write_graphml(to_networkx(g, 0.05), "g.graphml")``.
    """
    import networkx as nx

    data = graph_data(graph, membership, max_edges=10**12)
    n = data["nodes"]
    roles = {s["name"]: s["role"] for s in data["spaces"]}
    ids = [f"{s}:{i}" for s, i in zip(n["space"], n["index"])]
    g = nx.DiGraph()
    g.add_nodes_from(
        (
            ids[k],
            {
                "space": n["space"][k],
                "index": n["index"][k],
                "label": n["label"][k],
                "role": roles[n["space"][k]],
                "x": n["x"][k],
                "y": n["y"][k],
                "module": n["module"][k],
                "importance": n["importance"][k],
            },
        )
        for k in range(len(ids))
    )
    e = data["edges"]
    w = np.asarray(e["weight"])
    keep = np.nonzero(active_mask(torch.from_numpy(w), threshold).numpy())[0]
    g.add_edges_from((ids[e["source"][k]], ids[e["target"][k]], {"weight": float(w[k])}) for k in keep)
    return g


def export_graph(
    graph: SpatialGraph, folder: Path, threshold: float = 0.0, membership: dict[str, np.ndarray] | None = None
) -> tuple[Path, Path]:
    """Write ``graph.graphml`` and ``graph.json`` (node-link, ``links`` key) into ``folder``.

    Usage: ``export_graph(g, Path("runs/ind"), threshold=0.05)``.
    """
    import networkx as nx

    folder = Path(folder)
    g = to_networkx(graph, threshold, membership)
    gml, js = folder / "graph.graphml", folder / "graph.json"
    nx.write_graphml(g, gml)
    js.write_text(json.dumps(nx.node_link_data(g, edges="links")))
    return gml, js


def _summary_rows(summary: dict, config: dict) -> list[list[str]]:
    keys = [k for k in summary if not isinstance(summary[k], (dict, list))]
    rows = [[k, f"{summary[k]:.6g}" if isinstance(summary[k], float) else str(summary[k])] for k in keys]
    if "active_weights" in summary:
        aw = summary["active_weights"]
        rows.append(["active weights", f"{aw['active']}/{aw['total']} ({aw['fraction']:.3%})"])
    if "active_neurons" in summary:
        rows.append(["active neurons", ", ".join(f"{k}: {v}" for k, v in summary["active_neurons"].items())])
    rows += [[f"config.{k}", str(v)] for k, v in config.items() if k not in ("out", "progress")]
    return rows


def _formula(result) -> dict | None:
    from topotorch.analysis.formulas import check_formula, network_formula

    try:
        f = network_formula(result.model, result.config.threshold, result.task.input_labels, result.task.output_labels)
    except (ValueError, TypeError, KeyError):
        return None
    d = f.to_dict(digits=3)
    d["max_abs_error"] = check_formula(f, result.model, result.data.x_test)
    d["python"] = f.python(digits=3)
    return d


def _png_b64(fig) -> str:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _panel_set(r, max_samples: int = PANEL_SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = r.data.x_test, r.data.y_test
    per = y[0].numel() if y.ndim > 1 and len(y) else 1
    n = max(1, min(max_samples, PANEL_POSITIONS // per))
    return x[:n], y[:n]


def head_panel(r, max_samples: int = PANEL_SAMPLES) -> list[dict] | None:
    """Each attention head knocked out alone (test metric overall and per class), or None without attention.

    ``r``: a :class:`~topotorch.training.TrainResult`. Usage: ``head_panel(load_run("runs/mat"))``.
    """
    if not attention_layers(r.model):
        return None
    x, y = _panel_set(r, max_samples)
    return head_ablation_table(r.model, x, y, r.task)


def maps_panel(r, max_layers: int = 4, classes: int = 10, max_samples: int = PANEL_SAMPLES) -> dict | None:
    """Cortical maps of a TopoLoss run (``config.topo_tau > 0``; else None): per sheet layer the
    class-vs-rest Welch t-maps (at most ``classes`` classes; token models: the most frequent input
    tokens) as a base64 PNG, smoothness and effective dimensionality, on held-out inputs.
    Usage: ``maps_panel(load_run("runs/digits-topo"))``.
    """
    if not getattr(r.config, "topo_tau", 0.0) > 0:
        return None
    from topotorch.analysis.maps import (
        draw_maps,
        effective_dimensionality,
        layer_activations,
        selectivity_maps,
        smoothness,
    )
    from topotorch.sheets import default_layers, find_sheets

    pattern = default_layers(r.model) if r.config.topo_layers == "auto" else r.config.topo_layers
    sheets = find_sheets(r.model, pattern)
    out: dict[str, Any] = {"pattern": pattern, "layers": [], "note": ""}
    if len(sheets) > max_layers:
        out["note"] = f"first {max_layers} of {len(sheets)} sheets shown"
    x, y = _panel_set(r, max_samples)
    if y.is_floating_point():
        out["note"] = "a regression task has no classes: no selectivity maps"
        return out
    labels = y if y.ndim == 1 else x.reshape(-1)  # sequences: one row per position, labelled by its input token
    vals, counts = labels.unique(return_counts=True)
    chosen = vals[counts.argsort(descending=True)][:classes].sort().values.tolist()
    names = r.task.output_labels if y.ndim == 1 and r.task.output_labels else None
    titles = [names[c] if names and c < len(names) else str(c) for c in chosen]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for i, s in enumerate(sheets[:max_layers]):
            acts = layer_activations(r.model, s.name, x)
            if acts.shape[0] != labels.shape[0]:
                out["layers"].append(
                    {
                        "layer": s.name,
                        "sheet": [s.h, s.w],
                        "error": f"{acts.shape[0]} activation rows for {labels.shape[0]} labels",
                    }
                )
                continue
            t = selectivity_maps(acts, labels, chosen)
            sm, ed = smoothness(t, s.h, s.w), effective_dimensionality(acts)
            png = draw_maps(t, s.h, s.w, Path(tmp) / f"{i}.png", titles=titles)
            out["layers"].append(
                {
                    "layer": s.name,
                    "sheet": [s.h, s.w],
                    "smoothness": sm,
                    "effective_dim": ed,
                    "classes": titles,
                    "png": base64.b64encode(png.read_bytes()).decode(),
                }
            )
    return out


def fff_panel(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None, metric: Any = "accuracy", max_ablated: int = 16
) -> list[dict] | None:
    """Per FFF layer of ``model`` (None when there is none): leaf usage, per-leaf sample counts and
    (class labels) majority class and purity, the ``max_ablated`` busiest leaves knocked out one at a
    time (``metric``: a Task or "accuracy"/"mse"), and for 2-D inputs the region picture (base64 PNG).
    Usage: ``fff_panel(model, x_test, y_test, task)``.
    """
    from topotorch.layers.fff import FFF, fff_layers
    from topotorch.layers.fff_regions import draw_regions, layer_inputs, leaf_usage

    layers = [(n, m) for n, m in fff_layers(model) if isinstance(m, FFF)]
    if not layers:
        return None
    was = model.training
    model.eval()
    out = []
    try:
        for name, layer in layers:
            with torch.no_grad():
                inp = layer_inputs(model, name, x) if name else x
                leaves = layer.route(inp).reshape(-1).cpu()
            usage = leaf_usage(layer, inp)
            counts = usage.counts
            labelled = y is not None and not y.is_floating_point() and y.reshape(-1).shape[0] == leaves.shape[0]
            used = [int(j) for j in torch.argsort(counts, descending=True, stable=True) if counts[j] > 0]
            rows = []
            if labelled and y is not None:
                yl = y.reshape(-1).cpu().long()
                c = int(yl.max()) + 1
                table = torch.bincount(leaves * c + yl, minlength=layer.n_leaves * c).view(layer.n_leaves, c)
            for j in used:
                row = {"leaf": j, "samples": int(counts[j]), "fraction": float(counts[j]) / max(1, usage.n_samples)}
                if labelled:
                    k = int(table[j].argmax())
                    row.update(majority=k, purity=float(table[j, k]) / float(counts[j]))
                rows.append(row)
            d = {
                "layer": name or "(model)",
                "depth": layer.depth,
                "usage": usage.as_dict(),
                "leaves": rows,
                "purity": float(table.max(1).values.sum()) / max(1, usage.n_samples) if labelled else None,
            }
            if y is not None:
                d["ablation"] = leaf_ablation_table(model, name, x, y, metric, leaves=used[:max_ablated])
            if layer.input_width == 2:
                pts = inp.reshape(-1, 2)
                d["png"] = _png_b64(draw_regions(layer, pts, y.reshape(-1) if labelled and y is not None else None))
            out.append(d)
    finally:
        model.train(was)
    return out


def build_fff_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write ``report.html`` for a ``topotorch fff`` run: its summary, and for an FFF the leaf
    usage, classes per leaf, each leaf knocked out (test accuracy) and, for 2-D inputs, the
    region picture; plus ``report.json``. Usage: ``build_fff_report("runs/digits-fff")``.
    """
    from topotorch.tasks import get_task
    from topotorch.training_fff import load_fff_run

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    notices: list[str] = []
    r = _noting(notices, load_fff_run, run_dir)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    data = get_task(config["task"]).make_data(config["seed"], torch.float32)
    panel = fff_panel(r.model, data.x_test, data.y_test, "accuracy") or []
    title = f"{config['task']} [{config['model']}] — {run_dir.name}"
    esc = html.escape

    def cell(v: Any) -> str:
        return esc(f"{v:.4g}" if isinstance(v, float) else str(v))

    rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{cell(v)}</td></tr>" for k, v in sorted(r.summary.items()))
    rows += "".join(f"<tr><td>recipe.{esc(k)}</td><td>{cell(v)}</td></tr>" for k, v in config["recipe"].items())
    body = [
        f"<h1>{esc(title)}</h1>",
        _notices_html(notices),
        "<section><h2>Summary</h2><table>",
        rows,
        "</table></section>",
    ]
    for layer in panel:
        knocked = {row.get("leaf"): row["overall"] for row in layer.get("ablation", []) if "leaf" in row}
        intact = next((row["overall"] for row in layer.get("ablation", []) if row.get("name") == "none"), None)
        u = layer["usage"]
        body.append(
            f"<section class='wide'><h2>FFF regions: {esc(layer['layer'])} (depth {layer['depth']})</h2>"
            f"<p>{u['n_used']} of {u['n_leaves']} leaves used by {u['n_samples']} test samples; effective "
            f"{u['effective_leaves']:.1f} leaves; busiest {100 * u['max_fraction']:.0f}%; weighted purity "
            f"{layer['purity']:.2f}; intact test accuracy {100 * (intact or float('nan')):.1f}%</p>"
        )
        if layer.get("png"):
            body.append(f"<img alt='leaf regions' src='data:image/png;base64,{layer['png']}'>")
        body.append(
            "<table><tr><th>leaf</th><th>samples</th><th>share</th><th>majority class</th><th>purity</th>"
            "<th>accuracy with the leaf knocked out</th></tr>"
        )
        for row in layer["leaves"]:
            ko = knocked.get(row["leaf"])
            body.append(
                f"<tr><td>{row['leaf']}</td><td>{row['samples']}</td><td>{100 * row['fraction']:.1f}%</td>"
                f"<td>{row.get('majority', '')}</td><td>{row.get('purity', float('nan')):.2f}</td>"
                f"<td>{'' if ko is None else f'{100 * ko:.1f}%'}</td></tr>"
            )
        body.append("</table></section>")
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{_STYLE}</style></head><body><main>{''.join(body)}</main></body></html>"
    )
    path = Path(out) if out is not None else run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    figures = {
        "run": run_dir.name,
        "task": config["task"],
        "model": config["model"],
        **r.summary,
        "notices": notices,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (run_dir / "report.json").write_text(json.dumps(_finite(figures), indent=2))
    return path


def build_report(
    run_dir: Path | str,
    out: Path | str | None = None,
    max_edges: int = 5000,
    resolution: float = 1.0,
    exports: bool = True,
) -> Path:
    """Write the run's self-contained ``report.html`` (plus graph exports and ``report.json``); return its path.

    ``max_edges``: draw at most this many connections (the strongest). A ``topotorch fff`` run
    gets :func:`build_fff_report`. Raises ``FileNotFoundError``/``ValueError`` for a folder that
    is not a run. Usage: ``build_report("runs/independence-bimt-s0")``.
    """
    from topotorch.training import load_run
    from topotorch.training_fff import is_fff_run

    if is_fff_run(run_dir):
        return build_fff_report(run_dir, out)
    from topotorch.sae.report import build_sae_report, is_sae_run  # a `topotorch sae` run folder

    if is_sae_run(run_dir):
        return build_sae_report(run_dir, out)
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if not isinstance(max_edges, int) or max_edges < 1:
        raise ValueError(f"max_edges must be a positive integer, got {max_edges!r}")
    notices: list[str] = []  # what was unusable and left out (or replaced by an older copy): shown on the page
    r = _noting(notices, load_run, run_dir)
    graph, thr = r.graph, r.config.threshold
    comms = detect_communities(graph, threshold=thr, resolution=resolution)
    q_all = detect_communities(graph, threshold=0.0).q
    gdata = graph_data(graph, comms.membership, max_edges)
    groups = module_groups(graph, comms)
    abl = ablation_table(r, groups)
    out_space = next(s for s in graph.spaces if s.role == "output")
    emb = embedding_module_ablation(r) if any(s.name == "embed" for s in graph.spaces) else None
    formula = _formula(r)
    heads = head_panel(r)
    cortical = maps_panel(r)
    fx, fy = _panel_set(r)
    fff = fff_panel(r.model, fx, fy, r.task)
    gif = run_dir / "training.gif"
    gif_b64 = (
        base64.b64encode(gif.read_bytes()).decode() if gif.exists() and gif.stat().st_size <= MAX_GIF_BYTES else None
    )
    figures = {
        "run": run_dir.name,
        "task": r.config.task,
        "method": r.config.method,
        "steps": r.config.steps,
        "metric": r.task.metric,
        "test": r.summary.get(f"test_{r.task.metric}"),
        "thresholded_test": r.summary.get(f"thresholded_test_{r.task.metric}"),
        "wiring_cost": r.summary.get("wiring_cost"),
        "active_weight_fraction": structure.active_weights(graph, thr)["fraction"],
        "q": comms.q,
        "q_all_weights": q_all,
        "n_communities": comms.n_communities,
        "backend": comms.backend,
        "connected_modules": len(structure.modules(graph, thr)),
    }
    data = {
        "title": f"{r.config.task} [{r.config.method}] — {run_dir.name}",
        "figures": figures,
        "graph": gdata,
        "metrics": _metrics_or_notice(run_dir / "metrics.csv", notices),
        "summary_rows": _summary_rows(r.summary, r.config.to_dict()),
        "modules": comms.modules,
        "output_labels": structure.neuron_labels(out_space),
        "ablation": abl,
        "embedding_ablation": emb,
        "formula": formula,
        "threshold": thr,
        "heads": heads,
        "maps": cortical,
        "fff": fff,
        "panel_samples": len(fx),
        "notices": notices,
    }
    figures["notices"] = notices
    if cortical:
        figures["smoothness"] = {d["layer"]: d.get("smoothness") for d in cortical["layers"]}
    if exports:
        export_graph(graph, run_dir, thr, comms.membership)
    figures["seconds"] = round(time.perf_counter() - t0, 3)
    panels = "".join(
        sec
        for sec, on in (
            ('<section class="wide"><h2>Attention heads</h2><div id="heads"></div></section>', heads),
            ('<section class="wide"><h2>Cortical maps</h2><div id="maps"></div></section>', cortical),
            ('<section class="wide"><h2>FFF regions</h2><div id="fff"></div></section>', fff),
        )
        if on
    )
    # data reaches the page as text only: escaped here, JSON with no raw < > &, and textContent in the script
    page = _fill(
        _PAGE,
        {
            "TITLE": html.escape(data["title"]),
            "PANELS": panels,
            "DATA": _json_for_script(data),
            "NOTICES": _notices_html(notices),
            "GIF": f'<img alt="training animation" src="data:image/gif;base64,{gif_b64}">'
            if gif_b64
            else "<p>No animation in this run folder (train with animation on).</p>",
        },
    )
    path = Path(out) if out is not None else run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    (run_dir / "report.json").write_text(json.dumps(_finite(figures), indent=2))
    return path


def find_runs(runs_dir: Path | str) -> list[Path]:
    """Run folders (holding config.json and a checkpoint) directly under ``runs_dir`` or one level deeper."""
    root = Path(runs_dir)
    found = sorted({p.parent for pat in ("*/config.json", "*/*/config.json") for p in root.glob(pat)})
    return [p for p in found if (p / "checkpoint").exists() or any(p.glob("checkpoint*"))]


def build_index(runs_dir: Path | str, max_edges: int = 5000, rebuild: bool = False) -> Path:
    """Build every run's report (unless up to date) and ``runs_dir/index.html`` comparing them side by side.

    Usage: ``build_index("runs")``.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder {root} does not exist")
    runs = find_runs(root)
    if not runs:
        raise ValueError(f"{root} holds no run folders (no */config.json with a checkpoint)")
    cards = []
    for run in runs:
        rep, fig = run / "report.html", run / "report.json"
        if (
            rebuild
            or not rep.exists()
            or not fig.exists()
            or rep.stat().st_mtime < (run / "config.json").stat().st_mtime
        ):
            build_report(run, max_edges=max_edges)
        f = json.loads(fig.read_text(encoding="utf-8"))
        f["href"] = "./" + rep.relative_to(root).as_posix()  # "./": a run named "javascript:..." stays a path
        png = run / "connectivity.png"
        f["thumb"] = base64.b64encode(png.read_bytes()).decode() if png.exists() else None
        f["metrics"] = _metrics_or_notice(run / "metrics.csv", f.setdefault("notices", []))
        cards.append(f)
    page = _fill(_INDEX, {"DATA": _json_for_script(cards)})
    path = root / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# page templates (hand-written SVG + JS, no libraries): files in report_assets/ beside this module,
# shipped as package data; run.html and index.html name the shared style and script by placeholders
# (__STYLE__, __COMMON_JS__) filled once here, before _fill puts a run's data in.
# ---------------------------------------------------------------------------------------------
def _asset(name: str) -> str:
    """The text of ``topotorch/report_assets/<name>`` (read as bytes: no newline translation)."""
    return (resources.files("topotorch") / "report_assets" / name).read_bytes().decode("utf-8")


def _template(name: str) -> str:
    """A page template with the shared style and script put in (each placeholder appears once)."""
    return _asset(name).replace("__STYLE__", _STYLE, 1).replace("__COMMON_JS__", _COMMON_JS, 1)


_STYLE = _asset("style.css")
_COMMON_JS = _asset("common.js")
_PAGE = _template("run.html")
_INDEX = _template("index.html")
