"""Cortical sheets: the divisor rule, user shapes, feature vectors of Linear/Conv layers, name patterns."""

import warnings

import pytest
import torch
from torch import nn

from topotorch.models import TinyGPT
from topotorch.sheets import CorticalSheet, DegenerateSheetWarning, find_sheets, sheet_shape


@pytest.mark.parametrize(
    "n, hw", [(64, (8, 8)), (3072, (48, 64)), (100, (10, 10)), (512, (16, 32)), (12, (3, 4)), (1, (1, 1)), (2, (1, 2))]
)
def test_divisor_rule(n, hw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sheet_shape(n) == hw


def test_prime_count_warns_and_user_shapes():
    with pytest.warns(DegenerateSheetWarning, match="1x37"):
        assert sheet_shape(37) == (1, 37)
    assert sheet_shape(64, "4x16") == (4, 16)
    assert sheet_shape(64, (2, 32)) == (2, 32)
    with pytest.raises(ValueError, match="holds 63 units but the layer has 64"):
        sheet_shape(64, "7x9")
    with pytest.raises(ValueError, match="expected 'HxW'"):
        sheet_shape(64, "8by8")
    with pytest.raises(ValueError, match="positive"):
        sheet_shape(0)


def test_linear_features_are_rows_in_row_major_order():
    lin = nn.Linear(5, 12)
    s = CorticalSheet.of(lin)
    f = s.features()
    assert (s.h, s.w) == (3, 4) and f.shape == (3, 4, 5)
    i = 7  # unit i at (i // w, i % w)
    assert torch.equal(f[i // 4, i % 4], lin.weight[i])
    assert s.coordinates()[i].tolist() == [1, 3]
    fb = CorticalSheet.of(lin, bias=True).features()
    assert fb.shape == (3, 4, 6) and torch.equal(fb[1, 3, -1], lin.bias[7])
    with pytest.warns(DegenerateSheetWarning):  # 5 inputs: prime, 1x5
        fi = CorticalSheet.of(lin, side="input").features()
    assert fi.shape == (1, 5, 12) and torch.equal(fi[0, 2], lin.weight[:, 2])


def test_conv_features_and_gradients_flow():
    c2 = nn.Conv2d(3, 8, 3)
    f = CorticalSheet.of(c2).features()
    assert f.shape == (2, 4, 27) and torch.equal(f[1, 2], c2.weight[6].reshape(-1))
    c1 = nn.Conv1d(4, 6, 5)
    f1 = CorticalSheet.of(c1, shape="3x2").features()
    assert f1.shape == (3, 2, 20) and torch.equal(f1[2, 1], c1.weight[5].reshape(-1))
    fi = CorticalSheet.of(c2, side="input").features()
    assert fi.shape == (1, 3, 72) and torch.equal(fi[0, 1], c2.weight[:, 1].reshape(-1))
    f.sum().backward()
    assert c2.weight.grad is not None and torch.all(c2.weight.grad == 1)


def test_find_sheets_by_pattern():
    gpt = TinyGPT(vocab=11, d_model=16, n_layers=3, n_heads=2, d_mlp=64)
    sheets = find_sheets(gpt, "*.mlp.0")
    assert [s.name for s in sheets] == ["blocks.0.mlp.0", "blocks.1.mlp.0", "blocks.2.mlp.0"]
    assert all((s.h, s.w) == (8, 8) for s in sheets)
    both = find_sheets(gpt, "*.mlp.0, blocks.0.attn.qkv")
    assert len(both) == 4 and both[-1].name == "blocks.0.attn.qkv"
    with pytest.raises(ValueError, match=r"matches no Linear/Conv layer; layers: blocks.0.attn.qkv"):
        find_sheets(gpt, "*.c_fc")
    with pytest.raises(TypeError, match="LayerNorm"):
        CorticalSheet.of(gpt.blocks[0].ln1)
    with pytest.raises(ValueError, match="no bias"):
        CorticalSheet.of(nn.Linear(3, 4, bias=False), bias=True)


def test_hf_style_conv1d_is_a_sheet_of_its_output_units():
    """A class named Conv1D with ``nf`` and a (nx, nf) weight (Hugging Face GPT-2's) is found by patterns and
    laid out by its output dimension, dim 1 of the weight; a look-alike without ``nf`` is not."""
    from topotorch.sheets import find_sheets, is_hf_conv1d

    class Conv1D(nn.Module):
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D(64, 12)

    m = nn.ModuleDict({"h": nn.ModuleList([Block(), Block()])})
    sheets = find_sheets(m, "h.*.c_fc")
    assert [s.name for s in sheets] == ["h.0.c_fc", "h.1.c_fc"]
    s = sheets[0]
    assert (s.h, s.w, s.feature_dim) == (8, 8, 12)
    w = s.module.weight
    torch.testing.assert_close(s.features(), w.T.reshape(8, 8, 12))
    inp = CorticalSheet.of(s.module, side="input")
    assert inp.units == 12 and inp.feature_dim == 64
    torch.testing.assert_close(CorticalSheet.of(s.module, bias=True).features()[..., -1], s.module.bias.reshape(8, 8))
    fake = Conv1D(64, 12)
    del fake.nf
    assert is_hf_conv1d(s.module) and not is_hf_conv1d(fake)
