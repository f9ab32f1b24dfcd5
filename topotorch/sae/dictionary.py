"""Sparse coders: SAEs and (skip-)transcoders with TopK, BatchTopK, JumpReLU and ReLU + L1 latents.

A sparse coder writes a vector x ∈ R^d_in as a few non-negative latents z ∈ R^n (n ≫ d) and reads
back ŷ = W_decᵀ z + b_dec (+ W_skip x). For an *SAE* ŷ approximates x itself and the encoder sees the
centred input x − b_dec; a *transcoder* (``d_out`` set, even equal to ``d_in``) predicts a block's output
from its input, so nothing is subtracted; a *skip-transcoder* adds a dense linear path W_skip x.

The architectures differ only in how pre-activations ``pre = W_enc x' + b_enc`` become sparse codes
(the registry :data:`ARCHITECTURES`):

* ``topk`` (Gao et al. 2024): the k largest ReLU pre-activations per token. AuxK (on by default,
  α = 1/32): the residual e = y − ŷ is also reconstructed from the ``aux_k`` (d_out/2) largest
  pre-activations of *dead* latents only, so their encoder rows get a gradient again; the target is
  scale-free (ê rescaled per token by its least-squares factor, :meth:`SparseCoder._auxk`).
* ``batchtopk``: the B·k largest entries of the B×n matrix (tokens share a budget); at inference a
  single threshold θ, a running average (10-batch horizon) of the smallest kept value, replaces the batch.
* ``jumprelu`` (Rajamanoharan et al. 2024): f = z·H(z − θ) with a learned θ per latent; θ learns
  through a straight-through estimator with a rectangle kernel of bandwidth ε (:class:`JumpReLUFn`,
  :class:`StepFn`). Scale-free defaults: θ starts at the first batch's quantile where L0 = the target, ε = θ/10;
  penalty λ·L0 or, for a target L0*, λ·L0/L0* with λ from a controller (below).
* ``relu``: ReLU + λ·L1 (weighted by decoder row norms, scale-free: divided by the input's RMS norm); with a
  target L0 the same controller sets λ.

``SAEConfig(architecture="jumprelu" | "relu", target_l0=16)`` lands near L0 16 on any stream with the default
options: the controller (:func:`controller_update`, run by :meth:`Architecture.after_step` after each step).

The data layout is sparsify's: one row per latent in both ``W_enc`` [n, d_in] and ``W_dec`` [n, d_out],
so decoding k latents is an ``embedding_bag`` over k rows of W_dec (:mod:`topotorch.sae.kernels`).

Inputs are normalised in training (x/s with E‖x/s‖² = d_in); :meth:`SparseCoder.fold_data_scale_`
rescales W_enc, b_enc, θ, b_dec and W_skip so the same coder works on raw x (decoder rows stay unit
norm; the latents absorb the scale), and :meth:`SparseCoder.save` always writes the folded weights.

    >>> sae = SparseCoder(SAEConfig(d_in=768, n_latents=12288, k=32))
    >>> out = sae.loss(x)  # training forward: out.loss, out.fvu, out.fired, ...
    >>> x_hat = sae(x)  # inference (BatchTopK uses θ)
    >>> sae.save("run/sae")
    ... sae2 = SparseCoder.load("run/sae")
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topotorch.sae.kernels import pre_activations, selected_encode, sparse_decode, topk_encode

FORMAT = "topotorch.sae/1"


@dataclass
class SAEConfig:
    """What a sparse coder is. Validated on construction (a bad value raises ``ValueError`` naming it).

    ``d_out=None`` makes an SAE (target = input); any ``d_out`` (even = d_in) makes a transcoder.
    ``aux_k=None`` → d_out // 2 capped at n_latents; ``aux_alpha=0`` turns AuxK off;
    ``dead_tokens=None`` → train_sae picks min(10M, tokens of the run / 10); ``aux_scale_free=False`` restores
    Gao's AuxK target (see :meth:`SparseCoder._auxk`); ``lazy_updates=False`` restores plain Adam on the rows
    of latents without a gradient (see :mod:`topotorch.sae.train`).
    Usage: ``SAEConfig(d_in=768, n_latents=12288, architecture="topk", k=32)``."""

    d_in: int
    n_latents: int
    architecture: str = "topk"
    k: int = 32
    d_out: int | None = None
    skip: bool = False
    # AuxK (topk, batchtopk)
    aux_k: int | None = None
    aux_alpha: float = 1.0 / 32
    dead_tokens: int | None = None
    aux_scale_free: bool = True
    # training: rows of latents without a gradient this step keep their values (see topotorch.sae.train)
    lazy_updates: bool = True
    # BatchTopK: θ ← m θ + (1 − m) · (smallest kept value of the batch). A short horizon (1/(1 − m) = 10
    # batches): the batch value is a quantile of B·n entries (little noise), but it drifts while the encoder
    # learns, and a long average lags it (m = 0.99 on a 200-step run: θ 2.7× the final weights' value, L0 9.4 / 16)
    threshold_momentum: float = 0.9
    # JumpReLU. threshold_init=None: θ = the quantile of the first training batch's pre-activations at
    # which its L0 = target_l0 (or k), one value for every latent; bandwidth=None: ε_j = relative_bandwidth · θ_j
    bandwidth: float | None = None
    relative_bandwidth: float = 0.1
    threshold_init: float | None = None
    l0_coeff: float = 1e-3
    # JumpReLU and ReLU + L1: a target L0 turns the coefficient (l0_coeff / l1_coeff: its start) into the
    # output of a controller that steers the training L0 to it (log λ += controller_gain · log(L0 / target))
    target_l0: float | None = None
    controller_gain: float = 0.2
    # ReLU + L1
    l1_coeff: float = 1e-3

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"SAEConfig: {what}")

        for name in ("d_in", "n_latents", "k"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        need(
            self.architecture in ARCHITECTURES,
            f"unknown architecture {self.architecture!r}; known: {sorted(ARCHITECTURES)}",
        )
        if ARCHITECTURES[self.architecture].uses_k:
            need(self.k <= self.n_latents, f"k={self.k} must be <= n_latents={self.n_latents}")
        need(
            self.d_out is None or (isinstance(self.d_out, int) and self.d_out >= 1),
            f"d_out must be None (an SAE) or an int >= 1, got {self.d_out!r}",
        )
        need(not self.skip or self.d_out is not None, "skip=True needs a transcoder: set d_out (it may equal d_in)")
        need(
            self.aux_k is None or (isinstance(self.aux_k, int) and self.aux_k >= 1),
            f"aux_k must be None or an int >= 1, got {self.aux_k!r}",
        )
        need(self.aux_alpha >= 0 and math.isfinite(self.aux_alpha), f"aux_alpha must be >= 0, got {self.aux_alpha}")
        need(
            self.dead_tokens is None or (isinstance(self.dead_tokens, int) and self.dead_tokens >= 1),
            f"dead_tokens must be None or an int >= 1, got {self.dead_tokens!r}",
        )
        need(0 <= self.threshold_momentum < 1, f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}")
        need(
            self.bandwidth is None or self.bandwidth > 0,
            f"bandwidth (JumpReLU ε) must be None or > 0, got {self.bandwidth}",
        )
        need(self.relative_bandwidth > 0, f"relative_bandwidth must be > 0, got {self.relative_bandwidth}")
        need(
            self.threshold_init is None or self.threshold_init > 0,
            f"threshold_init must be None (from the data) or > 0, got {self.threshold_init}",
        )
        need(self.controller_gain >= 0, f"controller_gain must be >= 0, got {self.controller_gain}")
        need(self.l0_coeff >= 0, f"l0_coeff must be >= 0, got {self.l0_coeff}")
        need(self.target_l0 is None or self.target_l0 > 0, f"target_l0 must be None or > 0, got {self.target_l0}")
        need(self.l1_coeff >= 0, f"l1_coeff must be >= 0, got {self.l1_coeff}")

    @property
    def out_dim(self) -> int:
        """Width of the output: d_out for a transcoder, d_in for an SAE."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def transcoder(self) -> bool:
        """True when the coder predicts another vector (``d_out`` set): no b_dec subtraction on the input."""
        return self.d_out is not None

    @property
    def aux_k_effective(self) -> int:
        """k_aux: ``aux_k`` or d_out // 2, capped at n_latents (and at least 1)."""
        return max(1, min(self.aux_k if self.aux_k is not None else self.out_dim // 2, self.n_latents))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Build from a dict (e.g. cfg.json); unknown keys raise. Usage: ``SAEConfig.from_dict(json.load(f))``."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"SAEConfig: unknown keys {extra}; known: {sorted(known)}")
        return cls(**d)


# --------------------------------------------------------------------------- JumpReLU straight-through estimator


def _rect(u: Tensor) -> Tensor:
    """Rectangle kernel K(u) = 1{|u| < ½}."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """f = z·H(z − θ). ∂f/∂z = H(z − θ); ∂f/∂θ = −(θ/ε)·K((z − θ)/ε) (BRIEF §5, rectangle kernel K).
    ε is a number or a per-latent tensor [n] (the scale-free default ε_j = ρ·θ_j)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float | Tensor) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = g * (z > theta).to(z.dtype)
        grad_theta = (g * (-(theta / eps) * _rect((z - theta) / eps))).sum(0)
        return grad_z, grad_theta, None


class StepFn(torch.autograd.Function):
    """H(z − θ). No gradient to z; ∂H/∂θ = −(1/ε)·K((z − θ)/ε) (BRIEF §5): the L0 penalty's estimator."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float | Tensor) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = (g * (-(1.0 / eps) * _rect((z - theta) / eps))).sum(0)
        return torch.zeros_like(z), grad_theta, None


# --------------------------------------------------------------------------- architectures


class Codes(NamedTuple):
    """Sparse codes of a batch: either ``(values [B, m], indices [B, m])`` (zeros allowed as padding) or
    ``dense`` [B, n]. ``pre`` holds the raw pre-activations (no gradient) when they were computed."""

    values: Tensor | None = None
    indices: Tensor | None = None
    dense: Tensor | None = None
    pre: Tensor | None = None


class Architecture:
    """How pre-activations become codes (one entry of :data:`ARCHITECTURES`).

    ``train_codes`` is the differentiable training path (may update buffers, e.g. BatchTopK's θ);
    ``infer_codes`` is inference; ``penalty`` adds the sparsity term to the loss; ``uses_auxk`` says
    whether AuxK applies; ``after_step`` runs after each optimiser step of :class:`SAETrainer` (a
    controller's update, a data-driven initialisation); ``controlled`` coders carry a
    ``sparsity_control`` buffer (see :func:`controller_update`)."""

    name = ""
    uses_k = False
    uses_auxk = False
    controlled = False
    coeff_field = ""  # the SAEConfig field holding the sparsity coefficient (a controlled λ's start)

    def after_step(self, sae: SparseCoder, out: SAEOutput) -> None:
        """Per-step control after the optimiser step (``out``: that step's training forward). Default: nothing."""

    def train_codes(self, sae: SparseCoder, x_in: Tensor) -> Codes:
        raise NotImplementedError

    def infer_codes(self, sae: SparseCoder, x_in: Tensor) -> Codes:
        return self.train_codes(sae, x_in)

    def penalty(self, sae: SparseCoder, codes: Codes, x_in: Tensor, tv_per_token: Tensor) -> Tensor:
        return x_in.new_zeros(())


class TopK(Architecture):
    name, uses_k, uses_auxk = "topk", True, True

    def train_codes(self, sae, x_in):
        v, i, pre = topk_encode(x_in, sae.W_enc, sae.b_enc, sae.cfg.k, out=sae._workspace(x_in.shape[0]))
        return Codes(v, i, None, pre)


class BatchTopK(Architecture):
    name, uses_k, uses_auxk = "batchtopk", True, True

    def train_codes(self, sae, x_in):
        pre = pre_activations(x_in, sae.W_enc, sae.b_enc, out=sae._workspace(x_in.shape[0]))
        B = pre.shape[0]
        kept = min(B * sae.cfg.k, pre.numel())
        with torch.no_grad():
            t = pre.reshape(-1).topk(kept, sorted=False).values.min()  # smallest kept value
            positive_t = t.clamp(min=0)
            width = int((pre >= t).sum(1).max().clamp(min=1))
            raw, indices = pre.topk(width, dim=-1, sorted=False)
            keep = raw >= t
            # θ: running average of the smallest kept value (first batch sets it)
            th = sae.threshold
            if th.numel() and float(th[0]) < 0:
                th.fill_(float(positive_t))
            else:
                m = sae.cfg.threshold_momentum
                th.mul_(m).add_((1 - m) * positive_t)
        values = selected_encode(x_in, sae.W_enc, sae.b_enc, pre, indices) * keep
        return Codes(values, indices, None, pre)

    def infer_codes(self, sae, x_in):
        pre = pre_activations(x_in, sae.W_enc, sae.b_enc)
        theta = sae.threshold.clamp(min=0)
        return Codes(dense=pre * (pre > theta), pre=pre)


# ---- the sparsity controller (JumpReLU and ReLU + L1 with a target L0)
#
# A fixed coefficient λ lands at an L0 that depends on the stream (the FVU's slope per active latent: the same
# λ gave L0 0.2 on the GPT stream and 8 on the synthetic one), so target_l0 makes λ the multiplier of the
# constraint L0 = L0*: dual ascent on log λ (the integral term) plus a proportional term, on the scale-free
# error e = log(L0 / L0*). Adam moves every weight at a bounded pace whatever λ is (in the lr warm-up barely at
# all), so L0 follows λ with a long lag: a pure integral winds up, overshoots and kills latents (measured: λ
# 1e-3 → 157 in 60 warm-up steps, then L0 3 of a target 8 with FVU 1.05). Hence (1) no integration while the
# error already shrinks, (2) both arches start at the target (θ, or b_enc for ReLU, from the first batch's
# quantile), and (3) JumpReLU's proportional action goes straight to the thresholds, θ ← θ·exp(0.1·e) (raised
# only for latents that fired in the batch), which L0 follows within a step (λ alone left JumpReLU's L0
# swinging 4 → 35 → 6 on the synthetic stream).
# State ``sparsity_control`` (float32 [3], saved with the coder): [log λ_I, last e, steps];
# λ = exp(log λ_I + K_p·e).

PROPORTIONAL_GAIN = 1.0  # K_p on log λ
THRESHOLD_GAIN = 0.1  # JumpReLU: log θ += THRESHOLD_GAIN · e per step


def control_coeff(sae: SparseCoder, fixed: float) -> Tensor | float:
    """The sparsity coefficient in use: ``fixed`` without a target L0, else the controller's λ."""
    if sae.cfg.target_l0 is None:
        return fixed
    c = sae.sparsity_control
    return torch.exp(c[0] + PROPORTIONAL_GAIN * c[1])


@torch.no_grad()
def controller_update(sae: SparseCoder, l0: Tensor) -> None:
    """One controller step from the batch's L0: e = log(L0 / L0*) (clamped to ±3), log λ_I += gain · e.
    No-op without a target. Usage: ``controller_update(sae, out.l0)``."""
    c = sae.sparsity_control
    if sae.cfg.target_l0 is not None:
        e = (l0.to(c.dtype).clamp(min=0.1) / sae.cfg.target_l0).log().clamp(-3.0, 3.0)
        # anti-windup: no integration while the error already shrinks (Adam moves the weights at a bounded
        # pace, in the lr warm-up barely at all; a λ grown meanwhile overshoots and kills latents)
        shrinking = (e.abs() < c[1].abs()) & (e * c[1] > 0) & (c[2] > 0)
        c[0] += torch.where(shrinking, 0.0, sae.cfg.controller_gain * e)
        c[1] = e
    c[2] += 1


def quantile_threshold(pre: Tensor, l0: float) -> Tensor:
    """One θ for every latent: the (B·l0)-th largest entry of the batch's pre-activations [B, n], so the batch's
    L0 is l0 (BatchTopK's threshold). Usage: ``quantile_threshold(pre, 16)``."""
    m = min(pre.numel(), max(1, round(pre.shape[0] * l0)))
    return pre.reshape(-1).topk(m, sorted=False).values.min()


def _fresh(sae: SparseCoder, t: Tensor) -> bool:
    """No controlled step yet and ``t`` still one value for every latent (as constructed): a coder loaded from a
    file without the controller's state (older files, SAELens) keeps its trained θ / b_enc."""
    return int(sae.sparsity_control[2]) == 0 and bool((t == t[0]).all())


def jumprelu_bandwidth(sae: SparseCoder) -> float | Tensor:
    """ε: ``cfg.bandwidth`` when set, else ρ·θ_j (scale-free: the window is a fixed fraction of each threshold)."""
    if sae.cfg.bandwidth is not None:
        return sae.cfg.bandwidth
    return (sae.cfg.relative_bandwidth * sae.threshold.detach()).clamp(min=1e-12)


class JumpReLU(Architecture):
    """θ from the data (:func:`quantile_threshold` of the first training batch at L0 = target_l0 or k, unless
    ``threshold_init``), ε relative to θ (unless ``bandwidth``), penalty λ·L0 (fixed λ = ``l0_coeff``) or,
    with ``target_l0``, λ·L0/L0* with λ from the controller and θ rescaled toward the target each step."""

    name, controlled, coeff_field = "jumprelu", True, "l0_coeff"

    def train_codes(self, sae, x_in):
        z = F.linear(x_in, sae.W_enc, sae.b_enc)
        if sae.cfg.threshold_init is None and _fresh(sae, sae.threshold):
            # before the first step: θ where this batch's L0 is the target (the data's scale, not a guess in
            # its units; a first step at a dense θ would also fill Adam's second moments with a dense gradient)
            with torch.no_grad():
                th = quantile_threshold(z.detach(), sae.cfg.target_l0 or sae.cfg.k)
                sae.threshold.fill_(float(th.clamp(min=1e-6)))
        return Codes(dense=JumpReLUFn.apply(z, sae.threshold, jumprelu_bandwidth(sae)), pre=z)

    def infer_codes(self, sae, x_in):
        z = F.linear(x_in, sae.W_enc, sae.b_enc)
        return Codes(dense=z * (z > sae.threshold), pre=z)

    def penalty(self, sae, codes, x_in, tv_per_token):
        assert codes.pre is not None
        l0 = StepFn.apply(codes.pre, sae.threshold, jumprelu_bandwidth(sae)).sum(-1).mean()
        if sae.cfg.target_l0 is not None:
            return control_coeff(sae, sae.cfg.l0_coeff) * l0 / sae.cfg.target_l0
        return sae.cfg.l0_coeff * l0

    @torch.no_grad()
    def after_step(self, sae, out):
        controller_update(sae, out.l0)
        if sae.cfg.target_l0 is not None and THRESHOLD_GAIN > 0:
            # raise θ only where the latent fired (the ones making the excess), lower it everywhere: a uniform
            # raise pushed rarely-firing latents past all their pre-activations (synthetic easy: 86% silent → 11%)
            e = sae.sparsity_control[1]
            move = out.fired | (e < 0)
            factor = torch.where(move, torch.exp(THRESHOLD_GAIN * e), torch.ones((), dtype=e.dtype, device=e.device))
            sae.threshold.mul_(factor.to(sae.threshold.dtype))


class ReLU(Architecture):
    """ReLU + λ·L1: λ = ``l1_coeff``, or with ``target_l0`` the controller's λ (starting at ``l1_coeff``)."""

    name, controlled, coeff_field = "relu", True, "l1_coeff"

    def train_codes(self, sae, x_in):
        z = F.linear(x_in, sae.W_enc, sae.b_enc)
        if sae.cfg.target_l0 is not None and _fresh(sae, sae.b_enc):
            # before the first step: b_enc −= the threshold at which this batch's L0 is the target, so the
            # controller starts near it (from b_enc = 0 half the latents fire, and λ must first climb)
            with torch.no_grad():
                th = quantile_threshold(z.detach(), sae.cfg.target_l0)
                sae.b_enc.sub_(th)
                z = z - th
        return Codes(dense=F.relu(z), pre=z.detach())

    def penalty(self, sae, codes, x_in, tv_per_token):
        assert codes.dense is not None
        # λ · mean_b Σ_j z_bj ‖W_dec,j‖ / RMS‖y − ȳ‖: scale-free like the FVU it is added to
        l1 = (codes.dense @ sae.W_dec.norm(dim=1)).mean()
        return control_coeff(sae, sae.cfg.l1_coeff) * l1 / tv_per_token.clamp(min=1e-30).sqrt()

    def after_step(self, sae, out):
        # λ only: the L1 term acts on the codes' size, so L0 follows λ without JumpReLU's lag (the same
        # proportional action on −b_enc held L0 tighter but killed 89% of the latents on the synthetic stream)
        controller_update(sae, out.l0)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (TopK(), BatchTopK(), JumpReLU(), ReLU())}


def register_architecture(arch: Architecture) -> None:
    """Add an architecture to the registry (its ``name`` becomes a valid ``SAEConfig.architecture``).
    Usage: ``register_architecture(MyGated())``."""
    if not arch.name:
        raise ValueError("an architecture needs a non-empty name")
    ARCHITECTURES[arch.name] = arch


# --------------------------------------------------------------------------- the coder


class SAEOutput(NamedTuple):
    """Training forward of :meth:`SparseCoder.loss`. ``loss = fvu + aux_alpha·aux + sparsity``;
    ``fired`` [n] bool: latents with a non-zero code in this batch; ``l0``: mean non-zeros per token."""

    loss: Tensor
    fvu: Tensor
    aux: Tensor
    sparsity: Tensor
    y_hat: Tensor
    codes: Codes
    fired: Tensor
    l0: Tensor


class SparseCoder(nn.Module):
    """An SAE or (skip-)transcoder (see the module docstring). Parameters: ``W_enc`` [n, d_in], ``b_enc`` [n],
    ``W_dec`` [n, d_out] (unit-norm rows), ``b_dec`` [d_out], ``threshold`` [n] (JumpReLU: a trained
    parameter; BatchTopK: the inference θ, a buffer, −1 until the first training batch; others: zeros),
    ``W_skip`` [d_out, d_in] or None.
    Usage: ``sae = SparseCoder(SAEConfig(d_in=64, n_latents=512, k=8), seed=0)``."""

    sparsity_control: Tensor  # a buffer of controlled architectures (JumpReLU, ReLU): see controller_update

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SparseCoder needs an SAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.arch = ARCHITECTURES[cfg.architecture]
        n, d_in, d_out = cfg.n_latents, cfg.d_in, cfg.out_dim
        dtype = dtype or torch.get_default_dtype()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(n, d_out, generator=gen, dtype=dtype).to(device)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if cfg.transcoder:  # different spaces: an independent random encoder of the same scale
            W_enc = torch.randn(n, d_in, generator=gen, dtype=dtype).to(device)
            W_enc /= W_enc.norm(dim=1, keepdim=True)
        else:  # encoder = decoder transpose (Gao et al.)
            W_enc = W_dec.clone()
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        if cfg.architecture == "jumprelu":  # threshold_init=None: 0.001 until the first step sets θ from the data
            th0 = 0.001 if cfg.threshold_init is None else cfg.threshold_init
            self.threshold = nn.Parameter(torch.full((n,), th0, dtype=dtype, device=device))
        else:
            self.register_buffer(
                "threshold",
                torch.full((n,), -1.0 if cfg.architecture == "batchtopk" else 0.0, dtype=dtype, device=device),
            )
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=dtype, device=device)) if cfg.skip else None
        if self.arch.controlled:  # [log λ_I, last error, steps] (controller_update); λ starts at the config's
            c0 = [math.log(max(getattr(cfg, self.arch.coeff_field), 1e-30)), 0.0, 0.0]
            self.register_buffer("sparsity_control", torch.tensor(c0, dtype=torch.float32, device=device))
        # (s_in, s_out): the weights act on x/s_in and produce y/s_out (see fold_data_scale_)
        self.data_scale: tuple[float, float] = (1.0, 1.0)
        self._pre_buffer: Tensor | None = None

    def _workspace(self, B: int) -> Tensor:
        """A kept [B, n] buffer for the training pre-activations (a fresh one per step costs page faults).
        ``SAEOutput.codes.pre`` is this buffer: valid until the next :meth:`loss` call."""
        w = self.W_enc
        buf = self._pre_buffer
        if buf is None or buf.shape != (B, self.cfg.n_latents) or buf.dtype != w.dtype or buf.device != w.device:
            buf = self._pre_buffer = torch.empty(B, self.cfg.n_latents, dtype=w.dtype, device=w.device)
        return buf

    # ---- inference ---------------------------------------------------------------------------------------
    def _x_in(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"input has width {x.shape[-1]}, this coder expects d_in={self.cfg.d_in}")
        return x if self.cfg.transcoder else x - self.b_dec

    def pre_acts(self, x: Tensor) -> Tensor:
        """``W_enc (x − b_dec) + b_enc`` (no b_dec subtraction for a transcoder): [B, n]."""
        return F.linear(self._x_in(x), self.W_enc, self.b_enc)

    def _codes(self, x: Tensor) -> Codes:
        flat = x.reshape(-1, x.shape[-1])
        return self.arch.infer_codes(self, self._x_in(flat))

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [..., n] (inference behaviour). Usage: ``z = sae.encode(x)``."""
        c = self._codes(x)
        z = c.dense if c.dense is not None else _densify(c, self.cfg.n_latents)
        return z.reshape(*x.shape[:-1], self.cfg.n_latents)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(values [B, m], indices [B, m])``: m = k for TopK; for the others m = the largest count of
        non-zeros in a row, shorter rows padded with value 0. Usage: ``v, i = sae.encode_sparse(x)``."""
        c = self._codes(x)
        if c.values is not None:
            assert c.indices is not None
            return c.values, c.indices
        assert c.dense is not None
        m = max(1, int((c.dense != 0).sum(-1).max()))
        return c.dense.topk(m, dim=-1, sorted=False)

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """``Σ_j v_j W_dec[i_j] + b_dec`` (no skip path: it needs x) → [B, d_out]."""
        return sparse_decode(values, indices, self.W_dec) + self.b_dec

    def decode(self, z: Tensor) -> Tensor:
        """Dense codes [..., n] → [..., d_out] (``z @ W_dec + b_dec``)."""
        return z @ self.W_dec + self.b_dec

    def _decode_codes(self, c: Codes) -> Tensor:
        if c.dense is not None:
            return torch.addmm(self.b_dec, c.dense, self.W_dec)
        assert c.values is not None and c.indices is not None
        return sparse_decode(c.values, c.indices, self.W_dec) + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """ŷ [..., d_out] with inference behaviour (BatchTopK: the threshold θ, not the batch).
        Usage: ``x_hat = sae(x)``."""
        flat = x.reshape(-1, x.shape[-1])
        y = self._decode_codes(self._codes(flat))
        if self.W_skip is not None:
            y = y + flat @ self.W_skip.t()
        return y.reshape(*x.shape[:-1], self.cfg.out_dim)

    # ---- training ----------------------------------------------------------------------------------------
    def loss(self, x: Tensor, y: Tensor | None = None, dead_mask: Tensor | None = None) -> SAEOutput:
        """Training forward on a batch [B, d_in] (target ``y`` for a transcoder; defaults to x for an SAE).
        ``loss = FVU + aux_alpha · AuxK + sparsity penalty``, FVU = ‖y − ŷ‖² / ‖y − ȳ‖² over the batch;
        AuxK reconstructs the residual from the ``aux_k`` largest pre-activations of ``dead_mask`` latents.
        Usage: ``out = sae.loss(x, dead_mask=since_fired > dead_tokens); out.loss.backward()``."""
        if x.dim() != 2:
            raise ValueError(f"loss expects a batch [B, d_in], got shape {tuple(x.shape)}")
        if y is None:
            if self.cfg.transcoder:
                raise ValueError("a transcoder needs its target y (the block's output)")
            y = x
        if y.shape != (x.shape[0], self.cfg.out_dim):
            raise ValueError(f"target must be [{x.shape[0]}, {self.cfg.out_dim}], got {tuple(y.shape)}")
        x_in = self._x_in(x)
        codes = self.arch.train_codes(self, x_in)
        y_hat = self._decode_codes(codes)
        if self.W_skip is not None:
            y_hat = y_hat + x @ self.W_skip.t()
        e = y - y_hat
        tv = (y - y.mean(0)).pow(2).sum().clamp(min=torch.finfo(y.dtype).tiny)
        fvu = e.pow(2).sum() / tv
        aux = fvu.new_zeros(())
        if (
            self.arch.uses_auxk
            and dead_mask is not None
            and self.cfg.aux_alpha > 0
            and codes.pre is not None
            and bool(dead_mask.any())
        ):
            aux = self._auxk(x_in, codes.pre, dead_mask, e.detach()) / tv
        sparsity = self.arch.penalty(self, codes, x_in, tv / x.shape[0])
        loss = fvu + self.cfg.aux_alpha * aux + sparsity
        with torch.no_grad():
            if codes.dense is not None:
                nz = codes.dense != 0
                fired, l0 = nz.any(0), nz.sum(-1).to(y.dtype).mean()
            else:
                assert codes.values is not None and codes.indices is not None
                nzv = codes.values != 0
                fired = torch.zeros(self.cfg.n_latents, dtype=torch.bool, device=x.device)
                fired[codes.indices[nzv]] = True
                l0 = nzv.sum(-1).to(y.dtype).mean()
        return SAEOutput(loss, fvu, aux, sparsity, y_hat, codes, fired, l0)

    def _auxk(self, x_in: Tensor, pre: Tensor, dead_mask: Tensor, e: Tensor) -> Tensor:
        """‖e − c·ê‖² where ê decodes the k_aux largest pre-activations among dead latents (no b_dec: e already
        has it) and, with ``aux_scale_free`` (the default), c = max(0, ⟨e, ê⟩/‖ê‖²) per token, without gradient
        (c = 1 otherwise: Gao et al.'s and sparsify's AuxK). Gradients reach the dead latents' rows only.

        Why the factor: the dead latents' pre-activations need not be small (a latent dies by losing the top-k
        race, not by going negative), while on a well-fit stream the residual is. Plain AuxK then has ê
        overshoot e, and its gradient mostly *shrinks* every selected dead pre-activation, pushing them further
        from the top k: AuxK kills latents (shakespeare residual stream, 16x, lazy rows, AuxK with a 5,120-token
        dead window: 1,235 of 2,048 never fire on held-out tokens with plain AuxK at α = 1/32, 158 with the
        scale-free target at α = 1). With c the loss only asks ê to point at e: its gradient
        on a pre-activation is −2c⟨e − cê, w_j⟩, which raises the latents whose decoder rows point along the
        part of e that cê misses and lowers the others, whatever the sizes."""
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(self.cfg.aux_k_effective, dead.numel())
        with torch.no_grad():
            local = pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False).indices
            idx = dead[local]
        v = selected_encode(x_in, self.W_enc, self.b_enc, pre, idx)
        e_hat = sparse_decode(v, idx, self.W_dec)
        if self.cfg.aux_scale_free:
            with torch.no_grad():
                c = (e * e_hat).sum(1) / e_hat.pow(2).sum(1).clamp(min=torch.finfo(e.dtype).tiny)
            e_hat = e_hat * c.clamp(min=0).unsqueeze(1)
        return (e - e_hat).pow(2).sum()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale W_dec rows to unit norm (training keeps them there)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=torch.finfo(self.W_dec.dtype).tiny))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from W_dec.grad the component parallel to each (unit) row: the step then only rotates rows."""
        g = self.W_dec.grad
        if g is not None:  # g ← g − ⟨g, w⟩ w per row, without an n×d temporary
            g.addcmul_(self.W_dec, torch.einsum("ij,ij->i", g, self.W_dec).unsqueeze(1), value=-1.0)

    # ---- structure ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def permute_latents(self, perm: Tensor) -> None:
        """Reorder latents in place: new latent i is old latent ``perm[i]``. The output is unchanged
        (bit-exact: the same rows are summed, TopK ties aside). Usage: ``sae.permute_latents(order)``."""
        perm = torch.as_tensor(perm, dtype=torch.long, device=self.W_enc.device)
        n = self.cfg.n_latents
        if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n, device=perm.device)):
            raise ValueError(f"perm must be a permutation of range({n})")
        for t in (self.W_enc, self.b_enc, self.W_dec, self.threshold):
            t.copy_(t.index_select(0, perm))

    @torch.no_grad()
    def fold_data_scale_(self) -> None:
        """Make the weights act on raw data: with (s_in, s_out) = ``data_scale``, the coder f trained on
        x/s_in → y/s_out becomes f' with f'(x) = s_out · f(x / s_in) exactly in exact arithmetic:
        W_enc·s_out/s_in, b_enc·s_out, θ·s_out (the latents absorb s_out; W_dec rows stay unit norm),
        b_dec·s_out, W_skip·s_out/s_in. For an SAE s_in = s_out (the encoder reads x − b_dec)."""
        s_in, s_out = self.data_scale
        if (s_in, s_out) == (1.0, 1.0):
            return
        if not self.cfg.transcoder and s_in != s_out:
            raise ValueError(f"an SAE has one data scale, got s_in={s_in}, s_out={s_out}")
        self.W_enc.mul_(s_out / s_in)
        self.b_enc.mul_(s_out)
        if float(self.threshold.min()) >= 0:  # BatchTopK's −1 sentinel (no θ yet) stays
            self.threshold.mul_(s_out)
        self.b_dec.mul_(s_out)
        if self.W_skip is not None:
            self.W_skip.mul_(s_out / s_in)
        self.data_scale = (1.0, 1.0)

    # ---- files -------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``cfg.json`` + ``weights.safetensors`` (each atomically) with the data scale folded in, so the
        saved coder works on raw activations. Usage: ``sae.save(run / "sae")``."""
        from safetensors.torch import save as st_save

        from topotorch.checkpoint import atomic_write_bytes, atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = SparseCoder(self.cfg, dtype=self.W_enc.dtype, device="cpu")
        tmp.load_state_dict({k: v.detach().cpu() for k, v in self.state_dict().items()})
        tmp.data_scale = self.data_scale
        tmp.fold_data_scale_()
        tensors = {k: v.contiguous() for k, v in tmp.state_dict().items()}
        atomic_write_bytes(folder / "weights.safetensors", st_save(tensors, metadata={"format": FORMAT}))
        atomic_write_json(folder / "cfg.json", {"format": FORMAT, **self.cfg.to_dict()})
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str | None = None) -> SparseCoder:
        """Read a folder written by :meth:`save`; a missing file, unknown format, missing/extra key or wrong
        shape raises ``ValueError`` naming it. Usage: ``sae = SparseCoder.load(run / "sae")``."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path, w_path = folder / "cfg.json", folder / "weights.safetensors"
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise ValueError(f"{folder}: missing {p.name}")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from exc
        fmt = raw.pop("format", None)
        if fmt != FORMAT:
            raise ValueError(f"{cfg_path}: format {fmt!r}, expected {FORMAT!r}")
        cfg = SAEConfig.from_dict(raw)
        try:
            state = load_file(str(w_path))
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise ValueError(f"{w_path}: unreadable safetensors file ({exc})") from exc
        dtype = state["W_enc"].dtype if "W_enc" in state else None
        sae = cls(cfg, dtype=dtype)
        expect = sae.state_dict()
        if "sparsity_control" in expect and "sparsity_control" not in state:  # files from before the controller
            state["sparsity_control"] = expect["sparsity_control"]
        missing, extra = sorted(set(expect) - set(state)), sorted(set(state) - set(expect))
        if missing or extra:
            raise ValueError(f"{w_path}: missing keys {missing}, unexpected keys {extra}")
        for k, v in state.items():
            if v.shape != expect[k].shape:
                raise ValueError(f"{w_path}: {k} has shape {tuple(v.shape)}, cfg.json implies {tuple(expect[k].shape)}")
        sae.load_state_dict(state)
        return sae.to(device) if device is not None else sae


def _densify(c: Codes, n: int) -> Tensor:
    assert c.values is not None and c.indices is not None
    return torch.zeros(c.values.shape[0], n, dtype=c.values.dtype, device=c.values.device).scatter_add_(
        1, c.indices, c.values
    )
