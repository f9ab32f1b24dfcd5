"""Modules by community detection on the weighted connectivity graph, and their modularity Q.

Nodes are the neurons of every space that has coordinates (token tables are not nodes); an
undirected edge joins two neurons with weight Σ|W| over the weights between them
(:func:`weighted_adjacency`). Communities maximise Newman's modularity

    Q = Σ_c [ L_c / m  −  (d_c / 2m)² ]

(L_c: edge weight inside community c, d_c: total degree of c, m: total edge weight), found
with python-igraph (Leiden with the *modularity* objective — igraph's Leiden defaults to CPM —
and Louvain/multilevel; the better partition wins), or networkx's Louvain when igraph is
missing. Q itself is computed here, in numpy, for any partition (:func:`modularity`).

    >>> parts = detect_communities(graph)  # Communities(q=0.71, backend='igraph-leiden', ...)
    >>> parts.q, parts.membership["hidden1"]  # (0.71, array([0, 0, 1, ...]))
    >>> [m["outputs"] for m in parts.modules]  # [['y1'], ['y2']]
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy.sparse import coo_matrix, csr_matrix

from topotorch.analysis import describe_group
from topotorch.graph import SpatialGraph, active_mask, aggregate

Backend = Literal["auto", "igraph", "networkx"]


@dataclass
class Communities:
    """A partition of a graph's neurons into modules.

    ``membership[space]``: community id per neuron (ids count from 0, biggest community first;
    neurons without any edge get -1). ``q``: modularity of the partition. ``modules``: per
    community with at least one edge, its input/output labels and size per space.
    """

    membership: dict[str, np.ndarray]
    q: float
    backend: str
    modules: list[dict] = field(default_factory=list)

    @property
    def n_communities(self) -> int:
        return len(self.modules)

    def neurons(
        self, community: int, roles: tuple[str, ...] = ("hidden",), graph: SpatialGraph | None = None
    ) -> dict[str, np.ndarray]:
        """Indices per space of the neurons of ``community``.

        Only spaces whose role is in ``roles`` when a graph is given.
        """
        out = {}
        for name, mem in self.membership.items():
            if graph is not None and graph.space(name).role not in roles:
                continue
            idx = np.nonzero(mem == community)[0]
            if len(idx):
                out[name] = idx
        return out


def node_spaces(graph: SpatialGraph, exclude: tuple[str, ...] = ()) -> tuple[list, dict[str, int], int]:
    """The spaces that are nodes (have coordinates, not excluded), each one's offset, and the node count."""
    spaces = [s for s in graph.spaces if s.positions is not None and s.name not in exclude]
    offset, total = {}, 0
    for s in spaces:
        offset[s.name] = total
        total += s.size
    return spaces, offset, total


def weighted_adjacency(graph: SpatialGraph, threshold: float = 0.0, exclude: tuple[str, ...] = ()) -> csr_matrix:
    """Symmetric (N, N) sparse matrix of Σ|W| between neurons (pairs with every |w| <= threshold dropped).

    Node order: the graph's spaces with coordinates, in order, minus ``exclude``.
    Usage: ``A = weighted_adjacency(g, 0.05)``.
    """
    _, offset, total = node_spaces(graph, exclude)
    rows, cols, vals = [], [], []
    for c in graph.connections:
        if c.target not in offset or c.source not in offset:
            continue
        w = graph.tensor(c.weight).detach()
        t_size, s_size = graph.space(c.target).size, graph.space(c.source).size
        a = aggregate(w, c, t_size, s_size).to("cpu", torch.float64)
        if threshold > 0:
            keep = aggregate(active_mask(w, threshold).to(w.dtype), c, t_size, s_size).cpu() > 0
            a = torch.where(keep, a, torch.zeros_like(a))
        t, s = a.nonzero(as_tuple=True)
        rows.append(t.numpy() + offset[c.target])
        cols.append(s.numpy() + offset[c.source])
        vals.append(a[t, s].numpy())
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cc = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    v = np.concatenate(vals) if vals else np.zeros(0)
    upper = coo_matrix((v, (r, cc)), shape=(total, total)).tocsr()
    return (upper + upper.T).tocsr()


def modularity(adjacency: csr_matrix | np.ndarray, membership: np.ndarray, resolution: float = 1.0) -> float:
    """Newman's weighted modularity Q of a partition (membership -1 = isolated, its own community).

    Usage: ``modularity(weighted_adjacency(g), labels)``.
    """
    a = csr_matrix(adjacency)
    mem = np.asarray(membership).copy()
    n = a.shape[0]
    if mem.shape != (n,):
        raise ValueError(f"membership has {mem.shape[0] if mem.ndim else 0} entries for {n} nodes")
    two_m = float(a.sum())
    if two_m <= 0:
        return 0.0
    loose = mem < 0
    mem[loose] = mem.max(initial=-1) + 1 + np.arange(int(loose.sum()))
    _, mem = np.unique(mem, return_inverse=True)
    k = np.asarray(a.sum(1)).ravel()
    coo = a.tocoo()
    inside = np.bincount(mem[coo.row], weights=coo.data * (mem[coo.row] == mem[coo.col]), minlength=mem.max() + 1)
    degree = np.bincount(mem, weights=k)
    return float(inside.sum() / two_m - resolution * np.square(degree / two_m).sum())


