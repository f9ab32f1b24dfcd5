"""Training with a body: task loss + λ·wiring cost, relocation every n steps, snapshots, checkpoints.

The five methods of the paper's ablation:

=========  ========================================  ==========
method     training penalty                          relocation
=========  ========================================  ==========
``none``   —                                         no
``l1``     plain L1 (wiring cost with wf = 0)        no
``local``  wiring cost (wf > 0)                      no
``swap``   plain L1                                  yes (judged by the wiring cost)
``bimt``   wiring cost                               yes
=========  ========================================  ==========

    >>> cfg = TrainConfig.for_task("independence", out="runs/ind")
    >>> result = train(cfg)            # writes config.json, metrics.csv, checkpoint, pictures, summary.json
    >>> result.summary["test_mse"]
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from . import analysis
from .checkpoint import atomic_write_json, load_checkpoint, save_checkpoint
from .graph import SpatialGraph
from .objectives.wiring import WiringConfig, add_wiring_grad_, wiring_cost
from .relocation import relocate
from .tasks import Task, TaskData, get_task

METHODS = ("none", "l1", "local", "swap", "bimt")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


def parse_schedule(spec: str | float | list) -> list[tuple[int, float]]:
    """Parse a step:value phase schedule, e.g. ``"0:1e-3,5000:1e-2,15000:1e-3"`` (or a number).

    The value at step t is that of the last phase starting at or before t.
    Usage: ``parse_schedule("0:0.1,5000:1")``.
    """
    if isinstance(spec, (int, float)):
        phases = [(0, float(spec))]
    elif isinstance(spec, list):
        phases = [(int(s), float(v)) for s, v in spec]
    else:
        phases = []
        for part in str(spec).split(","):
            step, sep, value = part.strip().partition(":")
            try:
                phases.append((int(step), float(value)) if sep else (0, float(step)))
            except ValueError:
                raise ValueError(f"bad schedule phase {part!r}: expected STEP:VALUE, e.g. '5000:1e-2'") from None
    if not phases:
        raise ValueError("empty schedule")
    steps = [s for s, _ in phases]
    if steps[0] != 0:
        raise ValueError(f"schedule must start at step 0, got {spec!r}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"schedule steps must increase, got {spec!r}")
    if any(not math.isfinite(v) or v < 0 for _, v in phases):
        raise ValueError(f"schedule values must be finite and >= 0, got {spec!r}")
    return phases


def schedule_value(phases: list[tuple[int, float]], step: int) -> float:
    value = phases[0][1]
    for s, v in phases:
        if step >= s:
            value = v
    return value


@dataclass
class TrainConfig:
    """Every knob of a training run, validated on creation. Usage: ``TrainConfig.for_task("digits", steps=2000)``."""

    task: str = "independence"
    method: Literal["none", "l1", "local", "swap", "bimt"] = "bimt"
    steps: int = 20000
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int | None = None  # None: full batch
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    lam: str = "0:1e-3"  # λ schedule, step:value phases
    l0: float = 0.1
    wf: float = 1.0
    metric: Literal["l1", "l2"] = "l1"
    agg: Literal["sum", "mean"] = "sum"
    penalize_bias: bool = True
    bias_penalty_from: int = 0  # biases join the penalty at this step (the paper: 15000 on symbolic tasks)
    exclude: list[str] = field(default_factory=list)
    relocation: Literal["swap", "assign"] = "swap"
    top_k: int = 5
    swap_every: int = 200
    relocate_inputs: bool = True
    relocate_outputs: bool = True
    threshold: float = 0.05  # |w| above which a weight counts as active
    log_every: int = 100
    snapshot_every: int = 0  # 0: about 100 snapshots per run
    checkpoint_every: int = 0  # 0: about 10 checkpoints per run
    animation: bool = True
    progress: bool = True
    out: str | None = None

    def __post_init__(self) -> None:
        get_task(self.task)  # unknown task -> clear error
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use float32 or float64")
        if self.relocation not in ("swap", "assign"):
            raise ValueError(f"unknown relocation {self.relocation!r}; use 'swap' or 'assign'")
        for name in ("steps", "top_k", "swap_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("snapshot_every", "checkpoint_every", "bias_penalty_from", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {self.batch_size!r}")
        for name in ("lr", "threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        parse_schedule(self.lam)
        self.wiring(train=True)  # validates l0, wf, metric, agg

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> "TrainConfig":
        """The task's reference settings, with ``overrides`` (None values ignored) on top."""
        t = get_task(task)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        values = {**t.defaults, **{k: v for k, v in overrides.items() if v is not None}, "task": task}
        return cls(**values)

    @classmethod
    def from_json(cls, path: Path) -> "TrainConfig":
        data = json.loads(Path(path).read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"{path}: unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # what the method means for the two uses of the cost
    @property
    def uses_penalty(self) -> bool:
        return self.method != "none"

    @property
    def uses_relocation(self) -> bool:
        return self.method in ("swap", "bimt")

    def wiring(self, train: bool, bias: bool = True) -> WiringConfig:
        """The wiring-cost options for the training penalty (``train``) or for relocation decisions."""
        wf = 0.0 if (train and self.method in ("l1", "swap")) else self.wf
        return WiringConfig(wf=wf, l0=self.l0, metric=self.metric, agg=self.agg,
                            penalize_bias=self.penalize_bias and bias, exclude=list(self.exclude))


@dataclass
class TrainResult:
    model: torch.nn.Module
    graph: SpatialGraph
    task: Task
    data: TaskData
    config: TrainConfig
    summary: dict
    snapshots: list
    run_dir: Path | None


def build(config: TrainConfig) -> tuple[Task, torch.nn.Module, SpatialGraph]:
    """The task, a freshly initialised model (seeded) and its spatial graph."""
    task = get_task(config.task)
    torch.manual_seed(config.seed)
    model = task.make_model().to(DTYPES[config.dtype])
    graph = SpatialGraph.from_chain(
        model, layouts=task.layouts, relocate_inputs=config.relocate_inputs,
        relocate_outputs=config.relocate_outputs, input_labels=task.input_labels, output_labels=task.output_labels,
    )
    return task, model, graph


def task_loss(task: Task, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task.loss == "mse":
        return F.mse_loss(out, y)
    if task.loss == "mse_onehot":
        return F.mse_loss(out, F.one_hot(y, out.shape[-1]).to(out.dtype))
    return F.cross_entropy(out, y)


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The task's test metric: MSE for regression, accuracy for classification."""
    out = model(x)
    if task.metric == "mse":
        return float(F.mse_loss(out, y))
    return float((out.argmax(-1) == y).to(torch.float64).mean())


def goal_met(task: Task, value: float) -> bool | None:
    if task.goal is None:
        return None
    _, op, target = task.goal
    return value <= target if op == "<=" else value >= target


def structure_summary(task: Task, model, graph: SpatialGraph, data: TaskData, threshold: float) -> dict:
    """The figures a run is judged by: test metric, cost, active weights/neurons, modules, thresholded metric."""
    metric = evaluate(task, model, data.x_test, data.y_test)
    with analysis.thresholded(graph, threshold):
        metric_thr = evaluate(task, model, data.x_test, data.y_test)
    mods = analysis.modules(graph, threshold)
    # modules below the output layer: parallel circuits that only meet at the logits
    mods_hidden = analysis.modules(graph, threshold, exclude=tuple(s.name for s in graph.spaces if s.role == "output"))
    return {
        f"test_{task.metric}": metric,
        f"thresholded_test_{task.metric}": metric_thr,
        "goal": list(task.goal) if task.goal else None,
        "goal_met": goal_met(task, metric),
        "thresholded_goal_met": goal_met(task, metric_thr),
        "threshold": threshold,
        "active_weights": analysis.active_weights(graph, threshold),
        "active_neurons": analysis.active_neurons(graph, threshold),
        "n_modules": len(mods),
        "modules": mods,
        "n_modules_below_output": len(mods_hidden),
        "modules_below_output": [{"sizes": m["sizes"], "inputs": m["inputs"]} for m in mods_hidden],
    }


def _set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(config: TrainConfig, on_step=None) -> TrainResult:
    """Train ``config.task`` with ``config.method``; write the run folder if ``config.out`` is set.

    ``on_step(step, model, graph)`` is an optional hook (e.g. for tests). Raises
    :class:`TrainingDiverged` on a NaN/inf loss, leaving the last checkpoint intact.
    """
    from .visualize import draw_connectivity, render_animation, save_snapshots, take_snapshot

    _set_seeds(config.seed)
    task, model, graph = build(config)
    dtype = DTYPES[config.dtype]
    data = task.make_data(config.seed, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lam_phases = parse_schedule(config.lam)
    cost_cfg = config.wiring(train=True)
    cost_cfg_nobias = config.wiring(train=True, bias=False)
    reloc_cfg = config.wiring(train=False)
    snap_every = config.snapshot_every or max(1, config.steps // 100)
    ckpt_every = config.checkpoint_every or max(1, config.steps // 10)

    run_dir = Path(config.out) if config.out else None
    metrics_file = writer = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", config.to_dict())
        metrics_file = open(run_dir / "metrics.csv", "w", newline="")
        writer = csv.writer(metrics_file)
        writer.writerow(["step", "lambda", "train_loss", "task_loss", "penalty", "wiring_cost", f"test_{task.metric}",
                         "active_weight_fraction", "seconds"])

    batch_gen = torch.Generator().manual_seed(config.seed + 1)
    n_train = len(data.x_train)
    snapshots = [take_snapshot(graph, 0)]
    t0 = time.perf_counter()
    progress = _progress(config)
    try:
        with progress as bar:
            job = bar.add_task(f"{config.task} [{config.method}]", total=config.steps) if bar else None
            for step in range(config.steps):
                if config.batch_size and config.batch_size < n_train:
                    idx = torch.randint(n_train, (config.batch_size,), generator=batch_gen)
                    xb, yb = data.x_train[idx], data.y_train[idx]
                else:
                    xb, yb = data.x_train, data.y_train
                lam = schedule_value(lam_phases, step) if config.uses_penalty else 0.0
                loss_task = task_loss(task, model(xb), yb)
                if not torch.isfinite(loss_task):
                    raise TrainingDiverged(
                        f"loss became {loss_task.item()} at step {step}; lower the learning rate or λ. "
                        "The last checkpoint is intact."
                    )
                opt.zero_grad(set_to_none=True)
                loss_task.backward()
                step_cost_cfg = cost_cfg if step >= config.bias_penalty_from else cost_cfg_nobias
                # the penalty's gradient in closed form: same as autograd through λ·cc, much cheaper
                add_wiring_grad_(graph, step_cost_cfg, lam)
                opt.step()
                if config.uses_relocation and (step + 1) % config.swap_every == 0:
                    relocate(graph, reloc_cfg, config.relocation, top_k=config.top_k, optimizer=opt)
                done = step + 1
                if on_step is not None:
                    on_step(done, model, graph)
                if done % snap_every == 0 or done == config.steps:
                    snapshots.append(take_snapshot(graph, done))
                if writer is not None and (done % config.log_every == 0 or done == config.steps):
                    with torch.no_grad():  # penalty: what training minimises; wiring_cost: with distances
                        penalty = float(wiring_cost(graph, step_cost_cfg))
                        cc = float(wiring_cost(graph, reloc_cfg))
                    writer.writerow([done, lam, loss_task.item() + lam * penalty, loss_task.item(), penalty, cc,
                                     evaluate(task, model, data.x_test, data.y_test),
                                     analysis.active_weights(graph, config.threshold)["fraction"],
                                     round(time.perf_counter() - t0, 3)])
                if run_dir is not None and (done % ckpt_every == 0 or done == config.steps):
                    save_checkpoint(run_dir / "checkpoint", model, opt, graph, step=done)
                if bar:
                    bar.update(job, advance=1)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    train_seconds = time.perf_counter() - t0

    summary = {
        "task": config.task, "method": config.method, "steps": config.steps, "seed": config.seed,
        "dtype": config.dtype, "train_seconds": round(train_seconds, 3),
        "wiring_cost": float(wiring_cost(graph, reloc_cfg).detach()),
        **structure_summary(task, model, graph, data, config.threshold),
    }
    if run_dir is not None:
        save_snapshots(snapshots, run_dir / "snapshots.safetensors")
        t1 = time.perf_counter()
        draw_connectivity(graph, path=run_dir / "connectivity.png", threshold=0.0,
                          title=f"{config.task} [{config.method}] step {config.steps}")
        if config.animation:
            render_animation(graph, snapshots, gif_path=run_dir / "training.gif", mp4_path=run_dir / "training.mp4")
        summary["render_seconds"] = round(time.perf_counter() - t1, 3)
        atomic_write_json(run_dir / "summary.json", summary)
    return TrainResult(model, graph, task, data, config, summary, snapshots, run_dir)


def load_run(run_dir: Path) -> TrainResult:
    """Rebuild a finished (or interrupted) run from its folder: config, model, graph, data.

    Raises ``FileNotFoundError``/``ValueError``/``CheckpointError`` naming what is missing or broken.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    try:
        config = TrainConfig.from_json(cfg_path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is corrupt: {e}") from None
    task, model, graph = build(config)
    load_checkpoint(run_dir / "checkpoint", model, None, graph)
    data = task.make_data(config.seed, DTYPES[config.dtype])
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return TrainResult(model, graph, task, data, config, summary, [], run_dir)


def _progress(config: TrainConfig):
    import contextlib

    if not config.progress:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False)
