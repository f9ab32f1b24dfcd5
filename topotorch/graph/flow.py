"""The coupling graph of any model, from its data flow: trace once, apply one rule per op, read off the spaces.

1. **Trace.** The model runs once on the example input under a ``TorchDispatchMode`` that
   sees every ATen op with its real tensors (parameters and buffers recognised by identity).
   Python control flow runs as usual, data-dependent checks included, so Hugging Face
   models, ``nn.MultiheadAttention`` and hand-written modules all trace the same way.
2. **Propagate axes.** Every dimension of every tensor gets axis labels; each op's rule
   (:mod:`topotorch.graph.rules`) joins the axes that must move together and pins those whose
   order matters (see :mod:`topotorch.graph.axes`). Heads appear by themselves: a
   ``view(B, T, H, D)`` factors the projection's output axis into (heads, dims), and
   attention's q·kᵀ joins the q and k factors. Rotary tables pin the within-head dims, a
   grouped-query repeat factors the query heads by their key/value head, ``torch.cat``
   makes a concatenated axis, a grouped convolution factors channels by group.
3. **Read off spaces.** Each weight (an operand of a matmul, convolution or embedding
   lookup) connects the axis of its output dimension to that of its input dimension. The
   outermost movable factor of each side is a space's neurons (a head, an MLP unit, a
   residual dimension, a channel); a neuron owns every entry of every parameter and buffer
   indexed by it. When a space's neurons are heads whose inner dims are free and always
   appear with their head, the space is a head's dims with ``groups`` = heads (whole heads
   swap, dims move within a head). Axes reaching the model's inputs or outputs keep their
   weights (their coordinates move instead); pinned axes are fixed.
4. **Check.** :func:`topotorch.graph.verify.check_graph` permutes every movable space of a
   float64 copy at random and compares outputs; a grouped space that fails falls back to
   whole-head moves, anything else that fails is an error naming the layer.

    >>> g = flow_graph(hf_gpt2, torch.randint(0, 100, (1, 8)))
    >>> relocate(g, WiringConfig(), "assign")  # heads and units move; the function stays
"""

from __future__ import annotations

import collections.abc
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from topotorch.geometry import make_layout
from topotorch.graph.axes import Axis, find
from topotorch.graph.core import Connection, RelocateMode, Role, Slice, Space, SpatialGraph, common_prefix
from topotorch.graph.rules import RULES, Context, Use, fresh, op_name, unknown
from topotorch.graph.transformer import head_line


def output_tensors(out) -> list[torch.Tensor]:
    """Every tensor in a model's output (tensors, tuples, lists, dicts, Hugging Face ``ModelOutput``s)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, collections.abc.Mapping):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in output_tensors(v)]
    return []


def split_inputs(example_inputs) -> tuple[tuple, dict]:
    """``x`` / ``(x, y)`` / ``{"input_ids": ...}`` -> (args, kwargs)."""
    if isinstance(example_inputs, collections.abc.Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def run_model(model: nn.Module, example_inputs):
    args, kwargs = split_inputs(example_inputs)
    return model(*args, **kwargs)


# -- 1. trace and 2. propagate ---------------------------------------------------------------------
class Ref:
    """A tensor seen during the traced forward pass (what the rules call a node)."""

    __slots__ = ("args", "kwargs", "meta", "target")

    def __init__(self, val, target=None, args=(), kwargs=None):
        self.target, self.args, self.kwargs, self.meta = target, args, kwargs or {}, {"val": val}


@dataclass
class Flow:
    """The result of propagation: the axis of every parameter/buffer dim, the weights' uses, the I/O axes."""

    tensor_axes: dict[tuple[str, int], Axis]
    uses: list[Use]
    inputs: list[Axis]
    outputs: list[Axis]


