"""Command line: a thin layer over the library.

    topotorch tasks
    topotorch train independence --method bimt --out runs/ind
    topotorch draw runs/ind
    topotorch fff digits --leaf-width 8 --out runs/digits-fff

Bad input (unknown task or method, bad numbers, a missing or corrupt run folder) prints one
line naming the problem and exits with code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn

import typer
from typer.core import TyperGroup

from topotorch.config import FieldSpec, TrainConfig, describe, settings_of
from topotorch.runs import open_config, open_run
from topotorch.training_fff import FFFRecipe, FFFRunConfig


class _OneLineErrors(TyperGroup):
    """Every failure is one line on stderr (``error: ...``) and a non-zero exit, never a traceback.

    Usage errors (unknown option, a value of the wrong type) exit 2 like click's, but without the
    usage block; an unexpected exception exits 1 naming its type (``TOPOTORCH_DEBUG=1`` re-raises it).
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from typer import _click

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(2)
        except _click.exceptions.ClickException as e:
            msg = " ".join(e.format_message().split())
            typer.echo(f"error: {msg} (see --help)", err=True)
            sys.exit(e.exit_code if e.exit_code else 2)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            if os.environ.get("TOPOTORCH_DEBUG"):
                raise
            msg = " ".join(str(e).split()) or "(no message)"
            typer.echo(f"error: unexpected {type(e).__name__}: {msg} (TOPOTORCH_DEBUG=1 shows the traceback)", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Give neural networks a body in space.",
)


def _option_help(spec: FieldSpec) -> str:
    """A field's help text, with its allowed values where they are more than a type (choices, a range)."""
    if spec.choices is not None:
        return f"{spec.setting.help} [{' | '.join(spec.choices)}]"
    if spec.base in (int, float):
        return f"{spec.setting.help} [{describe(spec)}]"
    return spec.setting.help


def config_options(*classes: type, from_task: bool = False) -> Callable:
    """Decorator: one option per command-line field of the config dataclasses ``classes``, generated from
    their declarations (:func:`topotorch.config.settings_of`: name ``--top-k`` for ``top_k``, type, help,
    range); the command receives them as one dict ``settings`` by field name.

    ``from_task``: every option defaults to None (not given: the task's default, then the field's; bools
    become ``--x/--no-x`` with no default); otherwise the field's default, shown by ``--help``. Values are
    not checked here: the config's own validation names the field and its range.
    Usage: ``@app.command()`` over ``@config_options(TrainConfig, from_task=True)`` over ``def train(..., settings)``.
    """
    specs = [s for cls in classes for s in settings_of(cls) if s.setting.cli]

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != "settings"]
        taken = {p.name for p in params}
        for spec in specs:
            if spec.name in taken:
                raise TypeError(f"{fn.__name__}: option --{spec.name} is declared twice (command and config)")
            kind = spec.base if spec.base in (int, float, bool) else str  # choices and schedules: the config checks
            default = None if (from_task or spec.optional) else spec.default
            params.append(
                inspect.Parameter(
                    spec.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    annotation=kind | None if default is None else kind,
                    default=typer.Option(default, help=_option_help(spec)),
                )
            )
        names = [spec.name for spec in specs]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            settings = {n: kwargs.pop(n) for n in names}
            return fn(**kwargs, settings=settings)

        # typer reads the options from inspect.signature, which honours __signature__ (not declared on functions)
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def _fail(msg: str) -> NoReturn:
    typer.echo(f"error: {' '.join(str(msg).split())}", err=True)  # always one line
    raise typer.Exit(2)


