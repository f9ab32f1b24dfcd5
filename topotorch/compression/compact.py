"""Compact runtime for thresholded MLPs: turn trained sparsity and modularity into a smaller, faster model.

A BIMT-trained MLP is mostly dead weight, yet it still runs as dense matmuls. :func:`compact_mlp`
cuts it down to the network that actually computes, *exactly* (up to float rounding). Removing what
is dead is :func:`topotorch.compression.shrink.shrink`'s job (the one dead-neuron remover, for any
model a graph describes); this module only chooses how the MLP that is left is *stored*:

1. **Threshold and dead neurons** — by ``shrink`` on the MLP's chain graph: weights with
   ``|w| <= threshold`` become 0 (:func:`topotorch.graph.active_mask`, the rule every analysis uses,
   so "thresholded" metrics agree; biases stay); a hidden neuron with no incoming weight is the
   constant ``act(b)``, folded into the next layer's bias; one with no outgoing weight goes; unused
   embedding dimensions go; repeated until nothing changes.
2. **Outputs** that nothing reaches become stored constants ``act(b)``.
3. **Modules.** Hidden neurons are split into connected components (scipy ``connected_components``
   on the bipartite layer graphs) and ordered module by module, so every hidden→hidden matrix is
   block-diagonal; inputs may be read by several modules and modules' output logits are summed.
4. **Storage per layer**, chosen by *measuring* on the batch sizes given at compaction time
   (``choose="auto"``) or forced: ``dense`` (the small matrix left after removal, one ``addmm``),
   ``block`` (padded module blocks, one ``torch.bmm`` for all modules) or ``csr``
   (``torch.sparse_csr`` @ dense). The choice and its timings are kept in the saved description.

The result, :class:`CompactMLP`, is an ordinary ``nn.Module`` with no Python loop over neurons or
samples. :func:`save_compact` writes ``compact.safetensors`` + ``compact.json`` (atomic, checksummed,
no pickle); :func:`load_compact` rebuilds it from those two files with nothing but this module.

    >>> small = compact_mlp(model, threshold=0.05, example=x_train[:256], batch_sizes=(256, 4096))
    >>> verify(thresholded_copy(model, 0.05), small, x_test)  # max |difference|, <= 1e-5 in float32
    >>> save_compact("runs/dw/compact", small)
    ... small = load_compact("runs/dw/compact")
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from topotorch.artifacts import ArtifactError, read_artifact, write_artifact
from topotorch.graph import SpatialGraph, check_threshold, zero_inactive_
from topotorch.timing import median_seconds

FORMAT_VERSION = 1
COMPACT_FORMAT = "topotorch.compression.compact"
FORMATS = ("dense", "block", "csr")
# above this many modules the block format is not built (blocks of a few neurons never beat one matmul,
# and building them is a loop over modules)
MAX_BLOCK_MODULES = 64
Choice = Literal["auto", "dense", "block", "csr"]


class CompactError(ArtifactError):
    """A compact model cannot be built, or its saved files are missing, corrupt or inconsistent."""


# -- activations by name (what the saved description stores) ---------------------------------------

_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def _act_name(m: nn.Module) -> str:
    if isinstance(m, nn.Identity):
        return "identity"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.SiLU):
        return "silu"
    if isinstance(m, nn.GELU):
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    if isinstance(m, nn.Tanh):
        return "tanh"
    if isinstance(m, nn.Sigmoid):
        return "sigmoid"
    raise CompactError(
        f"compact_mlp cannot follow a {type(m).__name__} between linear layers "
        f"(element-wise activations only: {', '.join(_ACTS)})"
    )


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTS[name]
    except KeyError:
        raise CompactError(f"unknown activation {name!r}; known: {', '.join(_ACTS)}") from None


# -- reading an MLP ---------------------------------------------------------------------------------


def _chain(model: nn.Module) -> tuple[torch.Tensor | None, int, list[nn.Linear], list[str]]:
    """(embedding weight or None, tokens per input, linear layers, activation after each layer)."""
    emb: torch.Tensor | None = None
    n_tok, seq = 0, model
    if isinstance(getattr(model, "embedding", None), nn.Embedding) and isinstance(
        getattr(model, "mlp", None), nn.Sequential
    ):
        duck: Any = model  # a TokenMLP-like model, checked just above
        emb, n_tok, seq = duck.embedding.weight, int(duck.n_tokens), duck.mlp  # TokenMLP: folded embeddings
    if not isinstance(seq, nn.Sequential):
        raise CompactError(
            f"compact_mlp handles nn.Sequential chains of nn.Linear with element-wise activations "
            f"(e.g. topotorch.models.MLP / TokenMLP), not a {type(model).__name__}; "
            "for conv nets and transformers use topotorch.compression.shrink"
        )
    linears: list[nn.Linear] = []
    acts: list[str] = []
    for name, m in seq.named_children():
        if isinstance(m, nn.Linear):
            linears.append(m)
            acts.append("identity")
        elif isinstance(m, nn.Dropout):
            continue
        else:
            if not linears:
                raise CompactError(f"{type(m).__name__} ({name!r}) before the first linear layer is not supported")
            if acts[-1] != "identity":
                raise CompactError(f"two activations in a row after layer {len(linears) - 1} are not supported")
            acts[-1] = _act_name(m)
    if not linears:
        raise CompactError("the model has no nn.Linear layer")
    for i, (a, b) in enumerate(zip(linears, linears[1:])):
        if a.out_features != b.in_features:
            raise CompactError(f"linear layers {i} and {i + 1} do not chain ({a.out_features} -> {b.in_features})")
    if emb is not None and linears[0].in_features != n_tok * emb.shape[1]:
        raise CompactError(f"first layer takes {linears[0].in_features} features, not {n_tok} x {emb.shape[1]}")
    return emb, n_tok, linears, acts


@torch.no_grad()
def thresholded_copy(model: nn.Module, threshold: float) -> nn.Module:
    """A deep copy of ``model`` with every Linear/Embedding weight of magnitude <= ``threshold`` set to 0.

    The "thresholded original" a compact model must reproduce. Usage: ``ref = thresholded_copy(mlp, 0.05)``.
    """
    if not threshold >= 0:
        raise CompactError(f"threshold must be >= 0, got {threshold!r}")
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            zero_inactive_(m.weight, threshold)
    return out.eval()


# -- the storage formats ----------------------------------------------------------------------------


class _Layer(nn.Module):
    """One linear layer of a compact model in one storage format; ``forward`` takes and gives flat (B, n) tensors."""

    fmt = ""
    _act: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, n_in: int, n_out: int, activation: str):
        super().__init__()
        self.n_in, self.n_out, self.activation = n_in, n_out, activation
        self._act = _act(activation)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._buffers.items() if v is not None}

    def stored_values(self) -> int:
        """Floating-point values stored (index tensors not counted)."""
        return sum(t.numel() for t in self.tensors().values() if t.is_floating_point())

    def flops(self) -> int:  # multiply-adds x 2 per sample
        raise NotImplementedError

    @classmethod
    def build(cls, w: torch.Tensor, b: torch.Tensor, activation: str, **kw: Any) -> _Layer:
        """The layer computing ``act(x @ w.T + b)`` in this format (``kw``: format options, e.g. ``modules``)."""
        raise NotImplementedError


class DenseLayer(_Layer):
    """``y = act(x[:, cols] @ W.T + b)``: the small dense matrix left after removal (the gather only when needed)."""

    fmt = "dense"
    wt: torch.Tensor  # buffers, declared for the type checker (nn.Module.__getattr__ returns Tensor | Module)
    bias: torch.Tensor
    cols: torch.Tensor | None

    def __init__(
        self, wt: torch.Tensor, bias: torch.Tensor, n_in: int, activation: str, cols: torch.Tensor | None = None
    ):
        super().__init__(n_in, wt.shape[1], activation)
        self.register_buffer("wt", wt.contiguous())  # (n_used_in, n_out): addmm-ready
        self.register_buffer("bias", bias.contiguous())
        self.register_buffer("cols", None if cols is None else cols.to(torch.long).contiguous())

    @classmethod
    def build(cls, w: torch.Tensor, b: torch.Tensor, activation: str, **_) -> DenseLayer:
        used = (w != 0).any(0).nonzero().flatten()
        cols = None if len(used) == w.shape[1] else used
        return cls((w if cols is None else w[:, cols]).t(), b, w.shape[1], activation, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cols is not None:
            x = x.index_select(1, self.cols)
        return self._act(torch.addmm(self.bias, x, self.wt))

    def flops(self) -> int:
        return 2 * self.wt.numel()


class CSRLayer(_Layer):
    """``y = act((W_csr @ x.T).T + b)`` with ``W`` a ``torch.sparse_csr`` matrix: work proportional to the non-zeros."""

    fmt = "csr"
    crow: torch.Tensor  # buffers
    col: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor

    def __init__(
        self,
        crow: torch.Tensor,
        col: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor,
        n_in: int,
        activation: str,
    ):
        super().__init__(n_in, len(crow) - 1, activation)
        self.register_buffer("crow", crow.to(torch.long).contiguous())
        self.register_buffer("col", col.to(torch.long).contiguous())
        self.register_buffer("values", values.contiguous())
        self.register_buffer("bias", bias.contiguous())
        self._csr = self._make()

    def _make(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(
                self.crow, self.col, self.values, (self.n_out, self.n_in), check_invariants=True
            )

    def _apply(self, fn, recurse=True):  # .to(dtype/device): rebuild the CSR view of the moved buffers
        out = super()._apply(fn, recurse)
        self._csr = self._make()
        return out

    @classmethod
    def build(cls, w: torch.Tensor, b: torch.Tensor, activation: str, **_) -> CSRLayer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = w.to_sparse_csr()
        return cls(s.crow_indices(), s.col_indices(), s.values(), b, w.shape[1], activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._act(torch.mm(self._csr, x.t()).t() + self.bias)

    def flops(self) -> int:
        return 2 * self.values.numel()


class BlockLayer(_Layer):
    """Module blocks padded to one size, all multiplied by one ``torch.bmm``.

    Module m reads columns ``idx_in[m]`` of the input (modules may share inputs) and writes rows
    ``out_pos[m]`` of the output (modules may share outputs: summed with ``index_add``; when they
    partition the outputs, a plain ``index_select`` drops the padding instead).
    """

    fmt = "block"
    blocks: torch.Tensor  # buffers
    idx_in: torch.Tensor
    out_pos: torch.Tensor
    bias: torch.Tensor
    _select: torch.Tensor | None

    def __init__(
        self,
        blocks: torch.Tensor,
        idx_in: torch.Tensor,
        out_pos: torch.Tensor,
        bias: torch.Tensor,
        n_in: int,
        activation: str,
    ):
        _m, _kin, _kout = blocks.shape
        super().__init__(n_in, len(bias), activation)
        self.register_buffer("blocks", blocks.contiguous())  # (M, Kin, Kout)
        self.register_buffer("idx_in", idx_in.to(torch.long).contiguous())  # (M*Kin,), padding -> 0
        self.register_buffer("out_pos", out_pos.to(torch.long).contiguous())  # (M*Kout,), padding -> n_out
        self.register_buffer("bias", bias.contiguous())
        self._setup_output()

    def _setup_output(self) -> None:
        real = self.out_pos < self.n_out
        pos = self.out_pos[real]
        self._mode = "add"
        self._select = None
        ar = torch.arange(self.n_out, device=self.out_pos.device)
        if len(pos) == self.n_out and bool((pos.sort().values == ar).all()):
            order = torch.full((self.n_out,), -1, dtype=torch.long, device=self.out_pos.device)
            order[pos] = real.nonzero().flatten()
            if bool((order == ar).all()) and len(self.out_pos) == self.n_out:
                self._mode = "identity"
            else:
                self._mode, self._select = "select", order

    def _apply(self, fn, recurse=True):  # .to(device): the output order is not a buffer (not saved), move it too
        out = super()._apply(fn, recurse)
        if self._select is not None:
            self._select = fn(self._select)
        return out

    @classmethod
    def build(cls, w: torch.Tensor, b: torch.Tensor, activation: str, modules: list | None = None, **_) -> BlockLayer:
        if not modules:
            modules = [(torch.arange(w.shape[0]), torch.arange(w.shape[1]))]
        kin = max(1, max(len(c) for _, c in modules))
        kout = max(1, max(len(r) for r, _ in modules))
        nm = len(modules)
        blocks = w.new_zeros(nm, kin, kout)
        idx_in = torch.zeros(nm, kin, dtype=torch.long)
        out_pos = torch.full((nm, kout), w.shape[0], dtype=torch.long)
        for i, (rows, cols) in enumerate(modules):  # a handful of modules, at compaction time only
            blocks[i, : len(cols), : len(rows)] = w[rows][:, cols].t()
            idx_in[i, : len(cols)] = cols
            out_pos[i, : len(rows)] = rows
        return cls(blocks, idx_in.flatten(), out_pos.flatten(), b, w.shape[1], activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, kin, kout = self.blocks.shape
        g = x.index_select(1, self.idx_in).view(-1, m, kin).transpose(0, 1)  # (M, B, Kin)
        y = torch.bmm(g, self.blocks).transpose(0, 1).reshape(-1, m * kout)  # (B, M*Kout)
        if self._mode == "identity":
            out = y + self.bias
        elif self._mode == "select" and self._select is not None:  # "select" always sets _select
            out = y.index_select(1, self._select) + self.bias
        else:
            out = y.new_zeros(y.shape[0], self.n_out + 1).index_add_(1, self.out_pos, y)[:, : self.n_out] + self.bias
        return self._act(out)

    def stored_values(self) -> int:
        return self.blocks.numel() + self.bias.numel()

    def flops(self) -> int:
        return 2 * self.blocks.numel()


_LAYER_CLASSES: dict[str, type[_Layer]] = {"dense": DenseLayer, "block": BlockLayer, "csr": CSRLayer}
_LAYER_TENSORS = {
    "dense": ("wt", "bias", "cols"),
    "block": ("blocks", "idx_in", "out_pos", "bias"),
    "csr": ("crow", "col", "values", "bias"),
}


# -- the compact model ------------------------------------------------------------------------------


class CompactMLP(nn.Module):
    """The computing part of a thresholded MLP: (optional folded embedding) → compact layers → outputs.

    Inputs are what the original took: a (B, n_in) float tensor, or (B, n_tokens) token ids for a
    ``TokenMLP``. ``description`` records formats, shapes, activations, modules and the measured
    format timings. Usage: ``y = small(x)``; ``small.stored_values()``; ``small.flops()``.
    """

    embed: torch.Tensor | None  # buffers
    out_live: torch.Tensor
    out_const: torch.Tensor

    def __init__(
        self,
        layers: Sequence[_Layer],
        n_in: int,
        n_out: int,
        out_live: torch.Tensor,
        out_const: torch.Tensor,
        embed: torch.Tensor | None = None,
        n_tokens: int = 0,
        description: dict | None = None,
    ):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.n_in, self.n_out, self.n_tokens = n_in, n_out, n_tokens
        self.register_buffer("embed", None if embed is None else embed.contiguous())
        self.register_buffer("out_live", out_live.to(torch.long).contiguous())
        self.register_buffer("out_const", out_const.contiguous())
        self._all_live = len(out_live) == n_out and bool((out_live.cpu() == torch.arange(n_out)).all())
        self.description = description or {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            if x.ndim != 2 or x.shape[1] != self.n_tokens:
                raise ValueError(f"expected (batch, {self.n_tokens}) token ids, got shape {tuple(x.shape)}")
            x = F.embedding(x, self.embed).flatten(1)  # not reshape(B, -1): ambiguous for an empty batch
        elif x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"expected (batch, {self.n_in}) inputs, got shape {tuple(x.shape)}")
        for layer in self.layers:
            x = layer(x)
        if self._all_live:
            return x
        out = self.out_const.expand(x.shape[0], self.n_out).clone()
        if len(self.out_live):
            out.index_copy_(1, self.out_live, x)
        return out

    def typed_layers(self) -> list[_Layer]:
        """The layers as :class:`_Layer` (``nn.ModuleList`` yields plain modules to a type checker).

        Usage: ``[layer.fmt for layer in small.typed_layers()]``.
        """
        return [layer for layer in self.layers if isinstance(layer, _Layer)]  # all of them: built from _Layer only

    def stored_values(self) -> int:
        """Floating-point values the model stores (its parameter count; padding of blocks included)."""
        n = sum(layer.stored_values() for layer in self.typed_layers()) + self.out_const.numel() * (not self._all_live)
        return n + (self.embed.numel() if self.embed is not None else 0)

    def nonzeros(self) -> int:
        """Non-zero weights and biases stored."""
        ts = [t for layer in self.typed_layers() for t in layer.tensors().values() if t.is_floating_point()]
        ts += [self.embed] if self.embed is not None else []
        return int(sum(int((t != 0).sum()) for t in ts))

    def flops(self) -> int:
        """Multiply-adds x 2 per sample (embedding gathers and bias adds not counted)."""
        return sum(layer.flops() for layer in self.typed_layers())

    @property
    def formats(self) -> list[str]:
        return [layer.fmt for layer in self.typed_layers()]


def dense_flops(model: nn.Module) -> int:
    """Multiply-adds x 2 per sample of an MLP's linear layers run dense. Usage: ``dense_flops(mlp)``."""
    return sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _call_seconds(layer: nn.Module, xb: torch.Tensor, reps: int, device: torch.device) -> float:
    """Median seconds of one ``layer(xb)`` call (a function, so the timed call binds its own layer and batch)."""
    return median_seconds(lambda: layer(xb), reps, device=device)


