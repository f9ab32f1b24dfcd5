"""How a sparse dictionary meets curved geometry, and how its latents meet a network's modules.

An SAE writes each activation as a sparse sum of *straight* directions. Some representations are
curved: modular addition embeds a residue a as a point on a circle, x(a) ≈ c + u cos(2πfa/p) +
v sin(2πfa/p) for a few frequencies f ("models think in curved shapes"). A dictionary can only cover
such a curve piecewise: each latent fires on an arc, and k latents together make a chord-by-chord
approximation. So the questions are numbers about arcs:

* **coverage** — how many latents ever fire on the curve, and what fraction of its points has at
  least one active latent;
* **locality** — for each latent, the circular extent of its support: the smallest arc (as a
  fraction of the period) holding every point where it fires = 1 − (largest gap between
  consecutive support points) / period. A latent that tiles one piece of the curve has a small
  extent; a latent that fires everywhere (a "mean direction") has extent ≈ 1.

The curve parameter t of each point comes from the data when it is known (a synthetic curve, the
residue's angle 2πfa/p) or from the curve itself (:func:`circle_angles`: the angle in the plane of
the dominant Fourier frequency of the points, ordered by their index).

The extent is computed for all latents at once: with the points sorted by t and a boolean support
matrix M [latents, points], the previous support point of each support point is a running maximum of
``where(M, index, −1)`` (one ``np.maximum.accumulate``), the wrap-around gap joins the last and first
— no loop over latents.

**Latents vs modules.** A network trained with BIMT splits into modules (connected communities,
:func:`topotorch.analysis.modularity.detect_communities`). A latent reads from the layer through its
encoder row; the fraction of |W_enc[i]| mass that falls on its top module says whether it reads
one module (1.0) or mixes them. The baseline is the same fraction with the module labels of the
layer's units shuffled (a latent that ignores the modules), averaged over many shuffles.

    >>> x, t = synthetic_curve(512, d=16, seed=0)
    >>> tiling = curve_tiling(sae.encode(x), t)  # CurveTiling(latents_used=.., coverage=1.0, ..)
    >>> module_purity(sae.W_enc, membership["hidden1"])  # {'purity': 0.93, 'baseline': 0.41, ...}
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "synthetic_curve",
    "circle_angles",
    "circular_extent",
    "CurveTiling",
    "curve_tiling",
    "draw_curve_tiling",
    "module_purity",
    "input_membership",
]

TAU = 2 * math.pi


def synthetic_curve(
    n_points: int = 512,
    d: int = 16,
    frequencies: tuple[int, ...] = (1,),
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """A closed curve in d dimensions: x(t) = Σ_f (cos ft, sin ft) placed in random orthogonal planes, t uniform.

    ``frequencies=(1,)`` is a circle; ``(1, 2)`` bends it through 4 dimensions (more curvature, more
    latents needed). Returns (x [n_points, d], t [n_points] in [0, 2π)).
    Usage: ``x, t = synthetic_curve(512, d=16, frequencies=(1, 3))``.
    """
    if d < 2 * len(frequencies):
        raise ValueError(f"a curve with {len(frequencies)} frequencies needs d >= {2 * len(frequencies)}, got {d}")
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n_points, generator=g, dtype=torch.float64) * TAU
    basis, _ = torch.linalg.qr(torch.randn(d, 2 * len(frequencies), generator=g, dtype=torch.float64))
    f = torch.tensor(frequencies, dtype=torch.float64)
    coords = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], 1)  # [P, 2F]
    x = coords @ torch.cat([basis[:, 0::2], basis[:, 1::2]], 1).t()
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x.to(dtype), t


def circle_angles(points: Tensor) -> tuple[Tensor, int]:
    """Angle of each of p points on the circle of their dominant Fourier frequency: θ_a ≈ 2πfa/p.

    ``points`` [p, d] are indexed by a residue a = 0..p−1 (rows of an embedding table). The DFT over a
    of the centred points picks the frequency f with the most power; the angle is that of the point
    in the plane (Re, Im) of its Fourier coefficient. Returns (θ [p] in [0, 2π), f).
    Usage: ``theta, f = circle_angles(model.embedding.weight)``.
    """
    x = points.detach().to(torch.float64)
    x = x - x.mean(0)
    spec = torch.fft.rfft(x, dim=0)  # [p//2+1, d]
    power = spec.abs().pow(2).sum(1)
    power[0] = 0
    f = int(power.argmax())
    c = spec[f]  # on that circle x_a ≈ (2/p)(Re c · cos φ_a − Im c · sin φ_a), φ_a = 2πfa/p: solve for (cos, sin)
    basis = torch.stack([c.real, -c.imag], 1)  # [d, 2]
    coef = torch.linalg.lstsq(basis, x.t()).solution  # [2, p]
    return torch.remainder(torch.atan2(coef[1], coef[0]), TAU), f


def circular_extent(support: np.ndarray, t: np.ndarray, period: float = TAU) -> np.ndarray:
    """Smallest arc holding every support point, as a fraction of the period, per row of ``support`` [n, P].

    1 − (largest gap between consecutive support points, wrap-around included)/period; rows with one
    point give 0, empty rows NaN. Vectorised over rows (see the module docstring).
    Usage: ``circular_extent(codes.T.numpy() > 0, t.numpy())``.
    """
    support = np.asarray(support, dtype=bool)
    order = np.argsort(t, kind="stable")
    ts, m = np.asarray(t, dtype=np.float64)[order] % period, support[:, order]
    n, p = m.shape
    idx = np.where(m, np.arange(p)[None, :], -1)
    prev = np.maximum.accumulate(np.concatenate([np.full((n, 1), -1), idx[:, :-1]], 1), axis=1)
    last = idx.max(1)  # the last support point wraps to the first
    first = np.where(m.any(1), m.argmax(1), -1)
    gap = np.where(m & (prev >= 0), ts[None, :] - ts[np.maximum(prev, 0)], -np.inf)
    wrap = np.where(last >= 0, ts[np.maximum(first, 0)] + period - ts[np.maximum(last, 0)], np.nan)
    gap_max = np.maximum(gap.max(1, initial=-np.inf), wrap)
    count = m.sum(1)
    out = 1.0 - gap_max / period
    out = np.where(count == 1, 0.0, out)
    return np.where(count == 0, np.nan, np.clip(out, 0.0, 1.0))


@dataclass
class CurveTiling:
    """How a dictionary's latents tile a closed curve (extents are fractions of the period)."""

    points: int
    latents_used: int  # latents active on at least one point
    coverage: float  # fraction of points with at least one active latent
    active_per_point: float  # mean number of active latents per point
    extent_median: float
    extent_mean: float
    extent_max: float
    ideal_extent: float  # what an even tiling would give: active_per_point / latents_used
    extents: list[float]  # per used latent, in order of its mean angle

    def to_dict(self, with_extents: bool = False) -> dict:
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        if not with_extents:
            d.pop("extents")
        return d