def _igraph_partition(a: csr_matrix, seed: int, resolution: float) -> tuple[np.ndarray, str]:
    import igraph as ig

    coo = csr_matrix(a).tocoo()
    upper = coo.row < coo.col
    g = ig.Graph(
        n=a.shape[0],
        edges=np.stack([coo.row[upper], coo.col[upper]], 1).tolist(),
        edge_attrs={"weight": coo.data[upper].tolist()},
    )
    ig.set_random_number_generator(random.Random(seed))
    try:
        leiden = np.asarray(
            g.community_leiden(
                objective_function="modularity", weights="weight", resolution=resolution, n_iterations=-1
            ).membership
        )
        louvain = np.asarray(g.community_multilevel(weights="weight", resolution=resolution).membership)
    finally:
        ig.set_random_number_generator(random)
    ql, qv = modularity(a, leiden, resolution), modularity(a, louvain, resolution)
    return (leiden, "igraph-leiden") if ql >= qv else (louvain, "igraph-multilevel")


def _networkx_partition(a: csr_matrix, seed: int, resolution: float) -> tuple[np.ndarray, str]:
    import networkx as nx

    g = nx.from_scipy_sparse_array(csr_matrix(a), edge_attribute="weight")
    parts = nx.community.louvain_communities(g, weight="weight", resolution=resolution, seed=seed)
    mem = np.empty(a.shape[0], dtype=np.int64)
    for i, p in enumerate(parts):
        mem[list(p)] = i
    return mem, "networkx-louvain"


def _have_igraph() -> bool:
    try:
        import igraph  # noqa: F401
    except ImportError:
        return False
    return True


def detect_communities(
    graph: SpatialGraph,
    threshold: float = 0.0,
    backend: Backend = "auto",
    resolution: float = 1.0,
    seed: int = 0,
    exclude: tuple[str, ...] = (),
) -> Communities:
    """Modules of the network: the modularity-maximising partition of its weighted connectivity graph.

    ``threshold`` drops weights with |w| <= threshold first (0: every weight, weighted by |w|).
    ``backend``: "igraph" (Leiden with the modularity objective and multilevel, best Q kept),
    "networkx" (Louvain), or "auto" (igraph when installed). Deterministic for a given ``seed``.
    Usage: ``detect_communities(g).q``.
    """
    if backend not in ("auto", "igraph", "networkx"):
        raise ValueError(f"unknown backend {backend!r}; use auto, igraph or networkx")
    if not (isinstance(resolution, (int, float)) and resolution > 0):
        raise ValueError(f"resolution must be a positive number, got {resolution!r}")
    spaces, offset, total = node_spaces(graph, exclude)
    a = weighted_adjacency(graph, threshold, exclude)
    degree = np.asarray(a.sum(1)).ravel()
    if total == 0 or degree.sum() == 0:
        mem = np.full(total, -1)
        used = "none"
    else:
        use_igraph = backend == "igraph" or (backend == "auto" and _have_igraph())
        mem, used = (_igraph_partition if use_igraph else _networkx_partition)(a, seed, resolution)
    mem = np.where(degree > 0, mem, -1)
    # renumber: biggest community first, ties by first node
    ids, counts = np.unique(mem[mem >= 0], return_counts=True)
    first = np.array([np.argmax(mem == i) for i in ids], dtype=np.int64) if len(ids) else np.zeros(0, np.int64)
    order = ids[np.lexsort((first, -counts))]
    remap = np.full(mem.max(initial=0) + 2, -1)
    remap[order] = np.arange(len(order))
    mem = np.where(mem >= 0, remap[mem], -1)
    q = modularity(a, mem, resolution)
    membership = {s.name: mem[offset[s.name] : offset[s.name] + s.size] for s in spaces}
    mods = []
    for cid in range(len(order)):
        mod = {"community": cid, **describe_group(spaces, {s.name: membership[s.name] == cid for s in spaces})}
        mods.append(mod)
    return Communities(membership, q, used, mods)


def importance(graph: SpatialGraph) -> dict[str, torch.Tensor]:
    """Per space with coordinates, each neuron's Σ|incoming| + Σ|outgoing| weights (CPU float64).

    Usage: ``importance(g)["hidden1"].argmax()``.
    """
    out: dict[str, torch.Tensor] = {}
    for c in graph.connections:
        t, s = graph.space(c.target), graph.space(c.source)
        a = aggregate(graph.tensor(c.weight), c, t.size, s.size).to("cpu", torch.float64)
        out[t.name] = out.get(t.name, torch.zeros(t.size, dtype=torch.float64)) + a.sum(1)
        out[s.name] = out.get(s.name, torch.zeros(s.size, dtype=torch.float64)) + a.sum(0)
    return {
        s.name: out.get(s.name, torch.zeros(s.size, dtype=torch.float64))
        for s in graph.spaces
        if s.positions is not None
    }
