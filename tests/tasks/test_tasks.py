"""Task registry and built-in tasks (topotorch.tasks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from topotorch import tasks as tasks_mod
from topotorch.models import MLP
from topotorch.tasks import TASKS, Task, TaskData, get_task, register_task
from topotorch.training import TrainConfig, build, train

BUILT_IN = {
    "independence",
    "feature-sharing",
    "compositionality",
    "two-moons",
    "modular-addition",
    "permutation-s4",
    "digits",
}
SYMBOLIC = {
    # name: (n_in, n_out, target function)
    "independence": (
        4,
        2,
        lambda x: torch.stack([(x[:, 0] + x[:, 2]) ** 3, x[:, 1] ** 2 + torch.sin(math.pi * x[:, 3])], 1),
    ),
    "feature-sharing": (
        3,
        3,
        lambda x: torch.stack(
            [x[:, 0] ** 2, x[:, 0] ** 2 + x[:, 1] ** 2, x[:, 0] ** 2 + x[:, 1] ** 2 + x[:, 2] ** 2], 1
        ),
    ),
    "compositionality": (4, 1, lambda x: torch.sqrt((x[:, 0] - x[:, 1]) ** 2 + (x[:, 2] - x[:, 3]) ** 2)[:, None]),
}


def test_registry_holds_the_seven_built_in_tasks():
    assert BUILT_IN <= set(TASKS)
    for name in BUILT_IN:
        t = get_task(name)
        assert isinstance(t, Task) and t.name == name and t.description


def test_unknown_task_error_lists_known_tasks():
    with pytest.raises(ValueError) as err:
        get_task("mnist")
    msg = str(err.value)
    assert "unknown task 'mnist'" in msg
    for name in BUILT_IN:
        assert name in msg


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_reference_settings_are_a_valid_config_and_model_fits_data(name):
    cfg = TrainConfig.for_task(name, animation=False, progress=False)
    task, model, graph = build(cfg)
    data = task.make_data(0, torch.float32)
    out = model(data.x_test[:5])
    assert out.shape[0] == 5
    if task.loss == "mse":
        assert out.shape[1] == data.y_test.shape[1]
    else:
        assert out.shape[1] == graph.space("output").size
    assert graph.space("output").role == "output"


@pytest.mark.parametrize("name", sorted(SYMBOLIC))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symbolic_tasks_targets_are_the_formula(name, dtype):
    n_in, n_out, fn = SYMBOLIC[name]
    d = get_task(name).make_data(3, dtype)
    assert d.x_train.shape == (100, n_in) and d.x_test.shape == (100, n_in)
    assert d.y_train.shape == (100, n_out) and d.y_test.shape == (100, n_out)
    for t in (d.x_train, d.y_train, d.x_test, d.y_test):
        assert t.dtype == dtype
    x = torch.cat([d.x_train, d.x_test]).to(torch.float64)
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(torch.cat([d.y_train, d.y_test]), fn(x).to(dtype))
    assert get_task(name).loss == "mse" and get_task(name).metric == "mse"


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_make_data_depends_on_seed_only(name):
    task = get_task(name)
    a, b, c = task.make_data(0, torch.float64), task.make_data(0, torch.float64), task.make_data(1, torch.float64)
    for ta, tb in zip((a.x_train, a.y_train, a.x_test, a.y_test), (b.x_train, b.y_train, b.x_test, b.y_test)):
        assert torch.equal(ta, tb)
    assert not torch.equal(a.x_train, c.x_train)


def test_two_moons_data():
    d = get_task("two-moons").make_data(0, torch.float32)
    assert d.x_train.shape == (200, 2) and d.x_test.shape == (200, 2)
    assert d.x_train.dtype == torch.float32
    assert d.y_train.dtype == torch.long and set(d.y_train.tolist()) == {0, 1}
    assert not torch.equal(d.x_train, d.x_test)  # an independent test draw


def test_modular_addition_split_and_labels():
    p = 59
    d = get_task("modular-addition").make_data(0, torch.float64)
    assert d.x_train.shape == (2785, 2) and d.x_test.shape == (696, 2)
    assert d.x_train.dtype == torch.long and d.y_train.dtype == torch.long
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        assert torch.equal(y, (x[:, 0] + x[:, 1]) % p)
    pairs = {tuple(r) for r in torch.cat([d.x_train, d.x_test]).tolist()}
    assert len(pairs) == p * p  # every pair exactly once, train and test disjoint
    assert get_task("modular-addition").defaults["dtype"] == "float64"


def test_permutation_s4_table_is_the_group():
    d = get_task("permutation-s4").make_data(0, torch.float64)
    assert len(d.x_train) + len(d.x_test) == 24 * 24
    assert len(d.x_train) == round(0.8 * 576)
    table = np.full((24, 24), -1)
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        table[x[:, 0].numpy(), x[:, 1].numpy()] = y.numpy()
    assert table.min() == 0 and table.max() == 23  # every pair labelled, labels in 0..23
    # identity element
    ids = [e for e in range(24) if (table[e] == np.arange(24)).all() and (table[:, e] == np.arange(24)).all()]
    assert len(ids) == 1
    # Latin square (inverses exist) and associativity
    for r in range(24):
        assert sorted(table[r]) == list(range(24)) and sorted(table[:, r]) == list(range(24))
    a, b, c = np.meshgrid(np.arange(24), np.arange(24), np.arange(24), indexing="ij")
    assert (table[table[a, b], c] == table[a, table[b, c]]).all()
    # non-abelian, as S4 is
    assert not (table == table.T).all()


def test_digits_data():
    d = get_task("digits").make_data(0, torch.float32)
    assert d.x_train.shape[1] == 64 and d.x_test.shape[1] == 64
    assert len(d.x_train) + len(d.x_test) == 1797
    x = torch.cat([d.x_train, d.x_test])
    assert x.dtype == torch.float32 and x.min() == 0 and x.max() == 1
    y = torch.cat([d.y_train, d.y_test])
    assert set(y.tolist()) == set(range(10))
    assert get_task("digits").make_model()(d.x_test[:3]).shape == (3, 10)


@pytest.fixture
def parity_task():
    """A user's own task, registered from outside the package (removed afterwards)."""
    name = "test-user-sign"

    @register_task
    def user_task() -> Task:
        def make_data(seed: int, dtype: torch.dtype) -> TaskData:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(64, 3, generator=g, dtype=torch.float64).to(dtype)
            y = (x[:, 0] > 0).long()
            return TaskData(x[:48], y[:48], x[48:], y[48:])

        return Task(
            name=name,
            description="sign of x1",
            make_data=make_data,
            make_model=lambda: MLP([3, 6, 2], activation="relu"),
            loss="ce",
            input_labels=["a", "b", "c"],
            output_labels=["neg", "pos"],
            defaults=dict(steps=1000, lr=1e-2, lam="0:1e-3", dtype="float64", swap_every=10, top_k=2),
        )

    yield name
    tasks_mod.TASKS.pop(name, None)


def test_user_registered_task_trains_through_the_ordinary_path(parity_task):
    assert parity_task in TASKS
    cfg = TrainConfig.for_task(parity_task, steps=40, animation=False, progress=False)
    assert cfg.dtype == "float64" and cfg.swap_every == 10 and cfg.lr == 1e-2  # the task's own defaults
    result = train(cfg)
    assert result.task.name == parity_task
    assert 0.0 <= result.summary["test_accuracy"] <= 1.0
    assert result.summary["test_accuracy"] > 0.75  # it actually learned the sign of x1
    mods = result.summary["modules"]
    assert all(set(m["inputs"]) <= {"a", "b", "c"} and set(m["outputs"]) <= {"neg", "pos"} for m in mods)


def test_digits_wide_is_the_compression_benchmark_mlp():
    t = get_task("digits-wide")
    m = t.make_model()
    assert [l.weight.shape for l in m.modules() if isinstance(l, torch.nn.Linear)] == [(512, 64), (512, 512), (10, 512)]
    d = t.make_data(0, torch.float32)
    assert d.x_train.shape[1] == 64


def test_mnist1d_without_the_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match="pip install"):
        get_task("mnist1d").make_data(0, torch.float32)
