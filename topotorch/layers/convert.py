"""Convert a model's MLP blocks into FFF layers of a given training width.

    >>> from topotorch.models import TinyGPT
    >>> gpt = TinyGPT(vocab=65, d_model=64, n_layers=2)  # blocks.{0,1}.mlp: Linear-GELU-Linear, 256 wide
    >>> fffify(gpt, include="blocks.*.mlp", leaf_width=8)  # -> FFF(64, 8, 64, depth=5), training width 256
    ['blocks.0.mlp', 'blocks.1.mlp']

An MLP block is found by one rule of :data:`MLP_PATTERNS` (first match wins):

* ``sequential`` — an ``nn.Sequential`` of ``Linear, activation, Linear`` (``Dropout`` /
  ``Identity`` anywhere in it are ignored; a dropout between the activation and the second
  Linear becomes the FFF's leaf dropout). The block is replaced by the FFF.
* attribute rules (:class:`MLPPattern`): a module holding a first dense layer, an activation
  and a second dense layer at known attribute paths, whose forward is
  ``fc2(dropout(act(fc1(x))))`` with nothing else on the path between them. The FFF goes
  into ``fc1``'s place, the activation, hidden dropout and ``fc2`` become ``nn.Identity``, so
  the module's own forward (residuals, norms, output dropout) stays as it is. Built in:
  Hugging Face GPT-2 (``c_fc``/``act``/``c_proj``, ``Conv1D`` layers: weight (in, out)),
  BERT-like layers (``intermediate.dense`` + ``intermediate.intermediate_act_fn``,
  ``output.dense``; the block is the layer holding both, e.g. ``encoder.layer.0``),
  ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (``linear1``,
  ``activation``, ``dropout``, ``linear2``; torch's fused inference fast path is switched off
  for converted layers, since it reads ``linear1.weight``), HF ``fc1``/``activation_fn``/``fc2``
  (CLIP, ViT, OPT, ...), DistilBERT (``lin1``/``activation``/``lin2``) and GPT-NeoX
  (``dense_h_to_4h``/``act``/``dense_4h_to_h``).
* gated MLPs (``gate_proj``/``up_proj``/``down_proj`` as in Llama, Mistral, Qwen;
  ``wi_0``/``wi_1``/``wo`` as in T5 v1.1) are refused with a ValueError naming the block: an
  FFF leaf is ``Linear–activation–Linear`` and has no multiplicative gate, so no FFF computes
  what the block computes.

Before anything is replaced every matched block is checked on a float64 copy: the FFF of depth
0 holding the block's own weights is installed the same way and must give the block's output
to 1e-10 on a random input (``check=False`` skips it). A block whose forward does something
else between the two layers is refused, naming it, instead of being silently changed.

The FFF gets the block's input and output widths, a copy of its activation, its dtype and
device, and fresh weights (``init="fresh"``: train or fine-tune after converting), or the dense
block's weights (``init="dense"``: the hidden neurons split in order over the leaves, routing
neutral, second layers scaled by 2^depth: the training (soft) forward equals the dense block at
init for any depth, and the hard forward too at depth 0).
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from topotorch.layers.fff import FFF, UltraFFF

__all__ = ["fffify", "mlp_blocks", "MLPPattern", "GatedMLPPattern", "MLP_PATTERNS"]

_IGNORED = (nn.Dropout, nn.Identity)
CHECK_TOLERANCE = 1e-10


# ------------------------------------------------------------------------------------------------
# reading dense layers and activations
# ------------------------------------------------------------------------------------------------


def _dense(m) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight as (out, in), bias) of an ``nn.Linear`` or a Hugging Face ``Conv1D`` (weight (in, out)); else None."""
    if isinstance(m, nn.Linear):
        return m.weight, m.bias
    w = getattr(m, "weight", None)
    if (
        isinstance(m, nn.Module)
        and type(m).__name__ == "Conv1D"
        and hasattr(m, "nf")
        and isinstance(w, torch.Tensor)
        and w.ndim == 2
        and w.shape[1] == m.nf
    ):
        return w.t(), getattr(m, "bias", None)
    return None