@contextlib.contextmanager
def _warnings_to_stderr():
    """The one way every command reports what the library warned about (a corrupt checkpoint and the
    previous one used, an unreadable summary.json or metrics.csv, an old run moved aside...): one
    ``warning: ...`` line each on stderr, also when the command then fails. Never swallowed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield caught
        finally:
            _echo_warnings(caught)


@app.command()
def tasks() -> None:
    """List the registered tasks and their reference settings."""
    from topotorch.tasks import TASKS, get_task

    for name in sorted(TASKS):
        t = get_task(name)
        d = t.defaults
        typer.echo(f"{name:18s} {t.description}")
        typer.echo(
            f"{'':18s} steps={d.get('steps')} lr={d.get('lr')} l0={d.get('l0')} wf={d.get('wf')} "
            f"top_k={d.get('top_k')} swap_every={d.get('swap_every')} lam={d.get('lam')} dtype={d.get('dtype')}"
        )


@app.command()
@config_options(TrainConfig, from_task=True)
def train(
    task: str | None = typer.Argument(None, help="task name (see `topotorch tasks`); omit with --resume"),
    resume: Path | None = typer.Option(None, help="continue the run in this folder from its last checkpoint"),
    overwrite: bool = typer.Option(False, help="if --out already holds a run, move it aside to OUT.old-<time> first"),
    settings: dict | None = None,
) -> None:
    """Train TASK and write config, metrics.csv, checkpoint, summary.json, connectivity.png, animation.

    Under torchrun (``torchrun --nproc_per_node 2 -m topotorch train digits``) every process trains a share
    of the global batch (DistributedDataParallel); rank 0 writes the run folder.
    ``--resume RUN`` continues RUN from its last checkpoint with RUN's own config. An --out folder that
    already holds a run is refused unless ``--overwrite`` (the old run is moved aside, never mixed).
    """
    from topotorch.checkpoint import CheckpointError
    from topotorch.training import TrainingDiverged
    from topotorch.training import train as run_training

    given = {k: v for k, v in (settings or {}).items() if v is not None}
    runtime = {s.name for s in settings_of(TrainConfig) if s.setting.runtime}
    try:
        if resume is not None:
            if overwrite:
                _fail("--overwrite starts a new run; --resume continues one: give one of them")
            fixed = sorted(k.replace("_", "-") for k in given if k not in runtime or k == "out")
            if task is not None or fixed:
                _fail(
                    "--resume takes the run's own config; drop "
                    + ", ".join(([task] if task else []) + [f"--{g}" for g in fixed])
                )
            if not (resume / "config.json").is_file():
                _fail(f"{resume} is not a run folder (no config.json)")
            cfg = open_config(resume, kind="train")
            # runtime settings are this invocation's (not given: the field's default), re-validated
            fresh = {
                s.name: given.get(s.name, s.default)
                for s in settings_of(TrainConfig)
                if s.name in runtime and s.name != "out"
            }
            cfg = dataclasses.replace(cfg, **fresh, out=str(resume))
        else:
            if task is None:
                _fail("missing TASK (see `topotorch tasks`), or --resume RUN")
            name = f"{task}-{given.get('method', 'bimt')}-s{given.get('seed', 0)}"
            given.setdefault("out", str(Path("runs") / name))
            cfg = TrainConfig.for_task(task, **given)
    except (ValueError, TypeError, OSError) as e:
        _fail(str(e))
    with _warnings_to_stderr():
        try:
            result = run_training(cfg, resume=resume is not None, overwrite=overwrite if resume is None else None)
        except (TrainingDiverged, CheckpointError, ValueError, OSError) as e:
            _fail(str(e))
    task = cfg.task
    method = cfg.method
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 speaks for the job
        return
    s = result.summary
    m = f"test_{result.task.metric}"
    typer.echo(
        f"{task} [{method}] {m}={s[m]:.4g} thresholded={s['thresholded_' + m]:.4g} "
        f"wiring_cost={s['wiring_cost']:.4g} active_weights={s['active_weights']['active']}/"
        f"{s['active_weights']['total']} modules={s['n_modules']} ({s['train_seconds']:.1f}s)"
    )
    for i, mod in enumerate(s["modules"]):
        typer.echo(
            f"  module {i + 1}: inputs {mod['inputs'] or '-'} -> outputs {mod['outputs'] or '-'} "
            f"({mod['neurons']} neurons)"
        )
    typer.echo(f"run folder: {cfg.out}")


@app.command()
def draw(
    run: Path = typer.Argument(..., help="run folder written by `topotorch train`"),
    threshold: float = typer.Option(0.0, help="hide weights with |w| <= threshold"),
    out: Path | None = typer.Option(None, help="PNG path (default: RUN/connectivity.png)"),
) -> None:
    """Redraw the connectivity picture of a run from its checkpoint."""
    from topotorch.checkpoint import CheckpointError
    from topotorch.visualize import draw_connectivity

    if not (math.isfinite(threshold) and threshold >= 0):
        _fail(f"threshold must be >= 0 and finite, got {threshold}")
    with _warnings_to_stderr():  # e.g. "using the previous checkpoint": one line each
        try:
            r = open_run(run, kind="train")
        except (FileNotFoundError, ValueError, TypeError, CheckpointError) as e:
            _fail(str(e))
    path = out or run / "connectivity.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_connectivity(r.graph, path=path, threshold=threshold, title=f"{r.config.task} [{r.config.method}]")
    except (OSError, ValueError) as e:
        _fail(f"cannot write {path}: {e}")
    typer.echo(f"wrote {path}")


@app.command()
@config_options(FFFRunConfig, FFFRecipe)
def fff(
    task: str = typer.Argument(
        "digits", help="a classification task with vector inputs (digits, two-moons, mnist1d, ...)"
    ),
    overwrite: bool = typer.Option(False, help="if --out already holds a run, move it aside to OUT.old-<time> first"),
    settings: dict | None = None,
) -> None:
    """Train an FFF (or same-width FF) classifier.

    Writes summary.json, model.safetensors, leaves.md (and regions.png for 2-D inputs)."""
    from topotorch.training_fff import train_fff_run

    given = dict(settings or {})
    model = given["model"]
    run = {s.name: given.pop(s.name) for s in settings_of(FFFRunConfig) if s.name in given}
    run["out"] = run["out"] or str(Path("runs") / f"{task}-{model}")
    with _warnings_to_stderr():
        try:
            config = FFFRunConfig(task=task, recipe=FFFRecipe(**given), **run)
            result = train_fff_run(config, overwrite=overwrite)
        except (ValueError, ImportError, FloatingPointError, OSError) as e:
            _fail(str(e))
    s = result.summary
    line = f"{model} on {task}: test accuracy {100 * s['test_accuracy']:.1f}% (train {100 * s['train_accuracy']:.1f}%)"
    if model == "fff":
        line += (
            f", soft {100 * s['soft_test_accuracy']:.1f}%; {s['leaves_used']} of {2 ** s['depth']} leaves used, "
            f"{s['neurons_per_sample']} neurons per sample"
        )
    typer.echo(line)
    typer.echo(f"wrote {result.run_dir}")


@app.command()
def summary(run: Path = typer.Argument(..., help="run folder")) -> None:
    """Print a run's summary.json."""
    p = run / "summary.json"
    if not p.exists():
        _fail(f"{run} has no summary.json (not a finished run folder)")
    try:
        typer.echo(json.dumps(json.loads(p.read_text(encoding="utf-8")), indent=2))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        _fail(f"{p} is corrupt: {e}")


