"""Image-codec storage of topographic vs baseline sheets: bytes vs held-out loss (WebP, JPEG, AVIF).

For each ``--configs`` entry TASK:TAU:PHI, trains the task's MLP at τ = 0 and τ = TAU (TopoLoss on
both hidden sheets, φ = PHI, ``--steps`` steps, seed ``--seed``), stores both hidden layers through
the *same* codec pipeline (``topotorch.compression.codec``: direction mosaic + 8-bit norms/biases/plane ranges)
at every format and quality, and reports, per model, the fewest bytes whose held-out loss stays
within 2% of the unstored model's, and the baseline/topographic ratio. Two selections:

* ``best``: the fewest bytes of any (format, quality) whose loss rise is <= 2%;
* ``monotone``: the fewest bytes of a (format, quality) such that every higher quality of that
  format also stays within 2% (no lucky dip of a noisy loss-vs-quality curve).

    .venv/bin/python benchmarks/topo_codec.py --json results/topo_codec.json        # ≈ 8 min on 1 thread
    .venv/bin/python benchmarks/topo_codec.py --configs digits-wide:20:4,digits-wide:50:4 --seed 1 \
        --json results/topo_codec_seed1.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from topotorch.compression.codec import available_formats, codec_roundtrip
from topotorch.training import TrainConfig, train

QUALITIES = "1,3,5,8,10,12,15,20,25,30,35,40,45,50,55,60,65,70,75,80,85,90,95,100"


def select(rows: list[dict], monotone: bool) -> dict | None:
    ok = []
    for row in rows:
        if row["rise"] > 0.02:
            continue
        if monotone and any(r["rise"] > 0.02 for r in rows if r["fmt"] == row["fmt"] and r["quality"] > row["quality"]):
            continue
        ok.append(row)
    return min(ok, key=lambda row: row["bytes"]) if ok else None


def run_config(task: str, tau: float, phi: float, a: argparse.Namespace) -> dict:
    out = {"task": task, "tau": tau, "phi": phi, "models": {}}
    for t in (0.0, tau):
        r = train(
            TrainConfig.for_task(
                task,
                method="none",
                steps=a.steps,
                topo_tau=t,
                topo_layers="0,2",
                seed=a.seed,
                topo_factor=phi,
                animation=False,
                progress=False,
                log_every=a.steps,
            )
        )
        m, d = r.model, r.data
        with torch.no_grad():
            base = float(F.cross_entropy(m(d.x_test), d.y_test))
            acc = float((m(d.x_test).argmax(1) == d.y_test).float().mean())
        rows = []
        for fmt in a.formats:
            for q in a.qualities:
                c, rep = codec_roundtrip(m, "0,2", q, fmt, a.side)
                with torch.no_grad():
                    loss = float(F.cross_entropy(c(d.x_test), d.y_test))
                    cacc = float((c(d.x_test).argmax(1) == d.y_test).float().mean())
                rows.append(
                    {
                        "fmt": fmt,
                        "quality": q,
                        "bytes": rep["bytes"],
                        "raw_bytes": rep["raw_bytes"],
                        "test_loss": round(loss, 4),
                        "accuracy": round(cacc, 4),
                        "rise": round(loss / base - 1, 4),
                    }
                )
        raw = rows[0]["raw_bytes"]
        res = {"test_loss": round(base, 4), "accuracy": round(acc, 4), "raw_bytes": raw, "rows": rows}
        for sel in ("best", "monotone"):
            b = select(rows, sel == "monotone")
            res[sel] = b
            print(
                f"{task} τ={t:g} φ={phi:g}: loss {base:.4f} acc {acc:.3f}, raw float32 {raw} B; {sel}: "
                + (
                    f"{b['bytes']} B ({b['fmt']} q{b['quality']}, loss {b['test_loss']:.4f}, "
                    f"{raw / b['bytes']:.1f}x below float32)"
                    if b
                    else "none"
                ),
                flush=True,
            )
        out["models"][f"tau{t:g}"] = res
    for sel in ("best", "monotone"):
        b0, bt = out["models"]["tau0"][sel], out["models"][f"tau{tau:g}"][sel]
        if b0 and bt:
            out[f"baseline_over_topographic_{sel}"] = round(b0["bytes"] / bt["bytes"], 2)
            print(
                f"{task} ({sel}): baseline / topographic bytes at equal loss (within 2%): "
                f"{b0['bytes']} / {bt['bytes']} = {out[f'baseline_over_topographic_{sel}']}x",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--configs",
        default="digits:5:3,digits:20:3,digits-wide:20:4,digits-wide:50:4",
        help="comma-separated TASK:TAU:PHI (the baseline τ = 0 is trained for each)",
    )
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qualities", default=QUALITIES)
    ap.add_argument("--formats", default=",".join(available_formats()))
    ap.add_argument("--side", default="uint8", choices=["uint8", "float16"])
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    a.qualities = [int(v) for v in a.qualities.split(",")]
    a.formats = [f for f in a.formats.split(",") if f]
    out = {"steps": a.steps, "seed": a.seed, "side": a.side, "formats": a.formats, "configs": []}
    for spec in a.configs.split(","):
        task, tau, phi = spec.split(":")
        out["configs"].append(run_config(task, float(tau), float(phi), a))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
