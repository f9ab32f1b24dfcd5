"""What a run does around its steps, one job per callback: the hook, snapshots, metrics.csv, checkpoints,
the progress bar, summary.json and the drawings.

The step loop calls, in list order, ``on_begin(run)`` once before the first step, ``on_step(run, step,
loss)`` after every step (``step`` 0-based, the optimizer step, relocation and any outer sync
done), ``on_end(run, summary)`` once training has finished, and ``close()`` always, also when a
step raises. The order of :func:`standard_callbacks` is the order files reach the disk: a
checkpoint flushes metrics.csv and writes snapshots.safetensors first, so everything up to a
checkpoint survives a kill; summary.json is written before any picture is drawn, so Ctrl-C while
rendering loses only pictures.

Drawings import :mod:`topotorch.visualize` when they draw, never when this module is imported:
the trainer's floor does not depend on the picture code, and a caller without pictures
(``train(cfg, draw=False)``) never loads it.

    >>> class Print(Callback):
    ...     def on_step(self, run, step, loss):
    ...         print(step, float(loss))
    >>> train(cfg, callbacks=[Print()])
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from topotorch.analysis import structure
from topotorch.artifacts import atomic_write_bytes, atomic_write_json, set_file_mode
from topotorch.checkpoint import FallbackWarning, save_checkpoint
from topotorch.config import run_config
from topotorch.objectives.wiring import wiring_cost
from topotorch.progress import progress_bar
from topotorch.training.core import evaluate
from topotorch.training.resume import rng_state, save_inner_state
from topotorch.training.run import Run

# frames of training.gif / training.mp4: drawing a frame costs ~0.1 s on the 2-core box and the GIF
# encoder as much again, so 50 frames (of the ~100 snapshots) keep `make demo`'s pictures to ~5-8 s
ANIMATION_FRAMES = 50


class Callback:
    """One job around the steps; every hook is optional. Usage: subclass, override, ``train(cfg, callbacks=[cb])``."""

    def on_begin(self, run: Run) -> None:
        """Once, before the first step (after any resume)."""

    def on_step(self, run: Run, step: int, loss: torch.Tensor) -> None:
        """After step ``step`` (0-based; ``step + 1`` steps are done); ``loss``: the step's (global) task loss."""

    def on_end(self, run: Run, summary: dict) -> None:
        """Once, after the last step, with the run's summary (a callback may add to it)."""

    def close(self) -> None:
        """Always, after the steps (also when one raised): release files and displays."""


class Hook(Callback):
    """``fn(done, model, graph)`` after every step (``train``'s ``on_step``, e.g. for tests)."""

    def __init__(self, fn: Callable[[int, torch.nn.Module, Any], Any]):
        self.fn = fn

    def on_step(self, run: Run, step: int, loss: torch.Tensor) -> None:
        self.fn(step + 1, run.model, run.graph)


def _save_snapshots_atomic(snapshots: list, path: Path) -> None:
    from topotorch.visualize import save_snapshots

    tmp = path.with_name(path.name + ".tmp")
    save_snapshots(snapshots, tmp)
    set_file_mode(tmp)  # safetensors writes 0600; every run file gets the same mode
    os.replace(tmp, path)


class Snapshots(Callback):
    """The network every ``every`` steps and at the end (``run.snapshots``, ``snapshots.safetensors``): the
    frames of the animation. A resumed run continues the saved log (a broken one is said, not fatal)."""

    def __init__(self, every: int):
        self.every = every

    def on_begin(self, run: Run) -> None:
        from topotorch.visualize import load_snapshots, take_snapshot

        path = run.run_dir / "snapshots.safetensors" if run.run_dir is not None else None
        if run.start and path is not None and path.exists():
            try:
                run.snapshots = [s for s in load_snapshots(path) if s.step <= run.start]
                return
            except Exception as e:  # noqa: BLE001 - a broken picture log must not block training, but it is said
                warnings.warn(
                    f"{path} is unreadable ({' '.join(str(e).split())[:200]}); the animation "
                    f"will start at step {run.start}",
                    FallbackWarning,
                    stacklevel=2,
                )
        run.snapshots = [take_snapshot(run.graph, 0)] if run.start == 0 else []

    def on_step(self, run: Run, step: int, loss: torch.Tensor) -> None:
        done = step + 1
        if done % self.every == 0 or done == run.config.steps:
            from topotorch.visualize import take_snapshot

            run.snapshots.append(take_snapshot(run.graph, done))

    def save(self, run: Run) -> None:
        """Write the log so far (atomically) into the run folder."""
        assert run.run_dir is not None
        _save_snapshots_atomic(run.snapshots, run.run_dir / "snapshots.safetensors")

    def on_end(self, run: Run, summary: dict) -> None:
        if run.writes:
            self.save(run)


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
    atomic_write_bytes(path, "".join(keep).encode())


