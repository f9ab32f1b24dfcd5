"""`shrink` on the flow graphs of models people bring: dead MLP neurons, channels and heads cut out,
the function kept (float64, <= 1e-10 against the thresholded original), saved and reloaded without pickle.

Models (tests/byom_models.py): Hugging Face GPT-2, BERT, Llama (grouped-query attention), ResNet;
``nn.TransformerEncoder``; a tied-embedding residual MLP; a depthwise/grouped conv net; a net that
concatenates two conv branches.
"""

import pytest
import torch
from torch import nn

from tests.byom_models import HF, TORCH, cached_graph
from topotorch.compression.shrink import load_shrunk, save_shrunk, shrink, threshold_model
from topotorch.graph.core import SpatialGraph
from topotorch.graph.flow import output_tensors, run_model

NAMES = list(HF) + list(TORCH)
# heads nn.MultiheadAttention cannot lose (its inner width is its input width): kept, and said why
UNRESIZABLE = {"transformer-encoder": "nn.MultiheadAttention"}
# HF's LlamaRMSNorm computes in float32 even in a float64 model: a last-bit change of its input can move
# its output by a float32 rounding step
TOL = {"llama": 1e-6}


def graph_of(name: str):
    if name in HF:
        pytest.importorskip("transformers")
    return cached_graph(name)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# spaces averaged by a GroupNorm whose groups are their neurons: whole groups may go
GROUPNORM_GROUPS = {"pw"}


def killable(g: SpatialGraph):
    """Hidden spaces a shrink may cut: movable, not a residual stream, not averaged by a norm across neurons."""
    return [
        s
        for s in g.spaces
        if s.role == "hidden"
        and s.relocate == "weights"
        and s.size > 1
        and not s.stream
        and (not s.normalised or s.name in GROUPNORM_GROUPS)
    ]


