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

Procedures
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
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Masks = dict[str, torch.Tensor]


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights pruning acts on: ``{name: weight}`` of every Linear / Conv layer, in module order.

    Usage: ``prunable_weights(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))`` → ``{"0.weight": ..., "1.weight": ...}``.
    """
    out: dict[str, nn.Parameter] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, PRUNABLE_TYPES) and isinstance(getattr(mod, "weight", None), nn.Parameter):
            out[f"{mname}.weight" if mname else "weight"] = mod.weight
    if not out:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv weights to prune")
    return out


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1 \
            or not math.isfinite(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _n_keep(n: int, sparsity: float) -> int:
    return max(0, min(n, int(round((1.0 - sparsity) * n))))


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
            raise ValueError(f"previous mask for {name!r} has shape {tuple(previous.shape)}, the weight {tuple(w.shape)}")
        s = torch.where(previous.to(device=s.device, dtype=torch.bool), s, torch.full_like(s, -1.0))
    return s


@torch.no_grad()
def global_magnitude_masks(model: nn.Module | dict[str, torch.Tensor], sparsity: float,
                           previous: Masks | None = None) -> Masks:
    """Keep the ``round((1 - sparsity) * N)`` largest |w| over all prunable weights together (N = their total count).

    ``previous`` (a mask set) restricts the choice to entries still kept — iterative pruning.
    Usage: ``masks = global_magnitude_masks(model, 0.9)``.
    """
    sparsity = _check_sparsity(sparsity)
    ws = _weights(model)
    names = list(ws)
    flat = torch.cat([_scores(ws[n], previous.get(n) if previous else None, n).reshape(-1) for n in names])
    n_keep = _n_keep(flat.numel(), sparsity)
    if previous is not None and n_keep > int((flat >= 0).sum()):
        raise ValueError(f"cannot prune to {sparsity:g}: the previous masks already remove more "
                         f"({mask_sparsity(previous):.4g}); iterative sparsities must increase")
    keep = _topk_mask(flat, n_keep)
    parts = keep.split([ws[n].numel() for n in names])
    return {n: p.view_as(ws[n]) for n, p in zip(names, parts)}


@torch.no_grad()
def layerwise_magnitude_masks(model: nn.Module | dict[str, torch.Tensor], sparsity: float,
                              previous: Masks | None = None) -> Masks:
    """Keep the ``round((1 - sparsity) * n_l)`` largest |w| in every layer l separately.

    Usage: ``masks = layerwise_magnitude_masks(model, 0.8)``.
    """
    sparsity = _check_sparsity(sparsity)
    return {n: _topk_mask(_scores(w, previous.get(n) if previous else None, n), _n_keep(w.numel(), sparsity))
            for n, w in _weights(model).items()}


@torch.no_grad()
def random_masks(model: nn.Module | dict[str, torch.Tensor], sparsity: float,
                 generator: torch.Generator | None = None) -> Masks:
    """Keep ``round((1 - sparsity) * n_l)`` entries of every layer, chosen uniformly at random.

    The per-layer counts are those of :func:`layerwise_magnitude_masks` (uniform sparsity per layer), so
    random pruning differs from layer-wise magnitude pruning only in *which* weights go. ``generator``
    (a CPU ``torch.Generator``) makes it reproducible. Usage: ``random_masks(model, 0.9, torch.Generator().manual_seed(0))``.
    """
    sparsity = _check_sparsity(sparsity)
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


def semi_structured_masks(model: nn.Module | dict[str, torch.Tensor], n: int = 2, m: int = 4,
                          skip_incompatible: bool = False) -> Masks:
    """N:M (default 2:4) masks for every prunable weight: exactly ``n`` kept in every group of ``m`` inputs.

    A layer whose input size is not a multiple of ``m`` raises, or is left dense (all-True mask)
    with ``skip_incompatible=True``. Usage: ``MaskSet(semi_structured_masks(model)).apply(model)``.
    """
    out = {}
    for name, w in _weights(model).items():
        if w.reshape(w.shape[0], -1).shape[1] % m:
            if not skip_incompatible:
                raise ValueError(f"layer {name!r}: input size {w.reshape(w.shape[0], -1).shape[1]} is not a "
                                 f"multiple of {m}; {n}:{m} masks cannot cover it (skip_incompatible=True leaves it dense)")
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
        handle = ms.attach(opt, model)   # pruned weights stay exactly 0 while fine-tuning
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
    def apply(self, model: nn.Module) -> "MaskSet":
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


# -- procedures ----------------------------------------------------------------------------------

def _batches(n: int, batch_size: int | None, generator: torch.Generator) -> Callable[[], torch.Tensor | None]:
    if not batch_size or batch_size >= n:
        return lambda: None
    return lambda: torch.randint(n, (batch_size,), generator=generator)


def finetune(task, model: nn.Module, data, masks: MaskSet | Masks | None, steps: int, lr: float,
             batch_size: int | None = 128, seed: int = 0, weight_decay: float = 0.0) -> nn.Module:
    """Train ``model`` on ``data`` for ``steps`` AdamW steps with the masks held (pruned weights stay 0).

    The learning rate decays from ``lr`` to 0 on a cosine over the steps (as the soup paper's retraining
    does); mini-batches of ``batch_size`` (None: full batch) are drawn from a generator seeded by
    ``seed``, so different seeds give different batch orders. ``task`` is a :class:`topotorch.tasks.Task`
    (its loss is used). Returns the model (trained in place).
    Usage: ``finetune(task, model, data, MaskSet(masks), steps=1000, lr=1e-3, seed=1)``.
    """
    from topotorch.training import task_loss

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps and len(data.x_train) == 0:
        raise ValueError("fine-tuning needs training data, got an empty training set")
    ms = masks if isinstance(masks, MaskSet) or masks is None else MaskSet(masks)
    if ms is not None:
        ms.apply(model)
    if steps == 0:
        return model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    handle = ms.attach(opt, model) if ms is not None else None
    gen = torch.Generator().manual_seed(seed)
    draw = _batches(len(data.x_train), batch_size, gen)
    was_training = model.training
    model.train()
    try:
        for t in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * t / steps))
            idx = draw()
            xb, yb = (data.x_train, data.y_train) if idx is None else (data.x_train[idx], data.y_train[idx])
            loss = task_loss(task, model(xb), yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss became {loss.item()} at step {t}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
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


@dataclass
class Cycle:
    """One prune–retrain cycle of :func:`imp_rewind` / :func:`sparse_soup`: the model after it and its figures."""

    sparsity: float
    model: nn.Module
    masks: Masks
    accuracy: float  # test metric after the retrain (the soup's, for soups)
    accuracy_pruned: float  # test metric right after pruning, before any retraining or rewinding
    members: list[float]  # soups: each member's test metric before averaging
    steps: int  # sequential steps from init up to this model
    budget: int  # gradient steps spent from init up to this model (all soup members counted)


def _check_levels(sparsities: Iterable[float]) -> list[float]:
    levels = [_check_sparsity(s) for s in sparsities]
    if not levels or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"sparsities must be a non-empty increasing list, got {levels}")
    return levels


def imp_rewind(task, trained: nn.Module, rewind_state: dict[str, torch.Tensor], data, sparsities: Iterable[float],
               retrain_steps: int, lr: float, batch_size: int | None = 128, seed: int = 0,
               base_steps: int = 0, rewind_step: int = 0) -> Iterator[Cycle]:
    """Iterative magnitude pruning with weight rewinding (lottery tickets, Frankle et al. 2020).

    Cycle i: prune the current weights globally by magnitude to ``sparsities[i]`` (already pruned
    entries stay pruned), reset every parameter to ``rewind_state`` (the weights at an early step k)
    with the pruned entries zero, and retrain ``retrain_steps`` masked steps. Yields a :class:`Cycle`
    after each retrain. ``base_steps`` (the dense training length) and ``rewind_step`` (k) only enter
    the step/budget counts. Usage: ``for c in imp_rewind(task, model, theta_k, data, [0.5, 0.8], 1000, 1e-3): ...``.
    """
    from topotorch.training import evaluate

    current = copy.deepcopy(trained)
    masks: Masks | None = None
    steps = budget = base_steps
    for i, s in enumerate(_check_levels(sparsities)):
        masks = global_magnitude_masks(current, s, previous=masks)
        pruned = copy.deepcopy(current)
        MaskSet(masks).apply(pruned)
        acc_pruned = evaluate(task, pruned, data.x_test, data.y_test)
        current.load_state_dict(rewind_state)
        finetune(task, current, data, masks, retrain_steps, lr, batch_size, seed=seed * 1000 + i)
        steps, budget = steps + retrain_steps, budget + retrain_steps
        yield Cycle(s, copy.deepcopy(current), masks, evaluate(task, current, data.x_test, data.y_test),
                    acc_pruned, [], steps, budget)


def sparse_soup(task, trained: nn.Module, data, sparsities: Iterable[float], retrain_steps: int, lr: float,
                n_models: int = 3, batch_size: int | None = 128, seed: int = 0, base_steps: int = 0,
                rewind_state: dict[str, torch.Tensor] | None = None) -> Iterator[Cycle]:
    """Sparse Model Soups (Zimmer et al., ICLR 2024): prune, retrain ``n_models`` copies, average, repeat.

    Cycle i: prune the current model (the previous soup) globally by magnitude to ``sparsities[i]``;
    retrain ``n_models`` copies of it that share this mask, each with its own batch order (seed), for
    ``retrain_steps`` steps; average them (same mask ⇒ the soup has the same zeros) and start the next
    cycle from the soup. With ``rewind_state`` the copies restart from the rewound weights instead of
    the pruned ones (a lottery-ticket soup). ``n_models=1`` is plain IMP with fine-tuning.
    Usage: ``for c in sparse_soup(task, model, data, [0.5, 0.8, 0.9], 1000, 1e-3, n_models=3): ...``.
    """
    from topotorch.training import evaluate

    if n_models < 1:
        raise ValueError(f"n_models must be >= 1, got {n_models}")
    current = copy.deepcopy(trained)
    masks: Masks | None = None
    steps = budget = base_steps
    for i, s in enumerate(_check_levels(sparsities)):
        masks = global_magnitude_masks(current, s, previous=masks)
        MaskSet(masks).apply(current)
        acc_pruned = evaluate(task, current, data.x_test, data.y_test)
        start = current
        if rewind_state is not None:
            start = copy.deepcopy(current)
            start.load_state_dict(rewind_state)
        members = []
        for j in range(n_models):
            mj = copy.deepcopy(start)
            finetune(task, mj, data, masks, retrain_steps, lr, batch_size, seed=(seed * 1000 + i) * 1000 + j)
            members.append(mj)
        current = average_models(members) if n_models > 1 else members[0]
        MaskSet(masks).apply(current)  # exact zeros (the mean of zeros is zero; this guards rounding)
        steps, budget = steps + retrain_steps, budget + n_models * retrain_steps
        yield Cycle(s, copy.deepcopy(current), masks, evaluate(task, current, data.x_test, data.y_test),
                    acc_pruned, [evaluate(task, m, data.x_test, data.y_test) for m in members], steps, budget)
