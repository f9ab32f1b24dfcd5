"""Sparse-training baselines: pruning masks, masked fine-tuning, lottery tickets and sparse model soups.

What counts as a prunable weight: the ``weight`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d``
(including subclasses such as the attention projections built from ``nn.Linear``). Biases,
normalisation parameters and embedding tables are never pruned and never counted in the
sparsity. A *mask set* is a ``{parameter name: bool tensor}`` dict (True = kept), on the
weights' device.

Masks
    :func:`global_magnitude_masks` (one threshold over all layers), :func:`layerwise_magnitude_masks`
    (the same sparsity in every layer), :func:`random_masks` (uniform per layer: every layer keeps
    the same fraction, chosen at random) and :func:`semi_structured_masks` (N:M, by default 2:4:
    in every group of 4 consecutive inputs of a row the 2 largest |w| are kept). Every function keeps
    an exact count: ``round((1 - sparsity) * n)`` entries (globally or per layer).

Keeping pruned weights at zero
    :class:`MaskSet` multiplies the weights by their masks, and ``attach(optimizer)`` re-applies
    them after every ``optimizer.step()`` (a step post-hook), so fine-tuning never revives a pruned
    weight. :func:`to_semi_structured` turns 2:4-masked Linear weights into PyTorch's
    ``SparseSemiStructuredTensor`` (cuSPARSELt/CUTLASS kernels) — CUDA only.

Procedures (they train, so they live a floor up, in :mod:`topotorch.experiments.retrain`)
    :func:`finetune` (masked AdamW with a cosine-decayed learning rate, mini-batches from a seeded
    generator), :func:`imp_rewind` (iterative magnitude pruning with weight rewinding, Frankle et al.
    2020, "Linear mode connectivity and the lottery ticket hypothesis") and :func:`sparse_soup`
    (Zimmer, Spiegel & Pokutta, "Sparse Model Soups", ICLR 2024: each prune–retrain cycle trains
    m copies that share the mask with different batch orders, averages them, and starts the next
    cycle from the average).

    >>> masks = global_magnitude_masks(model, 0.9)
    >>> ms = MaskSet(masks).apply(model)
    >>> finetune(task, model, data, ms, steps=1000, lr=1e-3)
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Masks = dict[str, torch.Tensor]


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights pruning acts on: ``{name: weight}`` of every Linear / Conv layer, in module order.

    Usage: ``prunable_weights(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))``
    → ``{"0.weight": ..., "1.weight": ...}``.
    """
    out: dict[str, nn.Parameter] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, PRUNABLE_TYPES) and isinstance(w := getattr(mod, "weight", None), nn.Parameter):
            out[f"{mname}.weight" if mname else "weight"] = w
    if not out:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv weights to prune")
    return out


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float in [0, 1), or a ValueError naming it. Usage: ``s = check_sparsity(0.9)``."""
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not 0 <= sparsity < 1
        or not math.isfinite(sparsity)
    ):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _n_keep(n: int, sparsity: float) -> int:
    return max(0, min(n, round((1.0 - sparsity) * n)))


def _weights(model_or_weights: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_weights, nn.Module):
        return {k: v.detach() for k, v in prunable_weights(model_or_weights).items()}
    return {k: v.detach() for k, v in model_or_weights.items()}


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.reshape(-1), k, sorted=False).indices] = True
    return mask.view_as(scores)


def _scores(w: torch.Tensor, previous: torch.Tensor | None, name: str = "") -> torch.Tensor:
    s = w.abs().to(torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype)
    if previous is not None:  # entries pruned before can never come back
        if previous.shape != w.shape:
            raise ValueError(
                f"previous mask for {name!r} has shape {tuple(previous.shape)}, the weight {tuple(w.shape)}"
            )
        s = torch.where(previous.to(device=s.device, dtype=torch.bool), s, torch.full_like(s, -1.0))
    return s


@torch.no_grad()
def global_magnitude_masks(
    model: nn.Module | dict[str, torch.Tensor], sparsity: float, previous: Masks | None = None
) -> Masks:
    """Keep the ``round((1 - sparsity) * N)`` largest |w| over all prunable weights together (N = their total count).

    ``previous`` (a mask set) restricts the choice to entries still kept — iterative pruning.
    Usage: ``masks = global_magnitude_masks(model, 0.9)``.
    """
    sparsity = check_sparsity(sparsity)
    ws = _weights(model)
    names = list(ws)
    flat = torch.cat([_scores(ws[n], previous.get(n) if previous else None, n).reshape(-1) for n in names])
    n_keep = _n_keep(flat.numel(), sparsity)
    if previous is not None and n_keep > int((flat >= 0).sum()):
        raise ValueError(
            f"cannot prune to {sparsity:g}: the previous masks already remove more "
            f"({mask_sparsity(previous):.4g}); iterative sparsities must increase"
        )
    keep = _topk_mask(flat, n_keep)
    parts = keep.split([ws[n].numel() for n in names])
    return {n: p.view_as(ws[n]) for n, p in zip(names, parts)}


@torch.no_grad()
def layerwise_magnitude_masks(
    model: nn.Module | dict[str, torch.Tensor], sparsity: float, previous: Masks | None = None
) -> Masks:
    """Keep the ``round((1 - sparsity) * n_l)`` largest |w| in every layer l separately.

    Usage: ``masks = layerwise_magnitude_masks(model, 0.8)``.
    """
    sparsity = check_sparsity(sparsity)
    return {
        n: _topk_mask(_scores(w, previous.get(n) if previous else None, n), _n_keep(w.numel(), sparsity))
        for n, w in _weights(model).items()
    }


@torch.no_grad()
def random_masks(
    model: nn.Module | dict[str, torch.Tensor], sparsity: float, generator: torch.Generator | None = None
) -> Masks:
    """Keep ``round((1 - sparsity) * n_l)`` entries of every layer, chosen uniformly at random.

    The per-layer counts are those of :func:`layerwise_magnitude_masks` (uniform sparsity per layer), so
    random pruning differs from layer-wise magnitude pruning only in *which* weights go. ``generator``
    (a CPU ``torch.Generator``) makes it reproducible.
    Usage: ``random_masks(model, 0.9, torch.Generator().manual_seed(0))``.
    """
    sparsity = check_sparsity(sparsity)
    out = {}
    for n, w in _weights(model).items():
        scores = torch.rand(w.shape, generator=generator).to(w.device)
        out[n] = _topk_mask(scores, _n_keep(w.numel(), sparsity))
    return out


@torch.no_grad()
def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M mask of one weight: in every group of ``m`` consecutive inputs of a row keep the ``n`` largest |w|.

    The weight is read as (out, in·…) — a conv kernel's input channels and taps flattened in memory
    order; the input size must be a multiple of ``m``. Usage: ``nm_mask(linear.weight)`` (2:4).
    """
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    w2 = weight.reshape(weight.shape[0], -1)
    if w2.shape[1] % m:
        raise ValueError(f"{n}:{m} masks need the input size to be a multiple of {m}, got {w2.shape[1]}")
    groups = w2.abs().reshape(w2.shape[0], -1, m)
    idx = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(weight.shape)


