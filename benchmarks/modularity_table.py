"""Modularity Q of BIMT vs baseline (``--method none``) runs on independence, modular addition and digits.

Trains each (task, method) with the task's reference settings (reusing finished run folders
under ``--runs``), then detects communities on the weighted connectivity graph (all weights,
and weights above the run's threshold) and prints Q side by side.

    python benchmarks/modularity_table.py --runs runs/see --json results/modularity_table.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from topotorch.analysis.modularity import detect_communities
from topotorch.training import TrainConfig, load_run, train

TASKS = ("independence", "modular-addition", "digits")


def q_of(run_dir: Path, task: str, method: str) -> dict:
    if not (run_dir / "summary.json").exists():
        train(TrainConfig.for_task(task, method=method, out=str(run_dir), progress=False, animation=False))
    r = load_run(run_dir)
    t = time.perf_counter()
    c_all = detect_communities(r.graph, threshold=0.0)
    c_thr = detect_communities(r.graph, threshold=r.config.threshold)
    return {
        "task": task,
        "method": method,
        "steps": r.config.steps,
        "q": c_all.q,
        "communities": c_all.n_communities,
        "q_thresholded": c_thr.q,
        "communities_thresholded": c_thr.n_communities,
        "threshold": r.config.threshold,
        "backend": c_all.backend,
        "test": r.summary.get(f"test_{r.task.metric}"),
        "metric": r.task.metric,
        "detect_seconds": round(time.perf_counter() - t, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/modularity", help="run folders TASK-METHOD (trained when missing)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for task in args.tasks.split(","):
        for method in ("bimt", "none"):
            rows.append(q_of(Path(args.runs) / f"{task}-{method}", task, method))
    print(f"{'task':18s} {'Q bimt':>8s} {'Q none':>8s} {'Q bimt |w|>thr':>15s} {'Q none |w|>thr':>15s}")
    for task in args.tasks.split(","):
        b, n = [r for r in rows if r["task"] == task]
        print(f"{task:18s} {b['q']:8.3f} {n['q']:8.3f} {b['q_thresholded']:15.3f} {n['q_thresholded']:15.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
