"""Per-op coupling rules: how each ATen op links the axes of its inputs and outputs.

A traced forward pass (:mod:`topotorch.graph.flow`) is a list of ATen ops. For each op, one
rule from :data:`RULES` reads the axis labels of the op's tensor inputs and returns the
labels of its outputs, joining axes that must be permuted together (:func:`~.axes.unify`)
and fixing those whose order matters (:func:`~.axes.pin`). A label is one tuple of axes per
dimension (the dimension's row-major factors; ``()`` for a size-1 dimension).

The safe default: an op without a rule pins every axis it touches, so an unknown op can
only make the graph less movable, never wrong. Adding support for an op is one function:

    >>> @rule("aten.my_op")
    ... def _my_op(ctx, node):
    ...     return ctx.label(node.args[0])  # shape- and order-preserving
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from topotorch.graph.axes import Axis, ensure_cuts, ensure_factors, find, pin, unify

Label = list[tuple[Axis, ...]]
RULES: dict[str, Callable] = {}


def rule(*names: str) -> Callable:
    """Register a rule for the ops named (``"aten.add"``: every overload of ``aten.add``)."""

    def deco(fn: Callable) -> Callable:
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def op_name(target) -> str:
    """``aten.add.Tensor`` -> ``aten.add`` (in-place ``add_`` -> ``add``); Python's getitem -> ``getitem``."""
    if target is operator.getitem:
        return "getitem"
    s = str(target)
    parts = s.split(".")
    if len(parts) >= 2 and parts[0] == "aten":
        base = parts[1]
        if base.endswith("_") and not base.startswith("_"):
            base = base[:-1]
        return f"aten.{base}"
    return s


@dataclass
class Use:
    """A parameter used as the weight of a connection: which of its dims receive and which send."""

    param: str
    target_dim: int
    source_dim: int
    bias: str | None = None


@dataclass
class Context:
    """What the rules read and write while walking the traced graph."""

    labels: dict = field(default_factory=dict)  # fx node -> Label (or list of Labels for tuple outputs)
    origin: dict = field(default_factory=dict)  # fx node -> (param name, param dim of each node dim or None)
    uses: list[Use] = field(default_factory=list)

    # -- reading ---------------------------------------------------------------------------------
    def is_tensor(self, x) -> bool:
        return hasattr(x, "meta") and isinstance(x.meta.get("val"), torch.Tensor)

    def shape(self, x) -> tuple[int, ...]:
        return tuple(int(s) for s in x.meta["val"].shape)

    def label(self, x) -> Label:
        return self.labels[x]

    def tensor_args(self, node) -> list:
        flat = []
        for a in list(node.args) + list(node.kwargs.values()):
            if isinstance(a, (list, tuple)):
                flat += [b for b in a if self.is_tensor(b)]
            elif self.is_tensor(a):
                flat.append(a)
        return flat


# -- label helpers ---------------------------------------------------------------------------------
def fresh(shape, pinned: str | None = None, uniform: bool = False) -> Label:
    return [() if s == 1 else (Axis(s, pinned=pinned, uniform=uniform),) for s in shape]


def dim_axis(lab: tuple[Axis, ...], size: int) -> Axis:
    """One axis for a whole dimension (a product axis when the dimension has several factors)."""
    if len(lab) == 1:
        return find(lab[0])
    if not lab:
        return Axis(size, uniform=True)
    a = Axis(size)
    a.factors = list(lab)
    return a


def join(a: tuple[Axis, ...], b: tuple[Axis, ...], size: int) -> None:
    if size == 1:
        return
    if len(a) == len(b) and all(find(x).size == find(y).size for x, y in zip(a, b)):
        for x, y in zip(a, b):
            unify(x, y)
    else:
        unify(dim_axis(a, size), dim_axis(b, size))


def pin_label(lab: Label, reason: str) -> None:
    for d in lab:
        for a in d:
            pin(a, reason)


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


# -- the default: unknown ops pin what they touch ---------------------------------------------------
def unknown(ctx: Context, node) -> Label | list:
    reason = f"unknown op: it flows through {op_name(node.target)}, which topotorch's coupling rules do not know"
    for a in ctx.tensor_args(node):
        pin_label(ctx.label(a), reason)
    return _fresh_like(node.meta.get("val"), reason)


