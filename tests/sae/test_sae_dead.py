"""Dead latents (issue 17): lazy Adam rows and the scale-free AuxK target, the two defaults that keep a TopK
coder's latents alive on a low-rank stream (see topotorch/sae/train.py and SparseCoder._auxk)."""

from __future__ import annotations

import torch

from topotorch.sae import SAEConfig, SparseCoder
from topotorch.sae.train import SAETrainer, train_sae

D = torch.float64


def _coder(seed: int = 0, **kw) -> SparseCoder:
    sae = SparseCoder(SAEConfig(d_in=12, n_latents=40, k=4, **kw), dtype=D, seed=seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(40, generator=torch.Generator().manual_seed(seed + 1), dtype=D))
    return sae


def _x(n: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(seed), dtype=D)


def _aux_reference(sae: SparseCoder, x: torch.Tensor, dead: torch.Tensor, e: torch.Tensor) -> float:
    """Token by token in float64: ê_t from the k_aux largest dead pre-activations (ReLU), then
    ‖e_t‖² − ⟨e_t, ê_t⟩²/‖ê_t‖² where ⟨e_t, ê_t⟩ > 0 (the least-squares fit c·ê_t), ‖e_t‖² elsewhere (c = 0)."""
    W_enc, b_enc, W_dec, b_dec = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    total = 0.0
    dead_ids = [j for j in range(len(dead)) if dead[j]]
    for t in range(x.shape[0]):
        pre = {j: float(W_enc[j] @ (x[t] - b_dec) + b_enc[j]) for j in dead_ids}
        chosen = sorted(dead_ids, key=lambda j: -pre[j])[: sae.cfg.aux_k_effective]
        e_hat = sum(max(pre[j], 0.0) * W_dec[j] for j in chosen)
        dot, sq = float(e[t] @ e_hat), float(e_hat @ e_hat)
        total += float(e[t] @ e[t]) - (dot * dot / sq if dot > 0 and sq > 0 else 0.0)
    return total


def test_scale_free_auxk_matches_a_float64_token_loop_and_ignores_the_size_of_e_hat():
    sae = _coder()
    x, e = _x(), 0.05 * _x(seed=4)  # a small residual, as on a well-fit stream
    dead = torch.arange(40) % 3 == 0
    pre = sae.pre_acts(x).detach()
    aux = float(sae._auxk(sae._x_in(x), pre, dead, e).detach())
    assert abs(aux - _aux_reference(sae, x, dead, e)) < 1e-12 * max(1.0, aux)
    # ê → 3ê (dead encoder rows and biases × 3): the same top-k_aux set, and the scale-free loss does not move;
    # plain AuxK (c = 1) does, because it asks ê to match the residual's size
    plain = _coder(aux_scale_free=False)
    before = float(plain._auxk(plain._x_in(x), plain.pre_acts(x).detach(), dead, e).detach())
    with torch.no_grad():
        for s in (sae, plain):
            s.W_enc[dead] *= 3
            s.b_enc[dead] *= 3
    with torch.no_grad():
        aux3 = float(sae._auxk(sae._x_in(x), sae.pre_acts(x), dead, e))
        after = float(plain._auxk(plain._x_in(x), plain.pre_acts(x), dead, e))
    assert abs(aux3 - aux) < 1e-12 * max(1.0, aux)
    assert after > 2 * before


def test_auxk_gradient_reaches_only_dead_rows():
    sae = _coder()
    x, e = _x(), 0.05 * _x(seed=4)
    dead = torch.arange(40) % 3 == 0
    sae._auxk(sae._x_in(x), sae.pre_acts(x).detach(), dead, e).backward()
    for p in (sae.W_enc, sae.b_enc, sae.W_dec):
        g = p.grad.reshape(40, -1)
        assert torch.equal(g[~dead], torch.zeros_like(g[~dead]))
        assert bool((g[dead] != 0).any())


def _two_steps(lazy: bool) -> tuple[SparseCoder, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Step 1 on one batch, step 2 on a batch where only some latents fire; returns the weights before step 2,
    and which latents fired in steps 1 and 2 (AuxK off, so a row has a gradient iff its latent fired)."""
    sae = _coder(aux_alpha=0.0, lazy_updates=lazy)
    tr = SAETrainer(sae, lr=1e-2, steps=10, warmup=0, schedule="constant")
    fired1 = tr.step(_x(32)).fired
    before = [p.detach().clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec)]
    fired2 = tr.step(_x(2, seed=5)).fired  # 2 tokens × k = 4: at most 8 of the 40 latents fire
    return sae, before, fired1, fired2


def test_lazy_updates_freeze_rows_without_a_gradient_and_plain_adam_moves_them():
    sae, before, fired1, fired2 = _two_steps(lazy=True)
    idle = fired1 & ~fired2  # moments from step 1, no gradient in step 2
    assert int(idle.sum()) >= 10 and bool(fired2.any())
    for p, old in zip((sae.W_enc, sae.b_enc), before):
        assert torch.equal(p.detach()[idle], old[idle])  # the rows that decide firing: not moved by momentum
        assert bool((p.detach()[fired2] != old[fired2]).any())  # the firing rows still learn
    assert bool((sae.W_dec.detach()[idle] != before[2][idle]).any())  # decoder rows: plain Adam (see train.py)
    eager, before_e, _, fired2_e = _two_steps(lazy=False)
    assert torch.equal(fired2_e, fired2)  # same first step either way
    assert bool((eager.b_enc.detach()[idle] != before_e[1][idle]).all())  # plain Adam: momentum moves every one


def _low_rank_stream(n_tok: int, seed: int = 0) -> torch.Tensor:
    """A 4-dimensional stream in 32 dimensions with a large mean (like a small model's residual stream)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(32, 4, generator=g))[0]
    z = torch.randn(n_tok, 4, generator=g) * torch.tensor([3.0, 2.0, 1.5, 1.0])
    return 5 * torch.randn(32, generator=g) + z @ basis.t() + 0.05 * torch.randn(n_tok, 32, generator=g)


def test_defaults_keep_latents_alive_on_a_low_rank_stream():
    torch.set_num_threads(1)
    steps, B = 200, 128  # measured: 174 of 256 latents never fire with the old rules, 10 with the defaults
    x = _low_rank_stream(steps * B)
    batches = [x[i : i + B] for i in range(0, len(x), B)]
    dead, fvu = {}, {}
    for name, kw in (("old", {"lazy_updates": False, "aux_scale_free": False}), ("new", {})):
        sae, _ = train_sae(SAEConfig(d_in=32, n_latents=256, k=8, **kw), batches, steps=steps, lr=5e-3)
        with torch.no_grad():
            dead[name] = int((~(sae.encode(x) != 0).any(0)).sum())  # never fires on any training token
            fvu[name] = float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert dead["new"] * 5 <= dead["old"], dead
    assert fvu["new"] <= 1.25 * fvu["old"], fvu  # measured 0.0254 vs 0.0227
