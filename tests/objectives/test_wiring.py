"""The BIMT wiring cost against hand-written references: plain L1, mean aggregation, grids, gradients."""

import math

import pytest
import torch
from torch import nn

from topotorch.geometry import circle
from topotorch.graph import SpatialGraph
from topotorch.objectives.wiring import WiringConfig, add_wiring_grad_, connection_costs, wiring_cost


def mlp(*widths, bias=True):
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def linears(net):
    return [m for m in net.modules() if isinstance(m, nn.Linear)]


def line_coords(n):
    """Hand-written line layout: x_j = (2j+1)/(2n), lifted to y = 0.5 for the plane."""
    return [((2 * j + 1) / (2 * n), 0.5) for j in range(n)]


def grid_coords(rows, cols):
    """Hand-written row-major grid: neuron r*cols+c at (column centre, row centre)."""
    return [((2 * c + 1) / (2 * cols), (2 * r + 1) / (2 * rows)) for r in range(rows) for c in range(cols)]


def dist_matrix(tgt, src, metric):
    def d(p, q):
        dx, dy = abs(p[0] - q[0]), abs(p[1] - q[1])
        return dx + dy if metric == "l1" else math.hypot(dx, dy)

    return torch.tensor([[d(p, q) for q in src] for p in tgt], dtype=torch.float64)


def reference_cost(net, coords, wf, l0, metric, agg, penalize_bias):
    """Σ_layers Agg(|W| * (wf*d + l0)) [+ l0 * Agg|b|], written out by hand."""
    total = torch.zeros((), dtype=torch.float64)
    for lin, (src, tgt) in zip(linears(net), zip(coords, coords[1:])):
        w = lin.weight.detach()
        factor = wf * dist_matrix(tgt, src, metric) + l0
        c = w.abs() * factor
        total = total + (c.mean() if agg == "mean" else c.sum())
        if penalize_bias and lin.bias is not None:
            b = lin.bias.detach().abs() * l0
            total = total + (b.mean() if agg == "mean" else b.sum())
    return total