def _batch_like(x: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.ndim - 1)))[:n].contiguous()


@torch.no_grad()
def compact_mlp(
    model: nn.Module,
    threshold: float,
    example: torch.Tensor | None = None,
    choose: Choice = "auto",
    batch_sizes: Sequence[int] | None = None,
    reps: int = 5,
) -> CompactMLP:
    """Compact a (thresholded) MLP: dead neurons removed, constants folded, modules split, storage chosen.

    ``model``: an ``nn.Sequential`` chain of ``nn.Linear`` with element-wise activations (``MLP``), or a
    ``TokenMLP``. ``example``: inputs for timing the formats (default: random ones); ``batch_sizes``:
    the batch sizes to time at (default: the example's); ``choose``: ``"auto"`` (fastest measured,
    per layer, summed per sample over the batch sizes) or one format for every layer.
    Usage: ``small = compact_mlp(mlp, 0.05, example=x_train[:256], batch_sizes=(256, 4096))``.
    """
    if choose not in ("auto", *FORMATS):
        raise CompactError(f"unknown choice {choose!r}; use auto, {', '.join(FORMATS)}")
    emb0, n_tok, linears0, _ = _chain(model)  # refuse what is not an MLP before any work, naming the layer
    try:
        check_threshold(threshold)
    except ValueError as e:
        raise CompactError(str(e)) from None
    # 1. threshold and remove dead neurons (folding constant ones into the next bias): that is shrink's job;
    # imported here so that load_compact never pulls in the model classes shrink rebuilds
    from topotorch.compression.shrink import shrink

    small = shrink(model, SpatialGraph.from_chain(model, verify=False), threshold).model
    emb, _, linears, acts = _chain(small)
    dt, device = linears[0].weight.dtype, linears[0].weight.device
    # bookkeeping on the CPU (scipy finds the modules; the result is moved to ``device`` at the end)
    cpu = torch.device("cpu")
    ws = [lin.weight.detach().to(cpu, torch.float64, copy=True) for lin in linears]
    bs = [
        lin.bias.detach().to(cpu, torch.float64, copy=True) if lin.bias is not None else ws[i].new_zeros(ws[i].shape[0])
        for i, lin in enumerate(linears)
    ]
    n_in_orig, n_out = linears0[0].in_features, ws[-1].shape[0]
    # 2. the embedding keeps the dimensions shrink kept (those some token writes and some neuron reads)
    embed = emb.detach().to(cpu, copy=True) if emb is not None else None
    # 3. outputs nothing reaches are constants act(b)
    out_live = (ws[-1] != 0).any(1).nonzero().flatten()
    out_const = _act(acts[-1])(bs[-1].to(dt))
    ws[-1], bs[-1] = ws[-1][out_live], bs[-1][out_live]
    if len(out_live) == 0:
        ws, bs = [], []
    # 4. modules: connected components of the hidden neurons, each space reordered module by module
    modules_per_layer, module_sizes = _modules(ws, bs)
    ws, bs = [w.to(dt) for w in ws], [b.to(dt) for b in bs]
    # 5. storage per layer
    layers: list[_Layer] = []
    layer_desc: list[dict] = []
    x = None
    if choose == "auto" and ws:
        x = _example_input(example, emb is not None, n_in_orig, n_tok, emb.shape[0] if emb is not None else 0, dt)
        x = (F.embedding(x, embed).flatten(1) if embed is not None else x).to(device)
        sizes = list(batch_sizes) if batch_sizes else [len(x)]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise CompactError(f"batch_sizes must be positive integers, got {list(batch_sizes or [])}")
    for i, (w, b) in enumerate(zip(ws, bs)):
        mods = modules_per_layer[i]
        kw = dict(modules=mods)
        if choose == "auto":
            assert x is not None  # set above: choose == "auto" and there are layers
            timings: dict[str, float] = {}
            cands: dict[str, _Layer] = {}
            for fmt in FORMATS:
                if fmt == "block" and kw["modules"] is None:  # too many modules to block (see _modules)
                    continue
                cand = _LAYER_CLASSES[fmt].build(w, b, acts[i], **kw).to(device)
                cands[fmt] = cand
                timings[fmt] = sum(_call_seconds(cand, _batch_like(x, n), reps, device) / n for n in sizes)
            fmt = min(timings, key=timings.__getitem__)
            layer = cands[fmt]
            x = layer(x)
            info = {"choice": "measured", "seconds_per_sample": dict(timings), "batch_sizes": sizes}
        else:
            layer = _LAYER_CLASSES[choose].build(w, b, acts[i], **kw)
            info = {"choice": "forced"}
        layers.append(layer)
        layer_desc.append(
            {
                "format": layer.fmt,
                "n_in": w.shape[1],
                "n_out": w.shape[0],
                "activation": acts[i],
                "nonzeros": int((w != 0).sum()),
                "modules": len(mods if mods is not None else module_sizes),
                **info,
            }
        )
    desc = {
        "threshold": threshold,
        "dtype": str(dt).replace("torch.", ""),
        "input": (
            {
                "kind": "tokens",
                "n_tokens": n_tok,
                "vocab": int(emb0.shape[0]),
                "embed_dim_before": int(emb0.shape[1]),
                "embed_dims_kept": int(embed.shape[1]),
            }
            if embed is not None and emb0 is not None
            else {"kind": "features", "n_in": n_in_orig}
        ),
        "layers": layer_desc,
        "n_out": n_out,
        "n_live_outputs": len(out_live),
        "modules": module_sizes,
        "hidden_sizes_before": [lin.out_features for lin in linears0[:-1]],
        "hidden_sizes_after": [w.shape[0] for w in ws[:-1]] if ws else [0] * (len(linears) - 1),
    }
    return CompactMLP(layers, n_in_orig, n_out, out_live, out_const, embed, n_tok, desc).to(device)


