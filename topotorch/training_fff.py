"""Training FFF (and same-width FF) classifiers: the recipe behind the FFF accuracy table, and a run folder.

The recipe (:class:`FFFRecipe`, shared by the FF baseline so comparisons are fair): AdamW, a
cosine learning rate, minibatches, Gaussian input noise of ``noise`` × each feature's training
std; an FFF trains soft while its decisions sharpen, then with hard decisions
(:class:`~topotorch.layers.fff_schedule.SoftToHard`), with its leaves as path sums of offsets
(:func:`~topotorch.layers.share_leaves`, merged back at the end).

    >>> model = make_classifier("fff", n_in=64, n_out=10, training_width=128, leaf_width=8)
    >>> fit_classifier(model, x_train, y_train, FFFRecipe(epochs=100))
    >>> result = train_fff_run(FFFRunConfig(task="digits", out="runs/digits-fff"))  # `topotorch fff digits`

A run folder holds ``config.json``, ``model.safetensors`` + ``model.json`` (the deployed model,
written atomically by :func:`~topotorch.checkpoint.save_checkpoint`, its SHA-256 in ``model.json``
and checked on every load), ``summary.json`` (hard and soft test accuracy, train accuracy, leaf usage,
time), ``leaves.md`` (which classes land in which leaf) and, for 2-D inputs, ``regions.png``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from topotorch.config import setting, validate
from topotorch.layers.fff import FFF, hardening_loss
from topotorch.layers.fff_schedule import SoftToHard
from topotorch.layers.fff_sharing import merge_shared_leaves, share_leaves
from topotorch.progress import progress_bar
from topotorch.runs import RunKind, register_run_kind, run_kind, write_run_kind

__all__ = [
    "FFFRecipe",
    "FFFRunConfig",
    "make_classifier",
    "fit_classifier",
    "accuracy",
    "train_fff_run",
    "load_fff_run",
    "is_fff_run",
    "is_fff_config",
]


def _check_task(name: str) -> None:
    from topotorch.tasks import TASKS  # tasks import models and data sets: loaded when a config is made

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")


@dataclass
class FFFRecipe:
    """How a classifier is trained (every field applies to the FF too unless marked FFF).

    Usage: ``FFFRecipe(epochs=200, hard_frac=0.5)``.
    """

    epochs: int = setting(100, "training epochs", lo=1)
    batch_size: int = setting(64, "minibatch size", lo=1)
    lr: float = setting(1e-2, "peak learning rate (cosine schedule, AdamW)", lo=0.0, lo_open=True)
    weight_decay: float = setting(0.1, "AdamW weight decay", lo=0.0)
    noise: float = setting(0.5, "input noise, in training stds per feature", lo=0.0)
    shift: int = setting(
        0, "random circular shift of each input by up to ±shift positions (1-D signals)", lo=0, cli=False
    )
    hard_frac: float = setting(0.5, "FFF: final share of steps trained with hard decisions", lo=0.0, hi=1.0)
    final_sharpness: float = setting(30.0, "FFF: soft decisions sharpen to sigmoid(s·z)", lo=1.0)
    share_leaves: bool = setting(True, "FFF: train leaves as path sums of per-node offsets")
    hardening: float = setting(0.0, "FFF: h of the entropy hardening loss in the soft phase", lo=0.0, cli=False)
    node_lr: float = setting(
        1.0,
        "FFF: routing-node learning-rate multiplier (no weight decay on them if != 1)",
        lo=0.0,
        lo_open=True,
        cli=False,
    )
    distill: float = setting(
        0.0, "FFF: weight of KL (T = 2) to the soft-phase model during the hard phase", lo=0.0, hi=1.0, cli=False
    )
    kd_alpha: float = setting(
        0.0, "weight of KL to a teacher model's logits (fit_classifier's teacher)", lo=0.0, hi=1.0, cli=False
    )
    kd_temp: float = setting(2.0, "temperature of the teacher KL", lo=0.0, lo_open=True, cli=False)

    def __post_init__(self) -> None:
        validate(self)


def make_classifier(
    kind: Literal["ff", "fff"],
    n_in: int,
    n_out: int,
    training_width: int = 128,
    leaf_width: int = 8,
    region_leak: float = 0.0,
) -> nn.Module:
    """One hidden layer of ``training_width`` ReLU neurons: a dense FF, or an FFF with leaves of
    ``leaf_width`` (depth log2(training_width / leaf_width)). Usage: ``make_classifier("fff", 64, 10)``."""
    if kind == "ff":
        return nn.Sequential(nn.Linear(n_in, training_width), nn.ReLU(), nn.Linear(training_width, n_out))
    if kind != "fff":
        raise ValueError(f"kind must be 'ff' or 'fff', got {kind!r}")
    leaves = training_width // leaf_width
    if leaf_width < 1 or leaves * leaf_width != training_width or leaves & (leaves - 1):
        raise ValueError(f"training_width ({training_width}) must be leaf_width ({leaf_width}) times a power of two")
    return FFF(n_in, leaf_width, n_out, leaves.bit_length() - 1, activation="relu", region_leak=region_leak)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` whose argmax logit is ``y``, in the model's current mode. Usage: ``accuracy(m.eval(), x, y)``."""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item() if len(x) else float("nan")


def fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: FFFRecipe,
    seed: int = 0,
    teacher: nn.Module | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train ``model`` (FF or a model with one FFF) on ``x`` (N, in), labels ``y`` (N,) with ``recipe``.

    Every FFF is trained soft-then-hard; with ``recipe.share_leaves`` its leaves train as path
    sums and are merged back before returning, so the result is a plain model. ``teacher``
    (with ``recipe.kd_alpha`` > 0) adds Hinton KL to its logits. ``on_epoch(epoch, loss)`` is
    called after each epoch (progress bars). Returns ``model``. Raises ``FloatingPointError``
    on a non-finite loss. Usage: ``fit_classifier(model, x_train, y_train, FFFRecipe())``.
    """
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"fit_classifier expects x (N, in) and y (N,) with N > 0, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    r = recipe
    ffs = [m for m in model.modules() if isinstance(m, FFF)]
    if r.share_leaves:
        for layer in ffs:
            share_leaves(layer)
    node_params = [p for layer in ffs for p in (layer.node_weights, layer.node_biases)]
    if ffs and r.node_lr != 1.0:
        rest = [p for p in model.parameters() if all(p is not q for q in node_params)]
        opt = torch.optim.AdamW(
            [{"params": rest, "mult": 1.0}, {"params": node_params, "mult": r.node_lr, "weight_decay": 0.0}],
            lr=r.lr,
            weight_decay=r.weight_decay,
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    g = torch.Generator().manual_seed(seed)
    n, width = x.shape
    sigma = r.noise * x.std(0) if n > 1 else torch.zeros(width, device=x.device, dtype=x.dtype)
    steps = r.epochs * math.ceil(n / r.batch_size)
    schedule = SoftToHard(model, steps, r.hard_frac, r.final_sharpness) if ffs else None
    soft_teacher, step = None, 0
    try:
        for epoch in range(r.epochs):
            model.train()
            total = 0.0
            for idx in torch.randperm(n, generator=g).to(x.device).split(r.batch_size):
                for group in opt.param_groups:
                    group["lr"] = group.get("mult", 1.0) * r.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                if schedule is not None:
                    if r.distill > 0 and soft_teacher is None and schedule.phase(step) == "hard":
                        soft_teacher = copy.deepcopy(model).train()  # the soft-phase model, before hardening
                    schedule.step(step)
                # random numbers from a CPU generator (reproducible on any device), then moved
                xb = x[idx] + sigma * torch.randn(len(idx), width, generator=g).to(x) if r.noise else x[idx]
                if r.shift:
                    k = torch.randint(-r.shift, r.shift + 1, (len(idx), 1), generator=g).to(x.device)
                    xb = xb.gather(1, (torch.arange(width, device=x.device) - k) % width)
                out = model(xb)
                loss = nn.functional.cross_entropy(out, y[idx])
                if teacher is not None and r.kd_alpha > 0:
                    loss = (1 - r.kd_alpha) * loss + r.kd_alpha * _kl(out, teacher, xb, r.kd_temp)
                if r.hardening and ffs and not ffs[0].train_hardened:
                    loss = loss + hardening_loss(model, r.hardening)
                if soft_teacher is not None:
                    loss = (1 - r.distill) * loss + r.distill * _kl(out, soft_teacher, xb, 2.0)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {loss.item()} at epoch {epoch}, step {step}; lower the learning rate ({r.lr})"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                step += 1
            if on_epoch is not None:
                on_epoch(epoch, total / n)
    finally:  # also on errors: the caller gets a plain model back, never a half-parametrised one
        if schedule is not None:
            schedule.finish()
        for layer in ffs:
            merge_shared_leaves(layer)  # deployed as a plain FFF
    return model


def _kl(out: torch.Tensor, teacher: nn.Module, xb: torch.Tensor, temp: float) -> torch.Tensor:
    with torch.no_grad():
        target = (teacher(xb) / temp).softmax(-1)
    return temp**2 * nn.functional.kl_div((out / temp).log_softmax(-1), target, reduction="batchmean")


@dataclass
class FFFRunConfig:
    """A `topotorch fff` run: a classification task, the model, the recipe, the output folder.

    Usage: ``FFFRunConfig(task="digits", model="fff", leaf_width=8, out="runs/digits-fff")``.
    """

    task: str = setting("digits", "a classification task with vector inputs", cli=False, check=_check_task)
    model: Literal["ff", "fff"] = setting("fff", "fff, or ff for the dense baseline of the same width")
    training_width: int = setting(128, "hidden neurons in all leaves (2^depth · ℓ) / of the FF", lo=1)
    leaf_width: int = setting(8, "FFF leaf width ℓ", lo=1)
    seed: int = setting(0, "random seed", lo=0)
    recipe: FFFRecipe = field(default_factory=FFFRecipe)
    progress: bool = setting(True, "progress bar", runtime=True)
    out: str | None = setting(None, "run folder (default runs/<task>-<model>)", runtime=True, expect="a folder path")
    threads: int | None = setting(
        None, "torch threads (default: 1 for small models, measured rule)", lo=1, hi=4096, runtime=True
    )

    def __post_init__(self) -> None:
        if isinstance(self.recipe, dict):
            self.recipe = FFFRecipe(**self.recipe)
        if not isinstance(self.recipe, FFFRecipe):
            raise ValueError(f"recipe must be an FFFRecipe or a dict of its fields, got {type(self.recipe).__name__}")
        validate(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FFFRunConfig:
        """Rebuild from ``to_dict`` output (config.json); unknown keys are an error naming them."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown FFF run config field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FFFRunResult:
    model: nn.Module
    summary: dict[str, Any]
    run_dir: Path | None


