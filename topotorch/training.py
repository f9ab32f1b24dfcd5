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
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from topotorch.analysis import structure
from topotorch.checkpoint import (CheckpointError, FallbackWarning, atomic_write_json, load_checkpoint, prepare_run_folder,
                                  save_checkpoint, set_file_mode)
from topotorch.graph import SpatialGraph
from topotorch.progress import progress_bar
from topotorch.objectives.group import neuron_group_norm
from topotorch.objectives.wiring import WiringConfig, add_wiring_grad_, wiring_cost
from topotorch.relocation import apply_permutation, relocate
from topotorch.runs import RunKind, register_run_kind, write_run_kind
from topotorch.config import METHODS  # noqa: F401  (re-exported: topotorch.training.METHODS)
from topotorch.config import DTYPES, TrainConfig, config_mismatch, parse_schedule, schedule_value
from topotorch.config import RUNTIME_FIELDS as _RUNTIME_FIELDS
from topotorch.config import run_config as _run_config
from topotorch.tasks import Task, TaskData, get_task


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


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


def _graph_for(task: Task, config: TrainConfig, model: torch.nn.Module) -> SpatialGraph:
    if task.make_graph is not None:  # e.g. transformers: the task knows how its model sits in space
        return task.make_graph(model)
    return SpatialGraph.from_chain(
        model, layouts=task.layouts, relocate_inputs=config.relocate_inputs,
        relocate_outputs=config.relocate_outputs, input_labels=task.input_labels, output_labels=task.output_labels,
    )


def build(config: TrainConfig) -> tuple[Task, torch.nn.Module, SpatialGraph]:
    """The task, a freshly initialised model (seeded) and its spatial graph. Usage: ``task, model, g = build(cfg)``."""
    task = get_task(config.task)
    torch.manual_seed(config.seed)
    if config.model is None:
        model = task.make_model().to(DTYPES[config.dtype])
        return task, model, _graph_for(task, config, model)
    return task, *_user_model_and_graph(task, config)


def _user_model_and_graph(task: Task, config: TrainConfig) -> tuple[torch.nn.Module, SpatialGraph]:
    """A model the user brought (``config.model``), and its checked data-flow graph on the task's inputs."""
    from topotorch.graph.flow import flow_graph
    from topotorch.user_models import build_user_model

    dtype = DTYPES[config.dtype]
    data = task.make_data(config.seed, dtype)
    x = data.x_train[:2]
    tokens = not x.is_floating_point() and x.ndim == 2
    vocab = len(task.output_labels) if tokens and task.output_labels else None
    torch.manual_seed(config.seed)
    model = build_user_model(config.model, config.model_config, vocab=vocab, block=x.shape[1] if tokens else None)
    model = model.to(dtype)
    try:
        graph = flow_graph(model, x, layouts=task.layouts or None, input_labels=task.input_labels,
                           output_labels=task.output_labels)
    except ValueError as e:
        raise ValueError(f"--model {config.model}: {e}") from None
    return model, graph


def task_loss(task: Task, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The task's training loss (MSE, MSE on one-hot labels, or cross-entropy). Usage: ``task_loss(t, model(x), y)``."""
    if task.loss == "mse":
        return F.mse_loss(out, y, reduction=reduction)
    if task.loss == "mse_onehot":
        return F.mse_loss(out, F.one_hot(y, out.shape[-1]).to(out.dtype), reduction=reduction)
    return F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction=reduction)  # sequences: every position


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The task's test metric: MSE for regression, accuracy for classification (in eval mode: BatchNorm statistics)."""
    was_training = model.training
    model.eval()
    try:
        if task.evaluate is not None:
            return float(task.evaluate(model, x, y))
        out = model(x)
        if task.metric == "mse":
            return float(F.mse_loss(out, y))
        return float((out.argmax(-1) == y).to(torch.float64).mean())
    finally:
        model.train(was_training)


def goal_met(task: Task, value: float) -> bool | None:
    if task.goal is None:
        return None
    _, op, target = task.goal
    return value <= target if op == "<=" else value >= target