def _fresh_like(val, reason: str | None, uniform: bool = False):
    if isinstance(val, torch.Tensor):
        return fresh(val.shape, pinned=reason, uniform=uniform)
    if isinstance(val, (list, tuple)):
        return [_fresh_like(v, reason, uniform) for v in val]
    return None


# -- shape-preserving and elementwise ------------------------------------------------------------
def _track_origin(ctx: Context, node, src, dims) -> None:
    if src in ctx.origin:
        p, od = ctx.origin[src]
        ctx.origin[node] = (p, tuple(od[d] if d is not None else None for d in dims))


@rule(
    "aten.detach",
    "aten.alias",
    "aten.clone",
    "aten.contiguous",
    "aten._to_copy",
    "aten.to",
    "aten.abs",
    "aten.neg",
    "aten.relu",
    "aten.gelu",
    "aten.silu",
    "aten.sigmoid",
    "aten.tanh",
    "aten.exp",
    "aten.log",
    "aten.sqrt",
    "aten.rsqrt",
    "aten.sin",
    "aten.cos",
    "aten.erf",
    "aten.reciprocal",
    "aten.clamp",
    "aten.clamp_min",
    "aten.clamp_max",
    "aten.hardtanh",
    "aten.leaky_relu",
    "aten.elu",
    "aten.softplus",
    "aten.mish",
    "aten.hardswish",
    "aten.hardsigmoid",
    "aten.sign",
    "aten.square",
    "aten.bitwise_not",
    "aten.logical_not",
    "aten._softmax",
    "aten.softmax",
    "aten._log_softmax",
    "aten.log_softmax",
    "aten.dropout",
    "aten.lift_fresh_copy_of_tensor",
    "aten.gelu_",
    "aten.isnan",
    "aten.isinf",
    "aten.log1p",
    "aten.expm1",
    "aten.sgn",
    "aten.pow",
    "aten.prelu_not_used",
    "aten.celu",
    "aten.selu",
    "aten.logit",
    "aten.trunc",
    "aten.round",
    "aten.floor",
    "aten.ceil",
    "aten.frac",
    "aten.nan_to_num",
    "aten.type_as",
    "aten.view_as",
)
def _same(ctx: Context, node):
    x = node.args[0]
    if not ctx.is_tensor(x):
        return _fresh_like(node.meta.get("val"), None, uniform=True)
    if op_name(node.target) == "aten.pow" and len(node.args) > 1 and ctx.is_tensor(node.args[1]):
        return _broadcast(ctx, node)
    n = len(ctx.shape(x))
    _track_origin(ctx, node, x, list(range(n)))
    return list(ctx.label(x))


@rule("aten.native_dropout")
def _native_dropout(ctx: Context, node):
    lab = list(ctx.label(node.args[0]))
    return [lab, list(lab)]


def _broadcast(ctx: Context, node):
    out_shape = ctx.shape(node)
    n = len(out_shape)
    ins = list(ctx.tensor_args(node))
    out: Label = []
    for i in range(n):
        size = out_shape[i]
        cands = []
        for a in ins:
            sh = ctx.shape(a)
            j = i - (n - len(sh))
            if j >= 0 and sh[j] == size and size > 1:
                cands.append(ctx.label(a)[j])
        if size == 1 or not cands:
            out.append(() if size == 1 else (Axis(size, uniform=True),))
            continue
        for c in cands[1:]:
            join(cands[0], c, size)
        best = next((c for c in cands if not all(find(a).uniform for a in c)), cands[0])
        out.append(best)
    return out


for _n in (
    "add",
    "sub",
    "mul",
    "div",
    "rsub",
    "maximum",
    "minimum",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "where",
    "masked_fill",
    "logical_and",
    "logical_or",
    "logical_xor",
    "bitwise_and",
    "bitwise_or",
    "bitwise_xor",
    "atan2",
    "fmod",
    "remainder",
    "copy",
    "lerp",
    "addcmul",
    "addcdiv",
    "fill",
    "floor_divide",
    "hypot",
    "xlogy",
    "true_divide",
    "mul_",
    "add_",
    "pow_tensor",
    "prelu",
    "threshold",
    "clamp_tensor",
    "bitwise_left_shift",
    "bitwise_right_shift",
    "isclose",
):
    RULES[f"aten.{_n}"] = _broadcast


