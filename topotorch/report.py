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
# page templates (hand-written SVG + JS, no libraries)
# ---------------------------------------------------------------------------------------------
_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#223;color:#fff;padding:10px 18px}h1{font-size:19px;margin:0}
main{padding:12px 18px;display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:16px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 12px;overflow:auto}
h2{font-size:15px;margin:2px 0 8px}.wide{grid-column:1/-1}
table{border-collapse:collapse;font-size:12px}td,th{border-bottom:1px solid #eee;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}.muted{color:#777;font-size:12px}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #888;padding:4px 7px;font-size:12px;
border-radius:4px;display:none;box-shadow:0 1px 4px #0003;z-index:9}
svg text{font-size:10px;fill:#444}pre{font-size:11px;white-space:pre-wrap;word-break:break-all;background:#f4f4f4;padding:6px}
img{max-width:100%}.cards{display:flex;flex-wrap:wrap;gap:12px}.card{width:330px}
.notice{background:#fff4d6;border:1px solid #e0b44c;border-radius:4px;padding:6px 10px;margin:8px 18px;font-size:13px}
"""

_COMMON_JS = r"""
const errors=[];window.addEventListener('error',e=>{errors.push(String(e.message));document.body.dataset.errors=errors.length;});
const NS='http://www.w3.org/2000/svg';
function el(tag,attrs,parent){const e=document.createElementNS(NS,tag);for(const k in attrs)e.setAttribute(k,attrs[k]);if(parent)parent.appendChild(e);return e;}
function fmt(v){if(v===null||v===undefined)return '–';if(typeof v!=='number')return String(v);const a=Math.abs(v);
 return (a!==0&&(a<1e-3||a>=1e5))?v.toExponential(3):(+v.toPrecision(4)).toString();}
function lineChart(parent,title,xs,series,opts){opts=opts||{};const W=300,H=170,L=46,R=8,T=18,B=22;
 const svg=el('svg',{width:W,height:H,viewBox:`0 0 ${W} ${H}`,class:'chart'},parent);
 el('text',{x:L,y:12,'font-weight':'bold'},svg).textContent=title;
 const tr=v=>opts.log?Math.log10(Math.max(v,1e-12)):v;let lo=Infinity,hi=-Infinity,x0=Infinity,x1=-Infinity;
 series.forEach(s=>s.ys.forEach((y,i)=>{if(y===null||!isFinite(y))return;const t=tr(y);lo=Math.min(lo,t);hi=Math.max(hi,t);
  x0=Math.min(x0,s.xs[i]);x1=Math.max(x1,s.xs[i]);}));
 if(!isFinite(lo)){el('text',{x:L,y:H/2},svg).textContent='no data';return svg;}
 if(hi===lo){hi+=1;lo-=1;}if(x1===x0)x1+=1;
 const sx=x=>L+(x-x0)/(x1-x0)*(W-L-R),sy=y=>T+(1-(tr(y)-lo)/(hi-lo))*(H-T-B);
 el('rect',{x:L,y:T,width:W-L-R,height:H-T-B,fill:'none',stroke:'#ccc'},svg);
 [lo,hi].forEach((t,i)=>{el('text',{x:L-3,y:i?T+8:H-B,'text-anchor':'end'},svg).textContent=fmt(opts.log?Math.pow(10,t):t);});
 el('text',{x:L,y:H-6},svg).textContent=fmt(x0);el('text',{x:W-R,y:H-6,'text-anchor':'end'},svg).textContent=fmt(x1)+' steps';
 series.forEach((s,k)=>{const pts=[];s.ys.forEach((y,i)=>{if(y!==null&&isFinite(y))pts.push(sx(s.xs[i]).toFixed(1)+','+sy(y).toFixed(1));});
  el('polyline',{points:pts.join(' '),fill:'none',stroke:s.color||'#1f5fbf','stroke-width':1.4},svg);
  if(s.name){el('text',{x:W-R-4,y:T+12+12*k,'text-anchor':'end',fill:s.color},svg).textContent=s.name;}});
 return svg;}
function table(parent,head,rows){const t=document.createElement('table');const tr=t.insertRow();
 head.forEach(h=>{const th=document.createElement('th');th.textContent=h;tr.appendChild(th);});
 rows.forEach(r=>{const row=t.insertRow();r.forEach(c=>{row.insertCell().textContent=typeof c==='number'?fmt(c):c;});});parent.appendChild(t);return t;}
"""

_PAGE = (
    """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>"""
    + _STYLE
    + """</style></head><body><header><h1>__TITLE__</h1><div id="sub" class="muted" style="color:#ccd"></div></header>
<div id="notices">__NOTICES__</div>
<main>
<section><h2>Connectivity (wheel: zoom, drag: pan, hover: details; colour = module)</h2>
<div id="graphinfo" class="muted"></div><svg id="graph" width="100%" height="560" style="background:#fff;cursor:grab"></svg></section>
<section><h2>Training curves</h2><div id="curves"></div></section>
<section><h2>Animation</h2>__GIF__</section>
<section><h2>Metrics</h2><div id="metrics"></div></section>
<section class="wide"><h2>Modules and ablations</h2><div id="modules"></div><div id="ablation"></div><div id="embabl"></div></section>
<section class="wide"><h2>Formula</h2><div id="formula"></div></section>
__PANELS__
</main><div id="tip"></div>
<script type="application/json" id="data">__DATA__</script>
<script>"""
    + _COMMON_JS
    + r"""
const D=JSON.parse(document.getElementById('data').textContent);
const PAL=['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#17becf','#bcbd22','#7f7f7f','#393b79','#637939'];
const mcol=m=>m<0?'#bbb':PAL[m%PAL.length];
const tip=document.getElementById('tip');
// lines: strings, or [bold, rest] pairs; built from text nodes only (labels are data, never markup)
function showTip(ev,lines){tip.replaceChildren();lines.forEach((ln,i)=>{if(i)tip.appendChild(document.createElement('br'));
 if(Array.isArray(ln)){const b=document.createElement('b');b.textContent=ln[0];tip.appendChild(b);tip.appendChild(document.createTextNode(ln[1]));}
 else tip.appendChild(document.createTextNode(ln));});
 tip.style.display='block';tip.style.left=(ev.clientX+12)+'px';tip.style.top=(ev.clientY+12)+'px';}
function hideTip(){tip.style.display='none';}
const F=D.figures;
document.getElementById('sub').textContent=`${F.metric}: ${fmt(F.test)} (thresholded ${fmt(F.thresholded_test)}) · wiring cost ${fmt(F.wiring_cost)} · modularity Q ${fmt(F.q)} (all weights ${fmt(F.q_all_weights)}) · ${F.n_communities} communities (${F.backend})`;
// ---- graph
(function(){const G=D.graph,N=G.nodes,svg=document.getElementById('graph');
 const n=N.x.length;let x0=Infinity,x1=-Infinity,y0=Infinity,y1=-Infinity;
 for(let i=0;i<n;i++){x0=Math.min(x0,N.x[i]);x1=Math.max(x1,N.x[i]);y0=Math.min(y0,N.y[i]);y1=Math.max(y1,N.y[i]);}
 const W=1000,H=560,pad=30,sx=x=>pad+(x-x0)/((x1-x0)||1)*(W-2*pad),sy=y=>H-pad-(y-y0)/((y1-y0)||1)*(H-2*pad);
 svg.setAttribute('viewBox',`0 0 ${W} ${H}`);const vp=el('g',{id:'viewport'},svg);
 const ge=el('g',{id:'edges'},vp),gn=el('g',{id:'nodes'},vp);
 const E=G.edges,m=E.weight.length;let wmax=0;for(let k=0;k<m;k++)wmax=Math.max(wmax,Math.abs(E.weight[k]));
 for(let k=0;k<m;k++){const s=E.source[k],t=E.target[k],w=E.weight[k],r=Math.abs(w)/(wmax||1);
  const ln=el('line',{x1:sx(N.x[s]).toFixed(1),y1:sy(N.y[s]).toFixed(1),x2:sx(N.x[t]).toFixed(1),y2:sy(N.y[t]).toFixed(1),
   stroke:w>=0?'#1f4fd6':'#d62020','stroke-opacity':(0.08+0.9*r).toFixed(3),'stroke-width':(0.3+3*r).toFixed(2),'vector-effect':'non-scaling-stroke'},ge);
  ln.addEventListener('mousemove',ev=>showTip(ev,[`${N.label[s]} → ${N.label[t]}`,`weight ${fmt(w)}`]));ln.addEventListener('mouseleave',hideTip);}
 let imax=0;for(let i=0;i<n;i++)imax=Math.max(imax,N.importance[i]);
 for(let i=0;i<n;i++){const c=el('circle',{cx:sx(N.x[i]).toFixed(1),cy:sy(N.y[i]).toFixed(1),r:(1.5+4.5*Math.sqrt(N.importance[i]/(imax||1))).toFixed(2),
   fill:mcol(N.module[i]),stroke:'#333','stroke-width':0.4},gn);
  c.addEventListener('mousemove',ev=>showTip(ev,[[N.label[i],` (${N.space[i]}[${N.index[i]}])`],`importance Σ|w| ${fmt(N.importance[i])}`,`module ${N.module[i]<0?'none':N.module[i]+1}`]));
  c.addEventListener('mouseleave',hideTip);}
 const role={};G.spaces.forEach(s=>role[s.name]=s.role);
 for(let i=0;i<n;i++){if(role[N.space[i]]==='hidden'||n>400)continue;
  el('text',{x:sx(N.x[i]).toFixed(1),y:(sy(N.y[i])+(role[N.space[i]]==='input'?14:-8)).toFixed(1),'text-anchor':'middle'},gn).textContent=N.label[i];}
 document.getElementById('graphinfo').textContent=`${n} neurons; drawing the ${G.n_edges_drawn} strongest of ${G.n_edges_total} connections (blue +, red −; width ∝ |w|)`;
 let k=1,tx=0,ty=0,drag=null;const apply=()=>vp.setAttribute('transform',`translate(${tx},${ty}) scale(${k})`);
 const pt=ev=>{const r=svg.getBoundingClientRect();return [(ev.clientX-r.left)*W/r.width,(ev.clientY-r.top)*H/r.height];};
 svg.addEventListener('wheel',ev=>{ev.preventDefault();const [px,py]=pt(ev),f=Math.exp(-ev.deltaY*0.0015),nk=Math.min(80,Math.max(0.3,k*f));
  tx=px-(px-tx)*nk/k;ty=py-(py-ty)*nk/k;k=nk;apply();},{passive:false});
 svg.addEventListener('mousedown',ev=>{drag=[...pt(ev),tx,ty];svg.style.cursor='grabbing';});
 window.addEventListener('mouseup',()=>{drag=null;svg.style.cursor='grab';});
 window.addEventListener('mousemove',ev=>{if(!drag)return;const [px,py]=pt(ev);tx=drag[2]+px-drag[0];ty=drag[3]+py-drag[1];apply();});
 svg.addEventListener('dblclick',()=>{k=1;tx=ty=0;apply();});})();
// ---- curves
(function(){const M=D.metrics,box=document.getElementById('curves');if(!M.step){box.textContent='no training curves: metrics.csv is missing or unreadable (see the notice above)';return;}
 const xs=M.step,met=Object.keys(M).find(c=>c.startsWith('test_'));
 lineChart(box,'task loss (log)',xs,[{xs,ys:M.task_loss}],{log:true});
 lineChart(box,'wiring cost',xs,[{xs,ys:M.wiring_cost,color:'#7a3dbf'}],{});
 lineChart(box,'active weight fraction',xs,[{xs,ys:M.active_weight_fraction,color:'#2a8a2a'}],{});
 if(met)lineChart(box,met.replace('_',' '),xs,[{xs,ys:M[met],color:'#c75d00'}],{log:met.endsWith('mse')});
 if(M.lambda)lineChart(box,'λ (log)',xs,[{xs,ys:M.lambda,color:'#555'}],{log:true});})();
// ---- metrics
table(document.getElementById('metrics'),['figure','value'],D.summary_rows);
// ---- modules + ablations
(function(){const box=document.getElementById('modules');
 const p=document.createElement('p');p.textContent=`Communities of the weighted graph (weights |w| > ${D.threshold}), modularity Q = ${fmt(F.q)}; connected modules: ${F.connected_modules}.`;box.appendChild(p);
 table(box,['module','inputs','outputs','neurons','per space'],D.modules.slice(0,20).map(m=>[String(m.community+1),m.inputs.slice(0,10).join(' ')+(m.inputs.length>10?' …':''),
  m.outputs.slice(0,10).join(' ')+(m.outputs.length>10?' …':''),m.neurons,Object.entries(m.sizes).map(([a,b])=>a+':'+b).join(' ')]));
 const ab=document.getElementById('ablation'),A=D.ablation,labs=D.output_labels,few=labs.length<=12;
 const h=document.createElement('h2');h.textContent=`Knock-outs: hidden neurons of each module set to zero — test ${A[0].metric} overall`+(few?' and per output/class':' and worst class');ab.appendChild(h);
 table(ab,['knocked out','neurons','overall'].concat(few?labs:['worst class']),A.map(r=>[r.name,r.neurons,r.overall].concat(few?r.per_output:
  [(()=>{let lo=Infinity,j=-1;r.per_output.forEach((v,i)=>{if(v!==null&&v<lo){lo=v;j=i;}});return j<0?'–':labs[j]+': '+fmt(lo);})()])));
 const E=D.embedding_ablation;if(E){const b=document.getElementById('embabl');const h2=document.createElement('h2');
  h2.textContent=`Embedding modules (the paper's analysis): ${E.modules.length} modules, neurons `+E.modules.map(m=>'{'+m.join(',')+'}').join(' ');b.appendChild(h2);
  table(b,['network','embedding neurons knocked out','test','train'],E.rows.map(r=>[r.name,r.neurons_knocked_out,r.test,r.train]));}})();
// ---- formula
(function(){const box=document.getElementById('formula'),f=D.formula;
 if(!f){box.textContent='The thresholded network has more than ~20 active neurons or is not an MLP: no formula.';return;}
 const p=document.createElement('p');p.textContent=`${f.active_neurons} active hidden neurons ${JSON.stringify(f.hidden_sizes)} at threshold ${f.threshold}; the exact expression matches the thresholded network to ${fmt(f.max_abs_error)} (float64, test set). Numbers below rounded to 3 digits.`;box.appendChild(p);
 f.outputs.forEach(o=>{const h=document.createElement('h2');h.textContent=`${o.name} — depends on {${o.free_symbols.join(', ')}}`;box.appendChild(h);
  const pre=document.createElement('pre');pre.textContent='LaTeX: '+o.latex;box.appendChild(pre);});
 const pre=document.createElement('pre');pre.textContent=f.python;box.appendChild(pre);})();
// ---- knock-out tables of parts (heads, leaves): overall, change, per class (or the worst class)
function partTable(box,title,rows,extra){if(!rows||!rows.length)return;const h=document.createElement('h2');h.textContent=title;box.appendChild(h);
 const n=rows[0].per_output.length,labs=D.output_labels&&D.output_labels.length===n?D.output_labels:[...Array(n).keys()].map(String),few=n<=12,mse=rows[0].metric==='mse';
 const worst=r=>{let b=mse?-Infinity:Infinity,j=-1;r.per_output.forEach((v,i)=>{if(v!==null&&(mse?v>b:v<b)){b=v;j=i;}});return j<0?'–':labs[j]+': '+fmt(b);};
 table(box,['knocked out'].concat(extra.map(e=>e[0]),[rows[0].metric,'change']).concat(few?labs:['worst class']),
  rows.map(r=>[r.name].concat(extra.map(e=>r[e[1]]===undefined?'':r[e[1]]),[r.overall,r.name==='none'?'':r.overall-rows[0].overall]).concat(few?r.per_output:[worst(r)])));}
if(D.heads){partTable(document.getElementById('heads'),`Each attention head knocked out alone (its slice of the output projection's input zeroed): test ${D.heads[0].metric} on ${D.panel_samples} test samples, overall and `+(D.heads[0].per_output.length<=12?'per output/class':'worst class'),D.heads,[]);}
if(D.maps){const box=document.getElementById('maps'),M=D.maps;const p=document.createElement('p');
 p.textContent=`Class-vs-rest selectivity (Welch t) of each unit on its cortical sheet, held-out inputs; layers ${M.pattern}. Smoothness 1 − γ(1)/γ(∞): 1 = smooth, 0 = shuffled. ${D.panel_samples} test samples. ${M.note||''}`;box.appendChild(p);
 M.layers.forEach(L=>{const h=document.createElement('h2');h.textContent=L.error?`${L.layer} (${L.sheet[0]}x${L.sheet[1]}): ${L.error}`:
  `${L.layer} (${L.sheet[0]}x${L.sheet[1]} sheet): smoothness ${fmt(L.smoothness)}, effective dimensionality ${fmt(L.effective_dim)}`;box.appendChild(h);
  if(L.png){const im=document.createElement('img');im.alt='cortical map '+L.layer;im.src='data:image/png;base64,'+L.png;box.appendChild(im);}});}
if(D.fff){const box=document.getElementById('fff');D.fff.forEach(Fl=>{const U=Fl.usage,h=document.createElement('h2');
 h.textContent=`${Fl.layer}: depth ${Fl.depth}, ${U.n_used} of ${U.n_leaves} leaves used by ${U.n_samples} samples (effective ${fmt(U.effective_leaves)}, busiest ${fmt(U.max_fraction)})`+(Fl.purity===null?'':`, weighted purity ${fmt(Fl.purity)}`);box.appendChild(h);
 if(Fl.png){const im=document.createElement('img');im.alt='FFF regions '+Fl.layer;im.src='data:image/png;base64,'+Fl.png;box.appendChild(im);}
 const labs=D.output_labels||[];table(box,['leaf','samples','fraction'].concat(Fl.purity===null?[]:['majority class','purity']),
  Fl.leaves.slice(0,32).map(r=>[String(r.leaf),r.samples,r.fraction].concat(Fl.purity===null?[]:[labs[r.majority]||String(r.majority),r.purity])));
 partTable(box,'Leaves knocked out one at a time (the busiest; samples routed there output zero)',Fl.ablation,[['samples','samples']]);});}
document.body.dataset.rendered='yes';
</script></body></html>
"""
)

_INDEX = (
    """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>topotorch runs</title>
<style>"""
    + _STYLE
    + """</style></head><body><header><h1>topotorch runs, side by side</h1></header><main>
<section class="wide"><h2>Figures</h2><div id="tbl"></div></section>
<section class="wide"><h2>Task loss</h2><div id="curves"></div></section>
<section class="wide"><h2>Runs</h2><div id="cards" class="cards"></div></section></main>
<script type="application/json" id="data">__DATA__</script>
<script>"""
    + _COMMON_JS
    + r"""
const R=JSON.parse(document.getElementById('data').textContent);
const PAL=['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#17becf'];
const t=table(document.getElementById('tbl'),['run','task','method','steps','metric','test','thresholded','wiring cost','active weights','Q','communities','connected modules'],
 R.map(r=>[r.run,r.task,r.method,r.steps,r.metric,r.test,r.thresholded_test,r.wiring_cost,r.active_weight_fraction,r.q,r.n_communities,r.connected_modules]));
[...t.rows].slice(1).forEach((row,i)=>{const a=document.createElement('a');a.href=R[i].href;a.textContent=R[i].run;row.cells[0].textContent='';row.cells[0].appendChild(a);});
const tasks=[...new Set(R.map(r=>r.task))];
tasks.forEach(task=>{const rs=R.filter(r=>r.task===task&&r.metrics.step);if(!rs.length)return;
 lineChart(document.getElementById('curves'),task+' task loss (log)',null,rs.map((r,i)=>({xs:r.metrics.step,ys:r.metrics.task_loss,color:PAL[i%PAL.length],name:r.method+' · '+r.run})),{log:true});});
R.forEach(r=>{const c=document.createElement('div');c.className='card';const a=document.createElement('a');a.href=r.href;
 a.textContent=`${r.run} (${r.task}, ${r.method})`;c.appendChild(a);
 if(r.thumb){const im=document.createElement('img');im.src='data:image/png;base64,'+r.thumb;c.appendChild(im);}
 const p=document.createElement('div');p.className='muted';p.textContent=`${r.metric} ${fmt(r.test)} · Q ${fmt(r.q)} · active ${fmt(r.active_weight_fraction)}`;c.appendChild(p);
 (r.notices||[]).forEach(n=>{const q=document.createElement('p');q.className='notice';q.textContent=n;c.appendChild(q);});
 document.getElementById('cards').appendChild(c);});
document.body.dataset.rendered='yes';
</script></body></html>
"""
)
