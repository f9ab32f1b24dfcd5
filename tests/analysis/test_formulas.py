"""Symbolic formulas (topotorch.analysis.formulas): the expression equals the thresholded network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.analysis.test_modularity import two_block_mlp
from topotorch.analysis.formulas import check_formula, network_formula
from topotorch.training import TrainConfig, train


def small_block_net() -> nn.Module:
    g = two_block_mlp(False)
    with torch.no_grad():  # keep 3 neurons per block and layer: 12 hidden neurons
        for lin in g.model[:3:2]:
            lin.weight[3:10] = 0.0
            lin.weight[13:] = 0.0
    return g.model


def test_formula_equals_network_to_1e9_with_the_right_free_symbols():
    net = small_block_net()
    f = network_formula(net, threshold=0.05)
    assert f.active_neurons == 12 and f.hidden_sizes == [6, 6]
    assert {str(s) for s in f.outputs[0].free_symbols} == {"x1", "x3"}
    assert {str(s) for s in f.outputs[1].free_symbols} == {"x2", "x4"}
    x = torch.rand(200, 4, dtype=torch.float64) * 2 - 1
    assert check_formula(f, net, x) < 1e-9
    ns: dict = {}
    exec(f.python(), ns)
    got = torch.tensor([ns["f"](*row) for row in x[:5].tolist()], dtype=torch.float64)
    assert torch.allclose(got, net(x[:5]).detach(), atol=1e-9, rtol=0)
    assert "x_{1}" in f.latex()[0] and "e^" in f.latex()[0]
    assert f.to_dict()["outputs"][1]["free_symbols"] == ["x2", "x4"]


def test_formula_rejects_big_or_unsupported_networks():
    with pytest.raises(ValueError, match="max_neurons"):
        network_formula(two_block_mlp(True).model, threshold=0.05)
    with pytest.raises(ValueError, match="Conv"):
        network_formula(nn.Sequential(nn.Conv1d(1, 1, 1)), threshold=0.0)
    with pytest.raises(ValueError, match="input names"):
        network_formula(small_block_net(), 0.05, input_names=["a"])


def test_independence_formula_of_a_real_bimt_run():
    """The reference run (20k steps, ~15 s): y1 depends on {x1, x3} only, y2 on {x2, x4} only."""
    r = train(TrainConfig.for_task("independence", progress=False, animation=False))
    f = network_formula(r.model, r.config.threshold, r.task.input_labels, r.task.output_labels)
    assert [sorted(str(s) for s in e.free_symbols) for e in f.outputs] == [["x1", "x3"], ["x2", "x4"]]
    assert check_formula(f, r.model, r.data.x_test) < 1e-9
