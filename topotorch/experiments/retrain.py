"""Retraining procedures on top of the pruning masks: masked fine-tuning, lottery tickets, sparse model soups.

They train (a task's loss, its test metric), so they sit above :mod:`topotorch.training`, while the
masks they hold — :mod:`topotorch.compression.pruning` — stay below it: compression never imports
training.

* :func:`finetune` — masked AdamW with a cosine-decayed learning rate, mini-batches from a seeded
  generator (different seeds: different batch orders);
* :func:`imp_rewind` — iterative magnitude pruning with weight rewinding (Frankle et al. 2020,
  "Linear mode connectivity and the lottery ticket hypothesis");
* :func:`sparse_soup` — Zimmer, Spiegel & Pokutta, "Sparse Model Soups", ICLR 2024: each
  prune–retrain cycle trains m copies that share the mask with different batch orders, averages
  them, and starts the next cycle from the average.

    >>> ms = MaskSet(global_magnitude_masks(model, 0.9)).apply(model)
    >>> finetune(task, model, data, ms, steps=1000, lr=1e-3)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from topotorch.compression.pruning import Masks, MaskSet, average_models, check_sparsity, global_magnitude_masks
from topotorch.training import evaluate, task_loss


def _batches(n: int, batch_size: int | None, generator: torch.Generator) -> Callable[[], torch.Tensor | None]:
    if not batch_size or batch_size >= n:
        return lambda: None
    return lambda: torch.randint(n, (batch_size,), generator=generator)


def finetune(
    task,
    model: nn.Module,
    data,
    masks: MaskSet | Masks | None,
    steps: int,
    lr: float,
    batch_size: int | None = 128,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Train ``model`` on ``data`` for ``steps`` AdamW steps with the masks held (pruned weights stay 0).

    The learning rate decays from ``lr`` to 0 on a cosine over the steps (as the soup paper's retraining
    does); mini-batches of ``batch_size`` (None: full batch) are drawn from a generator seeded by
    ``seed``, so different seeds give different batch orders. ``task`` is a :class:`topotorch.tasks.Task`
    (its loss is used). Returns the model (trained in place).
    Usage: ``finetune(task, model, data, MaskSet(masks), steps=1000, lr=1e-3, seed=1)``.
    """
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
    levels = [check_sparsity(s) for s in sparsities]
    if not levels or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"sparsities must be a non-empty increasing list, got {levels}")
    return levels


def imp_rewind(
    task,
    trained: nn.Module,
    rewind_state: dict[str, torch.Tensor],
    data,
    sparsities: Iterable[float],
    retrain_steps: int,
    lr: float,
    batch_size: int | None = 128,
    seed: int = 0,
    base_steps: int = 0,
    rewind_step: int = 0,
) -> Iterator[Cycle]:
    """Iterative magnitude pruning with weight rewinding (lottery tickets, Frankle et al. 2020).

    Cycle i: prune the current weights globally by magnitude to ``sparsities[i]`` (already pruned
    entries stay pruned), reset every parameter to ``rewind_state`` (the weights at an early step k)
    with the pruned entries zero, and retrain ``retrain_steps`` masked steps. Yields a :class:`Cycle`
    after each retrain. ``base_steps`` (the dense training length) and ``rewind_step`` (k) only enter
    the step/budget counts. Usage: ``for c in imp_rewind(task, model, theta_k, data, [0.5, 0.8], 1000, 1e-3): ...``.
    """
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
        yield Cycle(
            s,
            copy.deepcopy(current),
            masks,
            evaluate(task, current, data.x_test, data.y_test),
            acc_pruned,
            [],
            steps,
            budget,
        )


def sparse_soup(
    task,
    trained: nn.Module,
    data,
    sparsities: Iterable[float],
    retrain_steps: int,
    lr: float,
    n_models: int = 3,
    batch_size: int | None = 128,
    seed: int = 0,
    base_steps: int = 0,
    rewind_state: dict[str, torch.Tensor] | None = None,
) -> Iterator[Cycle]:
    """Sparse Model Soups (Zimmer et al., ICLR 2024): prune, retrain ``n_models`` copies, average, repeat.

    Cycle i: prune the current model (the previous soup) globally by magnitude to ``sparsities[i]``;
    retrain ``n_models`` copies of it that share this mask, each with its own batch order (seed), for
    ``retrain_steps`` steps; average them (same mask ⇒ the soup has the same zeros) and start the next
    cycle from the soup. With ``rewind_state`` the copies restart from the rewound weights instead of
    the pruned ones (a lottery-ticket soup). ``n_models=1`` is plain IMP with fine-tuning.
    Usage: ``for c in sparse_soup(task, model, data, [0.5, 0.8, 0.9], 1000, 1e-3, n_models=3): ...``.
    """
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
        yield Cycle(
            s,
            copy.deepcopy(current),
            masks,
            evaluate(task, current, data.x_test, data.y_test),
            acc_pruned,
            [evaluate(task, m, data.x_test, data.y_test) for m in members],
            steps,
            budget,
        )