class _Recorder(TorchDispatchMode):
    """Applies each ATen op's coupling rule as the op runs (real tensors, so data-dependent Python works)."""

    def __init__(self, ctx: Context):
        super().__init__()
        self.ctx = ctx
        self.refs: dict[int, Ref] = {}
        self.alive: list = []  # keeps every tensor seen alive, so ids are never reused during the pass

    def ref(self, t: torch.Tensor) -> Ref:
        r = self.refs.get(id(t))
        if r is None:  # a tensor from outside the model's parameters, buffers and inputs: a constant
            r = Ref(t)
            self.ctx.labels[r] = fresh(t.shape, "a constant tensor") if t.ndim else []
            self.refs[id(t)] = r
            self.alive.append(t)
        return r

    def register(self, t: torch.Tensor, labels, origin=None) -> Ref:
        r = Ref(t)
        self.refs[id(t)] = r
        self.alive.append(t)
        self.ctx.labels[r] = labels
        if origin is not None:
            self.ctx.origin[r] = origin
        return r

    def _wrap(self, x):
        if isinstance(x, torch.Tensor):
            return self.ref(x)
        if isinstance(x, (list, tuple)):
            return type(x)(self._wrap(v) for v in x)
        return x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        call = Ref(out, func, self._wrap(args), {k: self._wrap(v) for k, v in kwargs.items()})
        fn = RULES.get(op_name(func), unknown)
        try:
            labels = fn(self.ctx, call)
        except Exception:  # noqa: BLE001 - an op used in a form its rule does not expect: be safe
            labels = unknown(self.ctx, call)
        if (
            str(func).split(".")[1].endswith("_")
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0]._base is not None
        ):  # writing into a view changes its base behind the labels
            unknown(self.ctx, call)
        if isinstance(out, torch.Tensor):
            self.register(out, labels, self.ctx.origin.get(call))
        elif isinstance(out, (list, tuple)) and isinstance(labels, list):
            for t, lab in zip(out, labels):
                if isinstance(t, torch.Tensor) and lab is not None:
                    self.register(t, lab)
        return out


