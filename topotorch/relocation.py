"""Function-preserving neuron relocation that lowers the wiring cost.

With every other layer fixed, the cost of putting neuron i of a space at slot p is

    M[i, p] = Σ_j |W_in[i, j]| · c(p, x_j) + Σ_k |W_out[k, i]| · c(x_k, p),   c = wf·d + l0

— one or two matmuls per space (:func:`placement_cost`). Everything follows from M:

* swapping the neurons at slots p and q changes the cost by
  ``M[a, q] + M[b, p] - M[a, p] - M[b, q]`` (a, b the neurons there), so the paper's
  greedy swap (:func:`greedy_swap_permutation`) scores all N partners of a candidate in
  one vector operation instead of recomputing the whole cost N times;
* the best arrangement of a whole space given its neighbours is a linear assignment
  problem on M (:func:`assignment_permutation`, scipy's ``linear_sum_assignment``).

A permutation is applied (:func:`apply_permutation`) either to the parameters — every
slice a neuron owns, and the optimizer's per-parameter state (Adam moments, momentum)
with them — or, for input/output spaces, to the coordinates, so data and labels keep
their meaning. Either way the network computes exactly the same function.

    >>> stats = relocate(graph, cfg, method="swap", top_k=5, optimizer=opt)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from topotorch.geometry import as_plane
from topotorch.graph import Space, SpatialGraph
from topotorch.graph.core import aggregate, group_matrix
from topotorch.objectives.wiring import WiringConfig

Method = Literal["swap", "assign"]
# spaces up to this many neurons get their whole placement-cost matrix (8 MB in float64); larger ones are
# multiplied out row by row (swaps) or block by block (assignment)
DENSE_LIMIT = 1024


class _L1Term:
    """One connection's share of M when the distance is l1 (separable by coordinate): no N×N products.

    For one coordinate, Σ_j a_ij·|x_p − y_j| splits at x_p into the sources left and right of the
    slot: with the sources sorted and per-neuron running sums of a_ij and a_ij·y_j, each entry is
    a few gathers — O(N·K) once instead of O(N·slots·K) per block.
    """

    def __init__(self, a: torch.Tensor, slots: torch.Tensor, others: torch.Tensor, wf: float, l0: float):
        self.wf, self.l0 = wf, l0
        self.total = a.sum(1)  # Σ_j a_ij
        self.coords = []
        for d in range(slots.shape[1]):
            y, a_d = others[:, d].contiguous(), a
            if bool((y[1:] < y[:-1]).any()):  # a line layout is sorted already: no gather of the weights
                y, order = y.sort()
                a_d = a[:, order]
            # running sums with a leading zero column: Σ over the k leftmost sources is column k
            left_w = a.new_zeros(a.shape[0], a.shape[1] + 1)
            torch.cumsum(a_d, 1, out=left_w[:, 1:])
            left_wy = a.new_zeros(a.shape[0], a.shape[1] + 1)
            torch.cumsum(a_d * y, 1, out=left_wy[:, 1:])
            k = torch.searchsorted(y, slots[:, d].contiguous(), right=True)  # sources at or left of x_p
            self.coords.append((slots[:, d], k, left_w, left_wy))

    def entries(self, neurons: torch.Tensor, slots: torch.Tensor, outer: bool) -> torch.Tensor:
        """M entries for neurons × slots (``outer``: every pair) or for (neurons[k], slots[k]) pairs."""
        out = None
        rows = _as_rows(neurons)
        for x, k, left_w, left_wy in self.coords:
            if outer:  # index_select on a row view: advanced indexing is ~50x slower here
                kk = k.index_select(0, slots)
                lw, lwy = left_w[rows].index_select(1, kk), left_wy[rows].index_select(1, kk)
                tw, twy = left_w[rows, -1:], left_wy[rows, -1:]
                xp = x.index_select(0, slots).unsqueeze(0)
            else:
                lw, lwy = left_w[neurons, k[slots]], left_wy[neurons, k[slots]]
                tw, twy = left_w[neurons, -1], left_wy[neurons, -1]
                xp = x[slots]
            part = xp * lw - lwy + (twy - lwy) - xp * (tw - lw)
            out = part if out is None else out + part
        assert out is not None  # one coordinate at least (positions are (N, D), D >= 1)
        base = self.total[rows].unsqueeze(1) if outer else self.total[neurons]
        return self.wf * out + self.l0 * base


def _as_rows(index: torch.Tensor):
    """A slice when ``index`` is a run of consecutive integers (a view instead of a gather), else the index."""
    n = index.numel()
    if n and int(index[-1]) - int(index[0]) == n - 1 and bool((index[1:] - index[:-1] == 1).all()):
        return slice(int(index[0]), int(index[0]) + n)
    return index


class Placement:
    """The placement-cost matrix of one space in factored form: ``M = Σ_c A_c · C_cᵀ``.

    For each connection, ``A`` (N_neurons, K) holds the aggregated |W| of every neuron to the K
    neurons on the other side and ``C`` (N_slots, K) the cost factor (wf·d + l0) from each slot to
    them; with the l1 metric the products are replaced by running sums (:class:`_L1Term`). Only what
    is asked for is computed: the whole matrix (:meth:`full`), a block of neurons with their slots
    (:meth:`block`), one neuron's row, one slot's column, or the cost of given neurons at given
    slots — so a vocabulary of 50k outputs never needs a 50k × 50k matrix.
    Usage: ``P = Placement(graph, "hidden1", cfg); M = P.full()``.
    """

    def __init__(self, graph: SpatialGraph, space: str | Space, cfg: WiringConfig):
        sp = graph.space(space) if isinstance(space, str) else space
        self.size = sp.size
        self.terms: list = []
        touched = False
        for conn in graph.incoming(sp.name) + graph.outgoing(sp.name):
            if cfg.excluded(conn.weight):
                continue
            if conn.target == conn.source:
                raise ValueError(f"connection {conn.weight!r} links space {sp.name!r} to itself; not supported")
            touched = True
            t, s = graph.space(conn.target), graph.space(conn.source)
            if t.positions is None or s.positions is None:  # the same cost in every slot: cannot matter
                continue
            w = graph.tensor(conn.weight)
            a = aggregate(w, conn, t.size, s.size)
            if cfg.agg == "mean":
                a = a / w.numel()
            mine, other = (t.positions, s.positions) if conn.target == sp.name else (s.positions, t.positions)
            a = a if conn.target == sp.name else a.T
            if cfg.metric == "l1" or (mine.shape[1] == 1 and other.shape[1] == 1):
                x, y = mine, other
                if x.shape[1] != y.shape[1]:
                    x, y = as_plane(x), as_plane(y)
                self.terms.append(_L1Term(a, x.to(a.device, a.dtype), y.to(a.device, a.dtype), cfg.wf, cfg.l0))
            else:
                c = cfg.wf * graph.distances(conn, cfg.metric, w) + cfg.l0  # (N_target, N_source), by slot
                self.terms.append((a, c if conn.target == sp.name else c.T))
        if not touched:
            raise ValueError(f"space {sp.name!r} has no (non-excluded) connections")
        self.device = (
            self.terms[0].total.device
            if self.terms and isinstance(self.terms[0], _L1Term)
            else (self.terms[0][0].device if self.terms else torch.device("cpu"))
        )

    def _sum(self, parts, shape) -> torch.Tensor:
        out = None
        for p in parts:
            out = p if out is None else out + p
        return out if out is not None else torch.zeros(shape, dtype=torch.float64)

    def block(self, index: torch.Tensor) -> torch.Tensor:
        """M restricted to the neurons ``index`` and the slots with the same indices."""
        index = index.to(self.device)
        rows = _as_rows(index)
        return self._sum(
            (
                t.entries(index, index, True) if isinstance(t, _L1Term) else t[0][rows] @ t[1][rows].T
                for t in self.terms
            ),
            (len(index), len(index)),
        )

    def full(self) -> torch.Tensor:
        return self.block(torch.arange(self.size, device=self.device))

    def row(self, neuron: int) -> torch.Tensor:
        every = torch.arange(self.size, device=self.device)
        one = torch.tensor([neuron], device=self.device)
        return self._sum(
            (t.entries(one, every, True)[0] if isinstance(t, _L1Term) else t[1] @ t[0][neuron] for t in self.terms),
            (self.size,),
        )

    def col(self, slot: int) -> torch.Tensor:
        every = torch.arange(self.size, device=self.device)
        one = torch.tensor([slot], device=self.device)
        return self._sum(
            (t.entries(every, one, True)[:, 0] if isinstance(t, _L1Term) else t[0] @ t[1][slot] for t in self.terms),
            (self.size,),
        )

    def at(self, neurons: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """M[neurons[k], slots[k]] for every k."""
        return self._sum(
            (
                t.entries(neurons, slots, False) if isinstance(t, _L1Term) else (t[0][neurons] * t[1][slots]).sum(-1)
                for t in self.terms
            ),
            (len(neurons),),
        )


def placement_cost(
    graph: SpatialGraph, space: str | Space, cfg: WiringConfig, index: torch.Tensor | None = None
) -> torch.Tensor:
    """M[i, p]: wiring cost of the connections touching ``space`` if neuron i sat at slot p.

    Slots are the space's current coordinates in index order, so the current cost is
    ``M.diagonal().sum()`` (plus terms that do not depend on this space). Computed on the
    weights' device and dtype. ``index``: only these neurons and their slots (a block of a large
    space), an ``(len(index), len(index))`` matrix. A connection to a space without coordinates
    (tokens) costs the same in every slot, so it is left out: it cannot change a decision or a delta.
    Usage: ``M = placement_cost(g, "hidden1", cfg)``.
    """
    p = Placement(graph, space, cfg)
    return p.full() if index is None else p.block(index)


def neuron_scores(graph: SpatialGraph, space: str | Space, cfg: WiringConfig | None = None) -> torch.Tensor:
    """Σ|incoming| + Σ|outgoing| weights per neuron: the paper's choice of which neurons to move.

    Connections excluded by ``cfg`` do not count. Usage: ``neuron_scores(g, "hidden1")``.
    """
    sp = graph.space(space) if isinstance(space, str) else space
    score = None
    for conn in graph.incoming(sp.name) + graph.outgoing(sp.name):
        if cfg is not None and cfg.excluded(conn.weight):
            continue
        w = graph.tensor(conn.weight)
        a = aggregate(w, conn, graph.space(conn.target).size, graph.space(conn.source).size)
        part = a.sum(1) if conn.target == sp.name else a.sum(0)
        score = part if score is None else score + part
    if score is None:
        raise ValueError(f"space {sp.name!r} has no (non-excluded) connections")
    return score


def greedy_swap_permutation(
    m: torch.Tensor | Placement, candidates: torch.Tensor, tol: float = 0.0, groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """The paper's greedy swaps, scored in closed form from the placement-cost matrix.

    For each candidate neuron in turn, find the partner whose swap lowers the cost most and
    apply it if it lowers the cost by more than ``tol``. Returns ``(perm, delta)``: slot q
    now holds old neuron ``perm[q]``; ``delta`` is the total cost change (<= 0).
    M is indexed by neuron identity, so it never needs recomputing within a space.
    With ``groups`` (one id per slot), a neuron only swaps with neurons of its own group.
    ``m`` may be a :class:`Placement`, which multiplies out only the rows and columns needed.
    """
    row: Callable[[int], torch.Tensor]  # M[neuron, :]
    col: Callable[[int], torch.Tensor]  # M[:, slot]
    at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # M[neurons, slots]
    if isinstance(m, Placement):
        n, device = m.size, m.device
        row, col, at = m.row, m.col, m.at
    else:
        n, device = m.shape[0], m.device
        row, col, at = (lambda i: m[i]), (lambda p: m[:, p]), (lambda ns, ss: m[ns, ss])
    slots = torch.arange(n, device=device)
    neuron_at = slots.clone()  # neuron at each slot
    slot_of = slots.clone()  # slot of each neuron
    total = 0.0
    for i in candidates.tolist():  # sequential by nature: each swap changes the next one's options
        p = int(slot_of[i])
        # cost change of swapping neuron i (at p) with the neuron at every slot q, all at once
        r = row(i)
        delta = r + col(p)[neuron_at] - r[p] - at(neuron_at, slots)
        delta[p] = 0.0
        if groups is not None:
            delta = delta.masked_fill(groups != groups[p], float("inf"))
        q = int(torch.argmin(delta))
        best = float(delta[q])
        if best < -tol:
            j = int(neuron_at[q])
            neuron_at[p], neuron_at[q] = j, i
            slot_of[i], slot_of[j] = q, p
            total += best
    return neuron_at, total


def assignment_permutation(m: torch.Tensor, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Best arrangement of a whole space given its neighbours (linear assignment on M).

    Returns ``(perm, delta)`` like :func:`greedy_swap_permutation`; ``delta`` <= 0 because
    keeping every neuron in place is one of the assignments considered. With ``groups``,
    neurons stay within their group (cross-group placements are forbidden).
    """
    cost = m.detach().to("cpu", torch.float64).numpy()
    n = cost.shape[0]
    perm = np.arange(n)
    members = (
        [np.arange(n)]
        if groups is None
        else [np.flatnonzero(groups.cpu().numpy() == g) for g in np.unique(groups.cpu().numpy())]
    )
    delta = 0.0
    for idx in members:  # groups are independent problems: one small assignment each (cubic cost)
        sub = cost[np.ix_(idx, idx)]
        rows, cols = linear_sum_assignment(sub)
        d = float(sub[rows, cols].sum() - np.trace(sub))
        if d < 0:  # > 0 is numerical noise only; never make things worse
            perm[idx[cols]] = idx[rows]  # slot cols[k] gets neuron rows[k]
            delta += d
    return torch.as_tensor(perm, device=m.device), delta


