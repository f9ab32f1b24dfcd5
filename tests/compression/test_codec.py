"""Image-codec storage: round trips, side information, a smooth sheet stores in fewer bytes than a shuffled one."""

import math

import pytest
import torch
from torch import nn

pytest.importorskip("PIL", reason="Pillow (installed with matplotlib) is needed for codec storage")

from topotorch.compression.codec import (
    available_formats,
    blob_bytes,
    codec_roundtrip,
    decode_bias,
    decode_sheet,
    encode_sheet,
)

FORMATS = ("webp", "jpeg", "avif")


def need(fmt):
    if fmt not in available_formats():
        pytest.skip(f"this Pillow build cannot write {fmt}")


def smooth_sheet(h=16, w=16, e=12):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    f = torch.arange(1, e + 1, dtype=torch.float64)
    return torch.cos(math.pi * (xx[..., None] * f / 3 + yy[..., None] * f.flip(0) / 5)).double() + 0.2


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("side,rtol", [("float16", 2e-3), ("uint8", 1e-2)])
def test_round_trip_keeps_directions_norms_and_biases(fmt, side, rtol):
    need(fmt)
    s = smooth_sheet() * torch.linspace(0.5, 2.0, 256).reshape(16, 16, 1)
    bias = torch.linspace(-0.3, 0.7, 256)
    blob = encode_sheet(s, quality=95, fmt=fmt, side=side, bias=bias)
    back = decode_sheet(blob)
    cos = torch.nn.functional.cosine_similarity(back.reshape(256, -1), s.reshape(256, -1), dim=-1)
    assert back.shape == s.shape and cos.min() > 0.98
    assert torch.allclose(back.norm(dim=-1), s.norm(dim=-1), rtol=rtol)
    assert (decode_bias(blob) - bias).abs().max() <= (5e-4 if side == "float16" else 1.0 / 255 / 2 + 1e-3)
    side_bytes = len(blob["norms"]) + len(blob["range"]) + len(blob["bias"])
    assert side_bytes == ({"float16": 2 * 256 + 4 * 12 + 2 * 256, "uint8": 4 + 256 + 4 + 2 * 12 + 4 + 256}[side])
    assert decode_bias(encode_sheet(s, 95, fmt, side)) is None


def test_uint8_ranges_never_clip():
    """The 8-bit plane ranges are rounded outwards: a plane's extreme values decode inside its range."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 8, 40, generator=g, dtype=torch.float64) * torch.logspace(-2, 0, 40, dtype=torch.float64)
    d = s / s.norm(dim=-1, keepdim=True)
    back = decode_sheet(encode_sheet(s, 100, "webp", "uint8"))
    db = back / back.norm(dim=-1, keepdim=True)
    # with quality 100 the only big error would come from clipping a plane's range
    assert (db - d).abs().max() < 0.05


@pytest.mark.parametrize("fmt,factor", [("webp", 1.6), ("jpeg", 1.35), ("avif", 1.4)])
def test_smooth_sheet_stores_smaller_than_shuffled(fmt, factor):
    need(fmt)
    s = smooth_sheet()
    shuffled = s.reshape(256, -1)[torch.randperm(256, generator=torch.Generator().manual_seed(0))].reshape(s.shape)
    assert blob_bytes(encode_sheet(s, 75, fmt)) * factor < blob_bytes(encode_sheet(shuffled, 75, fmt))


def test_codec_roundtrip_report_and_errors():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    c, rep = codec_roundtrip(net, "0", quality=90)
    assert rep["raw_bytes"] == 4 * (64 * 8 + 64) and 0 < rep["bytes"] < rep["raw_bytes"] / 3
    assert list(rep["per_layer"]) == ["0"]
    assert not torch.equal(c[0].weight, net[0].weight) and torch.equal(c[2].weight, net[2].weight)
    assert not torch.equal(c[0].bias, net[0].bias) and (c[0].bias - net[0].bias).abs().max() < 0.01
    x = torch.randn(20, 8)
    assert (c(x) - net(x)).abs().max() < 0.2
    _c16, rep16 = codec_roundtrip(net, "0", quality={"0": 90}, side="float16")
    assert rep16["bytes"] > rep["bytes"]  # float16 side information costs more
    with pytest.raises(ValueError, match="quality"):
        encode_sheet(smooth_sheet(), quality=0)
    with pytest.raises(ValueError, match="format"):
        encode_sheet(smooth_sheet(), fmt="gif")
    with pytest.raises(ValueError, match="side"):
        encode_sheet(smooth_sheet(), side="int4")
