"""The coupling graph of an arbitrary model, found by tracing it (Torch-Pruning's DependencyGraph).

Torch-Pruning traces the model once on an example input and groups every channel dimension
that must be removed together — through residual adds, norms, activations and flattens. A
group that must be *removed* together must also be *permuted* together, so each group is one
:class:`~topotorch.graph.Space`: its neurons own the matching rows/columns of every Linear,
Conv and Embedding weight, the entries of every bias and norm parameter, the running
statistics of BatchNorm, and the ``H·W`` columns a channel becomes after a flatten.
Connections are the Linear/Conv/Embedding weights, from their input group to their output group.

What is added on top of Torch-Pruning: permutation instead of removal, spaces with
coordinates and heights, residual streams (groups written by several layers) marked as such,
and a clear error naming any layer whose parameters the graph cannot place.
Attention layers (head structure) are handled by :func:`~topotorch.graph.transformer.transformer_graph`.

    >>> g = coupling_graph(my_model, torch.randn(1, 64))
    >>> relocate(g, WiringConfig(wf=2, l0=0.5), "assign")   # the same function, lower wiring cost
"""

from __future__ import annotations

import torch
from torch import nn

from topotorch.geometry import make_layout
from topotorch.graph import Connection, Slice, Space, SpatialGraph

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)
PARAMETER_FREE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout, nn.Flatten,
                  nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                  nn.LeakyReLU, nn.ELU, nn.Softmax, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _import_tp():
    try:
        import torch_pruning as tp
    except ImportError as e:  # a dependency of the package; only missing in unusual installs
        raise ImportError("coupling_graph needs torch-pruning: pip install torch-pruning") from e
    return tp


def _slices_for(name: str, module: nn.Module, direction: str, index: torch.Tensor) -> list[Slice]:
    """The tensor slices a neuron of ``module``'s input ("in") or output ("out") dimension owns."""
    out: list[Slice] = []
    if isinstance(module, WEIGHTED):
        if getattr(module, "groups", 1) != 1:
            raise ValueError(f"cannot place layer {name!r}: grouped/depthwise convolutions are not supported")
        out.append(Slice(f"{name}.weight", 0 if direction == "out" else 1, index))
        if direction == "out" and module.bias is not None:
            out.append(Slice(f"{name}.bias", 0, index))
    elif isinstance(module, nn.Embedding):
        out.append(Slice(f"{name}.weight", 1, index))
    elif isinstance(module, NORMS):
        if isinstance(module, nn.GroupNorm) and module.num_groups != 1:
            raise ValueError(f"cannot place layer {name!r}: GroupNorm with several groups does not commute with permutations")
        for t in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, t, None) is not None:
                out.append(Slice(f"{name}.{t}", 0, index))
    return out


