"""Leaf regions: usage statistics, class/leaf tables, captured inputs and the 2-D picture."""

import math

import pytest
import torch
from torch import nn

from topotorch.layers import FFF, class_leaf_table, draw_regions, format_class_leaf_table, layer_inputs, leaf_usage


def _quadrants():
    """Depth 2 on 2-D inputs: root splits on x1, children on x2 -> the four quadrants are the leaves."""
    layer = FFF(2, 2, 2, 2)
    with torch.no_grad():
        layer.node_weights.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
        layer.node_biases.zero_()
    return layer


def test_leaf_usage_counts_entropy_and_effective_leaves():
    layer = _quadrants()
    x = torch.tensor([[-1.0, -1.0]] * 4 + [[-1.0, 1.0]] * 4 + [[1.0, 1.0]] * 8)
    u = leaf_usage(layer, x)
    assert u.counts.tolist() == [4, 4, 0, 8] and u.n_samples == 16 and u.n_used == 3
    assert math.isclose(u.entropy_bits, 1.5) and math.isclose(u.effective_leaves, 2**1.5)
    assert u.max_fraction == 0.5 and u.as_dict()["n_leaves"] == 4
    assert leaf_usage(layer, torch.zeros(0, 2)).n_used == 0


def test_class_leaf_table_and_its_markdown():
    layer = _quadrants()
    x = torch.tensor([[-1.0, -1.0], [-1.0, -2.0], [1.0, 1.0], [1.0, 2.0], [2.0, 2.0]])
    y = torch.tensor([0, 1, 1, 1, 1])
    table = class_leaf_table(layer, x, y)
    assert table.tolist() == [[1, 1], [0, 0], [0, 0], [0, 3]]
    text = format_class_leaf_table(table, class_names=["a", "b"])
    assert "| 3 | 3 | b | 1.00 | · | 3 |" in text and "| 0 | 2 |" in text
    assert "2 of 4 leaves used by 5 samples; weighted purity 0.800" in text
    assert "1 more used leaves" in format_class_leaf_table(table, top=1)
    with pytest.raises(ValueError, match="labels"):
        class_leaf_table(layer, x, y[:3])


def test_layer_inputs_captures_what_reaches_an_inner_fff():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), FFF(4, 2, 2, 2))
    x = torch.randn(6, 3)
    h = layer_inputs(net, "1", x)
    assert torch.allclose(h, net[0](x))

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), FFF(3, 1, 1, 1)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="not called"):
        layer_inputs(Skips(), "unused", x)


def test_draw_regions_writes_a_png(tmp_path):
    layer = _quadrants()
    x = torch.randn(50, 2)
    fig = draw_regions(layer, x, (x[:, 0] > 0).long(), path=tmp_path / "r.png", resolution=40)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "of 4 leaves used" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="2-D"):
        draw_regions(FFF(3, 2, 2, 1), torch.randn(4, 3))