# -- plain L1 -------------------------------------------------------------------------------------
def dyadic_(net, seed):
    """Weights that are multiples of 2^-10: every sum of them is exact in float64, in any order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randint(-2048, 2049, p.shape, generator=g).double() / 1024)
    return net


@pytest.mark.parametrize("penalize_bias", [True, False])
def test_wf0_l0_1_is_plain_l1_exactly(penalize_bias):
    net = dyadic_(mlp(4, 20, 20, 2).double(), 0)
    g = SpatialGraph.from_chain(net)
    cost = wiring_cost(g, WiringConfig(wf=0.0, l0=1.0, agg="sum", penalize_bias=penalize_bias))
    params = [m.weight for m in linears(net)] + ([m.bias for m in linears(net)] if penalize_bias else [])
    l1 = sum(p.abs().sum() for p in params)
    assert cost.item() == l1.item()
    assert torch.equal(cost, l1)


def test_wf0_l0_1_is_plain_l1_random_weights_float64_and_float32():
    torch.manual_seed(1)
    for dtype in (torch.float64, torch.float32):
        net = mlp(4, 20, 20, 2).to(dtype)
        g = SpatialGraph.from_chain(net, layouts={"hidden1": "grid:4x5"})
        cfg = WiringConfig(wf=0.0, l0=1.0, agg="sum")
        per_layer = connection_costs(g, cfg)
        for lin, (name, c) in zip(linears(net), per_layer.items()):
            # multiplying by a factor of exactly 1 changes nothing: same reduction, bit for bit
            assert torch.equal(c, lin.weight.abs().sum() + lin.bias.abs().sum()), name
            assert c.dtype == dtype
        total = wiring_cost(g, cfg)
        assert torch.equal(total, torch.stack(list(per_layer.values())).sum())
        ref = sum(p.abs().sum() for p in net.parameters())
        assert torch.allclose(total, ref, rtol=1e-12 if dtype == torch.float64 else 1e-6)


def test_wf0_scales_with_l0():
    net = dyadic_(mlp(3, 5, 2).double(), 2)
    g = SpatialGraph.from_chain(net)
    base = wiring_cost(g, WiringConfig(wf=0.0, l0=1.0))
    assert torch.equal(wiring_cost(g, WiringConfig(wf=0.0, l0=0.25)), base * 0.25)  # power of two: exact
    assert wiring_cost(g, WiringConfig(wf=0.0, l0=0.0)).item() == 0.0


# -- against the hand-written reference ---------------------------------------------------------
@pytest.mark.parametrize("agg", ["mean", "sum"])
@pytest.mark.parametrize("penalize_bias", [False, True])
@pytest.mark.parametrize("wf,l0", [(1.0, 0.1), (2.5, 0.7), (0.0, 0.3)])
def test_line_mlp_matches_reference(agg, penalize_bias, wf, l0):
    torch.manual_seed(3)
    net = mlp(4, 20, 20, 2).double()
    g = SpatialGraph.from_chain(net)
    cfg = WiringConfig(wf=wf, l0=l0, agg=agg, penalize_bias=penalize_bias)
    ref = reference_cost(net, [line_coords(n) for n in (4, 20, 20, 2)], wf, l0, "l1", agg, penalize_bias)
    assert abs(wiring_cost(g, cfg).item() - ref.item()) <= 1e-12


@pytest.mark.parametrize("agg", ["mean", "sum"])
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_grid_input_network_matches_reference(agg, metric):
    torch.manual_seed(4)
    net = mlp(64, 20, 10).double()
    g = SpatialGraph.from_chain(net, layouts={"input": "grid:8x8", "hidden1": "grid:4x5"})
    cfg = WiringConfig(wf=1.0, l0=0.1, metric=metric, agg=agg, penalize_bias=False)
    coords = [grid_coords(8, 8), grid_coords(4, 5), line_coords(10)]  # 1-D output meets 2-D hidden at y=0.5
    ref = reference_cost(net, coords, 1.0, 0.1, metric, agg, False)
    assert abs(wiring_cost(g, cfg).item() - ref.item()) <= 1e-12
    # the metric matters on a grid: a wrong metric would not pass the check above
    other = reference_cost(net, coords, 1.0, 0.1, "l2" if metric == "l1" else "l1", agg, False)
    assert abs(other.item() - ref.item()) > 1e-6


def test_mean_is_per_connection_mean():
    """'mean' divides each connection by its own number of weights, not the whole network's."""
    torch.manual_seed(5)
    net = mlp(4, 20, 2).double()
    g = SpatialGraph.from_chain(net)
    s = connection_costs(g, WiringConfig(agg="sum", penalize_bias=False))
    m = connection_costs(g, WiringConfig(agg="mean", penalize_bias=False))
    assert set(s) == set(m) == {"0.weight", "2.weight"}
    assert abs(m["0.weight"].item() - s["0.weight"].item() / 80) < 1e-15
    assert abs(m["2.weight"].item() - s["2.weight"].item() / 40) < 1e-15


def test_cost_follows_coordinate_changes():
    torch.manual_seed(6)
    net = mlp(4, 6, 2).double()
    g = SpatialGraph.from_chain(net)
    cfg = WiringConfig(wf=1.0, l0=0.1)
    before = wiring_cost(g, cfg).item()
    new = torch.tensor([[0.9], [0.1], [0.5], [0.3]], dtype=torch.float64)
    g.set_positions("input", new)
    coords = [[(x, 0.5) for x in new.flatten().tolist()], line_coords(6), line_coords(2)]
    ref = reference_cost(net, coords, 1.0, 0.1, "l1", "sum", True)
    after = wiring_cost(g, cfg).item()
    assert abs(after - ref.item()) <= 1e-12
    assert abs(after - before) > 1e-6  # the cache was invalidated


def test_embedding_connection_costs_l0_only():
    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 3)
            self.fc = nn.Linear(6, 2)

    torch.manual_seed(7)
    net = Folded().double()
    g = SpatialGraph.from_chain(net)
    cfg = WiringConfig(wf=3.0, l0=0.2, penalize_bias=False)
    costs = connection_costs(g, cfg)
    # tokens have no coordinates: the table costs l0 * Σ|E|
    assert abs(costs["emb.weight"].item() - 0.2 * net.emb.weight.abs().sum().item()) < 1e-12
    # fc column c belongs to embed neuron c % 3, at x = (2(c%3)+1)/6
    xe = [(2 * (c % 3) + 1) / 6 for c in range(6)]
    xo = [1 / 4, 3 / 4]
    ref = sum(abs(net.fc.weight[i, c].item()) * (3.0 * abs(xo[i] - xe[c]) + 0.2) for i in range(2) for c in range(6))
    assert abs(costs["fc.weight"].item() - ref) < 1e-12


