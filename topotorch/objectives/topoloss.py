"""TopoLoss (TopoNets): cortical-sheet smoothness of a layer's weights.

For a sheet S of shape (h, w, E) (see :mod:`topotorch.sheets`), blur it by downsampling by 1/φ
and upsampling back, B = up(down(S, 1/φ), (h, w)), and score

    L_layer = 1 - mean_i cos(S_i, B_i)          (i over the h*w units)
    TopoLoss = Σ_l τ_l L_l / n_layers           (reduction "mean", the reference's)
             | Σ_l τ_l L_l                      (reduction "sum": τ does not weaken as layers are added)

Interpolation is ``F.interpolate`` exactly as the reference ``topoloss`` 0.0.2 calls it (scale
factor 1/φ down, output size (h, w) up, align_corners=False): bilinear by default, nearest and
area too. Because these resamplings are separable linear maps, each axis is one small matrix
(D: h' x h down, U: h x h' up) built once, and every layer sharing a sheet shape is blurred in one
batched matmul chain: B = U_h · D_h · S · D_wᵀ · U_wᵀ — no per-layer Python work, no transposes.

    >>> loss = TopoLoss(model, "*.mlp.0", factor=4.0, tau=1.0)
    >>> (task_loss + loss()).backward()
    >>> loss.layerwise()        # {"blocks.0.mlp.0": tensor(0.93), ...}, unscaled
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from topotorch.sheets import CorticalSheet, Side, find_sheets

MODES = ("bilinear", "nearest", "area")
Mode = Literal["bilinear", "nearest", "area"]


def _pair(factor: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(factor, (int, float)) and not isinstance(factor, bool):
        f = (float(factor), float(factor))
    else:
        try:
            fh, fw = factor
            f = (float(fh), float(fw))
        except (TypeError, ValueError):
            raise ValueError(f"factor must be a number or (factor_h, factor_w), got {factor!r}") from None
    if not all(math.isfinite(v) and v >= 1.0 for v in f):
        raise ValueError(f"blur factor φ must be finite and >= 1, got {factor!r}")
    return f


@functools.lru_cache(maxsize=256)
def _axis_operators(h: int, w: int, fh: float, fw: float, mode: str,
                    size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (D_h, U_h, D_w, U_w) with up(down(X)) = U_h D_h X D_wᵀ U_wᵀ for an (h, w) image X.

    Read off by pushing one-hot images through ``F.interpolate`` (with the other axis constant, which
    every mode keeps constant), so the matrices reproduce its index and weight arithmetic exactly.
    ``size`` replaces the scale factors for the down step (compression to a chosen grid).
    """
    def down(x):
        if size is not None:
            return F.interpolate(x, size=size, mode=mode)
        return F.interpolate(x, scale_factor=(1 / fh, 1 / fw), mode=mode)

    def up(x):
        return F.interpolate(x, size=(h, w), mode=mode)

    eye_h = torch.eye(h, dtype=torch.float64)[:, :, None].expand(h, h, w).unsqueeze(0)  # channel a: row a lit
    eye_w = torch.eye(w, dtype=torch.float64)[:, None, :].expand(w, h, w).unsqueeze(0)  # channel b: column b lit
    dh = down(eye_h)[0, :, :, 0].T.contiguous()   # (h', h)
    dw = down(eye_w)[0, :, 0, :].T.contiguous()   # (w', w)
    hp, wp = dh.shape[0], dw.shape[0]
    if hp < 1 or wp < 1:
        raise ValueError(f"blur factor ({fh}, {fw}) does not fit a {h}x{w} sheet (downsampled to {hp}x{wp})")
    uh = up(torch.eye(hp, dtype=torch.float64)[:, :, None].expand(hp, hp, wp).unsqueeze(0))[0, :, :, 0].T.contiguous()
    uw = up(torch.eye(wp, dtype=torch.float64)[:, None, :].expand(wp, hp, wp).unsqueeze(0))[0, :, 0, :].T.contiguous()
    return dh, uh, dw, uw


