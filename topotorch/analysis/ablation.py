"""Knock parts of a network out and see what breaks, per output (regression) or per class.

Knocking out a neuron sets its activation to zero as everything downstream sees it: its
outgoing weights are zeroed (every slice of every outgoing connection, so a folded embedding
neuron loses both token columns); an output neuron, which has no outgoing weights, has its
incoming weights and bias zeroed (the output reads 0). Weights are restored on exit.

    >>> with knocked_out(g, {"hidden1": [3, 7]}):
    ...     per_output_metric(task, model, x, y)
    >>> ablation_table(result, {"module 1": {"hidden1": [0, 1]}})          # rows: metric overall + per output
    >>> embedding_module_ablation(load_run("runs/modadd"))                  # the paper's modular-addition analysis
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from topotorch.analysis import structure
from topotorch.graph import SpatialGraph
from topotorch.analysis.modularity import Communities, detect_communities
from topotorch.tasks import Task

NeuronSet = Mapping[str, Sequence[int] | np.ndarray | torch.Tensor]


@contextlib.contextmanager
def knocked_out(graph: SpatialGraph, neurons: NeuronSet) -> Iterator[SpatialGraph]:
    """Temporarily knock out ``neurons`` ({space: indices}); the weights are restored on exit.

    Usage: ``with knocked_out(g, {"hidden2": [4]}): evaluate(...)``.
    """
    saved: dict[str, torch.Tensor] = {}

    def zero(name: str, dim: int, index: torch.Tensor) -> None:
        t = graph.tensor(name)
        if name not in saved:
            saved[name] = t.detach().clone()
        t.index_fill_(dim, index.to(t.device), 0.0)

    with torch.no_grad():
        try:
            for space, idx in neurons.items():
                sp = graph.space(space)
                idx = torch.as_tensor(np.asarray(idx, dtype=np.int64)).reshape(-1)
                if len(idx) == 0:
                    continue
                if int(idx.min()) < 0 or int(idx.max()) >= sp.size:
                    raise ValueError(f"space {space!r} has {sp.size} neurons; cannot knock out {idx.tolist()}")
                outgoing = graph.outgoing(space)
                if outgoing:
                    for c in outgoing:
                        zero(c.weight, c.source_slice.dim, c.source_slice.index[idx].reshape(-1))
                else:
                    for c in graph.incoming(space):
                        zero(c.weight, c.target_slice.dim, c.target_slice.index[idx].reshape(-1))
                        if c.bias is not None:
                            zero(c.bias, 0, c.target_slice.index[idx].reshape(-1))
            yield graph
        finally:
            for name, v in saved.items():
                graph.tensor(name).copy_(v)


@torch.no_grad()
def per_output_metric(task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The task's metric overall and per output: MSE per output column, or accuracy per true class.

    Returns ``{"metric": "mse"|"accuracy", "overall": float, "per_output": [float, ...]}``
    (a class absent from ``y`` gets NaN). Usage: ``per_output_metric(t, model, d.x_test, d.y_test)``.
    """
    out = model(x)
    if task.metric == "mse":
        per = F.mse_loss(out, y, reduction="none").reshape(len(out), -1).mean(0)
        return {"metric": "mse", "overall": float(per.mean()), "per_output": per.double().tolist()}
    correct = (out.argmax(-1) == y).double()
    n = out.shape[-1]
    hits = torch.bincount(y, weights=correct, minlength=n)
    count = torch.bincount(y, minlength=n).double()
    per = torch.where(count > 0, hits / count.clamp(min=1), torch.full_like(hits, float("nan")))
    return {"metric": "accuracy", "overall": float(correct.mean()), "per_output": per.tolist()}


def ablation_table(result, groups: Mapping[str, NeuronSet], threshold: float | None = None,
                   split: str = "test") -> list[dict]:
    """One row per group of neurons knocked out (first row: nothing knocked out).

    ``result``: a :class:`~topotorch.training.TrainResult` (``load_run(dir)``). ``threshold``:
    evaluate the thresholded network (weights with |w| <= threshold zeroed) when given.
    Each row: ``{"name", "neurons", "overall", "per_output", "metric"}``.
    Usage: ``ablation_table(load_run("runs/ind"), {"h1[0]": {"hidden1": [0]}})``.
    """
    x, y = (result.data.x_test, result.data.y_test) if split == "test" else (result.data.x_train, result.data.y_train)
    graph, model, task = result.graph, result.model, result.task
    rows = []
    ctx = structure.thresholded(graph, threshold) if threshold is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with ctx:
            base = per_output_metric(task, model, x, y)
            rows.append({"name": "none", "neurons": 0, **base})
            for name, neurons in groups.items():
                with knocked_out(graph, neurons):
                    m = per_output_metric(task, model, x, y)
                rows.append({"name": name, "neurons": int(sum(len(np.asarray(v).reshape(-1)) for v in neurons.values())), **m})
    finally:
        model.train(was_training)
    return rows


