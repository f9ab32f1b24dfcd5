"""SpatialGraph.from_chain: spaces, roles, slices and connections; clear errors for what it cannot place."""

import pytest
import torch
from torch import nn

from topotorch.geometry import circle, grid, line
from topotorch.graph import Slice, Space, SpatialGraph


def mlp(*widths):
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class FoldedEmbed(nn.Module):
    """E[a] and E[b] concatenated, then an MLP whose first layer takes 2d features."""

    def __init__(self, p=7, d=5, h=6):
        super().__init__()
        self.emb = nn.Embedding(p, d)
        self.fc1 = nn.Linear(2 * d, h)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(h, p)

    def forward(self, x):
        e = torch.cat([self.emb(x[:, 0]), self.emb(x[:, 1])], dim=1)
        return self.fc2(self.act(self.fc1(e)))


# -- MLP chains -----------------------------------------------------------------------------------
def test_from_chain_mlp_spaces_sizes_roles():
    net = mlp(4, 20, 30, 2)
    g = SpatialGraph.from_chain(net)
    assert [s.name for s in g.spaces] == ["input", "hidden1", "hidden2", "output"]
    assert [s.size for s in g.spaces] == [4, 20, 30, 2]
    assert [s.role for s in g.spaces] == ["input", "hidden", "hidden", "output"]
    assert [s.relocate for s in g.spaces] == ["positions", "weights", "weights", "positions"]
    assert [s.height for s in g.spaces] == [0.0, 1.0, 2.0, 3.0]
    # default layout is a line
    for s in g.spaces:
        assert torch.equal(s.positions, line(s.size))
    # connections: one per Linear, wiring consecutive spaces, bias attached
    assert [(c.weight, c.source, c.target, c.bias) for c in g.connections] == [
        ("0.weight", "input", "hidden1", "0.bias"),
        ("2.weight", "hidden1", "hidden2", "2.bias"),
        ("4.weight", "hidden2", "output", "4.bias"),
    ]
    assert [c.weight for c in g.incoming("hidden2")] == ["2.weight"]
    assert [c.weight for c in g.outgoing("hidden2")] == ["4.weight"]
    assert g.tensor("2.weight") is net[2].weight
    assert repr(g) == "SpatialGraph(input[4], hidden1[20], hidden2[30], output[2]; 3 connections)"


def test_from_chain_hidden_neuron_owns_row_bias_and_next_column():
    net = mlp(3, 5, 2)
    g = SpatialGraph.from_chain(net)
    h = g.space("hidden1")
    owned = {(sl.name, sl.dim): sl.index for sl in h.slices}
    assert set(owned) == {("0.weight", 0), ("0.bias", 0), ("2.weight", 1)}
    for idx in owned.values():
        assert torch.equal(idx, torch.arange(5).unsqueeze(1))
    inp = g.space("input")
    assert [(sl.name, sl.dim) for sl in inp.slices] == [("0.weight", 1)]


def test_from_chain_layouts_and_fixed_ends():
    net = mlp(64, 20, 10)
    g = SpatialGraph.from_chain(
        net,
        layouts={"input": "grid:8x8", "hidden1": "grid:4x5", "output": "circle"},
        relocate_inputs=False,
        relocate_outputs=False,
        input_labels=[f"px{i}" for i in range(64)],
        output_labels=[str(i) for i in range(10)],
    )
    assert torch.equal(g.space("input").positions, grid(8, 8))
    assert torch.equal(g.space("hidden1").positions, grid(4, 5))
    assert torch.equal(g.space("output").positions, circle(10))
    assert g.space("input").relocate == "fixed" and g.space("output").relocate == "fixed"
    assert g.space("output").labels[3] == "3"
    assert [s.name for s in g.movable_spaces()] == ["hidden1"]


def test_from_chain_no_bias_and_nested_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleDict({"a": nn.Linear(3, 4, bias=False)})
            self.head = nn.Linear(4, 2)

    g = SpatialGraph.from_chain(Net())
    assert [s.name for s in g.spaces] == ["input", "hidden1", "output"]
    assert g.connections[0].weight == "body.a.weight" and g.connections[0].bias is None
    assert [sl.name for sl in g.space("hidden1").slices] == ["body.a.weight", "head.weight"]


def test_from_chain_single_linear():
    """A bare nn.Linear is its own root module (named ''): its tensors are 'weight' and 'bias', not '.weight'."""
    lin = nn.Linear(3, 2)
    g = SpatialGraph.from_chain(lin)
    assert [(s.name, s.size, s.role) for s in g.spaces] == [("input", 3, "input"), ("output", 2, "output")]
    assert [(c.weight, c.bias) for c in g.connections] == [("weight", "bias")]
    assert g.tensor("weight") is lin.weight


