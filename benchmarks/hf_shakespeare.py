"""Hugging Face GPT-2 (4 layers, d = 128, 4 heads) on tinyshakespeare through the CLI: plain AdamW vs BIMT
vs TopoLoss at equal steps and seed; bits/char, bits/char with |w| <= threshold zeroed, and what
`topotorch compress` (shrink through the flow graph) removes: parameters, MLP neurons, attention dims/heads.

Each run is `topotorch train text:FILE --model hf:gpt2 --model-config n_layer=4,n_embd=128,n_head=4`
with --method none (plain), --method bimt --lam L, or --method none --topo-tau T --topo-factor F
(TopoLoss on the auto layers: every block's mlp.c_fc, 512 units = a 16x32 sheet), then
`topotorch.experiments.compress.compress_run` (= `topotorch compress RUN [--threshold T]`: RUN/compact/report.json
at the run's threshold 0.05, RUN/compact-T/ at each extra T). At most two runs train at a time.

    python benchmarks/hf_shakespeare.py --steps 1000 --json results/hf_shakespeare.json
    python benchmarks/hf_shakespeare.py --reuse --json results/hf_shakespeare.json   # table from finished runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CONFIG = "n_layer=4,n_embd=128,n_head=4"


def topotorch() -> list[str]:
    exe = Path(sys.executable).with_name("topotorch")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "topotorch"]


def train_args(args, name: str) -> list[str]:
    method = {
        "plain": ["--method", "none"],
        "bimt": ["--method", "bimt", "--lam", args.lam],
        "topo": ["--method", "none", "--topo-tau", str(args.tau), "--topo-factor", str(args.factor)],
    }[name]
    return [
        *topotorch(),
        "train",
        f"text:{args.text}",
        "--model",
        "hf:gpt2",
        "--model-config",
        CONFIG,
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--log-every",
        str(args.log_every),
        "--no-animation",
        "--no-progress",
        "--overwrite",
        *method,
        "--out",
        str(Path(args.out) / name),
    ]


def run_all(cmds: dict[str, list[str]], parallel: int) -> dict[str, float]:
    """Run the commands, ``parallel`` at a time; wall seconds per command."""
    todo, running, wall = list(cmds.items()), {}, {}
    while todo or running:
        while todo and len(running) < parallel:
            name, cmd = todo.pop(0)
            print("$", " ".join(cmd), flush=True)
            log = open(Path(cmd[cmd.index("--out") + 1]).with_suffix(".log"), "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.perf_counter(), log)
        time.sleep(2)
        for name, (p, t0, log) in list(running.items()):
            if p.poll() is not None:
                log.close()
                if p.returncode:
                    raise SystemExit(f"{name} failed (exit {p.returncode}); see {log.name}")
                wall[name] = time.perf_counter() - t0
                del running[name]
    return wall


HEAD_DIM = 128 // 4  # n_embd // n_head: GPT2Attention heads keep one width, so shrink removes whole heads


def shrink_figures(rep: dict) -> dict:
    """What a compress report (shrink through the flow graph) removed: parameters, MLP neurons, attention heads."""
    removed, kept = rep["removed"], rep["kept"]
    mlp = [k for k in removed if k.endswith(".mlp.c_fc")]
    attn = [k for k in removed if k.endswith(".attn.c_attn")]
    dims = sum(removed[k] for k in attn)
    return {
        "threshold": rep["threshold"],
        "thresholded_test_bpc": rep["test_bpc_thresholded"],
        "shrunk_test_bpc": rep["test_bpc_compact"],
        "max_abs_diff_shrunk_vs_thresholded": rep["max_abs_diff"],
        "params_before": rep["params_before"],
        "params_after": rep["params_after"],
        "params_removed": rep["params_before"] - rep["params_after"],
        "mlp_neurons_removed": sum(removed[k] for k in mlp),
        "mlp_neurons_total": sum(removed[k] + kept[k] for k in mlp),
        "heads_removed": dims // HEAD_DIM if dims % HEAD_DIM == 0 else None,
        "attn_dims_removed": dims,
        "heads_total": sum(removed[k] + kept[k] for k in attn) // HEAD_DIM,
        "residual_removed": sum(v for k, v in removed.items() if k.endswith(".wte")),
        "removed": removed,
        "kept_why": rep.get("kept_why"),
    }


def compress(run: Path, thresholds: list[float | None]) -> list[dict]:
    """compress_run at each threshold (None: the run's own, into RUN/compact; T: into RUN/compact-T)."""
    from topotorch.experiments.compress import compress_run

    reps = []
    for t in thresholds:
        folder = run / ("compact" if t is None else f"compact-{t:g}")
        if not (folder / "report.json").exists():
            print(f"compress {run} threshold {t if t is not None else 'of the run'} -> {folder}", flush=True)
            compress_run(run, threshold=t, out=folder)
        reps.append(json.loads((folder / "report.json").read_text()))
    return reps


def row(run: Path, name: str, wall: float | None, thresholds: list[float | None]) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    return {
        "name": name,
        "run": str(run),
        "method": config["method"],
        "lam": config["lam"] if config["method"] == "bimt" else None,
        "topo_tau": config["topo_tau"],
        "topo_factor": config["topo_factor"] if config["topo_tau"] else None,
        "topo_layers": sorted(summary["topo_loss"]) if summary.get("topo_loss") else None,
        "steps": config["steps"],
        "seed": config["seed"],
        "threads": config["threads"],
        "test_bpc": summary["test_bpc"],
        "wiring_cost": summary["wiring_cost"],
        "topo_loss": summary.get("topo_loss"),
        "active_weights": summary["active_weights"],
        "shrink": [shrink_figures(r) for r in compress(run, thresholds)],
        "train_seconds": summary.get("train_seconds"),
        "wall_seconds": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lam", default="0:5e-6", help="BIMT λ schedule (the text task's default)")
    ap.add_argument("--tau", type=float, default=10.0, help="TopoLoss τ (the README's TopoNets-on-GPT value)")
    ap.add_argument("--factor", type=float, default=4.0, help="TopoLoss blur φ")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=2, help="runs trained at the same time")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--methods", default="plain,bimt,topo")
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--out", default="runs/hf")
    ap.add_argument("--thresholds", default="0.01", help="extra shrink thresholds besides the run's own (0.05)")
    ap.add_argument(
        "--reuse", action="store_true", help="skip training: compress (if not yet) and tabulate finished runs"
    )
    ap.add_argument("--wall", default="", help="with --reuse: measured wall seconds per run, e.g. plain=987,bimt=969")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = args.methods.split(",")
    thresholds = [None] + [float(t) for t in args.thresholds.split(",") if t]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    if not args.reuse:
        for n in names:  # a fresh run gets fresh compress reports
            for f in (out / n).glob("compact*/report.json"):
                f.unlink()
        wall = run_all({n: train_args(args, n) for n in names}, args.parallel)
    if args.reuse and args.wall:
        wall = {k: float(v) for k, v in (item.split("=") for item in args.wall.split(","))}
    rows = [row(out / n, n, wall.get(n), thresholds) for n in names]
    base = rows[0]["test_bpc"]
    r0 = rows[0]
    print(
        f"\nHF GPT-2 4x128 (4 heads, MLP 512), tinyshakespeare, {r0['steps']} steps, seed {r0['seed']}, "
        f"{r0['threads']} thread(s)"
    )
    print(
        f"{'run':6s} {'bits/char':>16s} {'|w|<=T':>7s} {'thresholded':>11s} {'shrunk':>7s} {'params':>22s} "
        f"{'MLP neurons cut':>16s} {'heads cut':>9s} {'train s':>8s} {'wall s':>7s}"
    )
    for r in rows:
        for i, s in enumerate(r["shrink"]):
            head = f"{r['name']:6s} {r['test_bpc']:8.3f} ({r['test_bpc'] - base:+.3f})" if i == 0 else " " * 23
            wall_s = "-" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}"
            tail = f" {r['train_seconds']:8.0f} {wall_s:>7s}" if i == 0 else ""
            print(
                f"{head} {s['threshold']:7g} {s['thresholded_test_bpc']:11.3f} {s['shrunk_test_bpc']:7.3f} "
                f"{s['params_before']:>10,d} -> {s['params_after']:<9,d} "
                f"{s['mlp_neurons_removed']:>6d}/{s['mlp_neurons_total']:<6d}   "
                f"{s['heads_removed']}/{s['heads_total']:<5d}{tail}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
