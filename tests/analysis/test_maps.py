"""Maps: Welch t-values against scipy, smoothness of smooth / shuffled / checkerboard maps, participation ratio."""

import pytest
import torch
from torch import nn

from topotorch.analysis.maps import (
    draw_maps,
    effective_dimensionality,
    layer_activations,
    selectivity,
    selectivity_maps,
    smoothness,
)


def test_t_values_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(0)
    acts = torch.randn(120, 9, dtype=torch.float64) + torch.arange(9.0)
    y = torch.randint(0, 3, (120,))
    acts[y == 1, :3] += 2.0
    t = selectivity_maps(acts, y)
    ref = stats.ttest_ind(acts[y == 1].numpy(), acts[y != 1].numpy(), equal_var=False).statistic
    assert torch.allclose(t[1], torch.as_tensor(ref), atol=1e-9)
    assert torch.allclose(selectivity(acts, y == 2), t[2], atol=1e-9)
    assert (t[1, :3] > 5).all()
    with pytest.raises(ValueError, match="at least 2"):
        selectivity(acts, torch.zeros(120, dtype=torch.bool))


def test_smoothness_orders_maps():
    yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    smooth = torch.sin(xx / 4) + torch.cos(yy / 5)
    g = torch.Generator().manual_seed(0)
    shuffled = smooth.reshape(-1)[torch.randperm(144, generator=g)]
    checker = ((xx + yy) % 2) * 2 - 1
    s, r, c = smoothness(smooth.reshape(-1), 12, 12), smoothness(shuffled, 12, 12), smoothness(checker, 12, 12)
    assert s > 0.9 and abs(r) < 0.15 and c < -0.9
    assert smoothness(torch.stack([smooth.reshape(-1), shuffled]), 12, 12) == pytest.approx((s + r) / 2, abs=0.1)


def test_effective_dimensionality_and_activations(tmp_path):
    torch.manual_seed(0)
    assert effective_dimensionality(torch.randn(2000, 1) @ torch.randn(1, 10)) == pytest.approx(1.0)
    assert 8.5 < effective_dimensionality(torch.randn(4000, 10)) <= 10
    net = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(30, 5)
    acts = layer_activations(net, "0", x, batch_size=7)
    assert acts.shape == (30, 12) and torch.allclose(acts.float(), net[0](x), atol=1e-6)
    seq = layer_activations(net, "2", torch.randn(4, 6, 5))  # (batch, time, units) -> one row per position
    assert seq.shape == (24, 3)
    p = draw_maps(torch.randn(3, 12), 3, 4, tmp_path / "m.png", titles=["a", "b", "c"])
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_cli_maps(tmp_path):
    import json

    from typer.testing import CliRunner

    from topotorch.cli import app
    from topotorch.training import TrainConfig, train

    run = tmp_path / "run"
    train(
        TrainConfig.for_task(
            "digits", method="none", steps=10, animation=False, progress=False, out=str(run), log_every=10
        )
    )
    res = CliRunner().invoke(app, ["maps", str(run), "--layers", "0"])
    assert res.exit_code == 0, res.output
    data = json.loads((run / "maps" / "maps.json").read_text())
    assert data["classes"] == list(range(10)) and data["layers"]["0"]["sheet"] == [10, 10]
    assert (run / "maps" / "0.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(app, ["maps", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and bad.output.startswith("error:")
