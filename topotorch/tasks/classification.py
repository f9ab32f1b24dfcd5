"""Classification tasks: two moons, scikit-learn's real 8x8 digits (MLP, wide MLP, residual conv net), MNIST-1D."""

from __future__ import annotations

import torch

from topotorch.models import MLP
from topotorch.tasks.core import Task, TaskData, register_task

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
        name="two-moons",
        description="two interleaved half-circles (noise 0.1), 200 train / 200 test",
        make_data=make_data,
        make_model=lambda: MLP([2, 20, 20, 2]),
        loss="ce",
        input_labels=["x1", "x2"],
        output_labels=["class 0", "class 1"],
        defaults=dict(
            steps=10000,
            lr=2e-3,
            l0=0.2,
            wf=1.0,
            top_k=10,
            swap_every=200,
            agg="sum",
            lam="0:1e-3,5000:1e-2",
            threshold=0.05,
            dtype="float32",
        ),
        goal=("accuracy", ">=", 0.97),
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


# The settings the image-classifier MLPs share (digits, digits-wide, mnist1d): the mean-aggregated cost,
# a fixed input grid, and swaps every 500 steps; each task adds its own length, λ schedule and top_k.
IMAGE_MLP_DEFAULTS: dict = dict(
    lr=1e-3, l0=0.5, wf=2.0, swap_every=500, agg="mean", threshold=0.05, dtype="float32", relocate_inputs=False
)


@register_task
def digits() -> Task:
    return Task(
        name="digits",
        description="scikit-learn's real 8x8 handwritten digits, inputs on an 8x8 grid (3-D drawing)",
        make_data=digits_data,
        make_model=lambda: MLP([64, 100, 100, 10]),
        loss="ce",
        layouts={"input": "grid:8x8", "hidden1": "grid:10x10", "hidden2": "grid:10x10", "output": "circle"},
        output_labels=[str(i) for i in range(10)],
        defaults={**IMAGE_MLP_DEFAULTS, "steps": 10000, "top_k": 30, "lam": "0:0.01,3000:0.1,6000:1.0"},
        goal=("accuracy", ">=", 0.93),
    )


@register_task
def digits_wide() -> Task:
    return Task(
        name="digits-wide",
        description="the 8x8 digits with a wide MLP 64-512-512-10 (the compression benchmark's model)",
        make_data=digits_data,
        make_model=lambda: MLP([64, 512, 512, 10]),
        loss="ce",
        layouts={"input": "grid:8x8", "hidden1": "grid:16x32", "hidden2": "grid:16x32", "output": "circle"},
        output_labels=[str(i) for i in range(10)],
        defaults={
            **IMAGE_MLP_DEFAULTS,
            "steps": 6000,
            "top_k": 60,
            "batch_size": 256,
            "lam": "0:0.01,2000:0.1,4000:1.0",
        },
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
        name="mnist1d",
        description="MNIST-1D: 40-sample 1-D digit signals (needs the mnist1d package), MLP 40-100-100-10",
        make_data=mnist1d_data,
        make_model=lambda: MLP([40, 100, 100, 10]),
        loss="ce",
        layouts={"hidden1": "grid:10x10", "hidden2": "grid:10x10", "output": "circle"},
        output_labels=[str(i) for i in range(10)],
        defaults={
            **IMAGE_MLP_DEFAULTS,
            "steps": 6000,
            "top_k": 30,
            "batch_size": 256,
            "lam": "0:0.001,2000:0.01,4000:0.1",
        },
        goal=("accuracy", ">=", 0.80),
    )


@register_task
def digits_conv() -> Task:
    from topotorch.graph.conv import conv_graph
    from topotorch.models import SmallResNet

    labels = [str(i) for i in range(10)]
    return Task(
        name="digits-conv",
        description="the 8x8 digits with a small residual conv net (16 channels, 2 blocks)",
        make_data=digits_data,
        make_model=lambda: SmallResNet(channels=16, hidden=16, n_blocks=2, image_size=8),
        loss="ce",
        make_graph=lambda m: conv_graph(m, output_labels=labels),
        output_labels=labels,
        defaults=dict(
            steps=3000,
            lr=2e-3,
            l0=0.5,
            wf=2.0,
            top_k=8,
            swap_every=200,
            agg="mean",
            batch_size=128,
            lam="0:1e-3,1000:1e-2",
            threshold=0.05,
            dtype="float32",
        ),
        goal=("accuracy", ">=", 0.95),
    )
