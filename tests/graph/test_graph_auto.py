"""The traced coupling graph of arbitrary models: permutations of every group keep the function."""

import copy

import pytest
import torch
from torch import nn

from topotorch.graph.conv import conv_graph
from topotorch.graph.traced import coupling_graph
from topotorch.models import MLP, SmallResNet
from topotorch.objectives.wiring import WiringConfig, wiring_cost
from topotorch.relocation import apply_permutation, relocate


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc_in(x)
        h = h + self.fc2(nn.functional.gelu(self.fc1(self.ln(h))))
        return self.out(h)


class TwoBranches(nn.Module):
    """Concatenated branches: the joining layer's columns split between two groups (not supported yet)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(5, 4)
        self.join = nn.Linear(10, 7)
        self.out = nn.Linear(7, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.join(torch.cat([torch.relu(self.a(x)), torch.sigmoid(self.b(x))], -1))))


def models():
    torch.manual_seed(0)
    resnet = SmallResNet(channels=6, hidden=5, n_blocks=2, image_size=4).double()
    resnet.train()
    with torch.no_grad():
        resnet(torch.randn(32, 16, dtype=torch.float64))  # non-trivial BatchNorm statistics
    resnet.eval()
    return {
        "residual-mlp": (ResidualMLP().double(), torch.randn(6, 4, dtype=torch.float64)),
        "two-branches": (TwoBranches().double(), torch.randn(6, 5, dtype=torch.float64)),
        "mlp": (MLP([4, 20, 20, 2]).double(), torch.randn(6, 4, dtype=torch.float64)),
        "resnet": (resnet, torch.randn(6, 16, dtype=torch.float64)),
    }


@pytest.mark.parametrize("name", ["residual-mlp", "mlp", "resnet"])
def test_permuting_any_group_preserves_the_function(name):
    model, x = models()[name]
    graph = coupling_graph(model, x)
    with torch.no_grad():
        y0 = model(x)
    gen = torch.Generator().manual_seed(3)
    assert graph.movable_spaces()
    for sp in graph.movable_spaces():
        apply_permutation(graph, sp, torch.randperm(sp.size, generator=gen))
        with torch.no_grad():
            assert (model(x) - y0).abs().max() <= 1e-10, sp.name


@pytest.mark.parametrize("name", ["residual-mlp", "resnet"])
def test_relocation_on_the_traced_graph(name):
    model, x = models()[name]
    graph = coupling_graph(model, x)
    cfg = WiringConfig(wf=2.0, l0=0.5)
    with torch.no_grad():
        y0, c0 = model(x), float(wiring_cost(graph, cfg))
    stats = relocate(graph, cfg, "assign", sweeps=2)
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-10
        assert float(wiring_cost(graph, cfg)) - c0 == pytest.approx(stats.total_delta, abs=1e-10)
    assert stats.total_delta < 0


def test_residual_stream_and_output_are_found():
    model, x = models()["residual-mlp"]
    graph = coupling_graph(model, x)
    stream = graph.space("fc_in")
    assert stream.stream and stream.size == 8
    owned = {(s.name, s.dim) for s in stream.slices}
    assert {("fc_in.weight", 0), ("fc2.weight", 0), ("fc1.weight", 1), ("out.weight", 1), ("ln.weight", 0)} <= owned
    assert graph.space("output").role == "output" and graph.space("input").role == "input"


def test_traced_graph_of_the_resnet_matches_the_hand_built_one():
    model, x = models()["resnet"]
    auto, manual = coupling_graph(model, x), conv_graph(model)
    cfg = WiringConfig(wf=1.5, l0=0.3)  # same layer sizes -> same line layouts -> the same cost
    torch.testing.assert_close(wiring_cost(auto, cfg), wiring_cost(manual, cfg), rtol=1e-12, atol=0)
    stream = auto.space("stem")
    assert stream.stream and next(s for s in stream.slices if s.name == "head.weight").index.shape == (6, 16)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.fc(x) * self.gain


def test_attention_and_layer_scale_are_placed_now():
    """Earlier versions refused nn.MultiheadAttention and parameters of unknown layers; now both are placed."""

    class WithAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(h + self.mha(h, h, h)[0])

    g = coupling_graph(WithAttention().double(), torch.randn(1, 3, 3, dtype=torch.float64))
    heads = g.space("mha")
    assert heads.groups is not None and len(heads.groups.unique()) == 2
    g = coupling_graph(
        nn.Sequential(nn.Linear(3, 4), Scaled(), nn.Linear(4, 2)).double(), torch.randn(2, 3, dtype=torch.float64)
    )
    assert ("1.gain", 0) in {(s.name, s.dim) for s in g.space("1.fc").slices}  # layer scale moves with its unit


def test_concatenated_branches_are_placed_with_partial_connections():
    model, x = models()["two-branches"]
    graph = coupling_graph(model, x)
    joins = [c for c in graph.connections if c.weight == "join.weight"]
    assert {c.source for c in joins} == {"a", "b"}  # one connection per concatenated part
    cfg = WiringConfig(wf=1.0, l0=0.2)
    base = model(x)
    relocate(graph, cfg, "assign")
    torch.testing.assert_close(model(x), base, rtol=0, atol=1e-12)


def test_tracing_leaves_batchnorm_statistics_alone():
    model, _x = models()["resnet"]
    model.train()
    before = copy.deepcopy(model.state_dict())
    coupling_graph(model, torch.randn(8, 16, dtype=torch.float64))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
