"""Accuracy vs sparsity on digits and MNIST-1D: BIMT, L1 and the pruning baselines, medians of 3 seeds.

Runs ``topotorch sweep-sparsity`` for each task with one thread and writes
``results/sparsity/<task>/`` (sweep.csv, table.md, sweep.png, summary.json), then prints the tables.

    python benchmarks/sparsity_sweep.py                       # both tasks, the settings of the README table
    python benchmarks/sparsity_sweep.py --tasks digits --cycle-steps 500 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from topotorch.experiments.sweep import METHODS, SweepConfig, run_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,mnist1d")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sparsities", default="0.5,0.8,0.9,0.95,0.98")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dense-steps", type=int, default=None, help="T (default: each task's steps)")
    ap.add_argument("--cycle-steps", type=int, default=2000, help="R")
    ap.add_argument("--soup-size", type=int, default=3)
    ap.add_argument("--out", default="results/sparsity")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for task in args.tasks.split(","):
        out = Path(args.out) / task
        run_sweep(
            SweepConfig(
                task,
                methods=args.methods,
                sparsities=args.sparsities,
                seeds=args.seeds,
                out=str(out),
                dense_steps=args.dense_steps,
                cycle_steps=args.cycle_steps,
                soup_size=args.soup_size,
            )
        )
        print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