# -- folded embedding ---------------------------------------------------------------------------
def test_from_chain_folded_embedding():
    p, d, h = 7, 5, 6
    net = FoldedEmbed(p, d, h)
    g = SpatialGraph.from_chain(net)
    assert [s.name for s in g.spaces] == ["tokens", "embed", "hidden1", "output"]
    assert [s.size for s in g.spaces] == [p, d, h, p]
    tok = g.space("tokens")
    assert tok.positions is None and tok.relocate == "fixed" and tok.role == "input"
    emb = g.space("embed")
    assert emb.role == "hidden" and emb.relocate == "weights"
    assert torch.equal(emb.positions, line(d))
    owned = {(sl.name, sl.dim): sl.index for sl in emb.slices}
    assert set(owned) == {("emb.weight", 1), ("fc1.weight", 1)}
    assert torch.equal(owned[("emb.weight", 1)], torch.arange(d).unsqueeze(1))
    # embed neuron j owns columns j and d + j of the first layer
    fc1_cols = owned[("fc1.weight", 1)]
    assert fc1_cols.shape == (d, 2)
    for j in range(d):
        assert fc1_cols[j].tolist() == [j, d + j]
    # every column of fc1 belongs to exactly one embed neuron
    owner = Slice("fc1.weight", 1, fc1_cols).neuron_of(2 * d)
    assert owner.tolist() == list(range(d)) * 2
    assert [(c.weight, c.source, c.target) for c in g.connections] == [
        ("emb.weight", "tokens", "embed"),
        ("fc1.weight", "embed", "hidden1"),
        ("fc2.weight", "hidden1", "output"),
    ]
    assert [s.name for s in g.movable_spaces()] == ["embed", "hidden1", "output"]


def test_from_chain_folded_embedding_layout():
    g = SpatialGraph.from_chain(FoldedEmbed(7, 6, 4), layouts={"embed": "grid:2x3"})
    assert torch.equal(g.space("embed").positions, grid(2, 3))


def test_folded_embedding_width_must_divide_first_layer():
    net = nn.Sequential()
    net.add_module("emb", nn.Embedding(7, 4))
    net.add_module("fc", nn.Linear(10, 3))
    with pytest.raises(ValueError, match="multiple of embedding width"):
        SpatialGraph.from_chain(net)


# -- errors ---------------------------------------------------------------------------------------
def test_from_chain_layers_that_do_not_chain():
    net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"do not chain: '0' gives 10 features but '2' takes 12"):
        SpatialGraph.from_chain(net)


def test_from_chain_rejects_conv():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with pytest.raises(ValueError, match=r"cannot place layer '0'"):
        SpatialGraph.from_chain(net)


def test_from_chain_needs_a_linear():
    with pytest.raises(ValueError, match=r"at least one nn.Linear"):
        SpatialGraph.from_chain(nn.Sequential(nn.ReLU()))


def test_from_chain_layout_for_unknown_space():
    with pytest.raises(ValueError, match=r"unknown space 'hiden1'"):
        SpatialGraph.from_chain(mlp(4, 5, 2), layouts={"hiden1": "line"})
    with pytest.raises(ValueError, match=r"unknown space 'input'"):
        SpatialGraph.from_chain(FoldedEmbed(), layouts={"input": "line"})  # embedding models have 'embed'


def test_from_chain_layout_with_wrong_count():
    with pytest.raises(ValueError, match="holds 9 neurons"):
        SpatialGraph.from_chain(mlp(4, 5, 2), layouts={"input": "grid:3x3"})


# -- the graph object -----------------------------------------------------------------------------
def test_space_lookup_error_and_unique_names():
    g = SpatialGraph.from_chain(mlp(3, 4, 2))
    with pytest.raises(KeyError, match="no space named 'nope'"):
        g.space("nope")
    s = Space("a", 2, line(2), 0.0)
    with pytest.raises(ValueError, match="unique"):
        SpatialGraph(nn.Linear(2, 2), [s, Space("a", 2, line(2), 1.0)], [])


def test_space_coordinate_count_checked():
    with pytest.raises(ValueError, match="3 coordinates for 2 neurons"):
        Space("a", 2, line(3), 0.0)


def test_set_positions_invalidates_distances():
    g = SpatialGraph.from_chain(mlp(3, 4, 2))
    conn = g.connections[0]
    w = g.tensor(conn.weight)
    d0 = g.distances(conn, "l1", w).clone()
    new = line(3).flip(0)
    g.set_positions("input", new)
    d1 = g.distances(conn, "l1", w)
    assert torch.allclose(d1, d0.flip(1), atol=1e-15)
    assert not torch.allclose(d1, d0)
    with pytest.raises(ValueError, match="shape"):
        g.set_positions("input", line(4))


def test_validate_catches_bad_slices():
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="indexes past"):
        SpatialGraph(net, [Space("out", 2, line(2), 1.0, slices=[Slice("weight", 0, torch.tensor([[0], [5]]))])], [])
    with pytest.raises(ValueError, match="unknown tensor"):
        SpatialGraph(net, [Space("out", 2, line(2), 1.0, slices=[Slice("nope", 0, torch.tensor([[0], [1]]))])], [])
    with pytest.raises(ValueError, match="belong to no neuron"):
        Slice("weight", 1, torch.tensor([[0], [1]])).neuron_of(3)
