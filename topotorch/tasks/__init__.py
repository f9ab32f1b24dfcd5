"""Tasks: data, a model, how it sits in space, and the paper's training settings as defaults.

A task is registered by name (:mod:`topotorch.tasks.core`); the trainer and CLI only ever look tasks
up here, so a user adds one without touching either:

    >>> @register_task
    ... def my_task() -> Task:
    ...     return Task(name="my-task", make_data=..., make_model=..., loss="mse", defaults={"steps": 2000})
    >>> get_task("my-task")

Its ``defaults`` are a partial :class:`~topotorch.config.TrainConfig`, checked at registration.

Built in (BRIEF §1), one module per family, each importing only the registry (no cycle):

- :mod:`~topotorch.tasks.symbolic`: independence, feature-sharing, compositionality;
- :mod:`~topotorch.tasks.classification`: two-moons, digits, digits-wide, digits-conv, mnist1d;
- :mod:`~topotorch.tasks.algebra`: modular-addition, permutation-s4;
- :mod:`~topotorch.tasks.sequence`: transformer tasks (in-context-regression, modular-addition-transformer,
  shakespeare-char, ``text:PATH`` for any text file).
"""

# importing a family registers its tasks
from topotorch.tasks import algebra, classification, sequence, symbolic
from topotorch.tasks.classification import digits_data, mnist1d_data
from topotorch.tasks.core import (
    TASK_PREFIXES,
    TASKS,
    Task,
    TaskData,
    check_defaults,
    get_task,
    register_task,
    register_task_prefix,
)
from topotorch.tasks.symbolic import SYMBOLIC_DEFAULTS

__all__ = [
    "SYMBOLIC_DEFAULTS",
    "TASKS",
    "TASK_PREFIXES",
    "Task",
    "TaskData",
    "algebra",
    "check_defaults",
    "classification",
    "digits_data",
    "get_task",
    "mnist1d_data",
    "register_task",
    "register_task_prefix",
    "sequence",
    "symbolic",
]
