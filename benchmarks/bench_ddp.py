"""Scaling out on this machine: steps/second from 1 to 2 processes (torchrun, gloo, DDP), and the
DiLoCo local-update option's bytes communicated per step and test accuracy against DDP at equal steps.

Every configuration is one real command line, exactly what a user runs:

    torchrun --nproc_per_node W -m topotorch train digits --batch-size B --steps S [--local-steps H] ...

Steps/second is the training loop only (``train_seconds`` of summary.json: no start-up, no pictures).
Bytes per step are what each rank puts into collectives (gradient all-reduce for DDP; one pseudo-gradient
all-reduce every H steps for DiLoCo; relocation broadcasts; divergence checks), from summary.json.

    python benchmarks/bench_ddp.py                        # digits, 600 steps, global batch 1024
    python benchmarks/bench_ddp.py --steps 300 --json runs/bench_ddp.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, threads: int, local_steps: int, args, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(world),
        "--master_port",
        str(free_port()),
        "-m",
        "topotorch",
        "train",
        args.task,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--swap-every",
        str(args.swap_every),
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
        "--no-animation",
        "--no-progress",
        "--out",
        str(out),
    ]
    if local_steps:
        cmd += ["--local-steps", str(local_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    metric = next(k for k in s if k.startswith("test_") and not k.startswith("thresholded"))
    return {
        "processes": world,
        "threads_per_process": threads,
        "local_steps": local_steps,
        "mode": "single" if world == 1 and not local_steps else ("DiLoCo" if local_steps else "DDP"),
        "steps_per_second": round(args.steps / s["train_seconds"], 1),
        "train_seconds": s["train_seconds"],
        "wall_seconds_incl_startup": round(wall, 2),
        "comm_bytes_per_step": s["comm_bytes_per_step"],
        metric: round(s[metric], 4),
        "wiring_cost": round(s["wiring_cost"], 4),
        "command": f"OMP_NUM_THREADS={threads} torchrun --nproc_per_node {world} -m topotorch train "
        + " ".join(cmd[cmd.index("train") + 1 :]).replace(str(out), "OUT"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=1024, help="global batch (split across processes)")
    ap.add_argument("--swap-every", type=int, default=100)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--diloco", default="10,50", help="local-step counts H to compare with DDP ('' to skip)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    configs = [(1, 1, 0), (1, 2, 0), (2, 1, 0)] + [(2, 1, int(h)) for h in args.diloco.split(",") if h]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (world, threads, h) in enumerate(configs):
            r = run(world, threads, h, args, Path(tmp) / f"run{i}")
            rows.append(r)
            print(
                f"{r['mode']:7s} processes={world} threads={threads} H={h:3d}  {r['steps_per_second']:7.1f} steps/s  "
                f"{r['comm_bytes_per_step']:10.0f} B/step  "
                + "  ".join(f"{k}={v}" for k, v in r.items() if k.startswith("test_")),
                flush=True,
            )
    base = next(r for r in rows if r["mode"] == "single" and r["threads_per_process"] == 1)
    ddp = next(r for r in rows if r["mode"] == "DDP")
    for r in rows:
        r["speedup_vs_1_process_1_thread"] = round(r["steps_per_second"] / base["steps_per_second"], 2)
        if r["mode"] == "DiLoCo":
            r["comm_saved_vs_ddp"] = round(1 - r["comm_bytes_per_step"] / ddp["comm_bytes_per_step"], 4)
    print(f"2-process DDP: {ddp['speedup_vs_1_process_1_thread']}x the steps/s of 1 process (1 thread)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "settings": vars(args) | {"json": str(args.json)},
                    "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(),
                    "runs": rows,
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