def train_fff_run(config: FFFRunConfig, overwrite: bool | None = None) -> FFFRunResult:
    """Train one FF or FFF classifier on a task's data and (with ``config.out``) write its run folder.

    A folder that already holds a run is refused (``overwrite=False``, the CLI's default) or moved
    aside whole to ``OUT.old-<time>`` (True; the library default None does the same). Threads:
    ``config.threads``, else :func:`topotorch.training.choose_threads`; torch's setting is restored after.
    Usage: ``train_fff_run(FFFRunConfig(task="two-moons", leaf_width=1, training_width=16))``.
    """
    before = torch.get_num_threads()
    try:
        return _train_fff_run(config, overwrite)
    finally:
        torch.set_num_threads(before)


def _train_fff_run(config: FFFRunConfig, overwrite: bool | None) -> FFFRunResult:
    from topotorch.checkpoint import atomic_write_bytes, atomic_write_json, prepare_run_folder, save_checkpoint
    from topotorch.layers.fff_regions import class_leaf_table, draw_regions, format_class_leaf_table, leaf_usage
    from topotorch.tasks import get_task
    from topotorch.training import choose_threads, step_work

    task = get_task(config.task)
    if task.loss != "ce":
        raise ValueError(f"topotorch fff trains classifiers; task {config.task!r} has loss {task.loss!r}")
    data = task.make_data(config.seed, torch.float32)
    xtr, ytr, xte, yte = data.x_train, data.y_train, data.x_test, data.y_test
    if xtr.ndim != 2 or not torch.is_floating_point(xtr):
        raise ValueError(
            f"task {config.task!r} has inputs of shape {tuple(xtr.shape)} ({xtr.dtype}); "
            "topotorch fff needs vector inputs (N, features)"
        )
    n_out = int(max(ytr.max(), yte.max())) + 1
    torch.manual_seed(config.seed)
    model = make_classifier(config.model, xtr.shape[1], n_out, config.training_width, config.leaf_width)
    run_dir = Path(config.out) if config.out else None
    if run_dir is not None:
        prepare_run_folder(run_dir, overwrite, resume_hint=False)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_kind(run_dir, "fff")  # topotorch.runs.open_run reads the kind, never guesses it
        atomic_write_json(run_dir / "config.json", config.to_dict())
    threads = config.threads or choose_threads(step_work(model, xtr, config.recipe.batch_size))
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with progress_bar(config.progress) as bar:
        job = bar.add_task(f"{config.model} on {config.task}", total=config.recipe.epochs) if bar else None

        def on_epoch(epoch: int, loss: float) -> None:
            if bar is not None:
                bar.update(job, advance=1, description=f"{config.model} on {config.task} loss {loss:.3f}")

        fit_classifier(model, xtr, ytr, config.recipe, seed=config.seed, on_epoch=on_epoch)
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "task": config.task,
        "model": config.model,
        "training_width": config.training_width,
        "test_accuracy": accuracy(model.eval(), xte, yte),
        "train_accuracy": accuracy(model.eval(), xtr, ytr),
        "train_seconds": round(seconds, 2),
        "threads": threads,
    }
    if isinstance(model, FFF):
        usage = leaf_usage(model, xte)
        summary.update(
            leaf_width=model.leaf_width,
            depth=model.depth,
            soft_test_accuracy=accuracy(model.train(), xte, yte),
            leaves_used=usage.n_used,
            effective_leaves=round(usage.effective_leaves, 3),
            busiest_leaf_fraction=round(usage.max_fraction, 4),
            neurons_per_sample=model.leaf_width + model.depth,
        )
        model.eval()
    if run_dir is not None:
        save_checkpoint(run_dir / "model", model)  # model.safetensors + model.json (its SHA-256), atomic
        if isinstance(model, FFF):
            atomic_write_bytes(
                run_dir / "leaves.md",
                (format_class_leaf_table(class_leaf_table(model, xte, yte, n_out)) + "\n").encode(),
            )
            if xtr.shape[1] == 2:
                import matplotlib.pyplot as plt

                fig = draw_regions(
                    model,
                    xte,
                    yte,
                    path=run_dir / "regions.png",
                    title=f"{config.task}: FFF d={model.depth}, ℓ={model.leaf_width}",
                )
                plt.close(fig)
        atomic_write_json(run_dir / "summary.json", summary)
    return FFFRunResult(model, summary, run_dir)


