"""Topographic SAE: latents laid on an h×w sheet, so that neighbours mean related things.

No SAE library places its latents in space. Here latent i of an n-latent dictionary sits at row
``i // w``, column ``i % w`` of an h×w sheet (:func:`topotorch.sheets.sheet_shape`'s divisor rule by
default), exactly as TopoNets lays out a layer's units — so "where a latent is" is its index, and
moving latents is a permutation, which a sparse coder absorbs without any change to its output
(:meth:`SparseCoder.permute_latents`). Two ways to make the sheet meaningful:

**(a) Smoothness of the decoder (TopoLoss).** Row i of ``W_dec`` is latent i's direction, so
``W_dec`` viewed as (h, w, d) *is* a cortical sheet, and TopoNets' loss applies unchanged:
``L = 1 − mean_i cos(W_i, blur(W)_i)`` with ``blur = up(down(·, 1/φ))``
(:func:`topotorch.objectives.topoloss.sheet_loss`). Added as ``τ·L`` to the reconstruction loss it
pulls neighbouring directions together — at some cost in reconstruction, which is what
``benchmarks/sae_quality.py`` measures.

**(b) Relocation by co-activation (BIMT).** With a similarity S (n×n, ≥ 0: how often two latents
fire together, how parallel their decoder directions are) and a kernel K on the sheet (a Gaussian of
the grid distance, or the 4-neighbour adjacency), the placement score is the quadratic assignment

    F(π) = Σ_{i<j} S_ij K(π_i, π_j)          (π_i: the slot of latent i).

With latents in slot order and G = S K, F = ½ tr G, and swapping the latents of slots a and b changes F
by, in closed form,

    Δ_ab = G_ab + G_ba − G_aa − G_bb − S_ab (K_aa + K_bb − 2 K_ab),

so every one of the n² swaps is scored by one matrix product — BIMT's swap (each neuron against
every partner) without re-evaluating anything. Each round applies the mutually-best improving swaps
together (disjoint pairs; if their interaction made F worse, only the single best swap); a linear
assignment on G (``topotorch.relocation.assignment_permutation``: every latent moved to where its
partners are, the others held fixed) is tried first at each scale. K is separable over rows and
columns, so G costs O(n²(h + w)), not O(n³). Scales anneal from a broad Gaussian (global order)
down to the adjacency itself, whose F is exactly the numerator of the neighbour measure below. The global
order need not be built swap by swap: the smoothest eigenvectors of the normalised similarity (Laplacian
eigenmaps) already are 2-D coordinates of the latents, so a start laid out by them lets the schedule begin
at a narrower width (same score, ~35% less time).
At the adjacency, two moves are exact and larger than a swap: (i) on a set of slots no two of which are
neighbours (a checkerboard colour), a latent's contribution depends only on the latents off the set, so
F is *linear* in how the set's latents are arranged and one linear assignment finds the best of all n/2!
arrangements; (ii) swaps whose closed neighbourhoods are disjoint do not interact, so a batch of them
gains exactly the sum of their Δ. Alternating both over seven tilings ends well past the swaps' optimum.

**(c) Measures.** For unit vectors u_i per latent (decoder rows, or a latent's activations over a set
of tokens, normalised), the neighbour similarity is the mean of s_ij = |⟨u_i, u_j⟩| (decoder: sign does
not matter; co-activation: activations are ≥ 0, so s is the uncentred correlation, in [0, 1]) over
4-neighbour pairs of live latents, and the baseline is its mean over *all* pairs of live latents —
which is exactly the expectation of the neighbour mean when positions are shuffled uniformly
(every pair of slots is a neighbour pair with equal probability). The ratio neighbour / baseline is 1
in expectation for a random sheet; "≥ 3× baseline" is this ratio. The centred Pearson correlation of
co-activation is reported beside it (its all-pairs mean is ≈ 0 or negative — for TopK, Σ_j of the
indicator covariances of a latent is −its variance, since exactly k fire — so a ratio of it means
nothing; we give neighbour − baseline instead).

**(d) Pictures.** The sheet coloured by what activates each latent most (a class, a token, a
module), alpha by how pure that is (:func:`draw_latent_sheet`).

    >>> sheet = LatentSheet.of(sae.cfg.n_latents)
    >>> loss = recon + tau * decoder_topoloss(sae.W_dec, sheet, factor=3)  # (a), while training
    >>> stats = relocate(sae, codes, sheet)  # (b), any trained SAE
    >>> topographic_measures(sae, codes, sheet)["coactivation"].ratio  # (c)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from topotorch.objectives.topoloss import Mode, sheet_loss
from topotorch.relocation import assignment_permutation
from topotorch.sheets import sheet_shape

__all__ = [
    "LatentSheet",
    "NeighbourScore",
    "neighbour_score",
    "decoder_units",
    "coactivation_units",
    "topographic_measures",
    "decoder_topoloss",
    "placement_similarity",
    "solve_placement",
    "relocate",
    "train_topographic",
    "latent_labels",
    "draw_latent_sheet",
]


# ---- the sheet ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentSheet:
    """n = h·w latents on a grid: latent i at (i // w, i % w). Usage: ``LatentSheet.of(2048)`` -> 32×64."""

    h: int
    w: int

    @classmethod
    def of(cls, n: int, shape: tuple[int, int] | str | None = None) -> LatentSheet:
        """The sheet for ``n`` latents: the divisor rule (:func:`topotorch.sheets.sheet_shape`) or a given shape."""
        h, w = sheet_shape(n, shape)
        return cls(h, w)

    @property
    def n(self) -> int:
        return self.h * self.w

    def coordinates(self) -> Tensor:
        """(n, 2) integer (row, column) of every slot."""
        i = torch.arange(self.n)
        return torch.stack([i // self.w, i % self.w], 1)

    def neighbour_pairs(self) -> Tensor:
        """(P, 2) slot pairs (i < j) that are 4-neighbours: P = h(w−1) + (h−1)w."""
        idx = torch.arange(self.n).view(self.h, self.w)
        right = torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)], 1)
        down = torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)], 1)
        return torch.cat([right, down])

    def kernel_terms(self, sigma: float | None, dtype=torch.float64) -> list[tuple[Tensor, Tensor]]:
        """K as Σ_t Kh_t ⊗ Kw_t: a Gaussian exp(−d²/2σ²) (one term), or, with ``sigma=None``, the 4-neighbour
        adjacency (A_h ⊗ I + I ⊗ A_w)."""

        def axis(m: int) -> Tensor:
            return torch.arange(m, dtype=dtype)

        if sigma is None:

            def adj(m: int) -> Tensor:
                return ((axis(m)[:, None] - axis(m)[None, :]).abs() == 1).to(dtype)

            return [(adj(self.h), torch.eye(self.w, dtype=dtype)), (torch.eye(self.h, dtype=dtype), adj(self.w))]
        if not sigma > 0:
            raise ValueError(f"kernel width sigma must be > 0, got {sigma!r}")

        def gauss(m: int) -> Tensor:
            return torch.exp(-((axis(m)[:, None] - axis(m)[None, :]) ** 2) / (2 * sigma**2))

        return [(gauss(self.h), gauss(self.w))]


