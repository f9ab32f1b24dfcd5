"""Topographic compression: cut a layer down to a coarser cortical sheet and rebuild its reader.

A trained topographic layer's units vary smoothly over the sheet, so a coarse grid of them carries
nearly the same signal. For a layer A (h x w output units, feature vectors S) read by layer B:

    A'  : feature sheet down(S) = D_h S D_wᵀ            (h' x w' units; bias sheet the same)
    B'  : B · U with U = U_h ⊗ U_w (N x N')              (every removed unit ≈ its interpolation
                                                          from the kept ones: a ≈ U a')

D, U are the down/up matrices of :func:`topotorch.objectives.topoloss.axis_operators` for the
chosen mode: ``nearest`` keeps every φ-th unit and gives each kept unit the outgoing weights of the
units it stands for; ``bilinear``/``area`` keep the downsampled sheet itself. The result is an
ordinary, smaller dense ``nn.Module`` (a deep copy; the original is untouched). At φ = 1 the copy is
the same function.

    >>> small = compress(model, "*.mlp.0", factor=2.0)  # every c_fc, 75% of columns gone
    >>> small = compress(model, "0", removed=0.8, mode="area")  # 80% of the first layer's units gone
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from topotorch.objectives.topoloss import axis_operators
from topotorch.sheets import SHEET_LAYERS, CorticalSheet, find_sheets, layer_tensor

PASS_THROUGH = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout, nn.LeakyReLU)


def coarse_shape(h: int, w: int, factor: float | None = None, removed: float | None = None) -> tuple[int, int]:
    """The coarse grid: (floor(h/φ), floor(w/φ)), or the aspect-keeping grid closest to removing ``removed``.

    Usage: ``coarse_shape(16, 32, factor=2)`` -> (8, 16); ``coarse_shape(10, 10, removed=0.5)`` -> (7, 7).
    """
    if (factor is None) == (removed is None):
        raise ValueError("give exactly one of factor (φ) or removed (fraction of units to cut)")
    if factor is not None:
        if not math.isfinite(factor) or factor < 1:
            raise ValueError(f"downsampling factor φ must be finite and >= 1, got {factor!r}")
        hp, wp = int(h // factor), int(w // factor)
    else:
        assert removed is not None  # exactly one of factor / removed is given (checked above)
        if not 0 <= removed < 1:
            raise ValueError(f"removed must be a fraction in [0, 1), got {removed!r}")
        keep = (1 - removed) * h * w
        best: tuple[float, int, int] | None = None
        for hp in range(1, h + 1):  # at most h candidates: relative count error + log-aspect error
            for wp in {max(1, min(w, math.floor(keep / hp))), max(1, min(w, math.ceil(keep / hp)))}:
                score = abs(hp * wp - keep) / keep + abs(math.log((hp / wp) / (h / w)))
                if best is None or score < best[0]:
                    best = (score, hp, wp)
        if best is None:
            raise ValueError(f"no coarse grid fits a {h}x{w} sheet")
        hp, wp = best[1], best[2]
    if hp < 1 or wp < 1:
        raise ValueError(f"φ={factor} does not fit a {h}x{w} sheet")
    return hp, wp


def next_layer_name(model: nn.Module, name: str) -> str:
    """The Linear/Conv that reads ``name``'s output: its next sibling in an ``nn.Sequential``, past
    element-wise modules (activations, dropout). Raises ``ValueError`` when there is none to find.
    Usage: ``next_layer_name(gpt, "blocks.0.mlp.0")`` -> ``"blocks.0.mlp.2"``.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        raise ValueError(
            f"cannot tell which layer reads {name!r} (its parent is not an nn.Sequential); pass next_layer"
        )
    keys = list(parent._modules)
    for k in keys[keys.index(child) + 1 :]:
        m = parent._modules[k]
        if isinstance(m, SHEET_LAYERS):
            return f"{parent_name}.{k}" if parent_name else k
        if not isinstance(m, PASS_THROUGH):
            raise ValueError(
                f"{name!r} is read through a {type(m).__name__}, which compression cannot follow; "
                "only element-wise modules may sit between the two layers"
            )
    raise ValueError(f"{name!r} is the last layer of its nn.Sequential: nothing reads it to rebuild")