def curve_tiling(codes: Tensor, t: Tensor, period: float = TAU) -> CurveTiling:
    """Coverage and locality of the latents active on a curve: ``codes`` [P, n] on points with parameter ``t`` [P].

    Usage: ``curve_tiling(sae.encode(x), t).extent_median``.
    """
    if codes.dim() != 2 or t.shape != codes.shape[:1]:
        raise ValueError(f"codes [P, n] and t [P] must agree, got {tuple(codes.shape)} and {tuple(t.shape)}")
    z = codes.detach().to(torch.float64).numpy()
    tt = t.detach().to(torch.float64).numpy()
    active = z != 0
    used = active.any(0)
    ext = circular_extent(active[:, used].T, tt, period)
    # order the used latents by the circular mean of the angles where they fire (activation-weighted)
    w = np.abs(z[:, used])
    ang = np.angle((w * np.exp(1j * tt * TAU / period)[:, None]).sum(0))
    ext_sorted = ext[np.argsort(np.remainder(ang, TAU))]
    n_used = int(used.sum())
    per_point = float(active.sum(1).mean())
    return CurveTiling(
        points=len(tt),
        latents_used=n_used,
        coverage=float(active.any(1).mean()),
        active_per_point=per_point,
        extent_median=float(np.median(ext)) if n_used else float("nan"),
        extent_mean=float(np.mean(ext)) if n_used else float("nan"),
        extent_max=float(np.max(ext)) if n_used else float("nan"),
        ideal_extent=per_point / n_used if n_used else float("nan"),
        extents=[float(v) for v in ext_sorted],
    )


