"""Sparse coders (topotorch.sae): kernels against dense autograd, exact permutations and files, training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from topotorch.sae import SAEConfig, SparseCoder, selected_encode, sparse_decode, topk_encode
from topotorch.sae.dictionary import JumpReLUFn, StepFn
from topotorch.sae.metrics import evaluate_sae, fvu, relative_reconstruction_bias
from topotorch.sae.synthetic import SyntheticFeatures, mcc
from topotorch.sae.train import SAETrainer, geometric_median, lr_at, train_sae

ARCHS = ["topk", "batchtopk", "jumprelu", "relu"]
D = torch.float64


def _coder(arch: str, transcoder: bool = False, skip: bool = False, seed: int = 0) -> SparseCoder:
    cfg = SAEConfig(d_in=12, n_latents=40, k=4, architecture=arch, d_out=10 if transcoder else None, skip=skip)
    sae = SparseCoder(cfg, dtype=D, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases, θ and skip so that every folded term is exercised
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=g, dtype=D))
        sae.b_dec.copy_(0.3 * torch.randn(sae.b_dec.shape, generator=g, dtype=D))
        if arch in ("jumprelu", "batchtopk"):
            sae.threshold.copy_(0.2 + 0.1 * torch.rand(sae.threshold.shape, generator=g, dtype=D))
        if sae.W_skip is not None:
            sae.W_skip.copy_(0.1 * torch.randn(sae.W_skip.shape, generator=g, dtype=D))
    return sae


def _x(n: int = 32, d: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=D)


# ----------------------------------------------------------------------------- kernels vs dense autograd


def test_topk_kernels_match_dense_autograd_float64():
    torch.manual_seed(0)
    B, d, n, k, d_out = 16, 8, 30, 5, 6
    x = torch.randn(B, d, dtype=D, requires_grad=True)
    W_enc = torch.randn(n, d, dtype=D, requires_grad=True)
    b_enc = torch.randn(n, dtype=D, requires_grad=True)
    W_dec = torch.randn(n, d_out, dtype=D, requires_grad=True)
    target = torch.randn(B, d_out, dtype=D)

    v, i, _ = topk_encode(x, W_enc, b_enc, k)
    loss_fast = (sparse_decode(v, i, W_dec) - target).pow(3).sum()  # a non-quadratic loss: any upstream gradient
    grads_fast = torch.autograd.grad(loss_fast, (x, W_enc, b_enc, W_dec))

    pre = x @ W_enc.t() + b_enc
    top = pre.topk(k, dim=-1)
    z = torch.zeros(B, n, dtype=D).scatter(1, top.indices, F.relu(top.values))
    loss_dense = (z @ W_dec - target).pow(3).sum()
    grads_dense = torch.autograd.grad(loss_dense, (x, W_enc, b_enc, W_dec))
    assert torch.equal(i.sort(1).values, top.indices.sort(1).values)
    assert abs(float((loss_fast - loss_dense).detach())) < 1e-10
    for a, b in zip(grads_fast, grads_dense):
        assert (a - b).abs().max() < 1e-10


def test_selected_encode_and_decode_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(5, 4, dtype=D, requires_grad=True)
    W = torch.randn(9, 4, dtype=D, requires_grad=True)
    b = torch.randn(9, dtype=D, requires_grad=True)
    idx = torch.stack([torch.randperm(9)[:3] for _ in range(5)])
    pre = (x @ W.t() + b).detach()
    # keep every chosen pre-activation away from the ReLU kink so finite differences are valid
    assert pre.gather(1, idx).abs().min() > 1e-3
    torch.autograd.gradcheck(
        lambda x_, W_, b_: selected_encode(x_, W_, b_, (x_ @ W_.t() + b_).detach(), idx), (x, W, b)
    )
    vals = torch.randn(5, 3, dtype=D, requires_grad=True)
    W_dec = torch.randn(9, 6, dtype=D, requires_grad=True)
    torch.autograd.gradcheck(lambda v_, W_: sparse_decode(v_, idx, W_), (vals, W_dec))


def _scale_free_aux(e: torch.Tensor, e_hat: torch.Tensor) -> torch.Tensor:
    """‖e − c·ê‖² with c = max(0, ⟨e, ê⟩/‖ê‖²) per row, c held constant (the default AuxK target)."""
    c = ((e * e_hat).sum(1) / (e_hat * e_hat).sum(1)).clamp(min=0).detach()
    return (e - c[:, None] * e_hat).pow(2).sum()


def test_sae_loss_with_auxk_matches_dense_reference():
    sae = _coder("topk")
    x = _x()
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    out = sae.loss(x, dead_mask=dead)
    out.loss.backward()
    fast = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]

    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_() for p in params)
    pre = (x - b_dec) @ W_enc.t() + b_enc
    top = pre.topk(4, dim=-1)
    z = torch.zeros(32, 40, dtype=D).scatter(1, top.indices, F.relu(top.values))
    e = x - (z @ W_dec + b_dec)
    tv = (x - x.mean(0)).pow(2).sum()
    masked = pre.masked_fill(~dead, float("-inf"))
    atop = masked.topk(sae.cfg.aux_k_effective, dim=-1)
    z_aux = torch.zeros(32, 40, dtype=D).scatter(1, atop.indices, F.relu(atop.values))
    aux = _scale_free_aux(e.detach(), z_aux @ W_dec) / tv
    loss = e.pow(2).sum() / tv + sae.cfg.aux_alpha * aux
    loss.backward()
    assert abs(float((out.loss - loss).detach())) < 1e-12 and abs(float((out.aux - aux).detach())) < 1e-12
    for a, p in zip(fast, (W_enc, b_enc, W_dec, b_dec)):
        assert (a - p.grad).abs().max() < 1e-10


def test_batchtopk_training_step_matches_dense_reference():
    # The BatchTopK check of issue 17 (its synthetic MCC trailed TopK): the training forward selects the B·k
    # largest pre-activations of the batch (never θ), AuxK sees the dead latents, and the gradients written
    # into kept .grad buffers by the trainer's path equal plain autograd on the dense formula.
    from topotorch.sae.kernels import accumulate_into_grad

    sae = _coder("batchtopk")
    with torch.no_grad():
        sae.threshold.fill_(5.0)  # a θ far off the batch threshold: training must not use it
    x = _x()
    dead = torch.zeros(40, dtype=torch.bool)
    dead[1::4] = True
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    for p in params:
        p.grad = torch.zeros_like(p)
    out = sae.loss(x, dead_mask=dead)
    with accumulate_into_grad():
        out.loss.backward()
    fast = [p.grad.clone() for p in params]

    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_() for p in params)
    pre = (x - b_dec) @ W_enc.t() + b_enc
    t = pre.detach().reshape(-1).topk(32 * 4).values.min()
    z = F.relu(pre) * (pre.detach() >= t)
    e = x - (z @ W_dec + b_dec)
    tv = (x - x.mean(0)).pow(2).sum()
    atop = pre.masked_fill(~dead, float("-inf")).topk(sae.cfg.aux_k_effective, dim=-1)
    z_aux = torch.zeros(32, 40, dtype=D).scatter(1, atop.indices, F.relu(atop.values))
    loss = e.pow(2).sum() / tv + sae.cfg.aux_alpha * _scale_free_aux(e.detach(), z_aux @ W_dec) / tv
    loss.backward()
    assert int((z != 0).sum()) == int((out.codes.values != 0).sum()) == 32 * 4
    assert abs(float((out.loss - loss).detach())) < 1e-12 and float(out.aux) > 0
    for a, p in zip(fast, (W_enc, b_enc, W_dec, b_dec)):
        assert (a - p.grad).abs().max() < 1e-10
    # θ moved towards the batch threshold by (1 − m), and inference with θ = t gives the batch's codes
    m = sae.cfg.threshold_momentum
    assert abs(float(sae.threshold[0]) - (m * 5.0 + (1 - m) * float(t))) < 1e-12
    with torch.no_grad():
        sae.threshold.fill_(float(t) - 1e-12)
    assert torch.equal(sae.encode(x) != 0, (z != 0))


def test_jumprelu_straight_through_estimator_hand_values():
    eps = 0.001
    z = torch.tensor([[0.5, 1.0, 1.0004, 0.9996, 2.0]], dtype=D, requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=D, requires_grad=True)
    f = JumpReLUFn.apply(z, theta, eps)
    assert f.tolist() == [[0.0, 0.0, 1.0004, 0.0, 2.0]]
    f.sum().backward()
    # ∂f/∂z = H(z − θ); ∂f/∂θ = −(θ/ε)·K((z − θ)/ε), K = 1{|u| < ½}: |u| = 500, 0, 0.4, 0.4, 1000
    assert z.grad.tolist() == [[0.0, 0.0, 1.0, 0.0, 1.0]]
    assert torch.allclose(theta.grad, torch.tensor([0.0, -1000.0, -1000.0, -1000.0, 0.0], dtype=D), rtol=0, atol=1e-9)
    theta.grad = None
    z.grad = None
    h = StepFn.apply(z, theta * 2, eps)  # θ' = 2θ: ∂H/∂θ' = −(1/ε)K; chain rule ×2
    h.sum().backward()
    assert h.tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0]] and z.grad.abs().sum() == 0
    assert torch.allclose(theta.grad, torch.tensor([0.0, 0.0, 0.0, 0.0, -2000.0], dtype=D), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- exact structure and files


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip"])
def test_permute_latents_exact(arch, kind):
    sae = _coder(arch, transcoder=kind != "sae", skip=kind == "skip")
    x = _x()
    before, z = sae(x), sae.encode(x)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    sae.permute_latents(perm)
    assert (sae(x) - before).abs().max() < 1e-12
    assert (sae.encode(x) - z[:, perm]).abs().max() < 1e-12
    with pytest.raises(ValueError, match="permutation"):
        sae.permute_latents(torch.zeros(40, dtype=torch.long))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip"])
def test_save_load_round_trip_and_folded_normalisation(tmp_path, arch, kind):
    sae = _coder(arch, transcoder=kind != "sae", skip=kind == "skip")
    x = _x() * 7.0
    sae.save(tmp_path / "plain")
    back = SparseCoder.load(tmp_path / "plain")
    for k, v in sae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert torch.equal(back(x), sae(x))
    # a coder trained on x/s_in -> y/s_out, saved: the file works on raw x and gives s_out · f(x / s_in)
    s_in, s_out = (3.5, 3.5) if kind == "sae" else (3.5, 0.25)
    sae.data_scale = (s_in, s_out)
    expect = s_out * sae(x / s_in)
    sae.save(tmp_path / "folded")
    raw = SparseCoder.load(tmp_path / "folded")
    assert (raw(x) - expect).abs().max() < 1e-12 * expect.abs().max()
    assert (raw.W_dec.norm(dim=1) - 1).abs().max() < 1e-12  # latents absorb the scale, decoder rows stay unit
    sae.fold_data_scale_()
    assert sae.data_scale == (1.0, 1.0) and (sae(x) - expect).abs().max() < 1e-12 * expect.abs().max()


def test_load_rejects_bad_files(tmp_path):
    sae = _coder("topk")
    sae.save(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    cfg["n_latents"] = 41
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"has shape .* cfg.json implies"):
        SparseCoder.load(tmp_path / "a")
    sae.save(tmp_path / "b")
    data = (tmp_path / "b" / "weights.safetensors").read_bytes()
    (tmp_path / "b" / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable"):
        SparseCoder.load(tmp_path / "b")
    with pytest.raises(ValueError, match=r"missing cfg\.json"):
        SparseCoder.load(tmp_path / "nothing")


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown architecture 'gated'"):
        SAEConfig(d_in=8, n_latents=16, architecture="gated")
    with pytest.raises(ValueError, match="k=32 must be <= n_latents=16"):
        SAEConfig(d_in=8, n_latents=16)
    with pytest.raises(ValueError, match="skip=True needs a transcoder"):
        SAEConfig(d_in=8, n_latents=16, k=4, skip=True)
    with pytest.raises(ValueError, match="aux_alpha"):
        SAEConfig(d_in=8, n_latents=16, k=4, aux_alpha=-1.0)
    with pytest.raises(ValueError, match="d_in must be an int"):
        SAEConfig(d_in=0, n_latents=16, k=4)
    with pytest.raises(ValueError, match="unknown keys"):
        SAEConfig.from_dict({"d_in": 8, "n_latents": 16, "k": 4, "colour": "red"})
    sae = SparseCoder(SAEConfig(d_in=8, n_latents=16, k=4))
    with pytest.raises(ValueError, match="expects d_in=8"):
        sae(torch.randn(3, 9))


# ----------------------------------------------------------------------------- BatchTopK θ


def test_batchtopk_keeps_batch_budget_and_uses_threshold_at_inference():
    sae = SparseCoder(
        SAEConfig(d_in=12, n_latents=40, k=4, architecture="batchtopk", threshold_momentum=0.5), dtype=D, seed=0
    )
    x = _x()
    out = sae.loss(x)
    pre = ((x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc).detach()
    smallest_kept = pre.reshape(-1).topk(32 * 4).values.min()
    assert int((out.codes.values != 0).sum()) == 32 * 4  # B·k entries over the whole batch
    assert float(sae.threshold[0]) == float(smallest_kept)  # first batch sets θ
    sae.loss(x)  # θ ← m θ + (1 − m) t with the same t: unchanged
    assert abs(float(sae.threshold[0]) - float(smallest_kept)) < 1e-12
    with torch.no_grad():
        sae.threshold.fill_(0.7)
    z = sae.encode(x)
    assert torch.equal(z, pre * (pre > 0.7))  # inference: the threshold, not the batch
    assert torch.equal(sae(x), z @ sae.W_dec + sae.b_dec)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_reduces_fvu(arch):
    gen = SyntheticFeatures.make("easy", seed=0, d=16, n_features=32, active=3.0)
    data, test = gen.batches(128, 4), gen.batches(256, 1)
    cfg = SAEConfig(d_in=16, n_latents=64, k=4, architecture=arch, l1_coeff=1e-3, l0_coeff=1e-4)
    untrained = evaluate_sae(SparseCoder(cfg, seed=0), test)["fvu"]
    sae, hist = train_sae(cfg, data, steps=40, lr=1e-2, log_every=10)
    after = evaluate_sae(sae, test)["fvu"]
    assert after < 0.7 * untrained and hist["fvu"][-1] < hist["fvu"][0]
    assert len(hist["dead"]) == 4 and hist["steps_done"] == 40


def test_transcoder_trains_on_pairs_and_decoder_rows_stay_unit():
    torch.manual_seed(0)
    A = torch.randn(16, 8)
    data = [(x, 5.0 * torch.relu(x @ A)) for x in [torch.randn(128, 16) for _ in range(4)]]
    cfg = SAEConfig(d_in=16, n_latents=48, k=6, d_out=8, skip=True)
    sae, hist = train_sae(cfg, data, steps=40, lr=1e-2, log_every=20)
    assert hist["fvu"][-1] < hist["fvu"][0]
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() < 1e-5
    assert evaluate_sae(sae, data)["fvu"] < 0.9


def test_parallel_gradient_removed_and_trainer_permutation_keeps_adam_state():
    sae = _coder("topk")
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-12
    a, b = _coder("topk"), _coder("topk")
    ta, tb = SAETrainer(a, 1e-2, 10, warmup=0), SAETrainer(b, 1e-2, 10, warmup=0)
    x = _x()
    ta.step(x), tb.step(x)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    tb.permute_latents(perm)
    ta.step(x), tb.step(x)
    assert (b.W_dec - a.W_dec[perm]).abs().max() < 1e-10 and (b.W_enc - a.W_enc[perm]).abs().max() < 1e-10


def test_geometric_median_and_lr_schedule():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]], dtype=D)
    m = geometric_median(pts, iters=500, tol=1e-12)
    # the median ignores the outlier: it lies near the three clustered points, unlike the mean (25.25, 25.25)
    assert m.norm() < 1.0
    dist = lambda p: (pts - p).norm(dim=1).sum()  # noqa: E731
    for dp in ([1e-3, 0], [0, 1e-3], [-1e-3, 0], [0, -1e-3]):
        assert dist(m) <= dist(m + torch.tensor(dp, dtype=D)) + 1e-12
    assert lr_at(0, 100, 1.0, 10, "linear") == 0.1 and lr_at(9, 100, 1.0, 10, "linear") == 1.0
    assert lr_at(100, 100, 1.0, 10, "cosine") == 0.0 and lr_at(55, 100, 1.0, 10, "linear") == 0.5
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(50, 100, 1.0, 10, "step")


# ----------------------------------------------------------------------------- metrics and synthetic


def test_evaluate_sae_pools_over_batches():
    sae = _coder("topk")
    x = _x(64)
    whole = evaluate_sae(sae, [x])
    parts = evaluate_sae(sae, [x[:20], x[20:50], x[50:]])
    for k in ("fvu", "l0", "cosine", "relative_reconstruction_bias", "dead"):
        assert abs(whole[k] - parts[k]) < 1e-12, k
    assert abs(whole["fvu"] - fvu(x, sae(x))) < 1e-12
    assert abs(whole["relative_reconstruction_bias"] - relative_reconstruction_bias(x, sae(x))) < 1e-12
    assert abs(whole["l0"] - 4.0) < 1e-12
    # γ x̂ with γ = 1/2 (shrunk): RRB = Σ‖γx̂‖² / Σ⟨x, γx̂⟩ scales by γ
    assert abs(relative_reconstruction_bias(x, 0.5 * sae(x)) - 0.5 * whole["relative_reconstruction_bias"]) < 1e-12


def test_mcc_of_true_features_is_one_and_synthetic_rates():
    gen = SyntheticFeatures.make("easy", seed=0)
    perm = torch.randperm(gen.n_features)
    assert abs(mcc(gen.features, gen.features) - 1.0) < 1e-12
    assert abs(mcc(torch.cat([gen.features[perm], torch.randn(10, gen.d)]), gen.features) - 1.0) < 1e-12
    assert mcc(torch.randn(300, gen.d), gen.features) < 0.6
    codes = gen.sample_codes(4000)
    assert abs(float((codes != 0).sum(1).float().mean()) - 8.0) < 0.3
    hard = SyntheticFeatures.make("hard", seed=0)
    assert hard.sample(10).shape == (10, 64) and hard.n_features == 512
    with pytest.raises(ValueError, match="unknown setting"):
        SyntheticFeatures.make("medium")


def test_in_place_gradient_accumulation_matches_autograd():
    from topotorch.sae.kernels import accumulate_into_grad

    a, b = _coder("topk"), _coder("topk")
    x = _x()
    dead = torch.arange(40) % 2 == 0
    a.loss(x, dead_mask=dead).loss.backward()
    for p in b.parameters():
        p.grad = torch.full_like(p, 0.5)  # existing gradients are added to, as autograd does
    with accumulate_into_grad():
        b.loss(x, dead_mask=dead).loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad + 0.5 - pb.grad).abs().max() < 1e-12, name
