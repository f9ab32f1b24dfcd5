"""The data-flow coupling graph on models people bring: every permutation it allows keeps the function.

Models: Hugging Face GPT-2 (Conv1D, fused c_attn), BERT, Llama (grouped-query attention, rotary
embeddings, RMSNorm, gated MLP) and ResNet; ``nn.TransformerEncoder``; a residual MLP with
tied embeddings and a layer scale; a depthwise-separable / grouped conv net with GroupNorm; a
net that concatenates two conv branches. All float64, random weights, no downloads.
"""

import copy

import pytest
import torch
from torch import nn

from tests.byom_models import HF, TORCH, build, cached_graph
from topotorch.graph.core import SpatialGraph
from topotorch.graph.flow import flow_graph, output_tensors, run_model
from topotorch.graph.verify import check_graph, random_permutation
from topotorch.objectives.wiring import WiringConfig, add_wiring_grad_, wiring_cost
from topotorch.relocation import apply_permutation, relocate

NAMES = list(HF) + list(TORCH)
# HF's LlamaRMSNorm casts to float32 inside even a float64 model, so its outputs agree to float32 rounding
TOL = {"llama": 1e-6}


def graph_of(name: str):
    if name in HF:
        pytest.importorskip("transformers")
    return cached_graph(name)


def outputs(model, x):
    with torch.no_grad():
        return output_tensors(run_model(model, x))


def max_rel_error(a, b):
    return max(float((p - q).abs().max() / q.abs().max()) for p, q in zip(a, b) if q.is_floating_point())


@pytest.mark.parametrize("name", NAMES)
def test_a_random_permutation_of_every_movable_space_keeps_the_function(name):
    model, x, g = graph_of(name)
    movable = [s for s in g.spaces if s.relocate == "weights" and s.size > 1]
    assert movable, f"{name}: nothing movable"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # jitter so that ones/zeros initialisations cannot hide a forgotten parameter
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    base = outputs(model, x)
    for s in movable:
        apply_permutation(g, s, random_permutation(s, gen))
        assert max_rel_error(outputs(model, x), base) <= TOL.get(name, 1e-10), s.name


def _train_step(model, x, opt):
    opt.zero_grad()
    out = output_tensors(run_model(model, x))
    loss = sum(o.pow(2).mean() for o in out if o.is_floating_point())
    loss.backward()
    opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_train_relocate_train_equals_the_unrelocated_control(name):
    """Swap and assign relocation (with Adam's moments) mid-training: the run continues as if nothing moved."""
    model, x, g = graph_of(name)
    control = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt_c = torch.optim.Adam(control.parameters(), lr=1e-3)
    for _ in range(2):
        _train_step(model, x, opt)
        _train_step(control, x, opt_c)
    cfg = WiringConfig(wf=1.0, l0=0.1)
    before = float(wiring_cost(g, cfg).detach())
    moved = relocate(g, cfg, "swap", top_k=3, optimizer=opt).moved
    moved2 = relocate(g, cfg, "assign", optimizer=opt).moved
    assert sum(moved.values()) + sum(moved2.values()) > 0, f"{name}: relocation moved nothing"
    assert float(wiring_cost(g, cfg).detach()) <= before + 1e-9
    tol = TOL.get(name, 1e-10)
    assert max_rel_error(outputs(model, x), outputs(control, x)) <= tol
    for _ in range(3):
        _train_step(model, x, opt)
        _train_step(control, x, opt_c)
    assert max_rel_error(outputs(model, x), outputs(control, x)) <= max(tol, 1e-8)


@pytest.mark.parametrize("name", ["gpt2", "llama", "tied-mlp", "concatenating"])
def test_closed_form_wiring_gradient_matches_autograd(name):
    model, _x, g = graph_of(name)
    cfg = WiringConfig(wf=1.3, l0=0.2)
    model.zero_grad()
    (0.7 * wiring_cost(g, cfg)).backward()
    auto = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    add_wiring_grad_(g, cfg, 0.7)
    closed = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert auto and closed.keys() <= auto.keys()
    for n, v in auto.items():
        torch.testing.assert_close(closed.get(n, torch.zeros_like(v)), v, rtol=1e-12, atol=1e-12)


def test_structure_found_on_the_models():
    pytest.importorskip("transformers")
    _, _, g = graph_of("gpt2")
    attn = g.space("transformer.h.0.attn.c_attn")
    assert attn.groups is not None and len(attn.groups.unique()) == 4 and attn.size == 32  # heads x head dims
    assert {(s.name, s.dim) for s in attn.slices} >= {
        ("transformer.h.0.attn.c_attn.weight", 1),
        ("transformer.h.0.attn.c_proj.weight", 0),
    }
    assert next(s for s in attn.slices if s.name == "transformer.h.0.attn.c_attn.weight").index.shape == (
        32,
        3,
    )  # q, k, v
    assert g.space("transformer.wte").stream
    _, _, g = graph_of("bert")
    heads = g.space("bert.encoder.layer.0.attention.self")
    assert heads.groups is not None and len(heads.groups.unique()) == 4
    _, _, g = graph_of("llama")
    kv = g.space("model.layers.0.self_attn")  # rotary dims cannot move: whole key/value groups do
    assert kv.size == 2 and kv.groups is None
    q = next(s for s in kv.slices if s.name == "model.layers.0.self_attn.q_proj.weight")
    assert q.index.shape == (2, 16)  # each kv head owns its 2 query heads x 8 dims
    gated = g.space("model.layers.0.mlp")
    assert {s.name for s in gated.slices} >= {
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    }


