"""The step loop, readable top to bottom, and :func:`train`, which runs it.

One step, whatever the strategy (:mod:`~topotorch.training.strategies`) and whatever is recorded
(:mod:`~topotorch.training.callbacks`):

1. draw the batch (the run's own generator, so a resumed run draws the same ones);
2. the strategy's forward (DDP: and backward, the global loss all-reduced alongside);
3. the NaN stop — a non-finite loss raises :class:`TrainingDiverged` (DiLoCo replicas: at the next
   outer sync), leaving the last checkpoint intact;
4. backward, the body's structure gradients added in closed form (after DDP's all-reduce: every
   rank adds the same term once), the optimizer step;
5. the strategy's synchronisation (DiLoCo's outer step), then the body's relocation when due
   (rank 0 decides and broadcasts; DiLoCo relocates at outer syncs and permutes its shadow too);
6. the callbacks: hook, snapshots, metrics, checkpoints, progress.

    >>> result = train(TrainConfig.for_task("digits", steps=500, out="runs/d"))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from topotorch.body import Body
from topotorch.config import TrainConfig
from topotorch.training.callbacks import Callback, standard_callbacks
from topotorch.training.core import TrainingDiverged, TrainResult
from topotorch.training.distributed import DistContext, dist_context
from topotorch.training.run import Run, result_of, start_run, summarise


def run_steps(run: Run, callbacks: Sequence[Callback]) -> None:
    """Train ``run`` from ``run.start`` to ``config.steps`` (see the module docstring for one step).
    Usage: ``run.body = Body.from_config(cfg, run.model, run.graph); run_steps(run, standard_callbacks(run))``."""
    body, strategy, opt = run.body, run.strategy, run.opt
    assert body is not None
    try:
        for cb in callbacks:
            cb.on_begin(run)
        for step in range(run.start, run.config.steps):
            rows = run.draw_rows()
            loss = strategy.forward(step, rows)
            if strategy.finite(step, loss):  # the NaN stop
                strategy.backward()
                body.add_gradients(step)
                opt.step()
            done = step + 1
            strategy.sync(done)
            relocate = body.relocation is not None and strategy.due(done, body.relocate_every)
            strategy.relocated(body.after_step(step, [opt], relocate=relocate))
            for cb in callbacks:
                cb.on_step(run, step, loss)
    finally:
        for cb in callbacks:
            cb.close()


def fit(run: Run, callbacks: Sequence[Callback]) -> TrainResult:
    """Run the steps of a started run, summarise it and let the callbacks finish (files, pictures)."""
    run.strategy.begin()
    torch.set_num_threads(run.threads)
    run.body = Body.from_config(run.config, run.model, run.graph)
    run.t0 = time.perf_counter() - run.elapsed
    run_steps(run, callbacks)
    summary = summarise(run, time.perf_counter() - run.t0)
    for cb in callbacks:
        cb.on_end(run, summary)
    return result_of(run, summary)


def train(
    config: TrainConfig,
    on_step: Callable | None = None,
    resume: bool = False,
    overwrite: bool | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    draw: bool = True,
) -> TrainResult:
    """Train ``config.task`` with ``config.method``; write the run folder if ``config.out`` is set.

    ``on_step(step, model, graph)`` is an optional hook (e.g. for tests); ``callbacks`` run after the
    standard ones (:func:`~topotorch.training.callbacks.standard_callbacks`); ``draw=False`` leaves out
    the pictures. Raises :class:`TrainingDiverged` on a NaN/inf loss, leaving the last checkpoint intact.

    ``resume=True`` continues from ``config.out``'s checkpoint (model, optimizer, step, every RNG
    state, coordinates): the result equals an uninterrupted run's bit for bit. Without a checkpoint
    it starts afresh. Under ``torchrun`` (``WORLD_SIZE`` > 1) the global batch is split across ranks and
    gradients are averaged by DistributedDataParallel, or, with ``local_steps`` H > 0, replicas take H
    local AdamW steps between outer syncs (DiLoCo). Rank 0 alone decides relocations and writes files.

    A fresh run never mixes with an old one: if ``config.out`` already holds a run it is refused
    (``overwrite=False``, what ``topotorch train`` does without ``--overwrite``) or moved aside whole to
    ``OUT.old-<time>`` (``overwrite=True``; the default None also warns). A resumed run's checkpoint
    must have been written under the same config. Threads: ``config.threads``, else
    :func:`~topotorch.training.threads.choose_threads` (a resumed run keeps its own); torch's setting is
    restored afterwards. Usage: ``train(TrainConfig.for_task("digits", steps=500, out="runs/d"), resume=True)``.
    """
    ctx = dist_context()
    together = False  # did every rank get here the same way (finished, or the same shared divergence)?
    threads_before = torch.get_num_threads()
    try:
        run = start_run(config, ctx, resume, overwrite)
        result = fit(run, [*standard_callbacks(run, on_step, draw), *callbacks])
        together = True
        return result
    except TrainingDiverged:
        together = True  # the divergence decision is global (all-reduced loss or DiLoCo flag)
        raise
    finally:
        torch.set_num_threads(threads_before)
        _leave(ctx, together)


def _leave(ctx: DistContext, together: bool) -> None:
    """Tear down a process group this process created; nobody does while a peer still talks to it."""
    if ctx.created:
        import torch.distributed as dist

        if together:  # rank 0 hosts the store: a barrier first, so no peer loses it mid-call
            dist.barrier()
        dist.destroy_process_group()
