"""Concept localisation: which contiguous region of a cortical sheet responds to one set of inputs
more than to another, and what ablating it does.

1. t-map: Welch t per unit, target rows vs other rows (:func:`topotorch.analysis.maps.selectivity`).
2. Region: units with t above ``threshold`` (default: half the peak t, like a full width at half
   maximum, and at least 2; or the top ``top`` fraction of units), split into 4-connected components
   on the sheet; the region is the component with the largest Σt.
3. Ablation: the region's outputs are zeroed (:func:`~topotorch.analysis.ablation.region_knocked_out`)
   and the task metric is measured on both sets, next to a control ablation of as many randomly chosen units.

    >>> res = localize(model, "gpt.blocks.0.mlp.0", x_target, x_other, metric=lambda m, x: bpc(m, x))
    >>> res["region_units"], res["target"], res["other"]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from topotorch.analysis.ablation import region_knocked_out
from topotorch.analysis.maps import layer_activations, selectivity
from topotorch.sheets import CorticalSheet


def find_region(
    t: torch.Tensor, h: int, w: int, threshold: float | None = None, top: float | None = None
) -> torch.Tensor:
    """Indices of the most responsive 4-connected region of a t-map on an h x w sheet (empty if none).

    Usage: ``find_region(t, 16, 32)``.
    """
    from scipy import ndimage

    t = t.reshape(-1).to(torch.float64)
    if threshold is None and top is not None:
        k = max(1, round(top * t.numel()))
        threshold = max(2.0, float(t.topk(k).values[-1]) - 1e-12)
    elif threshold is None:
        threshold = max(2.0, 0.5 * float(t.max()))
    mask = (t > threshold).reshape(h, w).numpy()
    labels, n = ndimage.label(mask)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    lab = torch.from_numpy(labels.reshape(-1)).long()
    sums = torch.zeros(n + 1, dtype=torch.float64).index_add_(0, lab, torch.where(lab > 0, t, 0.0))
    best = int(sums[1:].argmax()) + 1
    return (lab == best).nonzero().reshape(-1)


def ablated(model: nn.Module, layer: str, units: torch.Tensor):
    """Within the block, the outputs ``units`` of module ``layer`` are zero.

    The same as :func:`topotorch.analysis.ablation.region_knocked_out`.

    Usage: ``with ablated(m, "0", idx): ...``.
    """
    return region_knocked_out(model, layer, units)


@torch.no_grad()
def localize(
    model: nn.Module,
    layer: str,
    x_target: torch.Tensor,
    x_other: torch.Tensor,
    metric: Callable[[nn.Module, torch.Tensor], float],
    threshold: float | None = None,
    top: float | None = None,
    seed: int = 0,
) -> dict:
    """Find the region of ``layer``'s sheet that prefers ``x_target`` over ``x_other`` and ablate it.

    ``metric(model, x)`` scores a set (e.g. bits/char); reported on both sets intact, with the region
    ablated, and with a same-size random control ablated. Usage: see the module docstring.
    """
    sheet = CorticalSheet.of(model.get_submodule(layer), layer)
    a_t = layer_activations(model, layer, x_target)
    a_o = layer_activations(model, layer, x_other)
    mask = torch.cat([torch.ones(len(a_t), dtype=torch.bool), torch.zeros(len(a_o), dtype=torch.bool)])
    t = selectivity(torch.cat([a_t, a_o]), mask)
    region = find_region(t, sheet.h, sheet.w, threshold, top)
    g = torch.Generator().manual_seed(seed)
    control = torch.randperm(sheet.units, generator=g)[: len(region)]
    out = {
        "layer": layer,
        "sheet": [sheet.h, sheet.w],
        "region_units": region.tolist(),
        "region_cells": [[int(i) // sheet.w, int(i) % sheet.w] for i in region],
        "t_max": float(t.max()),
        "t_region_mean": float(t[region].mean()) if len(region) else None,
    }
    for name, x in (("target", x_target), ("other", x_other)):
        row = {"intact": metric(model, x)}
        with ablated(model, layer, region):
            row["region_ablated"] = metric(model, x)
        with ablated(model, layer, control):
            row["random_ablated"] = metric(model, x)
        out[name] = row
    out["t_map"] = t.tolist()
    return out


def char_vocab(task_name: str) -> list[str]:
    """The character vocabulary of a character-level task (``shakespeare-char`` or ``text:PATH``).

    Usage: ``char_vocab("text:corpus.txt")``.
    """
    from pathlib import Path

    from topotorch.tasks.sequence import SHAKESPEARE

    if task_name == "shakespeare-char":
        path = SHAKESPEARE
    elif task_name.startswith("text:"):
        path = Path(task_name[5:])
    else:
        raise ValueError(f"concept localisation on text needs a character-level task, not {task_name!r}")
    if not path.is_file():
        raise ValueError(f"corpus {str(path)!r} of task {task_name!r} not found")
    return sorted(set(path.read_text(encoding="utf-8", errors="replace")))


def text_windows(text: str, vocab: list[str], block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(inputs, next-char targets, dropped) windows of ``text`` in ``vocab``; unknown characters are dropped.

    Usage: ``x, y, dropped = text_windows("to be or not", vocab, 64)``.
    """
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = [lookup[c] for c in text if c in lookup]
    dropped = len(text) - len(ids)
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 characters of the model's vocabulary")
    seq = torch.tensor(ids, dtype=torch.long)
    n = (len(seq) - 1) // block
    if n == 0:
        return seq[:-1].unsqueeze(0), seq[1:].unsqueeze(0), dropped
    return seq[: n * block].view(n, block), seq[1 : n * block + 1].view(n, block), dropped
