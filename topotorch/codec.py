"""Image-codec storage of cortical sheets: smooth sheets compress like photographs.

A layer's (h, w, E) sheet is stored as

* one 8-bit grayscale mosaic of its E feature planes (each an h x w tile; plane e holds feature e
  of every unit's *direction* S_i/|S_i|, scaled by that plane's min/max), written by a standard
  lossy codec (WebP or JPEG via Pillow, ``quality`` the knob);
* the per-unit norms |S_i| and the biases as float16, the planes' min/max as float16.

TopoLoss makes the directions smooth on the sheet (it is a cosine), not the norms, hence the split.
Decoding renormalises each unit's decoded direction and multiplies its norm back.

    >>> small, report = codec_roundtrip(model, "0,2", quality=75)    # a copy with decoded weights
    >>> report["bytes"], report["raw_bytes"]                           # stored size vs float32
"""

from __future__ import annotations

import copy
import io
import math
from typing import Literal

import numpy as np
import torch
from torch import nn

from .sheets import CorticalSheet, find_sheets

Format = Literal["webp", "jpeg"]


def _mosaic_shape(e: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(e))
    return math.ceil(e / cols), cols


def encode_sheet(sheet: torch.Tensor, quality: int = 75, fmt: Format = "webp") -> dict:
    """Encode an (h, w, E) sheet; returns {"image", "norms", "range", "shape", "fmt"} (bytes + metadata).

    Usage: ``blob = encode_sheet(CorticalSheet.of(layer).features(), quality=80)``.
    """
    from PIL import Image

    if fmt not in ("webp", "jpeg"):
        raise ValueError(f"unknown image format {fmt!r}; use webp or jpeg")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality!r}")
    s = sheet.detach().to(torch.float64).cpu()
    h, w, e = s.shape
    norms = s.norm(dim=-1, keepdim=True)
    d = s / norms.clamp_min(1e-30)
    lo, hi = d.amin(dim=(0, 1)), d.amax(dim=(0, 1))
    lo16, hi16 = lo.to(torch.float16), hi.to(torch.float16)
    lo_, hi_ = lo16.to(torch.float64), hi16.to(torch.float64)
    q = ((d - lo_) / (hi_ - lo_).clamp_min(1e-12) * 255).round().clamp(0, 255).to(torch.uint8)  # (h, w, E)
    rows, cols = _mosaic_shape(e)
    planes = torch.zeros(rows * cols, h, w, dtype=torch.uint8)
    planes[:e] = q.permute(2, 0, 1)
    mosaic = planes.reshape(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w).numpy()
    buf = io.BytesIO()
    Image.fromarray(mosaic, mode="L").save(buf, format=fmt.upper(), quality=int(quality))
    return {"image": buf.getvalue(), "norms": norms.reshape(-1).to(torch.float16).numpy().tobytes(),
            "range": torch.stack([lo16, hi16]).numpy().tobytes(), "shape": (h, w, e), "fmt": fmt}


def decode_sheet(blob: dict) -> torch.Tensor:
    """The (h, w, E) float64 sheet back from :func:`encode_sheet`'s output. Usage: ``decode_sheet(blob)``."""
    from PIL import Image

    h, w, e = blob["shape"]
    rows, cols = _mosaic_shape(e)
    mosaic = torch.from_numpy(np.array(Image.open(io.BytesIO(blob["image"])).convert("L"), dtype=np.uint8))
    planes = mosaic.reshape(rows, h, cols, w).permute(0, 2, 1, 3).reshape(rows * cols, h, w)[:e]
    lohi = torch.from_numpy(np.frombuffer(blob["range"], dtype=np.float16).copy()).to(torch.float64).reshape(2, e)
    d = planes.permute(1, 2, 0).to(torch.float64) / 255 * (lohi[1] - lohi[0]) + lohi[0]
    norms = torch.from_numpy(np.frombuffer(blob["norms"], dtype=np.float16).copy()).to(torch.float64).reshape(h, w, 1)
    return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-30) * norms


def blob_bytes(blob: dict) -> int:
    """Stored bytes of one encoded sheet (image + norms + ranges). Usage: ``blob_bytes(encode_sheet(s))``."""
    return len(blob["image"]) + len(blob["norms"]) + len(blob["range"])


@torch.no_grad()
def codec_roundtrip(model: nn.Module, layers: str, quality: int = 75, fmt: Format = "webp") -> tuple[nn.Module, dict]:
    """A copy of ``model`` whose matching layers hold their weights after an encode/decode round trip.

    Returns (copy, report) with ``bytes`` (codec storage of those layers, biases as float16 included)
    and ``raw_bytes`` (the same weights and biases as float32). Usage: ``codec_roundtrip(m, "0,2", 60)``.
    """
    out = copy.deepcopy(model)
    total, raw, per = 0, 0, {}
    for s in find_sheets(out, layers):
        if s.side != "output" or s.bias:
            raise ValueError("codec storage works on output sheets without the bias feature")
        blob = encode_sheet(s.features(), quality, fmt)
        wt = s.module.weight
        wt.copy_(decode_sheet(blob).reshape(wt.shape).to(wt.dtype))
        n = blob_bytes(blob)
        b = s.module.bias
        if b is not None:
            b.copy_(b.to(torch.float16).to(b.dtype))
            n += 2 * b.numel()
        total += n
        raw += 4 * wt.numel() + (4 * b.numel() if b is not None else 0)
        per[s.name] = n
    return out, {"bytes": total, "raw_bytes": raw, "per_layer": per, "quality": quality, "fmt": fmt}


__all__ = ["CorticalSheet", "blob_bytes", "codec_roundtrip", "decode_sheet", "encode_sheet"]
