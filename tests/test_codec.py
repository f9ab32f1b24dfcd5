"""Image-codec storage: round trips, a smooth sheet stores in fewer bytes than a shuffled one, the report."""

import math

import pytest
import torch
from torch import nn

from topotorch.codec import blob_bytes, codec_roundtrip, decode_sheet, encode_sheet

pytest.importorskip("PIL", reason="Pillow (installed with matplotlib) is needed for codec storage")


def smooth_sheet(h=16, w=16, e=12):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    f = torch.arange(1, e + 1, dtype=torch.float64)
    return torch.cos(math.pi * (xx[..., None] * f / 3 + yy[..., None] * f.flip(0) / 5)).double() + 0.2


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_round_trip_keeps_directions_and_norms(fmt):
    s = smooth_sheet() * torch.linspace(0.5, 2.0, 256).reshape(16, 16, 1)
    back = decode_sheet(encode_sheet(s, quality=95, fmt=fmt))
    cos = torch.nn.functional.cosine_similarity(back.reshape(256, -1), s.reshape(256, -1), dim=-1)
    assert back.shape == s.shape and cos.min() > 0.98
    assert torch.allclose(back.norm(dim=-1), s.norm(dim=-1), rtol=2e-3)


def test_smooth_sheet_stores_smaller_than_shuffled():
    s = smooth_sheet()
    shuffled = s.reshape(256, -1)[torch.randperm(256, generator=torch.Generator().manual_seed(0))].reshape(s.shape)
    assert blob_bytes(encode_sheet(s, 75)) * 1.5 < blob_bytes(encode_sheet(shuffled, 75))


def test_codec_roundtrip_report_and_errors():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    c, rep = codec_roundtrip(net, "0", quality=90)
    assert rep["raw_bytes"] == 4 * (64 * 8 + 64) and 0 < rep["bytes"] and list(rep["per_layer"]) == ["0"]
    assert not torch.equal(c[0].weight, net[0].weight) and torch.equal(c[2].weight, net[2].weight)
    x = torch.randn(20, 8)
    assert (c(x) - net(x)).abs().max() < 0.2
    with pytest.raises(ValueError, match="quality"):
        encode_sheet(smooth_sheet(), quality=0)
    with pytest.raises(ValueError, match="format"):
        encode_sheet(smooth_sheet(), fmt="gif")