def _check_sheet(n: int, sheet: LatentSheet) -> None:
    if sheet.n != n:
        raise ValueError(f"the sheet {sheet.h}x{sheet.w} holds {sheet.n} latents but there are {n}")


# ---- (c) measures ------------------------------------------------------------------------------------------------


@dataclass
class NeighbourScore:
    """Mean similarity of 4-neighbour pairs vs all pairs (= the shuffled-position expectation), live latents only."""

    neighbour: float
    baseline: float
    ratio: float
    excess: float
    pairs: int
    live: int

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _unit_rows(u: Tensor) -> tuple[Tensor, Tensor]:
    """Rows scaled to unit norm, and which rows are non-zero (live)."""
    u = u.to(torch.float64)
    norm = u.norm(dim=1)
    live = norm > 0
    return u / norm.clamp_min(1e-300)[:, None], live


def decoder_units(W_dec: Tensor) -> Tensor:
    """Decoder directions (rows of ``W_dec``), unit-normalised: s_ij = |cos|. Usage: ``decoder_units(sae.W_dec)``."""
    return _unit_rows(W_dec.detach())[0]


def coactivation_units(codes: Tensor, centred: bool = False) -> Tensor:
    """Each latent's activations over the tokens (columns of ``codes`` [T, n]) as a unit vector per latent:
    ⟨u_i, u_j⟩ is the uncentred correlation (≥ 0 for non-negative codes), or Pearson's with ``centred``.
    Dead latents (never active) give zero rows. Usage: ``coactivation_units(sae.encode(x))``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [tokens, latents], got shape {tuple(codes.shape)}")
    c = codes.detach().to(torch.float64)
    active = (c != 0).any(0)
    if centred:
        c = c - c.mean(0)
    u = _unit_rows(c.t())[0]
    return u * active[:, None]


def _all_pairs_mean(u: Tensor, live: Tensor, absolute: bool, block: int = 2048) -> float:
    """Mean of s_ij over ordered pairs i ≠ j of live rows, blockwise (never an n×n matrix for large n)."""
    v = u[live]
    m = v.shape[0]
    if m < 2:
        return float("nan")
    if not absolute:  # Σ_{i≠j} ⟨u_i,u_j⟩ = ‖Σ u_i‖² − Σ ‖u_i‖²
        tot = v.sum(0).pow(2).sum() - v.pow(2).sum()
        return float(tot / (m * (m - 1)))
    tot = torch.zeros((), dtype=torch.float64)
    for lo in range(0, m, block):  # blocks of rows: memory O(block·m); the loop is over blocks, not latents
        g = (v[lo : lo + block] @ v.t()).abs()
        tot += g.sum() - g.diagonal(offset=lo).sum()
    return float(tot / (m * (m - 1)))


def neighbour_score(units: Tensor, sheet: LatentSheet, absolute: bool = False) -> NeighbourScore:
    """Neighbour vs shuffled-position similarity of per-latent unit vectors (rows of ``units``, in slot order).

    s_ij = ⟨u_i, u_j⟩ (or |⟨u_i, u_j⟩| with ``absolute``); zero rows are dead latents and are left out
    of both means. ``baseline`` is the mean over all pairs of live latents — the exact expectation of
    the neighbour mean under a uniformly random placement — so ``ratio`` is 1 in expectation there.
    Usage: ``neighbour_score(decoder_units(sae.W_dec), sheet, absolute=True).ratio``.
    """
    _check_sheet(units.shape[0], sheet)
    u, live = _unit_rows(units)
    pairs = sheet.neighbour_pairs()
    both = live[pairs[:, 0]] & live[pairs[:, 1]]
    p = pairs[both]
    s = (u[p[:, 0]] * u[p[:, 1]]).sum(1)
    s = s.abs() if absolute else s
    nb = float(s.mean()) if len(s) else float("nan")
    base = _all_pairs_mean(u, live, absolute)
    ratio = nb / base if base > 0 else float("nan")
    return NeighbourScore(nb, base, ratio, nb - base, len(p), int(live.sum()))


def topographic_measures(W_dec: Tensor, codes: Tensor, sheet: LatentSheet) -> dict[str, NeighbourScore]:
    """The three neighbour measures of a dictionary on its sheet, from its decoder and codes [T, n].

    ``decoder``: |cos| of decoder rows; ``coactivation``: uncentred correlation of activations;
    ``coactivation_pearson``: centred (use its ``excess``). Usage: ``topographic_measures(sae.W_dec, z, sheet)``.
    """
    return {
        "decoder": neighbour_score(decoder_units(W_dec), sheet, absolute=True),
        "coactivation": neighbour_score(coactivation_units(codes), sheet),
        "coactivation_pearson": neighbour_score(coactivation_units(codes, centred=True), sheet),
    }


# ---- (a) TopoLoss on the decoder ---------------------------------------------------------------------------------


def decoder_topoloss(
    W_dec: Tensor, sheet: LatentSheet, factor: float | Sequence[float] = 3.0, mode: Mode = "bilinear"
) -> Tensor:
    """TopoNets' loss on the decoder viewed as a sheet of latents: 1 − mean_i cos(W_i, blur(W)_i), differentiable.

    ``W_dec`` is [n_latents, d_out] (one row per latent); the blur is the reference's
    down-by-1/φ-then-up interpolation (:func:`topotorch.objectives.topoloss.sheet_loss`).
    Usage: ``loss = fvu + tau * decoder_topoloss(sae.W_dec, LatentSheet.of(n), factor=3)``.
    """
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [n_latents, d], got shape {tuple(W_dec.shape)}")
    _check_sheet(W_dec.shape[0], sheet)
    return sheet_loss(W_dec.view(sheet.h, sheet.w, W_dec.shape[1]), factor, mode)


# ---- (b) relocation ----------------------------------------------------------------------------------------------


def placement_similarity(W_dec: Tensor, codes: Tensor, coactivation: float = 0.1) -> Tensor:
    """S = c·(uncentred co-activation correlation) + (1 − c)·|decoder cos|, n×n float64, zero diagonal.

    Rows of dead latents are zero (nothing pulls them anywhere). ``coactivation`` in [0, 1] weighs the two.
    Usage: ``S = placement_similarity(sae.W_dec, sae.encode(x), 0.5)``.
    """
    if not 0.0 <= coactivation <= 1.0:
        raise ValueError(f"coactivation weight must be in [0, 1], got {coactivation!r}")
    s = torch.zeros(W_dec.shape[0], W_dec.shape[0], dtype=torch.float64)
    if coactivation > 0:
        a = coactivation_units(codes)
        if a.shape[0] != W_dec.shape[0]:
            raise ValueError(f"codes have {a.shape[0]} latents but W_dec has {W_dec.shape[0]}")
        s += coactivation * (a @ a.t())
    if coactivation < 1:
        d = decoder_units(W_dec)
        s += (1 - coactivation) * (d @ d.t()).abs()
    s.fill_diagonal_(0.0)
    return s


def _tensor_sum(parts: Iterable[Tensor]) -> Tensor:
    """Σ parts, left to right as ``sum`` adds them (0 + t is t exactly), typed Tensor; a kernel has ≥ 1 term."""
    it = iter(parts)
    total = next(it, None)
    if total is None:
        raise ValueError("the kernel has no terms")
    for part in it:
        total = total + part
    return total


def _kernel_apply(s: Tensor, terms: list[tuple[Tensor, Tensor]], h: int, w: int) -> Tensor:
    """G = S K for K = Σ Kh ⊗ Kw, via the rows of S reshaped to (h, w): O(n²(h + w))."""
    s3 = s.view(-1, h, w)
    g = _tensor_sum(torch.matmul(kh, torch.matmul(s3, kw)) for kh, kw in terms)  # Kh, Kw symmetric
    return g.reshape(s.shape)


def _kernel_full(terms: list[tuple[Tensor, Tensor]]) -> Tensor:
    return _tensor_sum(torch.kron(kh, kw) for kh, kw in terms)


def _swap_gains(s: Tensor, g: Tensor, k: Tensor) -> Tensor:
    """Δ_ab for swapping the latents of slots a and b (see the module docstring)."""
    dg, dk = g.diagonal(), k.diagonal()
    return g + g.t() - dg[:, None] - dg[None, :] - s * (dk[:, None] + dk[None, :] - 2 * k)


def _disjoint_swaps(gain: Tensor, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Disjoint improving swaps: each slot's best partner, best first, kept where both slots appear there first.

    A vectorised stand-in for the greedy matching (take the best pair, drop its slots, repeat): a pair is
    kept when it is the earliest, in order of gain, to mention either of its two slots. The first pair
    returned is the single best swap.
    """
    n = gain.shape[0]
    best_gain, best = gain.max(1)
    a = torch.arange(n)
    ok = (best_gain > tol) & ((a < best) | (best[best] != a))  # a mutual pair once
    a, b, gv = a[ok], best[ok], best_gain[ok]
    rank = torch.argsort(gv, descending=True, stable=True)
    a, b, gv = a[rank], b[rank], gv[rank]
    ends = torch.stack([a, b], 1).reshape(-1)  # slots in order of appearance
    first = torch.full((n,), len(ends), dtype=torch.long)
    first.scatter_reduce_(0, ends, torch.arange(len(ends)), reduce="amin")
    pos = torch.arange(len(a))
    keep = (first[a] == 2 * pos) & (first[b] == 2 * pos + 1)
    return a[keep], b[keep], gv[keep]


