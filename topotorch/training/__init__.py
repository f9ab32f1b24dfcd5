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
    >>> result = train(cfg)  # writes config.json, metrics.csv, checkpoint, pictures, summary.json
    >>> result.summary["test_mse"]

The trainer is one user of :class:`topotorch.body.Body` (the penalty's gradients, relocation, its
optimizer-state permutation), laid out by concept, each module importing only those above it here:

* :mod:`.core` — the task side: ``build``, ``task_loss``, ``evaluate``, ``structure_summary``;
* :mod:`.threads` — ``step_work``, ``choose_threads``; :mod:`.distributed` — ``DistContext``;
* :mod:`.strategies` — how a step is synchronised: ``Single``, ``DDP``, ``DiLoCo``;
* :mod:`.resume` — RNG state, the checks that a folder holds this run, DiLoCo replicas' own state;
* :mod:`.run` — a run's live state (``start_run``), its summary, ``load_run``, ``read_summary``;
* :mod:`.callbacks` — the hook, snapshots, metrics.csv, checkpoints, progress, summary.json, drawings;
* :mod:`.loop` — the step loop (``run_steps``) and :func:`train`.
"""

from __future__ import annotations

from topotorch.config import DTYPES, METHODS, TrainConfig, config_mismatch, parse_schedule, schedule_value
from topotorch.training.callbacks import (
    ANIMATION_FRAMES,
    Callback,
    Checkpoints,
    Drawings,
    Hook,
    Metrics,
    Progress,
    Snapshots,
    SummaryFile,
    standard_callbacks,
)
from topotorch.training.core import (
    TrainingDiverged,
    TrainResult,
    build,
    evaluate,
    goal_met,
    graph_for,
    set_seeds,
    structure_summary,
    task_loss,
)
from topotorch.training.distributed import DistContext, dist_context
from topotorch.training.loop import fit, run_steps, train
from topotorch.training.run import Run, load_run, read_summary, start_run, summarise
from topotorch.training.strategies import DDP, STRATEGIES, DiLoCo, Single, make_strategy, strategy_name
from topotorch.training.threads import ONE_THREAD_WORK, choose_threads, step_work

__all__ = [
    "ANIMATION_FRAMES",
    "DTYPES",
    "METHODS",
    "ONE_THREAD_WORK",
    "STRATEGIES",
    "Callback",
    "Checkpoints",
    "DDP",
    "DiLoCo",
    "DistContext",
    "Drawings",
    "Hook",
    "Metrics",
    "Progress",
    "Run",
    "Single",
    "Snapshots",
    "SummaryFile",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build",
    "choose_threads",
    "config_mismatch",
    "dist_context",
    "evaluate",
    "fit",
    "goal_met",
    "graph_for",
    "load_run",
    "make_strategy",
    "parse_schedule",
    "read_summary",
    "run_steps",
    "schedule_value",
    "set_seeds",
    "standard_callbacks",
    "start_run",
    "step_work",
    "strategy_name",
    "structure_summary",
    "summarise",
    "task_loss",
    "train",
]
