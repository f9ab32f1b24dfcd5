"""The transformer's coupling graph: every relocation keeps the function; heads stay heads."""

import copy

import pytest
import torch
from torch import nn

from topotorch.graph.transformer import transformer_graph
from topotorch.models import TinyGPT
from topotorch.objectives.wiring import WiringConfig, add_wiring_grad_, wiring_cost
from topotorch.relocation import apply_permutation, relocate

CONFIGS = {
    "ln-manual-tied": dict(vocab=11, n_heads=4),
    "noln-torch-tied": dict(vocab=11, n_heads=4, layernorm=False, attention="torch"),
    "ln-torch-untied": dict(vocab=11, n_heads=2, attention="torch", tie_embeddings=False),
    "vectors-noln": dict(in_dim=2, out_dim=1, n_heads=1, layernorm=False),  # the paper's in-context regression shape
}


def make(name, seed=0):
    torch.manual_seed(seed)
    model = TinyGPT(d_model=16, n_layers=2, d_mlp=24, block_size=8, **CONFIGS[name]).double()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so their coupling is tested too
        for n, p in model.named_parameters():
            if ".ln" in n or n.startswith("ln_f"):
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(11, (5, 8)) if "vocab" in CONFIGS[name] else torch.randn(5, 8, 2, dtype=torch.float64)
    return model, x


def random_perm(space, gen):
    """A random permutation that respects the space's groups (heads)."""
    if space.groups is None:
        return torch.randperm(space.size, generator=gen)
    perm = torch.arange(space.size)
    for g in space.groups.unique():
        idx = (space.groups == g).nonzero().squeeze(1)
        perm[idx] = idx[torch.randperm(len(idx), generator=gen)]
    return perm


@pytest.mark.parametrize("name", CONFIGS)
def test_every_space_permutation_preserves_the_function(name):
    model, x = make(name)
    graph = transformer_graph(model)
    with torch.no_grad():
        y0 = model(x)
    gen = torch.Generator().manual_seed(1)
    moved = 0
    for sp in graph.movable_spaces():
        apply_permutation(graph, sp, random_perm(sp, gen))
        moved += 1
        with torch.no_grad():
            assert (model(x) - y0).abs().max() <= 1e-10, sp.name
    assert moved >= 6  # resid, 2x attn, 2x mlp, output


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("method", ["swap", "assign"])
def test_relocation_lowers_cost_and_keeps_function(name, method):
    model, x = make(name)
    graph = transformer_graph(model)
    cfg = WiringConfig(wf=2.0, l0=0.5, agg="mean")
    with torch.no_grad():
        y0 = model(x)
        c0 = float(wiring_cost(graph, cfg))
    stats = relocate(graph, cfg, method, top_k=8)
    with torch.no_grad():
        c1 = float(wiring_cost(graph, cfg))
        assert (model(x) - y0).abs().max() <= 1e-10
    assert c1 < c0
    assert c1 - c0 == pytest.approx(stats.total_delta, abs=1e-9)  # closed-form deltas are exact
    assert "resid" in stats.moved