def coupling_graph(model: nn.Module, example_inputs: torch.Tensor | tuple, layouts: dict | None = None,
                   input_labels: list[str] | None = None, output_labels: list[str] | None = None) -> SpatialGraph:
    """Trace ``model`` on ``example_inputs`` and build its spatial graph from the coupled channel groups.

    Spaces are named after the layer that writes them (``"fc1"``, ``"blocks.0.conv1"``; a
    residual stream written by several layers is named after the first and marked
    ``stream``), plus ``input`` for the model's inputs. Raises ``ValueError`` naming any
    layer with parameters it cannot place (e.g. ``nn.MultiheadAttention``, custom layers).
    Usage: ``coupling_graph(resnet, torch.randn(1, 1, 8, 8))``.
    """
    tp = _import_tp()
    layouts = dict(layouts or {})
    names = {m: n for n, m in model.named_modules()}
    for n, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if own and not isinstance(m, WEIGHTED + NORMS + (nn.Embedding,)):
            raise ValueError(f"cannot place layer {n or type(m).__name__!r} ({type(m).__name__}): the coupling graph "
                             "knows Linear, Conv, Embedding and norm layers (use transformer_graph for attention)")
    model_was_training = model.training
    model.eval()  # tracing must not update BatchNorm statistics
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        groups = list(dg.get_all_groups(root_module_types=list(WEIGHTED) + [nn.Embedding]))
    finally:
        model.train(model_was_training)
    order = {m: i for i, m in enumerate(model.modules())}

    spaces: list[Space] = []
    owner: dict[tuple[nn.Module, str], str] = {}  # (module, "in"/"out") -> space name
    for group in groups:
        writers, members = [], []
        for dep, idxs in group:
            module, handler = dep.target.module, dep.handler.__name__
            if not isinstance(module, WEIGHTED + NORMS + (nn.Embedding,)):
                continue
            direction = "out" if "out" in handler else "in"
            if isinstance(module, NORMS):
                direction = "out"
            # Torch-Pruning merges index sets, so their order carries no meaning; every mapping it
            # applies (identity, flatten, concat, split) is monotone, so sorted order is neuron order
            members.append((module, direction, sorted(int(i) for i in idxs)))
            if direction == "out" and isinstance(module, WEIGHTED + (nn.Embedding,)):
                writers.append(module)
        if not writers:
            continue
        writers.sort(key=lambda m: order[m])
        name = names[writers[0]]
        size = len(next(i for m, d, i in members if m is writers[0] and d == "out"))
        sp = Space(name, size, make_layout(layouts.get(name), size), 0.0, "hidden", "weights", stream=len(writers) > 1)
        for module, direction, idxs in members:
            if len(idxs) % size:
                raise ValueError(f"cannot place layer {names[module]!r}: {len(idxs)} coupled indices for {size} neurons")
            index = torch.tensor(idxs, dtype=torch.long).view(size, len(idxs) // size)
            sp.slices += _slices_for(names[module], module, direction, index)
            if isinstance(module, WEIGHTED + (nn.Embedding,)):
                if (module, direction) in owner:  # e.g. a layer reading torch.cat of two groups
                    raise ValueError(
                        f"cannot place layer {names[module]!r}: its {'inputs' if direction == 'in' else 'outputs'} "
                        "are split between several coupled groups (concatenation or split); not supported yet")
                owner[(module, direction)] = name
        spaces.append(sp)

    # inputs: the input dimension of layers no group covers (the model's own inputs)
    conns: list[Connection] = []
    weighted = [m for m in model.modules() if isinstance(m, WEIGHTED + (nn.Embedding,))]
    inputs: dict[str, Space] = {}
    for m in weighted:
        if (m, "in") in owner:
            continue
        n_in = m.num_embeddings if isinstance(m, nn.Embedding) else m.weight.shape[1]
        key = "tokens" if isinstance(m, nn.Embedding) else "input"
        if key in inputs and inputs[key].size != n_in:
            key = f"input.{names[m]}"
        if key not in inputs:
            fixed = key == "tokens"
            inputs[key] = Space(key, n_in, None if fixed else make_layout(layouts.get(key), n_in), 0.0, "input",
                                "fixed" if fixed else "positions", labels=input_labels if key == "input" else None)
        if not isinstance(m, nn.Embedding):
            inputs[key].slices.append(Slice(f"{names[m]}.weight", 1, torch.arange(n_in).unsqueeze(1)))
        owner[(m, "in")] = key
    by_name = {s.name: s for s in [*inputs.values(), *spaces]}

    for m in weighted:
        if (m, "out") not in owner:
            raise ValueError(f"cannot place layer {names[m]!r}: its outputs belong to no coupled group")
        w = f"{names[m]}.weight"
        tgt, src = by_name[owner[(m, "out")]], by_name[owner[(m, "in")]]
        t_dim, s_dim = (1, 0) if isinstance(m, nn.Embedding) else (0, 1)
        t_slice = next(s for s in tgt.slices if s.name == w and s.dim == t_dim)
        s_slice = next((s for s in src.slices if s.name == w and s.dim == s_dim),
                       Slice(w, s_dim, torch.arange(src.size).unsqueeze(1)))
        bias = f"{names[m]}.bias" if getattr(m, "bias", None) is not None else None
        conns.append(Connection(w, tgt.name, src.name, t_slice, s_slice, bias))

    # heights: inputs at 0, every other space one above the highest space that feeds it
    # (residual streams: one above their first writer's input), outputs on top
    height = {s: 0.0 for s in inputs}
    for m in sorted(weighted, key=lambda m: order[m]):
        tgt, src = owner[(m, "out")], owner[(m, "in")]
        if tgt not in height:
            height[tgt] = height.get(src, 0.0) + 1.0
    readers = {owner[(m, "in")] for m in weighted}
    final = [s for s in spaces if s.name not in readers]
    for s in spaces:
        s.height = height.get(s.name, 1.0)
        if s in final:
            s.role, s.relocate, s.labels = "output", "positions", output_labels
    top = max([s.height for s in spaces] + [1.0])
    for s in final:
        s.height = top if len(final) == 1 else s.height
    all_spaces = [*inputs.values(), *spaces]
    placed = {sl.name for s in all_spaces for sl in s.slices}
    missing = [n for n, _ in model.named_parameters() if n not in placed]
    if missing:
        raise ValueError(f"cannot place parameter {missing[0]!r}: no coupled group owns it")
    return SpatialGraph(model, all_spaces, conns)