# -- exclusions -----------------------------------------------------------------------------------
def test_exclusion_drops_layer():
    torch.manual_seed(8)
    net = mlp(4, 20, 20, 2).double()
    g = SpatialGraph.from_chain(net)
    cfg_all = WiringConfig(wf=1.0, l0=0.1)
    per = connection_costs(g, cfg_all)
    cfg_ex = WiringConfig(wf=1.0, l0=0.1, exclude=["2.*"])
    per_ex = connection_costs(g, cfg_ex)
    assert set(per_ex) == {"0.weight", "4.weight"}
    # the whole connection goes, its bias included
    expected = per["0.weight"] + per["4.weight"]
    assert abs(wiring_cost(g, cfg_ex).item() - expected.item()) < 1e-12
    # the excluded weight gets no gradient from the cost
    net.zero_grad()
    wiring_cost(g, cfg_ex).backward()
    assert net[2].weight.grad is None and net[2].bias.grad is None
    assert net[0].weight.grad is not None


def test_excluding_only_a_bias():
    torch.manual_seed(9)
    net = mlp(3, 4, 2).double()
    g = SpatialGraph.from_chain(net)
    full = connection_costs(g, WiringConfig(l0=0.5))
    no_b0 = connection_costs(g, WiringConfig(l0=0.5, exclude=["0.bias"]))
    assert abs((full["0.weight"] - no_b0["0.weight"]).item() - 0.5 * net[0].bias.abs().sum().item()) < 1e-12
    assert torch.equal(full["2.weight"], no_b0["2.weight"])


def test_excluding_everything_raises():
    g = SpatialGraph.from_chain(mlp(3, 4, 2))
    with pytest.raises(ValueError, match="every connection is excluded"):
        wiring_cost(g, WiringConfig(exclude=["*"]))


# -- gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_gradient_is_factor_times_sign(metric):
    torch.manual_seed(10)
    net = mlp(64, 20, 10).double()
    g = SpatialGraph.from_chain(net, layouts={"input": "grid:8x8", "hidden1": "grid:4x5", "output": "circle"})
    wf, l0 = 1.7, 0.3
    cost = wiring_cost(g, WiringConfig(wf=wf, l0=l0, metric=metric, agg="sum"))
    assert cost.requires_grad
    cost.backward()
    coords = [grid_coords(8, 8), grid_coords(4, 5), [tuple(p) for p in circle(10).tolist()]]
    for lin, (src, tgt) in zip(linears(net), zip(coords, coords[1:])):
        factor = wf * dist_matrix(tgt, src, metric) + l0
        expected = factor * lin.weight.detach().sign()
        assert torch.allclose(lin.weight.grad, expected, rtol=0, atol=1e-12)
        assert torch.allclose(lin.bias.grad, l0 * lin.bias.detach().sign(), rtol=0, atol=1e-15)


def test_gradient_mean_divides_by_numel():
    torch.manual_seed(11)
    net = mlp(4, 6, 2).double()
    g = SpatialGraph.from_chain(net)
    wiring_cost(g, WiringConfig(wf=0.0, l0=1.0, agg="mean")).backward()
    assert torch.allclose(net[0].weight.grad, net[0].weight.detach().sign() / 24, rtol=0, atol=1e-15)
    assert torch.allclose(net[0].bias.grad, net[0].bias.detach().sign() / 6, rtol=0, atol=1e-15)


def test_gradient_matches_finite_differences():
    """Mean aggregation, L2 metric, bias included: autograd agrees with central differences of the cost."""
    torch.manual_seed(12)
    net = mlp(3, 4, 2).double()
    g = SpatialGraph.from_chain(net, layouts={"hidden1": "grid:2x2"})
    cfg = WiringConfig(wf=1.3, l0=0.2, metric="l2", agg="mean")
    net.zero_grad()
    wiring_cost(g, cfg).backward()
    eps = 1e-6
    for p in net.parameters():
        fd = torch.zeros_like(p)
        flat, fd_flat = p.data.view(-1), fd.view(-1)
        for k in range(flat.numel()):
            old = flat[k].item()
            flat[k] = old + eps
            up = wiring_cost(g, cfg).item()
            flat[k] = old - eps
            down = wiring_cost(g, cfg).item()
            flat[k] = old
            fd_flat[k] = (up - down) / (2 * eps)
        assert torch.allclose(p.grad, fd, rtol=0, atol=1e-8)


