"""Knock-outs (topotorch.analysis.ablation): what changes is exactly what the knocked-out part feeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from test_modularity import two_block_mlp
from topotorch.analysis.ablation import ablation_table, embedding_module_ablation, knocked_out, module_groups, per_output_metric
from topotorch.graph import SpatialGraph
from topotorch.analysis.modularity import detect_communities
from topotorch.tasks import get_task
from topotorch.training import TrainConfig, TrainResult, train


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
