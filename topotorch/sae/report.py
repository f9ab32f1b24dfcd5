"""The report panel of a ``topotorch sae`` run: evaluation table, training curve, latent sheet, and the
contexts that activate each shown latent most; for a topographic run (``--sheet``, ``--relocate``,
``--tau``), the sheet's neighbour / shuffled ratios.

Everything is read from the run folder's files (``summary.json``, ``metrics.csv``,
``top_examples.json``, ``sheet.png``), so rendering never reruns the model; a missing or unreadable
file leaves its part out with a notice. :func:`sae_panel` is the HTML fragment (for any page);
:func:`build_sae_report` writes a self-contained ``report.html`` (``topotorch report RUN`` calls it
for SAE run folders).

    >>> build_sae_report("runs/sae-gpt.blocks.1-topk-2048")  # -> runs/.../report.html
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from topotorch.sae.cli import RUN_KIND

# the evaluation table: (key in summary["eval"], label, how to show it)
EVAL_ROWS = (
    ("fvu", "FVU (fraction of variance unexplained)", "{:.4f}"),
    ("explained_variance", "explained variance", "{:.4f}"),
    ("l0", "L0 (active latents per token)", "{:.2f}"),
    ("dead", "dead latents (never fired on the eval tokens)", "{:.2%}"),
    ("dense", "dense latents (fire on > 10% of tokens)", "{:.2%}"),
    ("cosine", "cosine(x, x̂)", "{:.4f}"),
    ("relative_reconstruction_bias", "relative reconstruction bias", "{:.4f}"),
    ("ce_clean", "CE clean (nats/token)", "{:.4f}"),
    ("ce_spliced", "CE with the SAE spliced in", "{:.4f}"),
    ("ce_zero", "CE with the hook point zero-ablated", "{:.4f}"),
    ("ce_recovered", "CE-loss recovered", "{:.4f}"),
    ("kl", "KL(clean ‖ spliced) per token (nats)", "{:.5f}"),
    ("n_tokens", "eval tokens", "{:d}"),
)

# the topographic table: (key in summary["topographic"]["measures"], label); a ratio of 1 is a random sheet
TOPO_ROWS = (
    ("decoder", "decoder |cos|"),
    ("coactivation", "co-activation (uncentred correlation)"),
    ("coactivation_pearson", "co-activation, Pearson (ratio column: neighbours − shuffled)"),
)


# the look of topotorch's run reports (topotorch/report.py), plus highlighted tokens
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#223;color:#fff;padding:10px 18px}h1{font-size:19px;margin:0}
main{padding:12px 18px;display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:16px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 12px;overflow:auto}
h2{font-size:15px;margin:2px 0 8px}.wide{grid-column:1/-1}
table{border-collapse:collapse;font-size:12px}td,th{border-bottom:1px solid #eee;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}.muted{color:#777;font-size:12px}img{max-width:100%}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{width:360px}
.notice{background:#fff4d6;border:1px solid #e0b44c;border-radius:4px;padding:6px 10px;margin:8px 18px;font-size:13px}
mark{background:#ffd54f;padding:0 1px}code{white-space:pre-wrap}
"""


