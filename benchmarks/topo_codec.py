"""Image-codec storage of topographic vs baseline sheets: bytes vs held-out loss (WebP and JPEG).

Trains the digits MLP 64-100-100-10 at τ = 0 and τ = ``--tau`` (TopoLoss on both hidden 10x10
sheets, φ = 3, 1500 steps, as ``topo_sweep.py``), stores both hidden layers through the codec at
several qualities (``topotorch.codec``: direction mosaic + float16 norms/biases), and reports, per
model, the fewest bytes whose held-out loss stays within 2% of the unstored model's, and the ratio.

    .venv/bin/python benchmarks/topo_codec.py --json results/topo_codec.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from topotorch.codec import codec_roundtrip
from topotorch.training import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tau", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--qualities", default="10,30,50,70,80,90,95,100")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    out = {"steps": a.steps, "models": {}}
    best = {}
    for tau in (0.0, a.tau):
        r = train(TrainConfig.for_task("digits", method="none", steps=a.steps, topo_tau=tau, topo_layers="0,2",
                                       topo_factor=3.0, animation=False, progress=False, log_every=a.steps))
        m, d = r.model, r.data
        with torch.no_grad():
            base = float(F.cross_entropy(m(d.x_test), d.y_test))
        rows = []
        for fmt in ("webp", "jpeg"):
            for q in [int(v) for v in a.qualities.split(",")]:
                c, rep = codec_roundtrip(m, "0,2", q, fmt)
                with torch.no_grad():
                    loss = float(F.cross_entropy(c(d.x_test), d.y_test))
                rows.append({"fmt": fmt, "quality": q, "bytes": rep["bytes"], "raw_bytes": rep["raw_bytes"],
                             "test_loss": round(loss, 4), "rise": round(loss / base - 1, 4)})
        ok = [row for row in rows if row["rise"] <= 0.02]
        best[tau] = min(ok, key=lambda row: row["bytes"]) if ok else None
        out["models"][f"tau{tau:g}"] = {"test_loss": round(base, 4), "rows": rows, "best_within_2pct": best[tau]}
        b = best[tau]
        print(f"τ={tau:g}: loss {base:.4f}, raw float32 {rows[0]['raw_bytes']} B; fewest bytes within 2%: "
              + (f"{b['bytes']} B ({b['fmt']} q{b['quality']}, loss {b['test_loss']:.4f})" if b else "none"), flush=True)
    if best[0.0] and best[a.tau]:
        out["baseline_over_topographic"] = round(best[0.0]["bytes"] / best[a.tau]["bytes"], 2)
        print(f"baseline / topographic bytes at equal loss (within 2%): {out['baseline_over_topographic']}x")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