# -- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [{"wf": -1.0}, {"l0": -0.1}, {"wf": float("nan")}, {"l0": float("nan")}, {"metric": "l3"}, {"agg": "max"}],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        WiringConfig(**kwargs)


def test_config_defaults():
    cfg = WiringConfig()
    assert (cfg.wf, cfg.l0, cfg.metric, cfg.agg, cfg.penalize_bias, cfg.exclude) == (1.0, 0.1, "l1", "sum", True, [])
    assert WiringConfig(exclude=["a.*"]).excluded("a.weight")
    assert not WiringConfig(exclude=["a.*"]).excluded("ab.weight")


# -- the closed-form penalty gradient the trainer uses --------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        WiringConfig(wf=1.0, l0=0.1),
        WiringConfig(wf=2.0, l0=0.5, agg="mean"),
        WiringConfig(wf=0.0, l0=1.0, penalize_bias=False),
        WiringConfig(wf=1.5, l0=0.2, metric="l2", exclude=["mlp.2.*", "2.weight"]),
    ],
)
@pytest.mark.parametrize("kind", ["mlp", "tokens"])
def test_closed_form_gradient_equals_autograd(cfg, kind):
    from topotorch.models import MLP, TokenMLP
    from topotorch.objectives.wiring import add_wiring_grad_

    torch.manual_seed(0)
    if kind == "mlp":
        model = MLP([6, 9, 7, 3]).double()
        model[0].weight.data[0, :3] = 0.0  # sign(0) = 0 in both
        graph = SpatialGraph.from_chain(model, layouts={"hidden1": "grid:3x3"})
    else:
        model = TokenMLP(5, 4, 2, [6, 5]).double()
        graph = SpatialGraph.from_chain(model)
    lam = 0.37
    model.zero_grad()
    (lam * wiring_cost(graph, cfg)).backward()
    expected = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for _ in range(2):  # the second call uses the cache and must add again
        add_wiring_grad_(graph, cfg, lam)
    for n, p in model.named_parameters():
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, 2 * expected[n], rtol=0, atol=1e-15, msg=n)


def test_closed_form_gradient_follows_relocation_and_dtype():
    from topotorch.models import MLP
    from topotorch.objectives.wiring import add_wiring_grad_
    from topotorch.relocation import apply_permutation

    torch.manual_seed(1)
    model = MLP([4, 8, 2])
    graph = SpatialGraph.from_chain(model)
    cfg = WiringConfig(wf=1.0, l0=0.1)
    add_wiring_grad_(graph, cfg, 1.0)  # fill the cache
    apply_permutation(graph, "input", torch.tensor([3, 1, 0, 2]))  # moves coordinates
    model.double()
    model.zero_grad(set_to_none=True)
    add_wiring_grad_(graph, cfg, 1.0)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    wiring_cost(graph, cfg).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=0, atol=1e-15, msg=n)


@pytest.mark.parametrize("name", ["concatenating", "depthwise", "tied-mlp", "gpt2"])
def test_streaming_penalty_equals_the_cached_one(name, monkeypatch):
    """Large graphs rebuild the cost factors chunk by chunk instead of caching weight-sized tensors: same values."""

    import topotorch.objectives.wiring as wiring
    from tests.byom_models import HF, build

    if name in HF:
        pytest.importorskip("transformers")
    from topotorch.graph.flow import flow_graph

    model, x = build(name)
    g = flow_graph(model, x, verify=False)
    cfg = WiringConfig(wf=1.7, l0=0.3, agg="mean")
    cached = float(wiring_cost(g, cfg))
    model.zero_grad(set_to_none=True)
    add_wiring_grad_(g, cfg, 0.5)
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    monkeypatch.setattr(wiring, "CACHE_ENTRIES", 0)
    monkeypatch.setattr(wiring, "_CHUNK", 37)  # many ragged chunks
    g.clear_cache()
    assert abs(float(wiring_cost(g, cfg)) - cached) <= 1e-12 * abs(cached)
    model.zero_grad(set_to_none=True)
    add_wiring_grad_(g, cfg, 0.5)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-15)