@app.command()
def report(
    run: Path = typer.Argument(..., help="a run folder, or a folder of runs (writes an index page comparing them)"),
    out: Path | None = typer.Option(None, help="HTML path for a single run (default: RUN/report.html)"),
    max_edges: int = typer.Option(5000, help="draw at most this many connections (the strongest by |w|)"),
    screenshot: Path | None = typer.Option(None, help="also save a PNG of the page (headless Chromium)"),
) -> None:
    """Write one self-contained offline HTML report of a run (graph, curves, animation, metrics, ablations,
    formula) plus graph.graphml / graph.json; for a folder of runs, every run's report and index.html."""
    from topotorch.checkpoint import CheckpointError
    from topotorch.report import build_index, build_report

    if max_edges < 1:
        _fail(f"max_edges must be >= 1, got {max_edges}")
    if not run.is_dir():
        _fail(f"{run} is not a folder")
    if (run / "config.json").exists() and out is not None and not out.parent.is_dir():
        _fail(f"cannot write {out}: folder {out.parent} does not exist")
    with _warnings_to_stderr():  # a fallback checkpoint, an unreadable metrics.csv: said here and on the page
        try:
            if (run / "config.json").exists():
                path = build_report(run, out=out, max_edges=max_edges)
            elif out is not None:
                _fail("--out applies to a single run folder, not a folder of runs")
            else:
                path = build_index(run, max_edges=max_edges)
        except (FileNotFoundError, ValueError, TypeError, CheckpointError) as e:
            _fail(str(e))
    typer.echo(f"wrote {path}")
    if screenshot is not None:
        from topotorch.browser import Browser

        try:
            with Browser() as b:
                page = b.open(path.resolve().as_uri())
                page.screenshot(screenshot)
        except (FileNotFoundError, RuntimeError, TimeoutError, ImportError) as e:
            _fail(f"screenshot failed: {e}")
        typer.echo(f"wrote {screenshot}" + (f" (page errors: {page.errors})" if page.errors else ""))


