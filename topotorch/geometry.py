"""Where neurons are: layouts that give each neuron of a layer coordinates in the plane.

A layer of N neurons sits at height ``l`` (its index in the network) and, within
its layer, at a point of the unit square. Distances used by the wiring cost are
*within-layer* distances between a neuron's point and its partner's point; the
vertical gap between layers is the constant ``l0`` of the cost.

    >>> line(4)  # x_j = (2j+1)/(2N): tensor([[0.125], [0.375], [0.625], [0.875]])
    >>> grid(8, 8).shape  # torch.Size([64, 2]), cell centres of an 8x8 grid
    >>> circle(10)  # 10 points on a radius-1/4 circle around (0.5, 0.5)

Every layout returns an ``(N, D)`` float64 tensor with ``D`` = 1 (line) or 2
(plane). Mixed networks are fine: a 1-D line is placed at ``y = 0.5`` when it
meets a 2-D layer (see :func:`as_plane`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Layout = Callable[[int], torch.Tensor]

LAYOUTS: dict[str, Callable[..., torch.Tensor]] = {}


def register_layout(name: str):
    """Decorator that adds a layout to :data:`LAYOUTS` so configs can name it."""

    def deco(fn):
        LAYOUTS[name] = fn
        return fn

    return deco


@register_layout("line")
def line(n: int) -> torch.Tensor:
    """Neurons evenly on [0, 1]: x_j = (2j+1)/(2n). Usage: ``line(20)``."""
    _check_count(n)
    return ((2 * torch.arange(n, dtype=torch.float64) + 1) / (2 * n)).unsqueeze(1)


@register_layout("grid")
def grid(rows: int, cols: int | None = None) -> torch.Tensor:
    """Row-major cell centres of a rows x cols grid on the unit square. Usage: ``grid(8, 8)``."""
    cols = rows if cols is None else cols
    _check_count(rows)
    _check_count(cols)
    r = (2 * torch.arange(rows, dtype=torch.float64) + 1) / (2 * rows)
    c = (2 * torch.arange(cols, dtype=torch.float64) + 1) / (2 * cols)
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    # (x, y) = (column, row) so pictures read like the image
    return torch.stack([cc.reshape(-1), rr.reshape(-1)], dim=1)


@register_layout("circle")
def circle(n: int, radius: float = 0.25, centre: tuple[float, float] = (0.5, 0.5)) -> torch.Tensor:
    """n points on a circle (the paper's MNIST outputs: radius 1/4 around the centre). Usage: ``circle(10)``."""
    _check_count(n)
    theta = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    return torch.stack([centre[0] + radius * torch.cos(theta), centre[1] + radius * torch.sin(theta)], dim=1)


@register_layout("square")
def square_grid(n: int) -> torch.Tensor:
    """A grid for n neurons: the most square rows x cols with rows*cols = n. Usage: ``square_grid(100)``."""
    _check_count(n)
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return grid(rows, n // rows)


def make_layout(spec: str | torch.Tensor | None, n: int) -> torch.Tensor:
    """Resolve a layout spec for n neurons: a registered name, ``"grid:HxW"``, or explicit coordinates.

    Usage: ``make_layout("grid:8x8", 64)``, ``make_layout(torch.rand(5, 2), 5)``.
    """
    if spec is None:
        spec = "line"
    if isinstance(spec, torch.Tensor):
        pos = spec.detach().to(torch.float64)
        if pos.ndim == 1:
            pos = pos.unsqueeze(1)
        if pos.ndim != 2 or pos.shape[0] != n or pos.shape[1] not in (1, 2):
            raise ValueError(f"user coordinates must have shape ({n}, 1) or ({n}, 2), got {tuple(spec.shape)}")
        return pos.clone()
    if not isinstance(spec, str):
        raise TypeError(f"layout must be a name or a tensor of coordinates, got {type(spec).__name__}")
    name, _, arg = spec.partition(":")
    if name == "grid" and arg:
        try:
            h, w = (int(v) for v in arg.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad grid layout {spec!r}: expected 'grid:HxW'") from None
        if h * w != n:
            raise ValueError(f"layout {spec!r} holds {h * w} neurons but the layer has {n}")
        return grid(h, w)
    if name == "grid":
        name = "square"
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {spec!r}; known: {', '.join(sorted(LAYOUTS))}, grid:HxW")
    return LAYOUTS[name](n)


def as_plane(pos: torch.Tensor) -> torch.Tensor:
    """Lift 1-D line coordinates into the plane at y = 0.5 (2-D coordinates pass through)."""
    if pos.shape[1] == 2:
        return pos
    return torch.cat([pos, torch.full_like(pos, 0.5)], dim=1)


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    """Within-layer distances between every point of ``a`` (n, D) and of ``b`` (m, D): an (n, m) matrix.

    ``metric`` is ``"l1"`` (the paper's choice in the plane) or ``"l2"``. On a line both equal |x_i - x_j|.
    Usage: ``pairwise_distance(line(3), line(4))``.
    """
    if a.shape[1] != b.shape[1]:
        a, b = as_plane(a), as_plane(b)
    diff = a.unsqueeze(1) - b.unsqueeze(0)
    if metric == "l1":
        return diff.abs().sum(-1)
    if metric == "l2":
        return diff.pow(2).sum(-1).sqrt()
    raise ValueError(f"unknown distance metric {metric!r}; use 'l1' or 'l2'")


def _check_count(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a layout needs a positive number of neurons, got {n!r}")
