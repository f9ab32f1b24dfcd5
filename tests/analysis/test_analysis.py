"""Structure read-outs (topotorch.analysis) on hand-built networks whose answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from topotorch.analysis import active_neurons, active_weights, modules, neuron_activity, thresholded
from topotorch.graph import SpatialGraph

THR = 0.05

# Two disjoint circuits in a 4-5-2 net:
#   A: x1, x2, x3 -> h0, h1, h2 -> y1
#   B: x4 -> h3 -> y2, plus h4 fed by x4 but feeding nothing (a dangling neuron)
W1 = torch.tensor(
    [
        [0.9, -0.7, 0.0, 0.0],  # h0 <- x1, x2
        [0.5, 0.0, 0.8, 0.0],  # h1 <- x1, x3
        [0.0, 0.0, -0.6, 0.0],  # h2 <- x3
        [0.0, 0.0, 0.0, 1.1],  # h3 <- x4
        [0.0, 0.0, 0.0, 0.4],  # h4 <- x4 (no outgoing weight)
    ],
    dtype=torch.float64,
)
W2 = torch.tensor(
    [
        [0.3, -0.9, 0.7, 0.0, 0.0],  # y1 <- h0, h1, h2
        [0.0, 0.0, 0.0, -1.2, 0.0],  # y2 <- h3
    ],
    dtype=torch.float64,
)
N_ACTIVE = int((W1 != 0).sum() + (W2 != 0).sum())  # 7 + 4


def block_net(noise: float = 0.0, labels: bool = True, seed: int = 0) -> tuple[nn.Module, SpatialGraph]:
    """The two-circuit net; ``noise`` adds |n| <= noise to the weights that are zero in the clean net."""
    net = nn.Sequential(nn.Linear(4, 5), nn.SiLU(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin, w in ((net[0], W1), (net[2], W2)):
            n = (torch.rand(w.shape, generator=g, dtype=torch.float64) * 2 - 1) * noise
            lin.weight.copy_(torch.where(w == 0, n, w))
            lin.bias.copy_(torch.linspace(-0.2, 0.3, lin.out_features, dtype=torch.float64))
    graph = SpatialGraph.from_chain(
        net,
        input_labels=["x1", "x2", "x3", "x4"] if labels else None,
        output_labels=["y1", "y2"] if labels else None,
    )
    return net, graph


def test_modules_finds_the_two_circuits_with_their_labels():
    _, g = block_net(noise=0.02)
    mods = modules(g, THR)
    assert len(mods) == 2
    a, b = mods  # largest first
    assert sorted(a["inputs"]) == ["x1", "x2", "x3"] and a["outputs"] == ["y1"]
    assert a["sizes"] == {"input": 3, "hidden1": 3, "output": 1} and a["neurons"] == 7
    assert b["inputs"] == ["x4"] and b["outputs"] == ["y2"]
    assert b["sizes"] == {"input": 1, "hidden1": 2, "output": 1} and b["neurons"] == 4


def test_modules_default_labels_and_exclude():
    _, g = block_net(labels=False)
    mods = modules(g, THR)
    assert [sorted(m["inputs"]) for m in mods] == [["x1", "x2", "x3"], ["x4"]]
    assert [m["outputs"] for m in mods] == [["y1"], ["y2"]]
    below = modules(g, THR, exclude=("output",))
    assert len(below) == 2
    assert all(m["outputs"] == [] and "output" not in m["sizes"] for m in below)


def test_modules_merge_when_a_bridge_weight_is_active():
    net, g = block_net()
    with torch.no_grad():
        net[2].weight[1, 0] = 0.5  # y2 <- h0 joins the circuits
    mods = modules(g, THR)
    assert len(mods) == 1
    assert sorted(mods[0]["inputs"]) == ["x1", "x2", "x3", "x4"] and sorted(mods[0]["outputs"]) == ["y1", "y2"]


def test_noise_above_threshold_joins_everything_and_empty_net_has_no_modules():
    _, g = block_net(noise=0.02)
    assert len(modules(g, 0.0)) == 1  # every weight counts: one blob
    net, g = block_net()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    assert modules(g, THR) == []


def test_active_weights_counts():
    _, g = block_net(noise=0.02)
    aw = active_weights(g, THR)
    assert aw["active"] == N_ACTIVE == 11
    assert aw["total"] == 4 * 5 + 5 * 2
    assert aw["fraction"] == pytest.approx(11 / 30)
    assert active_weights(g, 0.0)["active"] > 11  # the noise counts at threshold 0
    assert active_weights(g, 10.0)["active"] == 0


def test_a_weight_exactly_at_threshold_is_inactive():
    net, g = block_net()
    with torch.no_grad():
        net[0].weight[4, 0] = THR  # |w| == threshold is not > threshold
    assert active_weights(g, THR)["active"] == N_ACTIVE


def test_active_neurons_need_in_and_out():
    _, g = block_net(noise=0.02)
    counts = active_neurons(g, THR)
    assert counts == {"input": 4, "hidden1": 4, "output": 2}  # h4 has no outgoing weight
    masks = neuron_activity(g, THR)
    assert masks["hidden1"].tolist() == [True, True, True, True, False]
    net, g = block_net()
    with torch.no_grad():
        net[0].weight[:, 1] = 0.0  # x2 feeds nothing now
    assert neuron_activity(g, THR)["input"].tolist() == [True, False, True, True]


def test_thresholded_zeroes_small_weights_and_restores_exactly():
    net, g = block_net(noise=0.02)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = dict(net.named_parameters())
    with thresholded(g, THR) as tg:
        assert tg is g
        assert torch.equal(net[0].weight, W1) and torch.equal(net[2].weight, W2)
        assert torch.equal(net[0].bias, before["0.bias"])  # biases are not connections: untouched
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p is params[k] for k, p in net.named_parameters())  # same Parameter objects (optimizers keep working)


def test_thresholded_restores_after_an_exception():
    net, g = block_net(noise=0.02)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(KeyError):
        with thresholded(g, THR):
            assert torch.equal(net[0].weight, W1)
            raise KeyError("boom")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_thresholded_noisy_net_computes_the_clean_net():
    clean, _ = block_net(noise=0.0)
    noisy, g = block_net(noise=0.04)
    x = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(noisy(x), clean(x))
    with torch.no_grad(), thresholded(g, THR):
        assert torch.equal(noisy(x), clean(x))
    assert not torch.equal(noisy(x), clean(x))


def test_median_seconds_times_calls_and_refuses_zero_reps():
    from topotorch.timing import median_seconds

    calls = []
    assert median_seconds(lambda: calls.append(1), reps=5, warmup=2) >= 0
    assert len(calls) == 7
    with pytest.raises(ValueError, match="reps"):
        median_seconds(lambda: None, reps=0)