def test_attention_neurons_stay_within_their_head():
    model, x = make("ln-manual-tied")
    graph = transformer_graph(model)
    sp = graph.space("blocks.0.attn")
    assert sp.groups.tolist() == [j // 4 for j in range(16)]
    cross = torch.arange(16)
    cross[[0, 4]] = cross[[4, 0]]  # swaps dimension 0 of head 0 with dimension 0 of head 1
    # the constraint matters: moving q/k/v dims across heads changes what the net computes
    broken = copy.deepcopy(model)
    g2 = transformer_graph(broken)
    g2.space("blocks.0.attn").groups = None
    apply_permutation(g2, "blocks.0.attn", cross)
    with torch.no_grad():
        assert (broken(x) - model(x)).abs().max() > 1e-6
    with pytest.raises(ValueError, match="splits groups"):
        apply_permutation(graph, "blocks.0.attn", cross)
    relocate(graph, WiringConfig(wf=5.0, l0=0.1), "assign")
    relocate(graph, WiringConfig(wf=5.0, l0=0.1), "swap", top_k=16)
    assert torch.equal(sp.groups, torch.arange(16) // 4)


def test_training_after_relocation_is_training_of_the_permuted_network():
    """k steps, relocate (Adam state permuted), k steps == 2k steps without relocating."""
    cfg = WiringConfig(wf=1.0, l0=0.5, agg="mean")
    l1 = WiringConfig(wf=0.0, l0=0.5, agg="mean")  # a penalty that does not depend on placement
    runs = []
    for do_relocate in (False, True):
        model, x = make("ln-torch-untied", seed=3)
        graph = transformer_graph(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        target = torch.randint(11, x.shape)
        for step in range(10):
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), target.flatten())
            opt.zero_grad()
            loss.backward()
            add_wiring_grad_(graph, l1, 1e-2)
            opt.step()
            if do_relocate and step == 4:
                assert sum(relocate(graph, cfg, "assign", optimizer=opt).moved.values()) > 0
        with torch.no_grad():
            runs.append(model(x))
    assert (runs[0] - runs[1]).abs().max() <= 1e-10


class Weird(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.scale


def test_unsupported_layers_are_named():
    model, _ = make("ln-manual-tied")
    model.blocks[1].ln2 = nn.BatchNorm1d(16)
    with pytest.raises(ValueError, match=r"blocks\.1\.ln2"):
        transformer_graph(model)
    model, _ = make("ln-manual-tied")
    model.blocks[0].mlp = nn.Sequential(nn.Linear(16, 24), Weird(24), nn.Linear(24, 16))
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp"):
        transformer_graph(model)
    model, _ = make("ln-manual-tied")
    model.extra = Weird(16)
    with pytest.raises(ValueError, match=r"extra.scale"):
        transformer_graph(model)
    with pytest.raises(ValueError, match="embed"):
        transformer_graph(nn.Sequential(nn.Linear(2, 2)))


def test_whole_heads_can_swap():
    model, x = make("ln-torch-untied")  # 2 heads of 8
    graph = transformer_graph(model)
    with torch.no_grad():
        y0 = model(x)
    swap = torch.cat([torch.arange(8, 16).flip(0), torch.arange(0, 8)])  # heads exchanged, one reversed inside
    apply_permutation(graph, "blocks.1.attn", swap)
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-10


def test_head_assignment_moves_heads_and_keeps_function():
    from topotorch.relocation import group_assignment_permutation, placement_cost

    model, x = make("ln-manual-tied")  # 4 heads of 4
    graph = transformer_graph(model)
    cfg = WiringConfig(wf=3.0, l0=0.1)
    sp = graph.space("blocks.0.attn")
    with torch.no_grad():  # make head 3 wire far to the left and head 0 far to the right: they should trade
        model.blocks[0].attn.qkv.weight.mul_(0.01)
        model.blocks[0].attn.proj.weight.mul_(0.01)
        for part in range(3):
            model.blocks[0].attn.qkv.weight[part * 16 + 12 : part * 16 + 16, :2] = 3.0
            model.blocks[0].attn.qkv.weight[part * 16 : part * 16 + 4, -2:] = 3.0
        y0 = model(x)
    m = placement_cost(graph, sp, cfg)
    perm, delta = group_assignment_permutation(m, sp.groups)
    assert delta < 0
    assert set(perm[:4].tolist()) == set(range(12, 16)) and set(perm[12:].tolist()) == set(range(4))
    c0 = float(wiring_cost(graph, cfg).detach())
    stats = relocate(graph, cfg, "assign", spaces=["blocks.0.attn"])
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-10
    assert float(wiring_cost(graph, cfg).detach()) - c0 == pytest.approx(stats.total_delta, abs=1e-9)
    assert stats.total_delta <= delta + 1e-12  # heads first, then within heads: at least as good
