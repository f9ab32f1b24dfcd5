"""The task registry: what a task is (:class:`Task`, :class:`TaskData`), registering and looking one up.

The trainer and the CLI only ever look tasks up here, so a user adds one without touching either:

    >>> @register_task
    ... def my_task() -> Task:
    ...     return Task(name="my-task", make_data=..., make_model=..., loss="mse", defaults={"steps": 2000})

A task's ``defaults`` are a partial :class:`~topotorch.config.TrainConfig`, checked when the task is
registered (:func:`check_defaults`): a bad setting fails there, naming the task and the field. A family
of tasks named by a prefix (``text:PATH``) registers a builder with :func:`register_task_prefix`. This
module imports no task: the built-in ones (:mod:`topotorch.tasks.symbolic`, ...) import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn


@dataclass
class TaskData:
    """Train and test tensors (inputs may be float features or integer token ids)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: torch.device | str) -> TaskData:
        return TaskData(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


@dataclass
class Task:
    """Everything the trainer needs to know about a task.

    ``goal`` is the figure a good run reaches (metric, comparison, value), used by the
    summary to say whether the run (and its thresholded net) met it.
    """

    name: str
    description: str
    make_data: Callable[[int, torch.dtype], TaskData]
    make_model: Callable[[], nn.Module]
    loss: Literal["mse", "ce", "mse_onehot"]
    layouts: dict[str, str] = field(default_factory=dict)
    input_labels: list[str] | None = None
    output_labels: list[str] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    goal: tuple[str, str, float] | None = None
    # models that are not a chain of Linear layers say how they sit in space (default: from_chain)
    make_graph: Callable[[nn.Module], Any] | None = None
    # a test metric other than MSE/accuracy (e.g. bits per character): its name and how to compute it
    metric_name: str | None = None
    evaluate: Callable[[nn.Module, torch.Tensor, torch.Tensor], float] | None = None

    @property
    def metric(self) -> str:
        if self.metric_name:
            return self.metric_name
        return "mse" if self.loss == "mse" else "accuracy"


TASKS: dict[str, Callable[[], Task]] = {}


def check_defaults(task: Task) -> Task:
    """Refuse a task whose defaults are not a valid partial :class:`~topotorch.config.TrainConfig`: the error
    names the task and the field (``task 'x': bad default steps: steps must be a positive integer, got 0``).
    Returns ``task``. Usage: ``check_defaults(Task(...))``."""
    from topotorch.config import TrainConfig, validate_partial

    validate_partial(TrainConfig, task.defaults, where=f"task {task.name!r}")
    return task


def register_task(factory: Callable[[], Task]) -> Callable[[], Task]:
    """Register a task factory under the name of the task it builds (decorator); its defaults are checked
    now (:func:`check_defaults`), so a bad setting fails at registration, naming the task and the field."""
    task = check_defaults(factory())
    TASKS[task.name] = factory
    return factory


# name prefix -> (builder from the rest of the name, how the name is written: "text:PATH")
TASK_PREFIXES: dict[str, tuple[Callable[[str], Task], str]] = {}


def register_task_prefix(prefix: str, usage: str) -> Callable[[Callable[[str], Task]], Callable[[str], Task]]:
    """Register a builder for every task named ``prefix + REST`` (decorator); ``usage`` shows how such a
    name is written in the list of known tasks. Usage: ``@register_task_prefix("text:", "text:PATH")``."""

    def decorate(build: Callable[[str], Task]) -> Callable[[str], Task]:
        TASK_PREFIXES[prefix] = (build, usage)
        return build

    return decorate


def get_task(name: str) -> Task:
    """The task called ``name``; a clear error lists the known ones. Usage: ``get_task("independence")``."""
    for prefix, (build, _) in TASK_PREFIXES.items():
        if name.startswith(prefix):  # e.g. character-level language modelling on any text file
            return build(name[len(prefix) :])
    if name not in TASKS:
        known = [*sorted(TASKS), *(usage for _, usage in TASK_PREFIXES.values())]
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known)}")
    return TASKS[name]()
