"""Axes: the index sets that must be permuted together, found by following data through a model.

Every dimension of every tensor in a traced forward pass is labelled with :class:`Axis`
objects. Two dimensions carry the same axis when permuting one forces the same
permutation of the other — a residual add joins its operands' feature axes, a matmul joins
the contracted dimensions, LayerNorm joins its weight with its input. Axes are kept in a
union-find forest, so "the same axis" is :func:`find` equality.

An axis may have structure, learned from the reshapes and slices it passed through:

* ``factors`` — the axis is a row-major product, e.g. 768 = 12 heads × 64 dims after
  ``view(B, T, 12, 64)``. Permuting the heads factor moves whole heads; permuting the dims
  factor moves the same dim in every head.
* ``parts`` — the axis is a concatenation, e.g. a fused qkv projection's 2304 outputs =
  q ⊕ k ⊕ v after ``split``. Each part permutes on its own; nothing crosses a boundary.

An axis whose order carries meaning is ``pinned`` (with the reason): a rotary table built
from ``arange``, a token index, a spatial position mixed by a convolution, or anything an op
unknown to the rules touched. Pinned axes never move. ``uniform`` axes are broadcast
dimensions (values constant along them): joining one with another axis imposes nothing.

    >>> a, b = Axis(768), Axis(768)
    >>> unify(a, b)
    ... heads, dims = ensure_factors(a, [12, 64])
    ... find(b).factors is not None
    True
"""

from __future__ import annotations

import itertools
import math

_ids = itertools.count()


class Axis:
    """One index set (a node of the union-find forest); see the module docstring."""

    __slots__ = ("averaged", "factors", "id", "parent", "parts", "pinned", "roles", "size", "uniform")

    def __init__(self, size: int, pinned: str | None = None, uniform: bool = False):
        self.size = int(size)
        self.parent: Axis | None = None
        self.factors: list[Axis] | None = None
        self.parts: list[Axis] | None = None
        self.pinned = pinned
        self.uniform = uniform
        self.roles: set[str] = set()
        self.averaged = False  # a mean/variance/norm runs over it: its size enters the statistics
        self.id = next(_ids)

    def __repr__(self) -> str:
        r = find(self)
        extra = f" pinned={r.pinned!r}" if r.pinned else ""
        if r.factors:
            extra += f" factors={[find(f).size for f in r.factors]}"
        if r.parts:
            extra += f" parts={[find(p).size for p in r.parts]}"
        return f"Axis#{r.id}({r.size}{extra})"


def find(a: Axis) -> Axis:
    """The representative of ``a``'s class (with path compression)."""
    root = a
    while root.parent is not None:
        root = root.parent
    while a.parent is not None:
        a.parent, a = root, a.parent
    return root


def pin(a: Axis, reason: str) -> None:
    """Fix the order of ``a`` and of everything it is made of."""
    r = find(a)
    if r.pinned is None:
        r.pinned = reason
    for child in (r.factors or []) + (r.parts or []):
        if find(child).pinned is None:
            pin(child, reason)


def unify(a: Axis, b: Axis) -> None:
    """Declare that ``a`` and ``b`` must be permuted identically (merging their structure)."""
    a, b = find(a), find(b)
    if a is b or a.uniform or b.uniform:
        return
    if a.size != b.size:
        pin(a, f"joined with a dimension of another size ({a.size} vs {b.size})")
        pin(b, f"joined with a dimension of another size ({b.size} vs {a.size})")
        return
    b.parent = a
    a.roles |= b.roles
    a.averaged = a.averaged or b.averaged
    reason = a.pinned or b.pinned
    fa, fb, pa, pb = a.factors, b.factors, a.parts, b.parts
    if fa and fb:
        _unify_factors(a, fb)
    elif fb:
        a.factors = fb
    if pa and pb:
        _unify_parts(a, pb)
    elif pb:
        a.parts = pb
    a = find(a)
    if a.factors and a.parts:
        pin(a, "split both into heads and into concatenated parts")
    if reason:
        pin(a, reason)


def _unify_factors(a: Axis, other: list[Axis]) -> None:
    mine = find(a).factors
    assert mine is not None  # called only when both sides have factors
    sizes = _refinement([find(f).size for f in mine], [find(f).size for f in other])
    if sizes is None:
        pin(a, "reshaped into incompatible head splits")
        return
    mine = ensure_factors(a, sizes)
    tmp = Axis(find(a).size)
    tmp.factors = list(other)
    theirs = ensure_factors(tmp, sizes)
    for x, y in zip(mine, theirs):
        unify(x, y)


