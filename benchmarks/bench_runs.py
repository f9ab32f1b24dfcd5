"""Whole training runs with the tasks' reference settings: wall time and the figures each task is judged by.

Each run is exactly what ``topotorch train TASK --out DIR`` does (training, relocations,
summary, connectivity picture, GIF and MP4), timed end to end in this process. Prints,
per task, the wall time against its time goal and the test metric (plain and thresholded)
against the task's goal; ``--json`` writes the figures, including each run's summary.

    python benchmarks/bench_runs.py                          # independence + modular-addition (the timed goals)
    python benchmarks/bench_runs.py --tasks all --json runs/bench_runs.json
    python benchmarks/bench_runs.py --tasks independence --method none
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from topotorch.tasks import TASKS
from topotorch.training import TrainConfig, train

# seconds for the whole run, pictures included (the foundation issue's goals)
TIME_GOALS = {"independence": 30.0, "modular-addition": 300.0}


def run_one(task: str, method: str, seed: int, out_root: Path) -> dict:
    cfg = TrainConfig.for_task(task, method=method, seed=seed, progress=False, out=str(out_root / f"{task}-{method}"))
    t = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t
    s = result.summary
    metric = result.task.metric
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "wall_seconds": round(wall, 2),
        "time_goal_seconds": TIME_GOALS.get(task),
        "metric": metric,
        "test": s[f"test_{metric}"],
        "thresholded_test": s[f"thresholded_test_{metric}"],
        "goal": s["goal"],
        "goal_met": s["goal_met"],
        "thresholded_goal_met": s["thresholded_goal_met"],
        "active_weight_fraction": s["active_weights"]["fraction"],
        "n_modules": s["n_modules"],
        "n_modules_below_output": s["n_modules_below_output"],
        "summary": s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="independence,modular-addition", help="comma-separated, or 'all'")
    ap.add_argument("--method", default="bimt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tasks = sorted(TASKS) if args.tasks == "all" else args.tasks.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        results = []
        for task in tasks:
            r = run_one(task, args.method, args.seed, root)
            results.append(r)
            goal = r["time_goal_seconds"]
            timing = f"{r['wall_seconds']:7.1f} s" + (
                f" (goal <= {goal:.0f} s: {r['wall_seconds'] / goal:.2f}x)" if goal else ""
            )
            print(
                f"{task:18s} [{args.method}] {timing:32s} test {r['metric']}={r['test']:.4g} "
                f"thresholded={r['thresholded_test']:.4g} goal {r['goal'][1]} {r['goal'][2]} met={r['goal_met']}/"
                f"{r['thresholded_goal_met']} active={r['active_weight_fraction']:.1%} modules={r['n_modules']}",
                flush=True,
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
