"""Neuron group lasso through the coupling graph (topotorch.objectives.group) and its use in training."""

from __future__ import annotations

import json

import pytest
import torch

from topotorch import body as body_module
from topotorch import training
from topotorch.compression.shrink import shrink
from topotorch.graph import SpatialGraph
from topotorch.graph.conv import conv_graph
from topotorch.graph.transformer import transformer_graph
from topotorch.models import MLP, SmallResNet, TinyGPT
from topotorch.objectives import group_spaces, neuron_group_norm
from topotorch.training import TrainConfig, train

QUIET = dict(animation=False, progress=False)


def naive_group_norm(graph: SpatialGraph, spaces: list[str]) -> torch.Tensor:
    """Reference: for each neuron, gather every outgoing weight entry it owns with explicit loops."""
    total = torch.zeros((), dtype=torch.float64)
    for name in spaces:
        sp = graph.space(name)
        for n in range(sp.size):
            sq = torch.zeros((), dtype=torch.float64)
            for c in graph.connections:
                if c.source != name:
                    continue
                w = graph.tensor(c.weight).detach().double()
                for i in c.source_slice.index[n].tolist():
                    sq = sq + (w.select(c.source_slice.dim, i) ** 2).sum()
            total = total + sq.sqrt()
    return total


def _mlp():
    torch.manual_seed(0)
    net = MLP([7, 9, 11, 3]).double()
    return net, SpatialGraph.from_chain(net)


def _resnet():
    torch.manual_seed(0)
    net = SmallResNet(channels=6, hidden=5, n_blocks=2, image_size=8).double()
    return net, conv_graph(net)


def _gpt(layernorm: bool):
    torch.manual_seed(0)
    gpt = TinyGPT(vocab=13, d_model=8, n_layers=2, n_heads=2, d_mlp=12, block_size=6, layernorm=layernorm).double()
    return gpt, transformer_graph(gpt)


@pytest.mark.parametrize(
    "make, expected",
    [
        (_mlp, ["hidden1", "hidden2"]),
        (_resnet, None),
        (lambda: _gpt(True), ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]),
        (lambda: _gpt(False), ["resid", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]),
    ],
)
def test_matches_naive_reference(make, expected):
    _net, g = make()
    spaces = group_spaces(g)
    if expected is not None:
        assert spaces == expected
    else:  # conv: the residual stream (no LayerNorm) and every block's hidden channels
        assert "resid" in spaces and any("hidden" in s for s in spaces)
    with torch.no_grad():  # some exactly-dead neurons too
        w = g.tensor(g.outgoing(spaces[0])[0].weight)
        w.index_fill_(g.outgoing(spaces[0])[0].source_slice.dim, torch.tensor([0]), 0.0)
    got = neuron_group_norm(g)
    ref = naive_group_norm(g, spaces)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12), (got, ref)
    # an explicit subset of spaces
    assert torch.allclose(neuron_group_norm(g, spaces[-1:]), naive_group_norm(g, spaces[-1:]), rtol=1e-12)


def test_conv_group_includes_kernels():
    _net, g = _resnet()
    sp = "blocks.0.hidden"
    conn = g.outgoing(sp)[0]
    w = g.tensor(conn.weight)
    assert w.ndim == 4
    expected = w.detach().pow(2).sum(dim=(0, 2, 3)).sqrt().sum()
    assert torch.allclose(neuron_group_norm(g, [sp]), expected, rtol=1e-12)


def test_gradient_is_finite_at_zero_groups_and_matches_autograd_elsewhere():
    net, g = _mlp()
    with torch.no_grad():
        net[2].weight[:, :4] = 0.0  # hidden1 neurons 0-3 write nothing
    loss = neuron_group_norm(g, ["hidden1"])
    loss.backward()
    grad = net[2].weight.grad
    assert torch.isfinite(grad).all()
    assert (grad[:, :4] == 0).all()
    w = net[2].weight.detach()[:, 4:]
    assert torch.allclose(grad[:, 4:], w / w.norm(dim=0, keepdim=True), rtol=1e-12)
    # all groups zero: value 0, gradient 0, no NaN
    with torch.no_grad():
        net[2].weight.zero_()
    net.zero_grad()
    v = neuron_group_norm(g, ["hidden1"])
    v.backward()
    assert v.item() == 0.0 and torch.equal(net[2].weight.grad, torch.zeros_like(net[2].weight))


def test_unknown_space_and_inputs_are_named():
    _, g = _mlp()
    with pytest.raises(KeyError, match="nope"):
        neuron_group_norm(g, ["nope"])
    with pytest.raises(ValueError, match="no chosen space"):
        neuron_group_norm(g, ["output"])


# -- training --------------------------------------------------------------------------------------


def _digits(**kw) -> TrainConfig:
    values = dict(steps=300, lam="0:0.01", swap_every=100, batch_size=128, dtype="float32", seed=0, **QUIET)
    values.update(kw)
    return TrainConfig.for_task("digits", **values)


def test_group_lam_kills_whole_neurons_that_shrink_removes():
    torch.set_num_threads(1)
    removed = {}
    acc = {}
    for gl in (0.0, 0.01):
        r = train(_digits(group_lam=gl))
        res = shrink(r.model, r.graph, r.config.threshold)
        removed[gl] = sum(res.removed.values())
        acc[gl] = training.evaluate(r.task, res.model, r.data.x_test, r.data.y_test)
        if gl:
            assert r.summary["group_norm"] > 0
    assert removed[0.01] >= removed[0.0] + 30, removed
    assert acc[0.01] > 0.75, acc  # still a working classifier


def test_group_lam_zero_is_the_old_trainer(monkeypatch):
    """group_lam = 0 never touches the group term: the run is bit-identical to one where it cannot run."""
    base = train(_digits(steps=120, dtype="float64"))
    monkeypatch.setattr(body_module, "neuron_group_norm", lambda *a, **k: pytest.fail("group term evaluated"))
    again = train(_digits(steps=120, dtype="float64", group_lam=0.0))
    for (k, a), (_, b) in zip(base.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert "group_norm" not in again.summary


def test_group_lam_changes_training():
    a = train(_digits(steps=60, dtype="float64"))
    b = train(_digits(steps=60, dtype="float64", group_lam=0.01))
    assert not torch.equal(a.model[2].weight, b.model[2].weight)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "x", True])
def test_group_lam_validation(bad):
    with pytest.raises(ValueError, match="group_lam"):
        TrainConfig.for_task("digits", group_lam=bad)


def test_old_config_without_group_lam_loads(tmp_path):
    d = TrainConfig.for_task("digits", steps=5).to_dict()
    del d["group_lam"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert TrainConfig.from_json(tmp_path / "config.json").group_lam == 0.0


def test_cli_group_lam(tmp_path):
    from typer.testing import CliRunner

    from topotorch.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        [
            "train",
            "digits",
            "--steps",
            "20",
            "--group-lam",
            "0.01",
            "--out",
            str(out),
            "--no-animation",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["group_lam"] == 0.01
    assert "group_norm" in json.loads((out / "summary.json").read_text())
    bad = CliRunner().invoke(
        app,
        [
            "train",
            "digits",
            "--steps",
            "5",
            "--group-lam",
            "-1",
            "--out",
            str(tmp_path / "b"),
            "--no-animation",
            "--no-progress",
        ],
    )
    assert bad.exit_code != 0 and "group_lam" in bad.output