def _load_for_topo(run: Path):
    from topotorch.checkpoint import CheckpointError

    with _warnings_to_stderr():
        try:
            return open_run(run, kind="train")
        except (FileNotFoundError, ValueError, TypeError, CheckpointError) as e:
            _fail(str(e))


def _topo_pattern(r, layers: str | None) -> str:
    from topotorch.sheets import default_layers

    if layers:
        return layers
    return default_layers(r.model) if r.config.topo_layers == "auto" else r.config.topo_layers


def _echo_warnings(caught: list) -> None:
    """One ``warning: ...`` line on stderr per distinct UserWarning recorded (library deprecation noise left out)."""
    for msg in dict.fromkeys(" ".join(str(w.message).split()) for w in caught if issubclass(w.category, UserWarning)):
        typer.echo(f"warning: {msg}", err=True)


def _compress_compact(run: Path, threshold: float | None, choose: str, threads: int) -> None:
    from topotorch.checkpoint import CheckpointError
    from topotorch.compression.compact import FORMATS, Choice, CompactError
    from topotorch.experiments.compress import compress_run

    choices: tuple[Choice, ...] = ("auto", "dense", "block", "csr")
    picked = next((c for c in choices if c == choose), None)  # the typed Literal, or None
    if picked is None:
        _fail(f"unknown --choose {choose!r}; use auto, {', '.join(FORMATS)}")
    if threshold is not None and not threshold >= 0:
        _fail(f"threshold must be >= 0, got {threshold}")
    if threads < 1:
        _fail(f"threads must be >= 1, got {threads}")
    with _warnings_to_stderr():  # e.g. "checkpoint corrupt; using the previous checkpoint": never swallowed
        try:
            rep = compress_run(run, threshold=threshold, choose=picked, threads=threads)
        except (FileNotFoundError, ValueError, TypeError, CheckpointError, CompactError) as e:
            _fail(str(e))
    m = rep["metric"]
    typer.echo(
        f"{rep['task']} [{rep.get('method', '')}] threshold {rep['threshold']:g}, {rep['threads']} thread(s)"
        + (f", formats {','.join(rep['formats'])}, modules {len(rep.get('modules') or [])}" if "formats" in rep else "")
    )
    rows = [("parameters", rep["params_before"], rep["params_after"], rep["param_ratio"])]
    if "flops_before" in rep:
        rows.append(("FLOPs / sample", rep["flops_before"], rep["flops_after"], rep["flops_ratio"]))
    for b, v in rep["speed"].items():
        if b == "1":
            rows.append(
                ("latency batch 1 (µs)", v["dense_seconds"] * 1e6, v["compact_seconds"] * 1e6, v["throughput_ratio"])
            )
        else:
            rows.append(
                (f"samples/s batch {b}", v["dense_samples_per_s"], v["compact_samples_per_s"], v["throughput_ratio"])
            )
    typer.echo(f"{'figure':24s} {'dense':>12s} {'compact':>12s} {'ratio':>7s}")
    for name, a, b, ratio in rows:
        typer.echo(f"{name:24s} {a:12.5g} {b:12.5g} {ratio:6.2f}x")
    typer.echo(
        f"test {m}: dense {rep[f'test_{m}_dense']:.4g}, thresholded {rep[f'test_{m}_thresholded']:.4g}, "
        f"compact {rep[f'test_{m}_compact']:.4g}; max |compact - thresholded| = {rep['max_abs_diff']:.3g}"
        + (f" (float64: {rep['max_abs_diff_float64']:.3g})" if "max_abs_diff_float64" in rep else "")
    )
    typer.echo("(batch-1 latency measures framework overhead, not arithmetic)")
    typer.echo(f"wrote {run / 'compact'}/ (report.json)")


