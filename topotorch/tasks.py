"""Tasks: data, a model, how it sits in space, and the paper's training settings as defaults.

A task is registered by name; the trainer and CLI only ever look tasks up here, so a user
adds one without touching either:

    >>> @register_task
    ... def my_task() -> Task:
    ...     return Task(name="my-task", make_data=..., make_model=..., loss="mse", defaults={...})

Built in (BRIEF §1): independence, feature-sharing, compositionality, two-moons,
modular-addition, permutation-s4, digits; transformer tasks (in-context-regression,
modular-addition-transformer, shakespeare-char, ``text:PATH`` for any text file) live in
:mod:`topotorch.tasks_sequence`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from topotorch.models import MLP, TokenMLP


@dataclass
class TaskData:
    """Train and test tensors (inputs may be float features or integer token ids)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: torch.device | str) -> "TaskData":
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


def get_task(name: str) -> Task:
    """The task called ``name``; a clear error lists the known ones. Usage: ``get_task("independence")``."""
    if name.startswith("text:"):  # character-level language modelling on any text file
        return tasks_sequence.text_task(name[len("text:"):])
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}, text:PATH")
    return TASKS[name]()


# -- symbolic regression (100 train / 100 test points uniform in [-1, 1]^n) ---------------------

SYMBOLIC_DEFAULTS = dict(
    steps=20000, lr=2e-3, l0=0.1, wf=1.0, top_k=5, swap_every=200, agg="sum",
    lam="0:1e-3,5000:1e-2,15000:1e-3", bias_penalty_from=15000, threshold=0.05, dtype="float32",
)


def _symbolic(name: str, desc: str, n_in: int, fn: Callable[[torch.Tensor], torch.Tensor], widths: list[int],
              n_out: int, goal: float, **overrides: Any) -> Task:
    def make_data(seed: int, dtype: torch.dtype) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(200, n_in, generator=g, dtype=torch.float64) * 2 - 1
        y = fn(x)
        x, y = x.to(dtype), y.to(dtype)
        return TaskData(x[:100], y[:100], x[100:], y[100:])

    return Task(
        name=name, description=desc, make_data=make_data,
        make_model=lambda: MLP([n_in, *widths, n_out], activation="silu"), loss="mse",
        input_labels=[f"x{i + 1}" for i in range(n_in)], output_labels=[f"y{i + 1}" for i in range(n_out)],
        defaults={**SYMBOLIC_DEFAULTS, **overrides}, goal=("mse", "<=", goal),
    )


@register_task
def independence() -> Task:
    return _symbolic(
        "independence", "y1=(x1+x3)^3, y2=x2^2+sin(pi*x4): two independent modules", 4,
        lambda x: torch.stack([(x[:, 0] + x[:, 2]) ** 3, x[:, 1] ** 2 + torch.sin(math.pi * x[:, 3])], 1),
        [20, 20], 2, 1e-2,
    )


@register_task
def feature_sharing() -> Task:
    return _symbolic(
        "feature-sharing", "y = x1^2, x1^2+x2^2, x1^2+x2^2+x3^2: shared x1^2 features", 3,
        lambda x: torch.cumsum(x**2, dim=1), [20, 20], 3, 1e-3,
    )


@register_task
def compositionality() -> Task:
    return _symbolic(
        "compositionality", "y = sqrt((x1-x2)^2+(x3-x4)^2): a tree", 4,
        lambda x: torch.sqrt((x[:, 0] - x[:, 1]) ** 2 + (x[:, 2] - x[:, 3]) ** 2).unsqueeze(1),
        [20, 20, 20, 20], 1, 5e-3, lam="0:1e-3,5000:3e-3",
    )


# -- two moons --------------------------------------------------------------------------------

@register_task
def two_moons() -> Task:
    def make_data(seed: int, dtype: torch.dtype) -> TaskData:
        from sklearn.datasets import make_moons

        xtr, ytr = make_moons(200, noise=0.1, random_state=seed)
        xte, yte = make_moons(200, noise=0.1, random_state=seed + 10_000)
        f = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
        return TaskData(f(xtr), torch.as_tensor(ytr), f(xte), torch.as_tensor(yte))

    return Task(
        name="two-moons", description="two interleaved half-circles (noise 0.1), 200 train / 200 test",
        make_data=make_data, make_model=lambda: MLP([2, 20, 20, 2]), loss="ce",
        input_labels=["x1", "x2"], output_labels=["class 0", "class 1"],
        defaults=dict(steps=10000, lr=2e-3, l0=0.2, wf=1.0, top_k=10, swap_every=200, agg="sum",
                      lam="0:1e-3,5000:1e-2", threshold=0.05, dtype="float32"),
        goal=("accuracy", ">=", 0.97),
    )


# -- algebra on two tokens (folded embeddings) ------------------------------------------------

def _pairs_task(name: str, desc: str, table: np.ndarray, defaults: dict, goal: float) -> Task:
    n = table.shape[0]

    def make_data(seed: int, dtype: torch.dtype) -> TaskData:
        a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        x = torch.as_tensor(np.stack([a.ravel(), b.ravel()], 1))
        y = torch.as_tensor(table[a.ravel(), b.ravel()])
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_train = int(round(0.8 * len(x)))
        tr, te = order[:n_train], order[n_train:]
        return TaskData(x[tr], y[tr], x[te], y[te])

    return Task(
        name=name, description=desc, make_data=make_data,
        make_model=lambda: TokenMLP(n, 32, 2, [50, 50, n]), loss="ce",
        output_labels=[str(i) for i in range(n)], defaults=defaults, goal=("accuracy", ">=", goal),
    )


