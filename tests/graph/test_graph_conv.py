"""The conv net's coupling graph: channels move with their kernels, BatchNorm statistics and flattened columns."""

import pytest
import torch
from torch import nn

from topotorch.graph.conv import conv_graph
from topotorch.models import SmallResNet
from topotorch.objectives.wiring import WiringConfig, add_wiring_grad_, wiring_cost
from topotorch.relocation import apply_permutation, relocate


def make(batchnorm=True, seed=0):
    torch.manual_seed(seed)
    model = SmallResNet(channels=6, hidden=5, n_blocks=2, image_size=4, batchnorm=batchnorm).double()
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 16, dtype=torch.float64))  # non-trivial BatchNorm running statistics
    model.eval()
    return model, torch.randn(9, 16, dtype=torch.float64)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_channel_permutations_preserve_the_function(batchnorm):
    model, x = make(batchnorm)
    graph = conv_graph(model)
    with torch.no_grad():
        y0 = model(x)
    gen = torch.Generator().manual_seed(2)
    for sp in graph.movable_spaces():
        apply_permutation(graph, sp, torch.randperm(sp.size, generator=gen))
        with torch.no_grad():
            assert (model(x) - y0).abs().max() <= 1e-10, sp.name
    if batchnorm:  # the running statistics moved with their channels
        assert not torch.equal(model.blocks[0].bn.running_mean, make(batchnorm)[0].blocks[0].bn.running_mean)


@pytest.mark.parametrize("method", ["swap", "assign"])
def test_relocation_lowers_cost_keeps_function(method):
    model, x = make()
    graph = conv_graph(model)
    cfg = WiringConfig(wf=2.0, l0=0.5, agg="mean")
    with torch.no_grad():
        y0, c0 = model(x), float(wiring_cost(graph, cfg))
    stats = relocate(graph, cfg, method, top_k=6)
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-10
        assert float(wiring_cost(graph, cfg)) - c0 == pytest.approx(stats.total_delta, abs=1e-12)
    assert stats.total_delta < 0


def test_kernel_is_one_connection_per_channel_pair():
    model, _ = make()
    graph = conv_graph(model)
    cfg = WiringConfig(wf=0.0, l0=1.0, penalize_bias=False)
    expected = sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    torch.testing.assert_close(wiring_cost(graph, cfg), expected, rtol=1e-12, atol=0)  # wf=0: plain L1
    cfg = WiringConfig(wf=1.0, l0=0.5)
    model.zero_grad()
    wiring_cost(graph, cfg).backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    add_wiring_grad_(graph, cfg, 1.0)
    for n, g in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=0, atol=1e-14)
    # every tap of one kernel costs the same: the distance is between channels
    w = model.blocks[0].conv1.weight
    from topotorch.objectives.wiring import cost_weights

    conn = next(c for c in graph.connections if c.weight == "blocks.0.conv1.weight")
    factor = cost_weights(graph, conn, cfg, w)
    assert factor.shape == (5, 6, 1, 1)


def test_unplaceable_layers_are_named():
    model, _ = make()
    model.blocks[1].bn = nn.GroupNorm(1, 5)
    with pytest.raises(ValueError, match=r"blocks\.1\.bn"):
        conv_graph(model)
    model, _ = make()
    model.blocks[0].conv1 = nn.Conv2d(6, 5, 3, padding=1, groups=1)
    model.blocks[0].conv2 = nn.Conv2d(5, 6, 1, groups=1)
    conv_graph(model)  # any kernel size is fine
    model.stem = nn.Conv2d(1, 6, 3, padding=1, groups=1)
    model.blocks[0].conv1 = nn.Conv2d(6, 6, 3, padding=1, groups=3)
    with pytest.raises(ValueError, match=r"blocks\.0\.conv1"):
        conv_graph(model)