@rule(
    "aten.arange",
    "aten.randn",
    "aten.rand",
    "aten.randint",
    "aten.linspace",
    "aten.randperm",
    "aten.tensor",
    "aten.lift_fresh_copy",
    "aten._tensor_constant",
    "aten.scalar_tensor",
    "aten.normal",
    "aten.bernoulli",
    "aten.multinomial",
    "aten.tril_indices",
    "aten.triu_indices",
)
def _ordered_constant(ctx: Context, node):
    """Values that differ along each dimension in a fixed order: whatever they meet cannot move."""
    return _fresh_like(node.meta.get("val"), "combined with a constant whose order matters (e.g. a position table)")


@rule(
    "aten.full",
    "aten.zeros",
    "aten.ones",
    "aten.empty",
    "aten.new_zeros",
    "aten.new_ones",
    "aten.new_full",
    "aten.new_empty",
    "aten.zeros_like",
    "aten.ones_like",
    "aten.full_like",
    "aten.empty_like",
    "aten.empty_strided",
    "aten.new_empty_strided",
    "aten.empty_permuted",
)
def _uniform_constant(ctx: Context, node):
    return _fresh_like(node.meta.get("val"), None, uniform=True)


@rule(
    "aten._assert_async",
    "aten._assert_scalar",
    "aten.sym_constrain_range",
    "aten._local_scalar_dense",
    "aten.item",
    "aten.sym_size",
    "aten.sym_numel",
    "aten.sym_stride",
    "aten._assert_tensor_metadata",
    "aten.is_nonzero",
    "aten.equal",
    "aten.sym_constrain_range_for_size",
)
def _no_tensor(ctx: Context, node):
    return _fresh_like(node.meta.get("val"), None, uniform=True)


# -- reductions ------------------------------------------------------------------------------------
_AVERAGING = {
    "aten.mean",
    "aten.var",
    "aten.std",
    "aten.var_mean",
    "aten.std_mean",
    "aten.linalg_vector_norm",
    "aten.norm",
}


def _reduce(ctx: Context, node, dims, keepdim: bool, pin_reason: str | None = None):
    lab = ctx.label(node.args[0])
    n = len(lab)
    dims = list(range(n)) if dims is None or dims == [] else [_norm_dim(d, n) for d in dims]
    if op_name(node.target) in _AVERAGING:  # e.g. RMSNorm: removing a neuron would change the statistic
        for d in dims:
            for a in lab[d]:
                find(a).averaged = True
    if pin_reason:
        for d in dims:
            for a in lab[d]:
                pin(a, pin_reason)
    out: Label = []
    for i, d in enumerate(lab):
        if i in dims:
            if keepdim:
                out.append(())
        else:
            out.append(d)
    return out


@rule(
    "aten.sum",
    "aten.mean",
    "aten.amax",
    "aten.amin",
    "aten.prod",
    "aten.logsumexp",
    "aten.any",
    "aten.all",
    "aten.linalg_vector_norm",
    "aten.norm",
    "aten.nansum",
    "aten.count_nonzero",
)
def _reduction(ctx: Context, node):
    args = list(node.args)
    dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
    if op_name(node.target) in ("aten.linalg_vector_norm", "aten.norm"):
        dims = args[2] if len(args) > 2 else node.kwargs.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    keep = node.kwargs.get("keepdim", False)
    for a in args[2:]:
        if isinstance(a, bool):
            keep = a
            break
    if op_name(node.target) in ("aten.linalg_vector_norm", "aten.norm"):
        keep = args[3] if len(args) > 3 else node.kwargs.get("keepdim", False)
    if not ctx.shape(node) and not keep:
        dims = None
    return _reduce(ctx, node, dims, bool(keep))


@rule("aten.var", "aten.std", "aten.var_mean", "aten.std_mean")
def _variance(ctx: Context, node):
    args = list(node.args)
    dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    keep = node.kwargs.get("keepdim", False)
    out = _reduce(ctx, node, dims, bool(keep))
    return [out, list(out)] if op_name(node.target).endswith("_mean") else out


