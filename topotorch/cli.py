"""Command line: a thin layer over the library.

    topotorch tasks
    topotorch train independence --method bimt --out runs/ind
    topotorch draw runs/ind

Bad input (unknown task or method, bad numbers, a missing or corrupt run folder) prints one
line naming the problem and exits with code 2.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False, help="Give neural networks a body in space.")



def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def tasks() -> None:
    """List the registered tasks and their reference settings."""
    from .tasks import TASKS, get_task

    for name in sorted(TASKS):
        t = get_task(name)
        d = t.defaults
        typer.echo(f"{name:18s} {t.description}")
        typer.echo(f"{'':18s} steps={d.get('steps')} lr={d.get('lr')} l0={d.get('l0')} wf={d.get('wf')} "
                   f"top_k={d.get('top_k')} swap_every={d.get('swap_every')} lam={d.get('lam')} dtype={d.get('dtype')}")


@app.command()
def train(
    task: str = typer.Argument(..., help="task name (see `topotorch tasks`)"),
    method: str = typer.Option("bimt", help="none | l1 | local | swap | bimt"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: the task's)"),
    seed: int = typer.Option(0, help="random seed"),
    dtype: Optional[str] = typer.Option(None, help="float32 | float64 (default: the task's)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default: runs/TASK-METHOD-sSEED)"),
    lr: Optional[float] = typer.Option(None, help="learning rate"),
    lam: Optional[str] = typer.Option(None, help="λ schedule as step:value phases, e.g. 0:1e-3,5000:1e-2"),
    wf: Optional[float] = typer.Option(None, help="weight of distance in the wiring cost (0: plain L1)"),
    l0: Optional[float] = typer.Option(None, help="layer-to-layer gap added to every connection's length"),
    relocation: Optional[str] = typer.Option(None, help="swap (the paper's greedy swaps) | assign (exact, per layer)"),
    top_k: Optional[int] = typer.Option(None, help="neurons tried per layer per relocation"),
    swap_every: Optional[int] = typer.Option(None, help="relocate every n steps"),
    threshold: Optional[float] = typer.Option(None, help="|w| above which a weight counts as active"),
    batch_size: Optional[int] = typer.Option(None, help="mini-batch size (default: full batch)"),
    animation: bool = typer.Option(True, help="render training.gif / training.mp4"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Train TASK and write config, metrics.csv, checkpoint, connectivity.png, animation, summary.json."""
    from .training import TrainConfig, TrainingDiverged
    from .training import train as run_training

    try:
        cfg = TrainConfig.for_task(
            task, method=method, steps=steps, seed=seed, dtype=dtype, lr=lr, lam=lam, wf=wf, l0=l0, relocation=relocation,
            top_k=top_k, swap_every=swap_every, threshold=threshold, batch_size=batch_size,
            animation=animation, progress=progress,
            out=str(out if out is not None else Path("runs") / f"{task}-{method}-s{seed}"),
        )
    except (ValueError, TypeError) as e:
        _fail(str(e))
    try:
        result = run_training(cfg)
    except TrainingDiverged as e:
        _fail(str(e))
    s = result.summary
    m = f"test_{result.task.metric}"
    typer.echo(f"{task} [{method}] {m}={s[m]:.4g} thresholded={s['thresholded_' + m]:.4g} "
               f"wiring_cost={s['wiring_cost']:.4g} active_weights={s['active_weights']['active']}/"
               f"{s['active_weights']['total']} modules={s['n_modules']} ({s['train_seconds']:.1f}s)")
    for i, mod in enumerate(s["modules"]):
        typer.echo(f"  module {i + 1}: inputs {mod['inputs'] or '-'} -> outputs {mod['outputs'] or '-'} ({mod['neurons']} neurons)")
    typer.echo(f"run folder: {cfg.out}")


@app.command()
def draw(
    run: Path = typer.Argument(..., help="run folder written by `topotorch train`"),
    threshold: float = typer.Option(0.0, help="hide weights with |w| <= threshold"),
    out: Optional[Path] = typer.Option(None, help="PNG path (default: RUN/connectivity.png)"),
) -> None:
    """Redraw the connectivity picture of a run from its checkpoint."""
    from .checkpoint import CheckpointError
    from .training import load_run
    from .visualize import draw_connectivity

    if threshold < 0:
        _fail(f"threshold must be >= 0, got {threshold}")
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. "using the previous checkpoint": one line each
            warnings.simplefilter("always")
            r = load_run(run)
    except (FileNotFoundError, ValueError, TypeError, CheckpointError) as e:
        _fail(str(e))
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
    path = out or run / "connectivity.png"
    draw_connectivity(r.graph, path=path, threshold=threshold, title=f"{r.config.task} [{r.config.method}]")
    typer.echo(f"wrote {path}")


@app.command()
def summary(run: Path = typer.Argument(..., help="run folder")) -> None:
    """Print a run's summary.json."""
    p = run / "summary.json"
    if not p.exists():
        _fail(f"{run} has no summary.json (not a finished run folder)")
    try:
        typer.echo(json.dumps(json.loads(p.read_text()), indent=2))
    except json.JSONDecodeError as e:
        _fail(f"{p} is corrupt: {e}")


def main() -> None:
    """Entry point; usage errors from click exit with code 2 too."""
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