def blocked_assignment_permutation(
    graph: SpatialGraph, space: Space, cfg: WiringConfig, block: int, offset: int = 0
) -> tuple[torch.Tensor, float]:
    """Exact assignment within blocks of ``block`` consecutive slots (from ``offset``), for large spaces.

    Only each block's part of the placement-cost matrix is computed, so memory is
    O(block²) instead of O(N²). Returns ``(perm, delta)`` like :func:`assignment_permutation`.
    Usage: ``blocked_assignment_permutation(g, g.space("mlp"), cfg, 256)``.
    """
    n = space.size
    placement = Placement(graph, space, cfg)
    cuts = [0] + list(range(offset % block or block, n, block)) + [n]
    perm = torch.arange(n)
    total = 0.0
    for lo, hi in zip(cuts, cuts[1:]):
        if hi - lo < 2:
            continue
        idx = torch.arange(lo, hi)
        local, d = assignment_permutation(placement.block(idx))
        perm[lo:hi] = idx[local.cpu()]
        total += d
    return perm, total


def _permutation_index(slice_index: torch.Tensor, perm: torch.Tensor, size: int) -> torch.Tensor:
    """Index along a dimension that moves neuron perm[q]'s entries into neuron q's entries."""
    full = torch.arange(size)
    full[slice_index.reshape(-1)] = slice_index[perm.cpu()].reshape(-1)
    return full


