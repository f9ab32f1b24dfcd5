"""What the trained structure is: active weights and neurons, connected modules, the thresholded net.

All functions read the weights through the graph, so they work for any model a graph
describes. A weight is *active* when its magnitude exceeds ``threshold``; a neuron is
active when it has an active incoming and an active outgoing connection (inputs need only
outgoing, outputs only incoming).

    >>> active_weights(g, 0.05)  # {'active': 312, 'total': 520, 'fraction': 0.6}
    >>> modules(g, 0.05)  # [{'inputs': ['x1', 'x3'], 'outputs': ['y1'], 'neurons': 17}, ...]
    >>> with thresholded(g, 0.05):
    ...     test_metric(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from topotorch.graph import Space, SpatialGraph, active_mask, aggregate, zero_inactive_


def _active_pairs(graph: SpatialGraph, c, threshold: float) -> torch.Tensor:
    """(N_target, N_source) bool: some single weight between the two neurons exceeds threshold."""
    w = graph.tensor(c.weight)
    counts = aggregate(active_mask(w, threshold).to(w.dtype), c, graph.space(c.target).size, graph.space(c.source).size)
    return counts > 0


def active_weights(graph: SpatialGraph, threshold: float) -> dict[str, float]:
    """Count the connection weights with |w| > threshold. Usage: ``active_weights(g, 0.05)``."""
    active = total = 0
    for c in graph.connections:
        w = graph.tensor(c.weight).detach()
        active += int(active_mask(w, threshold).sum())
        total += w.numel()
    return {"active": active, "total": total, "fraction": active / max(total, 1)}


def neuron_activity(graph: SpatialGraph, threshold: float) -> dict[str, torch.Tensor]:
    """Per space, a boolean mask of active neurons (see module docstring)."""
    has_in: dict[str, torch.Tensor] = {}
    has_out: dict[str, torch.Tensor] = {}
    for c in graph.connections:
        mask = _active_pairs(graph, c, threshold)
        has_in[c.target] = has_in.get(c.target, torch.zeros(mask.shape[0], dtype=torch.bool)) | mask.any(1).cpu()
        has_out[c.source] = has_out.get(c.source, torch.zeros(mask.shape[1], dtype=torch.bool)) | mask.any(0).cpu()
    out = {}
    for s in graph.spaces:
        if s.positions is None:
            continue
        n = s.size
        i = has_in.get(s.name)
        o = has_out.get(s.name)
        if i is None:
            out[s.name] = o if o is not None else torch.zeros(n, dtype=torch.bool)
        elif o is None:
            out[s.name] = i
        else:
            out[s.name] = i & o
    return out


def active_neurons(graph: SpatialGraph, threshold: float) -> dict[str, int]:
    """Number of active neurons per space. Usage: ``active_neurons(g, 0.05)["embed"]``."""
    return {k: int(v.sum()) for k, v in neuron_activity(graph, threshold).items()}


def neuron_labels(space: Space) -> list[str]:
    """A name per neuron: the space's labels, else x1.. (inputs), y1.. (outputs), ``name:i`` (hidden).

    Usage: ``neuron_labels(graph.space("output"))``.
    """
    if space.labels is not None:
        return list(space.labels)
    prefix = "x" if space.role == "input" else "y" if space.role == "output" else space.name + ":"
    return [f"{prefix}{i + 1}" if space.role != "hidden" else f"{prefix}{i}" for i in range(space.size)]


def modules(graph: SpatialGraph, threshold: float, exclude: tuple[str, ...] = ()) -> list[dict]:
    """Connected components of the thresholded connectivity graph that contain at least one edge.

    Nodes are the neurons of every space with coordinates (token tables are not nodes), minus
    ``exclude``d spaces; an edge joins two neurons whose connecting weight magnitude exceeds
    ``threshold``. Each module lists its input and output labels and its size per space,
    largest first. Usage: ``[m["inputs"] for m in modules(g, 0.05)]``.
    """
    spaces = [s for s in graph.spaces if s.positions is not None and s.name not in exclude]
    offset, total = {}, 0
    for s in spaces:
        offset[s.name] = total
        total += s.size
    rows, cols = [], []
    for c in graph.connections:
        if c.target not in offset or c.source not in offset:
            continue
        mask = _active_pairs(graph, c, threshold)
        ti, si = mask.nonzero(as_tuple=True)
        rows.append(ti.cpu().numpy() + offset[c.target])
        cols.append(si.cpu().numpy() + offset[c.source])
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    cc = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    adj = coo_matrix((np.ones(len(r)), (r, cc)), shape=(total, total))
    _, label = connected_components(adj, directed=False)
    touched = np.zeros(total, dtype=bool)
    touched[r] = True
    touched[cc] = True
    out = []
    for comp in np.unique(label[touched]):
        members = label == comp
        out.append(describe_group(spaces, {s.name: members[offset[s.name] : offset[s.name] + s.size] for s in spaces}))
    out.sort(key=lambda m: -m["neurons"])
    return out


def describe_group(spaces, members: dict[str, np.ndarray]) -> dict:
    """Sizes per space, input and output labels, and neuron count of a group of neurons (a module).

    ``members`` maps space names to boolean masks. Usage: ``describe_group(g.spaces, {"hidden1": mask})``.
    """
    mod: dict = {"inputs": [], "outputs": [], "sizes": {}}
    for s in spaces:
        mask = members.get(s.name)
        idx = np.nonzero(mask)[0] if mask is not None else np.zeros(0, dtype=np.int64)
        if len(idx) == 0:
            continue
        mod["sizes"][s.name] = len(idx)
        labels = neuron_labels(s)
        if s.role == "input":
            mod["inputs"] += [labels[i] for i in idx]
        elif s.role == "output":
            mod["outputs"] += [labels[i] for i in idx]
    mod["neurons"] = int(sum(mod["sizes"].values()))
    return mod


@contextlib.contextmanager
def thresholded(graph: SpatialGraph, threshold: float) -> Iterator[SpatialGraph]:
    """Temporarily zero every connection weight with |w| <= threshold (restored on exit).

    Usage: ``with thresholded(g, 0.05): metric = evaluate(...)``.
    """
    saved = {}
    with torch.no_grad():
        for c in graph.connections:
            w = graph.tensor(c.weight)
            saved[c.weight] = w.detach().clone()
            zero_inactive_(w, threshold)
    try:
        yield graph
    finally:
        with torch.no_grad():
            for name, v in saved.items():
                graph.tensor(name).copy_(v)
