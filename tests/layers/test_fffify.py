"""fffify: MLP blocks of any model become FFF layers; the converted model trains and infers."""

import pytest
import torch
from torch import nn

from topotorch.layers import FFF, UltraFFF, fff_layers, fffify, hardening_loss, mlp_blocks
from topotorch.models import MLP, TinyGPT


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.ff = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 16))
        self.other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
        self.deep = MLP([3, 8, 8, 3])  # five layers: not an MLP block

    def forward(self, x):
        return self.deep(self.other(self.embed(x) + self.ff(self.embed(x))))


def test_selects_blocks_by_name_pattern_and_keeps_widths():
    net = Net()
    assert mlp_blocks(net) == ["ff", "other"]
    assert fffify(net, "f*", leaf_width=4) == ["ff"]
    assert isinstance(net.ff, FFF) and isinstance(net.other, nn.Sequential)
    assert (net.ff.input_width, net.ff.output_width, net.ff.leaf_width, net.ff.depth) == (16, 16, 4, 4)
    assert net.ff.training_width == 64 and isinstance(net.ff.activation, nn.GELU)
    x = torch.randn(5, 6)
    assert net(x).shape == (5, 3) and net.eval()(x).shape == (5, 3)


def test_tiny_gpt_mlps_become_fff_and_train():
    torch.manual_seed(0)
    gpt = TinyGPT(vocab=11, d_model=16, n_layers=2, n_heads=2, block_size=8)
    names = fffify(gpt, "blocks.*.mlp", leaf_width=8)
    assert names == ["blocks.0.mlp", "blocks.1.mlp"]
    assert [n for n, _ in fff_layers(gpt)] == names and gpt.blocks[0].mlp.depth == 3  # 64 = 8 * 2^3
    tokens = torch.randint(0, 11, (4, 8))
    opt = torch.optim.Adam(gpt.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = gpt(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + hardening_loss(gpt, 0.1)).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        assert gpt.eval()(tokens).shape == (4, 8, 11)  # 3-D inputs through the hard path


def test_training_width_depth_and_ultra_variant():
    net = Net()
    fffify(net, "ff", leaf_width=2, training_width=16)
    assert net.ff.depth == 3
    net = Net()
    fffify(net, "other", leaf_width=1, depth=2, region_leak=0.1)
    assert net.other.training_width == 4 and net.other.region_leak == 0.1
    net = Net()
    fffify(net, "ff", variant="ultra", training_width=63)
    assert isinstance(net.ff, UltraFFF) and net.ff.depth == 5
    assert net(torch.randn(2, 6)).shape == (2, 3)


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"no MLP block .*\['ff', 'other'\]"):
        fffify(Net(), "nothing")
    with pytest.raises(ValueError, match="power of"):
        fffify(Net(), "ff", leaf_width=3)
    with pytest.raises(ValueError, match="power of two"):
        fffify(Net(), "ff", variant="ultra")  # 64 + 1 is not a power of two