def _unify_parts(a: Axis, other: list[Axis]) -> None:
    cuts = list(itertools.accumulate(find(p).size for p in other))[:-1]
    mine = ensure_cuts(a, cuts)
    if len(mine) != len(other):  # a had finer parts: cut the other side the same way
        tmp = Axis(find(a).size)
        tmp.parts = list(other)
        own = list(itertools.accumulate(find(p).size for p in mine))[:-1]
        theirs = ensure_cuts(tmp, own)
        mine = ensure_cuts(a, own)
    else:
        theirs = other
    if len(mine) != len(theirs):
        pin(a, "concatenated in incompatible ways")
        return
    for x, y in zip(mine, theirs):
        unify(x, y)


def _refinement(a: list[int], b: list[int]) -> list[int] | None:
    """The common refinement of two row-major factorisations of one size, if it exists."""
    bounds = sorted(set(itertools.accumulate(a, lambda x, y: x * y)) | set(itertools.accumulate(b, lambda x, y: x * y)))
    for lo, hi in zip(bounds, bounds[1:]):
        if hi % lo:
            return None
    return [bounds[0]] + [hi // lo for lo, hi in zip(bounds, bounds[1:])]


def leaves(a: Axis) -> list[Axis]:
    """The innermost factors of ``a`` (recursively), outermost first."""
    r = find(a)
    if not r.factors:
        return [r]
    return [leaf for f in r.factors for leaf in leaves(f)]


def _fresh_pinned(sizes: list[int], reason: str) -> list[Axis]:
    return [Axis(s, pinned=reason) for s in sizes]


def ensure_factors(a: Axis, sizes: list[int]) -> list[Axis]:
    """Axes of sizes ``sizes`` whose row-major product is ``a`` (splitting ``a``'s factors as needed)."""
    r = find(a)
    sizes = [int(s) for s in sizes]
    if math.prod(sizes) != r.size:
        raise ValueError(f"cannot factor an axis of size {r.size} as {sizes}")
    if len(sizes) == 1:
        return [r]
    if r.uniform:
        return [Axis(s, uniform=True) for s in sizes]
    if r.parts:
        pin(r, "reshaped across concatenated parts")
        return _fresh_pinned(sizes, r.pinned or "")
    if not r.factors:
        r.factors = [Axis(s, pinned=r.pinned) for s in sizes]
        return list(r.factors)
    current = leaves(r)
    ref = _refinement([x.size for x in current], sizes)
    if ref is None:
        pin(r, "reshaped into incompatible head splits")
        return _fresh_pinned(sizes, r.pinned or "")
    pieces: list[Axis] = []
    k = 0
    for leaf in current:  # split each leaf into the refinement's pieces
        n = leaf.size
        take: list[int] = []
        while n > 1 or not take:
            take.append(ref[k])
            n //= ref[k]
            k += 1
        pieces += ensure_factors(leaf, take) if len(take) > 1 else [leaf]
    out, k = [], 0
    for s in sizes:  # group pieces into the wanted sizes
        n = 1
        group: list[Axis] = []
        while n < s or not group:
            group.append(pieces[k])
            n *= pieces[k].size
            k += 1
        if len(group) == 1:
            out.append(group[0])
        else:
            view = Axis(s, pinned=r.pinned)
            view.factors = group
            out.append(view)
    return out


def ensure_cuts(a: Axis, cuts: list[int]) -> list[Axis]:
    """Axes for the consecutive ranges of ``a`` between ``cuts`` (splitting ``a`` into parts as needed)."""
    r = find(a)
    cuts = sorted({int(c) for c in cuts if 0 < c < r.size})
    if not cuts:
        return [r]
    bounds = [0, *cuts, r.size]
    if r.uniform:
        return [Axis(hi - lo, uniform=True) for lo, hi in zip(bounds, bounds[1:])]
    if r.factors:
        inner = math.prod(find(f).size for f in r.factors[1:])
        if any(c % inner for c in cuts):
            pin(r, "sliced inside a head")
            return _fresh_pinned([hi - lo for lo, hi in zip(bounds, bounds[1:])], r.pinned or "")
        outer = ensure_cuts(r.factors[0], [c // inner for c in cuts])
        out = []
        for piece in outer:
            view = Axis(piece.size * inner, pinned=r.pinned)
            view.factors = [piece, *r.factors[1:]]
            out.append(view)
        return out
    if not r.parts:
        r.parts = [Axis(hi - lo, pinned=r.pinned) for lo, hi in zip(bounds, bounds[1:])]
        return list(r.parts)
    # refine the existing parts at the new cuts, then group them into the wanted ranges
    pieces, start = [], 0
    for p in list(r.parts):
        size = find(p).size
        local = [c - start for c in cuts if start < c < start + size]
        pieces += ensure_cuts(p, local)
        start += size
    out, k = [], 0
    for lo, hi in zip(bounds, bounds[1:]):
        group, n = [], 0
        while n < hi - lo:
            group.append(pieces[k])
            n += find(pieces[k]).size
            k += 1
        if len(group) == 1:
            out.append(group[0])
        else:
            view = Axis(hi - lo, pinned=r.pinned)
            view.parts = group
            out.append(view)
    return out
