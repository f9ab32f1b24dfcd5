"""Symbolic regression tasks (BIMT paper, BRIEF §1): 100 train / 100 test points uniform in [-1, 1]^n.

independence, feature-sharing and compositionality: MLPs with SiLU whose trained wiring shows the
formula's structure (two modules, shared features, a tree).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from topotorch.models import MLP
from topotorch.tasks.core import Task, TaskData, register_task

SYMBOLIC_DEFAULTS = dict(
    steps=20000,
    lr=2e-3,
    l0=0.1,
    wf=1.0,
    top_k=5,
    swap_every=200,
    agg="sum",
    lam="0:1e-3,5000:1e-2,15000:1e-3",
    bias_penalty_from=15000,
    threshold=0.05,
    dtype="float32",
)


def _symbolic(
    name: str,
    desc: str,
    n_in: int,
    fn: Callable[[torch.Tensor], torch.Tensor],
    widths: list[int],
    n_out: int,
    goal: float,
    **overrides: Any,
) -> Task:
    def make_data(seed: int, dtype: torch.dtype) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(200, n_in, generator=g, dtype=torch.float64) * 2 - 1
        y = fn(x)
        x, y = x.to(dtype), y.to(dtype)
        return TaskData(x[:100], y[:100], x[100:], y[100:])

    return Task(
        name=name,
        description=desc,
        make_data=make_data,
        make_model=lambda: MLP([n_in, *widths, n_out], activation="silu"),
        loss="mse",
        input_labels=[f"x{i + 1}" for i in range(n_in)],
        output_labels=[f"y{i + 1}" for i in range(n_out)],
        defaults={**SYMBOLIC_DEFAULTS, **overrides},
        goal=("mse", "<=", goal),
    )


@register_task
def independence() -> Task:
    return _symbolic(
        "independence",
        "y1=(x1+x3)^3, y2=x2^2+sin(pi*x4): two independent modules",
        4,
        lambda x: torch.stack([(x[:, 0] + x[:, 2]) ** 3, x[:, 1] ** 2 + torch.sin(math.pi * x[:, 3])], 1),
        [20, 20],
        2,
        1e-2,
    )


@register_task
def feature_sharing() -> Task:
    return _symbolic(
        "feature-sharing",
        "y = x1^2, x1^2+x2^2, x1^2+x2^2+x3^2: shared x1^2 features",
        3,
        lambda x: torch.cumsum(x**2, dim=1),
        [20, 20],
        3,
        1e-3,
    )


@register_task
def compositionality() -> Task:
    return _symbolic(
        "compositionality",
        "y = sqrt((x1-x2)^2+(x3-x4)^2): a tree",
        4,
        lambda x: torch.sqrt((x[:, 0] - x[:, 1]) ** 2 + (x[:, 2] - x[:, 3]) ** 2).unsqueeze(1),
        [20, 20, 20, 20],
        1,
        5e-3,
        lam="0:1e-3,5000:3e-3",
    )