@rule(
    "aten.max",
    "aten.min",
    "aten.argmax",
    "aten.argmin",
    "aten.sort",
    "aten.topk",
    "aten.cumsum",
    "aten.cumprod",
    "aten.cummax",
    "aten.median",
    "aten.mode",
    "aten.kthvalue",
    "aten.argsort",
)
def _ordered_reduction(ctx: Context, node):
    """Ops whose result depends on the order along a dim (indices, running sums): that dim cannot move."""
    name = op_name(node.target)
    lab = ctx.label(node.args[0])
    n = len(lab)
    val = node.meta.get("val")
    if name in ("aten.max", "aten.min") and len(node.args) == 1:  # full reduction to a scalar: order-free
        return _fresh_like(val, None, uniform=True)
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    if name == "aten.topk":
        d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    if d is None:
        d = list(range(n))
    for dd in [d] if isinstance(d, int) else d:
        for a in lab[_norm_dim(dd, n)]:
            pin(a, f"{name} depends on the order of this dimension")
    if isinstance(val, torch.Tensor):
        return _fit(ctx, lab, val.shape)
    return [_fit(ctx, lab, v.shape) if isinstance(v, torch.Tensor) else None for v in val]


def _fit(ctx: Context, lab: Label, shape) -> Label:
    """Keep the input's labels where a same-rank output keeps the size; otherwise fresh pinned axes."""
    if len(shape) == len(lab):
        return [
            d if math.prod(find(a).size for a in d) == s else fresh([s], "derived by an order-dependent op")[0]
            for d, s in zip(lab, shape)
        ]
    return fresh(shape, "derived by an order-dependent op")


# -- layout ---------------------------------------------------------------------------------------
@rule("aten.t", "aten.numpy_T")
def _t(ctx: Context, node):
    lab = ctx.label(node.args[0])
    if len(lab) < 2:
        return list(lab)
    _track_origin(ctx, node, node.args[0], [1, 0])
    return [lab[1], lab[0]]


@rule("aten.transpose", "aten.swapaxes", "aten.swapdims")
def _transpose(ctx: Context, node):
    lab = list(ctx.label(node.args[0]))
    n = len(lab)
    a, b = _norm_dim(node.args[1], n), _norm_dim(node.args[2], n)
    order = list(range(n))
    order[a], order[b] = order[b], order[a]
    _track_origin(ctx, node, node.args[0], order)
    return [lab[i] for i in order]


@rule("aten.permute")
def _permute(ctx: Context, node):
    lab = ctx.label(node.args[0])
    order = [_norm_dim(d, len(lab)) for d in node.args[1]]
    _track_origin(ctx, node, node.args[0], order)
    return [lab[i] for i in order]


@rule("aten.unsqueeze")
def _unsqueeze(ctx: Context, node):
    lab = list(ctx.label(node.args[0]))
    d = _norm_dim(node.args[1], len(lab) + 1)
    dims: list = list(range(len(lab)))
    dims.insert(d, None)
    _track_origin(ctx, node, node.args[0], dims)
    return lab[:d] + [()] + lab[d:]


@rule("aten.squeeze")
def _squeeze(ctx: Context, node):
    lab = ctx.label(node.args[0])
    shape = ctx.shape(node.args[0])
    if len(node.args) > 1:
        given = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        ds = {_norm_dim(d, len(lab)) for d in given}
    else:
        ds = set(range(len(lab)))
    keep = [i for i in range(len(lab)) if not (i in ds and shape[i] == 1)]
    _track_origin(ctx, node, node.args[0], keep)
    return [lab[i] for i in keep]


@rule("aten.expand", "aten.expand_as", "aten.broadcast_to")
def _expand(ctx: Context, node):
    lab = ctx.label(node.args[0])
    in_shape = ctx.shape(node.args[0])
    out_shape = ctx.shape(node)
    k = len(out_shape) - len(in_shape)
    out = []
    for i, s in enumerate(out_shape):
        j = i - k
        if j >= 0 and in_shape[j] == s:
            out.append(lab[j])
        else:
            out.append(() if s == 1 else (Axis(s, uniform=True),))
    return out


