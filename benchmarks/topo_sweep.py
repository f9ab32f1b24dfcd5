"""TopoNets on real digits: τ sweep (held-out loss, smoothness, effective dimensionality) and
topographic compression (50% / 80% of the hidden units removed) against the τ = 0 baseline.

Trains the digits MLP 64-100-100-10 (method none: no wiring cost) with TopoLoss on both hidden
layers (10x10 sheets), then for each model: held-out cross-entropy and accuracy, smoothness of the
class-selectivity t-maps of both hidden layers (mean), effective dimensionality (participation
ratio) of their activations, and the held-out loss after cutting the hidden sheets to a coarse grid
(``topotorch.compression.topographic``: coarse sheet, then the reading layer refit by least squares on the
training inputs). Writes maps of the last model under ``--maps``.

    .venv/bin/python benchmarks/topo_sweep.py --json results/topo_sweep.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from topotorch.analysis.maps import draw_maps, effective_dimensionality, layer_activations, selectivity_maps, smoothness
from topotorch.compression.topographic import compress, parameter_count
from topotorch.objectives.topoloss import TopoLoss
from topotorch.training import TrainConfig, train

LAYERS = ["0", "2"]


@torch.no_grad()
def held_out(model, x, y) -> tuple[float, float]:
    out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(-1) == y).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--taus", default="0,1,5,20")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", default="area", help="compression resampling: nearest | bilinear | area")
    ap.add_argument("--maps", type=Path, default=None, help="folder for selectivity-map PNGs")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rows = []
    for tau in [float(t) for t in a.taus.split(",")]:
        t0 = time.perf_counter()
        cfg = TrainConfig.for_task(
            "digits",
            method="none",
            steps=a.steps,
            seed=a.seed,
            topo_tau=tau,
            topo_layers=",".join(LAYERS),
            topo_factor=a.factor,
            animation=False,
            progress=False,
            log_every=a.steps,
        )
        r = train(cfg)
        model, d = r.model, r.data
        loss, acc = held_out(model, d.x_test, d.y_test)
        sm, ed = [], []
        for name in LAYERS:
            acts = layer_activations(model, name, d.x_test)
            t = selectivity_maps(acts, d.y_test)
            sm.append(smoothness(t, 10, 10))
            ed.append(effective_dimensionality(acts))
            if a.maps:
                draw_maps(
                    t,
                    10,
                    10,
                    a.maps / f"digits_tau{tau:g}_layer{name}.png",
                    titles=[f"digit {c}" for c in range(10)],
                    suptitle=f"digits τ={tau:g} layer {name}: t-maps, smoothness {sm[-1]:.2f}",
                )
        row = {
            "tau": tau,
            "test_loss": round(loss, 4),
            "test_accuracy": round(acc, 4),
            "smoothness": round(sum(sm) / len(sm), 3),
            "effective_dim": round(sum(ed) / len(ed), 2),
            "topo_loss": round(TopoLoss(model, ",".join(LAYERS), factor=a.factor)().item(), 4),
            "params": parameter_count(model),
        }
        for removed in (0.5, 0.8):
            small = compress(model, LAYERS, removed=removed, mode=a.mode, calibrate=d.x_train)
            cl, ca = held_out(small, d.x_test, d.y_test)
            k = f"removed{int(removed * 100)}"
            row[k] = {
                "units": [small.get_submodule(n).out_features for n in LAYERS],
                "test_loss": round(cl, 4),
                "test_accuracy": round(ca, 4),
                "loss_rise": round(cl / loss - 1, 3),
                "params": parameter_count(small),
            }
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(
            f"τ={tau:<5g} loss {loss:.4f} acc {acc:.3f} smooth {row['smoothness']:.3f} ED {row['effective_dim']:.2f} "
            f"topo {row['topo_loss']:.3f} | 50% cut: loss {row['removed50']['test_loss']:.4f} "
            f"({row['removed50']['loss_rise']:+.1%}) | 80% cut: loss {row['removed80']['test_loss']:.4f} "
            f"({row['removed80']['loss_rise']:+.1%}) acc {row['removed80']['test_accuracy']:.3f} [{row['seconds']}s]",
            flush=True,
        )
    base = rows[0]
    for r in rows[1:]:
        if base["tau"] == 0 and r["removed80"]["loss_rise"] > 0:
            r["baseline_rise_ratio_80"] = round(base["removed80"]["loss_rise"] / r["removed80"]["loss_rise"], 2)
            print(
                f"80% cut: baseline loss rise {base['removed80']['loss_rise']:+.1%} is "
                f"{r['baseline_rise_ratio_80']}x τ={r['tau']:g}'s {r['removed80']['loss_rise']:+.1%}"
            )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"steps": a.steps, "factor": a.factor, "mode": a.mode, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
