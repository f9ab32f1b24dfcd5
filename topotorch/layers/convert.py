"""Convert a model's MLP blocks into FFF layers of a given training width.

    >>> from topotorch.models import TinyGPT
    >>> gpt = TinyGPT(vocab=65, d_model=64, n_layers=2)       # blocks.{0,1}.mlp: Linear-GELU-Linear, 256 wide
    >>> fffify(gpt, include="blocks.*.mlp", leaf_width=8)       # -> FFF(64, 8, 64, depth=5), training width 256
    ['blocks.0.mlp', 'blocks.1.mlp']

An MLP block is an ``nn.Sequential`` of ``Linear, activation, Linear`` (``Dropout`` /
``Identity`` anywhere in it are ignored). The FFF gets the block's input and output widths,
a copy of its activation, its dtype and device, and fresh weights: train (or fine-tune)
after converting.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from typing import Literal

from torch import nn

from topotorch.layers.fff import FFF, UltraFFF

__all__ = ["fffify", "mlp_blocks"]

_IGNORED = (nn.Dropout, nn.Identity)


def _as_mlp_block(module: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear] | None:
    if not isinstance(module, nn.Sequential):
        return None
    parts = [m for m in module if not isinstance(m, _IGNORED)]
    if (len(parts) == 3 and isinstance(parts[0], nn.Linear) and isinstance(parts[2], nn.Linear)
            and not isinstance(parts[1], (nn.Linear, nn.Sequential))
            and parts[0].out_features == parts[2].in_features):
        return parts[0], parts[1], parts[2]
    return None


def mlp_blocks(model: nn.Module, include: str | list[str] = "*") -> list[str]:
    """Qualified names of the MLP blocks (Linear-activation-Linear Sequentials) matching ``include``.

    ``include`` is a glob (or list of globs) on the qualified module name, e.g. ``"blocks.*.mlp"``.
    Usage: ``mlp_blocks(gpt, "blocks.*.mlp")``.
    """
    patterns = [include] if isinstance(include, str) else list(include)
    return [name for name, m in model.named_modules()
            if name and _as_mlp_block(m) is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def fffify(
    model: nn.Module,
    include: str | list[str] = "*",
    *,
    leaf_width: int = 8,
    training_width: int | None = None,
    depth: int | None = None,
    variant: Literal["fff", "ultra"] = "fff",
    n_trees: int = 1,
    **fff_kwargs,
) -> list[str]:
    """Replace the MLP blocks of ``model`` matching ``include`` by FFF layers, in place.

    The training width (2^depth·leaf_width) defaults to each block's hidden width; give
    ``depth`` or ``training_width`` to change it (it must be leaf_width times a power of two).
    ``variant="ultra"`` builds :class:`UltraFFF` trees (``n_trees`` of them, depth chosen so
    that n_trees·(2^(depth+1)-1) ≈ training width, i.e. depth = log2(width/n_trees + 1) - 1).
    Extra keyword arguments go to the layer (e.g. ``region_leak=0.1``). Returns the names
    replaced. Usage: ``fffify(gpt, "blocks.*.mlp", leaf_width=8)``.
    """
    names = mlp_blocks(model, include)
    if not names:
        found = mlp_blocks(model, "*")
        raise ValueError(f"no MLP block (Sequential of Linear, activation, Linear) matches {include!r}; "
                         f"MLP blocks in this model: {found or 'none'}")
    if variant not in ("fff", "ultra"):
        raise ValueError(f"variant must be 'fff' or 'ultra', got {variant!r}")
    replacements = {}
    for name in names:
        fc1, act, fc2 = _as_mlp_block(model.get_submodule(name))
        kw = {"device": fc1.weight.device, "dtype": fc1.weight.dtype}
        width = training_width or fc1.out_features
        if variant == "ultra":
            d = depth if depth is not None else math.log2(width / n_trees + 1) - 1
            if d != int(d) or d < 0:
                raise ValueError(f"{name}: UltraFFF needs width/n_trees + 1 to be a power of two, got width {width}, "
                                 f"n_trees {n_trees}; pass depth=")
            replacements[name] = UltraFFF(fc1.in_features, fc2.out_features, int(d), n_trees,
                                          activation=copy.deepcopy(act), **fff_kwargs, **kw)
            continue
        if depth is not None:
            d = depth
        else:
            d = math.log2(width / leaf_width) if width % leaf_width == 0 else -1
            if d != int(d) or d < 0:
                raise ValueError(f"{name}: training width {width} is not leaf_width ({leaf_width}) times a power of "
                                 f"two; pass training_width= or depth=")
        replacements[name] = FFF(fc1.in_features, leaf_width, fc2.out_features, int(d),
                                 activation=copy.deepcopy(act), **fff_kwargs, **kw)
    for name, layer in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return names
