"""Cortical sheets: a layer's units laid out on an h x w grid, each unit's weights its feature vector.

TopoNets (Deb, Deb & Murty, ICLR 2025) put the *output* units of a layer on a 2-D sheet: unit i
sits at row ``i // w``, column ``i % w``, and its feature vector is its incoming weights
(Linear: a row of ``W``; Conv2d: ``Cin*k*k`` values; Conv1d: ``Cin*k`` values). The default shape
is the paper's divisor rule: h = the largest divisor of the unit count that is <= sqrt(count)
(64 -> 8x8, 3072 -> 48x64, 100 -> 10x10). A prime count gives a useless 1 x N sheet (warned).
The *input* side is supported too: input unit j's feature vector is column j of ``W``.

    >>> sheet_shape(3072)  # (48, 64)
    >>> sheets = find_sheets(model, "*.mlp.0")  # every transformer block's first MLP projection
    >>> sheets[0].features().shape  # (h, w, E): a view of the weights, gradients flow
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

SHEET_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
Side = Literal["output", "input"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: a transposed Linear, weight (nx, nf) = (in, out), ``y = x @ W + b``.

    Recognised by class name, its ``nf`` attribute and the weight's shape, without importing transformers.
    """
    w = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(nf, int)
        and isinstance(w, torch.Tensor)
        and w.dim() == 2
        and w.shape[1] == nf
    )


def layer_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """``module.weight`` / ``module.bias`` as a tensor (nn.Module types its attributes ``Tensor | Module``).

    Usage: ``layer_tensor(nn.Linear(2, 3), "weight").shape  # (3, 2)``.
    """
    t = getattr(module, name)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is a {type(t).__name__}, not a tensor")
    return t


def is_sheet_layer(module: nn.Module) -> bool:
    """A layer that can carry a cortical sheet: nn.Linear, nn.Conv1d, nn.Conv2d or HF ``Conv1D``."""
    return isinstance(module, SHEET_LAYERS) or is_hf_conv1d(module)


class DegenerateSheetWarning(UserWarning):
    """A unit count with no divisor between 2 and sqrt(count) gives a 1 x N sheet: no 2-D topography."""