def _closed_neighbourhoods(sheet: LatentSheet) -> Tensor:
    """(n, 5) each slot and its 4-neighbours; a missing neighbour (edge of the sheet) is the pad index n."""
    n, h, w = sheet.n, sheet.h, sheet.w
    idx = torch.arange(n).view(h, w)
    out = torch.full((h, w, 5), n, dtype=torch.long)
    out[:, :, 0] = idx
    out[:, 1:, 1], out[:, :-1, 2] = idx[:, :-1], idx[:, 1:]
    out[1:, :, 3], out[:-1, :, 4] = idx[:-1, :], idx[1:, :]
    return out.view(n, 5)


def _independent_swaps(gain: Tensor, closed: Tensor, tol: float, passes: int = 3) -> tuple[Tensor, Tensor]:
    """Improving swaps under the adjacency kernel whose gains add up exactly, found all at once.

    A swap of slots a, b changes only the edges at a and b, so two swaps interact only if one's slots are
    in the other's closed neighbourhoods. Each slot's best partner is a candidate (best first); a candidate
    is kept when it is the earliest to claim every slot of its footprint N[a] ∪ N[b] (so kept footprints are
    disjoint), and a few passes over the rest fill the gaps. The sum of the kept gains is the exact change of F.
    """
    n = gain.shape[0]
    best_gain, best = gain.max(1)
    a = torch.arange(n)
    ok = (best_gain > tol) & ((a < best) | (best[best] != a))  # a mutual pair once
    a, b, gv = a[ok], best[ok], best_gain[ok]
    rank = torch.argsort(gv, descending=True, stable=True)
    a, b = a[rank], b[rank]
    foot = torch.cat([closed[a], closed[b]], 1)  # (m, 10), pad n off the sheet
    taken = torch.zeros(n + 1, dtype=torch.bool)
    kept: list[Tensor] = []
    for _ in range(passes):  # a handful of vectorised passes, not a loop over latents
        idx = (~taken[foot].any(1)).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        pri = torch.arange(len(idx))
        first = torch.full((n + 1,), len(idx), dtype=torch.long)
        first.scatter_reduce_(0, foot[idx].reshape(-1), pri.repeat_interleave(foot.shape[1]), reduce="amin")
        sel = idx[((first[foot[idx]] == pri[:, None]) | (foot[idx] == n)).all(1)]
        kept.append(sel)
        taken[foot[sel].reshape(-1)] = True
        taken[n] = False
    sel = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
    return a[sel], b[sel]