class _Function(nn.Module):
    """An activation given as a plain function (``nn.TransformerEncoderLayer(activation=F.relu)``)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def _activation_module(act) -> nn.Module:
    if isinstance(act, nn.Module):
        return copy.deepcopy(act)
    if act is F.relu:
        return nn.ReLU()
    if act is F.gelu:
        return nn.GELU()
    return _Function(act)


def _is_activation(act) -> bool:
    if isinstance(act, nn.Module):
        return (
            _dense(act) is None
            and not isinstance(act, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
            and next(act.parameters(), None) is None
        )
    return callable(act) and not isinstance(act, type)


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _set(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, leaf, value)


class _Rule(Protocol):
    """What :func:`fffify` needs of an entry of :data:`MLP_PATTERNS`."""

    @property
    def name(self) -> str: ...

    def match(self, module: nn.Module) -> _Found | None: ...

    def install(self, model: nn.Module, name: str, block: nn.Module, layer: nn.Module) -> None: ...


@dataclass
class _Found:
    """One MLP block as read by a rule: y = W2 · drop(act(W1 x + b1)) + b2."""

    rule: _Rule
    w1: torch.Tensor  # (hidden, in)
    b1: torch.Tensor | None
    act: object
    w2: torch.Tensor  # (out, hidden)
    b2: torch.Tensor | None
    dropout: float = 0.0
    refusal: str | None = None

    @property
    def widths(self) -> tuple[int, int, int]:
        return self.w1.shape[1], self.w1.shape[0], self.w2.shape[0]


# ------------------------------------------------------------------------------------------------
# the rules
# ------------------------------------------------------------------------------------------------


class SequentialPattern:
    """``nn.Sequential(Linear, activation, [Dropout], Linear)``: the whole Sequential becomes the FFF."""

    name = "sequential"

    def match(self, module: nn.Module) -> _Found | None:
        if not isinstance(module, nn.Sequential):
            return None
        parts = [m for m in module if not isinstance(m, _IGNORED)]
        if not (
            len(parts) == 3
            and isinstance(parts[0], nn.Linear)
            and isinstance(parts[2], nn.Linear)
            and not isinstance(parts[1], (nn.Linear, nn.Sequential))
            and parts[0].out_features == parts[2].in_features
        ):
            return None
        items = list(module)
        i1, i2 = items.index(parts[1]), items.index(parts[2])
        p = max([m.p for m in items[i1 + 1 : i2] if isinstance(m, nn.Dropout)], default=0.0)
        return _Found(self, parts[0].weight, parts[0].bias, parts[1], parts[2].weight, parts[2].bias, p)

    def install(self, model: nn.Module, name: str, block: nn.Module, layer: nn.Module) -> None:
        if not name:
            raise ValueError("the model itself is an MLP block: use the FFF directly instead of fffify")
        _set(model, name, layer)


@dataclass(frozen=True)
class MLPPattern:
    """A family's MLP block as attribute paths inside one module (e.g. GPT-2's ``GPT2MLP``).

    ``fc1`` / ``fc2``: the two dense layers (``nn.Linear`` or HF ``Conv1D``); ``act``: the
    activation (a module or a function attribute); ``dropout``: a dropout between the activation
    and ``fc2`` (optional: it becomes the FFF's leaf dropout). The module's forward must compute
    ``fc2(dropout(act(fc1(x))))`` on that path (checked on a copy before converting). The FFF
    goes in ``fc1``'s place; ``act``, ``dropout`` and ``fc2`` become ``nn.Identity``. ``after``
    fixes up the block afterwards (e.g. switch off a fused path that reads ``fc1.weight``);
    ``call(block, x)`` runs the block for that check when it needs more than ``block(x)``.
    Usage: ``MLP_PATTERNS.append(MLPPattern("clip", "fc1", "activation_fn", "fc2"))``.
    """

    name: str
    fc1: str
    act: str
    fc2: str
    dropout: str | None = None
    after: Callable[[nn.Module], None] | None = None
    call: Callable[[nn.Module, torch.Tensor], object] | None = None

    def match(self, module: nn.Module) -> _Found | None:
        fc1, fc2, act = _dense(_get(module, self.fc1)), _dense(_get(module, self.fc2)), _get(module, self.act)
        if fc1 is None or fc2 is None or act is None or not _is_activation(act):
            return None
        if fc1[0].shape[0] != fc2[0].shape[1]:
            return None
        p = 0.0
        if self.dropout is not None:
            d = _get(module, self.dropout)
            if not isinstance(d, (nn.Dropout, nn.Identity)):
                return None
            p = d.p if isinstance(d, nn.Dropout) else 0.0
        return _Found(self, fc1[0], fc1[1], act, fc2[0], fc2[1], p)

    def install(self, model: nn.Module, name: str, block: nn.Module, layer: nn.Module) -> None:
        _set(block, self.fc1, layer)
        for path in (self.act, self.dropout, self.fc2):
            if path is not None:
                _set(block, path, nn.Identity())
        if self.after is not None:
            self.after(block)


@dataclass(frozen=True)
class GatedMLPPattern:
    """A gated MLP ``down(act(gate(x)) * up(x))``: recognised so that it is refused by name."""

    name: str
    gate: str
    up: str
    down: str

    def match(self, module: nn.Module) -> _Found | None:
        gate, up, down = (_dense(_get(module, p)) for p in (self.gate, self.up, self.down))
        if gate is None or up is None or down is None:
            return None
        why = (
            f"a gated MLP ({self.down}(act({self.gate}(x)) * {self.up}(x)), hidden width {gate[0].shape[0]}): an "
            "FFF leaf is Linear-activation-Linear with no multiplicative gate, so no FFF computes this block; "
            "it is not converted (narrow `include` to leave it out)"
        )
        return _Found(self, gate[0], gate[1], None, down[0], down[1], refusal=why)

    def install(self, model, name, block, layer) -> None:  # never called: refused before
        raise AssertionError("gated MLP blocks are refused")


def _torch_transformer_layer_after(layer: nn.Module) -> None:
    # nn.TransformerEncoderLayer's fused inference path reads linear1.weight / linear2.weight;
    # activation_relu_or_gelu = 0 is its documented "no fast path" state.
    if hasattr(layer, "activation_relu_or_gelu"):
        # a plain int flag, which nn.Module's attribute typing (Tensor | Module) does not allow
        setattr(layer, "activation_relu_or_gelu", 0)  # noqa: B010


def _torch_transformer_layer_call(layer: nn.Module, x: torch.Tensor):
    return layer(x, x) if isinstance(layer, nn.TransformerDecoderLayer) else layer(x)  # a decoder reads a memory


MLP_PATTERNS: list = [
    SequentialPattern(),
    MLPPattern("hf-gpt2", "c_fc", "act", "c_proj"),
    MLPPattern("bert", "intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"),
    MLPPattern("fc1/fc2", "fc1", "activation_fn", "fc2"),  # HF CLIP, ViT, OPT, Whisper, ...
    MLPPattern("distilbert", "lin1", "activation", "lin2"),
    MLPPattern("gpt-neox", "dense_h_to_4h", "act", "dense_4h_to_h"),
    MLPPattern(
        "torch-transformer-layer",
        "linear1",
        "activation",
        "linear2",
        dropout="dropout",
        after=_torch_transformer_layer_after,
        call=_torch_transformer_layer_call,
    ),
    GatedMLPPattern("gated (llama)", "gate_proj", "up_proj", "down_proj"),
    GatedMLPPattern("gated (t5)", "wi_0", "wi_1", "wo"),
]


def _find(module: nn.Module) -> _Found | None:
    for rule in MLP_PATTERNS:
        found = rule.match(module)
        if found is not None:
            return found
    return None


def _blocks(model: nn.Module, include: str | list[str]) -> list[tuple[str, nn.Module, _Found]]:
    patterns = [include] if isinstance(include, str) else list(include)
    out: list[tuple[str, nn.Module, _Found]] = []
    for name, m in model.named_modules():
        if out and name.startswith(out[-1][0] + ".") and out[-1][0]:
            continue  # inside a block already found
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        found = _find(m)
        if found is not None and (name or not isinstance(found.rule, SequentialPattern)):
            out.append((name, m, found))
    return out


def mlp_blocks(model: nn.Module, include: str | list[str] = "*") -> list[str]:
    """Qualified names of the convertible MLP blocks matching ``include`` (see :data:`MLP_PATTERNS`).

    ``include`` is a glob (or list of globs) on the qualified module name, e.g. ``"blocks.*.mlp"``
    (the model itself, when it is a block such as a bare ``nn.TransformerEncoderLayer``, is ``""``).
    Gated MLPs are not listed (they cannot be converted). Usage: ``mlp_blocks(gpt, "blocks.*.mlp")``.
    """
    return [name for name, _, f in _blocks(model, include) if f.refusal is None]


# ------------------------------------------------------------------------------------------------
# building the FFF
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def _copy_dense(layer: FFF, found: _Found) -> None:
    """Leaf j holds hidden neurons [j·ℓ, (j+1)·ℓ); routing neutral (z = 0: every leaf weighs 2^-d in the
    soft forward), second layers scaled by 2^d: the soft forward equals the dense block."""
    L, l = layer.n_leaves, layer.leaf_width
    _, hidden, out = found.widths
    if L * l != hidden:
        raise ValueError(
            f"init='dense' needs the training width 2^depth·leaf_width = {L * l} to equal the block's "
            f"hidden width {hidden}"
        )
    layer.node_weights.zero_()
    layer.node_biases.zero_()
    layer.w1s.copy_(found.w1.reshape(L, l, -1).transpose(1, 2))
    layer.b1s.copy_(found.b1.reshape(L, l) if found.b1 is not None else torch.zeros(L, l))
    layer.w2s.copy_(found.w2.t().reshape(L, l, out) * L)
    layer.b2s.copy_((found.b2 if found.b2 is not None else torch.zeros(out)).expand(L, out))


def _tensors(y) -> list[torch.Tensor]:
    if torch.is_tensor(y):
        return [y]
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in _tensors(v)]
    return []


def _check(model: nn.Module, name: str, block: nn.Module, found: _Found) -> None:
    """The rule's reading of ``block`` is right: the exact depth-0 FFF installed its way keeps the output."""
    label = name or "the model"
    twin = copy.deepcopy(block).to(torch.float64).eval()
    found_twin = found.rule.match(twin)
    assert found_twin is not None  # a copy of a block its rule matched
    n_in = found.widths[0]
    x = torch.randn(2, 3, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = FFF(
        n_in,
        found.widths[1],
        found.widths[2],
        0,
        activation=_activation_module(found.act),
        device=found.w1.device,
        dtype=torch.float64,
    )
    _copy_dense(exact, found_twin)
    try:
        x = x.to(found.w1.device)
        run = getattr(found.rule, "call", None) or (lambda m, t: m(t))
        with torch.no_grad():
            before = _tensors(run(twin, x))
            if isinstance(found.rule, SequentialPattern):
                after = _tensors(exact(x))
            else:
                found.rule.install(twin, "", twin, exact)
                after = _tensors(run(twin, x))
    except Exception as e:  # a block that cannot run alone on (batch, tokens, width) inputs
        raise ValueError(
            f"{label} ({type(block).__name__}): could not run it on a (2, 3, {n_in}) input to check the "
            f"conversion ({type(e).__name__}: {e}); pass check=False to convert without the check"
        ) from e
    worst = (
        max(
            ((a - b).abs().max() / a.abs().max().clamp_min(1e-300)).item() if a.shape == b.shape else math.inf
            for a, b in zip(before, after)
        )
        if before and len(before) == len(after)
        else math.inf
    )
    if not worst <= CHECK_TOLERANCE:
        raise ValueError(
            f"{label} ({type(block).__name__}) looks like a {found.rule.name} MLP block, but its forward "
            f"is not {getattr(found.rule, 'fc2', 'fc2')}(act({getattr(found.rule, 'fc1', 'fc1')}(x))) "
            f"on that path (the exact FFF changed its output by {worst:.2g} relative): not converted; "
            "describe it with an MLPPattern or pass check=False"
        )


def fffify(
    model: nn.Module,
    include: str | list[str] = "*",
    *,
    leaf_width: int = 8,
    training_width: int | None = None,
    depth: int | None = None,
    variant: Literal["fff", "ultra"] = "fff",
    n_trees: int = 1,
    init: Literal["fresh", "dense"] = "fresh",
    check: bool = True,
    **fff_kwargs,
) -> list[str]:
    """Replace the MLP blocks of ``model`` matching ``include`` by FFF layers, in place.

    Blocks are found by :data:`MLP_PATTERNS` (``nn.Sequential`` MLPs, HF GPT-2 and BERT-like MLPs,
    ``nn.TransformerEncoderLayer``); a gated MLP matching ``include`` is refused (ValueError
    naming it). The training width (2^depth·leaf_width) defaults to each block's hidden width;
    give ``depth`` or ``training_width`` to change it (it must be leaf_width times a power of two).
    ``variant="ultra"`` builds :class:`UltraFFF` trees (``n_trees`` of them, depth chosen so
    that n_trees·(2^(depth+1)-1) ≈ training width, i.e. depth = log2(width/n_trees + 1) - 1).
    ``init="dense"`` starts each FFF from the block's weights (soft forward exact; hard too at
    depth 0). ``check`` verifies each block's reading on a float64 copy first. Extra keyword
    arguments go to the layer (e.g. ``region_leak=0.1``). Returns the block names replaced.
    Usage: ``fffify(gpt, "blocks.*.mlp", leaf_width=8)``; ``fffify(hf_gpt2, "transformer.h.*.mlp")``.
    """
    if variant not in ("fff", "ultra"):
        raise ValueError(f"variant must be 'fff' or 'ultra', got {variant!r}")
    if init not in ("fresh", "dense"):
        raise ValueError(f"init must be 'fresh' or 'dense', got {init!r}")
    if init == "dense" and variant == "ultra":
        raise ValueError("init='dense' is only defined for variant='fff'")
    blocks = _blocks(model, include)
    refused = [(name, m, f) for name, m, f in blocks if f.refusal is not None]
    if refused:
        raise ValueError(
            "; ".join(f"{name or 'the model'} ({type(m).__name__}) is {f.refusal}" for name, m, f in refused)
        )
    if not blocks:
        found = mlp_blocks(model, "*")
        kinds = ", ".join(r.name for r in MLP_PATTERNS if not isinstance(r, GatedMLPPattern))
        raise ValueError(f"no MLP block ({kinds}) matches {include!r}; MLP blocks in this model: {found or 'none'}")
    if check:
        for name, m, f in blocks:
            _check(model, name, m, f)
    replacements: dict[str, FFF | UltraFFF] = {}
    for name, _block, f in blocks:
        n_in, hidden, n_out = f.widths
        kw: dict[str, Any] = {"device": f.w1.device, "dtype": f.w1.dtype}
        width = training_width or hidden
        act = _activation_module(f.act)
        if variant == "ultra":
            d = depth if depth is not None else math.log2(width / n_trees + 1) - 1
            if d != int(d) or d < 0:
                raise ValueError(
                    f"{name}: UltraFFF needs width/n_trees + 1 to be a power of two, got width {width}, "
                    f"n_trees {n_trees}; pass depth="
                )
            replacements[name] = UltraFFF(n_in, n_out, int(d), n_trees, activation=act, **fff_kwargs, **kw)
            continue
        if depth is not None:
            d = depth
        else:
            d = math.log2(width / leaf_width) if width % leaf_width == 0 else -1
            if d != int(d) or d < 0:
                raise ValueError(
                    f"{name}: training width {width} is not leaf_width ({leaf_width}) times a power of "
                    f"two; pass training_width= or depth="
                )
        layer_kw: dict[str, Any] = {"dropout": f.dropout, **fff_kwargs} if f.dropout else dict(fff_kwargs)
        layer = FFF(n_in, leaf_width, n_out, int(d), activation=act, **layer_kw, **kw)
        if init == "dense":
            try:
                _copy_dense(layer, f)
            except ValueError as e:
                raise ValueError(f"{name or 'the model'}: {e}") from None
        replacements[name] = layer
    for name, block, f in blocks:
        replacements[name].train(block.training)  # a model in eval mode stays in eval mode
        f.rule.install(model, name, block, replacements[name])
    for m in model.modules():  # torch's encoder: its nested-tensor fast path reads layers[0].linear1.weight
        if isinstance(m, nn.TransformerEncoder) and any(
            isinstance(layer.linear1, (FFF, UltraFFF)) for layer in m.layers if hasattr(layer, "linear1")
        ):
            m.use_nested_tensor = False
    return [name for name, _, _ in blocks]
