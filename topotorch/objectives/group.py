"""Neuron group lasso through the coupling graph: a penalty that kills whole neurons, channels and head dims.

For every hidden neuron n of the chosen spaces, its *group* is everything it writes: the slices of
the connection weights where its space is the **source** (an MLP neuron's column of the next
layer, a conv channel's input-channel slice ``W[:, c]`` of every conv that reads it, kernels
included, an attention dim's output-projection column). The penalty is the sum of their L2 norms
(group lasso; Yuan & Lin 2006, structured sparsity learning of Wen et al. 2016):

    G(θ) = Σ_spaces Σ_n  sqrt( Σ_{c: source(c) = space}  Σ_{i ∈ owned_c(n)} ‖W_c[..., i, ...]‖² )

Unlike L1 (BIMT's wiring cost), whose optimum zeros single weights, the non-differentiability of
the norm at 0 zeroes a whole group at once — and a neuron whose outgoing weights are all zero is
exactly what :func:`topotorch.compression.shrink.shrink` removes. The gradient at an exactly zero
group is taken as 0 (a subgradient), so it is never NaN.

Default spaces: every ``hidden`` space relocated by ``"weights"``, except residual streams (or any
space) normalised by a LayerNorm/GroupNorm/RMSNorm — ``shrink`` keeps those dims anyway.

    >>> loss = task_loss + lam * wiring_cost(g, cfg) + group_lam * neuron_group_norm(g)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from topotorch.graph import SpatialGraph
from topotorch.graph.core import normalised_by_feature_norm


def group_spaces(graph: SpatialGraph) -> list[str]:
    """Names of the spaces :func:`neuron_group_norm` penalises by default (see the module docstring)."""

    return [
        s.name
        for s in graph.spaces
        if s.role == "hidden"
        and s.relocate == "weights"
        and not normalised_by_feature_norm(graph.model, s)
        and any(c.source == s.name for c in graph.connections)
    ]


def _plan(graph: SpatialGraph, spaces: tuple[str, ...] | None) -> tuple[list, int]:
    """Per connection read by a chosen space: (weight name, source dim, flat owned indices, owner row
    in the concatenated neuron vector, K). Cached on the graph (slices never change; relocation
    permutes weights, not indices)."""

    def build() -> tuple[list, int]:
        names = list(spaces) if spaces is not None else group_spaces(graph)
        offset, items = 0, []
        for name in names:
            sp = graph.space(name)
            for c in graph.outgoing(name):
                idx = c.source_slice.index
                n, k = idx.shape
                owner = offset + torch.arange(n)
                items.append((c.weight, c.source_slice.dim, idx.reshape(-1), owner, k))
            offset += sp.size
        return items, offset

    return graph.cached(("group", spaces), build)


def neuron_group_sq(graph: SpatialGraph, spaces: Iterable[str] | None = None) -> torch.Tensor:
    """Per neuron, Σ of squared outgoing weights (the chosen spaces' neurons concatenated in order)."""
    items, total = _plan(graph, tuple(spaces) if spaces is not None else None)
    if not items:
        raise ValueError("neuron_group_norm: no chosen space writes through any connection")
    acc: torch.Tensor | None = None
    for wname, dim, flat, owner, k in items:
        w = graph.tensor(wname)
        per_index = w.pow(2).sum(dim=[d for d in range(w.ndim) if d != dim]) if w.ndim > 1 else w.pow(2)
        per_neuron = per_index.index_select(0, flat.to(w.device)).reshape(-1, k).sum(1)
        if acc is None:
            acc = torch.zeros(total, dtype=w.dtype, device=w.device)
        acc = acc.index_add(0, owner.to(w.device), per_neuron)
    assert acc is not None  # items is not empty (checked above)
    return acc


def neuron_group_norm(graph: SpatialGraph, spaces: Iterable[str] | None = None) -> torch.Tensor:
    """Σ over hidden neurons of the L2 norm of everything each writes (a differentiable scalar).

    ``spaces``: names of the spaces to penalise (default: :func:`group_spaces`). Gradient at an
    exactly zero group: 0. Usage: ``(group_lam * neuron_group_norm(g)).backward()``.
    """
    sq = neuron_group_sq(graph, spaces)
    alive = sq > 0
    safe = torch.where(alive, sq, torch.ones_like(sq))  # sqrt'(0) = inf would give 0·inf = NaN
    return torch.where(alive, safe.sqrt(), torch.zeros_like(sq)).sum()