def semi_structured_masks(
    model: nn.Module | dict[str, torch.Tensor], n: int = 2, m: int = 4, skip_incompatible: bool = False
) -> Masks:
    """N:M (default 2:4) masks for every prunable weight: exactly ``n`` kept in every group of ``m`` inputs.

    A layer whose input size is not a multiple of ``m`` raises, or is left dense (all-True mask)
    with ``skip_incompatible=True``. Usage: ``MaskSet(semi_structured_masks(model)).apply(model)``.
    """
    out = {}
    for name, w in _weights(model).items():
        if w.reshape(w.shape[0], -1).shape[1] % m:
            if not skip_incompatible:
                raise ValueError(
                    f"layer {name!r}: input size {w.reshape(w.shape[0], -1).shape[1]} is not a "
                    f"multiple of {m}; {n}:{m} masks cannot cover it (skip_incompatible=True leaves it dense)"
                )
            out[name] = torch.ones_like(w, dtype=torch.bool)
        else:
            out[name] = nm_mask(w, n, m)
    return out


def mask_sparsity(masks: Masks) -> float:
    """The fraction of masked-out entries over all masks together. Usage: ``mask_sparsity(masks)`` → 0.9."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(1, total)


def weight_sparsity(model: nn.Module) -> float:
    """The fraction of exactly-zero entries among the prunable weights. Usage: ``weight_sparsity(model)``."""
    ws = prunable_weights(model).values()
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


class MaskSet:
    """Holds masks for a model's weights and keeps the pruned entries at zero through training.

    ``apply(model)`` zeroes the pruned entries in place; ``attach(optimizer, model)`` re-applies the
    masks after every ``optimizer.step()`` (returns the hook handle; ``.remove()`` detaches).
    Usage::

        ms = MaskSet(global_magnitude_masks(model, 0.9)).apply(model)
        handle = ms.attach(opt, model)  # pruned weights stay exactly 0 while fine-tuning
    """

    def __init__(self, masks: Masks):
        if not masks:
            raise ValueError("MaskSet needs at least one mask")
        self.masks = {k: v.to(torch.bool) for k, v in masks.items()}

    def _params(self, model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
        params = dict(model.named_parameters())
        out = []
        for name, mask in self.masks.items():
            if name not in params:
                raise KeyError(f"mask for {name!r} but the model has no such parameter")
            p = params[name]
            if p.shape != mask.shape:
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(p.shape)}")
            out.append((p, ~mask.to(p.device)))  # the pruned entries
        return out

    @torch.no_grad()
    def apply(self, model: nn.Module) -> MaskSet:
        """Zero every pruned weight of ``model`` in place; returns self."""
        for p, pruned in self._params(model):
            p.masked_fill_(pruned, 0.0)  # not p * mask: inf or NaN * 0 is NaN
        return self

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Re-apply the masks after every step of ``optimizer``; returns the removable hook handle."""
        pairs = self._params(model)

        @torch.no_grad()
        def hook(opt, args, kwargs) -> None:
            for p, pruned in pairs:
                p.masked_fill_(pruned, 0.0)

        return optimizer.register_step_post_hook(hook)

    @property
    def sparsity(self) -> float:
        """The fraction of masked-out entries. Usage: ``MaskSet(masks).sparsity`` → 0.9."""
        return mask_sparsity(self.masks)