def propagate(model: nn.Module, example_inputs) -> Flow:
    """Run ``model`` once on ``example_inputs`` and apply every op's coupling rule (steps 1 and 2).

    Float inputs are the model's inputs in space; integer and boolean inputs (token ids, masks)
    are data. Usage: ``flow = propagate(model, x)``.
    """
    ctx = Context()
    rec = _Recorder(ctx)
    tensor_axes: dict[tuple[str, int], Axis] = {}
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in named:
        lab = fresh(t.shape)
        rec.register(t, lab, (name, tuple(range(t.ndim))))
        for d, axes in enumerate(lab):  # a size-1 dim (a one-channel input) is a space of one neuron
            tensor_axes[(name, d)] = axes[0] if axes else Axis(1)
    inputs: list[Axis] = []
    args, kwargs = split_inputs(example_inputs)
    for t in pytree.tree_leaves((list(args), kwargs)):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            lab = fresh(t.shape)
            rec.register(t, lab)
            inputs += [a for d in lab for a in d]
    was_training = model.training
    model.eval()  # no BatchNorm statistics updates, no dropout
    try:
        # grad mode on: with it off, nn.TransformerEncoderLayer and nn.MultiheadAttention take fused fast paths
        # (one opaque op per layer); with it on they run the ops the rules know
        with torch.enable_grad(), warnings.catch_warnings(), rec:
            warnings.simplefilter("ignore")
            out = output_tensors(run_model(model, example_inputs))
    except Exception as e:  # the model's own error, re-raised with context
        raise ValueError(f"could not run {type(model).__name__} on the example input: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    outputs = [a for t in out for d in ctx.labels.get(rec.refs.get(id(t)), []) for a in d]
    return Flow(tensor_axes, ctx.uses, inputs, outputs)


def _mark(a: Axis, role: str) -> None:
    r = find(a)
    if role in r.roles:
        return
    r.roles.add(role)
    for c in (r.factors or []) + (r.parts or []):
        _mark(c, role)


# -- 3. read off spaces -----------------------------------------------------------------------------
def _coords(a: Axis, ambiguous: set[int]) -> dict[int, torch.Tensor]:
    """For every axis node inside ``a``: its coordinate at each index of ``a`` (-1 where absent)."""
    r = find(a)
    n = r.size
    out = {r.id: torch.arange(n)}
    if r.factors:
        idx = torch.arange(n)
        stride = n
        for f in r.factors:
            s = find(f).size
            stride //= s
            local = (idx // stride) % s
            for k, v in _coords(f, ambiguous).items():
                if k in out:
                    ambiguous.add(k)
                out[k] = v[local]
    elif r.parts:
        start = 0
        for p in r.parts:
            s = find(p).size
            for k, v in _coords(p, ambiguous).items():
                arr = out.setdefault(k, torch.full((n,), -1))
                arr[start : start + s] = v
            start += s
    return out


def _leaves_in_order(a: Axis) -> list[Axis]:
    r = find(a)
    kids = r.factors or r.parts
    return [leaf for k in kids for leaf in _leaves_in_order(k)] if kids else [r]


def _primaries(a: Axis) -> list[Axis]:
    """The axis that stands for a weight dimension's neurons, per concatenated part."""
    r = find(a)
    if r.parts:
        return [p for part in r.parts for p in _primaries(part)]
    cands = [x for x in _leaves_in_order(r) if not x.uniform]
    for ok in (lambda x: not x.pinned and not x.roles, lambda x: not x.pinned, lambda x: True):
        pick = next((x for x in cands if ok(x)), None)
        if pick is not None:
            return [pick]
    return []


def _contains(a: Axis, target: Axis) -> bool:
    r = find(a)
    return r is target or any(_contains(c, target) for c in (r.factors or []) + (r.parts or []))


def _inner(a: Axis, head: Axis) -> tuple[torch.Tensor, set[int]]:
    """Coordinate, at each index of ``a``, within the last factor of the outermost product that has
    ``head`` in an earlier factor (the dims of a head); -1 where there is none."""
    r = find(a)
    n = r.size
    res, inners = torch.full((n,), -1), set()
    if r.factors:
        idx = torch.arange(n)
        for j, f in enumerate(r.factors):
            if not _contains(f, head):
                continue
            last = find(r.factors[-1])
            if j < len(r.factors) - 1:
                return idx % last.size, {last.id}
            sub, inn = _inner(f, head)
            return sub[idx % last.size], inn
    elif r.parts:
        start = 0
        for p in r.parts:
            s = find(p).size
            if _contains(p, head):
                sub, inn = _inner(p, head)
                res[start : start + s] = sub
                inners |= inn
            start += s
    return res, inners


def _slice_index(owner: torch.Tensor, n: int) -> torch.Tensor | None:
    """(n, K) indices each neuron owns, from the owner of each index (-1: none); None if irregular."""
    valid = (owner >= 0).nonzero().squeeze(1)
    if valid.numel() == 0 or valid.numel() % n:
        return None
    own = owner[valid]
    if not torch.equal(torch.bincount(own, minlength=n), torch.full((n,), valid.numel() // n)):
        return None
    return valid[torch.argsort(own, stable=True)].view(n, -1)


@dataclass
class _Plan:
    axis: Axis
    name: str = ""
    grouped_dims: int = 0  # > 0: neurons are (head, dim) pairs, this many dims per head
    reason: str | None = None  # why it cannot move (None: it can)
    lookup: bool = False  # rows of a table looked up by index: tokens, position tables


def _averaged(roots) -> set[int]:
    """Ids of the axes a mean/variance/norm runs over, directly or through an axis they are part of."""
    out: set[int] = set()
    seen: set[tuple[int, bool]] = set()
    stack = [(find(r), False) for r in roots]
    while stack:
        a, inherited = stack.pop()
        if (a.id, inherited) in seen:
            continue
        seen.add((a.id, inherited))
        flag = inherited or a.averaged
        if flag:
            if a.id in out:
                continue
            out.add(a.id)
        stack += [(find(c), flag) for c in (a.factors or []) + (a.parts or [])]
    return out


def _heights(uses, occurrences, spaces: dict[int, Space]) -> dict[int, float]:
    """Drawing heights in forward order: a space sits one above the highest space it reads; a residual
    stream is read at the height of its latest writer (and drawn at 0.5, copied at each layer boundary)."""
    height: dict[int, float] = {}
    stream_level: dict[int, float] = {}
    for u in uses:
        targets = [p.id for p in _primaries(occurrences[(u.param, u.target_dim)]) if p.id in spaces]
        sources = [p.id for p in _primaries(occurrences[(u.param, u.source_dim)]) if p.id in spaces]
        level = max([stream_level.get(s, 0.0) if spaces[s].stream else height.get(s, 0.0) for s in sources] + [0.0])
        for t in targets:
            if t in sources:
                continue
            if spaces[t].stream:
                stream_level[t] = max(stream_level.get(t, 0.0), level)
                height[t] = 0.5
            else:
                height[t] = max(height.get(t, 0.0), level + 1.0)
    return height


def _table_of(ax: Axis, occurrences, coords) -> str:
    """The module whose table is indexed by ``ax`` (e.g. ``transformer.wpe``), for naming."""
    for key in occurrences:
        if ax.id in coords[key]:
            return key[0].rpartition(".")[0] or key[0]
    return "tokens"


def _grouped_dims(head: Axis, occurrences, coords, ambiguous) -> int:
    """Dims per head if the space can be (head, dim) neurons moving within their head, else 0."""
    if head.pinned or head.roles or head.id in ambiguous:
        return 0
    inner_ids: set[int] = set()
    size = None
    for key, a in occurrences.items():
        c = coords[key].get(head.id)
        if c is None:
            continue
        inner, ids = _inner(a, head)
        if not ids or bool(((c >= 0) & (inner < 0)).any()):
            return 0
        inner_ids |= ids
    nodes = {}
    for a in occurrences.values():
        for leaf in _leaves_in_order(a):
            nodes[leaf.id] = leaf
    for a in occurrences.values():
        r = find(a)
        stack = [r]
        while stack:
            x = find(stack.pop())
            nodes[x.id] = x
            stack += (x.factors or []) + (x.parts or [])
    inner_axes = [nodes[i] for i in inner_ids if i in nodes]
    sizes = {x.size for x in inner_axes}
    if len(sizes) != 1 or next(iter(sizes)) < 2:
        return 0
    size = sizes.pop()
    inner_tree = set()
    for x in inner_axes:
        stack = [x]
        while stack:
            y = find(stack.pop())
            if y.pinned or y.uniform or y.roles:
                return 0
            inner_tree.add(y.id)
            stack += (y.factors or []) + (y.parts or [])
    for key in occurrences:  # the dims must never appear without their head (or per-head moves break)
        if inner_tree & set(coords[key]) and head.id not in coords[key]:
            return 0
    return size


def build_graph(
    model: nn.Module,
    flow: Flow,
    layouts: dict | None = None,
    input_labels: list[str] | None = None,
    output_labels: list[str] | None = None,
    unknown_ops: str = "raise",
    ungrouped: frozenset[str] = frozenset(),
) -> SpatialGraph:
    """Spaces and connections from propagated axes (step 3 of the module docstring)."""
    layouts = dict(layouts or {})
    for a in flow.inputs:
        _mark(a, "input")
    for a in flow.outputs:
        _mark(a, "output")
    occurrences = {k: find(a) for k, a in flow.tensor_axes.items()}
    ambiguous: set[int] = set()
    coords = {k: _coords(a, ambiguous) for k, a in occurrences.items()}
    last: dict[str, Use] = {}  # a tied or shared weight is one connection: its last use (a tied table: the output head)
    for u in flow.uses:
        if (u.param, u.target_dim) in occurrences and (u.param, u.source_dim) in occurrences:
            last[u.param] = u
    valid = [u for u in flow.uses if (u.param, u.target_dim) in occurrences and (u.param, u.source_dim) in occurrences]
    uses = [u for u in valid if last.get(u.param) is u]
    plans: dict[int, _Plan] = {}
    writers: dict[int, list[str]] = {}
    readers: dict[int, list[str]] = {}
    order: list[int] = []
    for u in valid:
        for dim, is_target in ((u.source_dim, False), (u.target_dim, True)):
            for p in _primaries(occurrences[(u.param, dim)]):
                if p.id not in plans:
                    plans[p.id] = _Plan(p)
                    order.append(p.id)
                (writers if is_target else readers).setdefault(p.id, []).append(u.param.rpartition(".")[0] or u.param)

    # names: inputs, tokens, outputs, and otherwise the first layer that writes the space
    taken: set[str] = set()

    def unique(base: str) -> str:
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}.{k}"
        taken.add(name)
        return name

    n_out = sum("output" in plans[i].axis.roles for i in order)
    for i in order:
        plan, ax = plans[i], plans[i].axis
        if "output" in ax.roles:
            base = "output" if n_out == 1 else (writers.get(i, ["output"])[0])
        elif "input" in ax.roles or not writers.get(i):
            lookup = ax.pinned and not ax.roles  # rows of a table looked up by index (tokens, positions)
            if lookup:
                base = "tokens" if "tokens" not in taken else _table_of(ax, occurrences, coords)
            elif ax.roles or ax.size == 1:
                base = "input"
            else:  # read but never written as a whole: e.g. the per-group dims a grouped conv reads
                base = _table_of(ax, occurrences, coords) + ".dims"
            plan.lookup = bool(lookup)
        else:
            mods = list(dict.fromkeys(writers[i]))
            common = common_prefix(mods) if len(mods) > 1 and len(readers.get(i, [])) <= 1 else ""
            base = common or mods[0]  # e.g. the attention module for its q/k/v projections
        plan.name = unique(base)
        if ax.pinned and not ax.roles and not plan.lookup:
            plan.reason = ax.pinned
        if ax.id in ambiguous:
            plan.reason = "it indexes a weight twice (an outer product of itself)"
        if plan.reason is None and not ax.roles and plan.name not in ungrouped:
            plan.grouped_dims = _grouped_dims(ax, occurrences, coords, ambiguous)

    for i in order:
        plan = plans[i]
        if plan.reason and plan.reason.startswith("unknown op") and unknown_ops == "raise" and not plan.axis.roles:
            who = f"written by {writers[i][0]!r}" if writers.get(i) else f"read by {readers[i][0]!r}"
            raise ValueError(
                f"cannot place the neurons {who}: {plan.reason}, so moving them "
                "could change what the model computes (pass unknown_ops='fix' to keep them in place)"
            )

    averaged = _averaged(occurrences.values())
    spaces: dict[int, Space] = {}
    slices: dict[tuple[int, str, int], Slice] = {}
    for i in order:
        plan, ax = plans[i], plans[i].axis
        g = plan.grouped_dims
        n = ax.size * g if g else ax.size
        sp_slices: list[Slice] = []
        for key, a in occurrences.items():
            c = coords[key].get(ax.id)
            if c is None:
                continue
            owner = c
            if g:
                inner, _ = _inner(a, ax)
                owner = torch.where(c >= 0, c * g + inner, c)
            index = _slice_index(owner, n)
            if index is None:
                plan.reason = plan.reason or f"{key[0]!r} gives its neurons unequal shares"
                continue
            sl = Slice(key[0], key[1], index)
            sp_slices.append(sl)
            slices[(i, key[0], key[1])] = sl
        roles = ax.roles
        sole_input = ax.size == 1 and not writers.get(i)  # e.g. the one channel of a grey-scale image
        role: Role = (
            "output" if "output" in roles else "input" if ("input" in roles or plan.lookup or sole_input) else "hidden"
        )
        relocate: RelocateMode
        if role != "hidden":
            relocate = "fixed" if plan.lookup or sole_input else "positions"
        else:
            relocate = "fixed" if plan.reason else "weights"
        if plan.lookup:
            positions = None
        elif g and plan.name not in layouts:
            positions = head_line(ax.size, g)
        else:
            positions = make_layout(layouts.get(plan.name), n)
        labels = None
        if role == "input" and input_labels is not None and len(input_labels) == n:
            labels = list(input_labels)
        elif role == "output" and output_labels is not None and len(output_labels) == n:
            labels = list(output_labels)
        elif g:
            labels = [f"h{j // g}.{j % g}" for j in range(n)]
        stream = len(writers.get(i, [])) > 1 and len(readers.get(i, [])) > 1  # a residual stream
        spaces[i] = Space(
            plan.name,
            n,
            positions,
            0.0,
            role,
            relocate,
            sp_slices,
            labels,
            groups=torch.arange(n) // g if g else None,
            stream=stream,
            reason=plan.reason,
            normalised=ax.id in averaged,
        )

    conns: list[Connection] = []
    for u in uses:
        targets = list(dict.fromkeys(p.id for p in _primaries(occurrences[(u.param, u.target_dim)])))
        sources = list(dict.fromkeys(p.id for p in _primaries(occurrences[(u.param, u.source_dim)])))
        bias = u.bias if len(targets) == 1 else None  # penalised once, with the weight's first connection
        for t in targets:
            for s in sources:
                if t == s or (t, u.param, u.target_dim) not in slices or (s, u.param, u.source_dim) not in slices:
                    continue
                conns.append(
                    Connection(
                        u.param,
                        spaces[t].name,
                        spaces[s].name,
                        slices[(t, u.param, u.target_dim)],
                        slices[(s, u.param, u.source_dim)],
                        bias,
                    )
                )
                bias = None
    height = _heights(valid, occurrences, spaces)
    connected = {c.target for c in conns} | {c.source for c in conns}
    top = max(list(height.values()) + [1.0])
    for i, sp in spaces.items():
        sp.height = top if sp.role == "output" and n_out == 1 else height.get(i, 0.0)
        if sp.name not in connected and sp.relocate != "fixed":
            sp.relocate = "fixed"
            sp.reason = "it has no connections"
    known = {sp.name for sp in spaces.values()}
    for name in layouts:
        if name not in known:
            raise ValueError(f"layout given for unknown space {name!r}; spaces: {', '.join(sorted(known))}")
    return SpatialGraph(model, list(spaces.values()), conns)


def flow_graph(
    model: nn.Module,
    example_inputs,
    layouts: dict | None = None,
    input_labels: list[str] | None = None,
    output_labels: list[str] | None = None,
    verify: bool = True,
    unknown_ops: str = "raise",
) -> SpatialGraph:
    """The spatial graph of any traceable model, checked to preserve its function.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs
    (``{"input_ids": ids, "attention_mask": mask}``). ``verify=False`` skips the safety net
    (for a huge model already checked once). ``unknown_ops="fix"`` keeps neurons that pass
    through an op without a coupling rule in place instead of raising.
    Usage: ``g = flow_graph(BertModel(cfg), torch.randint(0, 100, (2, 8)))``.
    """
    if unknown_ops not in ("raise", "fix"):
        raise ValueError(f"unknown_ops must be 'raise' or 'fix', got {unknown_ops!r}")
    flow = propagate(model, example_inputs)
    graph = build_graph(model, flow, layouts, input_labels, output_labels, unknown_ops)
    if verify:
        from topotorch.graph.verify import check_graph

        failed = check_graph(graph, example_inputs, raise_on_failure=False)
        grouped = {name for name in failed if graph.space(name).groups is not None}
        if grouped:  # per-head moves broke the function: fall back to whole heads and check again
            graph = build_graph(model, flow, layouts, input_labels, output_labels, unknown_ops, frozenset(grouped))
            failed = check_graph(graph, example_inputs, raise_on_failure=False)
        if failed:
            from topotorch.graph.verify import refusal

            raise ValueError(refusal(graph, failed))
    return graph
