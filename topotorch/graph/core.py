"""The model's coupling graph: which tensor dimensions make up a neuron, and which weights connect layers.

Three small objects describe a network in space:

* :class:`Slice` — a neuron is a slice of a tensor dimension: for each of a
  layer's N neurons, the indices it owns along one dimension of one parameter
  (or buffer). A hidden neuron of an MLP owns row ``j`` of ``fc1.weight``,
  entry ``j`` of ``fc1.bias`` and column ``j`` of ``fc2.weight``; a folded
  embedding neuron owns columns ``j`` and ``d + j`` of the next layer; a conv
  channel after a flatten owns ``H*W`` consecutive columns; an attention head
  owns ``head_dim`` rows. Everything a neuron owns moves together when it is
  relocated, so a relocation can never change what the network computes.
* :class:`Space` — one layer of neurons: coordinates, a height, a role
  (input / hidden / output) and how it may be relocated.
* :class:`Connection` — a weight tensor that wires one space into another
  (which dimension indexes the receiving neurons, which the sending ones).

:class:`SpatialGraph` bundles them with the model. Builders turn ordinary
``nn.Module``s into graphs; :meth:`SpatialGraph.from_chain` handles any chain of
``nn.Linear`` layers, optionally fed by ``nn.Embedding`` tables:

    >>> net = nn.Sequential(nn.Linear(4, 20), nn.SiLU(), nn.Linear(20, 2))
    >>> g = SpatialGraph.from_chain(net, layouts={"input": "line"})
    >>> [s.name for s in g.spaces]
    ['input', 'hidden1', 'output']
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar, cast

import torch
from torch import nn

from topotorch.geometry import make_layout, pairwise_distance

Role = Literal["input", "hidden", "output"]
# How a space may be relocated: permute the parameters (hidden neurons keep their
# slots and the weights move), permute the coordinates (inputs/outputs keep the
# meaning of data and labels: the feature stays, its position moves), or never.
RelocateMode = Literal["weights", "positions", "fixed"]
T = TypeVar("T")


@dataclass
class Slice:
    """The indices each neuron of a space owns along dimension ``dim`` of tensor ``name``.

    ``index`` has shape (N, K): neuron n owns ``index[n]`` (K >= 1 entries, e.g. K = 2 for a
    two-token folded embedding, K = head_dim for a head).
    """

    name: str
    dim: int
    index: torch.Tensor

    def neuron_of(self, size: int, partial: bool = False) -> torch.Tensor:
        """For each of the ``size`` indices of the dimension, the neuron that owns it.

        ``partial=True`` allows indices owned by no neuron (-1): a connection that covers part of
        a weight, e.g. the columns of a layer reading ``torch.cat`` of two spaces.
        """
        owner = torch.full((size,), -1, dtype=torch.long)
        n, k = self.index.shape
        owner[self.index.reshape(-1)] = torch.arange(n).repeat_interleave(k)
        if not partial and (owner < 0).any():
            raise ValueError(f"dimension {self.dim} of {self.name!r} has indices that belong to no neuron")
        return owner


@dataclass
class Space:
    """One layer of neurons: where they sit and what moves when they move."""

    name: str
    size: int
    positions: torch.Tensor | None  # (N, D) float64 within-layer coordinates; None = not embedded in space
    height: float
    role: Role = "hidden"
    relocate: RelocateMode = "weights"
    slices: list[Slice] = field(default_factory=list)
    labels: list[str] | None = None
    # neurons may only trade places within their group (e.g. the dimensions of one attention
    # head: permuting q, k, v and the output columns inside a head keeps the function, across
    # heads it does not). None: any permutation is allowed.
    groups: torch.Tensor | None = None
    # a residual stream: read and written by many layers; drawn once per layer boundary
    # (just below each reader, just above each writer) with the skip connections between copies
    stream: bool = False
    # why a space is fixed, when a builder found it cannot move (e.g. "an unknown op"); None otherwise
    reason: str | None = None
    # a mean, variance or norm runs over these neurons (LayerNorm, RMSNorm, GroupNorm...): removing or
    # penalising one alone changes the statistic. Set by the data-flow builder; see normalised_by_feature_norm
    normalised: bool = False

    def __post_init__(self) -> None:
        if self.positions is not None and self.positions.shape[0] != self.size:
            raise ValueError(f"space {self.name!r}: {self.positions.shape[0]} coordinates for {self.size} neurons")
        if self.groups is not None and self.groups.shape != (self.size,):
            raise ValueError(f"space {self.name!r}: groups must have shape ({self.size},)")


@dataclass
class Connection:
    """Weight tensor ``weight`` wiring space ``source`` into space ``target``.

    ``target_slice``/``source_slice`` say which dimension of the weight indexes each space's
    neurons; any other dimensions (conv kernels) are summed over as one connection.
    """

    weight: str
    target: str
    source: str
    target_slice: Slice
    source_slice: Slice
    bias: str | None = None


# neuron-distance matrices up to this many entries are cached per connection (all of a small model's)
DISTANCE_CACHE_ENTRIES = 1 << 18


class SpatialGraph:
    """A model plus the spaces and connections that give its neurons a body.

    Usage: ``g = SpatialGraph.from_chain(model)``; then ``wiring_cost(g)``, ``relocate(g, ...)``.
    """

    def __init__(
        self, model: nn.Module, spaces: Iterable[Space], connections: Iterable[Connection], validate: bool = True
    ):
        self.model = model
        self.spaces: list[Space] = list(spaces)
        self.connections: list[Connection] = list(connections)
        self._by_name = {s.name: s for s in self.spaces}
        if len(self._by_name) != len(self.spaces):
            raise ValueError("space names must be unique")
        # bumped whenever coordinates change, so cached distance matrices are rebuilt
        self.version = 0
        self._cache: dict[Hashable, tuple[int, object]] = {}  # key -> (version it was built at, value)
        self._tensor_map = self._tensors()
        if validate:  # False: a working view whose slices stay consistent by construction (shrink's)
            self.validate()

    # -- lookup ---------------------------------------------------------------------------------
    def space(self, name: str) -> Space:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no space named {name!r}; spaces: {', '.join(self._by_name)}") from None

    def tensor(self, name: str) -> torch.Tensor:
        """The parameter or buffer called ``name`` in the model."""
        t = self._tensor_map.get(name)
        if t is None:  # the model may have gained tensors since the graph was built
            self._tensor_map = self._tensors()
            if name not in self._tensor_map:
                raise KeyError(f"model has no parameter or buffer named {name!r}")
            t = self._tensor_map[name]
        return t

    def _tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = dict(self.model.named_parameters())
        out.update(dict(self.model.named_buffers()))
        return out

    def incoming(self, space: str) -> list[Connection]:
        return [c for c in self.connections if c.target == space]

    def outgoing(self, space: str) -> list[Connection]:
        return [c for c in self.connections if c.source == space]

    def movable_spaces(self) -> Iterator[Space]:
        return (s for s in self.spaces if s.relocate != "fixed" and s.positions is not None and s.size > 1)

    # -- geometry -------------------------------------------------------------------------------
    def distances(self, conn: Connection, metric: str, like: torch.Tensor) -> torch.Tensor:
        """(N_target, N_source) within-layer distances for a connection, cached per device/dtype.

        A space without coordinates (e.g. the token side of an embedding) is at distance 0, so
        such a connection costs only ``l0 * |W|``.
        """
        key = ("dist", conn.weight, conn.target, conn.source, metric, like.device, like.dtype)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == self.version and isinstance(hit[1], torch.Tensor):
            return hit[1]
        t, s = self.space(conn.target), self.space(conn.source)
        if t.positions is None or s.positions is None:
            d = torch.zeros(t.size, s.size, dtype=torch.float64)
        else:
            d = pairwise_distance(t.positions, s.positions, metric)
        d = d.to(device=like.device, dtype=like.dtype)
        if d.numel() <= DISTANCE_CACHE_ENTRIES:  # large ones (a vocabulary x a stream) are rebuilt when asked for
            self._store(key, d)
        return d

    def set_positions(self, space: str, positions: torch.Tensor) -> None:
        """Move a space's neurons to new coordinates (invalidates cached distances)."""
        s = self.space(space)
        if s.positions is None:
            raise ValueError(f"space {space!r} has no coordinates (positions None): it is not placed in space")
        if positions.shape != s.positions.shape:
            raise ValueError(f"space {space!r}: expected coordinates of shape {tuple(s.positions.shape)}")
        s.positions = positions.detach().to(torch.float64).clone()
        self.version += 1

    # -- cache ----------------------------------------------------------------------------------
    # Objectives keep per-graph derived tensors (distance factors, streaming layouts, group plans) here.
    # An entry is valid for the coordinates it was built from: moving any space (``version`` bumps)
    # makes every entry stale, and stale entries are dropped on the next store, so the cache never
    # holds two generations of a weight-sized tensor.
    def cached(self, key: Hashable, build: Callable[[], T]) -> T:
        """The value stored under ``key`` for the current coordinates, built by ``build()`` when missing or stale.

        Usage: ``factors = graph.cached(("factor", conn.weight, cfg.wf), lambda: make_factors(graph, conn))``.
        """
        hit = self._cache.get(key)
        if hit is not None and hit[0] == self.version:
            return cast(T, hit[1])  # the value build() returned for this key earlier: the key fixes its type
        value = build()
        self._store(key, value)
        return value

    def forget(self, key: Hashable) -> None:
        """Drop one cached entry (e.g. its tensors no longer match the model's device). Usage: ``graph.forget(key)``."""
        self._cache.pop(key, None)

    def clear_cache(self) -> None:
        """Drop every cached entry. Usage: ``graph.clear_cache()`` after changing a module-level cache setting."""
        self._cache.clear()

    def cache_values(self) -> list[object]:
        """The values cached now (for memory accounting).

        Usage: ``sum(t.nbytes for t in graph.cache_values() if ...)``.
        """
        return [v for _, v in self._cache.values()]

    def _store(self, key: Hashable, value: object) -> None:
        for k in [k for k, (v, _) in self._cache.items() if v != self.version]:
            del self._cache[k]
        self._cache[key] = (self.version, value)

    # -- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check that every slice fits its tensor and covers its dimension; raise naming the problem."""
        tensors = self._tensors()
        for s in self.spaces:
            for sl in s.slices:
                if sl.name not in tensors:
                    raise ValueError(f"space {s.name!r} refers to unknown tensor {sl.name!r}")
                t = tensors[sl.name]
                if sl.index.shape[0] != s.size:
                    raise ValueError(f"slice of {sl.name!r} has {sl.index.shape[0]} rows for {s.size} neurons")
                if sl.index.max() >= t.shape[sl.dim]:
                    raise ValueError(f"slice of {sl.name!r} indexes past dimension {sl.dim} ({t.shape[sl.dim]})")
        for c in self.connections:
            for name in (c.target, c.source):
                self.space(name)
            w = tensors.get(c.weight)
            if w is None:
                raise ValueError(f"connection refers to unknown weight {c.weight!r}")
            c.target_slice.neuron_of(w.shape[c.target_slice.dim], partial=True)
            c.source_slice.neuron_of(w.shape[c.source_slice.dim], partial=True)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name}[{s.size}]" for s in self.spaces)
        return f"SpatialGraph({parts}; {len(self.connections)} connections)"

    # -- builders -------------------------------------------------------------------------------
    @classmethod
    def from_chain(
        cls,
        model: nn.Module,
        layouts: Mapping[str, str | torch.Tensor] | None = None,
        relocate_inputs: bool = True,
        relocate_outputs: bool = True,
        input_labels: list[str] | None = None,
        output_labels: list[str] | None = None,
        example_inputs=None,
        verify: bool = True,
    ) -> SpatialGraph:
        """Spatial graph of a chain of ``nn.Linear`` layers, optionally fed by ``nn.Embedding`` tables.

        Layers are taken in registration order and must chain (each ``in_features`` equals the
        previous ``out_features``). An embedding of width d followed by a linear layer with
        ``in_features = r*d`` is *folded*: dimension j of all r token embeddings is one neuron.
        Spaces are named ``input`` (or ``embed``), ``hidden1``, ..., ``output``; ``layouts`` maps
        those names to layout specs (``"line"``, ``"grid:8x8"``, ``"circle"``, coordinates).

        The graph is checked to keep the model's function under relocation
        (:func:`~topotorch.graph.verify.check_graph`) on ``example_inputs``, or on a random input
        of the chain's shape; ``verify=False`` skips the check.
        Usage: ``SpatialGraph.from_chain(mlp, layouts={"input": "grid:8x8", "output": "circle"})``.
        """
        layouts = dict(layouts or {})
        mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        if not any(isinstance(m, nn.Linear) for _, m in mods):
            raise ValueError("from_chain needs at least one nn.Linear layer")
        unsupported = [
            n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.MultiheadAttention))
        ]
        if unsupported:
            raise ValueError(f"from_chain handles Linear/Embedding chains only; cannot place layer {unsupported[0]!r}")
        embeds: list[tuple[str, nn.Embedding]] = []
        while mods and isinstance(first := mods[0][1], nn.Embedding):
            embeds.append((mods.pop(0)[0], first))
        if any(isinstance(m, nn.Embedding) for _, m in mods):
            raise ValueError("embeddings must come before the linear layers of the chain")
        linears = [(n, m) for n, m in mods if isinstance(m, nn.Linear)]  # all of mods: embeddings refused above
        for (pn, prev), (n, cur) in zip(linears, linears[1:]):
            if prev.out_features != cur.in_features:
                raise ValueError(
                    f"layers do not chain: {pn!r} gives {prev.out_features} features but {n!r} takes {cur.in_features}"
                )

        spaces: list[Space] = []
        conns: list[Connection] = []
        n_layers = len(linears)

        def names(i: int) -> str:  # name of the space that is the input of linear i
            if i == 0:
                return "embed" if embeds else "input"
            if i == n_layers:
                return "output"
            return f"hidden{i}"

        height = 0.0
        if embeds:
            widths = {m.embedding_dim for _, m in embeds}
            if len(widths) != 1:
                raise ValueError("folded embeddings must share one width")
            d = widths.pop()
            first = linears[0][1]
            if first.in_features % d:
                raise ValueError(
                    f"first linear layer takes {first.in_features} features, not a multiple of embedding width {d}"
                )
            reps = first.in_features // d
            if len(embeds) not in (1, reps):
                raise ValueError(f"{len(embeds)} embedding tables for {reps} folded token slots")
            for ename, emb in embeds:
                tok = f"tokens.{ename}" if len(embeds) > 1 else "tokens"
                spaces.append(Space(tok, emb.num_embeddings, None, -1.0, "input", "fixed"))
            embed_space = Space("embed", d, make_layout(layouts.get("embed"), d), 0.0, "hidden", "weights")
            for ename, emb in embeds:
                tok = f"tokens.{ename}" if len(embeds) > 1 else "tokens"
                w = f"{ename}.weight"
                embed_space.slices.append(Slice(w, 1, slice_index(d)))
                conns.append(
                    Connection(
                        w, "embed", tok, Slice(w, 1, slice_index(d)), Slice(w, 0, slice_index(emb.num_embeddings))
                    )
                )
            spaces.append(embed_space)
        else:
            n_in = linears[0][1].in_features
            spaces.append(
                Space(
                    "input",
                    n_in,
                    make_layout(layouts.get("input"), n_in),
                    0.0,
                    "input",
                    "positions" if relocate_inputs else "fixed",
                    labels=input_labels,
                )
            )

        for i, (lname, lin) in enumerate(linears):
            height += 1.0
            w, b = f"{lname}.weight".lstrip("."), (f"{lname}.bias".lstrip(".") if lin.bias is not None else None)
            src = spaces[-1]
            in_slice = Slice(
                w, 1, slice_index(src.size, reps, src.size) if (i == 0 and embeds) else slice_index(src.size)
            )
            src.slices.append(in_slice)
            out_name = names(i + 1)
            is_out = i == n_layers - 1
            tgt = Space(
                out_name,
                lin.out_features,
                make_layout(layouts.get(out_name), lin.out_features),
                height,
                "output" if is_out else "hidden",
                ("positions" if relocate_outputs else "fixed") if is_out else "weights",
                labels=output_labels if is_out else None,
            )
            tgt.slices.append(Slice(w, 0, slice_index(lin.out_features)))
            if b is not None:
                tgt.slices.append(Slice(b, 0, slice_index(lin.out_features)))
            spaces.append(tgt)
            conns.append(Connection(w, out_name, src.name, Slice(w, 0, slice_index(lin.out_features)), in_slice, b))
        for name in layouts:
            if name not in {s.name for s in spaces}:
                raise ValueError(
                    f"layout given for unknown space {name!r}; spaces: {', '.join(s.name for s in spaces)}"
                )
        from topotorch.graph.verify import checked

        like = linears[0][1].weight

        def example():
            if embeds:
                vocab = min(m.num_embeddings for _, m in embeds)
                return torch.randint(0, vocab, (3, reps), device=like.device)
            return torch.randn(3, linears[0][1].in_features, dtype=like.dtype, device=like.device)

        return checked(cls(model, spaces, conns), example_inputs if example_inputs is not None else example, verify)