def draw_curve_tiling(
    points: Tensor, codes: Tensor, t: Tensor, path: str | Path, title: str = "", period: float = TAU
) -> Path:
    """Two panels: the curve's points (projected on their top-2 principal plane) coloured by their strongest
    latent, and a raster of which latent fires at which curve position (latents sorted by mean angle).

    Usage: ``draw_curve_tiling(x, sae.encode(x), t, "docs/sae_circle.png")``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from topotorch.checkpoint import atomic_write_bytes

    x = points.detach().to(torch.float64)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ v[:2].t()).numpy()
    z = codes.detach().to(torch.float64).numpy()
    tt = t.detach().to(torch.float64).numpy()
    used = np.flatnonzero((z != 0).any(0))
    top = np.where((z != 0).any(1), np.abs(z).argmax(1), -1)
    ang = np.remainder(np.angle((np.abs(z[:, used]) * np.exp(1j * tt * TAU / period)[:, None]).sum(0)), TAU)
    rank = np.empty(len(used), dtype=int)
    rank[np.argsort(ang)] = np.arange(len(used))
    lookup = np.full(z.shape[1], -1)
    lookup[used] = rank
    cmap = plt.get_cmap("hsv")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    colour = np.where(top >= 0, lookup[np.maximum(top, 0)] / max(len(used), 1), 0.0)
    a1.scatter(xy[:, 0], xy[:, 1], c=cmap(colour), s=12)
    a1.scatter(xy[top < 0, 0], xy[top < 0, 1], c="lightgrey", s=12)
    a1.set_aspect("equal")
    a1.set_title("points coloured by their strongest latent", fontsize=9)
    a1.set_xticks([])
    a1.set_yticks([])
    pts, lat = np.nonzero(z[:, used] != 0)
    a2.scatter(np.remainder(tt[pts], period) / period * 360, rank[lat], s=3, c=cmap(rank[lat] / max(len(used), 1)))
    a2.set_xlabel("position on the curve (degrees)")
    a2.set_ylabel("latent (sorted by mean position)")
    a2.set_title(f"where each of {len(used)} latents fires", fontsize=9)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def input_membership(membership: np.ndarray, d_in: int) -> np.ndarray:
    """Module id of each input dimension of an SAE whose input concatenates copies of a layer (folded
    embeddings: dimension j of token 0, then of token 1, ...): membership tiled to ``d_in``.
    Usage: ``input_membership(parts.membership["embed"], 64)``."""
    m = np.asarray(membership)
    if d_in % len(m):
        raise ValueError(f"an input of {d_in} dimensions is not whole copies of a layer of {len(m)} units")
    return np.tile(m, d_in // len(m))


def module_purity(
    W_enc: Tensor, membership: np.ndarray, shuffles: int = 200, seed: int = 0, live: Tensor | None = None
) -> dict:
    """Does each latent read from one module? Fraction of |W_enc[i]| mass on its top module, vs shuffled modules.

    ``membership`` [d_in]: module id of each input unit (−1: in no module; their mass counts against
    purity, since the latent reads outside every module). ``live`` [n] picks the latents to score
    (default: all with a non-zero encoder row). The baseline shuffles the ids over the units
    ``shuffles`` times (all at once: one batched matmul). Returns purity (mean), its median, the
    baseline mean, and the per-latent top module counts.
    Usage: ``module_purity(sae.W_enc, parts.membership["hidden1"])["purity"]``.
    """
    w = W_enc.detach().to(torch.float64).abs()
    mem = torch.as_tensor(np.asarray(membership), dtype=torch.long)
    if w.dim() != 2 or w.shape[1] != len(mem):
        raise ValueError(f"W_enc must be [n_latents, {len(mem)}] for {len(mem)} module labels, got {tuple(w.shape)}")
    if not bool((mem >= 0).any()):
        raise ValueError("no input unit belongs to a module (membership is all -1)")
    keep = (w.sum(1) > 0) if live is None else torch.as_tensor(live, dtype=torch.bool)
    w = w[keep]
    n_mod = int(mem.max()) + 1
    total = w.sum(1).clamp_min(1e-300)

    def purity_of(labels: Tensor) -> Tensor:  # labels [S, d_in] -> [S, n] top-module fraction
        onehot = torch.nn.functional.one_hot(labels.clamp_min(0), n_mod).to(torch.float64) * (labels >= 0)[..., None]
        return (w @ onehot).amax(-1) / total  # [S, n, modules] -> [S, n]

    own = purity_of(mem[None])[0]
    g = torch.Generator().manual_seed(seed)
    perms = torch.argsort(torch.rand(shuffles, len(mem), generator=g), dim=1)
    base = purity_of(mem[perms])
    onehot = torch.nn.functional.one_hot(mem.clamp_min(0), n_mod).to(torch.float64) * (mem >= 0)[:, None]
    top = (w @ onehot).argmax(1)
    return {
        "latents": int(keep.sum()),
        "modules": n_mod,
        "purity": float(own.mean()),
        "purity_median": float(own.median()),
        "baseline": float(base.mean()),
        "top_module_counts": torch.bincount(top, minlength=n_mod).tolist(),
    }
