"""How good is a sparse coder: the numbers people report, in one pass over the data (:func:`evaluate_sae`).

With y the target (x for an SAE), ŷ the reconstruction, z the codes, over all N evaluation tokens:

* **FVU** = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² (ȳ the mean over all tokens); **explained variance** = 1 − FVU
  (the pooled definition; SAEBench averages a per-batch version, which differs only by batch means).
* **L0** = mean number of non-zero codes per token.
* **dead** = fraction of latents that never fire on the evaluation tokens; **dense** = fraction firing on
  more than ``dense_threshold`` of them (default 10%).
* **cosine** = mean over tokens of cos(y, ŷ).
* **relative reconstruction bias** (dictionary_learning's ``evaluation.py`` definition) =
  Σ‖ŷ‖² / Σ⟨y, ŷ⟩ = 1/γ* with γ* = argmin_γ Σ‖γŷ − y‖²: 1 is unbiased, < 1 means the coder shrinks
  its reconstructions (the L1 penalty does).

All sums are accumulated in float64 so the order of batches does not matter to 1e-12.

    >>> evaluate_sae(sae, batches)  # {'fvu': 0.08, 'explained_variance': 0.92, 'l0': 32.0, ...}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from topotorch.sae.dictionary import SparseCoder


def fvu(y: Tensor, y_hat: Tensor) -> float:
    """Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over the rows of one batch. Usage: ``fvu(x, sae(x))``."""
    y, y_hat = y.detach().double(), y_hat.detach().double()
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp(min=1e-300))


def explained_variance(y: Tensor, y_hat: Tensor) -> float:
    """1 − FVU. Usage: ``explained_variance(x, sae(x))``."""
    return 1.0 - fvu(y, y_hat)


def l0(z: Tensor) -> float:
    """Mean number of non-zero codes per row of dense codes z [B, n]. Usage: ``l0(sae.encode(x))``."""
    return float((z.detach() != 0).sum(-1).double().mean())


def cosine(y: Tensor, y_hat: Tensor) -> float:
    """Mean over rows of cos(y, ŷ). Usage: ``cosine(x, sae(x))``."""
    return float(torch.nn.functional.cosine_similarity(y.detach().double(), y_hat.detach().double(), dim=-1).mean())


def relative_reconstruction_bias(y: Tensor, y_hat: Tensor) -> float:
    """Σ‖ŷ‖² / Σ⟨y, ŷ⟩ (= 1/argmin_γ‖γŷ − y‖², dictionary_learning's definition). Usage: ``rrb(x, sae(x))``."""
    y, y_hat = y.detach().double(), y_hat.detach().double()
    return float(y_hat.pow(2).sum() / (y * y_hat).sum())


def dead_and_dense(counts: Tensor, n_tokens: int, dense_threshold: float = 0.1) -> tuple[float, float]:
    """From per-latent firing counts: (fraction never firing, fraction firing on > ``dense_threshold`` of tokens)."""
    return float((counts == 0).double().mean()), float((counts > dense_threshold * n_tokens).double().mean())


@torch.no_grad()
def evaluate_sae(
    sae: SparseCoder, batches: Iterable[Any], max_batches: int | None = None, dense_threshold: float = 0.1
) -> dict[str, Any]:
    """Every metric of the module docstring over ``batches`` (tensors [B, d_in], or (x, y) pairs for a
    transcoder), with the coder's inference behaviour. Returns a dict: fvu, explained_variance, l0, dead,
    dense, cosine, relative_reconstruction_bias, n_tokens, and ``freq`` (per-latent firing fraction, a list).
    Usage: ``evaluate_sae(sae, [x_test])["fvu"]``."""
    n = sae.cfg.n_latents
    dev = sae.W_enc.device
    counts = torch.zeros(n, dtype=torch.float64, device=dev)
    # float64 running sums, started at exact zeros (0 + x == x, so the first batch is taken as is)
    sum_y = torch.zeros(sae.cfg.out_dim, dtype=torch.float64, device=dev)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    sum_y2 = sum_e2 = sum_yh2 = sum_dot = sum_cos = sum_l0 = zero  # rebound (never updated in place) below
    N = 0
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(b, Tensor):
            x, y = b, b
        else:
            x, y = b
        x = x.to(dev, sae.W_enc.dtype)
        y = y.to(dev, sae.W_enc.dtype)
        z = sae.encode(x)
        y_hat = sae.decode(z)
        if sae.W_skip is not None:
            y_hat = y_hat + x @ sae.W_skip.t()
        yd, yhd = y.double(), y_hat.double()
        parts = (
            yd.sum(0),
            yd.pow(2).sum(),
            (yd - yhd).pow(2).sum(),
            yhd.pow(2).sum(),
            (yd * yhd).sum(),
            torch.nn.functional.cosine_similarity(yd, yhd, dim=-1).sum(),
            (z != 0).sum().double(),
        )
        sum_y, sum_y2, sum_e2, sum_yh2, sum_dot, sum_cos, sum_l0 = (
            a + p for a, p in zip((sum_y, sum_y2, sum_e2, sum_yh2, sum_dot, sum_cos, sum_l0), parts)
        )
        counts += (z != 0).sum(0).double()
        N += x.shape[0]
    if N == 0:
        raise ValueError("evaluate_sae: no batches")
    tv = sum_y2 - sum_y.pow(2).sum() / N  # Σ‖y − ȳ‖² = Σ‖y‖² − N‖ȳ‖²
    f = float(sum_e2 / tv.clamp(min=1e-300))
    dead, dense = dead_and_dense(counts, N, dense_threshold)
    return {
        "fvu": f,
        "explained_variance": 1.0 - f,
        "l0": float(sum_l0 / N),
        "dead": dead,
        "dense": dense,
        "cosine": float(sum_cos / N),
        "relative_reconstruction_bias": float(sum_yh2 / sum_dot),
        "n_tokens": N,
        "dense_threshold": dense_threshold,
        "freq": (counts / N).tolist(),
    }
