"""Remove dead neurons, channels and heads through the coupling graph: a smaller model, the same function.

First every connection weight of the graph is thresholded (``|w| <= threshold`` → 0, the rule of
:func:`topotorch.graph.active_mask`; biases, norm parameters and position tables are left alone): that
is *the thresholded original*. Then, for every hidden space, repeated until nothing changes (a removal can
kill a neighbour):

* a neuron whose **outgoing** weights are all zero is dropped — every slice it owns (rows,
  columns, biases, BatchNorm statistics) is cut out with one ``index_select`` per tensor;
* a neuron whose **incoming** weights are all zero outputs a constant ``c = f(bias)`` (``f`` the
  activation / eval-mode BatchNorm between the writer and the reader). It is dropped after
  adding ``W[:, n] · c`` to the readers' biases where that is exact: a Linear reader with a bias
  (or ``c = 0``), a conv reader without zero padding, or any reader when ``c = 0``; otherwise
  (a padded conv with ``c ≠ 0``, an unknown path between writer and reader) it is kept.

Exactness rules (each violated case keeps the neuron and is listed in ``ShrinkResult.kept_why``):

* **residual streams** — a dim is dropped only if every reader's weights for it are zero;
  streams read by a LayerNorm/GroupNorm keep every dim (removing one changes the statistics),
  as does any space a norm that mixes neurons normalises;
* **attention** (:class:`~topotorch.models.CausalSelfAttention`) — dim j of a head is dropped
  only if (a) its score term is gone: ``q_j ≡ 0`` (zero q row and bias) or ``k_j`` constant (zero
  k row: the term ``q_j·b_kj`` is the same for every key, and softmax ignores it) and (b) its
  value term is gone: zero output-projection column, or zero v row (v_j = b_vj, a convex
  combination of constants is that constant: folded into the projection bias). A head whose
  every dim satisfies (b) goes whole, whatever its q/k (dead q/k rows give *uniform* attention,
  not zero output, so they alone never remove a head). Heads keep their original score scale
  ``1/sqrt(head_dim)`` and may end up with different widths;
* **conv channels** are exact in eval mode (BatchNorm uses its running statistics); the result
  is returned in eval mode;
* inputs and outputs are never removed, and no space is emptied (one neuron stays).

    >>> res = shrink(model, graph, threshold=0.05)
    >>> res.model(x)  # == threshold_model(model, graph, 0.05)(x) to float rounding
    >>> save_shrunk("out/shrunk", res)
    ... small = load_shrunk("out/shrunk")
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from topotorch.artifacts import ArtifactError, read_artifact, write_artifact
from topotorch.compression.resize import apply_cut, attention_spec, check_cut, class_key
from topotorch.graph import Connection, Slice, Space, SpatialGraph
from topotorch.graph.core import check_threshold, common_prefix, normalised_by_feature_norm, zero_inactive_
from topotorch.models import MLP, CausalSelfAttention, ConvBlock, TokenMLP

# modules that act on each neuron separately and may sit between a writer and its reader
ELEMENTWISE = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Identity,
    nn.Dropout,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
    nn.ReLU6,
)
CHANNEL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# classes whose forward runs their children in registration order (so "between" is well defined)
SEQUENTIAL_FORWARD = (nn.Sequential, ConvBlock)

FORMAT = "topotorch-shrunk/1"


@dataclass
class ShrinkResult:
    """What :func:`shrink` produced: the smaller model and which neurons of each space it kept."""

    model: nn.Module
    kept: dict[str, torch.Tensor]  # space -> original indices of the kept neurons (sorted)
    removed: dict[str, int]  # space -> number of neurons removed
    spec: dict  # JSON-able description that rebuilds ``model`` (see :func:`build_from_spec`)
    kept_why: dict[str, dict[str, int]] = field(default_factory=dict)  # space -> {reason: dead neurons kept}
    threshold: float = 0.0

    def summary(self) -> str:
        parts = [f"{s}: {len(k)}/{len(k) + self.removed[s]}" for s, k in self.kept.items() if self.removed[s]]
        return ", ".join(parts) or "nothing removed"


# ------------------------------------------------------------------------------------------------
# model surgery helpers
# ------------------------------------------------------------------------------------------------


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _owner(tensor_name: str) -> tuple[str, str]:
    mod, _, leaf = tensor_name.rpartition(".")
    return mod, leaf


def _get(model: nn.Module, name: str) -> torch.Tensor:
    mod, leaf = _owner(name)
    m = model.get_submodule(mod) if mod else model
    t = getattr(m, leaf)
    if not isinstance(t, torch.Tensor):
        raise KeyError(f"model has no tensor {name!r}")
    return t


def _replace(model: nn.Module, name: str, new: torch.Tensor) -> None:
    """Put ``new`` where tensor ``name`` is — in every module holding the same parameter (tied weights)."""
    old = _get(model, name)
    param = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else None
    for m in model.modules():
        for k, v in list(m._parameters.items()):
            if v is old:
                m._parameters[k] = param
        for k, buf in list(m._buffers.items()):
            if buf is old:
                m._buffers[k] = new


def threshold_model(model: nn.Module, graph: SpatialGraph, threshold: float) -> nn.Module:
    """A deep copy of ``model`` with every connection weight of ``graph`` below ``threshold`` set to 0.

    This is the reference the shrunk model is exact against. Usage: ``ref = threshold_model(m, g, 0.05)``.
    """
    out = copy.deepcopy(model)
    prefix = _graph_prefix(model, graph)
    _threshold_inplace(out.get_submodule(prefix) if prefix else out, graph, threshold)
    return out


def _graph_prefix(model: nn.Module, graph: SpatialGraph) -> str:
    """'' when ``graph`` describes ``model`` itself, else the name of the submodule it describes
    (a task's wrapper around a GPT, say); a clear error when it describes neither."""
    if graph.model is model:
        return ""
    prefix = next((n for n, m in model.named_modules() if m is graph.model and n), None)
    if prefix is not None:
        return prefix
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    if all(sl.name in names for s in graph.spaces for sl in s.slices):
        return ""
    raise ValueError("graph does not describe model (its tensors are missing from the model)")


@torch.no_grad()
def _threshold_inplace(model: nn.Module, graph: SpatialGraph, threshold: float) -> None:
    if threshold <= 0:
        return
    for name in dict.fromkeys(c.weight for c in graph.connections):
        zero_inactive_(_get(model, name), threshold)


def _alive_along(w: torch.Tensor, sl: Slice) -> torch.Tensor:
    """(N,) bool: does neuron n own any nonzero entry of ``w`` along ``sl.dim``?"""
    nz = (w.detach() != 0).movedim(sl.dim, 0).reshape(w.shape[sl.dim], -1).any(1)
    return nz[sl.index.to(nz.device)].any(1).cpu()


def _alive_through(model: torch.nn.Module, connections: list, side: str, n: int) -> torch.Tensor:
    """(n,) bool: units with a nonzero weight in any of ``connections`` on their ``side``
    ("source_slice" for outgoing, "target_slice" for incoming connections)."""
    alive = torch.zeros(n, dtype=torch.bool)
    for c in connections:
        alive |= _alive_along(_get(model, c.weight), getattr(c, side))
    return alive


# ------------------------------------------------------------------------------------------------
# per-space decisions
# ------------------------------------------------------------------------------------------------


@dataclass
class _Decision:
    remove: torch.Tensor  # (N,) bool
    folds: list[tuple[str, torch.Tensor]]  # (bias tensor name, vector to add) — applied before removal
    kept_why: dict[str, int]
    free: torch.Tensor | None = None  # (N,) bool: removed without any fold (None: all of ``remove``)
    units: torch.Tensor | None = None  # (N,) unit (head) of each neuron: removed as wholes (None: neurons)


def _path_between(model: nn.Module, writer: str, reader: str) -> list[nn.Module] | None:
    """The modules run between ``writer`` and ``reader`` if both are children of one parent whose forward
    runs its children in order and everything between is per-neuron; otherwise None (unknown path)."""
    wp, _, wn = writer.rpartition(".")
    rp, _, rn = reader.rpartition(".")
    if wp != rp:
        return None
    parent = _module(model, wp) if wp else model
    if not isinstance(parent, SEQUENTIAL_FORWARD):
        return None
    names = list(parent._modules)
    if wn not in names or rn not in names or names.index(wn) >= names.index(rn):
        return None
    between = [parent._modules[n] for n in names[names.index(wn) + 1 : names.index(rn)]]
    passing: list[nn.Module] = [m for m in between if isinstance(m, ELEMENTWISE + CHANNEL_NORMS + (nn.Flatten,))]
    return passing if len(passing) == len(between) else None


@torch.no_grad()
def _constants(
    model: nn.Module, graph: SpatialGraph, sp: Space, writers: list[Connection], reader: Connection
) -> torch.Tensor | None:
    """Per-neuron constant output of a neuron with dead inputs, as ``reader`` sees it (None: unknown)."""
    if len(writers) == 1 and not isinstance(_module(model, _owner(writers[0].weight)[0]), nn.Embedding):
        c = writers[0]
        w = _get(model, c.weight)
        if c.bias is None:
            pre = w.new_zeros(sp.size)
        else:
            b = _get(model, c.bias)
            if c.target_slice.index.shape[1] != 1:
                return None
            pre = b[c.target_slice.index[:, 0].to(b.device)]
        path = _path_between(model, _owner(c.weight)[0], _owner(reader.weight)[0])
        if path is None:
            return None
        x = pre.view(1, -1, *([1] * (w.dim() - 2)))  # a 1x1 "image" for conv writers
        for m in path:
            if isinstance(m, nn.Flatten):
                continue
            if isinstance(m, CHANNEL_NORMS) and m.training:
                return None
            x = m(x)
        return x.reshape(-1)
    # embedding tables of a TokenMLP (folded embedding): a dead column outputs 0, read directly
    if isinstance(model, TokenMLP) and all(
        isinstance(_module(model, _owner(c.weight)[0]), nn.Embedding) for c in writers
    ):
        return _get(model, writers[0].weight).new_zeros(sp.size)
    return None


@torch.no_grad()
def _fold(
    model: nn.Module, reader: Connection, const: torch.Tensor, which: torch.Tensor
) -> tuple[str, torch.Tensor] | Literal[True] | None:
    """Bias change that replaces neurons ``which`` (with outputs ``const``) in ``reader``.

    Returns (bias name, delta), True if nothing needs adding (zero contribution), or None if impossible.
    """
    w = _get(model, reader.weight)
    mod = _module(model, _owner(reader.weight)[0])
    sl = reader.source_slice
    c = torch.where(which.to(const.device), const, torch.zeros_like(const))
    if not bool((c != 0).any()):
        return True
    # contribution of a constant input: per column the constant of its neuron
    per_entry = w.new_zeros(w.shape[sl.dim])
    per_entry[sl.index.reshape(-1).to(w.device)] = c.to(w.dtype).repeat_interleave(sl.index.shape[1])
    if isinstance(mod, nn.Linear) and reader.target_slice.dim == 0 and sl.dim == 1:
        delta = w @ per_entry
    elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and sl.dim == 1 and mod.groups == 1:
        pad = mod.padding
        padded = pad != "valid" if isinstance(pad, str) else any(int(p) for p in pad)
        if padded and mod.padding_mode == "zeros":  # a constant map is not constant after zero padding
            return None
        delta = w.sum(tuple(range(2, w.dim()))) @ per_entry
    else:
        return None
    if reader.bias is None:
        return None if bool((delta != 0).any()) else True
    return reader.bias, delta


def _plain(model: nn.Module, graph: SpatialGraph, sp: Space) -> _Decision:
    ins, outs = graph.incoming(sp.name), graph.outgoing(sp.name)
    why: dict[str, int] = {}
    n = sp.size
    if not outs:
        return _Decision(torch.zeros(n, dtype=torch.bool), [], why)
    out_alive = _alive_through(model, outs, "source_slice", n)
    in_alive = _alive_through(model, ins, "target_slice", n)
    if not ins:
        in_alive[:] = True
    if normalised_by_feature_norm(model, sp):
        dead = ~out_alive | ~in_alive
        if dead.any():
            why["read by a LayerNorm/GroupNorm"] = int(dead.sum())
        return _Decision(torch.zeros(n, dtype=torch.bool), [], why)
    remove = ~out_alive
    cand = ~in_alive & out_alive
    folds: list[tuple[str, torch.Tensor]] = []
    if cand.any():
        ok = True
        for r in outs:
            const = _constants(model, graph, sp, ins, r)
            f = None if const is None else _fold(model, r, const, cand)
            if f is None:
                ok = False
                break
            if f is not True:
                folds.append(f)
        if ok:
            remove |= cand
        else:  # neurons with constant output 0 can still go, whatever the reader
            zero_ok = torch.zeros(n, dtype=torch.bool)
            const = _constants(model, graph, sp, ins, outs[0]) if len(outs) == 1 else None
            if const is not None:
                zero_ok = cand & (const.cpu() == 0)
                remove |= zero_ok
            folds = []
            left = int((cand & ~zero_ok).sum())
            if left:
                why["constant output that cannot be folded into the reader"] = left
    return _Decision(remove, folds, why, free=~out_alive)


def _stream(model: nn.Module, graph: SpatialGraph, sp: Space) -> _Decision:
    outs = graph.outgoing(sp.name)
    n = sp.size
    why: dict[str, int] = {}
    out_alive = _alive_through(model, outs, "source_slice", n)
    if not outs:
        out_alive[:] = True
    if normalised_by_feature_norm(model, sp):
        if (~out_alive).any():
            why["residual stream read by a LayerNorm"] = int((~out_alive).sum())
        return _Decision(torch.zeros(n, dtype=torch.bool), [], why)
    return _Decision(~out_alive, [], why)


def _attention_module(model: nn.Module, sp: Space) -> tuple[str, CausalSelfAttention] | None:
    for sl in sp.slices:
        if sl.name.endswith(".qkv.weight") and sl.dim == 0 and sl.index.shape[1] == 3:
            name = sl.name[: -len(".qkv.weight")]
            m = _module(model, name)
            if isinstance(m, CausalSelfAttention):
                return name, m
    return None


@torch.no_grad()
def _attention(model: nn.Module, sp: Space, name: str, attn: CausalSelfAttention) -> _Decision:
    n = sp.size
    why: dict[str, int] = {}
    idx = next(s.index for s in sp.slices if s.name == f"{name}.qkv.weight" and s.dim == 0)
    pidx = next(s.index for s in sp.slices if s.name == f"{name}.proj.weight" and s.dim == 1)[:, 0]
    w = attn.qkv.weight
    rows = (w != 0).any(1).cpu()
    bias = attn.qkv.bias
    bnz = (bias != 0).cpu() if bias is not None else torch.zeros(w.shape[0], dtype=torch.bool)
    qi, ki, vi = idx[:, 0], idx[:, 1], idx[:, 2]
    q_zero = ~rows[qi] & ~bnz[qi]
    k_const = ~rows[ki]
    v_const = ~rows[vi]
    proj_zero = ~(attn.proj.weight != 0).any(0).cpu()[pidx]
    # value term removable: zero projection column, or constant v folded into the projection bias
    fold_v = v_const & ~proj_zero & bnz[vi]
    v_gone = proj_zero | v_const
    if fold_v.any() and attn.proj.bias is None:
        v_gone &= ~fold_v
        fold_v[:] = False
    qk_gone = q_zero | k_const
    groups = sp.groups if sp.groups is not None else torch.zeros(n, dtype=torch.long)
    _, g = groups.unique(return_inverse=True)
    n_groups = int(g.max()) + 1
    head_v_gone = torch.ones(n_groups, dtype=torch.long).scatter_reduce(0, g, v_gone.long(), "amin").bool()
    remove = v_gone & (qk_gone | head_v_gone[g])
    folds: list[tuple[str, torch.Tensor]] = []
    fold = fold_v & remove
    if fold.any():
        bv = torch.zeros(n, dtype=w.dtype, device=w.device)
        bv[fold.to(w.device)] = bias[vi.to(bias.device)][fold.to(bias.device)]
        folds.append((f"{name}.proj.bias", attn.proj.weight[:, pidx.to(w.device)] @ bv))
    kept_dead = v_gone & ~remove
    if kept_dead.any():
        why["attention dims with live q and k (score term) but no output"] = int(kept_dead.sum())
    if (qk_gone & ~v_gone).any():
        why["attention dims with no score term but a live value"] = int((qk_gone & ~v_gone).sum())
    return _Decision(remove, folds, why, free=remove & ~fold)


def _attention_adapter(model: nn.Module, graph: SpatialGraph, sp: Space):
    """(prefix, module, spec) when ``sp``'s incoming weights belong to an attention module with a
    :data:`~topotorch.compression.resize.ATTENTION` entry whose value projection writes ``sp``."""
    for c in graph.incoming(sp.name):
        parts = c.weight.split(".")
        for i in range(len(parts) - 1, -1, -1):
            prefix = ".".join(parts[:i])
            m = _module(model, prefix) if prefix else model
            spec = attention_spec(m) if m is not None else None
            if spec is None:
                continue
            vname = f"{prefix}.{spec.value_weight}" if prefix else spec.value_weight
            if any(x.weight == vname for x in graph.incoming(sp.name)):
                return prefix, m, spec
            break
    return None


@torch.no_grad()
def _heads(model: nn.Module, graph: SpatialGraph, sp: Space, prefix: str, module: nn.Module, spec) -> _Decision:
    """Whole heads of an attention module (grouped (head, dim) space, or a space whose neurons are heads).

    A neuron's value term is gone if its output-projection column is zero, or its value row is zero
    (v = its bias, and a convex combination of a constant is that constant: ``W_o b_v`` is folded into
    the output bias). A head goes when the value term of every neuron of it is gone (the module's
    heads keep one width, so partly dead heads stay whole).
    """
    n = sp.size
    why: dict[str, int] = {}
    units = sp.groups.unique(return_inverse=True)[1] if sp.groups is not None else torch.arange(n)
    ins, outs = graph.incoming(sp.name), graph.outgoing(sp.name)
    vname = f"{prefix}.{spec.value_weight}" if prefix else spec.value_weight
    vsl = next(c for c in ins if c.weight == vname).target_slice
    w = _get(model, vname)
    vidx = vsl.index
    if spec.fused:
        mask = vidx >= 2 * (w.shape[vsl.dim] // 3)
        if not bool((mask.sum(1) == mask.sum(1)[0]).all()) or int(mask.sum(1)[0]) == 0:
            return _Decision(torch.zeros(n, dtype=torch.bool), [], {"fused q/k/v slice without a value part": n})
        vidx = vidx[mask].view(n, -1)
    v_dead = ~_alive_along(w, Slice(vname, vsl.dim, vidx))
    out_dead = ~_alive_through(model, outs, "source_slice", n) if outs else torch.ones(n, dtype=torch.bool)
    bias = None
    if spec.value_bias is not None:
        try:
            bias = _get(model, f"{prefix}.{spec.value_bias}" if prefix else spec.value_bias)
        except (KeyError, AttributeError):
            bias = None
    bv = bias[vidx.to(bias.device)] if bias is not None else None  # (n, Kv)
    need = v_dead & ~out_dead
    if bv is not None:
        need &= (bv != 0).any(1).cpu()
    else:
        need[:] = False
    foldable = torch.ones(n, dtype=torch.bool)
    o = outs[0] if len(outs) == 1 else None
    if need.any():
        wo = _get(model, o.weight) if o is not None else None
        ko = o.source_slice.index.shape[1] if o is not None else 0
        if o is None or wo is None or wo.dim() != 2 or ko % vidx.shape[1] or o.bias is None:
            foldable = ~need
    removable = out_dead | (v_dead & foldable)
    n_units = int(units.max()) + 1
    unit_ok = torch.ones(n_units, dtype=torch.long).scatter_reduce(0, units, removable.long(), "amin").bool()
    remove = unit_ok[units]
    folds: list[tuple[str, torch.Tensor]] = []
    fold = need & remove
    if fold.any():
        # fold ⊆ need: the foldable test above saw one reader with a bias, and need needs the value biases
        assert o is not None and o.bias is not None and bv is not None
        wo = _get(model, o.weight)
        sd = o.source_slice.dim
        ocol = o.source_slice.index
        per_entry = wo.new_zeros(wo.shape[sd])
        reps = ocol.shape[1] // vidx.shape[1]
        for j in fold.nonzero().view(-1).tolist():
            per_entry[ocol[j].to(wo.device)] = bv[j].to(wo.dtype).repeat(reps)
        folds.append((o.bias, torch.tensordot(wo, per_entry, dims=([sd], [0]))))
    dead = (out_dead | v_dead) & ~remove
    if dead.any():
        what = "dims of heads that are not wholly dead" if sp.groups is not None else "heads"
        why[f"attention {what} ({type(module).__name__} heads keep one width; a value folded needs an output bias)"] = (
            int(dead.sum())
        )
    return _Decision(remove, folds, why, free=remove & ~fold, units=units)


# ------------------------------------------------------------------------------------------------
# removal
# ------------------------------------------------------------------------------------------------


def _all_slices(graph_spaces: list[Space], conns: list[Connection]) -> list[Slice]:
    seen: dict[int, Slice] = {}
    for s in graph_spaces:
        for sl in s.slices:
            seen[id(sl)] = sl
    for c in conns:
        for sl in (c.target_slice, c.source_slice):
            seen[id(sl)] = sl
    return list(seen.values())


class _CannotCut(Exception):
    """A removal that would leave a slice irregular or a module unresizable: the neurons stay."""


def _owned_slices(sp: Space, conns: list[Connection]) -> list[Slice]:
    """Every slice indexed by ``sp``'s neurons: its own and its connections' sides."""
    own = {id(sl): sl for sl in sp.slices}
    for c in conns:
        if c.target == sp.name:
            own[id(c.target_slice)] = c.target_slice
        if c.source == sp.name:
            own[id(c.source_slice)] = c.source_slice
    return list(own.values())


def _plan_cut(
    model: nn.Module, spaces: list[Space], conns: list[Connection], sp: Space, keep: torch.Tensor
) -> tuple[dict, dict[int, torch.Tensor]]:
    """What keeping neurons ``keep`` of ``sp`` cuts: ``{(tensor, dim): (old size, kept entries)}`` and the
    new index of every slice over those dimensions (other spaces' slices lose the cut entries: a
    concatenation's other part, a factored dimension). Raises _CannotCut when a slice would be irregular."""
    drop = torch.ones(sp.size, dtype=torch.bool)
    drop[keep] = False
    mine = _owned_slices(sp, conns)
    mine_ids = {id(sl) for sl in mine}
    removed: dict[tuple[str, int], list[torch.Tensor]] = {}
    for sl in mine:
        if sl.index.shape[0] != sp.size:
            raise _CannotCut(f"slice of {sl.name!r} dim {sl.dim} does not match space {sp.name!r}")
        removed.setdefault((sl.name, sl.dim), []).append(sl.index[drop].reshape(-1))
    cuts: dict = {}
    newpos: dict[tuple[str, int], torch.Tensor] = {}
    for (name, dim), parts in removed.items():
        size = _get(model, name).shape[dim]
        gone = torch.zeros(size, dtype=torch.bool)
        gone[torch.cat(parts)] = True
        kept = (~gone).nonzero().view(-1)
        pos = torch.full((size,), -1, dtype=torch.long)
        pos[kept] = torch.arange(len(kept))
        cuts[(name, dim)] = (size, kept)
        newpos[(name, dim)] = pos
    new_index: dict[int, torch.Tensor] = {}
    for sl in _all_slices(spaces, conns):
        moved = newpos.get((sl.name, sl.dim))
        if moved is None:
            continue
        if id(sl) in mine_ids:
            new_index[id(sl)] = moved[sl.index[keep]]
            continue
        mapped = moved[sl.index]
        alive = mapped >= 0
        per_row = alive.sum(1)
        if not bool((per_row == per_row[0]).all()) or int(per_row[0]) == 0:
            raise _CannotCut(
                f"{sl.name!r} dim {sl.dim} is shared with another space whose neurons would keep unequal shares"
            )
        new_index[id(sl)] = mapped[alive].view(sl.index.shape[0], -1)
    return cuts, new_index


@torch.no_grad()
def _remove(
    model: nn.Module,
    spaces: list[Space],
    conns: list[Connection],
    sp: Space,
    keep: torch.Tensor,
    cuts: dict,
    new_index: dict[int, torch.Tensor],
) -> None:
    """Keep neurons ``keep`` (sorted indices) of ``sp``: one index_select per (tensor, dim) cut, then the
    attributes of every touched module (:mod:`topotorch.compression.resize`)."""
    for (name, dim), (_, kept) in cuts.items():
        t = _get(model, name)
        _replace(model, name, t.index_select(dim, kept.to(t.device)).contiguous())
    for sl in _all_slices(spaces, conns):
        if id(sl) in new_index:
            sl.index = new_index[id(sl)]
    apply_cut(model, cuts)
    sp.size = len(keep)
    if sp.positions is not None:
        sp.positions = sp.positions[keep]
    if sp.groups is not None:
        sp.groups = sp.groups[keep]
    if sp.labels is not None:
        sp.labels = [sp.labels[i] for i in keep.tolist()]


def _fix_attributes(model: nn.Module) -> None:
    """Attributes derived from several modules (module shapes themselves are set by the resize rules)."""
    for m in model.modules():
        if isinstance(m, MLP):
            lins = [c for c in m if isinstance(c, nn.Linear)]
            m.widths = [lins[0].in_features] + [c.out_features for c in lins]


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def shrink(model: nn.Module, graph: SpatialGraph, threshold: float, max_rounds: int = 50) -> ShrinkResult:
    """Threshold ``model``'s connection weights, then cut every dead neuron/channel/head out of a copy.

    ``graph`` is the model's coupling graph (``SpatialGraph.from_chain``, ``conv_graph``,
    ``transformer_graph``, ``coupling_graph``). The original model is untouched; the returned
    model is a deep copy made of ordinary torch modules, in eval mode, that computes what
    :func:`threshold_model` computes (to float rounding). See the module docstring for the rules.
    Usage: ``res = shrink(model, graph, 0.05); res.model(x); res.removed``.
    """
    check_threshold(threshold)
    if _graph_prefix(model, graph):  # the graph describes a submodule: shrink it, copy the rest around it
        inner = shrink(graph.model, graph, threshold, max_rounds)
        outer = copy.deepcopy(model, memo={id(graph.model): inner.model}).eval()
        return ShrinkResult(outer, inner.kept, inner.removed, model_spec(outer), inner.kept_why, inner.threshold)
    work = copy.deepcopy(model).eval()
    spaces = copy.deepcopy(graph.spaces)
    conns = copy.deepcopy(graph.connections)
    _threshold_inplace(work, graph, threshold)
    # a light graph view on the copy (no validation needed: the slices stay consistent by construction)
    view = SpatialGraph(work, spaces, conns, validate=False)
    orig = {s.name: torch.arange(s.size) for s in spaces}
    why_all: dict[str, dict[str, int]] = {}
    for _ in range(max_rounds):
        changed = False
        why_all = {}
        for sp in spaces:
            if sp.role != "hidden" or sp.relocate == "positions" or sp.size <= 1:
                continue
            found = _attention_module(work, sp) if sp.groups is not None else None
            adapter = None if found is not None else _attention_adapter(work, view, sp)
            if found is not None:
                dec = _attention(work, sp, *found)
            elif adapter is not None:
                dec = _heads(work, view, sp, *adapter)
            elif sp.groups is not None:
                owner = common_prefix([sl.name.rpartition(".")[0] for sl in sp.slices])
                m = _module(work, owner)
                what = class_key(type(m)) if m is not None and owner else "an unknown module"
                why_all[sp.name] = {f"attention heads of {what}: no rule says where its values are": sp.size}
                continue
            elif sp.stream:
                dec = _stream(work, view, sp)
            else:
                dec = _plain(work, view, sp)
            if dec.kept_why:
                why_all[sp.name] = dict(dec.kept_why)
            remove = dec.remove.clone()
            units = dec.units if dec.units is not None else torch.arange(sp.size)
            if remove.all():  # never empty a space: keep one unit whose removal needed no fold (exact)
                free = dec.free if dec.free is not None else remove
                ok_units = [u for u in units.unique().tolist() if bool(free[units == u].all())]
                if not ok_units:
                    continue
                remove[units == ok_units[0]] = False
            if not remove.any():
                continue
            keep = (~remove).nonzero().view(-1)
            try:
                cuts, new_index = _plan_cut(work, spaces, conns, sp, keep)
                reason = check_cut(work, cuts)
            except _CannotCut as e:
                reason = str(e)
            if reason:
                why_all.setdefault(sp.name, {})[reason] = int(remove.sum())
                continue
            for bname, delta in dec.folds:
                b = _get(work, bname)
                b.add_(delta.to(b.dtype))
            _remove(work, spaces, conns, sp, keep, cuts, new_index)
            orig[sp.name] = orig[sp.name][keep]
            again = _attention_module(work, sp) if found is not None else None
            if again is not None:
                _update_attention(work, sp, *again)
            changed = True
        if not changed:
            break
    _fix_attributes(work)
    kept = {s.name: orig[s.name] for s in spaces}
    removed = {s.name: int(graph.space(s.name).size - s.size) for s in spaces}
    return ShrinkResult(work, kept, removed, model_spec(work), why_all, float(threshold))


def _update_attention(model: nn.Module, sp: Space, name: str, attn: CausalSelfAttention) -> None:
    if attn.scale is None:
        attn.scale = 1.0 / math.sqrt(attn.head_dims[0])  # original heads share one width
    assert sp.groups is not None  # called for attention spaces only, which have head groups
    _, counts = sp.groups.unique_consecutive(return_counts=True)
    attn.head_dims = [int(c) for c in counts]
    attn.n_heads = len(attn.head_dims)
    attn.inner = sum(attn.head_dims)


def dead_neurons(graph: SpatialGraph, threshold: float) -> dict[str, torch.Tensor]:
    """Bool mask per space: True for the neurons :func:`shrink` removes at this threshold.

    Runs the shrink on a copy; the model is untouched. Usage: ``dead_neurons(g, 0.05)["hidden1"].sum()``.
    """
    res = shrink(graph.model, graph, threshold)
    out = {}
    for s in graph.spaces:
        mask = torch.ones(s.size, dtype=torch.bool)
        mask[res.kept[s.name]] = False
        out[s.name] = mask
    return out


# ------------------------------------------------------------------------------------------------
# pickle-free save / load: module tree as JSON + tensors as safetensors
# ------------------------------------------------------------------------------------------------

_BASE_KEYS = set(nn.Module().__dict__) | {"training"}

# Where saved classes may come from, matched on the whole qualified name "module:Class". Each rule is
# (module-name pattern, whether load_shrunk may import that module when it is not imported yet). Only
# library modules that define classes are ever imported (never a ``__main__`` or any other dunder
# module); the class found must be defined exactly there (its ``__module__`` and ``__qualname__``
# equal the saved name) and be an ``nn.Module`` subclass. ``load_shrunk(..., allow=...)`` adds
# packages ("my_pkg.") or exact classes ("my_pkg.models:Net").
MODEL_CLASS_SOURCES: tuple[tuple[str, bool], ...] = (
    (r"torch\.nn\.modules\.\w+", False),  # imported by ``import torch``
    (r"topotorch\.(models|tasks(\.\w+)?|user_models)", True),  # topotorch modules that define model classes
    # (user_models: the wrapper of ``topotorch train --model hf:NAME``, so a CLI run's RUN/compact reloads)
    (r"topotorch\.(layers|compression|objectives)\.\w+", True),
    (r"topotorch(\.\w+)+", False),  # other topotorch modules: only when already imported
    (r"transformers\.models\.\w+\.modeling_\w+", True),
    (r"transformers\.(activations|pytorch_utils|modeling_utils|modeling_layers)", True),
)
# Hugging Face configuration objects (a model's ``config``, ``generation_config``): saved as JSON
# (``to_json_string``) plus the class name, rebuilt with ``cls.from_dict``. Same rules as above.
CONFIG_CLASS_SOURCES: tuple[tuple[str, bool], ...] = (
    (r"transformers\.models\.\w+\.configuration_\w+", True),
    (r"transformers\.(configuration_utils|generation\.configuration_utils)", True),
)
_CONFIG_BASES = (
    ("transformers.configuration_utils", "PretrainedConfig"),
    ("transformers.generation.configuration_utils", "GenerationConfig"),
)
# Plain functions stored as attributes (``nn.TransformerEncoderLayer.activation = F.relu``, HF's
# ``GELUActivation.act``, ``functools.partial(F.gelu, approximate="tanh")``): saved by name, looked up
# (never imported): any public function of torch.nn.functional, or one of these elementwise torch ones.
FUNCTION_SOURCES = ("torch.nn.functional", "torch")
_TORCH_FUNCTIONS = frozenset(
    {"tanh", "sigmoid", "relu", "exp", "erf", "sin", "cos", "abs", "square", "sqrt", "log", "softmax", "log_softmax"}
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _config_bases() -> tuple[type, ...]:
    """The HF config base classes, if transformers is already imported (otherwise nothing is a config)."""
    out = []
    for mod, name in _CONFIG_BASES:
        m = sys.modules.get(mod)
        base = vars(m).get(name) if m is not None else None
        if isinstance(base, type):
            out.append(base)
    return tuple(out)


def _function_name(v) -> str | None:
    if isinstance(v, type) or not callable(v) or not isinstance(getattr(v, "__name__", None), str):
        return None
    name = v.__name__
    if name.startswith("_") or not _IDENT.match(name):
        return None
    if getattr(sys.modules.get("torch.nn.functional"), name, None) is v:
        return f"torch.nn.functional:{name}"
    if name in _TORCH_FUNCTIONS and getattr(torch, name, None) is v:
        return f"torch:{name}"
    return None


class _Encoder:
    """Attributes to JSON; HF configs (shared by many modules) go once into ``objects``."""

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self._keys: dict[int, str] = {}
        self._bases = _config_bases()

    def __call__(self, v, where: str):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, tuple):
            return {"__tuple__": [self(x, where) for x in v]}
        if isinstance(v, list):
            return [self(x, where) for x in v]
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return {"__dict__": {k: self(x, where) for k, x in v.items()}}
        if isinstance(v, (set, frozenset)):
            items = sorted((self(x, where) for x in v), key=lambda e: json.dumps(e, sort_keys=True))
            return {"__frozenset__" if isinstance(v, frozenset) else "__set__": items}
        if isinstance(v, torch.dtype):
            return {"__dtype__": str(v).removeprefix("torch.")}
        if self._bases and isinstance(v, self._bases):
            return {"__object__": self._config(v)}
        name = _function_name(v)
        if name is not None:
            return {"__function__": name}
        if isinstance(v, functools.partial) and _function_name(v.func) is not None:
            return {
                "__partial__": {
                    "func": _function_name(v.func),
                    "args": [self(x, where) for x in v.args],
                    "kwargs": {k: self(x, where) for k, x in v.keywords.items()},
                }
            }
        raise ValueError(f"cannot describe attribute {where} of type {type(v).__name__} without pickle")

    def _config(self, cfg) -> str:
        key = self._keys.get(id(cfg))
        if key is None:
            key = self._keys[id(cfg)] = f"config{len(self.objects)}"
            data = json.loads(cfg.to_json_string(use_diff=False))
            # runtime settings outside to_dict (e.g. _attn_implementation_internal): kept when plain
            extra = {
                k: x
                for k, x in vars(cfg).items()
                if k.startswith("_") and k not in data and (x is None or isinstance(x, (bool, int, float, str)))
            }
            cls = type(cfg)
            self.objects[key] = {"class": f"{cls.__module__}:{cls.__qualname__}", "data": data, "extra": extra}
        return key


def _decoder(objects: dict, allow: tuple[str, ...]):
    made: dict[str, object] = {}

    def config(key: str):
        if not isinstance(key, str) or key not in made:
            entry = objects.get(key) if isinstance(objects, dict) and isinstance(key, str) else None
            if not isinstance(entry, dict) or not isinstance(entry.get("data"), dict):
                raise ValueError(f"the saved description refers to an unknown object {key!r}")
            bases = _config_bases()
            cls = _resolve(entry.get("class"), CONFIG_CLASS_SOURCES, allow, bases or (type(None),), "config class")
            cfg = cls.from_dict(dict(entry["data"]))
            for k, x in (entry.get("extra") or {}).items():
                if isinstance(k, str) and k.startswith("_") and (x is None or isinstance(x, (bool, int, float, str))):
                    cfg.__dict__[k] = x
            made[key] = cfg
        return made[key]

    def function(qual: str):
        mod, _, name = qual.partition(":") if isinstance(qual, str) else ("", "", "")
        f = getattr(sys.modules.get(mod), name, None) if mod in FUNCTION_SOURCES and _IDENT.match(name) else None
        if f is None or _function_name(f) != qual:
            raise ValueError(
                f"refusing to load function {qual!r}: only public functions of torch.nn.functional "
                f"and torch.{{{', '.join(sorted(_TORCH_FUNCTIONS))}}} are restored"
            )
        return f

    def decode(v):
        if isinstance(v, list):
            return [decode(x) for x in v]
        if isinstance(v, dict):
            if "__tuple__" in v:
                return tuple(decode(x) for x in v["__tuple__"])
            if "__dict__" in v:
                return {k: decode(x) for k, x in v["__dict__"].items()}
            if "__set__" in v:
                return {decode(x) for x in v["__set__"]}
            if "__frozenset__" in v:
                return frozenset(decode(x) for x in v["__frozenset__"])
            if "__dtype__" in v:
                dt = getattr(torch, str(v["__dtype__"]), None)
                if not isinstance(dt, torch.dtype):
                    raise ValueError(f"unknown dtype {v['__dtype__']!r} in the saved description")
                return dt
            if "__object__" in v:
                return config(v["__object__"])
            if "__function__" in v:
                return function(v["__function__"])
            if "__partial__" in v:
                p = v["__partial__"]
                if not isinstance(p, dict) or not isinstance(p.get("kwargs", {}), dict):
                    raise ValueError("corrupt function description in the saved model")
                return functools.partial(
                    function(p.get("func")),
                    *decode(p.get("args", [])),
                    **{str(k): decode(x) for k, x in p.get("kwargs", {}).items()},
                )
        return v

    return decode


def model_spec(model: nn.Module) -> dict:
    """JSON-able module tree (class, plain attributes, parameter/buffer names, children, tied tensors).

    Attributes may be plain data (numbers, strings, lists, tuples, dicts, sets, dtypes), functions of
    ``torch`` / ``torch.nn.functional`` (by name) and Hugging Face config objects (as JSON, once
    each, shared again on load). Together with the tensors it rebuilds the model
    (:func:`build_from_spec`) without pickle. Usage: ``json.dumps(model_spec(model))``.
    """
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    encode = _Encoder()

    def walk(m: nn.Module, prefix: str) -> dict:
        cls = type(m)
        node: dict[str, Any] = {
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "attrs": {},
            "params": {},
            "buffers": {},
            "children": {},
        }
        state = vars(m)
        if type(m).__getstate__ is not nn.Module.__getstate__:  # a class that leaves caches out of its state
            try:
                state = m.__getstate__()
            except Exception:  # noqa: BLE001 - any refusal (e.g. a parametrised module's): its plain attributes then
                state = vars(m)
        for k, v in state.items():
            if k in _BASE_KEYS or (k == "_flat_weights" and isinstance(m, nn.RNNBase)):  # rebuilt on load
                continue
            node["attrs"][k] = encode(v, f"{prefix}{k}")
        for k, p in m._parameters.items():
            full = f"{prefix}{k}"
            if p is None:
                node["params"][k] = None
                continue
            if id(p) in first_name:
                tied[full] = first_name[id(p)]
            else:
                first_name[id(p)] = full
            node["params"][k] = {"requires_grad": bool(p.requires_grad)}
        for k, b in m._buffers.items():
            node["buffers"][k] = None if b is None else {"persistent": k not in m._non_persistent_buffers_set}
        for k, c in m._modules.items():
            node["children"][k] = None if c is None else walk(c, f"{prefix}{k}.")
        return node

    tree = walk(model, "")
    out = {"format": FORMAT, "tree": tree, "tied": tied}
    if encode.objects:
        out["objects"] = encode.objects
    return out


def _tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, m in model.named_modules():
        pre = f"{prefix}." if prefix else ""
        for k, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            out[f"{pre}{k}"] = t.detach().cpu().contiguous()
    return out


def _source_rule(
    mod_name: str, qual: str, sources: tuple[tuple[str, bool], ...], allow: tuple[str, ...]
) -> bool | None:
    """None: not an allowed source; else whether the module may be imported if not imported yet."""
    for entry in allow:
        if ":" in entry:
            if qual == entry:
                return True
        else:
            pkg = entry.rstrip(".")
            if pkg and (mod_name == pkg or mod_name.startswith(pkg + ".")):
                return True
    may_import = None
    for pattern, importable in sources:
        if re.fullmatch(pattern, mod_name):
            may_import = bool(may_import) or importable
    return may_import


def _resolve(
    qual, sources: tuple[tuple[str, bool], ...], allow: tuple[str, ...], bases: tuple[type, ...], what: str = "class"
) -> type[Any]:
    """The class named ``qual`` ("module:Qualname") if it is exactly an allowed entry, else ValueError.

    Nothing outside the allowed sources is imported, no dunder module (``__main__``) ever, and the
    qualified name may only walk through classes (not attributes of the module that are modules).
    """
    mod_name, sep, qualname = qual.partition(":") if isinstance(qual, str) else ("", "", "")
    mparts, qparts = mod_name.split("."), qualname.split(".")
    if not sep or not all(_IDENT.match(p) and not p.startswith("__") for p in mparts + qparts):
        raise ValueError(
            f"refusing to load {what} {qual!r}: not a plain 'package.module:Class' name "
            "(no dunder parts such as __main__)"
        )
    may_import = _source_rule(mod_name, qual, sources, allow)
    if may_import is None:
        raise ValueError(
            f"refusing to load {what} {qual!r}: {mod_name!r} is not an allowed source of saved "
            "classes (torch.nn, topotorch models and layers, transformers models; pass allow=(...) "
            "to load_shrunk to add a package or an exact 'module:Class')"
        )
    mod = sys.modules.get(mod_name)
    if mod is None:
        if not may_import:
            raise ValueError(
                f"refusing to load {what} {qual!r}: module {mod_name!r} is not imported and is not "
                "one load_shrunk imports"
            )
        try:
            found = importlib.util.find_spec(mod_name)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise ValueError(f"refusing to load {what} {qual!r}: no module {mod_name!r} is installed")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"cannot load {what} {qual!r}: importing {mod_name} failed ({e})") from None
    scope: object = mod
    obj: type | None = None
    for part in qparts:
        found_obj = vars(scope).get(part)
        if not isinstance(found_obj, type):
            raise ValueError(f"refusing to load {what} {qual!r}: {part!r} is not a class defined in {mod_name}")
        scope = obj = found_obj
    assert obj is not None  # qualname.split(".") has at least one part
    if obj.__module__ != mod_name or obj.__qualname__ != qualname:
        raise ValueError(
            f"refusing to load {what} {qual!r}: it is {obj.__module__}:{obj.__qualname__}, "
            "defined outside the name saved"
        )
    if not issubclass(obj, bases):
        raise ValueError(
            f"refusing to load {what} {qual!r}: not a subclass of {' / '.join(b.__qualname__ for b in bases)}"
        )
    return obj


def build_from_spec(spec: dict, tensors: dict[str, torch.Tensor], allow: tuple[str, ...] = ()) -> nn.Module:
    """Rebuild a model from :func:`model_spec` and its tensors (their ``__init__`` is not called:
    attributes are restored as saved).

    Classes are accepted only by whole qualified name from :data:`MODEL_CLASS_SOURCES` (``torch.nn``,
    ``topotorch`` models and layers, ``transformers`` model classes) and ``allow`` (packages such as
    ``"my_pkg."`` or exact ``"my_pkg.models:Net"`` names); anything else is a ValueError naming it.
    Usage: ``build_from_spec(json.load(f)["spec"], load_file("model.safetensors"))``.
    """
    if spec.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} spec (format {spec.get('format')!r})")
    allow = (allow,) if isinstance(allow, str) else tuple(allow)
    decode = _decoder(spec.get("objects") or {}, allow)
    made: dict[str, nn.Parameter] = {}

    def build(node: dict, prefix: str) -> nn.Module:
        cls = _resolve(node["class"], MODEL_CLASS_SOURCES, allow, (nn.Module,), "class")
        new: Any = cls.__new__  # the class's own __new__ (typeshed types type.__new__ for a bare type[Any])
        m = new(cls)
        nn.Module.__init__(m)
        for k, v in node["attrs"].items():
            m.__dict__[k] = decode(v)
        for k, p in node["params"].items():
            full = f"{prefix}{k}"
            if p is None:
                m._parameters[k] = None
            elif full in spec["tied"]:
                m._parameters[k] = None  # filled after the whole tree exists
            else:
                if full not in tensors:
                    raise ValueError(f"tensor {full!r} missing from the saved tensors")
                made[full] = nn.Parameter(tensors[full], requires_grad=p["requires_grad"])
                m._parameters[k] = made[full]
        for k, b in node["buffers"].items():
            full = f"{prefix}{k}"
            if b is None:
                m._buffers[k] = None
            else:
                if full not in tensors:
                    raise ValueError(f"tensor {full!r} missing from the saved tensors")
                m._buffers[k] = tensors[full]
                if not b["persistent"]:
                    m._non_persistent_buffers_set.add(k)
        for k, c in node["children"].items():
            m._modules[k] = None if c is None else build(c, f"{prefix}{k}.")
        if isinstance(m, nn.RNNBase):  # its list of references to its own weights
            m._init_flat_weights()
        return m

    model = build(spec["tree"], "")
    for full, src in spec["tied"].items():
        mod, _, leaf = full.rpartition(".")
        (model.get_submodule(mod) if mod else model)._parameters[leaf] = made[src]
    return model.eval()


