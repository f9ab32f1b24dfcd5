"""Report generation time for a 784-100-100-10 network (the paper's MNIST net): goal <= 10 s.

Builds an untrained 784-100-100-10 MLP on a 28x28 input grid (its weights dense, so all
89,400 connections compete for the 5,000 drawn), saves it as a run folder, and times
``build_report`` (community detection, ablations, GraphML/JSON export, HTML) end to end.

    python benchmarks/bench_report.py --json results/bench_report.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from topotorch.checkpoint import save_checkpoint
from topotorch.models import MLP
from topotorch.report import build_report
from topotorch.tasks import Task, TaskData, register_task
from topotorch.training import TrainConfig, build

GOAL_SECONDS = 10.0


@register_task
def mnist_shape() -> Task:
    def make_data(seed: int, dtype: torch.dtype) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(2000, 784, generator=g).to(dtype)
        y = torch.randint(0, 10, (2000,), generator=g)
        return TaskData(x[:1000], y[:1000], x[1000:], y[1000:])

    return Task(
        name="mnist-shape",
        description="random data on a 784-100-100-10 net (benchmark only)",
        make_data=make_data,
        make_model=lambda: MLP([784, 100, 100, 10]),
        loss="mse_onehot",
        layouts={"input": "grid:28x28", "hidden1": "grid:10x10", "hidden2": "grid:10x10", "output": "circle"},
        output_labels=[str(i) for i in range(10)],
        defaults=dict(steps=1, lr=1e-3, l0=0.5, wf=2.0, agg="mean", threshold=0.05, dtype="float32"),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-edges", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "mnist-shape"
        run.mkdir()
        cfg = TrainConfig.for_task("mnist-shape", out=str(run), progress=False, animation=False)
        _task, model, graph = build(cfg)
        (run / "config.json").write_text(json.dumps(cfg.to_dict()))
        save_checkpoint(run / "checkpoint", model, None, graph, step=0, extra={})
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            path = build_report(run, max_edges=args.max_edges)
            times.append(time.perf_counter() - t)
        size = path.stat().st_size
        figures = json.loads((run / "report.json").read_text())
    best, worst = min(times), max(times)
    print(
        f"784-100-100-10 report: best {best:.2f} s, worst {worst:.2f} s over {args.repeats} "
        f"(goal <= {GOAL_SECONDS} s); "
        f"{args.max_edges} of 89400 edges drawn, {size / 1e6:.1f} MB HTML, Q={figures['q']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "net": "784-100-100-10",
                    "max_edges": args.max_edges,
                    "seconds": times,
                    "best_seconds": best,
                    "worst_seconds": worst,
                    "goal_seconds": GOAL_SECONDS,
                    "goal_met": worst <= GOAL_SECONDS,
                    "html_bytes": size,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