@rule(
    "aten.view",
    "aten._unsafe_view",
    "aten.reshape",
    "aten.view_copy",
    "aten._reshape_alias",
    "aten.flatten",
    "aten.unflatten",
)
def _view(ctx: Context, node):
    src = node.args[0]
    lab = ctx.label(src)
    out_shape = ctx.shape(node)
    in_shape = ctx.shape(src)
    if [s for s in in_shape if s != 1] == [s for s in out_shape if s != 1]:  # only size-1 dims change
        kept = [d for d, s in zip(lab, in_shape) if s != 1]
        it = iter(kept)
        return [() if s == 1 else next(it) for s in out_shape]
    factors = [a for d in lab for a in d if find(a).size > 1]
    out: Label = []
    pos = 0
    try:
        for s in out_shape:
            need, acc = s, []
            while need > 1:
                f = factors[pos]
                fs = find(f).size
                if need % fs == 0:
                    acc.append(f)
                    need //= fs
                    pos += 1
                elif fs % need == 0:
                    outer, inner = ensure_factors(f, [need, fs // need])
                    acc.append(outer)
                    factors[pos] = inner
                    need = 1
                else:
                    raise ValueError
            out.append(tuple(acc))
    except (ValueError, IndexError):
        reason = "reshaped in a way the coupling rules cannot follow"
        pin_label(lab, reason)
        return fresh(out_shape, reason)
    return out


@rule("aten.slice", "aten.narrow", "aten.slice_copy")
def _slice(ctx: Context, node):
    lab = list(ctx.label(node.args[0]))
    shape = ctx.shape(node.args[0])
    n = len(lab)
    name = op_name(node.target)
    d = _norm_dim(node.args[1] if len(node.args) > 1 else 0, n)
    size = shape[d]
    if name == "aten.narrow":
        start, end, step = node.args[2], node.args[2] + node.args[3], 1
    else:
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
        step = node.args[4] if len(node.args) > 4 else 1
    start = max(0, min(size, start + size if start < 0 else start))
    end = max(start, min(size, end + size if end < 0 else end))
    if end - start == size:
        _track_origin(ctx, node, node.args[0], list(range(n)))
        return lab
    out_size = ctx.shape(node)[d]
    if step != 1:
        for a in lab[d]:
            pin(a, "sliced with a step")
        lab[d] = fresh([out_size], "sliced with a step")[0]
        return lab
    if out_size == 1:
        for a in lab[d]:
            pin(a, "one entry selected from this dimension")
        lab[d] = ()
        return lab
    pieces = ensure_cuts(dim_axis(lab[d], size), [start, end])
    bounds = [0] + [b for b in (start, end) if 0 < b < size] + [size]
    lab[d] = (pieces[bounds.index(start)],)
    return lab


@rule(
    "aten.split",
    "aten.split_with_sizes",
    "aten.unsafe_split",
    "aten.split_copy",
    "aten.unbind",
    "aten.chunk",
    "aten.tensor_split",
)
def _split(ctx: Context, node):
    lab = ctx.label(node.args[0])
    shape = ctx.shape(node.args[0])
    n = len(lab)
    vals = node.meta["val"]
    name = op_name(node.target)
    if name == "aten.unbind":
        d = _norm_dim(node.args[1] if len(node.args) > 1 else 0, n)
        for a in lab[d]:
            pin(a, "one entry selected from this dimension")
        return [lab[:d] + lab[d + 1 :] for _ in vals]
    d = _norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), n)
    sizes = [int(v.shape[d]) for v in vals]
    cuts, acc = [], 0
    for s in sizes[:-1]:
        acc += s
        cuts.append(acc)
    pieces = ensure_cuts(dim_axis(lab[d], shape[d]), cuts) if len(sizes) > 1 else [dim_axis(lab[d], shape[d])]
    out = []
    for p, s in zip(pieces if len(pieces) == len(sizes) else [None] * len(sizes), sizes):
        new = list(lab)
        new[d] = () if s == 1 else ((p,) if p is not None else fresh([s], "split unevenly")[0])
        out.append(new)
    return out


@rule("aten.select", "aten.select_copy")
def _select(ctx: Context, node):
    lab = list(ctx.label(node.args[0]))
    d = _norm_dim(node.args[1], len(lab))
    for a in lab[d]:
        pin(a, "one entry selected from this dimension")
    return lab[:d] + lab[d + 1 :]


@rule("aten.cat", "aten.concat", "aten.concatenate")
def _cat(ctx: Context, node):
    tensors = [t for t in node.args[0] if ctx.is_tensor(t) and ctx.shape(t) and math.prod(ctx.shape(t)) > 0]
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out_shape = ctx.shape(node)
    n = len(out_shape)
    d = _norm_dim(d, n)
    if len(tensors) == 1:
        return list(ctx.label(tensors[0]))
    labs = [ctx.label(t) for t in tensors]
    for i in range(n):
        if i != d:
            for lab in labs[1:]:
                join(labs[0][i], lab[i], out_shape[i])
    out = list(labs[0])
    parts = [dim_axis(lab[d], ctx.shape(t)[d]) for lab, t in zip(labs, tensors)]
    joined = Axis(out_shape[d])
    joined.parts = parts
    out[d] = (joined,)
    return out