def _bias(module: nn.Module) -> torch.Tensor | None:
    """``module.bias`` when it has one (nn.Module types its attributes ``Tensor | Module``)."""
    b = getattr(module, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def _new_like(old: nn.Module, n_out: int | None = None, n_in: int | None = None) -> nn.Module:
    wt = layer_tensor(old, "weight")
    kw: dict[str, Any] = dict(bias=_bias(old) is not None, dtype=wt.dtype, device=wt.device)
    if isinstance(old, nn.Linear):
        return nn.Linear(n_in or old.in_features, n_out or old.out_features, **kw)
    conv: Any = old  # nn.Conv1d / nn.Conv2d (a sheet layer that is not a Linear)
    return type(old)(
        n_in or conv.in_channels,
        n_out or conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        padding_mode=conv.padding_mode,
        **kw,
    )


@torch.no_grad()
def compress_layer(
    model: nn.Module,
    name: str,
    factor: float | None = None,
    removed: float | None = None,
    mode: Literal["nearest", "bilinear", "area"] = "bilinear",
    next_layer: str | None = None,
    shape: tuple[int, int] | str | None = None,
) -> tuple[int, int]:
    """In place: shrink layer ``name`` to its coarse sheet and rebuild ``next_layer`` to read it.

    Returns the new (h', w'). Groups > 1 convolutions are refused. Usage: ``compress_layer(m, "0", factor=2)``.
    """
    layer = model.get_submodule(name)
    sheet = CorticalSheet.of(layer, name, shape)
    nxt_name = next_layer or next_layer_name(model, name)
    nxt = model.get_submodule(nxt_name)
    if not isinstance(nxt, SHEET_LAYERS):
        raise ValueError(f"next layer {nxt_name!r} is a {type(nxt).__name__}, not a Linear/Conv")
    if getattr(layer, "groups", 1) != 1 or getattr(nxt, "groups", 1) != 1:
        raise ValueError("grouped convolutions cannot be compressed this way")
    wa0, ba0 = layer_tensor(layer, "weight"), _bias(layer)
    wb0, bb0 = layer_tensor(nxt, "weight"), _bias(nxt)
    if wb0.shape[1] != sheet.units:
        raise ValueError(f"{nxt_name!r} reads {wb0.shape[1]} units but {name!r} has {sheet.units}")
    h, w = sheet.h, sheet.w
    hp, wp = coarse_shape(h, w, factor, removed)
    dt = torch.float64
    # φ given: the very resampling TopoLoss trained against (scale 1/φ), so a sheet with TopoLoss 0 is cut losslessly
    size = None if factor is not None else (hp, wp)
    scale = factor if factor is not None else 1.0  # factor None: size given instead
    dh, uh, dw, uw = axis_operators(h, w, scale, mode, size=size, dtype=dt, device=wa0.device)
    hp, wp = dh.shape[0], dw.shape[0]
    wa = wa0.to(dt)
    s = wa.reshape(h, w, -1)
    s2 = torch.einsum("ph,hwe,qw->pqe", dh, s, dw)  # downsampled feature sheet
    new_a = _new_like(layer, n_out=hp * wp)
    layer_tensor(new_a, "weight").copy_(s2.reshape(hp * wp, *wa.shape[1:]).to(wa0.dtype))
    if ba0 is not None:
        b2 = dh @ ba0.to(dt).reshape(h, w) @ dw.T
        layer_tensor(new_a, "bias").copy_(b2.reshape(-1).to(ba0.dtype))
    wb = wb0.to(dt)  # (O, N, *k): contract N with U_h ⊗ U_w
    wb2 = torch.einsum("ohw...,hp,wq->opq...", wb.reshape(wb.shape[0], h, w, *wb.shape[2:]), uh, uw)
    new_b = _new_like(nxt, n_in=hp * wp)
    layer_tensor(new_b, "weight").copy_(wb2.reshape(wb.shape[0], hp * wp, *wb.shape[2:]).to(wb0.dtype))
    if bb0 is not None:
        layer_tensor(new_b, "bias").copy_(bb0)
    for n, m in ((name, new_a), (nxt_name, new_b)):
        parent_name, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m)
    return hp, wp