def independent_slot_sets(sheet: LatentSheet) -> list[Tensor]:
    """Sets of slots no two of which are 4-neighbours: the classes of (a·row + b·column) mod m for the
    checkerboard (1, 1, 2) and six more tilings — a neighbour step changes a·row + b·column by ±a or ±b, never
    0 mod m. More tilings, more distinct exact moves (measured on the shakespeare SAE: adjacency 878.6 with
    the checkerboard and (1, 2, 5), 882.0 with all). Usage: ``independent_slot_sets(sheet)``."""
    r, c = sheet.coordinates().unbind(1)
    tilings = [(1, 1, 2), (1, 2, 5), (2, 1, 5), (1, 1, 3), (1, -1, 3), (1, 1, 4), (1, -1, 4)]
    sets = [((a * r + b * c) % m == k).nonzero().squeeze(1) for a, b, m in tilings for k in range(m)]
    return [s for s in sets if len(s) > 1]


def _adjacency_rows(rows: Tensor, sheet: LatentSheet) -> Tensor:
    """rows (m, n) times the 4-neighbour adjacency, by shifts: out[:, p] = Σ over neighbours q of p of rows[:, q]."""
    m = rows.shape[0]
    r3 = rows.reshape(m, sheet.h, sheet.w)
    g = torch.zeros_like(r3)
    g[:, :, 1:] += r3[:, :, :-1]
    g[:, :, :-1] += r3[:, :, 1:]
    g[:, 1:, :] += r3[:, :-1, :]
    g[:, :-1, :] += r3[:, 1:, :]
    return g.reshape(m, -1)


