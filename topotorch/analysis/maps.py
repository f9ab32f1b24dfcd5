"""Cortical maps: per-unit selectivity on the sheet, its smoothness, and effective dimensionality.

Selectivity of unit i for a target set of inputs is Welch's two-sample t-value of its responses,

    t_i = (mean_T a_i − mean_O a_i) / sqrt(var_T a_i / n_T + var_O a_i / n_O)

(T: target inputs, O: the other inputs; unbiased variances), drawn on the layer's h x w sheet.

Smoothness of a map t over the sheet compares neighbours with random pairs (a variogram ratio):

    smoothness = 1 − γ(1) / γ(∞),   γ(1) = mean over 4-neighbour pairs (i, j) of (t_i − t_j)²,
                                    γ(∞) = mean over all pairs i ≠ j of (t_i − t_j)² = 2·N/(N−1)·var(t)

It is 1 for a map that does not change between neighbours, about 0 for a map whose units are
shuffled on the sheet, and negative for a checkerboard. For K maps (one per class) γ(1) and γ(∞)
are summed over the maps first. Effective dimensionality of activations A (samples x units) is
the participation ratio of the covariance eigenvalues λ: PR = (Σ λ)² / Σ λ².

    >>> acts = layer_activations(model, "0", x)  # (samples, units)
    >>> t = selectivity_maps(acts, y)  # (classes, units)
    >>> smoothness(t, 10, 10), effective_dimensionality(acts)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


@torch.no_grad()
def layer_activations(model: nn.Module, layer: str, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The outputs of module ``layer`` on inputs ``x`` as (samples, units), float64.

    Sequence outputs (batch, time, units) give one row per position; conv outputs (batch, C, ...) are
    averaged over space. Usage: ``layer_activations(gpt, "gpt.blocks.0.mlp.0", tokens)``.
    """
    module = model.get_submodule(layer)
    out: list[torch.Tensor] = []

    def hook(m, inp, o):
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            o = o.flatten(2).mean(-1)
        out.append(o.reshape(-1, o.shape[-1]).to(torch.float64))

    handle = module.register_forward_hook(hook)
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(out)


def selectivity(acts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Welch t-value per unit, target rows vs the other rows. ``target`` is a boolean (samples,) mask.

    Usage: ``selectivity(acts, labels == 3)``.
    """
    target = target.to(torch.bool).reshape(-1)
    if target.shape[0] != acts.shape[0]:
        raise ValueError(f"target mask has {target.shape[0]} rows but activations have {acts.shape[0]}")
    n1, n0 = int(target.sum()), int((~target).sum())
    if n1 < 2 or n0 < 2:
        raise ValueError(f"need at least 2 target and 2 other samples, got {n1} and {n0}")
    a1, a0 = acts[target], acts[~target]
    se = (a1.var(0) / n1 + a0.var(0) / n0).sqrt().clamp_min(1e-12)
    return (a1.mean(0) - a0.mean(0)) / se


def selectivity_maps(acts: torch.Tensor, labels: torch.Tensor, classes: list[int] | None = None) -> torch.Tensor:
    """One t-map per class (class vs the rest): (K, units). Usage: ``selectivity_maps(acts, y)``."""
    labels = labels.reshape(-1)
    classes = sorted(set(labels.tolist())) if classes is None else classes
    onehot = labels.unsqueeze(0) == torch.tensor(classes, device=labels.device).unsqueeze(1)  # (K, S)
    n1 = onehot.sum(1, keepdim=True).to(acts.dtype)
    n0 = acts.shape[0] - n1
    if (n1 < 2).any() or (n0 < 2).any():
        raise ValueError("every class needs at least 2 samples in and 2 out")
    f = onehot.to(acts.dtype)
    s1, q1 = f @ acts, f @ acts.square()
    s, q = acts.sum(0), acts.square().sum(0)
    m1, m0 = s1 / n1, (s - s1) / n0
    v1 = (q1 - n1 * m1.square()) / (n1 - 1)
    v0 = ((q - q1) - n0 * m0.square()) / (n0 - 1)
    return (m1 - m0) / (v1.clamp_min(0) / n1 + v0.clamp_min(0) / n0).sqrt().clamp_min(1e-12)


def smoothness(maps: torch.Tensor, h: int, w: int) -> float:
    """1 − γ(1)/γ(∞) of one (units,) map or K maps (K, units) on an h x w sheet (see the module doc).

    Usage: ``smoothness(t, 10, 10)``.
    """
    m = maps.reshape(-1, h, w).to(torch.float64)
    n = h * w
    if n < 2:
        raise ValueError("smoothness needs at least 2 units")
    dx = (m[:, :, 1:] - m[:, :, :-1]).square()
    dy = (m[:, 1:, :] - m[:, :-1, :]).square()
    pairs = dx[0].numel() + dy[0].numel()
    g1 = (dx.sum() + dy.sum()) / (pairs * m.shape[0])
    ginf = (2 * n / (n - 1) * m.reshape(m.shape[0], -1).var(1, unbiased=False)).mean()
    return float(1 - g1 / ginf.clamp_min(1e-300))


def effective_dimensionality(acts: torch.Tensor) -> float:
    """Participation ratio (Σλ)²/Σλ² of the activations' covariance. Usage: ``effective_dimensionality(acts)``."""
    a = acts.to(torch.float64)
    a = a - a.mean(0)
    lam = torch.linalg.svdvals(a).square()
    return float(lam.sum().square() / lam.square().sum().clamp_min(1e-300))


def draw_maps(
    maps: torch.Tensor, h: int, w: int, path: str | Path, titles: list[str] | None = None, suptitle: str = ""
) -> Path:
    """Save K t-maps as one PNG of K panels (diverging colours, symmetric range).

    Usage: ``draw_maps(t, 10, 10, "m.png")``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = maps.reshape(-1, h, w).detach().cpu().to(torch.float64).numpy()
    k = m.shape[0]
    cols = min(k, 5)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols * max(1.0, w / h) ** 0.5, 2.2 * rows), squeeze=False)
    lim = float(abs(m).max()) or 1.0
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < k:
            im = ax.imshow(m[i], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_title(titles[i] if titles else str(i), fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="t")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
