"""The input-space partition of an FFF: which inputs go to which leaf.

    >>> usage = leaf_usage(layer, x)  # counts, fractions, effective number of leaves
    >>> table = class_leaf_table(layer, x, y)  # (leaves, classes) counts
    >>> print(format_class_leaf_table(table))  # markdown: leaf, n, majority class, purity
    >>> draw_regions(layer, x, y, path="regions.png")  # 2-D inputs: which leaf owns which region

For an FFF deeper inside a model, :func:`layer_inputs` captures what reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from topotorch.layers.fff import FFF

__all__ = ["LeafUsage", "leaf_usage", "class_leaf_table", "format_class_leaf_table", "layer_inputs", "draw_regions"]


@dataclass
class LeafUsage:
    """How samples spread over the leaves (hard routing)."""

    counts: torch.Tensor  # (n_leaves,) samples per leaf
    n_samples: int
    n_used: int  # leaves with at least one sample
    entropy_bits: float  # entropy of the leaf distribution
    max_fraction: float  # share of the busiest leaf

    @property
    def n_leaves(self) -> int:
        return int(self.counts.numel())

    @property
    def fractions(self) -> torch.Tensor:
        return self.counts.double() / max(1, self.n_samples)

    @property
    def effective_leaves(self) -> float:
        """2^entropy: the number of equally used leaves with the same entropy."""
        return 2.0**self.entropy_bits

    def as_dict(self) -> dict:
        return {
            "n_samples": self.n_samples,
            "n_leaves": self.n_leaves,
            "n_used": self.n_used,
            "entropy_bits": self.entropy_bits,
            "effective_leaves": self.effective_leaves,
            "max_fraction": self.max_fraction,
        }


@torch.no_grad()
def leaf_usage(layer: FFF, x: torch.Tensor) -> LeafUsage:
    """Leaf usage statistics of ``layer`` on inputs ``x`` (..., in). Usage: ``leaf_usage(layer, x).n_used``."""
    leaves = layer.route(x).reshape(-1)
    counts = torch.bincount(leaves, minlength=layer.n_leaves).cpu()
    n = int(counts.sum())
    frac = counts.double() / max(1, n)
    nz = frac[frac > 0]
    entropy = float(-(nz * nz.log2()).sum()) if n else 0.0
    return LeafUsage(
        counts=counts,
        n_samples=n,
        n_used=int((counts > 0).sum()),
        entropy_bits=entropy,
        max_fraction=float(frac.max()) if n else 0.0,
    )


@torch.no_grad()
def class_leaf_table(layer: FFF, x: torch.Tensor, y: torch.Tensor, n_classes: int | None = None) -> torch.Tensor:
    """Counts (n_leaves, n_classes): how many samples of each class land in each leaf.

    Usage: ``class_leaf_table(layer, x_test, y_test)``.
    """
    leaves = layer.route(x).reshape(-1).cpu()
    y = y.reshape(-1).cpu().long()
    if leaves.shape != y.shape:
        raise ValueError(f"labels must match the routed samples: {tuple(y.shape)} vs {tuple(leaves.shape)}")
    c = int(n_classes) if n_classes is not None else int(y.max()) + 1 if y.numel() else 0
    flat = torch.bincount(leaves * c + y, minlength=layer.n_leaves * c) if c else torch.zeros(0, dtype=torch.long)
    return flat.view(layer.n_leaves, c)


def format_class_leaf_table(table: torch.Tensor, class_names: list[str] | None = None, top: int | None = None) -> str:
    """A markdown table of a :func:`class_leaf_table`: per used leaf its samples, majority class,
    purity (majority share) and class counts; a last line gives the sample-weighted purity.
    Usage: ``print(format_class_leaf_table(table, top=16))``.
    """
    n_leaves, c = table.shape
    names = class_names or [str(k) for k in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} classes")
    per_leaf = table.sum(1)
    order = [int(j) for j in torch.argsort(per_leaf, descending=True, stable=True) if per_leaf[j] > 0]
    shown = order[:top] if top else order
    lines = ["| leaf | n | majority | purity | " + " | ".join(names) + " |", "|---:|---:|---:|---:|" + "---:|" * c]
    for j in shown:
        row = table[j]
        k = int(row.argmax())
        lines.append(
            f"| {j} | {int(per_leaf[j])} | {names[k]} | {float(row[k]) / float(per_leaf[j]):.2f} | "
            + " | ".join(str(int(v)) if v else "·" for v in row)
            + " |"
        )
    total = int(per_leaf.sum())
    purity = float(table.max(1).values.sum()) / max(1, total)
    if top and len(order) > top:
        lines.append(f"| … {len(order) - top} more used leaves | | | | " + " | ".join("" for _ in names) + " |")
    lines.append(f"\n{len(order)} of {n_leaves} leaves used by {total} samples; weighted purity {purity:.3f}")
    return "\n".join(lines)


@torch.no_grad()
def layer_inputs(model: nn.Module, layer_name: str, x: torch.Tensor) -> torch.Tensor:
    """What reaches submodule ``layer_name`` when ``model(x)`` runs (via a forward hook).

    Usage: ``h = layer_inputs(gpt, "blocks.0.mlp", tokens); leaf_usage(gpt.blocks[0].mlp, h)``.
    """
    layer = model.get_submodule(layer_name)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        model(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{layer_name!r} was not called by the model's forward")
    return captured[0]


@torch.no_grad()
def draw_regions(
    layer: FFF,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    path: str | Path | None = None,
    resolution: int = 300,
    margin: float = 0.5,
    title: str | None = None,
):
    """Picture of the leaf regions of an FFF with 2-D inputs: each leaf's region in its own
    colour, the region boundaries, and the samples (marker per class). Returns the figure;
    saves it when ``path`` is given. Usage: ``draw_regions(layer, x, y, path="regions.png")``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if layer.input_width != 2:
        raise ValueError(f"draw_regions needs an FFF with 2-D inputs, this one takes {layer.input_width}")
    xs = x.detach().cpu().double().numpy()
    lo, hi = xs.min(0) - margin, xs.max(0) + margin
    g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], resolution), np.linspace(lo[1], hi[1], resolution))
    grid = torch.as_tensor(np.stack([g0.ravel(), g1.ravel()], 1), dtype=layer.w1s.dtype, device=layer.w1s.device)
    leaves = layer.route(grid).cpu().numpy().reshape(resolution, resolution)
    usage = leaf_usage(layer, x)
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    cmap = plt.get_cmap("tab20" if layer.n_leaves <= 20 else "gist_ncar", max(layer.n_leaves, 2))
    ax.imshow(
        leaves,
        origin="lower",
        extent=(lo[0], hi[0], lo[1], hi[1]),
        cmap=cmap,
        vmin=-0.5,
        vmax=max(layer.n_leaves, 2) - 0.5,
        alpha=0.55,
        interpolation="nearest",
        aspect="auto",
    )
    ax.contour(g0, g1, leaves, levels=np.arange(layer.n_leaves) + 0.5, colors="k", linewidths=0.6)
    for j in range(layer.n_leaves):  # label each visible region at its centre of mass
        mask = leaves == j
        if mask.sum() > 0.002 * mask.size:
            ax.text(g0[mask].mean(), g1[mask].mean(), str(j), ha="center", va="center", fontsize=9, weight="bold")
    if y is not None:
        ys = y.detach().cpu().numpy().reshape(-1)
        markers = "o^sDv<>p*h"
        for k in np.unique(ys):
            sel = ys == k
            ax.scatter(
                xs[sel, 0],
                xs[sel, 1],
                s=12,
                marker=markers[int(k) % len(markers)],
                c="white",
                edgecolors="k",
                linewidths=0.6,
                label=f"class {int(k)}",
            )
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_title(
        title
        or f"FFF depth {layer.depth}: {usage.n_used} of {layer.n_leaves} leaves used "
        f"(effective {usage.effective_leaves:.1f})"
    )
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
