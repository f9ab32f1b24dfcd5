"""A run's live state and its folder: start (fresh or resumed), the summary, reading a finished run back.

:func:`start_run` makes everything the step loop needs, in the order that keeps runs reproducible:
the folder made ready (a run already there is refused or moved aside whole), every generator
seeded, the task's model, data and AdamW, the strategy (DiLoCo's shadow copy is taken before any
random state is restored), then, when resuming, the checkpoint with every random state. A folder
says its kind (``run.json``, :mod:`topotorch.runs`) and holds ``config.json`` before anything else.

    >>> run = start_run(cfg, dist_context(), resume=True)  # run.start: the step it continues from
    >>> result = load_run("runs/ind")  # a finished (or interrupted) run
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from topotorch.body import Body
from topotorch.checkpoint import (
    CheckpointError,
    FallbackWarning,
    atomic_write_json,
    load_checkpoint,
    prepare_run_folder,
)
from topotorch.config import DTYPES, TrainConfig
from topotorch.graph import SpatialGraph
from topotorch.objectives.group import neuron_group_norm
from topotorch.objectives.wiring import wiring_cost
from topotorch.runs import RunKind, register_run_kind, write_run_kind
from topotorch.tasks import Task, TaskData
from topotorch.training.core import TrainResult, build, set_seeds, structure_summary
from topotorch.training.distributed import DistContext
from topotorch.training.resume import (
    check_resumable,
    checkpoint_config_check,
    has_checkpoint,
    load_inner_state,
    restore_rng,
)
from topotorch.training.strategies import Single, make_strategy
from topotorch.training.threads import choose_threads, step_work


@dataclass
class Run:
    """Everything one process's training run holds between its steps."""

    config: TrainConfig
    ctx: DistContext
    task: Task
    data: TaskData
    model: torch.nn.Module
    graph: SpatialGraph
    opt: torch.optim.Optimizer
    strategy: Single
    batch_gen: torch.Generator
    run_dir: Path | None
    threads: int
    threads_by: str
    start: int = 0  # the step training continues from
    elapsed: float = 0.0  # training seconds before this process (a resumed run's)
    resumed: bool = False
    t0: float = 0.0  # perf_counter() at which the run's clock reads 0
    body: Body | None = None
    snapshots: list = field(default_factory=list)

    @property
    def writes(self) -> bool:
        """Whether this process writes the run folder (rank 0 of a run with ``config.out``)."""
        return self.run_dir is not None and self.ctx.main

    def draw_rows(self) -> torch.Tensor | None:
        """The next mini-batch's rows (the batch generator's next draw), or None for full-batch training."""
        n, b = len(self.data.x_train), self.config.batch_size
        return torch.randint(n, (b,), generator=self.batch_gen) if b and b < n else None


def prepare_out(run_dir: Path, ctx: DistContext, overwrite: bool | None) -> None:
    """Make ``run_dir`` ready for a fresh run: a run there is refused (``overwrite=False``, every rank sees the
    same folder and stops) or moved aside whole by rank 0 once every rank has looked."""
    if overwrite is False:
        prepare_run_folder(run_dir, False)
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()
    if ctx.main and overwrite is not False:
        prepare_run_folder(run_dir, overwrite)