def structure_summary(task: Task, model, graph: SpatialGraph, data: TaskData, threshold: float) -> dict:
    """The figures a run is judged by: test metric, cost, active weights/neurons, modules, thresholded metric."""
    metric = evaluate(task, model, data.x_test, data.y_test)
    with structure.thresholded(graph, threshold):
        metric_thr = evaluate(task, model, data.x_test, data.y_test)
    mods = structure.modules(graph, threshold)
    # modules below the output layer: parallel circuits that only meet at the logits
    mods_hidden = structure.modules(graph, threshold, exclude=tuple(s.name for s in graph.spaces if s.role == "output"))
    return {
        f"test_{task.metric}": metric,
        f"thresholded_test_{task.metric}": metric_thr,
        "goal": list(task.goal) if task.goal else None,
        "goal_met": goal_met(task, metric),
        "thresholded_goal_met": goal_met(task, metric_thr),
        "threshold": threshold,
        "active_weights": structure.active_weights(graph, threshold),
        "active_neurons": structure.active_neurons(graph, threshold),
        "n_modules": len(mods),
        "modules": mods,
        "n_modules_below_output": len(mods_hidden),
        "modules_below_output": [{"sizes": m["sizes"], "inputs": m["inputs"]} for m in mods_hidden],
    }


def _set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- distributed -------------------------------------------------------------------------------

@dataclass
class DistContext:
    """Where this process stands in a ``torch.distributed`` job (world 1: a plain single process)."""

    world: int = 1
    rank: int = 0
    created: bool = False  # we initialised the process group, so we tear it down
    comm_bytes: int = 0  # payload bytes this rank put into collectives (all-reduce, broadcast)

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_context() -> DistContext:
    """Join the ``torch.distributed`` job described by torchrun's environment, if any.

    An already initialised process group is used as is; otherwise ``WORLD_SIZE`` > 1 (with
    ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) starts one: backend ``gloo`` on CPU, or the one named
    by ``TOPOTORCH_DIST_BACKEND`` (e.g. ``nccl``). Usage: ``ctx = dist_context(); ctx.rank``.
    """
    import os

    import torch.distributed as dist

    if not dist.is_available():
        return DistContext()
    if dist.is_initialized():
        return DistContext(dist.get_world_size(), dist.get_rank())
    raw = os.environ.get("WORLD_SIZE", "1") or "1"
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {raw!r}") from None
    if world <= 1:
        return DistContext()
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun")
    dist.init_process_group(backend=os.environ.get("TOPOTORCH_DIST_BACKEND", "gloo"))
    return DistContext(dist.get_world_size(), dist.get_rank(), created=True)


def _relocate_everywhere(graph: SpatialGraph, cfg: WiringConfig, config: TrainConfig, optimizers: list,
                         ctx: DistContext) -> list[tuple[str, torch.Tensor]]:
    """Relocate on rank 0, broadcast the permutations as one integer tensor, apply them in place on every
    other rank (parameters, grads, optimizer state, coordinates). Returns the (space, perm) list applied."""
    if ctx.main:
        applied = relocate(graph, cfg, config.relocation, top_k=config.top_k, optimizer=optimizers).applied
    if ctx.world == 1:
        return applied
    import torch.distributed as dist

    index = {s.name: i for i, s in enumerate(graph.spaces)}
    if ctx.main:  # [space index, perm...] per permutation, in the order applied
        parts = [torch.cat([torch.tensor([index[n]]), p.to(torch.long)]) for n, p in applied]
        payload = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        n = torch.tensor([payload.numel()], dtype=torch.long)
    else:
        n = torch.zeros(1, dtype=torch.long)
    dist.broadcast(n, 0)
    ctx.comm_bytes += 8
    if not ctx.main:
        payload = torch.empty(int(n), dtype=torch.long)
    if int(n):
        dist.broadcast(payload, 0)
        ctx.comm_bytes += payload.numel() * 8
    if not ctx.main:
        applied, i = [], 0
        while i < payload.numel():
            sp = graph.spaces[int(payload[i])]
            perm = payload[i + 1:i + 1 + sp.size].clone()
            apply_permutation(graph, sp, perm, optimizers)
            applied.append((sp.name, perm))
            i += 1 + sp.size
    return applied


# -- resume ------------------------------------------------------------------------------------