def _set_assignment(s: Tensor, order: Tensor, sheet: LatentSheet, slots: Tensor) -> tuple[Tensor, float]:
    """The best rearrangement of the latents on an independent set of slots, the others held: exact.

    No two slots of the set are neighbours, so a latent's contribution at slot p, Σ_{q ∈ N(p)} S(latent,
    latent at q), involves only latents off the set, which stay: F is linear in the assignment and one linear
    assignment finds its optimum (never worse than staying). Returns the new order and the gain in F."""
    g = _adjacency_rows(s[order[slots]][:, order], sheet)[:, slots]  # [latent on slot i, slot j of the set]
    src, delta = assignment_permutation(-g)
    if delta >= 0:
        return order, 0.0
    new = order.clone()
    new[slots] = order[slots][src]
    return new, -delta


def _polish_adjacency(
    s: Tensor, order: Tensor, sheet: LatentSheet, cycles: int, rel_tol: float, tol: float, stats: PlacementStats
) -> Tensor:
    """Alternate exact moves under the adjacency kernel until a cycle gains less than ``rel_tol`` of F:
    a linear assignment on each independent slot set (half the sheet at a time for the checkerboard), then
    rounds of independent best swaps (between any two slots, including neighbours)."""
    closed = _closed_neighbourhoods(sheet)
    k = _kernel_full(sheet.kernel_terms(None, s.dtype))
    sets = independent_slot_sets(sheet)
    so = s[order][:, order]
    f = 0.5 * float(_adjacency_rows(so, sheet).diagonal().sum())
    for _ in range(cycles):
        f0 = f
        for slots in sets:
            order, d = _set_assignment(s, order, sheet, slots)
            if d > tol:
                f += d
                stats.assignments += 1
        so = s[order][:, order]
        for _ in range(100):
            g = _adjacency_rows(so, sheet)
            gain = _swap_gains(so, g, k)
            gain.fill_diagonal_(-math.inf)
            pa, pb = _independent_swaps(gain, closed, tol)
            if len(pa) == 0:
                break
            f += float(gain[pa, pb].sum())  # exact: the kept swaps do not interact
            perm = torch.arange(len(order))
            perm[pa], perm[pb] = pb, pa
            order, so = order[perm], so[perm][:, perm]
            stats.swaps += len(pa)
            stats.rounds += 1
        if f - f0 < rel_tol * abs(f):
            break
    return order


def _spectral_start(s: Tensor, sheet: LatentSheet) -> Tensor:
    """A 2-D layout from the spectrum of S: latents ranked by the Fiedler vector of the normalised similarity
    cut into strips along the sheet's long side, each strip ranked by the next eigenvector across it.

    The leading non-trivial eigenvectors of D^−½ S D^−½ (scaled back by D^−½) are the smoothest coordinates
    of the similarity graph (Laplacian eigenmaps), so this start already has the global order that the broad
    Gaussian stages would otherwise build swap by swap; the schedule then begins at σ = an eighth of the short side
    (measured on the GPT's 2048-latent SAEs, seeds 0/1/2: adjacency 882.8/997.3/985.4 vs 882.0/999.7/982.8
    from the identity, in 95 s vs 130-146 s on the loaded box). Returns ``order`` with ``order[slot]`` = latent.
    """
    n, long, short = sheet.n, max(sheet.h, sheet.w), min(sheet.h, sheet.w)
    if n < 3:
        return torch.arange(n)
    s = s.to(torch.float64)
    deg = s.sum(1)
    dm = torch.where(deg > 0, deg.clamp_min(1e-300).rsqrt(), 0.0)  # a dead latent (row 0) gets 0 in every vector
    _, vec = torch.linalg.eigh(dm[:, None] * s * dm[None, :])
    v = vec[:, -3:-1].flip(1) * dm[:, None]  # the 2nd and 3rd largest (the largest is the trivial √degree)
    strips = torch.argsort(v[:, 0], stable=True).view(long, short)
    grid = torch.gather(strips, 1, torch.argsort(v[strips, 1], dim=1, stable=True))  # [long, short]
    return (grid.t() if sheet.w >= sheet.h else grid).reshape(-1)


def _identity_start(s: Tensor, sheet: LatentSheet) -> Tensor:
    return torch.arange(sheet.n)


# start placement -> (how to make it, the default schedule's broadest σ for the sheet). Spectral: an eighth of the
# short side (measured: 32×64 SAE σ 2 / 4 / 8 -> adjacency 874.9 / 882.8 / 878.4; the CLI's 32×32 sheet: σ 2 gave
# decoder |cos| 2.95×, σ 4 2.99×, the identity start from a quarter of the long side 2.98×)
_STARTS = {
    "identity": (_identity_start, lambda sheet: max(sheet.h, sheet.w) / 4),
    "spectral": (_spectral_start, lambda sheet: min(sheet.h, sheet.w) / 8),
}


