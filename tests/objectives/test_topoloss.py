"""TopoLoss: equality with the peer ``topoloss`` 0.0.2, smooth vs shuffled sheets, τ and reductions, dtypes."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from topotorch.models import TinyGPT
from topotorch.objectives.topoloss import TauSchedule, TopoLoss, axis_operators, blur, sheet_loss
from topotorch.sheets import CorticalSheet


def reference_loss(sheet_hwe: torch.Tensor, factor: float, mode: str) -> torch.Tensor:
    """The formula written out with F.interpolate, independent of our matrices."""
    g = sheet_hwe.permute(2, 0, 1).unsqueeze(0)
    down = F.interpolate(g, scale_factor=(1 / factor, 1 / factor), mode=mode)
    up = F.interpolate(down, size=g.shape[2:], mode=mode)
    a = g[0].flatten(1).T
    b = up[0].flatten(1).T
    return 1 - F.cosine_similarity(a, b, dim=-1).mean()


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 96), nn.ReLU(), nn.Conv2d(3, 48, 3), nn.Linear(7, 3072 // 8))


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "area"])
@pytest.mark.parametrize("factor", [1.5, 2.0, 3.0, 4.0])
def test_matches_interpolate_formula(mode, factor):
    net = make_net()
    for name in ("0", "2", "3"):
        sheet = CorticalSheet.of(net.get_submodule(name), name)
        ours = TopoLoss(net, name, factor=factor, mode=mode)()
        ref = reference_loss(sheet.features().detach().double(), factor, mode)
        assert abs(ours.item() - float(ref)) < 1e-6


@pytest.mark.parametrize("factor", [2.0, 3.0, 4.0])
def test_equals_peer_topoloss(factor):
    topoloss = pytest.importorskip("topoloss", reason="peer `topoloss` 0.0.2 not installed (pip install '.[peers]')")
    net = make_net()
    for name in ("0", "2", "3"):  # Linear, Conv2d, Linear with a 16x24 sheet
        peer = topoloss.TopoLoss([topoloss.LaplacianPyramid(name, factor, factor)]).compute(net)
        ours = TopoLoss(net, name, factor=factor)()
        assert abs(ours.item() - peer.item()) <= 1e-6, name
        # gradients agree too
        g_peer = torch.autograd.grad(peer, net.get_submodule(name).weight)[0]
        g_ours = torch.autograd.grad(ours, net.get_submodule(name).weight)[0]
        torch.testing.assert_close(g_ours, g_peer, atol=1e-6, rtol=1e-4)
    # several layers, the reference's mean over layers and per-layer scale
    peer = topoloss.TopoLoss(
        [
            topoloss.LaplacianPyramid("0", factor, factor, scale=2.0),
            topoloss.LaplacianPyramid("2", factor, factor, scale=0.5),
        ]
    ).compute(net)
    ours = TopoLoss(net, "0,2", factor=factor, tau={"0": 2.0, "2": 0.5})()
    assert abs(ours.item() - peer.item()) <= 1e-6


def test_smooth_sheet_scores_lower_than_shuffled():
    h, w, e = 16, 16, 8
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    freqs = torch.arange(1, e + 1, dtype=torch.float32)
    smooth = torch.cos(math.pi * (xx[..., None] * freqs + yy[..., None] * freqs.flip(0)) / 4) + 0.1
    lin = nn.Linear(e, h * w)
    with torch.no_grad():
        lin.weight.copy_(smooth.reshape(h * w, e))
    loss = TopoLoss(lin, "", factor=4.0)
    smooth_value = loss().item()
    with torch.no_grad():
        lin.weight.copy_(lin.weight[torch.randperm(h * w, generator=torch.Generator().manual_seed(0))])
    shuffled_value = loss().item()
    assert smooth_value < 0.05 and shuffled_value > 5 * smooth_value


def test_constant_sheet_is_zero_and_training_smooths():
    lin = nn.Linear(4, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]).expand(64, 4))
    assert abs(TopoLoss(lin, "")().item()) < 1e-6
    torch.manual_seed(0)
    lin = nn.Linear(16, 64)
    loss = TopoLoss(lin, "", factor=2.0)
    before = loss().item()
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.3 * before


def test_batched_layers_equal_one_by_one_and_reductions():
    gpt = TinyGPT(vocab=11, d_model=16, n_layers=3, n_heads=2, d_mlp=64)
    each = [TopoLoss(gpt, f"blocks.{i}.mlp.0", factor=2)().item() for i in range(3)]
    loss = TopoLoss(gpt, "*.mlp.0,blocks.0.attn.qkv", factor=2)
    lw = loss.layerwise()
    assert list(lw) == ["blocks.0.mlp.0", "blocks.1.mlp.0", "blocks.2.mlp.0", "blocks.0.attn.qkv"]
    assert [v.item() for v in list(lw.values())[:3]] == pytest.approx(each, abs=1e-6)
    vals = torch.stack(list(lw.values()))
    assert loss().item() == pytest.approx(vals.mean().item(), abs=1e-6)
    s = TopoLoss(gpt, "*.mlp.0,blocks.0.attn.qkv", factor=2, tau=3.0, reduction="sum")
    assert s().item() == pytest.approx(3 * vals.sum().item(), abs=1e-5)
    per = TopoLoss(gpt, "*.mlp.0", factor=2, tau={"blocks.1.*": 10.0, "*": 1.0}, reduction="sum")
    assert per().item() == pytest.approx(each[0] + 10 * each[1] + each[2], abs=1e-5)


def test_dtypes():
    torch.manual_seed(0)
    lin = nn.Linear(32, 96)
    ref = TopoLoss(lin, "", factor=3)().item()
    for dtype, tol in [(torch.float64, 1e-6), (torch.bfloat16, 2e-2)]:
        lin_d = nn.Linear(32, 96).to(dtype)
        with torch.no_grad():
            lin_d.weight.copy_(lin.weight.to(dtype))
        out = TopoLoss(lin_d, "", factor=3)()
        assert out.dtype == dtype and abs(out.item() - ref) < tol
        out.backward()
        assert lin_d.weight.grad.dtype == dtype


def test_operators_and_errors():
    dh, uh, dw, uw = axis_operators(8, 12, factor=4)
    assert dh.shape == (2, 8) and uh.shape == (8, 2) and dw.shape == (3, 12) and uw.shape == (12, 3)
    x = torch.randn(8, 12, 3, dtype=torch.float64)
    direct = F.interpolate(
        F.interpolate(x.permute(2, 0, 1)[None], scale_factor=0.25, mode="bilinear"), size=(8, 12), mode="bilinear"
    )[0].permute(1, 2, 0)
    torch.testing.assert_close(blur(x, 4), direct)
    assert sheet_loss(x, 1.0).abs().max() < 1e-12  # φ = 1 is the identity
    with pytest.raises(ValueError, match="does not fit a 8x8 sheet"):
        TopoLoss(nn.Linear(3, 64), "", factor=9)
    with pytest.raises(ValueError, match="unknown interpolation"):
        TopoLoss(nn.Linear(3, 64), "", mode="bicubic")
    with pytest.raises(ValueError, match=">= 1"):
        TopoLoss(nn.Linear(3, 64), "", factor=0.5)
    with pytest.raises(ValueError, match="reduction"):
        TopoLoss(nn.Linear(3, 64), "", reduction="max")


def test_tau_schedules_clamp_past_the_end():
    lin = TauSchedule(0.0, 10.0, 100, "linear")
    cos = TauSchedule(0.0, 10.0, 100, "cosine", warmup=10)
    assert [lin(s) for s in (0, 50, 100, 500)] == [0.0, 5.0, 10.0, 10.0]
    assert cos(0) == 0.0 and cos(10) == 0.0 and cos(60) == pytest.approx(5.0) and cos(10_000) == 10.0
    assert TauSchedule(2.0)(123) == 2.0
    with pytest.raises(ValueError):
        TauSchedule(-1.0)
    net = nn.Linear(3, 64)
    loss = TopoLoss(net, "", factor=2, tau=lin)
    assert loss(step=0).item() == 0.0
    assert loss(step=1000).item() == pytest.approx(10 * TopoLoss(net, "", factor=2)().item(), rel=1e-6)


def test_training_with_topo_tau_smooths_the_chosen_layer(tmp_path):
    from topotorch.training import TrainConfig, train

    common = dict(
        method="none", steps=40, animation=False, progress=False, log_every=40, topo_layers="0", topo_factor=2.0
    )
    plain = train(TrainConfig.for_task("digits", **common)).model
    r = train(TrainConfig.for_task("digits", **common, topo_tau=20.0, out=str(tmp_path / "run")))
    plain_value = TopoLoss(plain, "0", factor=2.0)().item()
    assert r.summary["topo_loss"]["0"] < 0.5 * plain_value
    assert "topo_loss" in (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(ValueError, match="matches no Linear/Conv layer"):
        train(TrainConfig.for_task("digits", **{**common, "topo_layers": "*.c_fc"}, topo_tau=1.0))
    with pytest.raises(ValueError, match="topo_tau"):
        TrainConfig.for_task("digits", topo_tau=float("nan"))
    with pytest.raises(ValueError, match="topo_layers"):
        TrainConfig.for_task("digits", topo_layers="")


def test_default_layers_follow_the_paper():
    from topotorch.models import MLP, SmallResNet
    from topotorch.sheets import default_layers

    assert default_layers(TinyGPT(vocab=5, d_model=8, n_layers=2)) == "*.mlp.0"
    assert default_layers(SmallResNet()) == "*blocks.*.conv*"
    assert default_layers(MLP([64, 100, 100, 10])) == "0,2"


def test_readme_toponets_example_runs(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    if "## TopoNets" not in readme:
        pytest.skip("README has no TopoNets section")
    section = readme.split("## TopoNets", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "ex.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "ex.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a tiny example: extra threads only add contention under -n 2
    )
    assert proc.returncode == 0, proc.stderr
    assert "{'0': 0.019}" in proc.stdout and "Linear(in_features=16, out_features=10" in proc.stdout


def test_kernel_and_tensor_paths_agree_on_values_and_gradients():
    """The compiled CPU kernel and the tensor-op fallback give the same values and gradients (float32, bfloat16)."""
    from topotorch.objectives import topoloss as tl

    if tl._topo_kernel() is None:
        pytest.skip(f"no C compiler for the TopoLoss kernel: {tl._kerror}")
    torch.manual_seed(0)
    for shape, factor, mode in [
        ((48, 64, 40), (4.0, 4.0), "bilinear"),
        ((48, 64, 40), (3.0, 3.0), "bilinear"),
        ((6, 8, 27), (2.0, 2.0), "bilinear"),
        ((10, 12, 5), (3.0, 2.0), "nearest"),
        ((12, 16, 7), (4.0, 4.0), "area"),
        ((7, 9, 3), (1.5, 1.5), "bilinear"),
    ]:
        s = torch.randn(*shape)
        v_t, g_t = tl._fused(s.unsqueeze(0), factor, mode, torch.tensor([0.7]))
        v_k, g_k = tl._kernel_sheet(s, factor, mode, 0.7)
        assert abs(v_k - float(v_t[0])) < 1e-6, (shape, factor, mode)
        torch.testing.assert_close(g_k, g_t[0], atol=1e-8, rtol=1e-4)
        v_b, g_b = tl._kernel_sheet(s.bfloat16(), factor, mode, 0.7)
        v_tb, g_tb = tl._fused(s.bfloat16().unsqueeze(0), factor, mode, torch.tensor([0.7]))
        assert g_b.dtype == torch.bfloat16 and abs(v_b - float(v_tb[0])) < 1e-5
        torch.testing.assert_close(g_b.float(), g_tb[0].float(), atol=1e-6, rtol=2e-2)


def test_gradient_scaling_layerwise_and_retain_graph():
    """The gradient made with the value is rescaled for any upstream weight; layerwise values backprop too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 96), nn.Linear(96, 64))
    loss = TopoLoss(net, "0,1", factor=2.0, tau={"0": 2.0, "1": 0.0}, reduction="sum")
    w0, w1 = net[0].weight, net[1].weight

    def ref(w, f=2.0):
        return reference_loss(w.reshape(8, 12, -1) if w.shape[0] == 96 else w.reshape(8, 8, -1), f, "bilinear")

    g_ref0 = torch.autograd.grad(ref(w0), w0)[0]
    g_ref1 = torch.autograd.grad(ref(w1), w1)[0]
    out = loss()
    g0, g1 = torch.autograd.grad(3.0 * out, [w0, w1], retain_graph=True)
    torch.testing.assert_close(g0, 6.0 * g_ref0, atol=1e-7, rtol=1e-4)
    assert g1.abs().max() == 0  # τ = 0: no gradient
    g0b = torch.autograd.grad(out, w0)[0]  # second backward through the same graph
    torch.testing.assert_close(g0b, 2.0 * g_ref0, atol=1e-7, rtol=1e-4)
    lw = loss.layerwise()
    g1 = torch.autograd.grad(lw["1"], w1)[0]
    torch.testing.assert_close(g1, g_ref1, atol=1e-7, rtol=1e-4)
    with torch.no_grad():
        assert loss().requires_grad is False