@torch.no_grad()
def apply_permutation(
    graph: SpatialGraph,
    space: str | Space,
    perm: torch.Tensor,
    optimizer: Iterable[torch.optim.Optimizer] | torch.optim.Optimizer | None = None,
) -> None:
    """Relocate a space's neurons: slot q receives old neuron ``perm[q]``, in place.

    ``weights`` spaces permute every slice they own, plus the matching optimizer state
    (any state tensor shaped like its parameter: Adam's exp_avg/exp_avg_sq, SGD momentum),
    so training continues exactly as it would have on the permuted network; a pending
    ``.grad`` is permuted too.
    ``positions`` spaces (inputs/outputs) keep their weights and move their coordinates:
    neuron ``perm[q]`` goes to the point slot q had. Usage: ``apply_permutation(g, "hidden1", perm, opt)``.
    """
    sp = graph.space(space) if isinstance(space, str) else space
    perm = torch.as_tensor(perm, dtype=torch.long).cpu()
    if perm.shape != (sp.size,) or not torch.equal(perm.sort().values, torch.arange(sp.size)):
        raise ValueError(f"not a permutation of the {sp.size} neurons of space {sp.name!r}")
    if sp.relocate == "fixed":
        raise ValueError(f"space {sp.name!r} is fixed and cannot be relocated")
    if sp.groups is not None and not _maps_groups_onto_groups(sp.groups.cpu(), perm):
        raise ValueError(
            f"permutation splits groups of space {sp.name!r} (e.g. attention heads): each group's "
            "slots must receive all the neurons of one group"
        )
    if sp.relocate == "positions":
        if sp.positions is None:
            raise ValueError(f"space {sp.name!r} relocates its positions but has none")
        new = sp.positions.clone()
        new[perm] = sp.positions
        graph.set_positions(sp.name, new)
        return
    optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer or [])
    states = [opt.state for opt in optimizers]
    for sl in sp.slices:
        t = graph.tensor(sl.name)
        idx = _permutation_index(sl.index, perm, t.shape[sl.dim]).to(t.device)
        t.copy_(t.index_select(sl.dim, idx))
        if t.grad is not None:  # so relocating between backward() and step() is also exact
            t.grad.copy_(t.grad.index_select(sl.dim, idx))
        for state in states:
            for v in state.get(t, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == t.shape:
                    v.copy_(v.index_select(sl.dim, idx.to(v.device)))


def _maps_groups_onto_groups(groups: torch.Tensor, perm: torch.Tensor) -> bool:
    """True if every group's slots receive all the neurons of a single group (in any order)."""
    _, g = groups.unique(return_inverse=True)  # groups as 0..n-1
    src = g[perm]  # group of the neuron each slot receives
    n = int(g.max()) + 1
    lo = torch.full((n,), n).scatter_reduce(0, g, src, "amin")
    hi = torch.full((n,), -1).scatter_reduce(0, g, src, "amax")
    return bool((lo == hi).all()) and len(lo.unique()) == n


def group_assignment_permutation(m: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Best arrangement of whole groups (e.g. attention heads), each keeping its internal order.

    The cost of moving group a into group b's slots is ``Σ_k M[G[a,k], G[b,k]]`` (G: each
    group's neurons in index order), one gather and a diagonal sum for all pairs; the best
    matching of groups is a linear assignment. Returns ``(perm, delta)`` like the others.
    Usage: ``group_assignment_permutation(placement_cost(g, "blocks.0.attn", cfg), space.groups)``.
    """
    g = group_matrix(groups.cpu()).to(m.device)
    n_groups, size = g.shape
    flat = g.reshape(-1)
    pair = m[flat][:, flat].view(n_groups, size, n_groups, size).diagonal(dim1=1, dim2=3).sum(-1)  # (a, b)
    rows, cols = linear_sum_assignment(pair.detach().to("cpu", torch.float64).numpy())
    perm = torch.arange(m.shape[0], device=m.device)
    src = torch.as_tensor(rows, device=m.device)
    dst = torch.as_tensor(cols, device=m.device)
    perm[g[dst].reshape(-1)] = g[src].reshape(-1)  # slot G[b, k] receives neuron G[a, k]
    delta = float(pair[src, dst].sum() - pair.diagonal().sum())
    if delta > 0:
        return torch.arange(m.shape[0], device=m.device), 0.0
    return perm, delta


@dataclass
class RelocationStats:
    """What one relocation did: cost change and number of neurons moved, per space."""

    delta: dict[str, float]
    moved: dict[str, int]
    applied: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (space, perm) in the order applied

    @property
    def total_delta(self) -> float:
        return sum(self.delta.values())


def relocate(
    graph: SpatialGraph,
    cfg: WiringConfig | None = None,
    method: Method = "swap",
    top_k: int = 5,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    spaces: Iterable[str] | None = None,
    sweeps: int = 1,
    max_assign: int = 256,
) -> RelocationStats:
    """Sweep over the movable spaces, relocating each given its neighbours.

    ``method="swap"``: the paper's greedy swaps for the ``top_k`` neurons with the largest
    Σ|in|+Σ|out|; ``"assign"``: the exact best permutation of each space (linear assignment;
    for grouped spaces such as attention, whole heads are matched first, then each head's dims),
    repeated ``sweeps`` times. A space of more than ``max_assign`` neurons (an MLP of 3072 units, a
    vocabulary) is solved exactly within blocks of ``max_assign`` consecutive slots (linear assignment
    is cubic); odd sweeps shift the blocks by half a block so neurons can cross block borders.
    Never increases the wiring cost; never changes the function.
    Usage: ``relocate(g, WiringConfig(wf=1, l0=0.1), "swap", top_k=5, optimizer=opt)``.
    """
    cfg = cfg or WiringConfig()
    if method not in ("swap", "assign"):
        raise ValueError(f"unknown relocation method {method!r}; use 'swap' or 'assign'")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    # relocation is many small gathers and products between single-threaded assignments: on a busy
    # machine each multi-threaded small op waits for a free core (measured 0.5 ms -> 70 ms per block)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _relocate(graph, cfg, method, top_k, optimizer, spaces, sweeps, max_assign)
    finally:
        torch.set_num_threads(threads)


def _relocate(graph, cfg, method, top_k, optimizer, spaces, sweeps, max_assign) -> RelocationStats:
    names = list(spaces) if spaces is not None else [s.name for s in graph.movable_spaces()]
    delta: dict[str, float] = {}
    moved: dict[str, int] = {}
    applied: list[tuple[str, torch.Tensor]] = []
    for sweep in range(max(1, sweeps)):
        for name in names:
            sp = graph.space(name)
            if sp.relocate == "fixed" or sp.positions is None or sp.size < 2:
                continue
            if method == "swap":
                k = min(top_k, sp.size)
                cand = torch.topk(neuron_scores(graph, sp, cfg), k).indices
                placement = Placement(graph, sp, cfg)
                m = placement.full() if sp.size <= DENSE_LIMIT else placement  # a vocabulary: rows on demand
                groups = sp.groups.to(cand.device) if sp.groups is not None else None
                perm, d = greedy_swap_permutation(m, cand, groups=groups)
            elif sp.groups is None and sp.size > max_assign:  # exact within blocks of consecutive slots
                perm, d = blocked_assignment_permutation(
                    graph, sp, cfg, max_assign, offset=(sweep % 2) * max_assign // 2
                )
            else:
                m = placement_cost(graph, sp, cfg)
                if sp.groups is not None and len(sp.groups.unique()) > 1:
                    # whole groups (heads) first, then the best arrangement within each group
                    perm, d = group_assignment_permutation(m, sp.groups)
                    if bool((perm.cpu() != torch.arange(sp.size)).any()):
                        apply_permutation(graph, sp, perm, optimizer)
                        applied.append((name, perm.cpu()))
                        delta[name] = delta.get(name, 0.0) + d
                        moved[name] = moved.get(name, 0) + int((perm.cpu() != torch.arange(sp.size)).sum())
                        m = placement_cost(graph, sp, cfg)
                perm, d = assignment_permutation(m, groups=sp.groups)
            n_moved = int((perm.cpu() != torch.arange(sp.size)).sum())
            if n_moved:
                apply_permutation(graph, sp, perm, optimizer)
                applied.append((name, perm.cpu()))
            delta[name] = delta.get(name, 0.0) + d
            moved[name] = moved.get(name, 0) + n_moved
    return RelocationStats(delta, moved, applied)
