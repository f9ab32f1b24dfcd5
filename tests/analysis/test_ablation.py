"""Knock-outs (topotorch.analysis.ablation): what changes is exactly what the knocked-out part feeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.analysis.test_modularity import two_block_mlp
from topotorch.analysis.ablation import (
    ablation_table,
    embedding_module_ablation,
    knocked_out,
    module_groups,
    per_output_metric,
)
from topotorch.analysis.modularity import detect_communities
from topotorch.tasks import get_task
from topotorch.training import TrainConfig, train


def test_knocking_out_a_module_changes_exactly_the_outputs_it_feeds():
    g = two_block_mlp(False)
    x = torch.rand(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = g.model(x).detach()
    comms = detect_communities(g, resolution=0.5)
    groups = module_groups(g, comms)
    assert len(groups) == 2
    for name, neurons in groups.items():
        with knocked_out(g, neurons):
            after = g.model(x).detach()
        changed = (after - before).abs().amax(0) > 1e-6
        fed = [o for o in ("y1", "y2") if o in name]
        assert changed.tolist() == [o in fed for o in ("y1", "y2")], name
    assert torch.equal(g.model(x).detach(), before)  # restored


def test_knock_out_a_single_neuron_output_and_errors():
    g = two_block_mlp(False)
    x = torch.rand(8, 4, dtype=torch.float64)
    with knocked_out(g, {"output": [1]}):
        out = g.model(x).detach()
    assert torch.all(out[:, 1] == 0) and torch.equal(out[:, 0], g.model(x).detach()[:, 0])
    with knocked_out(g, {"hidden2": [12]}):  # one neuron of the y2 block: only y2 moves
        d = (g.model(x) - out).detach()
    assert torch.equal(d[:, 0], torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="20 neurons"):
        with knocked_out(g, {"hidden1": [20]}):
            pass
    with pytest.raises(KeyError):
        with knocked_out(g, {"nope": [0]}):
            pass


def test_per_output_metric_mse_and_per_class_accuracy():
    task = get_task("independence")
    model = nn.Identity()
    y = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    m = per_output_metric(task, model, torch.zeros(2, 2), y)
    assert m["per_output"] == [0.0, 5.0] and m["overall"] == 2.5
    ctask = get_task("two-moons")
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    m = per_output_metric(ctask, model, logits, torch.tensor([0, 1, 1, 1]))
    assert m["per_output"] == [1.0, pytest.approx(1 / 3)] and m["overall"] == 0.5


def test_embedding_module_ablation_on_a_short_modular_addition_run(tmp_path):
    cfg = TrainConfig.for_task("modular-addition", steps=60, progress=False, animation=False, swap_every=30)
    r = train(cfg)
    # hand-made modules: embedding neurons 0-3 and 4-7 alone feed the net; the rest are dead
    with torch.no_grad():
        r.model.embedding.weight[:, 8:] = 0.0
    out = embedding_module_ablation(r, threshold=0.0)
    names = [row["name"] for row in out["rows"]]
    assert names[0] == "full network" and all(0 <= row["test"] <= 1 for row in out["rows"])
    assert sum(len(m) for m in out["modules"]) == 8
    only_all = out["rows"][-1]
    assert only_all["test"] == pytest.approx(out["rows"][0]["test"])  # dead neurons out: nothing changes
    rows = ablation_table(r, {"all embed": {"embed": np.arange(32)}})
    assert rows[1]["neurons"] == 32 and len(rows[1]["per_output"]) == 59


# ---- heads, sheet regions, FFF leaves (forward hooks) -----------------------------------------

from topotorch.analysis.ablation import (  # noqa: E402
    attention_layers,
    head_ablation_table,
    heads_knocked_out,
    leaf_ablation_table,
    leaves_knocked_out,
    region_knocked_out,
)
from topotorch.layers.fff import FFF  # noqa: E402
from topotorch.models import TinyGPT  # noqa: E402


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _tiny_gpt(attention: str = "manual") -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab=11, d_model=16, n_layers=2, n_heads=4, block_size=6, attention=attention).eval()


@pytest.mark.parametrize("attention", ["manual", "torch"])
def test_head_knock_out_equals_zeroing_that_heads_values_and_is_undone(attention):
    gpt = _tiny_gpt(attention)
    x = torch.randint(0, 11, (7, 6), generator=torch.Generator().manual_seed(1))
    name = "blocks.1.attn" if attention == "manual" else "blocks.1.attn.mha"
    assert attention_layers(gpt) == {name.replace("1", "0"): 4, name: 4}
    before, state = gpt(x).detach(), _state(gpt)
    with heads_knocked_out(gpt, {"blocks.1.attn": [2]}):  # a TorchAttention wrapper may be named too
        knocked = gpt(x).detach()
    assert _hooks(gpt) == 0 and torch.equal(gpt(x).detach(), before)
    assert all(torch.equal(v, state[k]) for k, v in gpt.state_dict().items())
    # reference: head 2's value rows (and bias) zeroed -> its attention output is 0
    attn = gpt.blocks[1].attn
    w, b = (
        (attn.qkv.weight, attn.qkv.bias) if attention == "manual" else (attn.mha.in_proj_weight, attn.mha.in_proj_bias)
    )
    rows = slice(2 * 16 + 2 * 4, 2 * 16 + 3 * 4)
    with torch.no_grad():
        w[rows], b[rows] = 0.0, 0.0
    ref = gpt(x).detach()
    assert (knocked - before).abs().max() > 1e-3
    torch.testing.assert_close(knocked, ref, rtol=1e-5, atol=1e-6)
    # the earlier layer's heads and the intact model are unaffected by knocking out nothing
    with heads_knocked_out(gpt, {"blocks.0.attn": []}):
        assert torch.equal(gpt(x).detach(), ref)


def test_region_knock_out_equals_zeroing_the_units_weights_and_bias():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 24), nn.Tanh(), nn.Linear(24, 3))  # 24 units: a 4x6 sheet
    x = torch.randn(9, 5)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1:3, 2:5] = True
    units = mask.reshape(-1).nonzero().reshape(-1)
    before = net(x).detach()
    with region_knocked_out(net, "0", mask):
        by_mask = net(x).detach()
    with region_knocked_out(net, "0", units.tolist()):
        by_index = net(x).detach()
    assert _hooks(net) == 0 and torch.equal(net(x).detach(), before)
    with torch.no_grad():
        net[0].weight[units] = 0.0
        net[0].bias[units] = 0.0
    ref = net(x).detach()
    assert torch.equal(by_mask, ref) and torch.equal(by_index, ref) and not torch.equal(ref, before)
    conv = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1))
    img = torch.randn(2, 1, 5, 5)
    with region_knocked_out(conv, "0", [1, 4]):
        out = conv(img)
    assert (out[:, [1, 4]] == 0).all() and torch.equal(out[:, [0, 2, 3, 5]], conv(img)[:, [0, 2, 3, 5]])


def test_leaf_knock_out_zeroes_exactly_the_samples_routed_there():
    torch.manual_seed(0)
    layer = FFF(3, leaf_width=4, output_width=2, depth=3)
    net = nn.Sequential(nn.Linear(4, 3), layer).eval()
    x = torch.randn(300, 4)
    with torch.no_grad():
        before = net(x)
        leaf = layer.mixture(net[0](x), hard_decisions=True).argmax(1)  # routing, computed independently
    k = int(torch.bincount(leaf).argmax())
    with torch.no_grad(), leaves_knocked_out(net, {"1": [k]}):
        after = net(x)
    hit = leaf == k
    assert 0 < int(hit.sum()) < 300
    assert torch.all(after[hit] == 0) and torch.equal(after[~hit], before[~hit])
    with torch.no_grad():  # the same (kernel) hard path as `before`
        assert _hooks(net) == 0 and torch.equal(net(x), before)
    rows = leaf_ablation_table(net, "1", x, (before[:, 1] > before[:, 0]).long(), "accuracy")
    assert rows[0]["overall"] == 1.0 and sum(r["samples"] for r in rows[1:]) == 300
    assert {r["leaf"] for r in rows[1:]} == set(leaf.unique().tolist()) and not net.training


def test_head_ablation_table_sweeps_every_head():
    gpt = _tiny_gpt()
    x = torch.randint(0, 11, (40, 6), generator=torch.Generator().manual_seed(2))
    y = gpt(x).argmax(-1).detach()
    gpt.train()
    rows = head_ablation_table(gpt, x, y, "accuracy")
    assert gpt.training and _hooks(gpt) == 0
    assert [r["name"] for r in rows[:2]] == ["none", "blocks.0.attn head 0"] and len(rows) == 1 + 2 * 4
    assert rows[0]["overall"] == 1.0 and len(rows[0]["per_output"]) == 11
    assert all(r["overall"] <= 1.0 for r in rows) and min(r["overall"] for r in rows[1:]) < 1.0


def test_bad_ablation_arguments_give_clear_errors():
    gpt = _tiny_gpt()
    with pytest.raises(ValueError, match=r"no layer 'blocks.7.attn'.*blocks.0.attn"):
        with heads_knocked_out(gpt, {"blocks.7.attn": [0]}):
            pass
    with pytest.raises(ValueError, match=r"heads of 'blocks.0.attn' \[4\] out of range: there are 4"):
        with heads_knocked_out(gpt, {"blocks.0.attn": [4]}):
            pass
    with pytest.raises(ValueError, match="not an attention layer"):
        with heads_knocked_out(gpt, {"blocks.0.mlp": [0]}):
            pass
    with pytest.raises(ValueError, match=r"mask must be \(8, 8\)"):
        with region_knocked_out(gpt, "blocks.0.mlp.0", torch.ones(4, 16, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError, match="out of range: there are 64"):
        with region_knocked_out(gpt, "blocks.0.mlp.0", [64]):
            pass
    with pytest.raises(TypeError, match=r"needs nn.Linear"):
        with region_knocked_out(gpt, "blocks.0.ln1", [0]):
            pass
    net = nn.Sequential(nn.Linear(4, 3), FFF(3, 4, 2, depth=2))
    with pytest.raises(ValueError, match="out of range: there are 4"):
        with leaves_knocked_out(net.eval(), {"1": [4]}):
            pass
    with pytest.raises(ValueError, match=r"model.eval"):
        with leaves_knocked_out(net.train(), {"1": [0]}):
            pass
    with pytest.raises(TypeError, match="not an FFF"):
        with leaves_knocked_out(net, {"0": [0]}):
            pass
    with pytest.raises(ValueError, match="no attention layer"):
        head_ablation_table(net, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), "accuracy")
    assert _hooks(gpt) == 0 and _hooks(net) == 0
