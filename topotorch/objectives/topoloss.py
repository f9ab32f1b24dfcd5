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
    >>> loss.layerwise()  # {"blocks.0.mlp.0": tensor(0.93), ...}, unscaled
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from topotorch.sheets import CorticalSheet, Side, find_sheets

MODES = ("bilinear", "nearest", "area")
Mode = Literal["bilinear", "nearest", "area"]


def _pair(factor: float | Sequence[float]) -> tuple[float, float]:
    bad = f"factor must be a number or (factor_h, factor_w), got {factor!r}"
    if isinstance(factor, bool):
        raise ValueError(bad)
    if isinstance(factor, (int, float)):
        f = (float(factor), float(factor))
    else:
        try:
            fh, fw = factor
            f = (float(fh), float(fw))
        except (TypeError, ValueError):
            raise ValueError(bad) from None
    if not all(math.isfinite(v) and v >= 1.0 for v in f):
        raise ValueError(f"blur factor φ must be finite and >= 1, got {factor!r}")
    return f


@functools.lru_cache(maxsize=256)
def _axis_operators(
    h: int, w: int, fh: float, fw: float, mode: str, size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
    dh = down(eye_h)[0, :, :, 0].T.contiguous()  # (h', h)
    dw = down(eye_w)[0, :, 0, :].T.contiguous()  # (w', w)
    hp, wp = dh.shape[0], dw.shape[0]
    if hp < 1 or wp < 1:
        raise ValueError(f"blur factor ({fh}, {fw}) does not fit a {h}x{w} sheet (downsampled to {hp}x{wp})")
    uh = up(torch.eye(hp, dtype=torch.float64)[:, :, None].expand(hp, hp, wp).unsqueeze(0))[0, :, :, 0].T.contiguous()
    uw = up(torch.eye(wp, dtype=torch.float64)[:, None, :].expand(wp, hp, wp).unsqueeze(0))[0, :, 0, :].T.contiguous()
    return dh, uh, dw, uw


def axis_operators(
    h: int,
    w: int,
    factor: float | Sequence[float] = 4.0,
    mode: Mode = "bilinear",
    size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, ...]:
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
    x = torch.matmul(dh, x)  # (L, h', w*E)
    hp = x.shape[1]
    x = torch.matmul(dw, x.reshape(-1, w, e))  # (L*h', w', E)
    x = torch.matmul(uw, x)  # (L*h', w, E)
    x = torch.matmul(uh, x.reshape(-1, hp, w * e))  # (L, h, w*E)
    return x.reshape(*lead, h, w, e)


def sheet_loss(sheets: torch.Tensor, factor: float | Sequence[float] = 4.0, mode: Mode = "bilinear") -> torch.Tensor:
    """1 − mean cos(S_i, blur(S)_i) for a batch of sheets ``(L, h, w, E)`` (or one ``(h, w, E)``): shape (L,) or ().

    Usage: ``sheet_loss(sheet.features(), factor=3)``.
    """
    b = blur(sheets, factor, mode)
    *lead, h, w, e = sheets.shape
    cos = F.cosine_similarity(sheets.reshape(*lead, h * w, e), b.reshape(*lead, h * w, e), dim=-1)
    return 1 - cos.mean(-1)


# ---- the fused loss: a few-tap stencil per axis, streamed over row bands -------------------------------------------
#
# For one sheet S (h, w, E) with down/up matrices D_h, U_h, D_w, U_w (few non-zeros per row: 2 for bilinear):
#     T  = D_h S            (h', w, E)   rows of S that the down step samples
#     T2 = U_w D_w T        (h', w, E)   both w-steps on the small tensor
#     B  = U_h T2           (h,  w, E)   built band by band, never stored whole
#     cos_i = <S_i, B_i> / (|S_i| |B_i|),  L = 1 - mean_i cos_i
# and, with g = -c/N the upstream weight of each cos_i,
#     dL/dS_i = g (B_i/(|S||B|) - cos S_i/|S|²)  +  [D_hᵀ (D_wᵀ U_wᵀ (U_hᵀ G_B)) ]_i,
#     G_B_i   = g (S_i/(|S||B|) - cos B_i/|B|²).
# Pass 1 over row bands reduces <S,B>, |S|², |B|² and accumulates U_hᵀ G_B (small); pass 2 writes the gradient band by
# band. A band is a few sheet rows (~0.5 MB), so its temporaries live in cache and are reused by the allocator
# instead of faulting fresh pages, and the layer (≤ a few MB) is still in the last-level cache for pass 2: from memory,
# each weight is read about once and each gradient written once. The gradient is computed with the value (when one is
# wanted) and handed back by backward, so forward + backward is these two passes.

_BAND_BYTES = 1 << 20
_STACK_BYTES = 1 << 22  # groups of sheets smaller than this are stacked and done in one go


def _span(m: torch.Tensor) -> list[tuple[int, int]]:
    """Per row of a (rows, cols) matrix: the [first, last+1) range of its non-zero columns."""
    nz = m != 0
    any_ = nz.any(1)
    first = torch.where(any_, nz.float().argmax(1), torch.zeros_like(any_, dtype=torch.long))
    last = torch.where(any_, m.shape[1] - nz.flip(1).float().argmax(1), torch.ones_like(any_, dtype=torch.long))
    return list(zip(first.tolist(), last.tolist()))


class _Plan:
    """The operators of one (h, w, E) sheet shape, its bands, and the non-zero spans each band touches."""

    def __init__(
        self,
        h: int,
        w: int,
        e: int,
        factor: tuple[float, float],
        mode: str,
        dtype: torch.dtype,
        device: torch.device,
        itemsize: int = 4,
    ):
        d64 = _axis_operators(h, w, factor[0], factor[1], mode, None)
        dh, uh, dw, uw = (o.to(dtype=dtype, device=device) for o in d64)
        self.h, self.w, self.e = h, w, e
        self.dh, self.dw, self.uw = dh, dw, uw
        self.dwT, self.uwT = dw.T.contiguous(), uw.T.contiguous()
        self.hp = dh.shape[0]
        self.down_rows = _span(d64[0])  # per row of D_h: the sheet rows it reads
        rows = max(1, min(h, _BAND_BYTES // max(1, w * e * itemsize)))
        self.bands = []
        up_span, down_span = _span(d64[1]), _span(d64[0].T.contiguous())  # U_h rows; D_hᵀ rows (= D_h columns)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            p0, p1 = min(s[0] for s in up_span[r0:r1]), max(s[1] for s in up_span[r0:r1])
            q0, q1 = min(s[0] for s in down_span[r0:r1]), max(s[1] for s in down_span[r0:r1])
            self.bands.append(
                (
                    r0,
                    r1,
                    uh[r0:r1, p0:p1].contiguous(),
                    p0,
                    p1,
                    uh[r0:r1, p0:p1].T.contiguous(),
                    dh[q0:q1, r0:r1].T.contiguous(),
                    q0,
                    q1,
                )
            )


@functools.lru_cache(maxsize=64)
def _plan(h, w, e, factor, mode, dtype, device) -> _Plan:
    return _Plan(h, w, e, factor, mode, dtype, device)


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with ``torch.mm`` for 2-D ``b`` (faster than the batched path for one sheet)."""
    if b.dim() == 2:
        return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
    return torch.matmul(a, b, out=out) if out is not None else torch.matmul(a, b)


def _fused(
    s: torch.Tensor, factor: tuple[float, float], mode: str, coef: torch.Tensor | None, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(L,) losses of a stack of sheets ``s`` (L, h, w, E) and, if ``coef`` (L,) is given, d(Σ coef·L)/ds."""
    n_l, h, w, e = s.shape
    cd = _compute_dtype(s.dtype)
    p = _plan(h, w, e, factor, mode, cd, s.device)
    n, we = h * w, w * e
    one = n_l == 1
    s3 = s.reshape(h, we) if one else s.reshape(n_l, h, we)  # one sheet: 2-D, so every product is a plain mm
    native = s.dtype == cd
    row = (lambda a, b: s3[a:b]) if one else (lambda a, b: s3[:, a:b])
    # T = D_h S, reading only the rows the down step samples (a few taps per output row)
    if one:
        x = torch.empty(p.hp, we, dtype=cd, device=s.device)
        for q, (j0, j1) in enumerate(p.down_rows):
            src = s3[j0:j1] if native else s3[j0:j1].to(cd)
            torch.mm(p.dh[q : q + 1, j0:j1], src, out=x[q : q + 1])
    else:
        x = torch.matmul(p.dh, s3 if native else s3.to(cd))  # (L, h', w*E)
    hp = p.hp
    t2 = torch.matmul(p.uw, torch.matmul(p.dw, x.view(n_l * hp, w, e)))  # (L*h', w, E): both w-steps, small
    t2 = t2.view(hp, we) if one else t2.view(n_l, hp, we)
    dot = torch.empty(n_l, n, dtype=cd, device=s.device)
    ss, bb = torch.empty_like(dot), torch.empty_like(dot)

    def band(r0, r1, uhb, p0, p1):
        sb = row(r0, r1) if native else row(r0, r1).to(cd)
        bb_ = _mm(uhb, t2[p0:p1] if one else t2[:, p0:p1])  # B rows r0..r1
        return sb.reshape(n_l, -1, e), bb_.view(n_l, -1, e)

    g1: torch.Tensor | None = None  # with coef: the gradient's accumulator and its per-layer scale
    g: torch.Tensor | None = None
    if coef is not None:
        g1 = torch.zeros((hp, we) if one else (n_l, hp, we), dtype=cd, device=s.device)
        g = (-coef.to(cd) / n)[:, None]
    coefs = []
    for r0, r1, uhb, p0, p1, uhbT, _dhbT, _q0, _q1 in p.bands:
        sb, bbd = band(r0, r1, uhb, p0, p1)
        u0, u1 = r0 * w, r1 * w
        d_, s_, b_ = dot[:, u0:u1], ss[:, u0:u1], bb[:, u0:u1]
        torch.linalg.vecdot(sb, bbd, out=d_)
        torch.linalg.vecdot(sb, sb, out=s_)
        torch.linalg.vecdot(bbd, bbd, out=b_)
        if g is not None and g1 is not None:
            ns, nb = s_.sqrt().clamp_min_(eps), b_.sqrt().clamp_min_(eps)
            inv = g / (ns * nb)  # g/(|S||B|)
            cg = d_ * inv  # g·cos
            gb = torch.mul(bbd, (-cg / (nb * nb)).unsqueeze(-1)).addcmul_(sb, inv.unsqueeze(-1))  # G_B
            gbv = gb.view(r1 - r0, we) if one else gb.view(n_l, r1 - r0, we)
            if one:
                g1[p0:p1].addmm_(uhbT, gbv)
            else:
                g1[:, p0:p1] += torch.matmul(uhbT, gbv)
            coefs.append((inv.unsqueeze(-1), (-cg / (ns * ns)).unsqueeze(-1)))  # direct: inv·B + delta·S
    cos = dot / (ss.sqrt().clamp_min(eps) * bb.sqrt().clamp_min(eps))
    vals = 1 - cos.mean(-1)
    if g1 is None:
        return vals, None
    g2 = torch.matmul(p.dwT, torch.matmul(p.uwT, g1.view(n_l * hp, w, e)))
    g2 = g2.view(hp, we) if one else g2.view(n_l, hp, we)
    grad = torch.empty((h, we) if one else (n_l, h, we), dtype=s.dtype, device=s.device)
    for (r0, r1, uhb, p0, p1, _uhbT, dhbT, q0, q1), (inv, delta) in zip(p.bands, coefs):
        sb, bbd = band(r0, r1, uhb, p0, p1)
        if native and one:
            out = grad[r0:r1]
            torch.mm(dhbT, g2[q0:q1], out=out)
            out.view(n_l, -1, e).addcmul_(bbd, inv).addcmul_(sb, delta)
        else:
            acc = _mm(dhbT, g2[q0:q1] if one else g2[:, q0:q1]).view(n_l, -1, e)
            acc.addcmul_(bbd, inv).addcmul_(sb, delta)
            (grad[r0:r1] if one else grad[:, r0:r1]).copy_(acc.view(grad[r0:r1].shape if one else (n_l, r1 - r0, we)))
    return vals, grad.view(n_l, h, w, e)


# ---- the same two passes as one compiled CPU kernel (float32 and bfloat16) ------------------------------------------
#
# In tensor ops every band still costs a dozen passes through the cache and a dozen thread-pool round trips, which
# on a busy 2-core machine is most of the time. The kernel below does, per sheet: T = D_h S D_wᵀ (reading only the
# sampled rows), then one pass over the units (B from T by the few up-taps, <S,B>, |S|, |B>, and U_hᵀ G_B U_w
# accumulated per thread), then one pass writing the gradient. Built with the system C compiler on first use
# (cached in $TOPOTORCH_CACHE or ~/.cache/topotorch), OpenMP on torch's own libgomp when torch uses GNU OpenMP;
# without a compiler, or with TOPOTORCH_NO_KERNEL=1, the tensor-op path above is used.

# the C source lives beside this module (package data), compiled where it lies
KERNEL_FILE = Path(__file__).with_name("topoloss_kernel.c")

_klock = threading.Lock()
_klib: ctypes.CDLL | None = None
_ktried = False
_kerror: str | None = None


def _kernel_flags() -> list[list[str]]:
    base = ["-O3", "-fPIC", "-shared", "-fno-math-errno"]
    import platform as _pf

    gomp = (
        sys.platform.startswith("linux")
        and "OpenMP" in torch.__config__.parallel_info()
        and (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists()
    )
    omp = ["-fopenmp"] if gomp else ["-fopenmp-simd"]
    tuned = ["-march=native"] if _pf.machine() in ("x86_64", "AMD64", "aarch64", "arm64") else []
    return [base + tuned + omp, base + omp, base + tuned, base]


def _topo_kernel() -> ctypes.CDLL | None:
    """The compiled TopoLoss kernel, or None (no compiler, not POSIX, or ``TOPOTORCH_NO_KERNEL=1``)."""
    global _klib, _ktried, _kerror
    if os.environ.get("TOPOTORCH_NO_KERNEL", "0") not in ("", "0"):
        return None
    if _ktried:
        return _klib
    with _klock:
        if _ktried:
            return _klib
        try:
            if os.name != "posix":
                raise RuntimeError("the TopoLoss CPU kernel needs a POSIX system")
            cc = os.environ.get("CC", "cc")
            cache = Path(os.environ.get("TOPOTORCH_CACHE", Path.home() / ".cache" / "topotorch")) / "kernels"
            errors, so = [], None
            text = KERNEL_FILE.read_text()  # a missing file: an OSError naming it, reported by the fallback
            for flags in _kernel_flags():
                key = hashlib.sha256("\n".join([text, cc, " ".join(flags), sys.platform]).encode()).hexdigest()[:16]
                cand = cache / f"topoloss_{key}.so"
                if cand.exists():
                    so = cand
                    break
                cache.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=cache) as tmp:
                    tmp_so = Path(tmp) / "topoloss.so"
                    r = subprocess.run(
                        [cc, *flags, str(KERNEL_FILE), "-o", str(tmp_so), "-lm"],
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                    if r.returncode == 0:
                        os.replace(tmp_so, cand)
                        so = cand
                        break
                    errors.append(f"{cc} {' '.join(flags)}: {r.stderr.strip()[:300]}")
            if so is None:
                raise RuntimeError("; ".join(errors))
            lib = ctypes.CDLL(str(so))
            p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            lib.topo_sheet.restype = c_int
            argtypes: list[Any] = [p, c_int, i64, i64, i64, i64, i64] + [p] * 16
            lib.topo_sheet.argtypes = argtypes + [ctypes.c_double, ctypes.c_float, p, p, c_int]
            _klib = lib
        except Exception as e:  # noqa: BLE001 - any failure means: use the tensor-op path
            _klib, _kerror = None, f"{type(e).__name__}: {e}"
        _ktried = True
    return _klib


class _KPlan:
    """float32 operators and int32 spans of one sheet shape, in the layout the kernel reads."""

    def __init__(self, h: int, w: int, factor: tuple[float, float], mode: str):
        dh, uh, dw, uw = _axis_operators(h, w, factor[0], factor[1], mode, None)
        self.hp, self.wp = dh.shape[0], dw.shape[0]

        def spans(m):
            s = _span(m)
            return (
                torch.tensor([a for a, _ in s], dtype=torch.int32),
                torch.tensor([b for _, b in s], dtype=torch.int32),
            )

        self.keep = []
        for m in (dh, dw, uh, uw):
            self.keep += [m.float().contiguous(), *spans(m)]
        self.keep += [*spans(dh.T.contiguous()), *spans(dw.T.contiguous())]
        self.ptrs = [t.data_ptr() for t in self.keep]


@functools.lru_cache(maxsize=64)
def _kplan(h: int, w: int, factor: tuple[float, float], mode: str) -> _KPlan:
    return _KPlan(h, w, factor, mode)


def _kernel_ok(f: torch.Tensor) -> bool:
    return f.device.type == "cpu" and f.dtype in (torch.float32, torch.bfloat16) and _topo_kernel() is not None


def _kernel_sheet(
    f: torch.Tensor, factor: tuple[float, float], mode: str, coef: float | None, eps: float = 1e-8
) -> tuple[float, torch.Tensor | None]:
    """(loss, d(coef·loss)/df or None) of one (h, w, E) CPU float32/bfloat16 sheet with the kernel."""
    lib = _topo_kernel()
    if lib is None:
        raise RuntimeError(f"the TopoLoss kernel is not available ({_kerror or 'disabled'})")
    h, w, e = f.shape
    f = f.contiguous()
    kp = _kplan(h, w, factor, mode)
    grad = torch.empty_like(f) if coef is not None else None
    out = ctypes.c_double()
    rc = lib.topo_sheet(
        f.data_ptr(),
        int(f.dtype == torch.bfloat16),
        h,
        w,
        e,
        kp.hp,
        kp.wp,
        *kp.ptrs,
        float(coef or 0.0),
        eps,
        None if grad is None else grad.data_ptr(),
        ctypes.byref(out),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("TopoLoss kernel: out of memory")
    return out.value, grad


class _TopoFn(torch.autograd.Function):
    """Σ_l coef_l L_l and the (L,) values over sheets ``feats`` (each (h, w, E)), gradient computed with the value."""

    @staticmethod
    def forward(
        ctx: Any, plan: tuple[tuple[float, float], str, list[list[int]]], coef: list[float], *feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        factor, mode, groups = plan
        want = any(ctx.needs_input_grad[2:])
        vals = torch.empty(len(feats), dtype=_compute_dtype(feats[0].dtype), device=feats[0].device)
        grads: list[torch.Tensor | None] = [None] * len(feats)
        base = [c if c != 0 else 1.0 for c in coef]  # a τ = 0 layer still gets a gradient for layerwise() users
        base_t = torch.tensor(base, dtype=vals.dtype, device=vals.device)
        for idx in groups:
            f = [feats[i] for i in idx]
            if _kernel_ok(f[0]):
                for i in idx:
                    kv, kg = _kernel_sheet(feats[i], factor, mode, base[i] if want else None)
                    vals[i] = kv
                    grads[i] = kg
                continue
            small = len(f) > 1 and f[0].numel() * f[0].element_size() * len(f) <= _STACK_BYTES
            if small:
                v, g = _fused(torch.stack(f), factor, mode, base_t[idx] if want else None)
                vals[idx] = v.to(vals.dtype)
                for j, i in enumerate(idx):
                    grads[i] = None if g is None else g[j]
            else:
                for i in idx:
                    v, g = _fused(feats[i].unsqueeze(0), factor, mode, base_t[i : i + 1] if want else None)
                    vals[i] = v[0].to(vals.dtype)
                    grads[i] = None if g is None else g[0]
        ctx.grads, ctx.base, ctx.coef, ctx.plan = grads, base, coef, plan
        ctx.save_for_backward(*feats)
        total = (torch.tensor(coef, dtype=vals.dtype, device=vals.device) * vals).sum()
        dt = feats[0].dtype
        return total.to(dt), vals.to(dt)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_total, g_vals):
        gt = 0.0 if g_total is None else float(g_total)
        gv = [0.0] * len(ctx.coef) if g_vals is None else g_vals.double().cpu().tolist()
        k = [c * gt + v for c, v in zip(ctx.coef, gv)]
        grads, base = ctx.grads, ctx.base
        if grads is None:  # a second backward through the same graph (retain_graph=True): compute again
            factor, mode, _groups = ctx.plan
            feats = ctx.saved_tensors
            grads = [None] * len(feats)
            for i, f in enumerate(feats):
                if ctx.needs_input_grad[2 + i]:
                    grads[i] = _fused(
                        f.unsqueeze(0), factor, mode, f.new_tensor([base[i]], dtype=_compute_dtype(f.dtype))
                    )[1][0]
        ctx.grads = None  # handed over: autograd may keep them as .grad without a copy
        out = []
        for i, g in enumerate(grads):
            if g is None or not ctx.needs_input_grad[2 + i]:
                out.append(None)
                continue
            f = k[i] / base[i]
            if f != 1.0:
                g = g.mul_(f) if f != 0.0 else torch.zeros_like(g)
            out.append(g)
        return (None, None, *out)


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
        end = self.start if self.end is None else self.end  # __post_init__ has set it; this tells mypy
        if self.steps == 0:
            return float(end if step >= self.warmup else self.start)
        t = min(max((step - self.warmup) / self.steps, 0.0), 1.0)
        if self.kind == "cosine":
            t = (1 - math.cos(math.pi * t)) / 2
        return float(self.start + (end - self.start) * t)


class TopoLoss(nn.Module):
    """τ-weighted TopoLoss over the cortical sheets of the layers matching ``layers``.

    ``tau`` is a number, a {pattern: τ} dict (first matching pattern wins; unmatched layers get 0),
    or a :class:`TauSchedule` (then ``loss(step=t)``). ``reduction`` is ``"mean"`` over layers (the
    reference's) or ``"sum"``. Layers with the same sheet shape and feature size are stacked and
    blurred together. Weights are read at call time, so the loss follows in-place changes.
    Usage: ``TopoLoss(gpt, "*.mlp.0", factor=4, tau=1.0)()``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[CorticalSheet] = "*",
        factor: float | Sequence[float] = 4.0,
        mode: Mode = "bilinear",
        tau: float | dict[str, float] | TauSchedule = 1.0,
        reduction: Literal["mean", "sum"] = "mean",
        shape: tuple[int, int] | str | None = None,
        side: Side = "output",
        bias: bool = False,
    ):
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
            groups.setdefault((s.h, s.w, s.feature_dim, s.module.weight.dtype), []).append(i)
        self._groups = list(groups.values())

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sheets]

    def _run(self, coef: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [s.features() for s in self.sheets]
        return _TopoFn.apply((self.factor, self.mode, self._groups), coef, *feats)

    def layer_losses(self) -> torch.Tensor:
        """(n_layers,) unscaled L_layer values, in the order of ``names``."""
        return self._run([0.0] * len(self.sheets))[1]

    def layerwise(self) -> dict[str, torch.Tensor]:
        """{layer name: unscaled L_layer}. Usage: ``{k: float(v) for k, v in loss.layerwise().items()}``."""
        return dict(zip(self.names, self.layer_losses()))

    def forward(self, step: int | None = None) -> torch.Tensor:
        """Σ τ_l L_l, divided by the number of layers under ``reduction="mean"``."""
        scale = 1.0 / len(self.sheets) if self.reduction == "mean" else 1.0
        if self.schedule is not None:
            scale *= self.schedule(step or 0)
        return self._run([t * scale for t in self.taus])[0]