@rule("aten.stack")
def _stack(ctx: Context, node):
    tensors = list(node.args[0])
    d = node.args[1] if len(node.args) > 1 else 0
    labs = [ctx.label(t) for t in tensors]
    shape = ctx.shape(tensors[0])
    for lab in labs[1:]:
        for i, s in enumerate(shape):
            join(labs[0][i], lab[i], s)
    out = list(labs[0])
    d = _norm_dim(d, len(out) + 1)
    out.insert(d, fresh([len(tensors)], "stacking index")[0] if len(tensors) > 1 else ())
    return out


# -- weights: matmuls, convolutions, embeddings, norms ----------------------------------------------
def _bias_name(ctx: Context, b) -> str | None:
    if b is not None and b in ctx.origin and len(ctx.shape(b)) == 1:
        return ctx.origin[b][0]
    return None


def _record(ctx: Context, operand, out_dim_of_operand: int, contracted: int, bias=None) -> None:
    if operand in ctx.origin:
        p, od = ctx.origin[operand]
        if od[out_dim_of_operand] is not None and od[contracted] is not None:
            ctx.uses.append(Use(p, od[out_dim_of_operand], od[contracted], _bias_name(ctx, bias)))


@rule("aten.mm", "aten.addmm", "aten.matmul_2d")
def _mm(ctx: Context, node):
    bias = None
    a, b = node.args[0], node.args[1]
    if op_name(node.target) == "aten.addmm":
        bias, a, b = node.args[0], node.args[1], node.args[2]
    la, lb = ctx.label(a), ctx.label(b)
    (m, k), (_, n) = ctx.shape(a), ctx.shape(b)
    join(la[1], lb[0], k)
    out = [la[0], lb[1]]
    _record(ctx, b, 1, 0, bias)
    _record(ctx, a, 0, 1, bias)
    if bias is not None:
        bl = ctx.label(bias)
        bs = ctx.shape(bias)
        for i in range(1, len(bs) + 1):
            if bs[-i] == (m, n)[-i] and bs[-i] > 1:
                join(bl[-i], out[-i], bs[-i])
    return out


@rule("aten.bmm", "aten.baddbmm")
def _bmm(ctx: Context, node):
    a, b = node.args[0], node.args[1]
    base = None
    if op_name(node.target) == "aten.baddbmm":
        base, a, b = node.args[0], node.args[1], node.args[2]
    la, lb = ctx.label(a), ctx.label(b)
    (bs, _, k) = ctx.shape(a)
    join(la[0], lb[0], bs)
    join(la[2], lb[1], k)
    out = [la[0], la[1], lb[2]]
    if base is not None:
        for i, s in enumerate(ctx.shape(base)):
            join(ctx.label(base)[i], out[i - len(ctx.shape(base)) + 3], s)
    return out


@rule("aten.dot", "aten.vdot")
def _dot(ctx: Context, node):
    join(ctx.label(node.args[0])[0], ctx.label(node.args[1])[0], ctx.shape(node.args[0])[0])
    return []


@rule("aten.mv")
def _mv(ctx: Context, node):
    la, lb = ctx.label(node.args[0]), ctx.label(node.args[1])
    join(la[1], lb[0], ctx.shape(node.args[1])[0])
    return [la[0]]


