"""Timing for benchmarks and measured choices: the median of repeated calls after a warm-up.

    >>> seconds = median_seconds(lambda: model(x), reps=30)
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 2, device: torch.device | str | None = None) -> float:
    """Median wall-clock seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones.

    On a CUDA ``device`` each call is synchronised, so the kernels are timed, not their launch.
    Usage: ``median_seconds(lambda: model(x), 30, device=x.device)``.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
