"""Sparsity without per-stream calibration: JumpReLU and ReLU + L1 with ``target_l0`` land near it on streams of
very different scale with default options; BatchTopK's inference θ keeps ≈ k per token; the controller's state
is saved, loaded and unaffected by latent permutations."""

from __future__ import annotations

import math

import pytest
import torch

from topotorch.sae import SAEConfig, SparseCoder
from topotorch.sae.dictionary import controller_update, quantile_threshold
from topotorch.sae.metrics import evaluate_sae
from topotorch.sae.synthetic import SyntheticFeatures
from topotorch.sae.train import SAETrainer, train_sae


def _stream(kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two streams that differ in every scale: "unit" = synthetic sparse features (zero-centred, O(1));
    "offset" = the same ×1000 on top of a constant offset 20× their norm (like a residual stream's mean
    direction), so the centred signal is ~1/20 of the normalised input and raw values are ~10⁴."""
    gen = SyntheticFeatures.make("easy", seed=0, d=16, n_features=32, active=3.0)
    train, test = gen.batches(256, 8), gen.batches(1024, 1)
    if kind == "offset":
        u = torch.randn(16, generator=torch.Generator().manual_seed(5))
        off = 20.0 * u / u.norm() * float(torch.cat(train).norm(dim=1).mean())
        train, test = [1e3 * (x + off) for x in train], [1e3 * (x + off) for x in test]
    return train, test


@pytest.mark.parametrize("stream", ["unit", "offset"])
@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_target_l0_reached_with_default_options(arch, stream):
    train, test = _stream(stream)
    cfg = SAEConfig(d_in=16, n_latents=64, architecture=arch, target_l0=4.0)
    steps = 300 if arch == "relu" else 150  # ReLU's L0 follows λ alone (no proportional action): slower
    sae, hist = train_sae(cfg, train, steps=steps, lr=1e-2, log_every=50)
    ev = evaluate_sae(sae, test)
    assert abs(ev["l0"] / 4.0 - 1) < 0.25, (arch, stream, ev["l0"], hist["l0"])
    assert ev["fvu"] < 0.8


def test_batchtopk_inference_l0_matches_the_training_budget():
    train, test = _stream("offset")
    cfg = SAEConfig(d_in=16, n_latents=64, architecture="batchtopk", k=4)
    sae, hist = train_sae(cfg, train, steps=150, lr=1e-2, log_every=50)
    assert abs(hist["l0"][-1] - 4.0) < 1e-9  # training: exactly B·k per batch
    assert abs(evaluate_sae(sae, test)["l0"] / 4.0 - 1) < 0.15  # inference θ on held-out tokens


def test_controller_update_hand_values_and_anti_windup():
    sae = SparseCoder(SAEConfig(d_in=4, n_latents=8, architecture="relu", target_l0=2.0, l1_coeff=0.01))
    c = sae.sparsity_control
    assert torch.allclose(c, torch.tensor([math.log(0.01), 0.0, 0.0]))
    g = sae.cfg.controller_gain
    controller_update(sae, torch.tensor(8.0))  # e = log 4: integrate
    assert torch.allclose(c, torch.tensor([math.log(0.01) + g * math.log(4), math.log(4), 1.0]))
    controller_update(sae, torch.tensor(4.0))  # e = log 2, shrinking toward the target: hold the integral
    assert torch.allclose(c, torch.tensor([math.log(0.01) + g * math.log(4), math.log(2), 2.0]))
    controller_update(sae, torch.tensor(1.0))  # crossed the target: integrate again (down)
    assert torch.allclose(c, torch.tensor([math.log(0.01) + g * math.log(4) - g * math.log(2), -math.log(2), 3.0]))
    fixed = SparseCoder(SAEConfig(d_in=4, n_latents=8, architecture="relu", l1_coeff=0.01))
    controller_update(fixed, torch.tensor(8.0))  # no target: λ stays the config's, only steps count
    assert fixed.sparsity_control.tolist() == [pytest.approx(math.log(0.01)), 0.0, 1.0]
    assert float(quantile_threshold(torch.arange(12.0).reshape(3, 4), 2.0)) == 6.0  # 6 largest of 0..11


def test_jumprelu_starts_at_the_target_from_the_first_batch():
    train, _ = _stream("offset")
    x = train[0] / float(train[0].pow(2).sum(1).mean().div(16).sqrt())
    sae = SparseCoder(SAEConfig(d_in=16, n_latents=64, architecture="jumprelu", target_l0=4.0), seed=0)
    out = SAETrainer(sae, lr=1e-12, steps=10, warmup=0).step(x)  # θ set before the step's forward
    assert abs(float(out.l0) - 4.0) < 0.05 and float(sae.sparsity_control[2]) == 1.0
    assert torch.unique(sae.threshold).numel() == 1  # one data-driven θ for every latent, then learned


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_controller_state_saved_loaded_and_permutation_invariant(arch, tmp_path):
    train, test = _stream("offset")
    cfg = SAEConfig(d_in=16, n_latents=64, architecture=arch, target_l0=4.0)
    sae, _ = train_sae(cfg, train, steps=20, lr=1e-2, log_every=10)
    state = sae.sparsity_control.clone()
    assert float(state[2]) == 20.0 and float(state[0]) != math.log(cfg.l0_coeff if arch == "jumprelu" else 1e-3)
    back = SparseCoder.load(sae.save(tmp_path / "c"))
    assert torch.equal(back.sparsity_control, state) and torch.equal(back.threshold, sae.threshold)
    x = test[0][:64]
    assert torch.equal(back(x), sae(x))
    # continued training resumes the controller (no second data-driven initialisation)
    more, _ = train_sae(cfg, train, steps=5, lr=1e-2, sae=back)
    assert float(more.sparsity_control[2]) == 25.0
    # per-latent θ moves with its latent; the controller state is global
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    y = sae(x)
    sae.permute_latents(perm)
    assert torch.equal(sae.sparsity_control, state)
    assert torch.allclose(sae(x), y, rtol=1e-5, atol=1e-3)
    # a file written before the controller existed loads with a fresh state
    from safetensors.torch import load_file, save_file

    w = tmp_path / "c" / "weights.safetensors"
    old = load_file(str(w))
    del old["sparsity_control"]
    save_file(old, str(w), metadata={"format": "topotorch.sae/1"})
    assert float(SparseCoder.load(tmp_path / "c").sparsity_control[2]) == 0.0


def test_jumprelu_threshold_action_raises_only_fired_latents():
    from types import SimpleNamespace

    sae = SparseCoder(SAEConfig(d_in=4, n_latents=6, architecture="jumprelu", target_l0=2.0, threshold_init=1.0))
    fired = torch.tensor([True, False, True, False, False, False])
    sae.arch.after_step(sae, SimpleNamespace(l0=torch.tensor(8.0), fired=fired))  # L0 4× the target
    up = math.exp(0.1 * math.log(4.0))
    assert torch.allclose(sae.threshold, torch.where(fired, up, 1.0))  # silent latents keep θ
    sae.arch.after_step(sae, SimpleNamespace(l0=torch.tensor(1.0), fired=fired))  # below: lower every θ
    assert torch.allclose(sae.threshold, torch.where(fired, up, 1.0) * math.exp(0.1 * math.log(0.5)))


def test_loaded_coder_without_controller_state_keeps_its_thresholds():
    # a JumpReLU from a file without sparsity_control (SAELens, older files) has steps = 0 but trained,
    # distinct θ: continued training must not replace them by the first batch's quantile
    sae = SparseCoder(SAEConfig(d_in=16, n_latents=64, architecture="jumprelu", target_l0=4.0), seed=0)
    with torch.no_grad():
        sae.threshold.copy_(0.5 + torch.rand(64, generator=torch.Generator().manual_seed(0)))
    before = sae.threshold.clone()
    sae.loss(torch.randn(32, 16, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(sae.threshold, before)
