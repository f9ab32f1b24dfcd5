"""Pruning baselines (topotorch.compression.pruning, topotorch.experiments.retrain) and the
accuracy-vs-sparsity sweep (topotorch.experiments.sweep, sweep-sparsity)."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from topotorch.cli import app
from topotorch.compression import pruning
from topotorch.compression.pruning import (
    MaskSet,
    average_models,
    global_magnitude_masks,
    layerwise_magnitude_masks,
    mask_sparsity,
    nm_mask,
    prunable_weights,
    random_masks,
    semi_structured_masks,
)
from topotorch.experiments import retrain
from topotorch.experiments.retrain import imp_rewind, sparse_soup
from topotorch.experiments.sweep import SweepConfig, parse_methods, parse_sparsities
from topotorch.tasks import Task, TaskData


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def tiny_task() -> tuple[Task, TaskData]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g)
    y = x[:, :4].argmax(1)
    task = Task(name="tiny", description="", make_data=None, make_model=net, loss="ce")
    return task, TaskData(x[:192], y[:192], x[192:], y[192:])


def test_prunable_weights_are_linear_and_conv_weights_only():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    assert list(prunable_weights(m)) == ["0.weight", "3.weight"]
    with pytest.raises(ValueError, match="no Linear or Conv"):
        prunable_weights(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("s", [0.5, 0.9, 0.98])
def test_global_magnitude_exact_sparsity_and_keeps_largest(s):
    m = net()
    masks = global_magnitude_masks(m, s)
    ws = prunable_weights(m)
    n = sum(w.numel() for w in ws.values())
    kept = sum(int(k.sum()) for k in masks.values())
    assert kept == round((1 - s) * n)
    flat_w = torch.cat([w.detach().abs().flatten() for w in ws.values()])
    flat_k = torch.cat([k.flatten() for k in masks.values()])
    assert flat_w[flat_k].min() >= flat_w[~flat_k].max()  # every kept |w| ≥ every pruned |w|
    assert abs(mask_sparsity(masks) - s) < 1.0 / n + 1e-12


def test_global_magnitude_respects_previous_mask():
    m = net()
    first = global_magnitude_masks(m, 0.5)
    with torch.no_grad():  # make pruned entries large: they must still stay pruned
        for name, w in prunable_weights(m).items():
            w[~first[name]] = 100.0
    second = global_magnitude_masks(m, 0.8, previous=first)
    assert all(not (second[k] & ~first[k]).any() for k in first)
    assert mask_sparsity(second) == pytest.approx(0.8, abs=1e-2)
    with pytest.raises(ValueError, match="must increase"):
        global_magnitude_masks(m, 0.3, previous=second)


def test_layerwise_and_random_hit_the_sparsity_in_every_layer():
    m = net()
    for masks in (layerwise_magnitude_masks(m, 0.75), random_masks(m, 0.75, torch.Generator().manual_seed(3))):
        for name, w in prunable_weights(m).items():
            assert int(masks[name].sum()) == round(0.25 * w.numel()), name
    lw = layerwise_magnitude_masks(m, 0.75)
    for name, w in prunable_weights(m).items():
        a = w.detach().abs()
        assert a[lw[name]].min() >= a[~lw[name]].max()
    r1, r2 = (random_masks(m, 0.5, torch.Generator().manual_seed(1)) for _ in range(2))
    assert all(torch.equal(r1[k], r2[k]) for k in r1)  # seeded: reproducible


def test_bad_sparsity_raises():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        global_magnitude_masks(net(), 1.0)
    with pytest.raises(ValueError):
        layerwise_magnitude_masks(net(), -0.1)


def test_two_four_mask_has_two_nonzeros_per_group():
    m = net()
    masks = semi_structured_masks(m)
    ms = MaskSet(masks).apply(m)
    assert ms.sparsity == pytest.approx(0.5)
    for name, w in prunable_weights(m).items():
        groups = (w.detach() != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all(), name
        a = w.detach().abs().reshape(w.shape[0], -1, 4)
        k = masks[name].reshape(w.shape[0], -1, 4)
        # the kept pair are the two largest of their group
        assert (a.masked_fill(~k, float("inf")).min(-1).values >= a.masked_fill(k, -1).max(-1).values).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.randn(3, 6))
    ragged = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
    sk = semi_structured_masks(ragged, skip_incompatible=True)
    assert sk["0.weight"].all() and int(sk["1.weight"].sum()) == 8


def test_masks_survive_optimizer_steps():
    m = net()
    ms = MaskSet(global_magnitude_masks(m, 0.9)).apply(m)
    before = {n: w.detach().clone() for n, w in prunable_weights(m).items()}
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    handle = ms.attach(opt, m)
    x = torch.randn(32, 12)
    for _ in range(3):
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
    for name, w in prunable_weights(m).items():
        assert (w[~ms.masks[name]] == 0).all()
    assert any(not torch.equal(w, before[n]) for n, w in prunable_weights(m).items())  # kept ones trained
    handle.remove()
    opt.zero_grad()
    m(x).pow(2).sum().backward()
    opt.step()
    assert any((w[~ms.masks[n]] != 0).any() for n, w in prunable_weights(m).items())  # detached: revived


def test_imp_rewinding_restores_early_weights_on_kept_entries():
    task, data = tiny_task()
    early = net(1)
    theta_k = {k: v.clone() for k, v in early.state_dict().items()}
    trained = copy.deepcopy(early)
    retrain.finetune(task, trained, data, None, 30, 1e-2, batch_size=None)
    # zero retrain steps: the cycle's model is exactly the rewound, masked early model
    c = next(imp_rewind(task, trained, theta_k, data, [0.7], retrain_steps=0, lr=1e-2))
    state = c.model.state_dict()
    for name, mask in c.masks.items():
        assert torch.equal(state[name][mask], theta_k[name][mask])
        assert (state[name][~mask] == 0).all()
    assert torch.equal(state["0.bias"], theta_k["0.bias"])  # biases rewind too
    assert all(torch.equal(c.masks[k], v) for k, v in global_magnitude_masks(trained, 0.7).items())
    cycles = list(imp_rewind(task, trained, theta_k, data, [0.5, 0.8], retrain_steps=5, lr=1e-2, base_steps=30))
    assert [round(pruning.weight_sparsity(c.model), 2) for c in cycles] == [0.5, 0.8]
    assert [c.steps for c in cycles] == [35, 40]


def test_soup_of_identical_models_is_the_model_and_keeps_zeros():
    m = net()
    soup = average_models([copy.deepcopy(m) for _ in range(3)])
    for (k, a), b in zip(m.state_dict().items(), soup.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), k
    task, data = tiny_task()
    cycles = list(sparse_soup(task, m, data, [0.5, 0.9], retrain_steps=10, lr=1e-2, n_models=3, batch_size=32))
    for c in cycles:
        for name, mask in c.masks.items():
            w = c.model.state_dict()[name]
            assert (w[~mask] == 0).all() and (w[mask] != 0).all()
        assert len(c.members) == 3
    assert cycles[-1].budget == 3 * 10 * 2 and cycles[-1].steps == 20
    assert pruning.weight_sparsity(cycles[-1].model) == pytest.approx(0.9, abs=1e-3)


def test_soup_members_differ_by_batch_order_and_the_soup_is_their_mean():
    task, data = tiny_task()
    m = net()
    ms = MaskSet(global_magnitude_masks(m, 0.6)).apply(m)
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    retrain.finetune(task, a, data, ms, 20, 1e-2, batch_size=16, seed=1)
    retrain.finetune(task, b, data, ms, 20, 1e-2, batch_size=16, seed=2)
    assert not torch.equal(a[0].weight, b[0].weight)
    soup = average_models([a, b])
    assert torch.allclose(soup[0].weight, (a[0].weight + b[0].weight) / 2)
    assert (soup[0].weight[~ms.masks["0.weight"]] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
def test_semi_structured_gpu_kernel_matches_masked_dense():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)).cuda().half()
    MaskSet(semi_structured_masks(m)).apply(m)
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    ref = m(x)
    fast = pruning.to_semi_structured(copy.deepcopy(m))
    assert torch.allclose(fast(x), ref, atol=2e-2, rtol=2e-2)


def test_to_semi_structured_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="CUDA"):
        pruning.to_semi_structured(net())


def test_sweep_argument_errors():
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("imp,nope")
    with pytest.raises(ValueError, match="increase"):
        parse_sparsities("0.9,0.5")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        parse_sparsities("0.5,1.0")
    with pytest.raises(ValueError, match="number"):
        parse_sparsities("0.5,abc")
    with pytest.raises(ValueError, match="cycle_steps"):
        SweepConfig("digits", cycle_steps=0)
    with pytest.raises(ValueError, match="schedule"):
        SweepConfig("digits", lam="5:0.1")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--methods", "imp,bogus"], "unknown method"),
        (["--sparsities", "0.8,0.5"], "must increase"),
        (["--sparsities", "0.5,1.5"], "(0, 1)"),
        (["--seeds", "a"], "seeds"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(args, needle, tmp_path):
    r = invoke("sweep-sparsity", "digits", *args, "--out", tmp_path / "o")
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not (tmp_path / "o").exists()


def test_cli_sweep_writes_csv_table_png(tmp_path):
    out = tmp_path / "sw"
    r = invoke(
        "sweep-sparsity",
        "digits",
        "--methods",
        "l1,imp,soup,random,magnitude",
        "--sparsities",
        "0.5,0.9",
        "--seeds",
        "0,1",
        "--dense-steps",
        "40",
        "--cycle-steps",
        "5",
        "--soup-size",
        "2",
        "--no-progress",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 5 * 2 * 2
    assert set(rows[0]) >= {"method", "sparsity", "seed", "accuracy", "budget"}
    assert all(0 <= float(x["accuracy"]) <= 1 for x in rows)
    soup = [x for x in rows if x["method"] == "soup" and x["sparsity"] == "0.9"]
    assert {int(x["budget"]) for x in soup} == {40 + 2 * 2 * 5}
    table = (out / "table.md").read_text()
    assert "| soup |" in table and "90%" in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    s = json.loads((out / "summary.json").read_text())
    assert set(s["median_accuracy"]) == {"l1", "imp", "soup", "random", "magnitude"}
    assert "0.9" in s["soup_vs_imp"] and "winners" in s
    from topotorch.experiments.sweep import replot

    (out / "sweep.png").unlink()
    assert replot(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # redrawn from the csv alone


def test_pruned_entries_are_exact_zeros_even_where_the_weight_is_not_finite():
    m = net()
    masks = global_magnitude_masks(m, 0.5)
    w = m[0].weight
    with torch.no_grad():
        w[~masks["0.weight"]] = float("nan")  # e.g. a blown-up entry: NaN * 0 would stay NaN
    MaskSet(masks).apply(m)
    assert (w[~masks["0.weight"]] == 0).all()


def test_previous_mask_of_the_wrong_shape_is_named():
    m = net()
    prev = global_magnitude_masks(m, 0.5)
    prev["2.weight"] = prev["2.weight"].t()
    with pytest.raises(ValueError, match=r"previous mask for '2.weight' has shape \(16, 8\)"):
        global_magnitude_masks(m, 0.8, previous=prev)
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        layerwise_magnitude_masks(m, 0.8, previous=prev)


def test_finetune_on_an_empty_training_set_is_named():
    task, data = tiny_task()
    empty = TaskData(data.x_train[:0], data.y_train[:0], data.x_test, data.y_test)
    with pytest.raises(ValueError, match="empty training set"):
        retrain.finetune(task, net(), empty, None, steps=3, lr=1e-3)
