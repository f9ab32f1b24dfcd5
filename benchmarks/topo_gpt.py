"""TopoNets on the shakespeare-char GPT: τ sweep (held-out bits/char, smoothness, effective
dimensionality) and compression of every block's c_fc (``*.mlp.0``, a 16x32 sheet) at 50% / 80%.

Short runs on purpose (CPU): the same steps and seed for every τ, method none (no wiring cost).
Smoothness is that of the token-selectivity t-maps (each of the 10 most frequent input characters
vs the rest, every held-out position), averaged over the c_fc sheets; compression refits each
block's c_proj by least squares on 256 training windows.

    .venv/bin/python benchmarks/topo_gpt.py --json results/topo_gpt.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from topotorch.analysis.maps import draw_maps, effective_dimensionality, layer_activations, selectivity_maps, smoothness
from topotorch.compression.topographic import compress, parameter_count
from topotorch.sheets import find_sheets
from topotorch.training import TrainConfig, evaluate, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--taus", default="0,10")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mode", default="area")
    ap.add_argument("--maps", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rows = []
    for tau in [float(t) for t in a.taus.split(",")]:
        t0 = time.perf_counter()
        cfg = TrainConfig.for_task(
            "shakespeare-char",
            method="none",
            steps=a.steps,
            lr=a.lr,
            topo_tau=tau,
            topo_layers="*.mlp.0",
            topo_factor=a.factor,
            animation=False,
            progress=False,
            log_every=a.steps,
        )
        r = train(cfg)
        model, d, task = r.model, r.data, r.task
        bpc = evaluate(task, model, d.x_test, d.y_test)
        labels = d.x_test.reshape(-1)
        vals, counts = labels.unique(return_counts=True)
        chosen = vals[counts.argsort(descending=True)][:10].sort().values.tolist()
        sm, ed = [], []
        for s in find_sheets(model, "*.mlp.0"):
            acts = layer_activations(model, s.name, d.x_test)
            t = selectivity_maps(acts, labels, chosen)
            sm.append(smoothness(t, s.h, s.w))
            ed.append(effective_dimensionality(acts))
            if a.maps and s.name.endswith("blocks.0.mlp.0"):
                draw_maps(
                    t,
                    s.h,
                    s.w,
                    a.maps / f"gpt_tau{tau:g}_{s.name}.png",
                    titles=[repr(task.output_labels[c]) for c in chosen],
                    suptitle=f"shakespeare-char τ={tau:g} {s.name}: smoothness {sm[-1]:.2f}",
                )
        row = {
            "tau": tau,
            "test_bpc": round(bpc, 4),
            "smoothness": round(sum(sm) / len(sm), 3),
            "effective_dim": round(sum(ed) / len(ed), 2),
            "topo_loss": r.summary.get("topo_loss"),
            "params": parameter_count(model),
        }
        for removed in (0.5, 0.8):
            small = compress(model, "*.mlp.0", removed=removed, mode=a.mode, calibrate=d.x_train[:256])
            cb = evaluate(task, small, d.x_test, d.y_test)
            row[f"removed{int(removed * 100)}"] = {
                "test_bpc": round(cb, 4),
                "rise": round(cb / bpc - 1, 4),
                "params": parameter_count(small),
            }
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(
            f"τ={tau:<5g} bpc {bpc:.4f} smooth {row['smoothness']:.3f} ED {row['effective_dim']:.2f} | "
            f"50% cut: {row['removed50']['test_bpc']:.4f} ({row['removed50']['rise']:+.1%}) | 80% cut: "
            f"{row['removed80']['test_bpc']:.4f} ({row['removed80']['rise']:+.1%}) [{row['seconds']}s]",
            flush=True,
        )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"steps": a.steps, "factor": a.factor, "lr": a.lr, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
