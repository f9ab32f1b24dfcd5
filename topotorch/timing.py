"""One timing discipline for every benchmark: warm-up, sides interleaved in one process, medians with spread.

A speed *ratio* is only worth something if both sides ran under the same conditions. On a shared
machine the load changes from second to second, so timing side A for a while and then side B
measures the machine as much as the code. :func:`compare` therefore

* runs every side ``warmup`` times untimed (caches, allocator, lazy compilation),
* then ``reps`` rounds in which every side runs once, the order rotating each round
  (A B, B A, A B, ...), so each side gets the same count under the same drift,
* reports per side the median and the spread (min, quartiles, max) and the ratio of medians,
* and records the thread count, ``os.getloadavg()`` before and after, and the CPU count.

    >>> c = compare({"ours": lambda: f(x), "peer": lambda: g(x)}, reps=15)
    >>> c.ratio("peer", "ours")  # median(peer) / median(ours): > 1 means ours is faster
    >>> c.summary("peer", "ours")  # 'ours 12.1 ms [11.8–12.9], peer 61.0 ms [...] -> 5.04x (...)'
    >>> json.dumps(c.as_dict())

:func:`median_seconds` (one side) is kept for measured choices inside the library.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


def _sync_for(device: torch.device | str | None) -> Callable[[], None]:
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class SideTimes:
    """Seconds of every timed call of one side, with its median and spread."""

    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> dict[str, float]:
        """min, first quartile, third quartile, max (seconds)."""
        return {
            "min": min(self.seconds),
            "q1": _quantile(self.seconds, 0.25),
            "q3": _quantile(self.seconds, 0.75),
            "max": max(self.seconds),
        }

    def as_dict(self, unit: float = 1e3) -> dict:
        sp = self.spread
        return {
            "median_ms": round(self.median * unit, 4),
            "iqr_ms": [round(sp["q1"] * unit, 4), round(sp["q3"] * unit, 4)],
            "min_ms": round(sp["min"] * unit, 4),
            "max_ms": round(sp["max"] * unit, 4),
            "n": len(self.seconds),
        }


@dataclass
class Comparison:
    """The result of :func:`compare`: per-side times plus the conditions they were taken under."""

    sides: dict[str, SideTimes]
    threads: int
    cpus: int | None
    load_before: list[float] | None
    load_after: list[float] | None
    warmup: int
    reps: int
    extra: dict = field(default_factory=dict)

    def median(self, name: str) -> float:
        return self.sides[name].median

    def ratio(self, slow: str, fast: str) -> float:
        """median(slow) / median(fast): how many times faster ``fast`` is. Usage: ``c.ratio("peer", "ours")``."""
        return self.sides[slow].median / self.sides[fast].median

    def ratio_range(self, slow: str, fast: str) -> tuple[float, float]:
        """A conservative spread of the ratio: (q1 of slow / q3 of fast, q3 of slow / q1 of fast)."""
        a, b = self.sides[slow].spread, self.sides[fast].spread
        return a["q1"] / b["q3"], a["q3"] / b["q1"]

    def summary(self, slow: str | None = None, fast: str | None = None) -> str:
        def fmt(s: SideTimes) -> str:
            sp = s.spread
            return f"{s.name} {_ms(s.median)} [IQR {_ms(sp['q1'])}–{_ms(sp['q3'])}]"

        parts = ", ".join(fmt(s) for s in self.sides.values())
        tail = f" ({self.threads} threads, load {self.load_before} -> {self.load_after}, {self.reps} interleaved reps)"
        if slow and fast:
            lo, hi = self.ratio_range(slow, fast)
            return (
                f"{parts} -> {fast} {self.ratio(slow, fast):.2f}x faster than {slow} [IQR ratio {lo:.2f}–{hi:.2f}]"
                + tail
            )
        return parts + tail

    def as_dict(self) -> dict:
        d = {
            "sides": {k: v.as_dict() for k, v in self.sides.items()},
            "threads": self.threads,
            "cpus": self.cpus,
            "load_before": self.load_before,
            "load_after": self.load_after,
            "warmup": self.warmup,
            "reps": self.reps,
            "order": "interleaved, rotating start each round",
        }
        names = list(self.sides)
        if len(names) >= 2:
            d["ratios"] = {f"{a}/{b}": round(self.ratio(a, b), 4) for a in names for b in names if a != b}
        d.update(self.extra)
        return d


def _ms(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def compare(
    fns: Mapping[str, Callable[[], object]],
    reps: int = 10,
    warmup: int = 2,
    setup: Callable[[str], object] | None = None,
    device: torch.device | str | None = None,
    inner: int | Mapping[str, int] = 1,
) -> Comparison:
    """Time two or more callables side by side in this process, interleaved, the same number of times.

    ``fns``: {name: callable}. ``setup(name)``, if given, runs untimed before every call (e.g. to clear
    gradients). ``inner`` calls per timed sample (a number, or one per side) for calls too short to time
    alone; the sample is divided by it. On a CUDA ``device`` every sample is synchronised.
    Usage: ``compare({"ours": f, "peer": g}, reps=15).ratio("peer", "ours")``.
    """
    if len(fns) < 1:
        raise ValueError("compare needs at least one callable")
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got {reps}, {warmup}")
    names = list(fns)
    inners = {n: int(inner[n] if isinstance(inner, Mapping) else inner) for n in names}
    if any(v < 1 for v in inners.values()):
        raise ValueError(f"inner must be >= 1, got {inner!r}")
    sync = _sync_for(device)
    load_before = _loadavg()
    for _ in range(warmup):
        for n in names:
            if setup is not None:
                setup(n)
            fns[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if setup is not None:
                setup(n)
            fn, m = fns[n], inners[n]
            sync()
            t0 = time.perf_counter()
            for _ in range(m):
                fn()
            sync()
            times[n].append((time.perf_counter() - t0) / m)
    return Comparison(
        {n: SideTimes(n, times[n]) for n in names},
        torch.get_num_threads(),
        os.cpu_count(),
        load_before,
        _loadavg(),
        warmup,
        reps,
    )


def conditions() -> dict:
    """The conditions a benchmark ran under: threads, CPUs, load average, torch version."""
    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load": _loadavg(), "torch": torch.__version__}


def median_seconds(
    fn: Callable[[], object], reps: int, warmup: int = 2, device: torch.device | str | None = None
) -> float:
    """Median wall-clock seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones.

    On a CUDA ``device`` each call is synchronised, so the kernels are timed, not their launch.
    Usage: ``median_seconds(lambda: model(x), 30, device=x.device)``.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    return compare({"fn": fn}, reps=reps, warmup=warmup, device=device).median("fn")
