"""Community detection and modularity Q (topotorch.analysis.modularity) on networks whose modules are known."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

from tests.analysis.test_analysis import block_net
from topotorch.analysis.modularity import detect_communities, importance, modularity, weighted_adjacency
from topotorch.graph import SpatialGraph


def two_block_mlp(dense: bool, seed: int = 0) -> SpatialGraph:
    """4-20-20-2: block-diagonal ({x1,x3}->h[:10]->h[:10]->y1 and {x2,x4}->h[10:]->h[10:]->y2) or dense."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 20), nn.SiLU(), nn.Linear(20, 20), nn.SiLU(), nn.Linear(20, 2)).double()
    masks = [torch.zeros(20, 4), torch.zeros(20, 20), torch.zeros(2, 20)]
    masks[0][:10, [0, 2]] = 1
    masks[0][10:, [1, 3]] = 1
    masks[1][:10, :10] = 1
    masks[1][10:, 10:] = 1
    masks[2][0, :10] = 1
    masks[2][1, 10:] = 1
    with torch.no_grad():
        for lin, m in zip(net[::2], masks):
            w = torch.rand(lin.weight.shape, generator=g, dtype=torch.float64) + 0.5
            lin.weight.copy_(w if dense else w * m.double())
    return SpatialGraph.from_chain(net, input_labels=["x1", "x2", "x3", "x4"], output_labels=["y1", "y2"])


@pytest.mark.parametrize("backend", ["igraph", "networkx"])
def test_block_diagonal_has_higher_q_than_dense(backend):
    block = detect_communities(two_block_mlp(False), backend=backend, resolution=0.5)
    dense = detect_communities(two_block_mlp(True), backend=backend)
    assert block.q > 0.45 and dense.q < 0.2 and block.q > dense.q + 0.3
    assert block.n_communities == 2
    assert sorted(sorted(m["inputs"]) + m["outputs"] for m in block.modules) == [["x1", "x3", "y1"], ["x2", "x4", "y2"]]


def test_q_matches_networkx_and_backends_agree():
    _, g = block_net(noise=0.02)
    a = weighted_adjacency(g)
    c = detect_communities(g)
    mem = np.concatenate(list(c.membership.values()))
    groups = [set(np.nonzero(mem == i)[0]) for i in range(mem.max() + 1)]
    assert modularity(a, mem) == pytest.approx(nx.community.modularity(nx.from_scipy_sparse_array(a), groups))
    assert c.q == pytest.approx(detect_communities(g, backend="networkx").q, abs=1e-6)
    assert c.backend.startswith("igraph")


def test_adjacency_is_symmetric_sum_of_abs_weights_and_threshold_drops():
    net, g = block_net(noise=0.02)
    a = weighted_adjacency(g).toarray()
    assert np.allclose(a, a.T)
    w1 = net[0].weight.detach().abs().numpy()
    assert np.allclose(a[4:9, 0:4], w1)  # hidden rows (offset 4) vs inputs
    at = weighted_adjacency(g, threshold=0.05).toarray()
    assert np.count_nonzero(at) == 2 * 11 and np.allclose(at[at > 0], a[at > 0])


def test_isolated_neurons_get_minus_one_and_empty_graph():
    net, g = block_net(noise=0.0)
    with torch.no_grad():
        net[0].weight[:, 1] = 0.0  # x2 loses its only edge
    c = detect_communities(g)
    assert c.membership["input"][1] == -1
    with torch.no_grad():
        for lin in (net[0], net[2]):
            lin.weight.zero_()
    empty = detect_communities(g)
    assert empty.q == 0.0 and empty.n_communities == 0 and (empty.membership["hidden1"] == -1).all()


def test_deterministic_and_bad_arguments():
    g = two_block_mlp(True, seed=3)
    assert np.array_equal(
        np.concatenate(list(detect_communities(g, seed=1).membership.values())),
        np.concatenate(list(detect_communities(g, seed=1).membership.values())),
    )
    with pytest.raises(ValueError, match="backend"):
        detect_communities(g, backend="magic")
    with pytest.raises(ValueError, match="resolution"):
        detect_communities(g, resolution=0)
    with pytest.raises(ValueError, match="membership"):
        modularity(weighted_adjacency(g), np.zeros(3))


def test_importance_is_in_plus_out_abs_weights():
    net, g = block_net(noise=0.0)
    imp = importance(g)
    w1, w2 = net[0].weight.detach().abs(), net[2].weight.detach().abs()
    assert torch.allclose(imp["hidden1"], w1.sum(1) + w2.sum(0))
    assert torch.allclose(imp["input"], w1.sum(0)) and torch.allclose(imp["output"], w2.sum(1))