def sheet_shape(n: int, shape: tuple[int, int] | str | None = None, warn: bool = True) -> tuple[int, int]:
    """The (h, w) sheet for ``n`` units: the divisor rule by default, or a user shape that must hold n.

    ``shape`` may be ``(h, w)`` or ``"HxW"``. A shape that does not hold exactly ``n`` units raises
    ``ValueError``; the rule's 1 x N sheet for a prime count warns (:class:`DegenerateSheetWarning`).
    Usage: ``sheet_shape(64)`` -> ``(8, 8)``; ``sheet_shape(64, "4x16")`` -> ``(4, 16)``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"a sheet needs a positive number of units, got {n!r}")
    if shape is not None:
        if isinstance(shape, str):
            try:
                h, w = (int(v) for v in shape.lower().split("x"))
            except ValueError:
                raise ValueError(f"bad sheet shape {shape!r}: expected 'HxW', e.g. '8x8'") from None
        else:
            try:
                h, w = (int(v) for v in shape)
            except (TypeError, ValueError):
                raise ValueError(f"bad sheet shape {shape!r}: expected (h, w)") from None
        if h < 1 or w < 1 or h * w != n:
            raise ValueError(
                f"sheet shape {h}x{w} holds {h * w} units but the layer has {n}; "
                f"use a shape with h*w = {n}, e.g. {'x'.join(map(str, sheet_shape(n, warn=False)))}"
            )
        return h, w
    h = math.isqrt(n)
    while n % h:
        h -= 1
    if h == 1 and n > 3 and warn:
        warnings.warn(
            f"{n} units is prime: the divisor rule gives a 1x{n} sheet (no 2-D topography); "
            "pass a shape or change the width",
            DegenerateSheetWarning,
            stacklevel=2,
        )
    return h, n // h


@dataclass
class CorticalSheet:
    """One layer's units on an h x w sheet. ``features()`` is (h, w, E), differentiable.

    ``side="output"``: units are output features/channels, feature vector = incoming weights.
    ``side="input"``: units are input features/channels, feature vector = outgoing weights.
    ``bias=True`` appends the unit's bias as one more feature (output side only).
    Usage: ``CorticalSheet.of(nn.Linear(64, 100))``.
    """

    name: str
    module: nn.Module
    h: int
    w: int
    side: Side = "output"
    bias: bool = False

    @classmethod
    def of(
        cls,
        module: nn.Module,
        name: str = "",
        shape: tuple[int, int] | str | None = None,
        side: Side = "output",
        bias: bool = False,
    ) -> CorticalSheet:
        """The sheet of one Linear/Conv1d/Conv2d module. Usage: ``CorticalSheet.of(conv, shape="4x8")``."""
        if not is_sheet_layer(module):
            raise TypeError(
                f"layer {name or type(module).__name__!r} is a {type(module).__name__}; "
                "cortical sheets need nn.Linear, nn.Conv1d, nn.Conv2d or Hugging Face Conv1D"
            )
        if side not in ("output", "input"):
            raise ValueError(f"side must be 'output' or 'input', got {side!r}")
        if bias and side == "input":
            raise ValueError("bias=True is for output sheets (a bias belongs to an output unit)")
        if bias and getattr(module, "bias", None) is None:
            raise ValueError(f"layer {name!r} has no bias")
        out_dim = 1 if is_hf_conv1d(module) else 0  # HF Conv1D keeps its weight as (in, out)
        wt = layer_tensor(module, "weight")
        n = wt.shape[out_dim] if side == "output" else wt.shape[1 - out_dim]
        h, w = sheet_shape(int(n), shape)
        return cls(name, module, h, w, side, bias)

    @property
    def units(self) -> int:
        return self.h * self.w

    def _weight(self) -> torch.Tensor:
        """The weight as (out, in, ...): HF Conv1D's (in, out) weight is seen transposed."""
        wt = layer_tensor(self.module, "weight")
        return wt.t() if is_hf_conv1d(self.module) else wt

    @property
    def feature_dim(self) -> int:
        wt = self._weight()
        per = wt[0].numel() if self.side == "output" else wt.shape[0] * wt[0, 0].numel()
        return per + int(self.bias)

    def features(self) -> torch.Tensor:
        """(h, w, E) feature vectors of the units, a differentiable function of the layer's weights."""
        wt = self._weight()
        if self.side == "output":
            f = wt.reshape(wt.shape[0], -1)
            if self.bias:
                f = torch.cat([f, layer_tensor(self.module, "bias").unsqueeze(1)], dim=1)
        else:
            f = wt.transpose(0, 1).reshape(wt.shape[1], -1)
        return f.reshape(self.h, self.w, -1)

    def coordinates(self) -> torch.Tensor:
        """(units, 2) integer (row, column) of every unit: unit i at (i // w, i % w)."""
        i = torch.arange(self.units)
        return torch.stack([i // self.w, i % self.w], dim=1)


def find_sheets(
    model: nn.Module,
    pattern: str = "*",
    shape: tuple[int, int] | str | None = None,
    side: Side = "output",
    bias: bool = False,
) -> list[CorticalSheet]:
    """The sheets of every Linear/Conv1d/Conv2d (or HF GPT-2 ``Conv1D``) whose module name matches ``pattern``.

    Several patterns may be given comma-separated (``"*.mlp.0,*.conv1"``). A pattern that matches
    no such layer raises ``ValueError`` listing the layers there are. Modules shared under two
    names (tied weights) count once; ``""`` names the model itself (a bare layer).
    Usage: ``find_sheets(gpt, "*.mlp.0")``.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"layer pattern must be a string like '*.mlp.0', got {pattern!r}")
    pats = [p.strip() for p in pattern.split(",") if p.strip()] or [""]  # "": the model itself
    layers = [(n, m) for n, m in model.named_modules() if is_sheet_layer(m)]
    out, seen = [], set()
    for p in pats:
        hits = [(n, m) for n, m in layers if fnmatch.fnmatchcase(n, p)]
        if not hits:
            known = ", ".join(n for n, _ in layers[:12]) + (" ..." if len(layers) > 12 else "")
            raise ValueError(f"layer pattern {p!r} matches no Linear/Conv layer; layers: {known or '(none)'}")
        for n, m in hits:
            if id(m) not in seen:
                seen.add(id(m))
                out.append(CorticalSheet.of(m, n, shape, side, bias))
    return out


def default_layers(model: nn.Module) -> str:
    """The paper's choice of layers as a pattern: every transformer block's first MLP projection
    (``*.mlp.0``, NanoGPT's ``c_fc``), else every conv inside residual blocks, else every Linear/Conv
    but the last (the output layer's units are labels, not a sheet).

    Usage: ``find_sheets(model, default_layers(model))``.
    """
    names = [n for n, m in model.named_modules() if is_sheet_layer(m)]
    for pats in (("*.mlp.0", "*.c_fc"), ("*blocks.*.conv*",)):
        hit = [p for p in pats if any(fnmatch.fnmatchcase(n, p) for n in names)]
        if hit:
            return ",".join(hit)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv layer for a cortical sheet")
    return ",".join(names[:-1] or names)
