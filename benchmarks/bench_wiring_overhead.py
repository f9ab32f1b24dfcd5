"""Wiring-cost overhead per training step: task step vs task + λ·wiring-cost step.

Both steps are forward, backward and AdamW update on the task's full training batch, with the
task's reference dtype; the same model and data are used, interleaved in rounds so machine
noise hits both alike. Prints the overhead ratio per task.

    python benchmarks/bench_wiring_overhead.py [--tasks independence,modular-addition,digits] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from topotorch.objectives.wiring import add_wiring_grad_, wiring_cost
from topotorch.timing import compare
from topotorch.training import DTYPES, TrainConfig, build, task_loss


def step_time(task, model, opt, x, y, graph=None, cfg=None, mode="plain", lam=1e-3, n=200) -> float:
    """Mean seconds per step. mode: plain | closed (the trainer's closed-form penalty gradient) | autograd."""
    t = time.perf_counter()
    for _ in range(n):
        loss = task_loss(task, model(x), y)
        if mode == "autograd":
            loss = loss + lam * wiring_cost(graph, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if mode == "closed":
            add_wiring_grad_(graph, cfg, lam)
        opt.step()
    return (time.perf_counter() - t) / n


def measure(task_name: str, rounds: int, n: int) -> dict:
    cfg = TrainConfig.for_task(task_name, progress=False)
    task, model, graph = build(cfg)
    data = task.make_data(0, DTYPES[cfg.dtype])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    wcfg = cfg.wiring(train=True)
    x, y = data.x_train, data.y_train
    # warm-up, then the three step kinds interleaved, n steps per sample (timing.compare)
    c = compare(
        {
            mode: (lambda m=mode: step_time(task, model, opt, x, y, graph, wcfg, m, n=n))
            for mode in ("plain", "closed", "autograd")
        },
        reps=rounds,
        warmup=1,
    )
    med = {k: c.median(k) / n for k in c.sides}
    return {
        "task": task_name,
        "batch": len(x),
        "dtype": cfg.dtype,
        "plain_step_ms": med["plain"] * 1e3,
        "wiring_step_ms": med["closed"] * 1e3,
        "autograd_wiring_step_ms": med["autograd"] * 1e3,
        "overhead": med["closed"] / med["plain"] - 1.0,
        "autograd_overhead": med["autograd"] / med["plain"] - 1.0,
        "overhead_iqr": [v - 1.0 for v in c.ratio_range("closed", "plain")],
        "timing": c.as_dict(),
        "note": "timing medians are per sample of `steps` steps",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="independence,modular-addition,digits")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = [measure(t, args.rounds, args.steps) for t in args.tasks.split(",")]
    print(
        f"{'task':18s} {'batch':>6s} {'plain ms':>9s} {'+wiring ms':>11s} {'overhead':>9s}   "
        f"{'(autograd penalty)':>18s}"
    )
    for r in results:
        print(
            f"{r['task']:18s} {r['batch']:6d} {r['plain_step_ms']:9.3f} {r['wiring_step_ms']:11.3f} "
            f"{r['overhead']:+9.1%}   {r['autograd_overhead']:+18.1%}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
