"""The task side of a run: build the seeded model and its graph, the task's loss and metric, the summary figures.

Everything here is a pure function of a :class:`~topotorch.tasks.Task` and a
:class:`~topotorch.config.TrainConfig`; nothing knows about processes, run folders or callbacks,
so the loop, the strategies and the experiments above the trainer share one definition of "the
loss" and "the metric".

    >>> task, model, graph = build(TrainConfig.for_task("digits"))
    >>> loss = task_loss(task, model(x), y)  # MSE, MSE on one-hot labels, or cross-entropy
    >>> evaluate(task, model, data.x_test, data.y_test)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from topotorch.analysis import structure
from topotorch.config import DTYPES, TrainConfig
from topotorch.graph import SpatialGraph
from topotorch.tasks import Task, TaskData, get_task


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


@dataclass
class TrainResult:
    """What :func:`~topotorch.training.train` (and :func:`~topotorch.training.load_run`) hand back."""

    model: torch.nn.Module
    graph: SpatialGraph
    task: Task
    data: TaskData
    config: TrainConfig
    summary: dict
    snapshots: list
    run_dir: Path | None


def graph_for(task: Task, config: TrainConfig, model: torch.nn.Module) -> SpatialGraph:
    """The spatial graph of ``task``'s own model: the task's builder, else a chain of its layers.
    Usage: ``graph = graph_for(task, cfg, model)``."""
    if task.make_graph is not None:  # e.g. transformers: the task knows how its model sits in space
        return task.make_graph(model)
    return SpatialGraph.from_chain(
        model,
        layouts=task.layouts,
        relocate_inputs=config.relocate_inputs,
        relocate_outputs=config.relocate_outputs,
        input_labels=task.input_labels,
        output_labels=task.output_labels,
    )


def build(config: TrainConfig) -> tuple[Task, torch.nn.Module, SpatialGraph]:
    """The task, a freshly initialised model (seeded) and its spatial graph. Usage: ``task, model, g = build(cfg)``."""
    task = get_task(config.task)
    torch.manual_seed(config.seed)
    if config.model is None:
        model = task.make_model().to(DTYPES[config.dtype])
        return task, model, graph_for(task, config, model)
    return task, *_user_model_and_graph(task, config)


def _user_model_and_graph(task: Task, config: TrainConfig) -> tuple[torch.nn.Module, SpatialGraph]:
    """A model the user brought (``config.model``), and its checked data-flow graph on the task's inputs."""
    from topotorch.graph.flow import flow_graph
    from topotorch.user_models import build_user_model

    assert config.model is not None
    dtype = DTYPES[config.dtype]
    data = task.make_data(config.seed, dtype)
    x = data.x_train[:2]
    tokens = not x.is_floating_point() and x.ndim == 2
    vocab = len(task.output_labels) if tokens and task.output_labels else None
    torch.manual_seed(config.seed)
    model = build_user_model(config.model, config.model_config, vocab=vocab, block=x.shape[1] if tokens else None)
    model = model.to(dtype)
    try:
        graph = flow_graph(
            model, x, layouts=task.layouts or None, input_labels=task.input_labels, output_labels=task.output_labels
        )
    except ValueError as e:
        raise ValueError(f"--model {config.model}: {e}") from None
    return model, graph


def set_seeds(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators. Usage: ``set_seeds(cfg.seed)``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def task_loss(task: Task, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The task's training loss (MSE, MSE on one-hot labels, or cross-entropy). Usage: ``task_loss(t, model(x), y)``."""
    if task.loss == "mse":
        return F.mse_loss(out, y, reduction=reduction)
    if task.loss == "mse_onehot":
        return F.mse_loss(out, F.one_hot(y, out.shape[-1]).to(out.dtype), reduction=reduction)
    return F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction=reduction)  # sequences: every position


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The task's test metric: MSE for regression, accuracy for classification (in eval mode: BatchNorm statistics).
    Usage: ``evaluate(task, model, data.x_test, data.y_test)``."""
    was_training = model.training
    model.eval()
    try:
        if task.evaluate is not None:
            return float(task.evaluate(model, x, y))
        out = model(x)
        if task.metric == "mse":
            return float(F.mse_loss(out, y))
        return float((out.argmax(-1) == y).to(torch.float64).mean())
    finally:
        model.train(was_training)


def goal_met(task: Task, value: float) -> bool | None:
    """Whether ``value`` of the task's metric meets its goal (None: the task has none). Usage: ``goal_met(t, 0.97)``."""
    if task.goal is None:
        return None
    _, op, target = task.goal
    return value <= target if op == "<=" else value >= target


def structure_summary(task: Task, model, graph: SpatialGraph, data: TaskData, threshold: float) -> dict:
    """The figures a run is judged by: test metric, cost, active weights/neurons, modules, thresholded metric.
    Usage: ``structure_summary(task, model, graph, data, 1e-2)``."""
    metric = evaluate(task, model, data.x_test, data.y_test)
    with structure.thresholded(graph, threshold):
        metric_thr = evaluate(task, model, data.x_test, data.y_test)
    mods = structure.modules(graph, threshold)
    # modules below the output layer: parallel circuits that only meet at the logits
    mods_hidden = structure.modules(graph, threshold, exclude=tuple(s.name for s in graph.spaces if s.role == "output"))
    return {
        f"test_{task.metric}": metric,
        f"thresholded_test_{task.metric}": metric_thr,
        "goal": list(task.goal) if task.goal else None,
        "goal_met": goal_met(task, metric),
        "thresholded_goal_met": goal_met(task, metric_thr),
        "threshold": threshold,
        "active_weights": structure.active_weights(graph, threshold),
        "active_neurons": structure.active_neurons(graph, threshold),
        "n_modules": len(mods),
        "modules": mods,
        "n_modules_below_output": len(mods_hidden),
        "modules_below_output": [{"sizes": m["sizes"], "inputs": m["inputs"]} for m in mods_hidden],
    }