@rule("aten.convolution", "aten._convolution", "aten.conv2d", "aten.conv1d", "aten.conv3d")
def _conv(ctx: Context, node):
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    name = op_name(node.target)
    transposed = (
        bool(node.args[6]) if name in ("aten.convolution", "aten._convolution") and len(node.args) > 6 else False
    )
    groups = (
        node.args[8]
        if name in ("aten.convolution", "aten._convolution") and len(node.args) > 8
        else (node.args[6] if len(node.args) > 6 else 1)
    )
    lx, lw = ctx.label(x), ctx.label(w)
    out_shape = ctx.shape(node)
    cin = ctx.shape(x)[1]
    wsh = ctx.shape(w)
    spatial = fresh(out_shape[2:], "a spatial position (convolutions mix neighbouring positions)")
    for d in lx[2:] + lw[2:]:
        for a in d:
            pin(a, "a spatial position (convolutions mix neighbouring positions)")
    if transposed:
        if groups != 1:
            pin_label(lx[1:2] + lw[:2], "unknown op: grouped transposed convolution")
            return [lx[0], fresh([out_shape[1]], "unknown op: grouped transposed convolution")[0]] + spatial
        join(lx[1], lw[0], cin)
        _record(ctx, w, 1, 0, b)
        out_c = lw[1]
    elif groups == 1:
        join(lx[1], lw[1], cin)
        _record(ctx, w, 0, 1, b)
        out_c = lw[0]
    else:  # channels move within their group; whole groups move together
        cout = wsh[0]
        in_axis = dim_axis(lx[1], cin)
        out_axis = dim_axis(lw[0], cout)
        g_in = ensure_factors(in_axis, [groups, cin // groups]) if cin // groups > 1 else [in_axis]
        g_out = ensure_factors(out_axis, [groups, cout // groups]) if cout // groups > 1 else [out_axis]
        unify(g_in[0], g_out[0])
        if cin // groups > 1:
            join((g_in[1],), lw[1], cin // groups)
        _record(ctx, w, 0, 1, b)
        out_c = (out_axis,)
    if b is not None and ctx.is_tensor(b):
        join(ctx.label(b)[0], out_c, out_shape[1])
    return [lx[0], out_c] + spatial


@rule("aten.embedding")
def _embedding(ctx: Context, node):
    w, idx = node.args[0], node.args[1]
    lw = ctx.label(w)
    for a in lw[0]:
        pin(a, "rows looked up by token index")
    _record(ctx, w, 1, 0)
    return list(ctx.label(idx)) + [lw[1]]


@rule("aten.index_select")
def _index_select(ctx: Context, node):
    lab = list(ctx.label(node.args[0]))
    d = _norm_dim(node.args[1], len(lab))
    for a in lab[d]:
        pin(a, "rows looked up by index")
    lab[d] = fresh([ctx.shape(node)[d]], "looked-up entries")[0] if ctx.shape(node)[d] > 1 else ()
    return lab


@rule("aten.native_layer_norm", "aten.layer_norm")
def _layer_norm(ctx: Context, node):
    x, shape = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else None
    b = node.args[3] if len(node.args) > 3 else None
    lx = list(ctx.label(x))
    k = len(shape)
    xs = ctx.shape(x)
    for d in lx[len(lx) - k :]:
        for a in d:
            find(a).averaged = True
    for p in (w, b):
        if p is not None and ctx.is_tensor(p):
            lp = ctx.label(p)
            for i in range(k):
                join(lp[i], lx[len(lx) - k + i], xs[len(lx) - k + i])
    stats = lx[: len(lx) - k] + [()] * k
    return [lx, stats, list(stats)] if op_name(node.target) == "aten.native_layer_norm" else lx


@rule(
    "aten.native_batch_norm",
    "aten._native_batch_norm_legit_no_training",
    "aten._native_batch_norm_legit",
    "aten.batch_norm",
    "aten._native_batch_norm_legit_functional",
    "aten.instance_norm",
)
def _batch_norm(ctx: Context, node):
    x = node.args[0]
    lx = list(ctx.label(x))
    c = ctx.shape(x)[1]
    for p in node.args[1:5]:
        if ctx.is_tensor(p):
            join(ctx.label(p)[0], lx[1], c)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return lx
    return [lx] + [
        [lx[1]]
        if isinstance(v, torch.Tensor) and v.ndim == 1 and v.shape[0] == c
        else _fresh_like(v, None, uniform=True)
        for v in val[1:]
    ]


@rule("aten.native_group_norm", "aten.group_norm")
def _group_norm(ctx: Context, node):
    x = node.args[0]
    lx = list(ctx.label(x))
    c = ctx.shape(x)[1]
    groups = node.args[6] if op_name(node.target) == "aten.native_group_norm" else node.args[1]
    if 1 < groups < c:  # statistics per group: channels move within their group, groups as wholes
        ensure_factors(dim_axis(lx[1], c), [groups, c // groups])
    for a in lx[1]:
        find(a).averaged = True
    params = node.args[1:3] if op_name(node.target) == "aten.native_group_norm" else node.args[2:4]
    for p in params:
        if ctx.is_tensor(p):
            join(ctx.label(p)[0], lx[1], c)
    if op_name(node.target) == "aten.group_norm":
        return lx
    return [
        lx,
        _fresh_like(node.meta["val"][1], None, uniform=True),
        _fresh_like(node.meta["val"][2], None, uniform=True),
    ]


@rule(
    "aten.max_pool1d",
    "aten.max_pool2d",
    "aten.max_pool3d",
    "aten.avg_pool1d",
    "aten.avg_pool2d",
    "aten.avg_pool3d",
    "aten.adaptive_avg_pool1d",
    "aten.adaptive_avg_pool2d",
    "aten._adaptive_avg_pool2d",
    "aten.adaptive_avg_pool3d",
    "aten._adaptive_avg_pool3d",
    "aten.max_pool2d_with_indices",
    "aten.max_pool3d_with_indices",
    "aten.adaptive_max_pool2d",
    "aten.upsample_nearest2d",
    "aten.upsample_bilinear2d",
    "aten.upsample_nearest1d",
    "aten._upsample_nearest_exact2d",
    "aten.upsample_bicubic2d",
    "aten.reflection_pad2d",
    "aten.replication_pad2d",
    "aten.constant_pad_nd",
)
def _spatial(ctx: Context, node):
    """Per-channel spatial ops: channels (dim 1) pass through, spatial positions cannot move."""
    lx = ctx.label(node.args[0])
    reason = "a spatial position (pooling mixes neighbouring positions)"
    for d in lx[2:]:
        for a in d:
            pin(a, reason)
    val = node.meta["val"]

    def one(v):
        return list(lx[:2]) + fresh(v.shape[2:], reason)

    if isinstance(val, torch.Tensor):
        if op_name(node.target) == "aten.constant_pad_nd" and len(node.args[1]) > 2 * (len(lx) - 2):
            return unknown(ctx, node)
        return one(val)
    return [one(v) for v in val]


# -- attention --------------------------------------------------------------------------------------
@rule(
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_efficient_attention",
    "aten.scaled_dot_product_attention",
    "aten._scaled_dot_product_attention_math",
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_fused_attention_overrideable",
    "aten._scaled_dot_product_attention_math_for_mps",
)
def _sdpa(ctx: Context, node):
    """q·kᵀ per head, softmax over keys, times v: heads pair q with k and v; q and k share dims.

    Grouped-query attention (fewer key/value heads): query head h reads key/value head
    h // (Hq / Hkv), so the query heads factor as (kv head, copy) and the kv head is shared.
    """
    q, k, v = node.args[0], node.args[1], node.args[2]
    lq, lk, lv = ctx.label(q), ctx.label(k), ctx.label(v)
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    if len(sq) != 4 or len(sk) != 4 or len(sv) != 4:
        return unknown(ctx, node)
    join(lq[0], lk[0], sq[0])
    join(lk[0], lv[0], sk[0])
    join(lk[1], lv[1], sk[1])
    if sq[1] == sk[1]:
        join(lq[1], lk[1], sq[1])
        q_heads = lq[1]
    else:
        rep = sq[1] // sk[1]
        kv, _copies = ensure_factors(dim_axis(lq[1], sq[1]), [sk[1], rep])
        join((kv,), lk[1], sk[1])
        q_heads = lq[1]
    join(lq[3], lk[3], sq[3])
    join(lk[2], lv[2], sk[2])
    mask = node.kwargs.get("attn_mask")
    if mask is None and len(node.args) > 3 and ctx.is_tensor(node.args[3]):
        mask = node.args[3]
    if mask is not None and ctx.is_tensor(mask):
        ms = ctx.shape(mask)
        full = [lq[0], q_heads, lq[2], lk[2]]
        sizes = [sq[0], sq[1], sq[2], sk[2]]
        for i in range(1, len(ms) + 1):
            if ms[-i] == sizes[-i] and ms[-i] > 1:
                join(ctx.label(mask)[-i], full[-i], ms[-i])
    out = [lq[0], q_heads, lq[2], lv[3]]
    val = node.meta["val"]
    if isinstance(val, torch.Tensor):
        return out
    rest = [_fresh_like(t, None, uniform=True) for t in val[1:]]
    if isinstance(val[1], torch.Tensor) and tuple(val[1].shape) == (sq[0], sq[1], sq[2]):
        rest[0] = [lq[0], q_heads, lq[2]]  # log-sum-exp per query
    return [out] + rest


@rule("getitem")
def _getitem(ctx: Context, node):
    labs = ctx.labels.get(node.args[0])
    if isinstance(labs, list) and labs and not isinstance(labs[0], tuple):  # a tuple output's labels
        return labs[node.args[1]]
    return _fresh_like(node.meta.get("val"), None, uniform=True)
