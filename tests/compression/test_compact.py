"""The compact runtime (topotorch.compression.compact): exactness against the thresholded original, dead neurons with
biases, module splitting, every storage format, save/load, corrupt files, and the CLI report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from topotorch.compression.compact import (
    FORMATS,
    CompactError,
    compact_mlp,
    load_compact,
    save_compact,
    thresholded_copy,
    verify,
)
from topotorch.models import MLP, TokenMLP

ROOT = Path(__file__).resolve().parents[2]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def planted(dtype: torch.dtype, act: str = "silu") -> nn.Module:
    """6-12-10-3 with known dead structure (threshold 0.1):
    hidden1: 0,1 no inputs but biases 0.7/-0.4 (constants to fold); 2 no outputs; 3 all dead; 4..11 alive.
    hidden2: 0 no inputs (bias 1.3; its constant reaches the outputs); 1 no outputs; 2..9 alive.
    output 2 unreachable (constant act(b) = b)."""
    torch.manual_seed(0)
    m = MLP([6, 12, 10, 3], activation=act).to(dtype)
    with torch.no_grad():
        for lin in (m[0], m[2], m[4]):
            lin.weight.copy_(torch.sign(torch.randn_like(lin.weight)) * (0.3 + 0.7 * torch.rand_like(lin.weight)))
            lin.bias.uniform_(-1, 1)
        for lin in (m[0], m[2]):
            lin.weight[torch.rand_like(lin.weight) < 0.3] = 0.05  # below threshold: thresholded away
        m[0].weight[0:2] = 0.04
        m[0].bias[0:2] = torch.tensor([0.7, -0.4])
        m[2].weight[:, 2] = 0.0
        m[0].weight[3] = 0.0
        m[2].weight[:, 3] = 0.0
        m[2].weight[0] = 0.0
        m[2].bias[0] = 1.3
        m[4].weight[:, 1] = 0.0
        m[4].weight[2] = 0.0
        m[0].weight[:, 5] = 0.0  # input 6 unused
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ["silu", "tanh", "relu"])
def test_compact_equals_thresholded_original_with_dead_neurons(dtype, act):
    m = planted(dtype, act)
    x = torch.randn(64, 6, dtype=dtype)
    ref = thresholded_copy(m, 0.1)
    small = compact_mlp(m, 0.1, choose="dense")
    assert small.description["hidden_sizes_after"] == [8, 8]  # 12 - 4, 10 - 2
    assert small.description["n_live_outputs"] == 2
    assert verify(ref, small, x) <= TOL[dtype]
    # the folded constants matter: a reference without them (their biases zeroed) differs
    with torch.no_grad():
        broken = thresholded_copy(m, 0.1)
        broken[2].bias[0] = 0.0
    assert verify(broken, small, x) > 1e-3
    # the unreachable output is its bias
    assert torch.allclose(small(x)[:, 2], m[4].bias[2].expand(64))


def test_dead_neuron_with_bias_only_is_folded_not_dropped():
    m = MLP([2, 3, 1], activation="relu").double()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.5, 2.0]]))
        m[0].bias.copy_(torch.tensor([2.0, 0.0, 0.0]))  # neuron 0: no inputs, outputs relu(2) = 2
        m[2].weight.copy_(torch.tensor([[3.0, 1.0, 1.0]]))
        m[2].bias.zero_()
    small = compact_mlp(m, 0.0, choose="dense")
    assert small.description["hidden_sizes_after"] == [2]
    assert torch.allclose(small.layers[-1].bias, torch.tensor([6.0], dtype=torch.float64))
    x = torch.randn(10, 2, dtype=torch.float64)
    assert verify(m, small, x) <= 1e-12


def two_module_net(dtype=torch.float64) -> nn.Module:
    """{x1, x3} -> 4 neurons -> 4 neurons -> y1 and {x2, x4} -> 4 -> 4 -> y2 (interleaved neurons)."""
    torch.manual_seed(1)
    m = MLP([4, 8, 8, 2], activation="silu").to(dtype)
    a = torch.tensor([0, 2, 4, 6])  # module A's hidden neurons (B: 1, 3, 5, 7)
    with torch.no_grad():
        mask0 = torch.zeros(8, 4)
        mask0[a[:, None], torch.tensor([0, 2])] = 1
        mask0[(a + 1)[:, None], torch.tensor([1, 3])] = 1
        mask1 = torch.zeros(8, 8)
        mask1[a[:, None], a] = 1
        mask1[(a + 1)[:, None], a + 1] = 1
        mask2 = torch.zeros(2, 8)
        mask2[0, a] = 1
        mask2[1, a + 1] = 1
        for lin, mask in ((m[0], mask0), (m[2], mask1), (m[4], mask2)):
            lin.weight.copy_((torch.rand_like(lin.weight) + 0.5) * mask.to(dtype))
    return m


@pytest.mark.parametrize("fmt", ["block", "auto"])
def test_two_module_net_splits_into_two_modules(fmt):
    m = two_module_net()
    small = compact_mlp(m, 0.01, choose=fmt)
    assert small.description["modules"] == [[4, 4], [4, 4]]
    assert all(layer["modules"] == 2 for layer in small.description["layers"])
    if fmt == "block":
        assert small.layers[1].blocks.shape == (2, 4, 4)  # two 4x4 blocks, not one 8x8 matrix
        assert small.layers[0].idx_in.view(2, -1).tolist() == [[0, 2], [1, 3]]
    x = torch.randn(32, 4, dtype=torch.float64)
    assert verify(m, small, x) <= 1e-12


def test_one_module_when_connected():
    m = two_module_net()
    with torch.no_grad():
        m[2].weight[1, 0] = 1.0  # a bridge from module A to module B
    assert len(compact_mlp(m, 0.01, choose="dense").description["modules"]) == 1


def token_net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(2)
    m = TokenMLP(7, 5, 2, [9, 9, 7], activation="silu").to(dtype)
    with torch.no_grad():
        m.embedding.weight[:, 1] = 0.0  # a dead embedding dimension
        m.mlp[0].weight[:, [3, 8]] = 0.0  # dimension 3 unused by both token slots
        m.mlp[0].weight[2] = 0.0  # a constant neuron
        for lin in m.mlp:
            if isinstance(lin, nn.Linear):
                lin.weight[lin.weight.abs() < 0.15] = 0.0
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("net", ["planted", "modules", "tokens"])
def test_every_format_gives_the_same_outputs(net, dtype):
    m = {
        "planted": lambda: planted(dtype),
        "modules": lambda: two_module_net(dtype),
        "tokens": lambda: token_net(dtype),
    }[net]()
    x = torch.randint(7, (50, 2)) if net == "tokens" else torch.randn(50, 4 if net == "modules" else 6, dtype=dtype)
    ref = thresholded_copy(m, 0.1)
    outs = {}
    for fmt in (*FORMATS, "auto"):
        small = compact_mlp(m, 0.1, choose=fmt, example=x, batch_sizes=[8, 50], reps=1)
        assert verify(ref, small, x) <= TOL[dtype], fmt
        outs[fmt] = small(x)
        if fmt != "auto":
            assert small.formats == [fmt] * len(small.layers)
        else:
            assert all(set(layer["seconds_per_sample"]) == set(FORMATS) for layer in small.description["layers"])
    if net == "tokens":
        assert small.embed.shape[1] == 3  # dims 1 (all zero) and 3 (unread) gone
    n = sum(p.numel() for p in m.parameters())
    assert small.stored_values() < n if net != "modules" else small.stored_values() <= n  # modules: nothing dead


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_load_roundtrip(tmp_path, fmt):
    for m, x in ((planted(torch.float32), torch.randn(20, 6)), (token_net(), torch.randint(7, (20, 2)))):
        small = compact_mlp(m, 0.1, choose=fmt)
        save_compact(tmp_path / "c", small)
        back = load_compact(tmp_path / "c")
        assert back.formats == small.formats
        assert torch.equal(back(x), small(x))
        assert back.description["layers"][0]["format"] == fmt
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["compact.json", "compact.safetensors"]


def test_load_needs_no_training_code(tmp_path):
    save_compact(tmp_path, compact_mlp(two_module_net(), 0.01, choose="block"))
    code = (
        "import sys, torch; from topotorch.compression.compact import load_compact; m = load_compact(sys.argv[1]); "
        "print(tuple(m(torch.zeros(3, 4, dtype=torch.float64)).shape)); "
        "print(sorted(k for k in sys.modules if k.startswith('topotorch.') and k.split('.')[1] in "
        "('training', 'tasks', 'tasks_sequence', 'models', 'cli')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.split("\n")[:2] == ["(3, 2)", "[]"], out.stdout + out.stderr


def test_corrupt_or_missing_files_give_clear_errors(tmp_path):
    small = compact_mlp(planted(torch.float32), 0.1, choose="csr")
    st, js = save_compact(tmp_path, small)
    good_js, good_st = js.read_bytes(), st.read_bytes()
    js.write_text("{not json")
    with pytest.raises(CompactError, match=r"compact\.json is corrupt"):
        load_compact(tmp_path)
    js.write_bytes(good_js)
    st.write_bytes(good_st[: len(good_st) // 2])
    with pytest.raises(CompactError, match="does not match"):
        load_compact(tmp_path)
    spec = json.loads(good_js)  # checksum fits, content does not: corrupt tensors are caught too
    st.write_bytes(b"\x00" * 16)
    spec["sha256"] = __import__("hashlib").sha256(b"\x00" * 16).hexdigest()
    js.write_text(json.dumps(spec))
    with pytest.raises(CompactError, match=r"compact\.safetensors is corrupt"):
        load_compact(tmp_path)
    spec = json.loads(good_js)
    spec["shapes"]["layers.0.values"] = [999]
    js.write_text(json.dumps(spec))
    st.write_bytes(good_st)
    with pytest.raises(CompactError, match=r"layers\.0\.values"):
        load_compact(tmp_path)
    st.unlink()
    with pytest.raises(CompactError, match="missing"):
        load_compact(tmp_path)


def test_unsupported_models_are_refused():
    with pytest.raises(CompactError, match=r"nn\.Sequential"):
        compact_mlp(nn.Conv2d(1, 2, 3), 0.1)
    with pytest.raises(CompactError, match="LayerNorm"):
        compact_mlp(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1)), 0.1)
    with pytest.raises(CompactError, match="unknown choice"):
        compact_mlp(MLP([2, 3, 1]), 0.1, choose="sparse")


def test_everything_dead_gives_constant_outputs():
    m = MLP([3, 4, 2]).double()
    small = compact_mlp(m, 10.0, choose="dense")
    x = torch.randn(5, 3, dtype=torch.float64)
    assert len(small.layers) == 0
    assert verify(thresholded_copy(m, 10.0), small, x) <= 1e-12


def test_cli_compress_threshold_writes_report(tmp_path):
    from typer.testing import CliRunner

    from topotorch.cli import app
    from topotorch.training import TrainConfig, train

    run = tmp_path / "run"
    train(
        TrainConfig.for_task(
            "independence", steps=300, lam="0:3e-2", animation=False, progress=False, out=str(run), log_every=100
        )
    )
    res = CliRunner().invoke(app, ["compress", str(run), "--threshold", "0.05"])
    assert res.exit_code == 0, res.output
    assert "parameters" in res.output and "framework overhead" in res.output
    rep = json.loads((run / "compact" / "report.json").read_text())
    assert rep["max_abs_diff"] <= 1e-5 and rep["threshold"] == 0.05
    assert rep["params_after"] < rep["params_before"]
    assert set(rep["speed"]) == {"1", "256", "4096"}
    assert rep["test_mse_compact"] == pytest.approx(rep["test_mse_thresholded"], rel=1e-4)
    small = load_compact(run / "compact")
    assert small(torch.zeros(2, 4)).shape == (2, 2)
    bad = CliRunner().invoke(app, ["compress", str(run), "--threshold", "0.05", "--removed", "0.5"])
    assert bad.exit_code == 2 and "mutually exclusive" in bad.output


def test_compress_run_of_a_transformer_goes_through_shrink(tmp_path):
    """A GPT run (wrapped by its task) is shrunk through its coupling graph and saved loadable."""
    from topotorch.compression.shrink import load_shrunk, shrink
    from topotorch.experiments.compress import compress_run
    from topotorch.training import TrainConfig, load_run, train

    run = tmp_path / "mat"
    train(TrainConfig.for_task("modular-addition-transformer", steps=30, animation=False, progress=False, out=str(run)))
    rep = compress_run(run, threshold=0.05, batch_sizes=(1, 64), budget_s=0.05)
    assert rep["via"] == "topotorch.compression.shrink" and rep["max_abs_diff"] <= 1e-5
    small = load_shrunk(run / "compact")
    r = load_run(run)
    fresh = shrink(r.model, r.graph, 0.05).model
    x = r.data.x_test[:32]
    with torch.no_grad():
        assert sum(p.numel() for p in small.parameters()) == rep["params_after"]
        assert torch.equal(small(x), fresh(x))


def test_threshold_rule_is_applied_in_the_weights_dtype():
    """float32(0.1) > 0.1 in float64 but <= 0.1 in float32: thresholded_copy zeroes it, so must compact_mlp."""
    m = MLP([2, 3, 1], activation="relu")
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0.5], [0.1, 0.7], [0.3, 0.2]]))
        m[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0]]))
    x = torch.randn(16, 2)
    small = compact_mlp(m, 0.1, choose="dense")
    assert small.nonzeros() - int((small.layers[0].bias != 0).sum() + (small.layers[1].bias != 0).sum()) == 8
    assert verify(thresholded_copy(m, 0.1), small, x) <= 1e-6


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_batch(fmt):
    for m, x in ((token_net(), torch.zeros(0, 2, dtype=torch.long)), (planted(torch.float32), torch.zeros(0, 6))):
        small = compact_mlp(m, 0.1, choose=fmt)
        assert small(x).shape == m(x).shape
        assert verify(thresholded_copy(m, 0.1), small, x) == 0.0


def test_bad_example_or_batch_sizes_are_named():
    m = MLP([6, 8, 3])
    with pytest.raises(CompactError, match=r"example must be a non-empty \(batch, 6\)"):
        compact_mlp(m, 0.0, example=torch.zeros(0, 6))
    with pytest.raises(CompactError, match=r"got shape \(5, 7\)"):
        compact_mlp(m, 0.0, example=torch.zeros(5, 7))
    with pytest.raises(CompactError, match="batch_sizes must be positive"):
        compact_mlp(m, 0.0, batch_sizes=(0, 4))


def test_block_output_order_follows_the_layer_to_another_device():
    from topotorch.compression.compact import BlockLayer

    w = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    layer = BlockLayer.build(
        w,
        torch.zeros(2),
        "identity",
        modules=[(torch.tensor([1]), torch.tensor([0])), (torch.tensor([0]), torch.tensor([1]))],
    )
    assert layer._mode == "select"
    x = torch.randn(4, 2)
    assert torch.allclose(layer(x), x @ w.t())
    assert layer.to("meta")._select.device.type == "meta"  # not left behind on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", [*FORMATS, "auto"])
def test_cuda_model_gives_a_cuda_compact_model(fmt):
    for m, x in ((planted(torch.float32), torch.randn(20, 6)), (token_net(torch.float32), torch.randint(7, (20, 2)))):
        m, x = m.cuda(), x.cuda()
        small = compact_mlp(m, 0.1, choose=fmt, example=x, batch_sizes=[20], reps=1)
        assert small(x).device.type == "cuda"
        assert verify(thresholded_copy(m, 0.1), small, x) <= 1e-5


def test_many_modules_skip_the_block_format_but_stay_exact():
    """One hidden layer: every hidden neuron is its own module; blocks of one neuron are not built."""
    from topotorch.compression.compact import MAX_BLOCK_MODULES

    torch.manual_seed(0)
    net = MLP([6, 3 * MAX_BLOCK_MODULES, 4]).double()
    x = torch.randn(50, 6, dtype=torch.float64)
    small = compact_mlp(net, 0.0, example=x, batch_sizes=(8,))
    assert "block" not in small.description["layers"][0]["seconds_per_sample"]
    assert len(small.description["modules"]) == 3 * MAX_BLOCK_MODULES
    for fmt in FORMATS:
        assert verify(thresholded_copy(net, 0.0), compact_mlp(net, 0.0, choose=fmt), x) <= 1e-12