@dataclass
class PlacementStats:
    """What :func:`solve_placement` did: the adjacency score (Σ over neighbour pairs of S) before and after."""

    before: float
    after: float
    swaps: int = 0
    assignments: int = 0
    rounds: int = 0
    stages: list[dict] = field(default_factory=list)


def _adjacency_score(s: Tensor, sheet: LatentSheet) -> float:
    p = sheet.neighbour_pairs()
    return float(s[p[:, 0], p[:, 1]].sum())


def solve_placement(
    s: Tensor,
    sheet: LatentSheet,
    sigmas: Sequence[float] | None = None,
    max_rounds: int = 50,
    assign: bool = True,
    tol: float = 1e-6,
    rel_tol: float = 1e-4,
    power: float = 3.0,
    polish: Sequence[float] | None = None,
    polish_rounds: int = 200,
    polish_rel_tol: float = 1e-6,
    exact_cycles: int = 10,
    start: str = "spectral",
) -> tuple[Tensor, PlacementStats]:
    """A placement of latents on the sheet that puts similar ones (large S_ij) next to each other.

    Maximises F = Σ_{i<j} S_ij K(slot_i, slot_j), from a ``start`` placement (``"spectral"``:
    :func:`_spectral_start`, a Laplacian-eigenmap layout of S^``power``; ``"identity"``: the given order), for
    each kernel of an annealing schedule — Gaussians of widths ``sigmas`` (default: from an eighth of the
    sheet's short side with the spectral start, a quarter of the long side with the identity, down to 0.7 in
    steps of ×0.75) on S^``power``,
    then a polish on S itself (Gaussians ``polish``, default (1, 0.7) when ``power`` ≠ 1, then the
    4-neighbour adjacency) — by a linear assignment step (first scale) and rounds of closed-form pairwise
    swaps, until a round gains less than ``rel_tol`` (polish: ``polish_rel_tol``) of F or ``max_rounds``
    (``polish_rounds``), then up to ``exact_cycles`` cycles of exact large moves on the adjacency
    (:func:`_polish_adjacency`: a linear assignment of the latents on each independent set of slots — no two
    neighbours, so F is linear in it — and batches of non-interacting best swaps). Why the power: at broad
    scales F sums many weak pairs, and in a d-dimensional dictionary most |cos| sit near the random level
    √(2/πd), so their sum swamps the few strong pairs that global order should follow; S³ keeps the strong
    pairs and mutes the rest (measured on the shakespeare
    GPT's 2048-latent SAE, decoder-only S: neighbour/shuffled |cos| 2.80× with S, 3.00× with S³ + polish;
    the exact moves then take the adjacency score 861 -> 878, |cos| 2.98× -> 3.05×).
    Returns ``order`` (n,) with ``order[slot]`` = the latent to put at that slot (identity = no move) and
    the stats. The adjacency score never gets worse than the identity's.
    Usage: ``order, st = solve_placement(placement_similarity(W_dec, z), sheet)``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small n² ops: extra threads only stall on a busy box (as in relocation.py)
    try:
        args = (sigmas, max_rounds, assign, tol, rel_tol, power, polish, polish_rounds, polish_rel_tol, exact_cycles)
        return _solve(s, sheet, start, *args)
    finally:
        torch.set_num_threads(threads)


def _solve(s, sheet, start, *args) -> tuple[Tensor, PlacementStats]:
    sigmas, max_rounds, assign, tol, rel_tol, power, polish, polish_rounds, polish_rel_tol, exact_cycles = args
    n = s.shape[0]
    if s.shape != (n, n):
        raise ValueError(f"the similarity must be square, got shape {tuple(s.shape)}")
    _check_sheet(n, sheet)
    s64 = s.detach().to("cpu", torch.float64).clone()
    s64.fill_diagonal_(0.0)
    s64 = (s64 + s64.t()) / 2
    s = s64.to(torch.float32)  # the search in float32: half the memory traffic; the final check in float64
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"power must be a finite number > 0, got {power!r}")
    if start not in _STARTS:
        raise ValueError(f"unknown start placement {start!r}; choose one of {sorted(_STARTS)}")
    make_start, broadest = _STARTS[start]
    if sigmas is None:
        top = broadest(sheet)
        sigmas = [top * 0.75**i for i in range(60) if top * 0.75**i >= 0.7] or [0.7]
    if polish is None:
        polish = (1.0, 0.7) if power != 1 else ()
    s_anneal = s if power == 1 else s.pow(power)  # S ≥ 0, zero diagonal: the power keeps both
    schedule = [(sg, s_anneal, max_rounds, rel_tol) for sg in sigmas]
    schedule += [(sg, s, polish_rounds, polish_rel_tol) for sg in [*polish, None]]
    order = make_start(s64 if power == 1 else s64.pow(power), sheet)
    before = _adjacency_score(s64, sheet)
    stats = PlacementStats(before, before)
    for stage_i, (sigma, s, stage_rounds, stage_tol) in enumerate(schedule):
        terms = sheet.kernel_terms(sigma, torch.float32)
        k = _kernel_full(terms)
        so = s[order][:, order]
        g = _kernel_apply(so, terms, sheet.h, sheet.w)
        f = 0.5 * float(g.diagonal().sum())
        stage = {"sigma": sigma, "start": f, "rounds": stats.rounds, "seconds": time.perf_counter()}
        # global move: every latent to where its partners are (others held), if F rose — at the first scale
        # and again when the polish on S itself starts (measured: it frees the swaps from a local optimum)
        if assign and stage_i in (0, len(sigmas)):
            src, _ = assignment_permutation(-g)  # src[slot] = the slot its new latent comes from
            cand = order[src]
            so2 = s[cand][:, cand]
            g2 = _kernel_apply(so2, terms, sheet.h, sheet.w)
            f2 = 0.5 * float(g2.diagonal().sum())
            if f2 > f + tol:
                order, so, g, f = cand, so2, g2, f2
                stats.assignments += 1
        for _ in range(stage_rounds):
            gain = _swap_gains(so, g, k)
            gain.fill_diagonal_(-math.inf)
            pa, pb, _ = _disjoint_swaps(gain, tol)
            if len(pa) == 0:
                break
            cand = order.clone()
            cand[pa], cand[pb] = order[pb], order[pa]
            so2 = s[cand][:, cand]
            g2 = _kernel_apply(so2, terms, sheet.h, sheet.w)
            f2 = 0.5 * float(g2.diagonal().sum())
            n_sw = len(pa)
            if f2 <= f + tol:  # the disjoint swaps interacted badly: take the single best one (exact gain > 0)
                cand = order.clone()
                cand[pa[0]], cand[pb[0]] = order[pb[0]], order[pa[0]]
                so2 = s[cand][:, cand]
                g2 = _kernel_apply(so2, terms, sheet.h, sheet.w)
                f2 = 0.5 * float(g2.diagonal().sum())
                n_sw = 1
            gained = f2 - f
            order, so, g, f = cand, so2, g2, f2
            stats.swaps += n_sw
            stats.rounds += 1
            if gained < stage_tol * abs(f):  # diminishing returns at this scale: go on to the next
                break
        stage.update(
            end=f,
            rounds=stats.rounds - stage["rounds"],
            seconds=time.perf_counter() - stage["seconds"],
            power=power if s is s_anneal and power != 1 else 1.0,
        )
        stats.stages.append(stage)
    if exact_cycles > 0:  # the schedule ends at a 2-swap optimum of the adjacency: larger exact moves go on
        t0, f0 = time.perf_counter(), _adjacency_score(s64[order][:, order], sheet)
        order = _polish_adjacency(s, order, sheet, exact_cycles, polish_rel_tol, tol, stats)
        stats.stages.append(
            {
                "sigma": "exact",
                "start": f0,
                "end": _adjacency_score(s64[order][:, order], sheet),
                "seconds": time.perf_counter() - t0,
            }
        )
    after = _adjacency_score(s64[order][:, order], sheet)
    if after < before:  # the schedule's broad stages traded adjacency for global order: never end worse
        order, after = torch.arange(n), before
    stats.after = after
    return order, stats


def relocate(
    sae, codes: Tensor, sheet: LatentSheet | None = None, coactivation: float = 0.1, trainer=None, **solver
) -> PlacementStats:
    """Relocate the latents of a (trained) sparse coder on its sheet by co-activation and decoder similarity.

    ``codes`` [T, n] are its activations on some tokens (``sae.encode(x)``). The permutation goes through
    ``sae.permute_latents`` (the output is unchanged exactly) or, mid-run, ``trainer.permute_latents``
    (an :class:`topotorch.sae.train.SAETrainer`: Adam moments and dead counters move with their latents).
    ``solver`` goes to :func:`solve_placement`. Returns :class:`PlacementStats` (adjacency score before/after).
    Usage: ``relocate(sae, sae.encode(x), LatentSheet.of(sae.cfg.n_latents))``.
    """
    n = sae.W_dec.shape[0]
    sheet = sheet or LatentSheet.of(n)
    _check_sheet(n, sheet)
    s = placement_similarity(sae.W_dec, codes, coactivation)
    order, stats = solve_placement(s, sheet, **solver)
    if bool((order != torch.arange(n)).any()):
        (trainer or sae).permute_latents(order.to(sae.W_dec.device))
    return stats


def train_topographic(
    cfg,
    batches,
    steps: int,
    sheet: LatentSheet | None = None,
    tau: float = 0.0,
    factor: float = 3.0,
    relocate_at: Sequence[float] = (0.25,),
    relocate_tokens: int = 16384,
    coactivation: float = 0.1,
    final_relocation: bool = True,
    solver: dict | None = None,
    **train_kwargs,
):
    """Train a topographic sparse coder: ``train_sae`` + τ·TopoLoss on the decoder sheet + relocations.

    ``relocate_at``: fractions of the run at which the latents are relocated by co-activation on the
    last ``relocate_tokens`` training tokens (the Adam state moves with them); ``final_relocation``
    relocates once more at the end (the output is unchanged by it); ``solver`` goes to :func:`solve_placement`,
    the rest to ``train_sae``. τ = 0 and no relocation is plain ``train_sae``. Returns ``(sae, history)``;
    history["relocations"] lists the placement stats.
    Usage: ``sae, hist = train_topographic(SAEConfig(d_in=128, n_latents=2048, k=32), acts, 2000, tau=0.05)``.
    """
    from topotorch.sae.train import train_sae

    sheet = sheet or LatentSheet.of(cfg.n_latents)
    _check_sheet(cfg.n_latents, sheet)
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    at = sorted({max(1, min(steps, round(f * steps))) for f in relocate_at})
    if any(not 0 < f <= 1 for f in relocate_at):
        raise ValueError(f"relocate_at holds fractions of the run in (0, 1], got {relocate_at!r}")
    recent: list[Tensor] = []
    log: list[dict] = []

    def on_step(trainer, done: int, x: Tensor) -> None:
        recent.append(x.detach())
        while sum(len(r) for r in recent) - len(recent[0]) >= relocate_tokens:
            recent.pop(0)
        if done in at:
            with torch.no_grad():
                z = trainer.sae.encode(torch.cat(recent)[-relocate_tokens:])
            st = relocate(trainer.sae, z, sheet, coactivation, trainer=trainer, **(solver or {}))
            log.append({"step": done, "before": st.before, "after": st.after, "swaps": st.swaps})

    extra = None
    if tau > 0:

        def extra(sae, out):
            return tau * decoder_topoloss(sae.W_dec, sheet, factor)

    sae, hist = train_sae(
        cfg, batches, steps, extra_loss=extra, on_step=on_step if (at or final_relocation) else None, **train_kwargs
    )
    if final_relocation and recent:
        with torch.no_grad():  # the returned coder works on raw data: encode raw tokens (undo the normalisation)
            z = sae.encode(torch.cat(recent)[-relocate_tokens:] * hist["data_scale"][0])
        st = relocate(sae, z, sheet, coactivation, **(solver or {}))
        log.append({"step": "final", "before": st.before, "after": st.after, "swaps": st.swaps})
    hist["relocations"] = log
    hist["sheet"] = (sheet.h, sheet.w)
    return sae, hist


# ---- (d) pictures ------------------------------------------------------------------------------------------------


def latent_labels(codes: Tensor, labels: Tensor, n_labels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """What activates each latent most: the label with the largest share of its activation mass, and that share.

    ``codes`` [T, n] ≥ 0, ``labels`` [T] integers (class, token, module of the sample). Returns
    (top label [n], purity [n] in [0, 1]); dead latents get label −1, purity 0.
    Usage: ``top, purity = latent_labels(z, tokens, vocab)``.
    """
    if codes.dim() != 2 or labels.shape != codes.shape[:1]:
        raise ValueError(f"codes [T, n] and labels [T] must agree, got {tuple(codes.shape)} and {tuple(labels.shape)}")
    n_labels = int(labels.max()) + 1 if n_labels is None else n_labels
    onehot = F.one_hot(labels.long(), n_labels).to(torch.float64)
    mass = codes.detach().to(torch.float64).abs().t() @ onehot  # [n, labels]: one matmul
    tot = mass.sum(1)
    share, top = (mass / tot.clamp_min(1e-300)[:, None]).max(1)
    top = torch.where(tot > 0, top, torch.full_like(top, -1))
    return top.numpy(), torch.where(tot > 0, share, torch.zeros_like(share)).numpy()


def draw_latent_sheet(
    top: np.ndarray,
    purity: np.ndarray,
    sheet: LatentSheet,
    path: str | Path,
    names: Sequence[str] | None = None,
    title: str = "",
    max_legend: int = 16,
) -> Path:
    """The sheet as an image: each cell coloured by its latent's top label, alpha by purity, dead latents grey.

    The legend lists the most frequent labels. Usage: ``draw_latent_sheet(*latent_labels(z, y), sheet, "sheet.png")``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from topotorch.checkpoint import atomic_write_bytes

    top, purity = np.asarray(top), np.asarray(purity, dtype=float)
    _check_sheet(len(top), sheet)
    n_lab = int(top.max()) + 1 if (top >= 0).any() else 1
    cmap = plt.get_cmap("tab20")
    colours = np.array([cmap(i % 20) for i in range(max(n_lab, 1))])
    img = np.ones((sheet.n, 4)) * np.array([0.85, 0.85, 0.85, 1.0])
    live = top >= 0
    img[live, :3] = colours[top[live], :3]
    a = np.clip(purity, 0.0, 1.0)
    img[live, :3] = img[live, :3] * a[live, None] + (1 - a[live, None])  # fade towards white when mixed
    fig, ax = plt.subplots(figsize=(max(4.0, sheet.w / 6 + 2), max(3.0, sheet.h / 6 + 1)))
    ax.imshow(img.reshape(sheet.h, sheet.w, 4), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        title or f"latent sheet {sheet.h}x{sheet.w}: top label per latent (faded = mixed, grey = dead)", fontsize=9
    )
    labs, counts = np.unique(top[live], return_counts=True)
    keep = labs[np.argsort(-counts)][:max_legend]
    handles = [Patch(color=colours[i], label=(names[i] if names is not None else str(i))) for i in keep]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