class Metrics(Callback):
    """``metrics.csv``: a row every ``every`` steps and at the end (rank 0 of a run with a folder). A resumed
    run keeps the rows up to its checkpoint and appends."""

    def __init__(self, every: int):
        self.every = every
        self.file: IO[str] | None = None
        self.writer: Any = None

    def on_begin(self, run: Run) -> None:
        if not run.writes:
            return
        assert run.run_dir is not None
        path = run.run_dir / "metrics.csv"
        header = [
            "step",
            "lambda",
            "train_loss",
            "task_loss",
            "penalty",
            "wiring_cost",
            f"test_{run.task.metric}",
            "active_weight_fraction",
            "seconds",
        ]
        if run.start:
            _truncate_metrics(path, run.start)
        fresh = run.start == 0 or not path.exists()
        self.file = open(path, "w" if run.start == 0 else "a", newline="")
        self.writer = csv.writer(self.file)
        if fresh:
            self.writer.writerow(header)

    def on_step(self, run: Run, step: int, loss: torch.Tensor) -> None:
        done, body = step + 1, run.body
        if self.writer is None or not (done % self.every == 0 or done == run.config.steps):
            return
        assert body is not None
        lam = body.lam_at(step)
        with torch.no_grad():  # penalty: what training minimises; wiring_cost: with distances
            penalty = float(wiring_cost(run.graph, body.wiring_config(step)))
            cc = float(wiring_cost(run.graph, body.relocation_cost))
        lv = loss.item()
        self.writer.writerow(
            [
                done,
                lam,
                lv + lam * penalty,
                lv,
                penalty,
                cc,
                evaluate(run.task, run.model, run.data.x_test, run.data.y_test),
                structure.active_weights(run.graph, run.config.threshold)["fraction"],
                round(time.perf_counter() - run.t0, 3),
            ]
        )

    def flush(self) -> None:
        """Put every row so far on disk (before a checkpoint that covers them exists)."""
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = self.writer = None


class Checkpoints(Callback):
    """``checkpoint.safetensors/.json`` every ``every`` steps and at the end, at synchronised steps: model,
    optimizer, coordinates, every RNG state, the strategy's own tensors (atomic, the previous one kept).
    Rows and snapshots up to it are written first. DiLoCo replicas other than rank 0 save their own
    AdamW state beside it."""

    def __init__(self, every: int, metrics: Metrics | None = None, snapshots: Snapshots | None = None):
        self.every, self.metrics, self.snapshots = every, metrics, snapshots

    def on_step(self, run: Run, step: int, loss: torch.Tensor) -> None:
        done, strategy = step + 1, run.strategy
        due = strategy.due(done, self.every) or (done == run.config.steps and strategy.synced)
        if run.run_dir is None or not due:
            return
        if run.writes:
            self.save(run, done)
        elif strategy.replica_state:  # DiLoCo replicas keep their own AdamW moments: each saves them
            save_inner_state(run.run_dir, run.ctx.rank, run.model, run.opt, done)

    def save(self, run: Run, done: int) -> None:
        """Write the checkpoint after ``done`` steps."""
        assert run.run_dir is not None
        if self.metrics is not None:
            self.metrics.flush()  # rows up to this checkpoint are on disk before it exists
        if self.snapshots is not None:
            self.snapshots.save(run)  # pictures survive a kill too
        rng_meta, tensors = rng_state(run.batch_gen)
        tensors.update(run.strategy.state_tensors())
        save_checkpoint(
            run.run_dir / "checkpoint",
            run.model,
            run.opt,
            run.graph,
            step=done,
            extra={
                "rng": rng_meta,
                "seconds": round(time.perf_counter() - run.t0, 3),
                "world": run.ctx.world,
                "threads": run.threads,
                "config": run_config(run.config),
            },
            extra_tensors=tensors,
        )


