"""Knock parts of a network out and see what breaks, per output (regression) or per class.

Knocking out a neuron sets its activation to zero as everything downstream sees it: its
outgoing weights are zeroed (every slice of every outgoing connection, so a folded embedding
neuron loses both token columns); an output neuron, which has no outgoing weights, has its
incoming weights and bias zeroed (the output reads 0). Weights are restored on exit.

The other parts are knocked out with forward hooks, removed on exit (the model is untouched):

* an attention head (:func:`heads_knocked_out`): the head's slice of the input to the output
  projection is zero, so the head contributes nothing (the projection's bias stays).
  :class:`~topotorch.models.CausalSelfAttention`: a forward pre-hook on ``proj``.
  ``nn.MultiheadAttention`` never calls its ``out_proj`` module (it passes the weights to a
  functional kernel), so there the head's columns of ``out_proj.weight`` are zeroed instead
  (the same function) and restored on exit;
* a sheet region (:func:`region_knocked_out`): chosen output units of a Linear/Conv layer read
  zero, given as unit indices or a boolean (h, w) mask on the layer's
  :class:`~topotorch.sheets.CorticalSheet`;
* an FFF leaf (:func:`leaves_knocked_out`): in the hard (eval) forward, the output of every
  sample the layer's own :meth:`~topotorch.layers.fff.FFF.route` sends to a knocked-out leaf is zero.

    >>> with knocked_out(g, {"hidden1": [3, 7]}):
    ...     per_output_metric(task, model, x, y)
    >>> ablation_table(result, {"module 1": {"hidden1": [0, 1]}})  # rows: metric overall + per output
    >>> embedding_module_ablation(load_run("runs/modadd"))  # the paper's modular-addition analysis
    >>> with heads_knocked_out(model, {"gpt.blocks.0.attn": [2]}):
    ...     model(x)
    >>> head_ablation_table(model, x, y, task)  # every head of every layer, one at a time
    >>> with region_knocked_out(model, "gpt.blocks.0.mlp.0", mask_hw):
    ...     model(x)
    >>> leaf_ablation_table(model, "mlp", x, y, "accuracy")  # every used leaf of an FFF
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from topotorch.analysis import structure
from topotorch.analysis.modularity import Communities, detect_communities
from topotorch.graph import SpatialGraph
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


def _forward(model: nn.Module, x: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    if batch_size is None or len(x) <= batch_size:
        return model(x)
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def per_output_metric(
    task: Task | str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None
) -> dict:
    """The task's metric overall and per output: MSE per output column, or accuracy per true class.

    ``task``: a :class:`~topotorch.tasks.Task` (its metric: ``"mse"`` for regression, accuracy
    otherwise) or the string ``"mse"`` / ``"accuracy"``. Sequence outputs (batch, time, classes)
    count every position. ``batch_size`` evaluates ``x`` in chunks.
    Returns ``{"metric": "mse"|"accuracy", "overall": float, "per_output": [float, ...]}``
    (a class absent from ``y`` gets NaN). Usage: ``per_output_metric(t, model, d.x_test, d.y_test)``.
    """
    kind = task if isinstance(task, str) else ("mse" if task.metric == "mse" else "accuracy")
    if kind not in ("mse", "accuracy"):
        raise ValueError(f"metric must be 'mse' or 'accuracy', got {kind!r}")
    out = _forward(model, x, batch_size)
    if kind == "mse":
        per = F.mse_loss(out, y.reshape(out.shape), reduction="none").reshape(len(out), -1).mean(0)
        return {"metric": "mse", "overall": float(per.mean()), "per_output": per.double().tolist()}
    n = out.shape[-1]
    out, y = out.reshape(-1, n), y.reshape(-1)
    correct = (out.argmax(-1) == y).double()
    hits = torch.bincount(y, weights=correct, minlength=n)
    count = torch.bincount(y, minlength=n).double()
    per = torch.where(count > 0, hits / count.clamp(min=1), torch.full_like(hits, float("nan")))
    return {"metric": "accuracy", "overall": float(correct.mean()), "per_output": per.tolist()}


def ablation_table(
    result, groups: Mapping[str, NeuronSet], threshold: float | None = None, split: str = "test"
) -> list[dict]:
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
                rows.append(
                    {"name": name, "neurons": int(sum(len(np.asarray(v).reshape(-1)) for v in neurons.values())), **m}
                )
    finally:
        model.train(was_training)
    return rows


def module_groups(
    graph: SpatialGraph,
    communities: Communities | None = None,
    roles: tuple[str, ...] = ("hidden",),
    max_modules: int = 12,
) -> dict[str, dict[str, np.ndarray]]:
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

    _, offset, _total = node_spaces(graph, outputs)
    a = weighted_adjacency(graph, threshold, outputs)
    _, comp = connected_components(a, directed=False)
    label = comp[offset[space] : offset[space] + graph.space(space).size]
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
        rows.append(
            {
                "name": "full network" if te["name"] == "none" else te["name"],
                "metric": te["metric"],
                "test": te["overall"],
                "train": tr["overall"],
                "neurons_knocked_out": te["neurons"],
            }
        )
    return {"modules": [g.tolist() for g in groups], "rows": rows}


# ---------------------------------------------------------------------------------------------
# heads, sheet regions and FFF leaves: forward hooks, removed on exit
# ---------------------------------------------------------------------------------------------

Units = Sequence[int] | np.ndarray | torch.Tensor


def _submodule(model: nn.Module, name: str, what: str, known: list[str]) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        listed = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
        raise ValueError(f"{type(model).__name__} has no layer {name!r}; {what}: {listed or '(none)'}") from None


def _head_dims(m: nn.Module) -> list[int]:
    from topotorch.models import CausalSelfAttention

    if isinstance(m, CausalSelfAttention):
        dims = getattr(m, "head_dims", None)
        return list(dims) if dims is not None else [m.proj.in_features // m.n_heads] * m.n_heads
    if not isinstance(m, nn.MultiheadAttention):
        raise TypeError(f"{type(m).__name__} is not an attention layer (CausalSelfAttention / nn.MultiheadAttention)")
    return [m.embed_dim // m.num_heads] * m.num_heads


def attention_layers(model: nn.Module) -> dict[str, int]:
    """{layer name: number of heads} of every attention layer (:class:`~topotorch.models.CausalSelfAttention`
    or ``nn.MultiheadAttention``) in ``model``, in module order. Usage: ``attention_layers(gpt)``.
    """
    from topotorch.models import CausalSelfAttention

    return {
        n: len(_head_dims(m))
        for n, m in model.named_modules()
        if isinstance(m, (CausalSelfAttention, nn.MultiheadAttention))
    }


def _attention(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """The attention module called ``name``, or the one attention module directly inside it (a wrapper)."""
    from topotorch.models import CausalSelfAttention

    kinds = (CausalSelfAttention, nn.MultiheadAttention)
    m = _submodule(model, name, "attention layers", list(attention_layers(model)))
    if not isinstance(m, kinds):
        inner = [(n, c) for n, c in m.named_children() if isinstance(c, kinds)]
        if len(inner) != 1:
            raise ValueError(
                f"layer {name!r} is a {type(m).__name__}, not an attention layer; "
                f"attention layers: {', '.join(attention_layers(model)) or '(none)'}"
            )
        return f"{name}.{inner[0][0]}" if name else inner[0][0], inner[0][1]
    return name, m


def _indices(units: Units, n: int, what: str) -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(units)).reshape(-1)
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if idx.dtype == torch.bool or idx.is_floating_point():
        raise ValueError(f"{what} must be integer indices, got {idx.dtype}")
    idx = idx.to(torch.long)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{what} {idx.tolist()} out of range: there are {n} (0..{n - 1})")
    return idx


@contextlib.contextmanager
def heads_knocked_out(model: nn.Module, heads: Mapping[str, Units]) -> Iterator[nn.Module]:
    """Within the block, the heads ``{attention layer name: [head, ...]}`` contribute nothing.

    The head's slice of the output projection's input is zero (CausalSelfAttention: a forward
    pre-hook on ``proj``; nn.MultiheadAttention: those columns of ``out_proj.weight`` zeroed and
    restored). A wrapper holding one attention layer may be named instead (``TorchAttention``).
    Raises ``ValueError`` for an unknown layer or a head out of range.
    Usage: ``with heads_knocked_out(model, {"gpt.blocks.0.attn": [1, 3]}): model(x)``.
    """
    plan = []
    for name, hs in heads.items():
        full, m = _attention(model, name)
        dims = _head_dims(m)
        idx = _indices(hs, len(dims), f"heads of {full!r}")
        off = torch.tensor([0, *np.cumsum(dims).tolist()])
        dim_head = torch.repeat_interleave(torch.arange(len(dims)), torch.tensor(dims, dtype=torch.long))
        drop = torch.isin(dim_head, idx)  # (inner,) True on the knocked-out heads' dimensions
        assert len(drop) == int(off[-1])
        plan.append((m, drop))
    handles, saved = [], []
    try:
        for m, drop in plan:
            if isinstance(m, nn.MultiheadAttention):
                w = m.out_proj.weight
                saved.append((w, w.detach().clone()))
                with torch.no_grad():
                    w.masked_fill_(drop.to(w.device).unsqueeze(0), 0.0)
            else:

                def pre(_m, args, drop=drop):
                    return (args[0].masked_fill(drop.to(args[0].device), 0.0), *args[1:])

                handles.append(m.get_submodule("proj").register_forward_pre_hook(pre))
        yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for w, v in saved:
                w.copy_(v)


def _sheet_units(module: nn.Module, name: str, units: Units, shape) -> torch.Tensor:
    """(n_units,) boolean: True on the units to knock out (indices, or an (h, w) boolean mask on the sheet)."""
    from topotorch.sheets import SHEET_LAYERS, CorticalSheet, layer_tensor

    if not isinstance(module, SHEET_LAYERS):
        raise TypeError(
            f"layer {name!r} is a {type(module).__name__}; region ablation needs nn.Linear, nn.Conv1d or nn.Conv2d"
        )
    n = int(layer_tensor(module, "weight").shape[0])
    u = units.detach().cpu() if isinstance(units, torch.Tensor) else torch.as_tensor(np.asarray(units))
    if u.dtype == torch.bool:
        sheet = CorticalSheet.of(module, name, shape)
        if tuple(u.shape) != (sheet.h, sheet.w):
            raise ValueError(
                f"region mask of shape {tuple(u.shape)} does not fit layer {name!r}: its sheet is "
                f"{sheet.h}x{sheet.w}, so the mask must be ({sheet.h}, {sheet.w}) (or give unit indices)"
            )
        return u.reshape(-1).cpu()
    idx = _indices(u, n, f"units of {name!r}")
    return torch.zeros(n, dtype=torch.bool).index_fill_(0, idx, True)


@contextlib.contextmanager
def region_knocked_out(
    model: nn.Module, layer: str, units: Units, shape: tuple[int, int] | str | None = None
) -> Iterator[nn.Module]:
    """Within the block, output units ``units`` of the Linear/Conv layer ``layer`` read zero.

    ``units``: unit indices (unit i sits at row ``i // w``, column ``i % w`` of the sheet) or a
    boolean (h, w) mask on the layer's :class:`~topotorch.sheets.CorticalSheet` (``shape``: the
    sheet's shape when not the divisor rule's). Conv layers lose whole channels.
    Usage: ``with region_knocked_out(model, "gpt.blocks.0.mlp.0", mask): model(x)``.
    """
    from topotorch.sheets import SHEET_LAYERS

    known = [n for n, m in model.named_modules() if isinstance(m, SHEET_LAYERS)]
    module = _submodule(model, layer, "Linear/Conv layers", known)
    drop = _sheet_units(module, layer, units, shape)
    channel_dim = isinstance(module, (nn.Conv1d, nn.Conv2d))

    def hook(m, inp, out):
        d = drop.to(out.device)
        if channel_dim:
            d = d.view(1, -1, *([1] * (out.ndim - 2))) if out.ndim > 1 else d
        return out.masked_fill(d, 0.0)

    handle = module.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


@contextlib.contextmanager
def leaves_knocked_out(model: nn.Module, leaves: Mapping[str, Units]) -> Iterator[nn.Module]:
    """Within the block, every sample an FFF layer routes to a knocked-out leaf gets output zero.

    ``leaves``: ``{FFF layer name: [leaf, ...]}`` (``""`` names the model itself). Only the hard
    (eval) forward has one leaf per sample: a layer in training mode raises ``ValueError``, as do
    unknown layers and leaves out of range. The routing is the layer's own ``route``.
    Usage: ``with leaves_knocked_out(model.eval(), {"mlp": [3]}): model(x)``.
    """
    from topotorch.layers.fff import FFF

    known = [n for n, m in model.named_modules() if isinstance(m, FFF)]
    plan = []
    for name, ls in leaves.items():
        m = _submodule(model, name, "FFF layers", known)
        if not isinstance(m, FFF):
            raise TypeError(
                f"layer {name!r} is a {type(m).__name__}, not an FFF; FFF layers: {', '.join(known) or '(none)'}"
            )
        idx = _indices(ls, m.n_leaves, f"leaves of {name!r}")
        plan.append((m, torch.zeros(m.n_leaves, dtype=torch.bool).index_fill_(0, idx, True)))
    for m, _ in plan:
        if m.training:
            raise ValueError("leaf ablation needs the hard forward (one leaf per sample): call model.eval() first")
    handles = []

    def hook(m, args, out, drop):
        if m.training:
            raise ValueError("leaf ablation needs the hard forward (one leaf per sample): the FFF is in training mode")
        leaf = m.route(args[0])  # (...,) as the input's leading dimensions
        return out.masked_fill(drop.to(leaf.device)[leaf].unsqueeze(-1), 0.0)

    try:
        for m, drop in plan:
            handles.append(m.register_forward_hook(lambda mod, a, o, drop=drop: hook(mod, a, o, drop)))
        yield model
    finally:
        for h in handles:
            h.remove()


def _sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: Task | str,
    parts: Sequence[tuple[dict[str, Any], Callable[[], contextlib.AbstractContextManager[Any]]]],
    batch_size: int | None,
) -> list[dict]:
    """Rows: intact first, then one per (row fields, context manager factory)."""
    was = model.training
    model.eval()
    try:
        rows = [{"name": "none", **per_output_metric(task, model, x, y, batch_size)}]
        for fields, ctx in parts:
            with ctx():
                rows.append({**fields, **per_output_metric(task, model, x, y, batch_size)})
    finally:
        model.train(was)
    return rows


def head_ablation_table(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: Task | str,
    layers: Sequence[str] | None = None,
    batch_size: int | None = 4096,
) -> list[dict]:
    """The metric with each attention head knocked out alone (every head of ``layers``, default all).

    Rows (intact first): ``{"name", "layer", "head", "metric", "overall", "per_output"}`` with
    ``per_output`` the accuracy per true class or the MSE per output (see :func:`per_output_metric`).
    The model is evaluated in eval mode and left as it was. Usage: ``head_ablation_table(r.model, x, y, r.task)``.
    """
    found = attention_layers(model)
    names = list(found) if layers is None else [_attention(model, n)[0] for n in layers]
    if not names:
        raise ValueError(f"{type(model).__name__} has no attention layer (CausalSelfAttention / nn.MultiheadAttention)")
    parts = [
        ({"name": f"{n} head {h}", "layer": n, "head": h}, lambda n=n, h=h: heads_knocked_out(model, {n: [h]}))
        for n in names
        for h in range(found[n])
    ]
    return _sweep(model, x, y, task, parts, batch_size)


def leaf_ablation_table(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    task: Task | str,
    leaves: Units | None = None,
    batch_size: int | None = 4096,
) -> list[dict]:
    """The metric with each leaf of the FFF ``layer`` knocked out alone (hard forward).

    ``leaves``: which (default: every leaf some sample of ``x`` reaches; knocking out a leaf no
    sample reaches changes nothing). Rows (intact first): ``{"name", "leaf", "samples", "metric",
    "overall", "per_output"}``, ``samples`` = how many positions reach the leaf.
    Usage: ``leaf_ablation_table(model, "1", x, y, "accuracy")``.
    """
    from topotorch.layers.fff import FFF
    from topotorch.layers.fff_regions import layer_inputs

    known = [n for n, m in model.named_modules() if isinstance(m, FFF)]
    m = _submodule(model, layer, "FFF layers", known)
    if not isinstance(m, FFF):
        raise TypeError(
            f"layer {layer!r} is a {type(m).__name__}, not an FFF; FFF layers: {', '.join(known) or '(none)'}"
        )
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            routed = m.route(layer_inputs(model, layer, x)).reshape(-1)
    finally:
        model.train(was)
    counts = torch.bincount(routed.cpu(), minlength=m.n_leaves)
    chosen = (
        torch.nonzero(counts).reshape(-1) if leaves is None else _indices(leaves, m.n_leaves, f"leaves of {layer!r}")
    )
    parts = [
        (
            {"name": f"{layer or 'fff'} leaf {int(k)}", "leaf": int(k), "samples": int(counts[k])},
            lambda k=int(k): leaves_knocked_out(model, {layer: [k]}),
        )
        for k in chosen
    ]
    return _sweep(model, x, y, task, parts, batch_size)