def _inputs_of(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, i: got.append(i[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return got[0].reshape(-1, got[0].shape[-1]).to(torch.float64)


@torch.no_grad()
def refit_reader(original: nn.Module, small: nn.Module, reader: str, x: torch.Tensor, ridge: float = 1e-6) -> None:
    """In place: refit the Linear ``reader`` of ``small`` so that, on inputs ``x``, its outputs match
    the original's (ridge least squares on what it now reads, bias included). One solve per layer.
    Usage: ``refit_reader(model, small, "2", x_train)``.
    """
    lin = small.get_submodule(reader)
    if not isinstance(lin, nn.Linear):
        raise ValueError(f"calibration refits Linear readers only; {reader!r} is a {type(lin).__name__}")
    was = (original.training, small.training)
    original.eval(), small.eval()
    try:
        a = _inputs_of(original, reader, x)
        ap = _inputs_of(small, reader, x)
    finally:
        original.train(was[0]), small.train(was[1])
    ref = original.get_submodule(reader)
    ref_bias = _bias(ref)
    target = a @ layer_tensor(ref, "weight").to(torch.float64).T
    if ref_bias is not None:
        target = target + ref_bias.to(torch.float64)
    if lin.bias is not None:
        ap = torch.cat([ap, torch.ones(len(ap), 1, dtype=ap.dtype)], dim=1)
    g = ap.T @ ap
    g += ridge * g.diagonal().mean().clamp_min(1e-12) * torch.eye(len(g), dtype=g.dtype)
    sol = torch.linalg.solve(g, ap.T @ target)  # (in [+1], out)
    lin.weight.copy_(sol[: lin.in_features].T.to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_(sol[-1].to(lin.bias.dtype))


def compress(
    model: nn.Module,
    layers: str | Sequence[str],
    factor: float | None = None,
    removed: float | None = None,
    mode: Literal["nearest", "bilinear", "area"] = "bilinear",
    calibrate: torch.Tensor | None = None,
) -> nn.Module:
    """A smaller copy of ``model`` with every layer matching ``layers`` cut to its coarse sheet.

    ``factor`` φ keeps (h//φ) x (w//φ) units; ``removed`` cuts that fraction of units instead.
    ``calibrate`` (inputs, e.g. training data): after each cut, refit the reading layer by least
    squares to reproduce the original's outputs (:func:`refit_reader`) instead of using B·U alone —
    TopoLoss smooths weight *directions* (cosine), not their norms or the biases, so B·U alone is rough.
    Usage: ``small = compress(gpt, "*.mlp.0", removed=0.8, calibrate=x_train[:256])``.
    """
    names = [s.name for s in find_sheets(model, layers)] if isinstance(layers, str) else list(layers)
    out = copy.deepcopy(model)
    for n in names:
        compress_layer(out, n, factor=factor, removed=removed, mode=mode)
        if calibrate is not None:
            refit_reader(model, out, next_layer_name(model, n), calibrate)
    return out


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied weights once). Usage: ``parameter_count(small)``."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


TOPOGRAPHIC_FORMAT = "topotorch.compression.topographic"


def save_compressed(run_dir, small: nn.Module, spec: dict, name: str = "compressed") -> tuple:
    """Write ``small``'s weights and the recipe that rebuilds its shape (``spec``: layers, factor/removed,
    mode) beside a run, as one atomic, checksummed artifact (:mod:`topotorch.artifacts`, no pickle).

    Usage: ``save_compressed(run, small, spec)``.
    """
    from pathlib import Path

    from topotorch.artifacts import write_artifact

    run_dir = Path(run_dir)
    st, js = run_dir / f"{name}.safetensors", run_dir / f"{name}.json"
    write_artifact(st, js, small.state_dict(), {**spec, "format": TOPOGRAPHIC_FORMAT})
    return st, js


def read_compressed(run_dir, name: str = "compressed") -> tuple[dict, dict]:
    """The (weights, recipe) saved by :func:`save_compressed`, checksum verified; an ArtifactError
    naming the file when missing or corrupt. Usage: ``state, spec = read_compressed("runs/digits-topo")``."""
    from pathlib import Path

    from topotorch.artifacts import read_artifact

    run_dir = Path(run_dir)
    return read_artifact(run_dir / f"{name}.safetensors", run_dir / f"{name}.json", kind=TOPOGRAPHIC_FORMAT)


def rebuild_compressed(model: nn.Module, state: dict, spec: dict) -> nn.Module:
    """``model`` cut to the recorded shapes (:func:`compress`), then the saved weights loaded.

    Usage: ``small = rebuild_compressed(load_run(run).model, *read_compressed(run))``.
    """
    small = compress(model, spec["layers"], factor=spec.get("factor"), removed=spec.get("removed"), mode=spec["mode"])
    small.load_state_dict(state, strict=False)
    return small