class Progress(Callback):
    """The progress bar (rank 0, ``config.progress``)."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.bar: Any = None
        self.job: Any = None

    def on_begin(self, run: Run) -> None:
        config = run.config
        self.bar = self.stack.enter_context(progress_bar(config.progress and run.ctx.main))
        if self.bar:
            self.job = self.bar.add_task(f"{config.task} [{config.method}]", total=config.steps, completed=run.start)

    def on_step(self, run: Run, step: int, loss: torch.Tensor) -> None:
        if self.bar:
            self.bar.update(self.job, advance=1)

    def close(self) -> None:
        self.stack.close()


class SummaryFile(Callback):
    """``summary.json``, written (atomically) the moment training has finished."""

    def on_end(self, run: Run, summary: dict) -> None:
        if run.writes:
            assert run.run_dir is not None
            atomic_write_json(run.run_dir / "summary.json", summary)


class Drawings(Callback):
    """``connectivity.png`` and, with ``config.animation``, ``training.gif``/``.mp4`` from the snapshots, drawn
    after summary.json; ``render_seconds`` joins the summary. Ctrl-C here leaves a finished run (said)."""

    def on_end(self, run: Run, summary: dict) -> None:
        if not run.writes:
            return
        from topotorch import visualize

        run_dir, config = run.run_dir, run.config
        assert run_dir is not None
        t1 = time.perf_counter()
        try:
            visualize.draw_connectivity(
                run.graph,
                path=run_dir / "connectivity.png",
                threshold=0.0,
                title=f"{config.task} [{config.method}] step {config.steps}",
            )
            if config.animation:
                with progress_bar(config.progress) as bar:
                    job = bar.add_task("rendering training.gif/.mp4", total=None) if bar else None

                    def on_frame(done: int, total: int) -> None:
                        if bar is not None:
                            bar.update(job, completed=done, total=total)

                    visualize.render_animation(
                        run.graph,
                        run.snapshots,
                        gif_path=run_dir / "training.gif",
                        mp4_path=run_dir / "training.mp4",
                        max_frames=ANIMATION_FRAMES,
                        on_frame=on_frame,
                    )
        except KeyboardInterrupt:
            warnings.warn(
                f"interrupted while drawing: the run is finished and saved ({run_dir / 'summary.json'}); "
                f"its pictures are incomplete (`topotorch draw {run_dir}` redraws connectivity.png)",
                FallbackWarning,
                stacklevel=2,
            )
            raise
        summary["render_seconds"] = round(time.perf_counter() - t1, 3)
        atomic_write_json(run_dir / "summary.json", summary)


def standard_callbacks(run: Run, on_step: Callable | None = None, draw: bool = True) -> list[Callback]:
    """What ``topotorch train`` does around the steps, in order: the ``on_step`` hook, snapshots, metrics.csv,
    checkpoints, the progress bar, summary.json, and (``draw``) the pictures.
    Usage: ``callbacks = standard_callbacks(run, draw=False)``."""
    config = run.config
    snapshots = Snapshots(config.snapshot_every or max(1, config.steps // 100))
    metrics = Metrics(config.log_every)
    checkpoints = Checkpoints(config.checkpoint_every or max(1, config.steps // 10), metrics, snapshots)
    hook: list[Callback] = [Hook(on_step)] if on_step is not None else []
    return [*hook, snapshots, metrics, checkpoints, Progress(), SummaryFile(), *([Drawings()] if draw else [])]