@app.command()
def compress(
    run: Path = typer.Argument(..., help="run folder written by `topotorch train`"),
    downsample: float | None = typer.Option(None, help="keep every φ-th unit: an (h//φ) x (w//φ) sheet"),
    removed: float | None = typer.Option(None, help="or: the fraction of each sheet's units to cut, e.g. 0.8"),
    layers: str | None = typer.Option(None, help="layer pattern (default: the run's topo_layers)"),
    mode: str = typer.Option("area", help="nearest | bilinear | area"),
    calibrate: bool = typer.Option(True, help="refit each reading layer by least squares on training inputs"),
    threshold: float | None = typer.Option(
        None,
        help="compact runtime (the default mode): weights with |w| <= T are dead (default: the run's config threshold)",
    ),
    choose: str = typer.Option("auto", help="compact storage per layer: auto (measured) | dense | block | csr"),
    threads: int = typer.Option(1, help="torch threads for the compact runtime's timings"),
) -> None:
    """Compact runtime (default, or --threshold T): dead neurons removed, modules split, storage measured per
    layer; writes RUN/compact/ (compact.safetensors + compact.json + report.json; load with
    topotorch.compression.compact.load_compact). Topographic mode (--downsample PHI | --removed F): cut a run's
    topographic layers down to a coarser sheet (compressed.safetensors + compressed.json)."""
    from topotorch.compression.topographic import compress as do_compress
    from topotorch.compression.topographic import parameter_count, save_compressed
    from topotorch.training import evaluate

    if threshold is not None and (downsample is not None or removed is not None):
        _fail(
            "--threshold (compact runtime) and --downsample/--removed (topographic downsampling) are mutually exclusive"
        )
    if downsample is None and removed is None:
        return _compress_compact(run, threshold, choose, threads)
    if downsample is not None and removed is not None:
        _fail("give exactly one of --downsample PHI or --removed FRACTION")
    modes: tuple[Literal["nearest", "bilinear", "area"], ...] = ("nearest", "bilinear", "area")
    resample = next((m for m in modes if m == mode), None)  # the typed Literal, or None
    if resample is None:
        _fail(f"unknown mode {mode!r}; use nearest, bilinear or area")
    r = _load_for_topo(run)
    try:
        pattern = _topo_pattern(r, layers)
        from topotorch.sheets import find_sheets, layer_tensor

        names = [s.name for s in find_sheets(r.model, pattern)]
        calib = r.data.x_train[:2048] if calibrate else None
        small = do_compress(r.model, names, factor=downsample, removed=removed, mode=resample, calibrate=calib)
    except (ValueError, TypeError) as e:
        _fail(str(e))
    m = f"test_{r.task.metric}"
    before = evaluate(r.task, r.model, r.data.x_test, r.data.y_test)
    after = evaluate(r.task, small, r.data.x_test, r.data.y_test)
    units = {
        n: [
            layer_tensor(r.model.get_submodule(n), "weight").shape[0],
            layer_tensor(small.get_submodule(n), "weight").shape[0],
        ]
        for n in names
    }
    spec = {
        "layers": names,
        "factor": downsample,
        "removed": removed,
        "mode": mode,
        "calibrated": calibrate,
        "params_before": parameter_count(r.model),
        "params_after": parameter_count(small),
        f"{m}_before": before,
        f"{m}_after": after,
        "units": units,
    }
    paths = save_compressed(run, small, spec)
    cut = ", ".join(f"{n}: {a}->{b}" for n, (a, b) in units.items())
    typer.echo(
        f"compressed {cut}; params {spec['params_before']} -> {spec['params_after']}; {m} {before:.4g} -> {after:.4g}"
    )
    typer.echo(f"wrote {paths[0]} and {paths[1].name}")