def axis_operators(h: int, w: int, factor: float | Sequence[float] = 4.0, mode: Mode = "bilinear",
                   size: tuple[int, int] | None = None, dtype: torch.dtype = torch.float64,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """The separable down/up matrices (D_h, U_h, D_w, U_w) of one sheet shape.

    ``down(S) = D_h S D_wᵀ`` (h'×w'), ``up(T) = U_h T U_wᵀ`` (h×w), matching ``F.interpolate``.
    Usage: ``dh, uh, dw, uw = axis_operators(48, 64, factor=4)``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown interpolation {mode!r}; use one of {', '.join(MODES)}")
    fh, fw = _pair(factor)
    if size is None and (fh > h or fw > w):
        raise ValueError(f"blur factor ({fh:g}, {fw:g}) does not fit a {h}x{w} sheet (φ must be <= the side)")
    ops = _axis_operators(int(h), int(w), fh, fw, mode, None if size is None else (int(size[0]), int(size[1])))
    return tuple(o.to(dtype=dtype, device=device) for o in ops)


def blur(sheets: torch.Tensor, factor: float | Sequence[float] = 4.0, mode: Mode = "bilinear") -> torch.Tensor:
    """up(down(S, 1/φ)) of a batch of sheets ``(..., h, w, E)``. Usage: ``blur(torch.randn(8, 8, 5), 2)``."""
    h, w = sheets.shape[-3], sheets.shape[-2]
    dh, uh, dw, uw = axis_operators(h, w, factor, mode, dtype=sheets.dtype, device=sheets.device)
    return _blur(sheets, dh, uh, dw, uw)


def _blur(s: torch.Tensor, dh, uh, dw, uw) -> torch.Tensor:
    *lead, h, w, e = s.shape
    x = s.reshape(-1, h, w * e)
    x = torch.matmul(dh, x)                                   # (L, h', w*E)
    hp = x.shape[1]
    x = torch.matmul(dw, x.reshape(-1, w, e))                 # (L*h', w', E)
    x = torch.matmul(uw, x)                                   # (L*h', w, E)
    x = torch.matmul(uh, x.reshape(-1, hp, w * e))            # (L, h, w*E)
    return x.reshape(*lead, h, w, e)


def sheet_loss(sheets: torch.Tensor, factor: float | Sequence[float] = 4.0, mode: Mode = "bilinear") -> torch.Tensor:
    """1 − mean cos(S_i, blur(S)_i) for a batch of sheets ``(L, h, w, E)`` (or one ``(h, w, E)``): shape (L,) or ().

    Usage: ``sheet_loss(sheet.features(), factor=3)``.
    """
    b = blur(sheets, factor, mode)
    *lead, h, w, e = sheets.shape
    cos = F.cosine_similarity(sheets.reshape(*lead, h * w, e), b.reshape(*lead, h * w, e), dim=-1)
    return 1 - cos.mean(-1)


@dataclass
class TauSchedule:
    """τ over training: ``constant``, ``linear`` or ``cosine`` from ``start`` to ``end`` over ``steps``, then held.

    Before ``warmup`` steps τ is ``start``; past ``warmup + steps`` it stays at ``end`` (clamped).
    Usage: ``TauSchedule(0.0, 10.0, 1000, "cosine")(500)`` -> 5.0.
    """

    start: float
    end: float | None = None
    steps: int = 0
    kind: Literal["constant", "linear", "cosine"] = "constant"
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown τ schedule {self.kind!r}; use constant, linear or cosine")
        for name in ("start", "end"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                raise ValueError(f"τ {name} must be a finite number >= 0, got {v!r}")
        if self.end is None:
            self.end = self.start
        if not isinstance(self.steps, int) or self.steps < 0 or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"τ schedule steps and warmup must be integers >= 0, got {self.steps!r}, {self.warmup!r}")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return float(self.start)
        if self.steps == 0:
            return float(self.end if step >= self.warmup else self.start)
        t = min(max((step - self.warmup) / self.steps, 0.0), 1.0)
        if self.kind == "cosine":
            t = (1 - math.cos(math.pi * t)) / 2
        return float(self.start + (self.end - self.start) * t)


class TopoLoss(nn.Module):
    """τ-weighted TopoLoss over the cortical sheets of the layers matching ``layers``.

    ``tau`` is a number, a {pattern: τ} dict (first matching pattern wins; unmatched layers get 0),
    or a :class:`TauSchedule` (then ``loss(step=t)``). ``reduction`` is ``"mean"`` over layers (the
    reference's) or ``"sum"``. Layers with the same sheet shape and feature size are stacked and
    blurred together. Weights are read at call time, so the loss follows in-place changes.
    Usage: ``TopoLoss(gpt, "*.mlp.0", factor=4, tau=1.0)()``.
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[CorticalSheet] = "*", factor: float | Sequence[float] = 4.0,
                 mode: Mode = "bilinear", tau: float | dict[str, float] | TauSchedule = 1.0,
                 reduction: Literal["mean", "sum"] = "mean", shape: tuple[int, int] | str | None = None,
                 side: Side = "output", bias: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown interpolation {mode!r}; use one of {', '.join(MODES)}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.sheets = list(layers) if not isinstance(layers, str) else find_sheets(model, layers, shape, side, bias)
        if not self.sheets:
            raise ValueError("TopoLoss needs at least one layer")
        self.factor, self.mode, self.reduction = _pair(factor), mode, reduction
        for s in self.sheets:  # fail now, not at the first step
            axis_operators(s.h, s.w, self.factor, mode)
        self.schedule = tau if isinstance(tau, TauSchedule) else None
        import fnmatch

        if isinstance(tau, dict):
            w = [next((float(v) for p, v in tau.items() if fnmatch.fnmatchcase(s.name, p)), 0.0) for s in self.sheets]
        elif isinstance(tau, TauSchedule):
            w = [1.0] * len(self.sheets)
        else:
            w = [float(tau)] * len(self.sheets)
        if any(not math.isfinite(v) or v < 0 for v in w):
            raise ValueError(f"τ must be finite and >= 0, got {tau!r}")
        self.taus = w
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.sheets):
            groups.setdefault((s.h, s.w, s.feature_dim), []).append(i)
        self._groups = list(groups.values())

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sheets]

    def layer_losses(self) -> torch.Tensor:
        """(n_layers,) unscaled L_layer values, in the order of ``names``."""
        parts: list[tuple[list[int], torch.Tensor]] = []
        for idx in self._groups:
            feats = [self.sheets[i].features() for i in idx]
            stack = feats[0].unsqueeze(0) if len(feats) == 1 else torch.stack(feats)
            parts.append((idx, sheet_loss(stack, self.factor, self.mode)))
        if len(parts) == 1:
            order = parts[0][0]
            vals = parts[0][1]
            if order == list(range(len(order))):
                return vals
        flat_idx = [i for idx, _ in parts for i in idx]
        vals = torch.cat([v.to(parts[0][1].dtype) for _, v in parts])
        inv = torch.empty(len(flat_idx), dtype=torch.long)
        inv[torch.tensor(flat_idx)] = torch.arange(len(flat_idx))
        return vals[inv.to(vals.device)]

    def layerwise(self) -> dict[str, torch.Tensor]:
        """{layer name: unscaled L_layer}. Usage: ``{k: float(v) for k, v in loss.layerwise().items()}``."""
        return dict(zip(self.names, self.layer_losses()))

    def forward(self, step: int | None = None) -> torch.Tensor:
        """Σ τ_l L_l, divided by the number of layers under ``reduction="mean"``."""
        vals = self.layer_losses()
        taus = torch.tensor(self.taus, dtype=vals.dtype, device=vals.device)
        total = (taus * vals).sum()
        if self.reduction == "mean":
            total = total / len(self.sheets)
        if self.schedule is not None:
            total = total * self.schedule(step or 0)
        return total
