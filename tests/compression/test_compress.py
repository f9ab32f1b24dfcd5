"""Topographic compression: shapes, φ = 1 is the same function, a smooth sheet survives the cut, refits."""

import pytest
import torch
from torch import nn

from topotorch.compression.topographic import coarse_shape, compress, compress_layer, next_layer_name, parameter_count
from topotorch.models import TinyGPT


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "area"])
def test_factor_one_is_identical(mode):
    m = mlp()
    x = torch.randn(7, 64)
    c = compress(m, "0,2", factor=1.0, mode=mode)
    assert torch.equal(c(x), m(x)) or torch.allclose(c(x), m(x), atol=1e-6, rtol=0)
    conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3))
    xi = torch.randn(2, 3, 8, 8)
    assert torch.allclose(compress(conv, "0", factor=1.0, mode=mode)(xi), conv(xi), atol=1e-6)


def test_shapes_and_smaller_module():
    m = mlp()
    c = compress(m, "0,2", removed=0.8)
    assert [c[0].out_features, c[2].in_features, c[2].out_features, c[4].in_features] == [16, 16, 16, 16]
    assert c(torch.randn(3, 64)).shape == (3, 10) and parameter_count(c) < parameter_count(m) / 4
    assert m[0].out_features == 100  # the original is untouched
    gpt = TinyGPT(vocab=11, d_model=16, n_layers=2, n_heads=2)  # d_mlp 64: 8x8 -> 4x4
    g = compress(gpt, "*.mlp.0", factor=2)
    assert g.blocks[1].mlp[0].out_features == 16 and g.blocks[1].mlp[2].in_features == 16
    assert g(torch.randint(0, 11, (2, 5))).shape == (2, 5, 11)
    conv = compress(nn.Sequential(nn.Conv2d(3, 16, 3), nn.GELU(), nn.Conv2d(16, 8, 3)), "0", factor=2)
    assert conv[0].out_channels == 4 and conv[2].in_channels == 4
    assert coarse_shape(10, 10, removed=0.5) == (7, 7) and coarse_shape(16, 32, removed=0.8) == (7, 14)
    assert coarse_shape(48, 64, factor=4) == (12, 16)


def test_smooth_sheet_survives_the_cut_and_a_shuffled_one_does_not():
    """Weights that are a (nearest) image of a coarse grid: cutting to that grid is exact, even through a ReLU."""
    torch.manual_seed(0)
    coarse = torch.randn(2, 2, 6, dtype=torch.float64)  # 2x2 sheet of 6-dim features, upsampled to 8x8
    sheet = torch.nn.functional.interpolate(coarse.permute(2, 0, 1)[None], size=(8, 8), mode="nearest")[0]
    a = nn.Linear(6, 64, bias=False).double()
    b = nn.Linear(64, 3).double()
    with torch.no_grad():
        a.weight.copy_(sheet.permute(1, 2, 0).reshape(64, 6))
    net = nn.Sequential(a, nn.ReLU(), b)
    x = torch.randn(50, 6, dtype=torch.float64)
    cut = compress(net, "0", factor=4.0, mode="nearest")  # 8x8 -> 2x2, the loss's own resampling
    assert cut[0].out_features == 4
    assert torch.allclose(cut(x), net(x), atol=1e-9)
    shuffled = nn.Sequential(nn.Linear(6, 64, bias=False).double(), nn.ReLU(), b)
    with torch.no_grad():
        shuffled[0].weight.copy_(a.weight[torch.randperm(64)])
    err = (compress(shuffled, "0", factor=4.0, mode="nearest")(x) - shuffled(x)).abs().mean()
    assert err > 0.1 * shuffled(x).abs().mean()


def test_calibrated_refit_reproduces_a_linear_reader():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 36), nn.Identity(), nn.Linear(36, 4)).double()
    x = torch.randn(200, 8, dtype=torch.float64)
    # a linear net cut to 9 >= 8 input dims: the refit reader recovers the function exactly
    c = compress(net, "0", removed=0.75, calibrate=x)
    assert c[0].out_features == 9
    assert torch.allclose(c(x), net(x), atol=1e-4)


def test_errors():
    m = mlp()
    with pytest.raises(ValueError, match="last layer"):
        compress(m, "4", factor=2)
    assert next_layer_name(m, "0") == "2"
    with pytest.raises(ValueError, match="exactly one"):
        compress(m, "0", factor=2, removed=0.5)
    with pytest.raises(ValueError, match="fraction"):
        compress(m, "0", removed=1.0)
    bn = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    with pytest.raises(ValueError, match="BatchNorm1d"):
        compress_layer(bn, "0", factor=2)


def test_cli_compress_and_reload(tmp_path):
    from typer.testing import CliRunner

    from topotorch.cli import app
    from topotorch.experiments.compress import load_compressed
    from topotorch.training import TrainConfig, evaluate, load_run, train

    run = tmp_path / "run"
    train(
        TrainConfig.for_task(
            "digits",
            method="none",
            steps=20,
            topo_tau=1.0,
            topo_layers="0,2",
            animation=False,
            progress=False,
            out=str(run),
            log_every=20,
        )
    )
    res = CliRunner().invoke(app, ["compress", str(run), "--removed", "0.8"])
    assert res.exit_code == 0, res.output
    assert "0: 100->16, 2: 100->16" in res.output
    small = load_compressed(run)
    r = load_run(run)
    assert small[0].out_features == 16 and small[2].in_features == 16
    spec = __import__("json").loads((run / "compressed.json").read_text())
    assert evaluate(r.task, small, r.data.x_test, r.data.y_test) == pytest.approx(spec["test_accuracy_after"])
    bad = CliRunner().invoke(app, ["compress", str(run), "--downsample", "2", "--removed", "0.5"])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error: give exactly one")
    bad = CliRunner().invoke(app, ["compress", str(run), "--threshold", "0.05", "--removed", "0.5"])
    assert bad.exit_code == 2 and "mutually exclusive" in bad.output
    bad = CliRunner().invoke(app, ["compress", str(run), "--downsample", "3", "--layers", "*.c_fc"])
    assert bad.exit_code == 2 and "matches no Linear/Conv layer" in bad.output