def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Swap the 2:4-sparse Linear weights of ``model`` for ``SparseSemiStructuredTensor`` (GPU kernels).

    Needs CUDA (cuSPARSELt / CUTLASS, compute capability ≥ 8.0) and weights whose every group of 4
    inputs holds at most 2 non-zeros (apply :func:`semi_structured_masks` first); the model is moved to
    ``cuda`` in ``dtype`` (float16 or bfloat16). Layers whose shapes the kernels reject stay dense.
    Returns the model (changed in place). Usage: ``to_semi_structured(model.cuda().half())``.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("2:4 semi-structured kernels need CUDA; on CPU keep the masked dense model")
    from torch.sparse import to_sparse_semi_structured

    model.to(device="cuda", dtype=dtype)
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight.detach()
            if w.shape[1] % 4 or (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max() > 2:
                continue  # not 2:4 sparse
            try:
                mod.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            except (RuntimeError, ValueError):  # shapes the kernels do not support
                continue
    return model


@torch.no_grad()
def average_models(models: list[nn.Module]) -> nn.Module:
    """A soup: a copy of ``models[0]`` whose every parameter and float buffer is the mean over ``models``.

    Models that share a mask have zeros at the same entries, so their average keeps the sparsity.
    Usage: ``soup = average_models([m1, m2, m3])``.
    """
    if not models:
        raise ValueError("average_models needs at least one model")
    soup = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    new = {}
    for k, v in states[0].items():
        if not torch.is_floating_point(v):
            new[k] = v.clone()
            continue
        if any(s[k].shape != v.shape for s in states):
            raise ValueError(f"cannot average {k!r}: shapes differ between the models")
        new[k] = torch.stack([s[k].to(v.dtype) for s in states]).mean(0)
    soup.load_state_dict(new)
    return soup
