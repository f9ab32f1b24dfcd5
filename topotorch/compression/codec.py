"""Image-codec storage of cortical sheets: smooth sheets compress like photographs.

A layer's (h, w, E) sheet is stored as

* one 8-bit grayscale mosaic of its E feature planes (each an h x w tile; plane e holds feature e
  of every unit's *direction* S_i/|S_i|, scaled by that plane's min/max; unused tiles are mid-grey),
  written by a standard lossy codec (WebP, JPEG or AVIF via Pillow, ``quality`` the knob);
* side information: the per-unit norms |S_i|, the planes' min/max and (optionally) the biases.
  ``side="uint8"`` (the default) stores norms as 8-bit log-norms, biases as 8-bit values and the
  plane ranges as 8-bit steps of the layer's range (rounded outwards, so nothing is clipped), each
  with a float16 min/max; ``side="float16"`` stores them all as float16.

TopoLoss makes the directions smooth on the sheet (it is a cosine), not the norms, hence the split.
Decoding renormalises each unit's decoded direction and multiplies its norm back.

    >>> small, report = codec_roundtrip(model, "0,2", quality=75)  # a copy with decoded weights
    >>> report["bytes"], report["raw_bytes"]  # stored size vs float32
"""

from __future__ import annotations

import copy
import io
import math
from typing import Literal

import numpy as np
import torch
from torch import nn

from topotorch.sheets import CorticalSheet, find_sheets, layer_tensor

Format = Literal["webp", "jpeg", "avif"]
SideInfo = Literal["uint8", "float16"]
FORMATS = ("webp", "jpeg", "avif")
_SAVE = {"webp": {"method": 6}, "jpeg": {}, "avif": {}}


def available_formats() -> tuple[str, ...]:
    """The codecs this Pillow build can write (AVIF needs Pillow >= 11.2 built with libavif)."""
    from PIL import features

    return tuple(f for f in FORMATS if features.check({"jpeg": "jpg"}.get(f, f)))


def _mosaic_shape(e: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(e))
    return math.ceil(e / cols), cols


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float64)


def _q8(x: torch.Tensor, log: bool = False) -> bytes:
    """float16 min/max + one byte per value (log scale for positive values when ``log``)."""
    v = x.to(torch.float64).reshape(-1)
    if log:
        v = v.clamp_min(1e-30).log()
    lo, hi = _f16(v.min()), _f16(v.max())
    if not hi > lo:
        hi = lo + 1
    q = ((v - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8)
    return torch.stack([lo, hi]).to(torch.float16).numpy().tobytes() + q.numpy().tobytes()


def _unq8(data: bytes, log: bool = False) -> torch.Tensor:
    lo, hi = torch.from_numpy(np.frombuffer(data[:4], dtype=np.float16).copy()).to(torch.float64)
    q = torch.from_numpy(np.frombuffer(data[4:], dtype=np.uint8).copy()).to(torch.float64)
    v = q / 255 * (hi - lo) + lo
    return v.exp() if log else v


def _side_encode(x: torch.Tensor, side: SideInfo, log: bool = False) -> bytes:
    return _q8(x, log) if side == "uint8" else x.reshape(-1).to(torch.float16).numpy().tobytes()


def _side_decode(data: bytes, side: SideInfo, log: bool = False) -> torch.Tensor:
    if side == "uint8":
        return _unq8(data, log)
    return torch.from_numpy(np.frombuffer(data, dtype=np.float16).copy()).to(torch.float64)


def _ranges(lo: torch.Tensor, hi: torch.Tensor, side: SideInfo) -> tuple[bytes, torch.Tensor, torch.Tensor]:
    """Per-plane (lo, hi) as stored and as decoded; uint8 rounds lo down and hi up on the layer's grid."""
    if side == "float16":
        lo16, hi16 = _f16(lo), _f16(hi)
        return torch.stack([lo16, hi16]).to(torch.float16).numpy().tobytes(), lo16, hi16
    glo, ghi = lo.min(), hi.max()
    glo16 = _f16(glo)
    glo16 = glo16 if glo16 <= glo else _f16(glo - glo.abs() * 1e-3 - 1e-6)
    ghi16 = _f16(ghi)
    ghi16 = ghi16 if ghi16 >= ghi else _f16(ghi + ghi.abs() * 1e-3 + 1e-6)
    step = (ghi16 - glo16).clamp_min(1e-12) / 255
    qlo = ((lo - glo16) / step).floor().clamp(0, 254)
    qhi = torch.maximum(((hi - glo16) / step).ceil().clamp(1, 255), qlo + 1)
    data = (
        torch.stack([glo16, ghi16]).to(torch.float16).numpy().tobytes()
        + torch.stack([qlo, qhi]).to(torch.uint8).numpy().tobytes()
    )
    return data, glo16 + qlo * step, glo16 + qhi * step


def _unranges(data: bytes, e: int, side: SideInfo) -> tuple[torch.Tensor, torch.Tensor]:
    if side == "float16":
        lohi = torch.from_numpy(np.frombuffer(data, dtype=np.float16).copy()).to(torch.float64).reshape(2, e)
        return lohi[0], lohi[1]
    glo, ghi = torch.from_numpy(np.frombuffer(data[:4], dtype=np.float16).copy()).to(torch.float64)
    q = torch.from_numpy(np.frombuffer(data[4:], dtype=np.uint8).copy()).to(torch.float64).reshape(2, e)
    step = (ghi - glo).clamp_min(1e-12) / 255
    return glo + q[0] * step, glo + q[1] * step


def encode_sheet(
    sheet: torch.Tensor,
    quality: int = 75,
    fmt: Format = "webp",
    side: SideInfo = "uint8",
    bias: torch.Tensor | None = None,
) -> dict:
    """Encode an (h, w, E) sheet (and optionally its units' biases) into bytes + metadata.

    Returns {"image", "norms", "range", "bias", "shape", "fmt", "side"}; :func:`blob_bytes` counts
    the stored bytes. Usage: ``blob = encode_sheet(CorticalSheet.of(layer).features(), quality=80)``.
    """
    from PIL import Image

    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; use webp, jpeg or avif")
    if fmt not in available_formats():
        raise ValueError(f"this Pillow build cannot write {fmt}; available: {', '.join(available_formats())}")
    if side not in ("uint8", "float16"):
        raise ValueError(f"side information must be 'uint8' or 'float16', got {side!r}")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    s = sheet.detach().to(torch.float64).cpu()
    h, w, e = s.shape
    norms = s.norm(dim=-1, keepdim=True)
    d = s / norms.clamp_min(1e-30)
    rng, lo_, hi_ = _ranges(d.amin(dim=(0, 1)), d.amax(dim=(0, 1)), side)
    q = ((d - lo_) / (hi_ - lo_).clamp_min(1e-12) * 255).round().clamp(0, 255).to(torch.uint8)  # (h, w, E)
    rows, cols = _mosaic_shape(e)
    planes = torch.full((rows * cols, h, w), 128, dtype=torch.uint8)
    planes[:e] = q.permute(2, 0, 1)
    mosaic = planes.reshape(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w).numpy()
    buf = io.BytesIO()
    Image.fromarray(mosaic, mode="L").save(buf, format=fmt.upper(), quality=int(quality), **_SAVE[fmt])
    b = b"" if bias is None else _side_encode(bias.detach().cpu(), side)
    return {
        "image": buf.getvalue(),
        "norms": _side_encode(norms, side, log=True),
        "range": rng,
        "bias": b,
        "shape": (h, w, e),
        "fmt": fmt,
        "side": side,
    }


def decode_sheet(blob: dict) -> torch.Tensor:
    """The (h, w, E) float64 sheet back from :func:`encode_sheet`'s output. Usage: ``decode_sheet(blob)``."""
    from PIL import Image

    h, w, e = blob["shape"]
    side = blob.get("side", "float16")
    rows, cols = _mosaic_shape(e)
    mosaic = torch.from_numpy(np.array(Image.open(io.BytesIO(blob["image"])).convert("L"), dtype=np.uint8))
    planes = mosaic.reshape(rows, h, cols, w).permute(0, 2, 1, 3).reshape(rows * cols, h, w)[:e]
    lo, hi = _unranges(blob["range"], e, side)
    d = planes.permute(1, 2, 0).to(torch.float64) / 255 * (hi - lo) + lo
    norms = _side_decode(blob["norms"], side, log=True).reshape(h, w, 1)
    return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-30) * norms


