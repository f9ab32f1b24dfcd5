"""Ground-truth sparse features: data where the right dictionary is known, and a score for finding it (MCC).

Each token is x = Σ_i a_i m_i f_i: n_features unit directions f_i in R^d (n_features > d: the features
are in superposition), each active (a_i = 1) with probability p_i and magnitude m_i > 0. A sparse coder
that learned the data should have, for every true feature, a decoder row pointing along it. The score
is the **mean max cosine** with a one-to-one matching: the Hungarian assignment
(``scipy.optimize.linear_sum_assignment``) of true features to latents maximising Σ cos, averaged over
true features — 1 when every feature has its own latent exactly.

Settings (:data:`SETTINGS`):

* ``easy``: d = 64, 256 random features, each active with p = 8/256 (≈ 8 per token), magnitudes
  uniform in [0.5, 1.5], independent.
* ``hard``: d = 64, 512 features with power-law frequencies (p_i ∝ (i+1)^−0.7, ≈ 8 per token on
  average), log-normal magnitudes, activations correlated within groups of 8 (a shared Gaussian factor,
  ρ = 0.5, through a Gaussian copula), and every group's directions pulled towards a common direction
  (mutual cosine ≈ 0.3), so features are both co-occurring and geometrically entangled.

    >>> gen = SyntheticFeatures.make("easy", seed=0)
    >>> x = gen.sample(4096)  # [4096, 64]
    >>> mcc(sae.W_dec, gen.features)  # ≈ 1 for a coder that found them
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SETTINGS: dict[str, dict] = {
    "easy": {
        "d": 64,
        "n_features": 256,
        "active": 8.0,
        "power": 0.0,
        "magnitude": "uniform",
        "group": 1,
        "rho": 0.0,
        "group_cos": 0.0,
    },
    "hard": {
        "d": 64,
        "n_features": 512,
        "active": 8.0,
        "power": 0.7,
        "magnitude": "lognormal",
        "group": 8,
        "rho": 0.5,
        "group_cos": 0.3,
    },
}


@dataclass
class SyntheticFeatures:
    """A generator of tokens from known sparse features (see the module docstring).
    Usage: ``gen = SyntheticFeatures.make("easy", seed=0); x = gen.sample(1024)``."""

    features: Tensor  # [n_features, d], unit rows
    p: Tensor  # [n_features] activation probabilities
    magnitude: str  # "uniform" in [0.5, 1.5] or "lognormal" (median 1, σ 0.5)
    group: int  # features i // group share a correlation factor
    rho: float  # correlation of the shared factor
    seed: int = 0

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed + 1)

    @classmethod
    def make(cls, setting: str = "easy", seed: int = 0, **overrides) -> SyntheticFeatures:
        """Build a named setting (``easy``/``hard``), with keys of :data:`SETTINGS` overridable.
        Usage: ``SyntheticFeatures.make("hard", seed=1, d=32)``."""
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; known: {sorted(SETTINGS)}")
        s = {**SETTINGS[setting], **overrides}
        unknown = set(overrides) - set(SETTINGS[setting])
        if unknown:
            raise ValueError(f"unknown synthetic options {sorted(unknown)}; known: {sorted(SETTINGS[setting])}")
        d, n = int(s["d"]), int(s["n_features"])
        if n < 1 or d < 1 or not 0 < s["active"] <= n:
            raise ValueError(f"need d >= 1, n_features >= 1 and 0 < active <= n_features, got {s}")
        g = torch.Generator().manual_seed(seed)
        f = torch.randn(n, d, generator=g, dtype=torch.float64)
        f /= f.norm(dim=1, keepdim=True)
        group = max(1, int(s["group"]))
        if s["group_cos"] > 0:
            # pull each group towards a shared direction c: f ← √(1−a²)·f + a·c has cos ≈ a² with its group mates
            c = torch.randn(math.ceil(n / group), d, generator=g, dtype=torch.float64)
            c /= c.norm(dim=1, keepdim=True)
            a = math.sqrt(s["group_cos"])
            f = math.sqrt(1 - a * a) * f + a * c[torch.arange(n) // group]
            f /= f.norm(dim=1, keepdim=True)
        w = (torch.arange(n, dtype=torch.float64) + 1) ** -float(s["power"])
        p = (w * s["active"] / w.sum()).clamp(max=1.0)
        return cls(f.float(), p.float(), s["magnitude"], group, float(s["rho"]), seed)

    @property
    def d(self) -> int:
        return self.features.shape[1]

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    def sample_codes(self, n_tokens: int) -> Tensor:
        """True codes [n_tokens, n_features] (magnitudes where active, 0 elsewhere)."""
        n, g = self.n_features, self._gen
        if self.rho > 0:
            # Gaussian copula: u = Φ(√ρ·shared + √(1−ρ)·own); active when u < p (marginal stays p)
            shared = torch.randn(n_tokens, math.ceil(n / self.group), generator=g)[:, torch.arange(n) // self.group]
            own = torch.randn(n_tokens, n, generator=g)
            u = 0.5 * (1 + torch.erf((math.sqrt(self.rho) * shared + math.sqrt(1 - self.rho) * own) / math.sqrt(2)))
        else:
            u = torch.rand(n_tokens, n, generator=g)
        active = u < self.p
        if self.magnitude == "uniform":
            m = 0.5 + torch.rand(n_tokens, n, generator=g)
        elif self.magnitude == "lognormal":
            m = torch.exp(0.5 * torch.randn(n_tokens, n, generator=g))
        else:
            raise ValueError(f"unknown magnitude distribution {self.magnitude!r}")
        return m * active

    def sample(self, n_tokens: int) -> Tensor:
        """Tokens x = codes @ features: [n_tokens, d]. Usage: ``x = gen.sample(4096)``."""
        return self.sample_codes(n_tokens) @ self.features

    def batches(self, batch_size: int, n_batches: int) -> list[Tensor]:
        """A list of ``n_batches`` fresh batches (a list: train_sae cycles it)."""
        return [self.sample(batch_size) for _ in range(n_batches)]


def mcc(decoder: Tensor, true_features: Tensor) -> float:
    """Mean max cosine with one-to-one (Hungarian) matching of true features [m, d] to decoder rows [n, d]
    (n >= m; the rows of W_dec in our layout). Usage: ``mcc(sae.W_dec, gen.features)``."""
    from scipy.optimize import linear_sum_assignment

    D = torch.as_tensor(decoder).detach().double().cpu()
    T = torch.as_tensor(true_features).detach().double().cpu()
    if D.dim() != 2 or T.dim() != 2 or D.shape[1] != T.shape[1]:
        raise ValueError(
            f"decoder [n, d] and true features [m, d] must share d, got {tuple(D.shape)}, {tuple(T.shape)}"
        )
    if D.shape[0] < T.shape[0]:
        raise ValueError(f"need at least as many latents ({D.shape[0]}) as true features ({T.shape[0]})")
    D = D / D.norm(dim=1, keepdim=True).clamp(min=1e-300)
    T = T / T.norm(dim=1, keepdim=True).clamp(min=1e-300)
    cos = (T @ D.t()).numpy()
    rows, cols = linear_sum_assignment(-cos)
    return float(np.mean(cos[rows, cols]))
