"""Path-shared leaves: train an FFF's leaves as sums of offsets along their root paths.

A hard FFF gives each leaf only the samples routed to it (a depth-4 tree on 4,000 samples:
about 250 per leaf), so each leaf learns from little data. This training-time
reparametrisation shares statistical strength along the tree: every tree position ``v``
(internal node or leaf) owns an offset ``δ_v`` shaped like one leaf's weights, and leaf
``j``'s weights are the sum of the offsets on its root path::

    W_leaf(j) = δ_root + δ_child + ... + δ_leaf(j)

The root offset is trained by every sample, a depth-k offset by the samples of its subtree,
and weight decay on the offsets pulls each leaf towards its ancestors (hierarchical
shrinkage). The deployed layer is unchanged: ``merge_shared_leaves`` writes the summed weights
back as ordinary parameters, so the hard forward, the C kernel and checkpoints see a plain
:class:`FFF`. Starting offsets are zero everywhere except the leaves, which hold the layer's
current weights, so sharing a trained or freshly initialised layer does not change its output.

    >>> layer = share_leaves(FFF(40, leaf_width=8, output_width=10, depth=4))
    >>> ...train as usual (the optimiser sees the offsets)...
    >>> merge_shared_leaves(layer)  # a plain FFF again, for fast hard inference

Measured on MNIST-1D (``benchmarks/fff_accuracy.py --share-leaves``; README FFF section).
Built on ``torch.nn.utils.parametrize``; the sum is one broadcast add per tree level.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from topotorch.layers.fff import FFF

__all__ = ["PathSum", "share_leaves", "merge_shared_leaves", "LEAF_PARAMETERS"]

LEAF_PARAMETERS = ("w1s", "b1s", "w2s", "b2s")


class PathSum(nn.Module):
    """Parametrisation: per-position offsets (2L-1, ...) in heap order -> per-leaf sums (L, ...).

    Heap order: the root is 0, node k's children are 2k+1 and 2k+2, level k holds positions
    2^k-1 .. 2^(k+1)-2, and the leaves are the last L. Usage:
    ``parametrize.register_parametrization(layer, "w1s", PathSum(layer.depth))``.
    """

    def __init__(self, depth: int):
        super().__init__()
        self.depth = int(depth)
        self.n_leaves = 2**self.depth

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        L = self.n_leaves
        if offsets.shape[0] != 2 * L - 1:
            raise ValueError(
                f"PathSum(depth={self.depth}) expects {2 * L - 1} offsets, got shape {tuple(offsets.shape)}"
            )
        rest = offsets.shape[1:]
        total = offsets[L - 1 :]
        for level in range(self.depth):  # d broadcast adds: each level's offsets cover 2^(d-level) leaves
            lo = 2**level - 1
            here = offsets[lo : 2 * lo + 1]
            total = total + here.unsqueeze(1).expand(here.shape[0], L // here.shape[0], *rest).reshape(L, *rest)
        return total

    def right_inverse(self, leaf_weights: torch.Tensor) -> torch.Tensor:
        """Offsets that reproduce ``leaf_weights`` exactly: the leaves hold them, the rest is zero."""
        offsets = leaf_weights.new_zeros(2 * self.n_leaves - 1, *leaf_weights.shape[1:])
        offsets[self.n_leaves - 1 :] = leaf_weights
        return offsets


def share_leaves(layer: FFF, parameters: Iterable[str] = LEAF_PARAMETERS) -> FFF:
    """Reparametrise ``layer``'s leaf weights as path sums of per-position offsets (in place).

    The layer's output is unchanged. Build the optimiser *after* this call: the trainable
    tensors become ``layer.parametrizations.<name>.original``. Returns ``layer``. (A deep copy
    shares torch's injected parametrised class with the original: merge the copy, not only the
    original, before using it on its own.)
    Usage: ``share_leaves(model.fff); opt = torch.optim.AdamW(model.parameters())``.
    """
    if not isinstance(layer, FFF):
        raise TypeError(f"share_leaves expects an FFF layer, got {type(layer).__name__}")
    names = tuple(parameters)
    unknown = [n for n in names if n not in LEAF_PARAMETERS]
    if unknown:
        raise ValueError(f"share_leaves: unknown leaf parameter(s) {unknown}; choose from {LEAF_PARAMETERS}")
    for name in names:
        if parametrize.is_parametrized(layer, name):
            raise ValueError(f"share_leaves: {name} is already parametrised")
        parametrize.register_parametrization(layer, name, PathSum(layer.depth))
    return layer


def merge_shared_leaves(layer: FFF) -> FFF:
    """Write the path sums back as ordinary leaf parameters and drop the offsets (in place).

    After this the layer is a plain :class:`FFF` (fast hard inference, plain state dict).
    A layer without shared leaves is returned unchanged. Usage: ``merge_shared_leaves(layer)``.
    """
    for name in LEAF_PARAMETERS:
        if parametrize.is_parametrized(layer, name):
            parametrize.remove_parametrizations(layer, name, leave_parametrized=True)
    return layer
