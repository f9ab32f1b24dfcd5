"""In-context linear regression: train (or load) the paper's transformer and probe its residual stream for w.

Prints the test MSE (and the thresholded net's), the active weights, and per layer the residual
neurons whose activations correlate with the hidden slope w at |r| >= 0.9 (neurons that carry
no signal are ignored, see ``probe_residual``). Goal: MSE <= 1e-2, <= 4 such neurons.

    python benchmarks/in_context_probe.py --out runs/icr --json results/in_context_probe.json
    python benchmarks/in_context_probe.py --run runs/icr          # probe an existing run
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from topotorch.tasks.sequence import in_context_data, probe_residual
from topotorch.training import TrainConfig, load_run, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="probe this finished run instead of training")
    ap.add_argument("--out", default="runs/icr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (float32 results depend on it)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    if args.run:
        r = load_run(args.run)
    else:
        r = train(TrainConfig.for_task("in-context-regression", seed=args.seed, out=args.out, animation=False))
    x, _, w = in_context_data(2048, torch.Generator().manual_seed(7), torch.float32)
    probes = probe_residual(r.model, x, w)
    layers = {
        k: {"neurons": [int(i) for i in (v.abs() >= 0.9).nonzero().flatten()], "max_abs_r": float(v.abs().max())}
        for k, v in probes.items()
    }
    res = {
        "run": args.run or args.out,
        "seconds": round(time.perf_counter() - t, 1),
        "test_mse": r.summary.get("test_mse"),
        "thresholded_test_mse": r.summary.get("thresholded_test_mse"),
        "active_weight_fraction": r.summary.get("active_weights", {}).get("fraction"),
        "probe": layers,
    }
    print(
        f"test MSE {res['test_mse']:.3g} (thresholded {res['thresholded_test_mse']:.3g}), "
        f"{res['active_weight_fraction']:.1%} of weights active"
    )
    for k, v in layers.items():
        print(
            f"  after {k:9s}: {len(v['neurons'])} residual neurons with |r(w)| >= 0.9 {v['neurons']} "
            f"(max |r| {v['max_abs_r']:.3f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
