"""``topotorch sae`` with a topographic sheet: --sheet, --relocate, --tau, on a tiny language model.

The relocation is a permutation of latents, so the relocated run's saved coder must compute what the
un-relocated one (same seed, same steps) computes, to rounding in float64; the run records the
neighbour / shuffled ratios before and after; bad options fail before anything is written.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tests.sae.tiny_run import tiny_text_run
from topotorch.cli import app
from topotorch.sae.dictionary import SparseCoder

TINY = ["--hook", "blocks.0", "--latents", "64", "--k", "4", "--steps", "12", "--batch-size", "256"]
TINY += ["--eval-windows", "8", "--show-latents", "2", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A `topotorch train` run folder of a tiny model (TinyGPT, d_model 16) on a small word corpus."""
    return tiny_text_run(tmp_path_factory.mktemp("topo"))


def sae_cli(run, out, *extra):
    return CliRunner().invoke(app, ["sae", str(run), *TINY, "--out", str(out), *extra])


def test_relocated_coder_computes_what_the_trained_one_did(run, tmp_path):
    plain = sae_cli(run, tmp_path / "plain", "--sheet", "4x16")
    assert plain.exit_code == 0, plain.output
    moved = sae_cli(run, tmp_path / "moved", "--sheet", "4x16", "--relocate")
    assert moved.exit_code == 0, moved.output
    assert "neighbours / shuffled" in moved.output and "output change" in moved.output

    a, b = SparseCoder.load(tmp_path / "plain" / "sae"), SparseCoder.load(tmp_path / "moved" / "sae")
    # the same latents, reordered: each decoder row of the moved coder is exactly one of the plain coder's
    perm = torch.cdist(b.W_dec.double(), a.W_dec.double()).argmin(1)
    assert sorted(perm.tolist()) == list(range(64)) and bool((perm != torch.arange(64)).any())
    for name in ("W_enc", "b_enc", "W_dec", "threshold"):
        assert torch.equal(getattr(b, name), getattr(a, name)[perm]), name
    assert torch.equal(b.b_dec, a.b_dec)
    x = torch.randn(200, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    a64, b64 = a.double(), b.double()
    a64._pre_buffer = b64._pre_buffer = None
    with torch.no_grad():
        torch.testing.assert_close(b64(x), a64(x), rtol=0, atol=1e-12)

    topo = json.loads((tmp_path / "moved" / "summary.json").read_text())["topographic"]
    assert topo["sheet"] == [4, 16] and topo["relocated"] is True and topo["tau"] == 0.0
    assert topo["relocation"]["output_change_float64"] <= 1e-12
    assert topo["relocation"]["adjacency_after"] > topo["relocation"]["adjacency_before"]
    for when in ("before_relocation", "measures"):
        for key in ("decoder", "coactivation", "coactivation_pearson"):
            m = topo[when][key]
            assert m["pairs"] > 0 and m["excess"] == pytest.approx(m["neighbour"] - m["baseline"], abs=2e-6)
            if m["baseline"] > 0:
                assert m["ratio"] == pytest.approx(m["neighbour"] / m["baseline"], rel=1e-4)
            else:  # Pearson's all-pairs mean can be <= 0: no ratio (strict JSON null, not NaN)
                assert m["ratio"] is None
    # the plain run measures the same coder in slot order: its ratios are the moved run's "before"
    plain_topo = json.loads((tmp_path / "plain" / "summary.json").read_text())["topographic"]
    assert plain_topo["measures"] == topo["before_relocation"] and "relocation" not in plain_topo
    assert topo["measures"]["decoder"]["ratio"] > topo["before_relocation"]["decoder"]["ratio"]

    from topotorch.report import build_report

    page = build_report(tmp_path / "moved").read_text()
    assert "Topographic sheet" in page and "4×16" in page and "co-activation" in page


def test_tau_trains_through_train_topographic_with_a_mid_run_move(run, tmp_path):
    res = sae_cli(run, tmp_path / "tau", "--tau", "0.05", "--relocate")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "tau" / "summary.json").read_text())
    topo = summary["topographic"]
    assert topo["sheet"] == [8, 8] and topo["tau"] == 0.05  # the divisor rule's sheet for 64 latents
    assert [r["step"] for r in topo["mid_run_relocations"]] == [3]  # a quarter of 12 steps
    assert topo["relocation"]["output_change_float64"] <= 1e-12
    assert json.loads((tmp_path / "tau" / "config.json").read_text())["tau"] == 0.05
    # no topographic option: no sheet measures (the run is the plain one)
    plain = sae_cli(run, tmp_path / "plain")
    assert plain.exit_code == 0 and "topographic" not in json.loads((tmp_path / "plain" / "summary.json").read_text())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sheet", "5x10"], "sheet shape 5x10 holds 50 units but the layer has 64"),
        (["--sheet", "8by8"], "bad sheet shape '8by8': expected 'HxW'"),
        (["--tau", "-0.1"], "--tau must be a finite number >= 0, got -0.1"),
        (["--tau", "nan", "--relocate"], "--tau must be a finite number >= 0, got nan"),
    ],
)
def test_bad_topographic_options_fail_before_anything_is_written(run, tmp_path, extra, message):
    res = sae_cli(run, tmp_path / "x", *extra)
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.startswith("error:")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
def test_k_is_the_target_l0_of_the_threshold_architectures(run, tmp_path, architecture):
    # JumpReLU and ReLU + L1 have no k: `--k` becomes their target L0, steered by the controller
    res = sae_cli(run, tmp_path / architecture, "--architecture", architecture, "--steps", "80")
    assert res.exit_code == 0, res.output
    sae = SparseCoder.load(tmp_path / architecture / "sae")
    assert sae.cfg.target_l0 == 4.0
    l0 = json.loads((tmp_path / architecture / "summary.json").read_text())["eval"]["l0"]
    assert 2.0 <= l0 <= 8.0, l0