def test_hf_gpt2_conv1d_layers_match_a_transposed_linear():
    """Issue 14: `transformer.h.*.mlp.c_fc` of a Hugging Face GPT-2 (Conv1D, weight (in, out)) is a sheet of its
    output units, and the loss equals TopoLoss on an nn.Linear holding the transposed weight."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    gpt = transformers.GPT2LMHeadModel(cfg)
    loss = TopoLoss(gpt, "transformer.h.*.mlp.c_fc", factor=2.0)
    assert loss.names == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert [(s.h, s.w, s.feature_dim) for s in loss.sheets] == [(8, 16, 32)] * 2  # 128 output units, 32 inputs
    lins = nn.ModuleList()
    for i in range(2):
        conv = gpt.transformer.h[i].mlp.c_fc
        lin = nn.Linear(32, 128)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.T)
        lins.append(lin)
    ref = TopoLoss(lins, "0,1", factor=2.0)
    value = loss()
    assert abs(value.item() - ref().item()) < 1e-6
    value.backward()
    ref().backward()
    for i in range(2):
        torch.testing.assert_close(gpt.transformer.h[i].mlp.c_fc.weight.grad, lins[i].weight.grad.T)
    from topotorch.sheets import default_layers

    assert default_layers(gpt) == "*.c_fc"