@app.command()
def maps(
    run: Path = typer.Argument(..., help="run folder written by `topotorch train`"),
    layers: str | None = typer.Option(None, help="layer pattern (default: the run's topo_layers)"),
    out: Path | None = typer.Option(None, help="folder for the PNGs and maps.json (default: RUN/maps)"),
    classes: int = typer.Option(10, help="at most this many classes (language models: the most frequent input tokens)"),
) -> None:
    """Selectivity maps (Welch t, class vs rest, on held-out inputs) on each layer's cortical sheet, with
    smoothness (1 - γ(1)/γ(∞)) and effective dimensionality (participation ratio): PNGs + maps.json."""
    from topotorch.analysis.maps import (
        draw_maps,
        effective_dimensionality,
        layer_activations,
        selectivity_maps,
        smoothness,
    )
    from topotorch.sheets import find_sheets

    if classes < 2:
        _fail(f"classes must be >= 2, got {classes}")
    r = _load_for_topo(run)
    x, y = r.data.x_test, r.data.y_test
    if y.is_floating_point():
        _fail(f"maps need class labels or token inputs; task {r.config.task!r} is a regression")
    labels = y if y.ndim == 1 else x.reshape(-1)  # sequences: one row per position, labelled by its input token
    vals, counts = labels.unique(return_counts=True)
    chosen = vals[counts.argsort(descending=True)][:classes].sort().values.tolist()
    try:
        sheets = find_sheets(r.model, _topo_pattern(r, layers))
    except ValueError as e:
        _fail(str(e))
    folder = out or run / "maps"
    result = {}
    for s in sheets:
        acts = layer_activations(r.model, s.name, x)
        if acts.shape[0] != labels.shape[0]:
            _fail(f"layer {s.name!r} gives {acts.shape[0]} activation rows for {labels.shape[0]} labels")
        t = selectivity_maps(acts, labels, chosen)
        names = r.task.output_labels if y.ndim == 1 and r.task.output_labels else None
        titles = [names[c] if names and c < len(names) else str(c) for c in chosen]
        sm, ed = smoothness(t, s.h, s.w), effective_dimensionality(acts)
        png = draw_maps(
            t,
            s.h,
            s.w,
            folder / f"{s.name}.png",
            titles=titles,
            suptitle=f"{r.config.task} {s.name} ({s.h}x{s.w}): smoothness {sm:.2f}, eff. dim {ed:.1f}",
        )
        result[s.name] = {"sheet": [s.h, s.w], "smoothness": sm, "effective_dim": ed, "png": str(png)}
        typer.echo(f"{s.name}: {s.h}x{s.w} sheet, smoothness {sm:.3f}, effective dim {ed:.2f} -> {png}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "maps.json").write_text(json.dumps({"classes": chosen, "layers": result}, indent=2))
    typer.echo(f"wrote {folder / 'maps.json'}")


@app.command()
def localize(
    run: Path = typer.Argument(..., help="run folder of a character-level task (shakespeare-char, text:PATH)"),
    target: list[Path] = typer.Option(..., help="text file(s) of the concept (repeatable)"),
    other: list[Path] = typer.Option(..., help="text file(s) to contrast with (repeatable)"),
    layer: str | None = typer.Option(None, help="layer name (default: the first of the run's topo layers)"),
    threshold: float | None = typer.Option(None, help="t above which a unit responds (default: half the peak, >= 2)"),
    out: Path | None = typer.Option(None, help="JSON + PNG path stem (default: RUN/localize)"),
) -> None:
    """Find the contiguous sheet region that responds more to the TARGET texts than to the OTHER texts,
    ablate it, and report bits/char on both sets (intact, region ablated, random same-size control)."""
    import torch

    from topotorch.analysis.localize import char_vocab, text_windows
    from topotorch.analysis.localize import localize as do_localize
    from topotorch.analysis.maps import draw_maps
    from topotorch.sheets import find_sheets
    from topotorch.tasks.sequence import bits_per_char

    r = _load_for_topo(run)
    try:
        vocab = char_vocab(r.config.task)
        names = [s.name for s in find_sheets(r.model, layer or _topo_pattern(r, None))]
        block = next(m for m in r.model.modules() if hasattr(m, "block_size")).block_size
        sets = []
        for files in (target, other):
            text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
            x, y, dropped = text_windows(text, vocab, block)
            if dropped:
                typer.echo(f"warning: dropped {dropped} characters outside the model's vocabulary", err=True)
            sets.append((x, y))
    except (ValueError, OSError, StopIteration) as e:
        _fail(str(e) or "the model has no block size")
    (xt, yt), (xo, yo) = sets
    ys = {id(xt): yt, id(xo): yo}
    res = do_localize(
        r.model, names[0], xt, xo, metric=lambda m, x: bits_per_char(m, x, ys[id(x)]), threshold=threshold
    )
    stem = out or run / "localize"
    stem.parent.mkdir(parents=True, exist_ok=True)
    h, w = res["sheet"]
    draw_maps(
        torch.tensor(res["t_map"]),
        h,
        w,
        stem.with_suffix(".png"),
        titles=["target vs other"],
        suptitle=f"{names[0]}: region of {len(res['region_units'])} units",
    )
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2))
    typer.echo(
        f"{names[0]} ({h}x{w}): region of {len(res['region_units'])} units, mean t "
        f"{res['t_region_mean'] if res['t_region_mean'] is None else round(res['t_region_mean'], 2)}"
    )
    for k in ("target", "other"):
        v = res[k]
        typer.echo(
            f"  {k}: bits/char {v['intact']:.4f} -> region ablated {v['region_ablated']:.4f} "
            f"(random same-size {v['random_ablated']:.4f})"
        )
    typer.echo(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png').name}")


@app.command("sweep-sparsity")
def sweep_sparsity(
    task: str = typer.Argument(..., help="task name (see `topotorch tasks`), e.g. digits or mnist1d"),
    methods: str = typer.Option(
        "bimt,l1,imp,random,soup,magnitude",
        help="comma-separated: magnitude, layerwise, random, bimt, l1, imp, imp-ft, soup, nm24",
    ),
    sparsities: str = typer.Option(
        "0.5,0.8,0.9,0.95,0.98", help="increasing fractions of weights removed, each in (0, 1)"
    ),
    seeds: str = typer.Option("0,1,2", help="comma-separated seeds (the tables give medians)"),
    out: Path | None = typer.Option(None, help="output folder (default: runs/sparsity-TASK)"),
    dense_steps: int | None = typer.Option(None, help="T: training steps before pruning (default: the task's)"),
    cycle_steps: int = typer.Option(
        1000, help="R: steps per prune-retrain cycle; one-shot methods fine-tune i*R at level i"
    ),
    soup_size: int = typer.Option(3, help="m: models averaged per soup cycle"),
    rewind: float = typer.Option(0.05, help="IMP rewinds to step k = REWIND * T"),
    lr: float | None = typer.Option(None, help="fine-tune learning rate (default: the task's)"),
    batch_size: int | None = typer.Option(None, help="fine-tune batch (default: the task's, 128 for full-batch tasks)"),
    lam: str | None = typer.Option(
        None, help="λ schedule for the bimt/l1 training, e.g. 0:0.01,2000:0.1 (default: the task's)"
    ),
    threads: int | None = typer.Option(None, help="torch threads (default: torch's choice)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Accuracy vs sparsity of BIMT, L1 and the pruning baselines (IMP with rewinding, sparse model soups,
    random, magnitude): writes sweep.csv, table.md (medians of the seeds), sweep.png and summary.json."""
    from topotorch.experiments.sweep import SweepConfig, parse_methods, parse_seeds, parse_sparsities, run_sweep

    if threads is not None:
        if threads < 1:
            _fail(f"threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    folder = out or Path("runs") / f"sparsity-{task}"
    try:
        cfg = SweepConfig(
            task,
            methods=parse_methods(methods),
            sparsities=parse_sparsities(sparsities),
            seeds=parse_seeds(seeds),
            out=str(folder),
            dense_steps=dense_steps,
            cycle_steps=cycle_steps,
            soup_size=soup_size,
            rewind_fraction=rewind,
            lr=lr,
            batch_size=batch_size,
            lam=lam,
            progress=progress,
        )
    except (ValueError, TypeError) as e:
        _fail(str(e))
    with _warnings_to_stderr():
        try:
            run_sweep(cfg)
        except (ValueError, ImportError, OSError, FloatingPointError) as e:
            _fail(str(e))
    summary = json.loads((folder / "summary.json").read_text())
    for s, winners in summary["winners"].items():
        med = summary["median_accuracy"]
        typer.echo(f"{100 * float(s):g}%: best {', '.join(winners)} ({100 * med[winners[0]][s]:.1f}%)")
    typer.echo(f"wrote {folder}/sweep.csv, table.md, sweep.png, summary.json ({summary['seconds'] / 60:.1f} min)")


from topotorch.sae.cli import sae as _sae_command  # noqa: E402  (`topotorch sae`: topotorch/sae/cli.py)

app.command("sae")(_sae_command)


def main() -> None:
    """Entry point; usage errors from click exit with code 2 too."""
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
