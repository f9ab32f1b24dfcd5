"""Body in a plain PyTorch loop: relocation keeps the function, training equals the never-relocated control seen
through the cumulative permutation, resume equals an uninterrupted run, ``from_config`` is the trainer's body.

All float64 on tiny MLPs. The control of (b) is the same network trained without relocation whose
coordinates are permuted along with the relocated run's neurons, so both penalties see the same geometry:
after relocation slot q of the relocated run holds the control's neuron σ[q], and the control's neuron
σ[q] sits where slot q sits.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from topotorch.body import Body
from topotorch.graph import SpatialGraph
from topotorch.objectives.wiring import WiringConfig, wiring_cost
from topotorch.relocation import apply_permutation


@pytest.fixture(autouse=True)
def _float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def data(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 4, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.stack([(x[:, 0] + x[:, 2]) ** 3, x[:, 1] ** 2 + torch.sin(torch.pi * x[:, 3])], 1)
    return x, y


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 12), nn.SiLU(), nn.Linear(12, 12), nn.SiLU(), nn.Linear(12, 2)).double()


SETTINGS = dict(
    wiring=WiringConfig(wf=1.0, l0=0.1),
    lam="0:1e-3,4:3e-2",
    bias_penalty_from=3,
    group_lam=1e-3,
    relocate_every=3,
    top_k=4,
)


def make(relocation="swap", seed=0, **over):
    model = net(seed)
    graph = SpatialGraph.from_chain(model)
    body = Body(model, graph, relocation=relocation, **{**SETTINGS, **over})
    return model, body, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-3)


def step_once(model, body, opt, x, y, step):
    loss = nn.functional.mse_loss(model(x), y) + body.penalty(step)
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("method", ["swap", "assign"])
def test_relocation_in_a_plain_loop_keeps_the_function(method):
    x, y = data()
    model, body, opt = make(method)
    moved = 0
    for step in range(9):
        step_once(model, body, opt, x, y, step)
        with torch.no_grad():
            before = model(x)
            cost = float(wiring_cost(body.graph, body.relocation_cost))
        applied = body.after_step(step, opt)
        moved += sum(int((p != torch.arange(len(p))).sum()) for _, p in applied)
        with torch.no_grad():
            assert (model(x) - before).abs().max() <= 1e-12
            assert float(wiring_cost(body.graph, body.relocation_cost)) <= cost + 1e-12
    assert body.relocations == 3 and moved > 0


@pytest.mark.parametrize("method", ["swap", "assign"])
def test_training_equals_the_unrelocated_control_through_the_permutation(method):
    x, y = data()
    model, body, opt = make(method)
    control, cbody, copt = make(None)  # same initialisation, never relocates
    sigma = {s.name: torch.arange(s.size) for s in body.graph.spaces}  # slot q of `model` holds control's sigma[q]
    moved = 0
    for step in range(12):
        step_once(model, body, opt, x, y, step)
        step_once(control, cbody, copt, x, y, step)
        for name, perm in body.after_step(step, opt):
            moved += 1
            if body.graph.space(name).relocate == "weights":
                sigma[name] = sigma[name][perm]
        for s in body.graph.spaces:  # the control's neuron sigma[q] sits where slot q sits
            pos = torch.empty_like(s.positions)
            pos[sigma[s.name]] = s.positions
            if not torch.equal(pos, cbody.graph.space(s.name).positions):
                cbody.graph.set_positions(s.name, pos)
    assert moved > 0
    seen = copy.deepcopy(control)  # the control's parameters moved by sigma: the relocated run's
    g = SpatialGraph.from_chain(seen)
    for s in g.spaces:
        if s.relocate == "weights":
            apply_permutation(g, s.name, sigma[s.name])
    for (n, p), q in zip(model.named_parameters(), seen.parameters()):
        assert (p - q).abs().max() <= 1e-8, n
    with torch.no_grad():
        assert (model(x) - control(x)).abs().max() <= 1e-8


def test_resume_equals_an_uninterrupted_run():
    x, y = data()
    model, body, opt = make("swap", lam="0:1e-3,6:3e-2", bias_penalty_from=5, relocate_every=2)
    for step in range(10):
        step_once(model, body, opt, x, y, step)
        body.after_step(step, opt)
        if step == 4:
            saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "body": body.state_dict()})
    assert body.relocations == 5
    json.dumps({k: v for k, v in saved["body"].items() if k != "positions"})  # JSON values, tensors apart
    assert all(isinstance(t, torch.Tensor) for t in saved["body"]["positions"].values())

    model2, body2, opt2 = make("swap", seed=1, lam="0:1e-3,6:3e-2", bias_penalty_from=5, relocate_every=2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    body2.load_state_dict(saved["body"])
    assert body2.step == 5 and body2.relocations == 2
    for step in range(body2.step, 10):
        step_once(model2, body2, opt2, x, y, step)
        body2.after_step(step, opt2)
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert (p - q).abs().max() <= 1e-12, n
    for s, s2 in zip(body.graph.spaces, body2.graph.spaces):
        assert torch.equal(s.positions, s2.positions), s.name
    assert body2.relocations == body.relocations


def test_penalty_backward_is_the_closed_form_and_add_gradients():
    x, y = data()
    model, body, _ = make(None, topo_tau=0.5, topo_layers="0,2", topo_factor=2.0)
    for step in (2, 5):  # biases left out, then in
        model.zero_grad(set_to_none=True)
        (nn.functional.mse_loss(model(x), y) + body.penalty(step)).backward()
        via_loss = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        body.add_gradients(step)
        for a, b in zip(via_loss, model.parameters()):
            assert (a - b.grad).abs().max() <= 1e-14
        model.zero_grad(set_to_none=True)  # autograd through the wiring cost agrees with the closed form
        cfg = body.wiring_config(step)
        (body.lam_at(step) * wiring_cost(body.graph, cfg)).backward()
        auto = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        body_w = Body(model, body.graph, wiring=body.wiring, lam=body.lam_at(step), bias_penalty_from=3)
        body_w.penalty(step).backward()
        for a, b in zip(auto, model.parameters()):
            assert (a - (b.grad if b.grad is not None else 0)).abs().max() <= 1e-14
    assert float(Body(model, body.graph).penalty(0)) == 0.0


def test_graph_is_built_from_example_inputs():
    x, _ = data()
    model = net()
    body = Body(model, example_inputs=x[:2], lam=1e-2, relocation="assign", relocate_every=1)
    before = model(x).detach()
    body.after_step(0, [])
    assert body.relocations == 1 and (model(x) - before).abs().max() <= 1e-12
    assert float(body.penalty(0).detach()) > 0


@pytest.mark.parametrize(
    "overrides",
    [
        dict(topo_tau=0.1, group_lam=1e-3),
        dict(method="swap", relocation="assign", group_lam=1e-3),
    ],
)
def test_from_config_is_the_trainers_body(overrides):
    from topotorch.training import TrainConfig, build, task_loss, train

    cfg = TrainConfig.for_task(
        "independence",
        steps=9,
        dtype="float64",
        lam="0:1e-3,4:1e-2",
        bias_penalty_from=5,
        swap_every=3,
        top_k=4,
        progress=False,
        animation=False,
        threads=1,
        **overrides,
    )
    seen = {}

    def hook(done, model, graph):  # the trainer's parameters and its logged penalty after each step
        seen[done] = [p.detach().clone() for p in model.parameters()]

    train(cfg, on_step=hook)
    task, model, graph = build(cfg)
    data_ = task.make_data(cfg.seed, torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    body = Body.from_config(cfg, model, graph)
    for step in range(cfg.steps):
        with torch.no_grad():  # the trainer's penalty value: λ·cc with its bias rule
            lam = body.lam_at(step)
            ref = lam * float(wiring_cost(graph, cfg.wiring(train=True, bias=step >= cfg.bias_penalty_from)))
        wiring_only = Body(
            model, graph, wiring=cfg.wiring(train=True), lam=lam, bias_penalty_from=cfg.bias_penalty_from
        )
        assert float(wiring_only.penalty(step).detach()) == pytest.approx(ref, rel=1e-15, abs=0)
        loss = task_loss(task, model(data_.x_train), data_.y_train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        body.add_gradients(step)
        opt.step()
        body.after_step(step, [opt])
        for p, q in zip(model.parameters(), seen[step + 1]):
            assert torch.equal(p.detach(), q), step
    assert body.relocations == 3


def test_bad_arguments_are_named():
    model = net()
    graph = SpatialGraph.from_chain(model)
    cases = [
        (dict(lam=-1e-3), "lam"),
        (dict(lam="0:1e-3,10:-1"), "lam"),
        (dict(group_lam="5:1e-3"), "group_lam"),
        (dict(relocation="swapp"), "relocation"),
        (dict(relocate_every=0), "relocate_every"),
        (dict(top_k=0), "top_k"),
        (dict(bias_penalty_from=-1), "bias_penalty_from"),
        (dict(wiring={"wf": 1.0, "lo": 0.1}), "unknown wiring setting"),
        (dict(wiring=WiringConfig(), lam=1e-3, relocation=None, relocation_cost=3), "relocation_cost"),
        (dict(topo_tau=-1.0), "topo_tau"),
        (dict(topo_tau=1.0, topo_layers="nothing.*"), "topo_layers"),
        (dict(topo_tau=1.0, topo_factor=0.5), "topo_factor"),
        (dict(lam=1e-3, wiring=WiringConfig(exclude=["*"])), "nothing to penalise"),
        (dict(group_lam=1e-3, group_spaces=["nope"]), "nope"),
    ]
    for kwargs, words in cases:
        with pytest.raises((ValueError, KeyError), match=words):
            Body(model, graph, **kwargs)
    with pytest.raises(ValueError, match="another model"):
        Body(net(), graph)
    with pytest.raises(ValueError, match="example_inputs"):
        Body(model)
    with pytest.raises(ValueError, match=r"nn\.Module"):
        Body("model", graph)
    body = Body(model, graph, lam=1e-3, relocation="swap")
    with pytest.raises(ValueError, match="other settings"):
        Body(model, graph, lam=2e-3, relocation="swap").load_state_dict(body.state_dict())
    with pytest.raises(ValueError, match="not a Body state"):
        body.load_state_dict({"positions": {}})
    with pytest.raises(ValueError, match="no relocation"):
        Body(model, graph).after_step(0, [], relocate=True)
    with pytest.raises(ValueError, match="TrainConfig"):
        Body.from_config({"method": "bimt"}, model, graph)