def decode_bias(blob: dict) -> torch.Tensor | None:
    """The float64 biases stored with the sheet, or None. Usage: ``decode_bias(blob)``."""
    if not blob.get("bias"):
        return None
    return _side_decode(blob["bias"], blob.get("side", "float16"))


def blob_bytes(blob: dict) -> int:
    """Stored bytes of one encoded sheet (image + norms + ranges + biases). Usage: ``blob_bytes(encode_sheet(s))``."""
    return len(blob["image"]) + len(blob["norms"]) + len(blob["range"]) + len(blob.get("bias", b""))


@torch.no_grad()
def codec_roundtrip(
    model: nn.Module, layers: str, quality: int | dict[str, int] = 75, fmt: Format = "webp", side: SideInfo = "uint8"
) -> tuple[nn.Module, dict]:
    """A copy of ``model`` whose matching layers hold their weights and biases after an encode/decode round trip.

    ``quality`` is one number or {layer name: quality}. Returns (copy, report) with ``bytes`` (codec
    storage of those layers, biases included) and ``raw_bytes`` (the same weights and biases as
    float32). Both models of a comparison must go through the same call. Usage: ``codec_roundtrip(m, "0,2", 60)``.
    """
    out = copy.deepcopy(model)
    total, raw, per = 0, 0, {}
    for s in find_sheets(out, layers):
        if s.side != "output" or s.bias:
            raise ValueError("codec storage works on output sheets without the bias feature")
        q = quality[s.name] if isinstance(quality, dict) else quality
        wt, bias = layer_tensor(s.module, "weight"), s.module.bias
        b = bias if isinstance(bias, torch.Tensor) else None  # None: no bias
        blob = encode_sheet(s.features(), q, fmt, side, bias=b)
        wt.copy_(decode_sheet(blob).reshape(wt.shape).to(wt.dtype))
        if b is not None:
            db = decode_bias(blob)
            assert db is not None  # encoded with bias=b just above
            b.copy_(db.reshape(b.shape).to(b.dtype))
        n = blob_bytes(blob)
        total += n
        raw += 4 * wt.numel() + (4 * b.numel() if b is not None else 0)
        per[s.name] = n
    return out, {"bytes": total, "raw_bytes": raw, "per_layer": per, "quality": quality, "fmt": fmt, "side": side}


__all__ = [
    "CorticalSheet",
    "available_formats",
    "blob_bytes",
    "codec_roundtrip",
    "decode_bias",
    "decode_sheet",
    "encode_sheet",
]