def save_shrunk(path_dir: str | Path, result: ShrinkResult) -> Path:
    """Write ``model.safetensors`` + ``shrunk.json`` (spec, kept indices, removed counts, checksum) to a folder.

    Both files are written atomically (temporary file, fsync, rename); no pickle.
    Usage: ``save_shrunk("runs/x/shrunk", shrink(model, graph, 0.05))``.
    """
    d = Path(path_dir)
    d.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "threshold": result.threshold,
        "spec": result.spec,
        "kept": {k: v.tolist() for k, v in result.kept.items()},
        "removed": result.removed,
        "kept_why": result.kept_why,
        "parameters": sum(p.numel() for p in result.model.parameters()),
    }
    write_artifact(d / "model.safetensors", d / "shrunk.json", _tensors_of(result.model), meta)
    return d


def load_shrunk(path_dir: str | Path, allow: tuple[str, ...] = ()) -> nn.Module:
    """Load a model written by :func:`save_shrunk` (checksum verified, no pickle), in eval mode.

    Model classes must be whole qualified names from ``torch.nn``, ``topotorch`` models/layers or
    ``transformers`` models (see :func:`build_from_spec`), or from ``allow``; nothing else is imported.
    Usage: ``small = load_shrunk("runs/x/shrunk")``.
    """
    d = Path(path_dir)
    st, js = d / "model.safetensors", d / "shrunk.json"
    if not st.exists() or not js.exists():
        raise FileNotFoundError(f"no shrunk model in {d} (expected model.safetensors and shrunk.json)")
    tensors, meta = read_artifact(st, js, kind=FORMAT)
    if not isinstance(meta.get("spec"), dict):
        raise ArtifactError(f"metadata {js} is corrupt: no model description in it")
    return build_from_spec(meta["spec"], tensors, allow)