def _rng_state(batch_gen: torch.Generator) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every random state a run depends on, as JSON + tensors (no pickle)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    meta = {"numpy": {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next}}
    tensors = {"rng/torch": torch.get_rng_state(), "rng/batch": batch_gen.get_state(),
               "rng/numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    return meta, tensors


def _restore_rng(meta: dict, tensors: dict[str, torch.Tensor], batch_gen: torch.Generator) -> None:
    n, p = meta["numpy"], meta["python"]
    np.random.set_state(("MT19937", tensors["rng/numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    torch.set_rng_state(tensors["rng/torch"])
    batch_gen.set_state(tensors["rng/batch"])


def _check_checkpoint_config(base: Path, config: "TrainConfig"):
    """A ``check_meta`` for :func:`load_checkpoint`: refuse a checkpoint written under another config
    (checkpoints before this check carry none and pass)."""

    def check(meta: dict) -> None:
        saved = (meta.get("extra") or {}).get("config")
        if saved is None:
            return
        diff = config_mismatch(saved, config)
        if diff:
            more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
            raise CheckpointError(f"{base.parent}: the checkpoint was written by another run than "
                                  f"{base.parent / 'config.json'} describes; checkpoint has {', '.join(diff[:4])}{more}. "
                                  "The folder mixes two runs: train afresh with --overwrite")

    return check


# -- threads -----------------------------------------------------------------------------------

# Below this many multiply-adds per step (parameters x samples x positions in a batch) a run uses one
# torch thread. Measured on the 2-core box shared with other sessions (MLP 64-w-w-10 with SiLU,
# cross-entropy, forward + backward + AdamW step, widths 20-1024, batches 100-4096, best of 3 x 30
# steps after 5 warm-up steps, 1 thread against 2 in the same process). In the quietest moments
# (load ~2.4) 2 threads took 0.84x the 1-thread time at 2.2e7 and 0.73x at 8.7e7 (0.41-0.56x at
# 3e8-1e9); with other work on the cores they were always SLOWER: load 1.5-3.7: 3.1x at 1.9e6, 9.8x at
# 2.3e6, 5.2x at 1.8e7, 3.4x at 3.1e8, 2.6x at 1.2e9; load 4.5: 3.7x at 1.9e5, 7.1x at 2.3e6, 19x at
# 2.7e7, 4.8x at 8.7e7, 6.0x at 3.1e8. So: 1 thread below 1e8 (at most ~1.4x lost on a quiet box,
# up to 19x saved on a busy one), and above it torch's thread count capped by the cores the 1-minute
# load average leaves free.
ONE_THREAD_WORK = 1e8
# frames of training.gif / training.mp4: drawing a frame costs ~0.1 s on the 2-core box and the GIF
# encoder as much again, so 50 frames (of the ~100 snapshots) keep `make demo`'s pictures to ~5-8 s
ANIMATION_FRAMES = 50


def step_work(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    """Rough multiply-adds of one training step's forward: parameters x batch x positions per sample
    (token sequences: their length; images: their pixels). Usage: ``step_work(model, data.x_train, 64)``."""
    params = sum(p.numel() for p in model.parameters())
    if x.ndim <= 1:
        positions = 1
    elif not x.is_floating_point():
        positions = x[0].numel()  # token ids: one position each
    else:
        positions = 1 if x.ndim == 2 else (x.shape[1] if x.ndim == 3 else int(np.prod(x.shape[2:])))
    return float(params) * batch * positions


def choose_threads(work: float, cores: int | None = None, load: float | None = None) -> int:
    """Torch threads for a run whose step costs ``work`` multiply-adds (:func:`step_work`): 1 below
    :data:`ONE_THREAD_WORK`, else torch's current count capped by the cores the 1-minute load average
    leaves free (at least 1). Usage: ``torch.set_num_threads(choose_threads(step_work(m, x, 64)))``."""
    import os

    if work < ONE_THREAD_WORK:
        return 1
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            load = 0.0
    return max(1, min(torch.get_num_threads(), cores, round(cores - load)))


def _check_resumable(run_dir: Path, config: TrainConfig) -> None:
    path = run_dir / "config.json"
    if not path.exists():
        return
    saved = TrainConfig.from_json(path).to_dict()
    ours = config.to_dict()
    diff = [k for k in ours if k not in _RUNTIME_FIELDS and saved.get(k) != ours[k]]
    if diff:
        shown = ", ".join(f"{k}={saved.get(k)!r} (asked {ours[k]!r})" for k in diff[:3])
        raise ValueError(f"cannot resume {run_dir}: its config.json differs in {shown}")


def _truncate_metrics(path: Path, upto: int) -> None:
    """Keep metrics.csv's header and complete rows up to step ``upto`` (a killed run may leave a half line)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if not lines:
        return
    header, keep = lines[0], [lines[0]]
    width = len(next(csv.reader([header])))
    for line in lines[1:]:
        if not line.endswith("\n"):
            break
        row = next(csv.reader([line]), [])
        try:
            if len(row) == width and int(row[0]) <= upto:
                keep.append(line)
        except ValueError:
            continue
    from topotorch.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, "".join(keep).encode())


def _save_snapshots_atomic(snapshots: list, path: Path) -> None:
    import os

    from topotorch.visualize import save_snapshots

    tmp = path.with_name(path.name + ".tmp")
    save_snapshots(snapshots, tmp)
    set_file_mode(tmp)  # safetensors writes 0600; every run file gets the same mode
    os.replace(tmp, path)


def _inner_base(run_dir: Path, rank: int, step: int) -> Path:
    return run_dir / f"inner-rank{rank}-step{step:09d}"


def _save_inner_state(run_dir: Path, rank: int, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """Rank ``rank``'s inner optimizer state at ``step`` (DiLoCo); the two newest steps are kept."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(_inner_base(run_dir, rank, step), model, opt, None, step=step)
    for old in sorted(run_dir.glob(f"inner-rank{rank}-step*.json"))[:-2]:
        for f in run_dir.glob(old.stem + ".*"):
            f.unlink(missing_ok=True)


def _has_checkpoint(base: Path) -> bool:
    return any(base.with_suffix(s).exists() for s in (".safetensors", ".json", ".prev.safetensors"))


# -- training ----------------------------------------------------------------------------------

def train(config: TrainConfig, on_step=None, resume: bool = False, overwrite: bool | None = None) -> TrainResult:
    """Train ``config.task`` with ``config.method``; write the run folder if ``config.out`` is set.

    ``on_step(step, model, graph)`` is an optional hook (e.g. for tests). Raises
    :class:`TrainingDiverged` on a NaN/inf loss, leaving the last checkpoint intact.

    ``resume=True`` continues from ``config.out``'s checkpoint (model, optimizer, step, every RNG
    state, coordinates): the result equals an uninterrupted run's bit for bit. Without a checkpoint
    it starts afresh. Under ``torchrun`` (``WORLD_SIZE`` > 1) the global batch is split across ranks and
    gradients are averaged by DistributedDataParallel, or, with ``local_steps`` H > 0, replicas take H
    local AdamW steps between outer syncs (DiLoCo). Rank 0 alone decides relocations and writes files.

    A fresh run never mixes with an old one: if ``config.out`` already holds a run it is refused
    (``overwrite=False``, what ``topotorch train`` does without ``--overwrite``) or moved aside whole to
    ``OUT.old-<time>`` (``overwrite=True``; the default None also warns). A resumed run's checkpoint
    must have been written under the same config. Threads: ``config.threads``, else
    :func:`choose_threads` (a resumed run keeps its own); torch's setting is restored afterwards.
    Usage: ``train(TrainConfig.for_task("digits", steps=500, out="runs/d"), resume=True)``.
    """
    from topotorch.visualize import draw_connectivity, load_snapshots, render_animation, take_snapshot

    ctx = dist_context()
    together = False  # did every rank get here the same way (finished, or the same shared divergence)?
    threads_before = torch.get_num_threads()
    try:
        result = _train(config, on_step, resume, ctx, draw_connectivity, load_snapshots, render_animation,
                        take_snapshot, overwrite)
        together = True
        return result
    except TrainingDiverged:
        together = True  # the divergence decision is global (all-reduced loss or DiLoCo flag)
        raise
    finally:
        torch.set_num_threads(threads_before)
        if ctx.created:
            import torch.distributed as dist

            if together:  # nobody tears the group down while a peer still talks to it (rank 0 hosts the store)
                dist.barrier()
            dist.destroy_process_group()


def _train(config, on_step, resume, ctx, draw_connectivity, load_snapshots, render_animation, take_snapshot,
           overwrite=None):
    import torch.distributed as dist

    run_dir = Path(config.out) if config.out else None
    if run_dir is not None and not resume:
        if overwrite is False:
            prepare_run_folder(run_dir, False)  # a run there: refused (every rank sees the same folder and stops)
        if ctx.world > 1:
            dist.barrier()  # every rank has looked before rank 0 moves anything
        if ctx.main and overwrite is not False:
            prepare_run_folder(run_dir, overwrite)  # a run there: moved aside whole (atomic rename)
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
    n_train = len(data.x_train)
    world, H = ctx.world, config.local_steps
    global_batch = config.batch_size if config.batch_size and config.batch_size < n_train else n_train
    if global_batch < world:
        raise ValueError(f"the global batch ({global_batch}) is smaller than the number of processes ({world})")
    work = step_work(model, data.x_train, max(1, global_batch // world))
    threads = config.threads or choose_threads(work)
    threads_by = "--threads" if config.threads else f"rule: {work:.2g} multiply-adds per step"

    # DiLoCo: the outer (global) parameters live in a shadow copy with its own graph, so relocation
    # permutes them and the outer optimizer's momentum exactly like the replicas
    shadow = shadow_graph = outer_opt = None
    if H:
        import copy

        shadow = copy.deepcopy(model)
        shadow_graph = _graph_for(task, config, shadow)
        outer_opt = torch.optim.SGD(shadow.parameters(), lr=config.outer_lr, momentum=config.outer_momentum,
                                    nesterov=config.outer_momentum > 0)

    writes = run_dir is not None and ctx.main
    batch_gen = torch.Generator().manual_seed(config.seed + 1)
    start, elapsed0 = 0, 0.0
    snapshots = None
    header = ["step", "lambda", "train_loss", "task_loss", "penalty", "wiring_cost", f"test_{task.metric}",
              "active_weight_fraction", "seconds"]
    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run folder (config.out)")
        _check_resumable(run_dir, config)
        if _has_checkpoint(run_dir / "checkpoint"):
            meta = load_checkpoint(run_dir / "checkpoint", model, opt, graph,
                                   check_meta=_check_checkpoint_config(run_dir / "checkpoint", config))
            start = int(meta["step"])
            extra, tensors = meta.get("extra", {}), meta.get("extra_tensors", {})
            if not config.threads and extra.get("threads"):  # the run's own choice: the same numerics as before
                threads, threads_by = int(extra["threads"]), "the resumed run's"
            if "rng" not in extra:
                raise CheckpointError(f"{run_dir}/checkpoint has no RNG state (written by an older version); "
                                      "cannot resume exactly")
            _restore_rng(extra["rng"], tensors, batch_gen)
            elapsed0 = float(extra.get("seconds", 0.0))
            if extra.get("world", world) != world:
                import warnings

                warnings.warn(f"resuming a {extra['world']}-process run with {world} processes: the data split "
                              "differs, so the run will not match an uninterrupted one exactly", stacklevel=2)
            if H and world > 1 and not ctx.main:  # this replica's own AdamW state, saved beside rank 0's
                inner = _inner_base(run_dir, ctx.rank, start)
                if _has_checkpoint(inner):
                    load_checkpoint(inner, model, opt, None)
                else:
                    import warnings

                    warnings.warn(f"no inner optimizer state for rank {ctx.rank} at step {start} ({inner.name}); "
                                  "using rank 0's", stacklevel=2)
            if shadow is not None:
                with torch.no_grad():
                    for ps, pm in zip(shadow.parameters(), model.parameters()):
                        ps.copy_(pm)  # checkpoints are written right after an outer sync: outer == local
                for s_sp, m_sp in zip(shadow_graph.spaces, graph.spaces):
                    if m_sp.positions is not None:
                        shadow_graph.set_positions(s_sp.name, m_sp.positions.clone())
                for n, p in shadow.named_parameters():
                    if f"outer/{n}" in tensors:
                        outer_opt.state[p]["momentum_buffer"] = tensors[f"outer/{n}"].clone()
            snap_path = run_dir / "snapshots.safetensors"
            if snap_path.exists():
                try:
                    snapshots = [s for s in load_snapshots(snap_path) if s.step <= start]
                except Exception as e:  # a broken picture log must not block training, but it is said
                    import warnings

                    warnings.warn(f"{snap_path} is unreadable ({' '.join(str(e).split())[:200]}); the animation "
                                  f"will start at step {start}", FallbackWarning, stacklevel=2)
                    snapshots = None
    if snapshots is None:
        snapshots = [take_snapshot(graph, 0)] if start == 0 else []

    metrics_file = writer = None
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        if start == 0:
            write_run_kind(run_dir, "train")  # topotorch.runs.open_run reads the kind, never guesses it
            atomic_write_json(run_dir / "config.json", config.to_dict())
            metrics_file = open(run_dir / "metrics.csv", "w", newline="")
            writer = csv.writer(metrics_file)
            writer.writerow(header)
        else:
            _truncate_metrics(run_dir / "metrics.csv", start)
            fresh = not (run_dir / "metrics.csv").exists()
            metrics_file = open(run_dir / "metrics.csv", "a", newline="")
            writer = csv.writer(metrics_file)
            if fresh:
                writer.writerow(header)

    net = model
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if world > 1 and not H:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    rows_all = torch.arange(n_train)
    per_sample = None

    def checkpoint(done: int) -> None:
        if metrics_file is not None:
            metrics_file.flush()  # rows up to this checkpoint are on disk before it exists
        _save_snapshots_atomic(snapshots, run_dir / "snapshots.safetensors")  # pictures survive a kill too
        rng_meta, rng_tensors = _rng_state(batch_gen)
        if outer_opt is not None:
            for n, p in shadow.named_parameters():
                buf = outer_opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    rng_tensors[f"outer/{n}"] = buf
        save_checkpoint(run_dir / "checkpoint", model, opt, graph, step=done,
                        extra={"rng": rng_meta, "seconds": round(time.perf_counter() - t0, 3), "world": world,
                               "threads": threads, "config": _run_config(config)},
                        extra_tensors=rng_tensors)

    torch.set_num_threads(threads)
    topo = _topo_loss(config, model)
    t0 = time.perf_counter() - elapsed0
    progress = progress_bar(config.progress and ctx.main)
    diverged = None  # (step, value) of a local non-finite loss awaiting the next outer sync (DiLoCo)
    try:
        with progress as bar:
            job = bar.add_task(f"{config.task} [{config.method}]", total=config.steps, completed=start) if bar else None
            for step in range(start, config.steps):
                idx = torch.randint(n_train, (config.batch_size,), generator=batch_gen) \
                    if config.batch_size and config.batch_size < n_train else None
                lam = schedule_value(lam_phases, step) if config.uses_penalty else 0.0
                if world == 1:
                    xb, yb = (data.x_train[idx], data.y_train[idx]) if idx is not None else (data.x_train, data.y_train)
                    loss_task = task_loss(task, net(xb), yb)
                    loss_value = loss_task.detach()
                else:  # this rank's share of the global batch; Σ over ranks of loss = the global mean loss
                    rows = (idx if idx is not None else rows_all)[ctx.rank::world]
                    out = net(data.x_train[rows])
                    per_sample = per_sample or (1 if task.loss == "ce" else out[0].numel())
                    denom = global_batch * per_sample
                    loss_sum = task_loss(task, out, data.y_train[rows], reduction="sum")
                    loss_task = loss_sum * (world / denom)
                    if H:  # DiLoCo: no per-step communication; divergence is shared at the next sync
                        loss_value = loss_task.detach()
                    else:  # the global loss, for the divergence check and the log; overlaps with backward
                        total = loss_sum.detach().reshape(1).clone()
                        loss_work = dist.all_reduce(total, async_op=True)
                        ctx.comm_bytes += total.numel() * total.element_size()
                ddp_step = world > 1 and not H
                if ddp_step:
                    opt.zero_grad(set_to_none=True)
                    loss_task.backward()  # DDP averages the gradient across ranks here
                    ctx.comm_bytes += grad_bytes
                    loss_work.wait()
                    loss_value = total[0] / denom
                bad = not torch.isfinite(loss_value)
                if bad and not (H and world > 1):  # every DDP rank sees the same global loss: all stop together
                    raise TrainingDiverged(
                        f"loss became {loss_value.item()} at step {step}; lower the learning rate or λ. "
                        "The last checkpoint is intact."
                    )
                if bad and diverged is None:
                    diverged = (step, loss_value.item())
                step_cost_cfg = cost_cfg if step >= config.bias_penalty_from else cost_cfg_nobias
                if diverged is None:
                    if not ddp_step:
                        opt.zero_grad(set_to_none=True)
                        loss_task.backward()
                    # the penalty's gradient in closed form, added after DDP's all-reduce: every rank
                    # holds the same parameters, so each adds the same term once (no double averaging)
                    if topo is not None:  # after DDP's all-reduce, like the wiring term: the same on every rank
                        topo().backward()
                    if config.group_lam:  # likewise: a function of the (identical) parameters, added once per rank
                        (config.group_lam * neuron_group_norm(graph)).backward()
                    add_wiring_grad_(graph, step_cost_cfg, lam)
                    opt.step()
                done = step + 1
                synced = False
                if H and (done % H == 0 or done == config.steps):
                    _outer_sync(model, shadow, outer_opt, ctx, diverged, done, H)
                    synced = True
                prev_sync = ((done - 1) // H) * H if H else done - 1
                if config.uses_relocation and (done // config.swap_every > prev_sync // config.swap_every) \
                        and (synced or not H):
                    applied = _relocate_everywhere(graph, reloc_cfg, config, [opt], ctx)
                    for name, perm in applied if shadow_graph is not None else []:
                        apply_permutation(shadow_graph, name, perm, outer_opt)
                if on_step is not None:
                    on_step(done, model, graph)
                if done % snap_every == 0 or done == config.steps:
                    snapshots.append(take_snapshot(graph, done))
                if writer is not None and (done % config.log_every == 0 or done == config.steps):
                    with torch.no_grad():  # penalty: what training minimises; wiring_cost: with distances
                        penalty = float(wiring_cost(graph, step_cost_cfg))
                        cc = float(wiring_cost(graph, reloc_cfg))
                    lv = loss_value.item()
                    writer.writerow([done, lam, lv + lam * penalty, lv, penalty, cc,
                                     evaluate(task, model, data.x_test, data.y_test),
                                     structure.active_weights(graph, config.threshold)["fraction"],
                                     round(time.perf_counter() - t0, 3)])
                ckpt_due = done // ckpt_every > prev_sync // ckpt_every or done == config.steps
                if run_dir is not None and ckpt_due and (synced or not H):
                    if writes:
                        checkpoint(done)
                    elif H:  # DiLoCo replicas keep their own AdamW moments: each saves them for an exact resume
                        _save_inner_state(run_dir, ctx.rank, model, opt, done)
                if bar:
                    bar.update(job, advance=1)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    train_seconds = time.perf_counter() - t0

    summary = {
        "task": config.task, "method": config.method, "steps": config.steps, "seed": config.seed,
        "dtype": config.dtype, "train_seconds": round(train_seconds, 3),
        "world_size": world, "local_steps": H, "resumed_from_step": start if resume else None,
        "threads": threads, "threads_chosen_by": threads_by,
        "comm_bytes_per_step": round(ctx.comm_bytes / max(1, config.steps - start), 1),
        "wiring_cost": float(wiring_cost(graph, reloc_cfg).detach()),
        **structure_summary(task, model, graph, data, config.threshold),
    }
    if config.group_lam:
        with torch.no_grad():
            summary["group_norm"] = round(float(neuron_group_norm(graph)), 6)
    if topo is not None:
        summary["topo_loss"] = {k: round(v.item(), 6) for k, v in topo.layerwise().items()}
    if writes:
        _save_snapshots_atomic(snapshots, run_dir / "snapshots.safetensors")
        # the run is finished and said so before any picture is drawn: Ctrl-C while rendering loses only pictures
        atomic_write_json(run_dir / "summary.json", summary)
        t1 = time.perf_counter()
        try:
            draw_connectivity(graph, path=run_dir / "connectivity.png", threshold=0.0,
                              title=f"{config.task} [{config.method}] step {config.steps}")
            if config.animation:
                with progress_bar(config.progress) as bar:
                    job = bar.add_task("rendering training.gif/.mp4", total=None) if bar else None

                    def on_frame(done: int, total: int) -> None:
                        if bar is not None:
                            bar.update(job, completed=done, total=total)

                    render_animation(graph, snapshots, gif_path=run_dir / "training.gif",
                                     mp4_path=run_dir / "training.mp4", max_frames=ANIMATION_FRAMES, on_frame=on_frame)
        except KeyboardInterrupt:
            import warnings

            warnings.warn(f"interrupted while drawing: the run is finished and saved ({run_dir / 'summary.json'}); "
                          f"its pictures are incomplete (`topotorch draw {run_dir}` redraws connectivity.png)",
                          FallbackWarning, stacklevel=2)
            raise
        summary["render_seconds"] = round(time.perf_counter() - t1, 3)
        atomic_write_json(run_dir / "summary.json", summary)
    return TrainResult(model, graph, task, data, config, summary, snapshots, run_dir)


@torch.no_grad()
def _outer_sync(model, shadow, outer_opt, ctx: DistContext, diverged, done: int, H: int) -> None:
    """DiLoCo outer step: average the pseudo-gradients θ_outer − θ_local over replicas (one all-reduce,
    a divergence flag riding along), step the outer optimizer, and reset every replica to θ_outer."""
    locals_, outers = list(model.parameters()), list(shadow.parameters())
    flag = torch.tensor([0.0 if diverged is None else 1.0], dtype=locals_[0].dtype)
    flat = torch.cat([(po - pl).reshape(-1) for po, pl in zip(outers, locals_)] + [flag])
    if ctx.world > 1:
        import torch.distributed as dist

        dist.all_reduce(flat)
        ctx.comm_bytes += flat.numel() * flat.element_size()
        flat /= ctx.world
    if flat[-1] > 0:
        where = f"at step {diverged[0]} ({diverged[1]})" if diverged else "on another replica"
        raise TrainingDiverged(f"loss became non-finite {where}, before the outer sync at step {done}; lower the "
                               "learning rate or λ. The last checkpoint is intact.")
    i = 0
    for po in outers:
        n = po.numel()
        po.grad = flat[i:i + n].view_as(po).clone()
        i += n
    outer_opt.step()
    for po, pl in zip(outers, locals_):
        pl.copy_(po)


def _topo_loss(config: TrainConfig, model: torch.nn.Module):
    """The run's τ·TopoLoss (reference mean over layers), or None when ``topo_tau`` is 0."""
    if not config.topo_tau:
        return None
    from topotorch.objectives.topoloss import TopoLoss
    from topotorch.sheets import default_layers

    pattern = default_layers(model) if config.topo_layers == "auto" else config.topo_layers
    return TopoLoss(model, pattern, factor=config.topo_factor, tau=config.topo_tau)


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
    load_checkpoint(run_dir / "checkpoint", model, None, graph,
                    check_meta=_check_checkpoint_config(run_dir / "checkpoint", config))
    data = task.make_data(config.seed, DTYPES[config.dtype])
    return TrainResult(model, graph, task, data, config, read_summary(run_dir), [], run_dir)


def read_summary(run_dir: Path) -> dict:
    """A run's ``summary.json`` as a dict; {} when missing, and {} with a :class:`FallbackWarning`
    naming the file and the problem when it is unreadable (the run itself stays usable)."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        import warnings

        warnings.warn(f"{path} is unreadable ({' '.join(str(e).split())}); its figures are left out", FallbackWarning,
                      stacklevel=2)
        return {}
    if not isinstance(data, dict):
        import warnings

        warnings.warn(f"{path} is not a JSON object (got {type(data).__name__}); its figures are left out",
                      FallbackWarning, stacklevel=2)
        return {}
    return data


register_run_kind(RunKind("train", open=load_run, config=lambda run_dir: TrainConfig.from_json(run_dir / "config.json"),
                          command="topotorch train"))
