"""Compress a trained run folder: the run-level side of :mod:`topotorch.compression`.

Compression itself works on models (``compact_mlp``, ``shrink``, ``compress``); reading a run folder,
evaluating the task's metric before and after, and writing the report beside the run need the
training layer, so they live here, a floor above it.

    >>> report = compress_run("runs/dw", threshold=0.05)  # RUN/compact/ + report.json
    >>> small = load_compressed("runs/digits-topo")  # after `topotorch compress --removed 0.8`
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from topotorch.analysis import thresholded
from topotorch.artifacts import atomic_write_json
from topotorch.compression.compact import (
    Choice,
    CompactError,
    compact_mlp,
    dense_flops,
    save_compact,
    speed_table,
    thresholded_copy,
    verify,
)
from topotorch.compression.shrink import save_shrunk, shrink
from topotorch.compression.topographic import read_compressed, rebuild_compressed
from topotorch.training import TrainResult, evaluate, load_run


def compress_run(
    run_dir: str | Path,
    threshold: float | None = None,
    choose: Choice = "auto",
    out: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 256, 4096),
    threads: int | None = 1,
    budget_s: float = 0.5,
) -> dict:
    """Compact a trained MLP run: write ``RUN/compact/`` (model + ``report.json``) and return the report.

    The report: parameters and FLOPs before/after, latency/throughput dense vs compact per batch size,
    test metric (dense, thresholded, compact) and the max output difference compact vs thresholded
    (float32 as trained, and in float64: the structural check). ``threshold`` defaults to the run's.
    Non-MLP runs go through :func:`shrink_run`. Usage: ``compress_run("runs/dw")``.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    r = load_run(Path(run_dir))
    model = r.model.eval()
    thr = float(r.config.threshold if threshold is None else threshold)
    if not thr >= 0:
        raise CompactError(f"threshold must be >= 0, got {thr!r}")
    folder = Path(out) if out is not None else Path(run_dir) / "compact"
    x_test, y_test = r.data.x_test, r.data.y_test
    try:  # refused before any work when the model is not an MLP
        small = compact_mlp(model, thr, example=r.data.x_train[:256], choose=choose, batch_sizes=(256, 4096))
    except CompactError as e:
        return shrink_run(r, thr, folder, batch_sizes, budget_s, why=str(e))
    ref = thresholded_copy(model, thr)
    diff = verify(ref, small, x_test)
    m64 = copy.deepcopy(model).double()
    x64 = x_test.double() if x_test.is_floating_point() else x_test
    ref64 = thresholded_copy(m64, thr)
    diff64 = verify(ref64, compact_mlp(m64, thr, choose="dense"), x64)
    with torch.no_grad():  # how far the float32 original itself is from exact: the scale of float32 rounding
        floor = float((ref(x_test[:4096]).double() - ref64(x64[:4096])).abs().max())
    metric = r.task.metric
    before = evaluate(r.task, model, x_test, y_test)
    thr_metric = evaluate(r.task, ref, x_test, y_test)
    after = evaluate(r.task, small, x_test, y_test)
    params_before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    report = {
        "run": str(run_dir),
        "task": r.config.task,
        "method": r.config.method,
        "threshold": thr,
        "dtype": small.description.get("dtype"),
        "threads": torch.get_num_threads(),
        "params_before": params_before,
        "params_after": small.stored_values(),
        "nonzeros_after": small.nonzeros(),
        "param_ratio": params_before / max(small.stored_values(), 1),
        "flops_before": dense_flops(model),
        "flops_after": small.flops(),
        "flops_ratio": dense_flops(model) / max(small.flops(), 1),
        "formats": small.formats,
        "modules": small.description.get("modules"),
        "hidden_sizes_before": small.description.get("hidden_sizes_before"),
        "hidden_sizes_after": small.description.get("hidden_sizes_after"),
        "metric": metric,
        f"test_{metric}_dense": before,
        f"test_{metric}_thresholded": thr_metric,
        f"test_{metric}_compact": after,
        "max_abs_diff": diff,
        "max_abs_diff_float64": diff64,
        "thresholded_vs_float64": floor,
        "max_abs_output": float(ref(x_test[:4096]).detach().abs().max()),
        "speed": speed_table(model, small, x_test, batch_sizes, budget_s),
        "note": "batch-1 latency measures framework overhead (Python and op dispatch), not arithmetic",
    }
    save_compact(folder, small)
    atomic_write_json(folder / "report.json", report)
    return report


def shrink_run(
    r: TrainResult, thr: float, folder: Path, batch_sizes: Sequence[int], budget_s: float, why: str = ""
) -> dict:
    """Conv nets and transformers: dead channels/neurons removed through the coupling graph by
    :func:`topotorch.compression.shrink.shrink`; writes ``folder`` (shrunk model + ``report.json``).

    ``why``: the reason the compact runtime did not apply (kept for the caller's messages).
    Usage: ``shrink_run(load_run("runs/gpt"), 0.05, Path("runs/gpt/compact"), (1, 64), 0.5)``.
    """
    model = r.model.eval()
    x_test, y_test = r.data.x_test, r.data.y_test
    before = evaluate(r.task, model, x_test, y_test)
    with torch.no_grad(), thresholded(r.graph, thr):
        thr_metric = evaluate(r.task, model, x_test, y_test)
        ref_out = model(x_test[:512])
        ref_model = copy.deepcopy(model)
    res = shrink(model, r.graph, thr)
    small = res.model.eval()
    with torch.no_grad():
        diff = float((small(x_test[:512]).double() - ref_out.double()).abs().max())
    after = evaluate(r.task, small, x_test, y_test)
    n = lambda m: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())  # noqa: E731
    metric = r.task.metric
    report = {
        "run": str(r.run_dir),
        "task": r.config.task,
        "method": r.config.method,
        "threshold": thr,
        "via": "topotorch.compression.shrink",
        "removed": res.removed,
        "kept_why": res.kept_why,
        "threads": torch.get_num_threads(),
        "params_before": n(model),
        "params_after": n(small),
        "param_ratio": n(model) / max(n(small), 1),
        "kept": {k: len(v) for k, v in getattr(res, "kept", {}).items()},
        "metric": metric,
        f"test_{metric}_dense": before,
        f"test_{metric}_thresholded": thr_metric,
        f"test_{metric}_compact": after,
        "max_abs_diff": diff,
        "speed": speed_table(ref_model, small, x_test, [b for b in batch_sizes if b <= 256], budget_s),
        "note": "batch-1 latency measures framework overhead (Python and op dispatch), not arithmetic",
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_shrunk(folder, res)  # model.safetensors + shrunk.json: rebuilt by load_shrunk, no training code
    atomic_write_json(folder / "report.json", report)
    return report


def load_compressed(run_dir: str | Path, name: str = "compressed") -> nn.Module:
    """Rebuild a compressed model saved by ``topotorch compress``: the run's model cut to the recorded
    shapes, then the saved weights. Usage: ``small = load_compressed("runs/digits-topo")``."""
    state, spec = read_compressed(run_dir, name)
    return rebuild_compressed(load_run(Path(run_dir)).model, state, spec)