def _example_input(example, tokens: bool, n_in: int, n_tok: int, vocab: int, dt) -> torch.Tensor:
    if example is not None:
        want = n_tok if tokens else n_in
        if example.ndim != 2 or example.shape[1] != want or len(example) == 0:
            raise CompactError(
                f"example must be a non-empty (batch, {want}) {'token id' if tokens else 'input'} "
                f"tensor, got shape {tuple(example.shape)}"
            )
        return example.to("cpu", dt) if not tokens else example.to("cpu", torch.long)
    g = torch.Generator().manual_seed(0)
    if tokens:
        return torch.randint(vocab, (256, n_tok), generator=g)
    return torch.randn(256, n_in, generator=g, dtype=dt)


def _modules(ws: list[torch.Tensor], bs: list[torch.Tensor]) -> tuple[list[list | None], list[list[int]]]:
    """In place: reorder hidden neurons module by module. Returns, per layer, the modules' (rows, cols)
    index tensors (None for every layer when there are more than ``MAX_BLOCK_MODULES`` modules), and
    each module's size per hidden space."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_layers = len(ws)
    if n_layers == 0:
        return [], []
    if n_layers == 1:
        return [[(torch.arange(ws[0].shape[0]), torch.arange(ws[0].shape[1]))]], [[]]
    sizes = [ws[s].shape[1] for s in range(1, n_layers)]  # hidden spaces 1..L-1
    offs = np.concatenate([[0], np.cumsum(sizes)])
    rows, cols = [], []
    for s in range(1, n_layers - 1):  # linear s: space s -> space s+1
        t, f = (ws[s] != 0).nonzero(as_tuple=True)
        rows.append(t.numpy() + offs[s])
        cols.append(f.numpy() + offs[s - 1])
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    total = int(offs[-1])
    _, label = connected_components(coo_matrix((np.ones(len(r)), (r, c)), shape=(total, total)), directed=False)
    # modules numbered by their first neuron in the first hidden space, so the order is deterministic
    _, first_seen = np.unique(label, return_index=True)  # component k first appears at first_seen[k]
    rank = np.empty(len(first_seen), dtype=np.int64)
    rank[np.argsort(first_seen)] = np.arange(len(first_seen))
    label = rank[label]
    n_mod = len(first_seen)
    labels = [torch.as_tensor(label[offs[s - 1] : offs[s]]) for s in range(1, n_layers)]
    for s in range(1, n_layers):  # stable sort of space s by module
        order = torch.as_tensor(np.argsort(labels[s - 1].numpy(), kind="stable"))
        labels[s - 1] = labels[s - 1][order]
        ws[s - 1], bs[s - 1], ws[s] = ws[s - 1][order], bs[s - 1][order], ws[s][:, order]
    module_sizes = torch.stack([torch.bincount(lab, minlength=n_mod) for lab in labels], 1).tolist()
    if n_mod > MAX_BLOCK_MODULES:  # e.g. one hidden layer: every neuron its own module; blocks of 1 never pay
        return [None] * n_layers, module_sizes
    per_layer: list[list | None] = []
    for i in range(n_layers):
        mods = []
        for m in range(n_mod):
            if i == 0:  # inputs -> first hidden: a module reads whatever its rows use
                rws = (labels[0] == m).nonzero().flatten()
                cls = (ws[0][rws] != 0).any(0).nonzero().flatten()
            elif i == n_layers - 1:  # last hidden -> outputs: a module writes whatever its columns reach
                cls = (labels[-1] == m).nonzero().flatten()
                rws = (ws[i][:, cls] != 0).any(1).nonzero().flatten()
            else:
                rws = (labels[i] == m).nonzero().flatten()
                cls = (labels[i - 1] == m).nonzero().flatten()
            mods.append((rws, cls))
        per_layer.append(mods)
    return per_layer, module_sizes


@torch.no_grad()
def verify(original_thresholded: nn.Module, compact: nn.Module, x: torch.Tensor, batch: int = 4096) -> float:
    """Max |difference| between the two models' outputs on ``x`` (in eval mode, in batches).

    Usage: ``verify(thresholded_copy(mlp, 0.05), small, x_test)`` -> e.g. 2e-7.
    """
    was = original_thresholded.training
    original_thresholded.eval()
    try:
        diff = 0.0
        for i in range(0, len(x), batch):
            a, b = original_thresholded(x[i : i + batch]), compact(x[i : i + batch])
            if a.shape != b.shape:
                raise CompactError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
            diff = max(diff, float((a.to(torch.float64) - b.to(torch.float64)).abs().max()) if a.numel() else 0.0)
        return diff
    finally:
        original_thresholded.train(was)


# -- saving and loading -----------------------------------------------------------------------------


def save_compact(path_dir: str | Path, compact: CompactMLP) -> tuple[Path, Path]:
    """Write ``compact.safetensors`` (the tensors) and ``compact.json`` (the architecture: formats,
    shapes, activations, index maps, the tensors' SHA-256) into ``path_dir``, each atomically.

    Usage: ``save_compact("runs/dw/compact", small)``.
    """
    folder = Path(path_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"out_live": compact.out_live, "out_const": compact.out_const}
    if compact.embed is not None:
        tensors["embed"] = compact.embed
    layers = []
    for i, layer in enumerate(compact.typed_layers()):
        names = []
        for k, t in layer.tensors().items():
            tensors[f"layers.{i}.{k}"] = t
            names.append(k)
        layers.append(
            {
                "format": layer.fmt,
                "n_in": layer.n_in,
                "n_out": layer.n_out,
                "activation": layer.activation,
                "tensors": names,
            }
        )
    spec = {
        "format": "topotorch.compression.compact",
        "version": FORMAT_VERSION,
        "n_in": compact.n_in,
        "n_out": compact.n_out,
        "n_tokens": compact.n_tokens,
        "layers": layers,
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()},
        "description": compact.description,
    }
    st, js = folder / "compact.safetensors", folder / "compact.json"
    write_artifact(st, js, tensors, spec, {"format": COMPACT_FORMAT, "version": str(FORMAT_VERSION)})
    return st, js


def load_compact(path_dir: str | Path) -> CompactMLP:
    """Rebuild a :class:`CompactMLP` saved by :func:`save_compact` (no pickle, no training code).

    Raises :class:`CompactError` naming the missing, corrupt or mismatched file.
    Usage: ``small = load_compact("runs/dw/compact")``.
    """
    folder = Path(path_dir)
    st, js = folder / "compact.safetensors", folder / "compact.json"
    for p in (js, st):
        if not p.is_file():
            raise CompactError(f"{p} is missing (not a compact model folder written by save_compact)")
    tensors, spec = read_artifact(st, js, kind=COMPACT_FORMAT, error=CompactError)
    try:
        if spec.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {spec.get('version')!r}, this code reads {FORMAT_VERSION}")
        layers_spec, shapes = list(spec["layers"]), dict(spec["shapes"])
        n_in, n_out, n_tok = int(spec["n_in"]), int(spec["n_out"]), int(spec["n_tokens"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CompactError(f"{js} is corrupt: {e}") from None
    for k, shape in shapes.items():
        if k not in tensors:
            raise CompactError(f"{st} lacks tensor {k!r} named in {js.name}")
        if list(tensors[k].shape) != list(shape):
            raise CompactError(f"{st}: tensor {k!r} has shape {list(tensors[k].shape)}, {js.name} says {shape}")
    layers: list[_Layer] = []
    try:
        for i, ls in enumerate(layers_spec):
            fmt = ls["format"]
            if fmt not in _LAYER_CLASSES:
                raise ValueError(f"layer {i}: unknown format {fmt!r}")
            t = {k: tensors[f"layers.{i}.{k}"] for k in _LAYER_TENSORS[fmt] if f"layers.{i}.{k}" in tensors}
            missing = [k for k in _LAYER_TENSORS[fmt] if k not in t and k != "cols"]  # cols: None when all are used
            if missing:
                raise ValueError(f"layer {i}: tensors {missing} are missing")
            act, lin = ls["activation"], int(ls["n_in"])
            if fmt == "dense":
                layers.append(DenseLayer(t["wt"], t["bias"], lin, act, t.get("cols")))
            elif fmt == "csr":
                layers.append(CSRLayer(t["crow"], t["col"], t["values"], t["bias"], lin, act))
            else:
                layers.append(BlockLayer(t["blocks"], t["idx_in"], t["out_pos"], t["bias"], lin, act))
            if layers[-1].n_out != int(ls["n_out"]):
                raise ValueError(f"layer {i}: {layers[-1].n_out} outputs, description says {ls['n_out']}")
        model = CompactMLP(
            layers,
            n_in,
            n_out,
            tensors["out_live"],
            tensors["out_const"],
            tensors.get("embed"),
            n_tok,
            spec.get("description") or {},
        )
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise CompactError(f"{folder}: the saved compact model is inconsistent: {e}") from None
    return model.eval()


# -- a trained run, end to end ----------------------------------------------------------------------


@torch.no_grad()
def forward_seconds(model: nn.Module, x: torch.Tensor, reps: int | None = None, budget_s: float = 0.5) -> float:
    """Median seconds of one ``model(x)`` under ``torch.inference_mode`` (reps: as many as fit ``budget_s``,
    5 to 200). Usage: ``forward_seconds(small, x[:256])``."""
    with torch.inference_mode():
        model(x)
        if reps is None:
            sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            reps = int(min(200, max(5, budget_s / max(time.perf_counter() - t0, 1e-7))))
        return median_seconds(lambda: model(x), reps, warmup=1, device=x.device)


def speed_table(
    dense: nn.Module,
    compact: nn.Module,
    x: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 256, 4096),
    budget_s: float = 0.5,
) -> dict[str, dict]:
    """Latency and throughput of both models at each batch size (inputs: ``x`` repeated to size), medians.

    Usage: ``speed_table(mlp, small, x_test)["256"]["throughput_ratio"]``.
    """
    out = {}
    for n in batch_sizes:
        xb = _batch_like(x, n)
        td, tc = forward_seconds(dense, xb, budget_s=budget_s), forward_seconds(compact, xb, budget_s=budget_s)
        out[str(n)] = {
            "dense_seconds": td,
            "compact_seconds": tc,
            "dense_samples_per_s": n / td,
            "compact_samples_per_s": n / tc,
            "throughput_ratio": td / tc,
        }
    return out