def group_matrix(groups: torch.Tensor) -> torch.Tensor:
    """(n_groups, group_size) neuron indices of each group, in index order; equal sizes required.

    Usage: ``group_matrix(space.groups)[h]`` are the neurons of head h.
    """
    ids, counts = groups.unique(return_counts=True)
    if not bool((counts == counts[0]).all()):
        raise ValueError("whole-group moves need groups of equal size")
    return torch.argsort(groups, stable=True).view(len(ids), int(counts[0]))


def slice_index(n: int, k: int = 1, stride: int = 0) -> torch.Tensor:
    """The (n, k) index of a :class:`Slice` whose neuron j owns ``j, j + stride, ..., j + (k-1)·stride``.

    ``k = 1``: neuron j owns index j (a row or column); ``k = 3, stride = d``: the q, k and v rows of
    a fused projection. Usage: ``Slice("fc1.weight", 0, slice_index(64))``.
    """
    return torch.arange(n).unsqueeze(1) + stride * torch.arange(k).unsqueeze(0)


def active_mask(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """``|w| > threshold``: the weights that survive thresholding — the one rule every analysis,
    drawing and compressor uses (a weight exactly at the threshold is dropped).

    The comparison runs in ``w``'s own dtype, so a float32 weight equal to float32(threshold) is
    dropped even though it exceeds the float64 threshold: a compressed model stored in float64 must
    drop exactly the weights the float32 original did. ``threshold`` must be a number >= 0.
    Usage: ``active_mask(graph.tensor("fc1.weight"), 0.05).sum()``.
    """
    return w.detach().abs() > check_threshold(threshold)


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float, or a ValueError naming it when it is not a number >= 0 (NaN included).

    Usage: ``thr = check_threshold(args.threshold)``.
    """
    try:
        ok = float(threshold) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    return float(threshold)


@torch.no_grad()
def zero_inactive_(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """Set the weights :func:`active_mask` drops to 0, in place; returns ``w``.

    Usage: ``zero_inactive_(model.fc1.weight, 0.05)``.
    """
    return w.masked_fill_(~active_mask(w, threshold), 0.0)


def common_prefix(names: list[str]) -> str:
    """The longest dotted prefix the names share: ``["a.b.q", "a.b.k"]`` -> ``"a.b"``."""
    out = []
    for level in zip(*(n.split(".") for n in names)):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def aggregate(w: torch.Tensor, conn: Connection, n_target: int, n_source: int, absolute: bool = True) -> torch.Tensor:
    """A connection's weights summed per (target neuron, source neuron): an (n_target, n_source) matrix.

    ``absolute``: sum |W| (the wiring cost's view) or W (signed, for drawings). Indices a partial
    connection does not cover (another part of a concatenation) are left out.
    Usage: ``aggregate(graph.tensor(c.weight), c, graph.space(c.target).size, graph.space(c.source).size)``.
    """
    td, sd = conn.target_slice.dim, conn.source_slice.dim
    a = w.detach()
    a = (a.abs() if absolute else a).movedim((td, sd), (0, 1))
    a = a.reshape(a.shape[0], a.shape[1], -1).sum(-1)
    t_of = conn.target_slice.neuron_of(a.shape[0], partial=True).to(a.device)
    s_of = conn.source_slice.neuron_of(a.shape[1], partial=True).to(a.device)
    if a.shape[0] != n_target or not torch.equal(t_of, torch.arange(n_target, device=a.device)):
        keep = t_of >= 0
        a = a.new_zeros(n_target, a.shape[1]).index_add_(0, t_of[keep], a[keep])
    if a.shape[1] != n_source or not torch.equal(s_of, torch.arange(n_source, device=a.device)):
        keep = s_of >= 0
        a = a.new_zeros(n_target, n_source).index_add_(1, s_of[keep], a[:, keep])
    return a


FEATURE_NORMS = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def normalised_by_feature_norm(model: nn.Module, space: Space) -> bool:
    """True if a norm over features (LayerNorm, GroupNorm, RMSNorm) normalises this space's neurons.

    Such neurons cannot be removed or penalised one by one without changing the norm's statistics —
    except under a GroupNorm whose groups are whole neurons (removing one leaves the others' groups).
    Affine-free norms own no slice, so for residual streams any affine-free norm of the stream's
    width counts. Usage: ``normalised_by_feature_norm(graph.model, graph.space("resid"))``.
    """
    aligned = False
    for sl in space.slices:
        owner = sl.name.rpartition(".")[0]
        try:
            m = model.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(m, FEATURE_NORMS):
            if isinstance(m, nn.GroupNorm) and _groups_are_whole_neurons(m, sl):
                aligned = True
                continue
            return True
    if space.normalised and not aligned:
        return True
    if space.stream:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is None and m.normalized_shape[-1] == space.size:
                return True
            if isinstance(m, nn.GroupNorm) and m.weight is None and m.num_channels == space.size:
                return True
    return False


def _groups_are_whole_neurons(m: nn.GroupNorm, sl: Slice) -> bool:
    """Each neuron owns whole groups of the GroupNorm (removing one leaves the others' statistics)."""
    per = m.num_channels // m.num_groups
    if sl.dim != 0 or sl.index.shape[1] % per:
        return False
    grp = sl.index // per
    return all(bool((torch.bincount(r, minlength=m.num_groups)[r] == per).all()) for r in grp)