def module_groups(graph: SpatialGraph, communities: Communities | None = None, roles: tuple[str, ...] = ("hidden",),
                  max_modules: int = 12) -> dict[str, dict[str, np.ndarray]]:
    """{"module k (inputs -> outputs)": its neurons of the given roles} for the biggest communities.

    Usage: ``ablation_table(r, module_groups(r.graph))``.
    """
    communities = communities or detect_communities(graph)
    groups = {}
    for mod in communities.modules[:max_modules]:
        neurons = communities.neurons(mod["community"], roles, graph)
        if not neurons:
            continue
        ins = ",".join(mod["inputs"][:6]) + ("…" if len(mod["inputs"]) > 6 else "")
        outs = ",".join(mod["outputs"][:6]) + ("…" if len(mod["outputs"]) > 6 else "")
        groups[f"module {mod['community'] + 1} ({ins or '-'} → {outs or '-'})"] = neurons
    return groups


def embedding_modules(graph: SpatialGraph, threshold: float, space: str = "embed") -> list[np.ndarray]:
    """Groups of active neurons of ``space`` that form parallel circuits below the output layer.

    Connected components of the thresholded graph with the output layer removed (the paper's
    "modules that only meet at the logits"); components holding no active neuron of ``space``
    are dropped. When everything is one component, the modularity communities of the same
    graph split it instead. Biggest group first. Usage: ``embedding_modules(g, 0.05)``.
    """
    outputs = tuple(s.name for s in graph.spaces if s.role == "output")
    active = structure.neuron_activity(graph, threshold)[space].numpy()
    comms = detect_communities(graph, threshold=threshold, exclude=outputs)
    from scipy.sparse.csgraph import connected_components

    from topotorch.analysis.modularity import node_spaces, weighted_adjacency

    _, offset, total = node_spaces(graph, outputs)
    a = weighted_adjacency(graph, threshold, outputs)
    _, comp = connected_components(a, directed=False)
    label = comp[offset[space]: offset[space] + graph.space(space).size]
    groups = [np.nonzero((label == c) & active)[0] for c in np.unique(label[active])]
    if len(groups) <= 1:
        mem = comms.membership[space]
        groups = [np.nonzero((mem == c) & active)[0] for c in np.unique(mem[active & (mem >= 0)])]
    groups = [g for g in groups if len(g)]
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups


def embedding_module_ablation(result, threshold: float | None = None, space: str = "embed") -> dict:
    """The paper's modular-addition analysis: each embedding module alone, and all but one.

    For module k: "only k" knocks out every other neuron of ``space`` (active or not);
    "without k" knocks out module k. Reports train and test accuracy (or MSE) of the full
    network under each. Returns ``{"modules": [[neuron ids], ...], "rows": [...]}``; each row has
    ``name``, ``neurons`` (kept or removed), ``test`` and ``train``.
    Usage: ``embedding_module_ablation(load_run("runs/modular-addition"))``.
    """
    graph = result.graph
    thr = result.config.threshold if threshold is None else threshold
    groups = embedding_modules(graph, thr, space)
    n = graph.space(space).size
    spec: dict[str, dict[str, np.ndarray]] = {}
    for k, g in enumerate(groups):
        spec[f"only module {k + 1}"] = {space: np.setdiff1d(np.arange(n), g)}
        spec[f"without module {k + 1}"] = {space: g}
    all_active = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    spec["only the modules (all inactive neurons out)"] = {space: np.setdiff1d(np.arange(n), all_active)}
    test = ablation_table(result, spec, split="test")
    train = ablation_table(result, spec, split="train")
    rows = []
    for te, tr in zip(test, train):
        rows.append({"name": "full network" if te["name"] == "none" else te["name"], "metric": te["metric"],
                     "test": te["overall"], "train": tr["overall"],
                     "neurons_knocked_out": te["neurons"]})
    return {"modules": [g.tolist() for g in groups], "rows": rows}
