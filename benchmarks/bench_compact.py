"""Compact runtime vs the dense model and vs torch.nn.utils.prune masks (ratios in one run).

Trains (or takes ``--run`` folders of) a BIMT ``digits-wide`` run (64-512-512-10) and a BIMT
``modular-addition`` run with their default settings, seed 0; compacts each with
``topotorch.experiments.compress.compress_run`` (dead neurons removed, constants folded, modules split, per-layer
storage measured) and reports: parameter ratio (goal >= 3x fewer), throughput ratio compact/dense at
batch 256 and 4096 (goal >= 2x), batch-1 latency (at that size it measures framework overhead, not
arithmetic), test accuracy dense vs compact (goal within 1 point), max output difference vs the
thresholded original, and latency of ``torch.nn.utils.prune.l1_unstructured``-masked copies at the
same per-layer sparsity (they keep dense compute) vs the compact model. Every speed figure is
timed with :func:`topotorch.timing.compare` at each batch size: dense, compact and the two pruned
copies interleaved in one process with the same repeats after a warm-up, medians with quartiles,
threads (explicit ``torch.set_num_threads``) and load average recorded.

    .venv/bin/python benchmarks/bench_compact.py --json results/bench_compact.json
    .venv/bin/python benchmarks/bench_compact.py --run runs/dw --run runs/ma      # existing runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from topotorch.compression.compact import _batch_like, load_compact
from topotorch.experiments.compress import compress_run
from topotorch.timing import compare
from topotorch.training import TrainConfig, load_run, train

TASKS = ("digits-wide", "modular-addition")


def ensure_run(task: str, work: Path) -> Path:
    """A finished BIMT run of ``task`` (default settings, seed 0) under ``work``; trained if missing."""
    out = work / task
    if (out / "summary.json").exists():
        return out
    torch.set_num_threads(1)
    t = time.perf_counter()
    train(TrainConfig.for_task(task, animation=False, progress=False, out=str(out)))
    print(f"trained {task} in {time.perf_counter() - t:.0f}s -> {out}")
    return out


def pruned_copies(model: nn.Module, threshold: float) -> tuple[nn.Module, nn.Module, float]:
    """(prune-masked copy with its forward hooks, the same with masks made permanent, overall sparsity).

    Each Linear/Embedding weight gets ``l1_unstructured`` with amount = the fraction of its weights the
    threshold removes: the same sparsity, and (up to ties) the same mask as the thresholded model."""

    def pruned() -> tuple[nn.Module, int, int]:
        out, zero, total = copy.deepcopy(model).eval(), 0, 0
        for m in out.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                k = int((m.weight.abs() <= threshold).sum())
                zero, total = zero + k, total + m.weight.numel()
                prune.l1_unstructured(m, "weight", amount=k)
        return out, zero, total

    masked, zero, total = pruned()
    removed = pruned()[0]
    for m in removed.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and prune.is_pruned(m):
            prune.remove(m, "weight")
    return masked, removed, zero / max(total, 1)


def _reps(fn: Callable[[], object], budget_s: float, n_sides: int) -> int:
    """Interleaved rounds that fit about ``budget_s`` for all sides (5 to 200)."""
    fn()
    t = time.perf_counter()
    fn()
    return int(min(200, max(5, budget_s / n_sides / max(time.perf_counter() - t, 1e-7))))


def speed_rows(models: dict[str, nn.Module], x_test: torch.Tensor, budget_s: float) -> dict:
    """Per batch size: compare() of every model's forward (interleaved), medians, ratios and quartiles."""
    out = {}
    with torch.inference_mode():
        for b in ("1", "256", "4096"):
            xb = _batch_like(x_test, int(b))
            fns = {k: (lambda m=m, xb=xb: m(xb)) for k, m in models.items()}
            c = compare(fns, reps=_reps(fns["dense"], budget_s, len(fns)), warmup=2)
            out[b] = {
                "seconds": {k: c.median(k) for k in fns},
                "timing": c.as_dict(),
                "throughput_ratio": c.ratio("dense", "compact"),
                "throughput_ratio_iqr": list(c.ratio_range("dense", "compact")),
                "masked_over_compact": c.ratio("prune_masked", "compact"),
                "removed_over_compact": c.ratio("prune_removed", "compact"),
                "dense_samples_per_s": int(b) / c.median("dense"),
                "compact_samples_per_s": int(b) / c.median("compact"),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, action="append", default=None, help="use these run folders instead of training")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_compact"), help="where to train the runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per timing (medians)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    runs = a.run or [ensure_run(t, a.work) for t in TASKS]
    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch threads: {torch.get_num_threads()} (set explicitly); load average {load:.2f} on a shared "
        f"{os.cpu_count()}-core box: absolute times are noisy, ratios are from interleaved repeats (timing.compare)"
    )
    results = {"threads": torch.get_num_threads(), "load_average": load, "runs": {}}
    for run in runs:
        rep = compress_run(run, threads=a.threads, budget_s=a.budget)
        r = load_run(run)
        small = load_compact(Path(run) / "compact")
        masked, removed, sparsity = pruned_copies(r.model.eval(), rep["threshold"])
        # every speed figure from one interleaved comparison per batch size (compress_run's own
        # speed table times the sides one after the other; it is kept as "speed_compress_run")
        sp = speed_rows(
            {"dense": r.model.eval(), "compact": small, "prune_masked": masked, "prune_removed": removed},
            r.data.x_test,
            4 * a.budget,
        )
        prune_rows = {
            b: {
                "compact_seconds": v["seconds"]["compact"],
                "prune_masked_seconds": v["seconds"]["prune_masked"],
                "prune_removed_seconds": v["seconds"]["prune_removed"],
                "masked_over_compact": v["masked_over_compact"],
                "removed_over_compact": v["removed_over_compact"],
            }
            for b, v in sp.items()
        }
        m = rep["metric"]
        acc_d, acc_c = rep[f"test_{m}_dense"], rep[f"test_{m}_compact"]
        rep = {**rep, "speed_compress_run": rep["speed"], "speed": sp}
        row = {
            **rep,
            "weight_sparsity": sparsity,
            "prune": prune_rows,
            "accuracy_points_lost": 100 * (acc_d - acc_c),
            "goals": {
                "param_ratio>=3": rep["param_ratio"] >= 3,
                "throughput256>=2": sp["256"]["throughput_ratio"] >= 2,
                "throughput4096>=2": sp["4096"]["throughput_ratio"] >= 2,
                "accuracy_within_1pt": abs(100 * (acc_d - acc_c)) <= 1.0,
                "max_abs_diff<=1e-5": rep["max_abs_diff"] <= 1e-5,
            },
        }
        results["runs"][rep["task"]] = row
        g = row["goals"]
        ok = lambda v: "met" if v else "MISSED"  # noqa: E731
        print(
            f"\n== {rep['task']} [{rep['method']}] ({run}), threshold {rep['threshold']}, dtype {rep['dtype']}, "
            f"{100 * sparsity:.1f}% of weights below it"
        )
        print(
            f"  hidden sizes {rep['hidden_sizes_before']} -> {rep['hidden_sizes_after']}, "
            f"{len(rep['modules'] or [])} module(s) {rep['modules']}, formats {rep['formats']}"
        )
        print(
            f"  parameters   {rep['params_before']} -> {rep['params_after']} ({rep['param_ratio']:.2f}x fewer; "
            f"goal >= 3x: {ok(g['param_ratio>=3'])}); FLOPs/sample {rep['flops_before']} -> {rep['flops_after']} "
            f"({rep['flops_ratio']:.2f}x)"
        )
        for b in ("256", "4096"):
            v = sp[b]
            lo, hi = v["throughput_ratio_iqr"]
            print(
                f"  batch {b:>4}: dense {v['dense_samples_per_s']:.3g}/s, compact {v['compact_samples_per_s']:.3g}/s "
                f"-> {v['throughput_ratio']:.2f}x [IQR {lo:.2f}–{hi:.2f}] "
                f"(goal >= 2x: {ok(v['throughput_ratio'] >= 2)})"
            )
        v = sp["1"]
        print(
            f"  batch    1: dense {v['seconds']['dense'] * 1e6:.1f} µs, compact {v['seconds']['compact'] * 1e6:.1f} µs "
            f"({v['throughput_ratio']:.2f}x) -- at this size it measures framework overhead, not arithmetic"
        )
        print(
            f"  test {m}: dense {acc_d:.4f}, thresholded {rep[f'test_{m}_thresholded']:.4f}, compact {acc_c:.4f} "
            f"({row['accuracy_points_lost']:+.2f} points lost; goal within 1: {ok(g['accuracy_within_1pt'])})"
        )
        print(
            f"  max |compact - thresholded| {rep['max_abs_diff']:.3g} on outputs up to {rep['max_abs_output']:.3g} "
            f"({rep['dtype']}; goal <= 1e-5: {ok(g['max_abs_diff<=1e-5'])}); "
            f"in float64 {rep['max_abs_diff_float64']:.2g}; "
            f"the thresholded {rep['dtype']} original itself is {rep['thresholded_vs_float64']:.2g} "
            "from its float64 value"
        )
        for b, pr in prune_rows.items():
            print(
                f"  prune l1_unstructured at {100 * sparsity:.1f}% sparsity, batch {b:>4}: masked (hooks) "
                f"{pr['prune_masked_seconds'] * 1e6:.0f} µs, mask removed (dense zeros) "
                f"{pr['prune_removed_seconds'] * 1e6:.0f} µs, compact {pr['compact_seconds'] * 1e6:.0f} µs "
                f"-> compact {pr['masked_over_compact']:.2f}x / {pr['removed_over_compact']:.2f}x faster"
            )
    results["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