@register_task
def modular_addition() -> Task:
    p = 59
    table = (np.arange(p)[:, None] + np.arange(p)[None, :]) % p
    return _pairs_task(
        "modular-addition", f"(a + b) mod {p}, 80% of pairs for training, float64", table,
        dict(steps=20000, lr=1e-3, l0=0.5, wf=2.0, top_k=30, swap_every=200, agg="mean",
             lam="0:0.1,5000:1.0,15000:0.1", threshold=0.05, dtype="float64"),
        0.99,
    )


@register_task
def permutation_s4() -> Task:
    perms = list(itertools.permutations(range(4)))
    index = {p: i for i, p in enumerate(perms)}
    # composition (a∘b)[m] = a[b[m]]
    table = np.array([[index[tuple(a[b[m]] for m in range(4))] for b in perms] for a in perms])
    return _pairs_task(
        "permutation-s4", "composition of permutations of 4 elements (S4, 24x24), 80% train", table,
        dict(steps=20000, lr=2e-3, l0=0.5, wf=1.0, top_k=30, swap_every=200, agg="mean",
             lam="0:1.0", threshold=0.05, dtype="float64"),
        0.99,
    )


# -- real images: scikit-learn's 8x8 handwritten digits ----------------------------------------

def digits_data(seed: int, dtype: torch.dtype) -> TaskData:
    """scikit-learn's 1797 real 8x8 digits scaled to [0, 1], a seeded 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data / 16.0, dtype=dtype)
    y = torch.as_tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    tr, te = order[:n_train], order[n_train:]
    return TaskData(x[tr], y[tr], x[te], y[te])


@register_task
def digits() -> Task:
    return Task(
        name="digits", description="scikit-learn's real 8x8 handwritten digits, inputs on an 8x8 grid (3-D drawing)",
        make_data=digits_data, make_model=lambda: MLP([64, 100, 100, 10]), loss="ce",
        layouts={"input": "grid:8x8", "hidden1": "grid:10x10", "hidden2": "grid:10x10", "output": "circle"},
        output_labels=[str(i) for i in range(10)],
        defaults=dict(steps=10000, lr=1e-3, l0=0.5, wf=2.0, top_k=30, swap_every=500, agg="mean",
                      lam="0:0.01,3000:0.1,6000:1.0", threshold=0.05, dtype="float32", relocate_inputs=False),
        goal=("accuracy", ">=", 0.93),
    )


@register_task
def digits_wide() -> Task:
    return Task(
        name="digits-wide", description="the 8x8 digits with a wide MLP 64-512-512-10 (the compression benchmark's model)",
        make_data=digits_data, make_model=lambda: MLP([64, 512, 512, 10]), loss="ce",
        layouts={"input": "grid:8x8", "hidden1": "grid:16x32", "hidden2": "grid:16x32", "output": "circle"},
        output_labels=[str(i) for i in range(10)],
        defaults=dict(steps=6000, lr=1e-3, l0=0.5, wf=2.0, top_k=60, swap_every=500, agg="mean", batch_size=256,
                      lam="0:0.01,2000:0.1,4000:1.0", threshold=0.05, dtype="float32", relocate_inputs=False),
        goal=("accuracy", ">=", 0.93),
    )


def mnist1d_data(seed: int, dtype: torch.dtype) -> TaskData:
    """MNIST-1D (Greydanus 2020): 4000/1000 generated 40-sample signals, standardised on the training set.

    Generated offline with ``mnist1d.data.make_dataset`` and the package's default arguments; the
    ``seed`` only shuffles the training order (the data set itself is the standard one)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ImportError("the mnist1d task needs the `mnist1d` package: pip install 'topotorch[datasets]'") from None
    ds = make_dataset(get_dataset_args())
    xtr = torch.as_tensor(ds["x"], dtype=dtype)
    xte = torch.as_tensor(ds["x_test"], dtype=dtype)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    ytr, yte = torch.as_tensor(ds["y"]).long(), torch.as_tensor(ds["y_test"]).long()
    order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))
    return TaskData(((xtr - mu) / sd)[order], ytr[order], (xte - mu) / sd, yte)


@register_task
def mnist1d() -> Task:
    return Task(
        name="mnist1d", description="MNIST-1D: 40-sample 1-D digit signals (needs the mnist1d package), MLP 40-100-100-10",
        make_data=mnist1d_data, make_model=lambda: MLP([40, 100, 100, 10]), loss="ce",
        layouts={"hidden1": "grid:10x10", "hidden2": "grid:10x10", "output": "circle"},
        output_labels=[str(i) for i in range(10)],
        defaults=dict(steps=6000, lr=1e-3, l0=0.5, wf=2.0, top_k=30, swap_every=500, agg="mean", batch_size=256,
                      lam="0:0.001,2000:0.01,4000:0.1", threshold=0.05, dtype="float32", relocate_inputs=False),
        goal=("accuracy", ">=", 0.80),
    )


@register_task
def digits_conv() -> Task:
    from topotorch.graph.conv import conv_graph
    from topotorch.models import SmallResNet

    labels = [str(i) for i in range(10)]
    return Task(
        name="digits-conv", description="the 8x8 digits with a small residual conv net (16 channels, 2 blocks)",
        make_data=digits_data, make_model=lambda: SmallResNet(channels=16, hidden=16, n_blocks=2, image_size=8),
        loss="ce", make_graph=lambda m: conv_graph(m, output_labels=labels), output_labels=labels,
        defaults=dict(steps=3000, lr=2e-3, l0=0.5, wf=2.0, top_k=8, swap_every=200, agg="mean", batch_size=128,
                      lam="0:1e-3,1000:1e-2", threshold=0.05, dtype="float32"),
        goal=("accuracy", ">=", 0.95),
    )


from topotorch import tasks_sequence  # noqa: E402,F401  (registers the transformer tasks)
