"""Algebra on two tokens (folded embeddings): modular addition and composition in S4.

Each task is a table ``(a, b) -> c`` of all pairs, 80% of them for training, learned by a
:class:`~topotorch.models.TokenMLP`.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from topotorch.models import TokenMLP
from topotorch.tasks.core import Task, TaskData, register_task


def _pairs_task(name: str, desc: str, table: np.ndarray, defaults: dict, goal: float) -> Task:
    n = table.shape[0]

    def make_data(seed: int, dtype: torch.dtype) -> TaskData:
        a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        x = torch.as_tensor(np.stack([a.ravel(), b.ravel()], 1))
        y = torch.as_tensor(table[a.ravel(), b.ravel()])
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_train = round(0.8 * len(x))
        tr, te = order[:n_train], order[n_train:]
        return TaskData(x[tr], y[tr], x[te], y[te])

    return Task(
        name=name,
        description=desc,
        make_data=make_data,
        make_model=lambda: TokenMLP(n, 32, 2, [50, 50, n]),
        loss="ce",
        output_labels=[str(i) for i in range(n)],
        defaults=defaults,
        goal=("accuracy", ">=", goal),
    )


@register_task
def modular_addition() -> Task:
    p = 59
    table = (np.arange(p)[:, None] + np.arange(p)[None, :]) % p
    return _pairs_task(
        "modular-addition",
        f"(a + b) mod {p}, 80% of pairs for training, float64",
        table,
        dict(
            steps=20000,
            lr=1e-3,
            l0=0.5,
            wf=2.0,
            top_k=30,
            swap_every=200,
            agg="mean",
            lam="0:0.1,5000:1.0,15000:0.1",
            threshold=0.05,
            dtype="float64",
        ),
        0.99,
    )


@register_task
def permutation_s4() -> Task:
    perms = list(itertools.permutations(range(4)))
    index = {p: i for i, p in enumerate(perms)}
    # composition (a∘b)[m] = a[b[m]]
    table = np.array([[index[tuple(a[b[m]] for m in range(4))] for b in perms] for a in perms])
    return _pairs_task(
        "permutation-s4",
        "composition of permutations of 4 elements (S4, 24x24), 80% train",
        table,
        dict(
            steps=20000,
            lr=2e-3,
            l0=0.5,
            wf=1.0,
            top_k=30,
            swap_every=200,
            agg="mean",
            lam="0:1.0",
            threshold=0.05,
            dtype="float64",
        ),
        0.99,
    )