def test_structure_found_on_torch_models():
    _, _, g = graph_of("transformer-encoder")
    assert g.space("body.layers.0.self_attn").groups is not None
    _, _, g = graph_of("tied-mlp")
    embed = g.space("embed")
    assert {(s.name, s.dim) for s in embed.slices} >= {("embed.weight", 1), ("scale", 1), ("ln_f.weight", 0)}
    assert g.space("output").relocate == "positions"  # the tied vocabulary keeps its rows
    _, _, g = graph_of("depthwise")
    assert ("dw.weight", 0) in {(s.name, s.dim) for s in g.space("stem").slices}  # depthwise: channel in = out
    _, _, g = graph_of("concatenating")
    assert {c.source for c in g.connections if c.weight == "join.weight"} == {"a", "b"}


class HiddenHeads(nn.Module):
    """Attention whose heads are cut out by ``unfold``, an op the coupling rules do not know."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        q, k, v = (z.unfold(-1, 4, 4).transpose(1, 2) for z in self.qkv(h).split(8, -1))
        y = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 8)
        return self.out(h + self.proj(y))


def test_a_hidden_head_reshape_is_refused_not_mispermuted():
    torch.manual_seed(0)
    model, x = HiddenHeads().double(), torch.randn(2, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cannot place the neurons written by 'qkv'.*aten\.unfold"):
        flow_graph(model, x)
    g = flow_graph(model, x, unknown_ops="fix")  # or keep them in place, and move the rest
    assert g.space("qkv").relocate == "fixed" and "unfold" in g.space("qkv").reason
    base = model(x)
    relocate(g, WiringConfig(), "assign")
    torch.testing.assert_close(model(x), base, rtol=0, atol=1e-12)


def test_the_safety_net_refuses_a_graph_that_mixes_heads():
    """The old traced builder's BERT graph: attention columns as one space without head structure."""
    model, x, g = graph_of("bert")
    heads = g.space("bert.encoder.layer.0.attention.self")
    headless = copy.copy(heads)
    headless.groups = None
    spaces = [headless if s is heads else s for s in g.spaces]
    with pytest.raises(ValueError, match=r"refusing.*'bert\.encoder\.layer\.0\.attention\.self'"):
        check_graph(SpatialGraph(model, spaces, g.connections), x)


def test_the_safety_net_catches_a_forgotten_parameter():
    """A LayerNorm weight left out of the stream (its ones initialisation cannot hide it: weights are jittered)."""
    model, x, g = graph_of("tied-mlp")
    embed = g.space("embed")
    partial = copy.copy(embed)
    partial.slices = [s for s in embed.slices if s.name != "ln_f.weight"]
    with pytest.raises(ValueError, match=r"refusing.*'embed'"):
        check_graph(SpatialGraph(model, [partial if s is embed else s for s in g.spaces], g.connections), x)


def test_keyword_inputs_and_skipping_the_check():
    pytest.importorskip("transformers")
    model, ids = build("bert")
    g = flow_graph(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, verify=False)
    assert check_graph(g, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) == {}


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.rnn = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(torch.tanh(self.inp(x)))[0])


def test_recurrent_units_move_with_their_four_gates():
    """nn.LSTM runs as matmuls and gate chunks under the tracer: a unit owns its 4 gate rows and its recurrent
    column."""
    torch.manual_seed(0)
    model, x = Recurrent().double(), torch.randn(2, 4, 3, dtype=torch.float64)
    g = flow_graph(model, x)
    units = g.space("rnn")
    owned = {(s.name, s.dim): tuple(s.index.shape) for s in units.slices}
    assert owned[("rnn.weight_ih_l0", 0)] == (5, 4) and owned[("rnn.weight_hh_l0", 0)] == (5, 4)
    assert ("rnn.weight_hh_l0", 1) in owned and ("head.weight", 1) in owned
    base = model(x)
    relocate(g, WiringConfig(), "assign")
    torch.testing.assert_close(model(x), base, rtol=0, atol=1e-12)


def test_group_lasso_on_a_hugging_face_graph_skips_normalised_streams():
    pytest.importorskip("transformers")
    from topotorch.objectives.group import group_spaces, neuron_group_norm

    model, _x, g = graph_of("llama")
    names = group_spaces(g)
    assert "model.layers.0.mlp" in names and "model.embed_tokens" not in names  # RMSNorm'd stream left out
    neuron_group_norm(g).backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