def is_fff_config(config: Any) -> bool:
    """Whether a parsed ``config.json`` was written by ``topotorch fff`` (a recipe and a leaf width): the guess
    for folders written before ``run.json`` (:mod:`topotorch.runs` reads the kind from there)."""
    return isinstance(config, dict) and {"recipe", "leaf_width"} <= set(config)


def is_fff_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a ``topotorch fff`` run. Usage: ``is_fff_run("runs/digits-fff")``."""
    try:
        return run_kind(run_dir) == "fff"
    except (OSError, ValueError):
        return False


def load_fff_run(run_dir: str | Path) -> FFFRunResult:
    """Rebuild a finished run's model and summary from its folder (config.json + model.safetensors).

    Usage: ``load_fff_run("runs/digits-fff").model``.
    """
    from safetensors.torch import load_file

    from topotorch.checkpoint import CheckpointError, FallbackWarning, load_checkpoint
    from topotorch.tasks import get_task
    from topotorch.training import read_summary

    run_dir = Path(run_dir)
    for name in ("config.json", "model.safetensors"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir} is not a finished `topotorch fff` run: {name} is missing")
    cfg_path = run_dir / "config.json"
    try:
        config = FFFRunConfig.from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, TypeError) as e:
        raise ValueError(f"{cfg_path} is corrupt: {e}") from None
    data = get_task(config.task).make_data(config.seed, torch.float32)
    n_out = int(max(data.y_train.max(), data.y_test.max())) + 1
    model = make_classifier(config.model, data.x_train.shape[1], n_out, config.training_width, config.leaf_width)
    if (run_dir / "model.json").exists():  # checksummed (save_checkpoint): verified before use
        try:
            load_checkpoint(run_dir / "model", model, fallback=False)
        except CheckpointError as e:
            raise ValueError(str(e)) from None
    else:  # written before model.json existed: readable, but nothing can vouch for its bytes
        import warnings

        try:
            state = load_file(str(run_dir / "model.safetensors"))
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on a damaged file
            raise ValueError(f"{run_dir / 'model.safetensors'} is corrupt: {' '.join(str(e).split())}") from None
        warnings.warn(
            f"{run_dir / 'model.safetensors'} has no checksum (no model.json: written by an older "
            "version); loaded unverified",
            FallbackWarning,
            stacklevel=2,
        )
    if isinstance(model, FFF):  # not in the state dict: the decision temperature it was trained to
        model.sharpness = config.recipe.final_sharpness
    return FFFRunResult(model.eval(), read_summary(run_dir), run_dir)


def _fff_config(run_dir: Path) -> FFFRunConfig:
    cfg_path = run_dir / "config.json"
    try:
        return FFFRunConfig.from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"{cfg_path} is corrupt: {e}") from None


register_run_kind(
    RunKind("fff", open=load_fff_run, config=_fff_config, looks_like=is_fff_config, command="topotorch fff")
)