def start_run(config: TrainConfig, ctx: DistContext, resume: bool = False, overwrite: bool | None = None) -> Run:
    """A run ready for its first (or next) step: folder, seeds, model, data, optimizer, strategy, resumed state.
    Usage: ``run = start_run(cfg, dist_context())``."""
    run_dir = Path(config.out) if config.out else None
    if run_dir is not None and not resume:
        prepare_out(run_dir, ctx, overwrite)
    set_seeds(config.seed)
    task, model, graph = build(config)
    data = task.make_data(config.seed, DTYPES[config.dtype])
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n_train = len(data.x_train)
    global_batch = config.batch_size if config.batch_size and config.batch_size < n_train else n_train
    if global_batch < ctx.world:
        raise ValueError(f"the global batch ({global_batch}) is smaller than the number of processes ({ctx.world})")
    work = step_work(model, data.x_train, max(1, global_batch // ctx.world))
    threads_by = "--threads" if config.threads else f"rule: {work:.2g} multiply-adds per step"
    strategy = make_strategy(ctx, config, task, data, model, graph, opt, global_batch)
    run = Run(
        config,
        ctx,
        task,
        data,
        model,
        graph,
        opt,
        strategy,
        torch.Generator().manual_seed(config.seed + 1),
        run_dir,
        config.threads or choose_threads(work),
        threads_by,
    )
    if resume:
        restore(run)
    if run.writes and run.start == 0:
        assert run_dir is not None
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_kind(run_dir, "train")  # topotorch.runs.open_run reads the kind, never guesses it
        atomic_write_json(run_dir / "config.json", config.to_dict())
    return run


def restore(run: Run) -> None:
    """Continue ``run`` from its folder's checkpoint (model, optimizer, coordinates, step, every RNG state,
    the strategy's own state); without a checkpoint it starts afresh."""
    config, ctx, run_dir = run.config, run.ctx, run.run_dir
    if run_dir is None:
        raise ValueError("resume needs the run folder (config.out)")
    check_resumable(run_dir, config)
    run.resumed = True
    base = run_dir / "checkpoint"
    if not has_checkpoint(base):
        return
    meta = load_checkpoint(base, run.model, run.opt, run.graph, check_meta=checkpoint_config_check(base, config))
    run.start = int(meta["step"])
    extra, tensors = meta.get("extra", {}), meta.get("extra_tensors", {})
    if not config.threads and extra.get("threads"):  # the run's own choice: the same numerics as before
        run.threads, run.threads_by = int(extra["threads"]), "the resumed run's"
    if "rng" not in extra:
        raise CheckpointError(
            f"{run_dir}/checkpoint has no RNG state (written by an older version); cannot resume exactly"
        )
    restore_rng(extra["rng"], tensors, run.batch_gen)
    run.elapsed = float(extra.get("seconds", 0.0))
    if extra.get("world", ctx.world) != ctx.world:
        warnings.warn(
            f"resuming a {extra['world']}-process run with {ctx.world} processes: the data split "
            "differs, so the run will not match an uninterrupted one exactly",
            stacklevel=3,
        )
    if run.strategy.replica_state and ctx.world > 1 and not ctx.main:
        load_inner_state(run_dir, ctx.rank, run.model, run.opt, run.start)
    run.strategy.resume(tensors, run.start)


def summarise(run: Run, train_seconds: float) -> dict:
    """The run's ``summary.json``: settings, timing, communication, the structure figures, the objectives' values."""
    config, ctx, body = run.config, run.ctx, run.body
    assert body is not None
    summary = {
        "task": config.task,
        "method": config.method,
        "steps": config.steps,
        "seed": config.seed,
        "dtype": config.dtype,
        "train_seconds": round(train_seconds, 3),
        "world_size": ctx.world,
        "local_steps": config.local_steps,
        "resumed_from_step": run.start if run.resumed else None,
        "threads": run.threads,
        "threads_chosen_by": run.threads_by,
        "comm_bytes_per_step": round((ctx.comm_bytes + body.comm_bytes) / max(1, config.steps - run.start), 1),
        "wiring_cost": float(wiring_cost(run.graph, body.relocation_cost).detach()),
        **structure_summary(run.task, run.model, run.graph, run.data, config.threshold),
    }
    if config.group_lam:
        with torch.no_grad():
            summary["group_norm"] = round(float(neuron_group_norm(run.graph, body.group_spaces)), 6)
    if body.topo is not None:
        summary["topo_loss"] = {k: round(v.item(), 6) for k, v in body.topo.layerwise().items()}
    return summary


def result_of(run: Run, summary: dict) -> TrainResult:
    """The :class:`TrainResult` of a finished run."""
    return TrainResult(run.model, run.graph, run.task, run.data, run.config, summary, run.snapshots, run.run_dir)


def load_run(run_dir: Path) -> TrainResult:
    """Rebuild a finished (or interrupted) run from its folder: config, model, graph, data.

    Raises ``FileNotFoundError``/``ValueError``/``CheckpointError`` naming what is missing or broken.
    Usage: ``r = load_run("runs/ind"); r.summary["test_mse"]``.
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
    load_checkpoint(
        run_dir / "checkpoint", model, None, graph, check_meta=checkpoint_config_check(run_dir / "checkpoint", config)
    )
    data = task.make_data(config.seed, DTYPES[config.dtype])
    return TrainResult(model, graph, task, data, config, read_summary(run_dir), [], run_dir)


def read_summary(run_dir: Path) -> dict:
    """A run's ``summary.json`` as a dict; {} when missing, and {} with a :class:`FallbackWarning`
    naming the file and the problem when it is unreadable (the run itself stays usable).
    Usage: ``read_summary("runs/ind").get("test_mse")``."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(
            f"{path} is unreadable ({' '.join(str(e).split())}); its figures are left out",
            FallbackWarning,
            stacklevel=2,
        )
        return {}
    if not isinstance(data, dict):
        warnings.warn(
            f"{path} is not a JSON object (got {type(data).__name__}); its figures are left out",
            FallbackWarning,
            stacklevel=2,
        )
        return {}
    return data


register_run_kind(
    RunKind(
        "train",
        open=load_run,
        config=lambda run_dir: TrainConfig.from_json(run_dir / "config.json"),
        command="topotorch train",
    )
)