def is_sae_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` was written by ``topotorch sae`` (its ``config.json`` says so)."""
    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("kind") == RUN_KIND


def _read(path: Path, notices: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        notices.append(f"{path.name} is missing: its part is left out")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notices.append(f"{path.name} is unreadable ({' '.join(str(e).split())}): its part is left out")
    return None


def eval_table_html(ev: dict) -> str:
    """The evaluation table as an HTML ``<table>``."""
    rows = []
    for key, label, fmt in EVAL_ROWS:
        v = ev.get(key)
        if v is None:
            continue
        try:
            shown = fmt.format(v)
        except (ValueError, TypeError):
            shown = str(v)
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{html.escape(shown)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def topographic_html(topo: dict) -> str:
    """The sheet, τ, and per measure the neighbour and shuffled means and their ratio (before → after a
    relocation), plus what the relocation did, as HTML. Usage: ``topographic_html(summary["topographic"])``."""

    def num(v: Any, fmt: str = "{:.4f}") -> str:
        return fmt.format(v) if isinstance(v, (int, float)) else "–"

    before = topo.get("before_relocation") or {}
    measures = topo.get("measures") or {}
    head = "<tr><th>neighbour / shuffled</th><th>neighbours</th><th>shuffled</th><th>ratio</th>"
    head += "<th>ratio before relocation</th></tr>" if before else "</tr>"
    rows = []
    for key, label in TOPO_ROWS:
        m = measures.get(key)
        if not isinstance(m, dict):
            continue
        # Pearson's all-pairs mean is ~0 or negative (TopK fires exactly k), so its ratio means nothing: the excess
        shown, fmt = ("excess", "{:+.4f}") if key == "coactivation_pearson" else ("ratio", "{:.2f}×")
        cells = [num(m.get("neighbour")), num(m.get("baseline")), num(m.get(shown), fmt)]
        if before:
            cells.append(num((before.get(key) or {}).get(shown), fmt))
        rows.append(
            f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        )
    sheet = topo.get("sheet") or ["?", "?"]
    desc = f"sheet {html.escape(str(sheet[0]))}×{html.escape(str(sheet[1]))}"
    desc += f", TopoLoss τ = {num(topo.get('tau'), '{:g}')}" if topo.get("tau") else ", no TopoLoss"
    rel = topo.get("relocation")
    if isinstance(rel, dict):
        desc += (
            f"; relocated on {num(rel.get('tokens'), '{:d}')} training tokens ({num(rel.get('swaps'), '{:d}')} "
            f"swaps, {num(rel.get('seconds'), '{:.1f}')} s), output change "
            f"{num(rel.get('output_change_float64'), '{:.1e}')} in float64"
        )
    mid = topo.get("mid_run_relocations") or []
    if mid:
        desc += f"; moved mid-run at step {', '.join(html.escape(str(r.get('step'))) for r in mid)}"
    note = (
        "held-out tokens; 4-neighbour pairs of live latents vs all pairs (= shuffled positions): 1× is a random sheet"
    )
    return f"<p class='muted'>{desc}</p><table>{head}{''.join(rows)}</table><p class='muted'>{note}</p>"


def curve_png(metrics_csv: Path) -> str | None:
    """FVU, L0 and dead fraction over training from ``metrics.csv``, as a base64 PNG (None if unreadable)."""
    import csv

    try:
        with open(metrics_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        steps = [int(r["step"]) for r in rows]
        series = {k: [float(r[k]) for r in rows] for k in ("fvu", "l0", "dead")}
    except (OSError, KeyError, ValueError):
        return None
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9, 2.4))
    for ax, (k, ys) in zip(axes, series.items()):
        ax.plot(steps, ys, lw=1.2)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def examples_html(latents: list[dict], max_latents: int = 32) -> str:
    """Top-activating contexts per latent: the text before, the token itself highlighted, the activation."""
    cards = []
    for lat in latents[:max_latents]:
        rows = "".join(
            f"<tr><td>{ex['act']:.3g}</td><td><code>{html.escape(ex['context'])}"
            f"<mark>{html.escape(ex['token'])}</mark></code></td></tr>"
            for ex in lat.get("examples", [])
        )
        cards.append(f"<div class='card'><b>latent {int(lat['latent'])}</b><table>{rows}</table></div>")
    return "<div class='cards'>" + "".join(cards) + "</div>"


def sae_panel(run_dir: str | Path, notices: list[str] | None = None, max_latents: int = 32) -> str:
    """The SAE run's report sections as one HTML fragment (eval table, curves, sheet, top examples).
    Usage: ``page_body += sae_panel("runs/sae-x")``."""
    run_dir = Path(run_dir)
    notices = [] if notices is None else notices
    summary = _read(run_dir / "summary.json", notices) or {}
    parts = []
    ev = summary.get("eval")
    if isinstance(ev, dict):
        train = summary.get("train", {})
        cfg = summary.get("sae", {})
        desc = (
            f"{html.escape(str(cfg.get('architecture', '?')))}, {cfg.get('n_latents', '?')} latents"
            f"{', k = ' + str(cfg.get('k')) if cfg.get('architecture') in ('topk', 'batchtopk') else ''}"
            f"{', transcoder' if cfg.get('d_out') else ''}; {train.get('steps', '?')} steps, "
            f"{train.get('tokens', '?')} tokens, {train.get('seconds', '?')} s"
        )
        parts.append(
            f"<section><h2>Evaluation (held-out windows)</h2><p class='muted'>{desc}</p>{eval_table_html(ev)}</section>"
        )
    curve = curve_png(run_dir / "metrics.csv")
    if curve:
        parts.append(
            f"<section><h2>Training</h2><img alt='training curves' src='data:image/png;base64,{curve}'></section>"
        )
    elif (run_dir / "metrics.csv").exists():
        notices.append("metrics.csv is unreadable: the training curves are left out")
    topo = summary.get("topographic")
    if isinstance(topo, dict):
        parts.append(f"<section><h2>Topographic sheet</h2>{topographic_html(topo)}</section>")
    sheet = run_dir / "sheet.png"
    if sheet.is_file():
        b64 = base64.b64encode(sheet.read_bytes()).decode()
        parts.append(
            "<section class='wide'><h2>Latent sheet</h2><img alt='latent sheet' "
            f"src='data:image/png;base64,{b64}'></section>"
        )
    top = _read(run_dir / "top_examples.json", notices) if (run_dir / "top_examples.json").exists() else None
    if isinstance(top, dict) and top.get("latents"):
        parts.append(
            f"<section class='wide'><h2>Top-activating contexts per latent</h2>"
            f"{examples_html(top['latents'], max_latents)}</section>"
        )
    return "".join(parts)


def build_sae_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a self-contained ``report.html`` for a ``topotorch sae`` run folder; return its path.
    Usage: ``build_sae_report("runs/sae-x")``."""
    run_dir = Path(run_dir)
    if not is_sae_run(run_dir):
        raise ValueError(f"{run_dir} is not a `topotorch sae` run folder")
    notices: list[str] = []
    body = sae_panel(run_dir, notices)
    summary = _read(run_dir / "summary.json", []) or {}
    title = f"SAE at {summary.get('hook', '?')} — {summary.get('source', run_dir.name)}"
    notes = "".join(f"<p class='notice'>{html.escape(n)}</p>" for n in notices)
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><header><h1>{html.escape(title)}</h1></header>"
        f"{notes}<main>{body}</main></body></html>"
    )
    path = Path(out) if out is not None else run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