@torch.no_grad()
def kill(g: SpatialGraph, seed: int = 0, p_out: float = 0.35, p_in: float = 0.25) -> dict[str, int]:
    """Zero the outgoing weights of a random subset of each killable space's units (heads for a grouped
    space, neurons otherwise) and the incoming weights of another subset (biases stay, so those output a
    constant). At least one unit is out-dead and one stays alive. Returns units killed per space."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for sp in killable(g):
        units = sp.groups if sp.groups is not None else torch.arange(sp.size)
        ids = units.unique()
        order = ids[torch.randperm(len(ids), generator=gen)]
        n_out = max(1, round(p_out * len(ids)))
        n_in = min(round(p_in * len(ids)), len(ids) - 1 - n_out)
        dead_out = torch.isin(units, order[:n_out])
        dead_in = torch.isin(units, order[n_out : n_out + max(n_in, 0)])
        for conns, side, mask in ((g.outgoing(sp.name), "source", dead_out), (g.incoming(sp.name), "target", dead_in)):
            for c in conns:
                sl = c.source_slice if side == "source" else c.target_slice
                w = g.tensor(c.weight)
                w.index_fill_(sl.dim, sl.index[mask].reshape(-1).to(w.device), 0.0)
        out[sp.name] = n_out + max(n_in, 0)
    return out


def outputs(model, x):
    with torch.no_grad():
        return [t for t in output_tensors(run_model(model, x)) if t.is_floating_point()]


def max_error(a, b) -> float:
    assert len(a) == len(b)
    return max(float((p - q).abs().max()) for p, q in zip(a, b))


@pytest.mark.parametrize("name", NAMES)
def test_shrink_removes_dead_units_exactly_and_reloads(name, tmp_path):
    model, x, g = graph_of(name)
    killed = kill(g, seed=3)
    assert killed, f"{name}: nothing to kill"
    before = n_params(model)
    res = shrink(model, g, 0.0)
    ref = threshold_model(model, g, 0.0).eval()
    base = outputs(ref, x)
    err = max_error(outputs(res.model, x), base)
    assert err <= TOL.get(name, 1e-10), (name, err)
    assert n_params(res.model) < before
    for sp in killable(g):
        blocked = UNRESIZABLE.get(name)
        if blocked and sp.groups is not None:
            assert res.removed[sp.name] == 0
            assert any(blocked in why for why in res.kept_why.get(sp.name, {})), res.kept_why
        else:
            assert res.removed[sp.name] > 0, (name, sp.name, res.kept_why.get(sp.name))
    save_shrunk(tmp_path / "s", res)
    back = load_shrunk(tmp_path / "s", allow=("tests.byom_models.",))  # the user's own classes, by name
    assert n_params(back) == n_params(res.model)
    assert max_error(outputs(back, x), outputs(res.model, x)) <= 1e-12
    assert model is g.model and n_params(model) == before  # the original is untouched


def test_hf_attributes_follow_the_removed_heads():
    pytest.importorskip("transformers")
    model, x, g = graph_of("gpt2")
    sp = g.space("transformer.h.0.attn.c_attn")
    heads = sp.groups
    with torch.no_grad():  # head 1 and 3 of layer 0: no output
        w = g.tensor("transformer.h.0.attn.c_proj.weight")
        for h in (1, 3):
            w[sp.slices[-1].index[heads == h].view(-1)] = 0.0
    res = shrink(model, g, 0.0)
    attn = res.model.transformer.h[0].attn
    assert attn.num_heads == 2 and attn.split_size == 16 and attn.c_attn.nf == 48
    assert res.removed["transformer.h.0.attn.c_attn"] == 16
    assert max_error(outputs(res.model, x), outputs(model, x)) <= 1e-10


def test_partly_dead_heads_stay_whole_and_say_why():
    pytest.importorskip("transformers")
    model, _x, g = graph_of("bert")
    name = "bert.encoder.layer.0.attention.self"
    sp = g.space(name)
    with torch.no_grad():  # 3 of head 0's 8 dims have no output: the head keeps its width
        o = next(c for c in g.outgoing(name))
        g.tensor(o.weight)[:, o.source_slice.index[:3].view(-1)] = 0.0
    res = shrink(model, g, 0.0)
    assert res.removed[name] == 0
    assert any("not wholly dead" in k for k in res.kept_why[name])
    assert sp.size == 32


def test_llama_drops_a_key_value_head_with_its_query_heads():
    pytest.importorskip("transformers")
    model, x, g = graph_of("llama")
    name = "model.layers.1.self_attn"
    o = g.outgoing(name)[0]
    with torch.no_grad():
        g.tensor(o.weight)[:, o.source_slice.index[0]] = 0.0
    res = shrink(model, g, 0.0)
    attn = res.model.model.layers[1].self_attn
    assert res.removed[name] == 1
    assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8 and attn.o_proj.in_features == 16
    assert max_error(outputs(res.model, x), outputs(model, x)) <= TOL["llama"]


def test_grouped_conv_loses_whole_groups():
    model, x, g = graph_of("depthwise")
    o = g.outgoing("pw")[0]  # the head reads group 1's channels: zero them, the whole group goes
    with torch.no_grad():
        g.tensor(o.weight)[:, o.source_slice.index[1]] = 0.0
    res = shrink(model, g, 0.0)
    m = res.model
    assert res.removed["pw"] == 1
    assert m.grouped.groups == 2 and m.grouped.out_channels == 8 and m.gn.num_groups == 2 and m.pw.out_channels == 8
    assert max_error(outputs(m, x), outputs(model, x)) <= 1e-10


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.rnn = nn.GRU(6, 5, batch_first=True)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(self.rnn(torch.relu(self.inp(x)))[0])


def test_a_module_without_a_resize_rule_keeps_its_neurons_and_says_why(tmp_path):
    """A hand-made graph whose cut would resize a GRU: the neurons stay, the reason names the layer."""
    from topotorch.graph.core import Connection, Slice, Space

    torch.manual_seed(0)
    net = _Recurrent().double()
    ar = lambda n: torch.arange(n).view(n, 1)  # noqa: E731
    hid = Space(
        "hidden",
        6,
        torch.zeros(6, 1, dtype=torch.float64),
        1.0,
        "hidden",
        "weights",
        [Slice("inp.weight", 0, ar(6)), Slice("inp.bias", 0, ar(6)), Slice("rnn.weight_ih_l0", 1, ar(6))],
    )
    inp = Space(
        "input", 4, torch.zeros(4, 1, dtype=torch.float64), 0.0, "input", "positions", [Slice("inp.weight", 1, ar(4))]
    )
    gates = Space("gates", 15, None, 2.0, "hidden", "fixed", [Slice("rnn.weight_ih_l0", 0, ar(15))])
    g = SpatialGraph(
        net,
        [inp, hid, gates],
        [
            Connection(
                "inp.weight",
                "hidden",
                "input",
                Slice("inp.weight", 0, ar(6)),
                Slice("inp.weight", 1, ar(4)),
                "inp.bias",
            ),
            Connection(
                "rnn.weight_ih_l0",
                "gates",
                "hidden",
                Slice("rnn.weight_ih_l0", 0, ar(15)),
                Slice("rnn.weight_ih_l0", 1, ar(6)),
            ),
        ],
    )
    with torch.no_grad():
        net.rnn.weight_ih_l0[:, 2] = 0.0
    res = shrink(net, g, 0.0)
    assert res.removed["hidden"] == 0
    assert any("rnn" in k and "recurrent" in k for k in res.kept_why["hidden"]), res.kept_why
    save_shrunk(tmp_path / "gru", res)  # a recurrent layer's weight list is rebuilt on load
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(load_shrunk(tmp_path / "gru", allow=(__name__ + ":_Recurrent",))(x), res.model(x))
