"""``topotorch sae``: train a sparse dictionary on any model's activations, evaluate it, write a run folder.

    topotorch sae runs/shakespeare --hook "gpt.blocks.1" --latents 2048 --k 16 --steps 2000
    topotorch sae hf:gpt2 --model-config n_layer=2,n_embd=64,n_head=4 --data shakespeare-char \\
        --hook "hf.transformer.h.0.mlp" --transcoder --latents 512 --k 8 --export saelens,sparsify
    topotorch sae runs/hf/plain --hook hf.transformer.h.1 --latents 1024 --k 16 --relocate --tau 0.003

RUN_OR_MODEL is a ``topotorch train`` run folder (its trained model and its task's data) or a model
spec as ``--model`` takes it (``hf:NAME``, ``package.module:function``; random weights) fed with the
token windows of ``--data`` (default: the run's task, else shakespeare-char).

The run folder holds ``config.json`` (what was asked), ``summary.json`` (the evaluation table on the
task's held-out windows: FVU, explained variance, L0, dead/dense latents, cosine, relative
reconstruction bias, and the spliced-in CE-loss recovered and KL), ``metrics.csv`` (training curve),
``sae/`` (:meth:`SparseCoder.save`), ``top_examples.json`` (the contexts that activate each shown
latent most), ``sheet.png`` (the latent sheet coloured by the token that drives each latent) and any
``--export`` copies (``saelens/``, ``sparsify/``). ``topotorch report RUN`` renders it.

**Topographic SAE** (:mod:`topotorch.sae.topographic`). Latent i sits at row i // w, column i % w of
an h×w sheet (``--sheet HxW``; default the divisor rule, 2048 -> 32x64). A permutation of latents
changes nothing a sparse coder computes, so "where a latent is" is free to choose: ``--relocate``
moves the trained coder's latents so that those which fire together and point alike sit side by
side (a quadratic assignment on co-activation and decoder |cos| over training tokens; the output is
unchanged, which the run checks in float64 and records). ``--tau`` adds τ·TopoLoss on the decoder
sheet while training (smooth neighbouring directions, at some reconstruction cost); with both, the
latents are also relocated at a quarter of the run, so the loss smooths an ordered sheet rather
than a random one. Any of the three adds ``summary["topographic"]``: the neighbour / shuffled
ratios of decoder |cos| and co-activation on the held-out tokens (1 for a random sheet), before
and after the relocation.

The work is :func:`run_sae` (a plain function; the command only parses and reports errors).
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer

RUN_KIND = "topotorch.sae.run/1"


@dataclass
class SAERunConfig:
    """What ``topotorch sae`` was asked to do (``config.json`` of the run folder)."""

    source: str
    hook: str
    latents: int
    k: int = 32
    architecture: str = "topk"
    transcoder: bool = False
    skip: bool = False
    steps: int = 2000
    batch_size: int = 4096
    lr: float | None = None
    seed: int = 0
    data: str | None = None
    model_config: str | None = None
    skip_first: int = 0
    eval_windows: int = 128
    show_latents: int = 32
    examples: int = 8
    cache: str | None = None
    export: list[str] = field(default_factory=list)
    sheet: str | None = None
    tau: float = 0.0
    relocate: bool = False
    kind: str = RUN_KIND

    @property
    def topographic(self) -> bool:
        """Whether the run places its latents on a sheet (any of --sheet, --tau, --relocate)."""
        return self.sheet is not None or self.tau > 0 or self.relocate


# the relocation's inputs (as benchmarks/sae_quality.py measured them): training tokens it reads, weight of
# co-activation beside decoder |cos| in the similarity, and when a TopoLoss run relocates mid-run
RELOCATE_TOKENS = 16384
COACTIVATION = 0.1
MID_RUN = 0.25


@dataclass
class _Source:
    model: Any
    task: Any
    x_train: Any
    x_test: Any
    y_test: Any
    labels: list[str] | None
    name: str


def load_source(source: str, data: str | None = None, model_config: str | None = None, seed: int = 0) -> _Source:
    """The model and token windows behind RUN_OR_MODEL (see the module docstring)."""
    import torch

    from topotorch.tasks import get_task

    path = Path(source)
    if path.is_dir():
        from topotorch.training import load_run

        r = load_run(path)
        task, d = (get_task(data), None) if data else (r.task, r.data)
        if d is None:
            d = task.make_data(seed, torch.float32)
        model, name = r.model, f"{r.config.task} run {path.name}"
    elif source.startswith("hf:") or ":" in source:
        from topotorch.user_models import build_user_model

        task = get_task(data or "shakespeare-char")
        d = task.make_data(seed, torch.float32)
        tokens = not d.x_train.is_floating_point() and d.x_train.ndim == 2
        vocab = len(task.output_labels) if tokens and task.output_labels else None
        torch.manual_seed(seed)
        model = build_user_model(source, model_config, vocab=vocab, block=d.x_train.shape[1] if tokens else None)
        name = f"{source} on {task.name}"
    else:
        raise ValueError(f"{source!r} is neither a run folder nor a model spec (hf:NAME or package.module:function)")
    if d.x_train.is_floating_point() or d.x_train.ndim != 2:
        raise ValueError(
            f"task {task.name} has no token windows; topotorch sae evaluates language models (e.g. text:FILE)"
        )
    return _Source(model.eval(), task, d.x_train, d.x_test, d.y_test, task.output_labels, name)


def _batches(x: Any, rows: int, seed: int | None) -> list:
    """Windows of ``x`` in batches of ``rows`` (shuffled with ``seed``; None keeps the order)."""
    import torch

    if seed is not None:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]
    return [x[i : i + rows] for i in range(0, len(x), rows)]


def _write_metrics(path: Path, hist: dict) -> None:
    from topotorch.checkpoint import atomic_write_bytes

    keys = ("step", "tokens", "fvu", "l0", "dead", "aux", "loss", "lr")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(keys)
    for row in zip(*(hist[k] for k in keys)):
        w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    atomic_write_bytes(path, buf.getvalue().encode())


def top_examples(
    sae: Any,
    acts: Any,
    windows: Any,
    labels: list[str] | None,
    latents: list[int],
    per_latent: int = 8,
    context: int = 24,
    skip_first: int = 0,
) -> list[dict]:
    """For each of ``latents``: the ``per_latent`` positions of ``windows`` [W, T] that activate it most
    (value, window, position, the text up to it and the token), from ``acts`` (rows in window order,
    ``skip_first`` positions dropped per window). A running top-k over row chunks: no [rows, n] matrix."""
    import torch

    T = windows.shape[1]
    kept = T - skip_first
    lat = torch.as_tensor(latents, dtype=torch.long)
    best_v: Any = None
    best_i: Any = None
    offset = 0
    for x in acts:
        x = x[0] if isinstance(x, tuple) else x
        with torch.no_grad():
            z = sae.encode(x.to(sae.W_enc.dtype))[:, lat]
        idx = torch.arange(offset, offset + len(x)).unsqueeze(1).expand_as(z)
        offset += len(x)
        v, i = (z, idx) if best_v is None else (torch.cat([best_v, z]), torch.cat([best_i, idx]))
        top = v.topk(min(per_latent, len(v)), dim=0)
        best_v, best_i = top.values, i.gather(0, top.indices)
    if best_v is None:
        return []

    def text(ids: Any) -> str:
        return "".join(labels[t] if labels and t < len(labels) else f"<{t}>" for t in ids.tolist())

    out = []
    for j, latent in enumerate(latents):
        rows = []
        for v, r in zip(best_v[:, j].tolist(), best_i[:, j].tolist()):
            if v <= 0:
                continue
            w, p = divmod(r, kept)
            p += skip_first
            rows.append(
                {
                    "act": v,
                    "window": w,
                    "pos": p,
                    "context": text(windows[w, max(0, p - context) : p]),
                    "token": text(windows[w, p : p + 1]),
                }
            )
        out.append({"latent": latent, "examples": rows})
    return out


def run_sae(cfg: SAERunConfig, out: Path, progress: bool = False, overwrite: bool = False) -> dict:
    """Train, evaluate and write an SAE run folder (see the module docstring); returns the summary.
    Usage: ``run_sae(SAERunConfig("runs/x", "gpt.blocks.1", latents=512, k=8, steps=500), Path("runs/x-sae"))``."""
    import torch

    from topotorch.checkpoint import atomic_write_json, prepare_run_folder
    from topotorch.sae.activations import CachedActivations, ModelActivations, find_hook_points, write_cache
    from topotorch.sae.dictionary import ARCHITECTURES, SAEConfig
    from topotorch.sae.interop import export
    from topotorch.sae.metrics import evaluate_sae
    from topotorch.sae.splice import splice_eval
    from topotorch.sae.train import train_sae

    t0 = time.perf_counter()
    sheet = topographic_sheet(cfg)  # a bad --sheet or --tau fails before anything is loaded or written
    src = load_source(cfg.source, cfg.data, cfg.model_config, cfg.seed)
    find_hook_points(src.model, cfg.hook)  # a bad pattern fails before anything is written
    T = src.x_train.shape[1]
    rows = max(1, math.ceil(cfg.batch_size / max(1, T - cfg.skip_first)))  # windows per model batch
    opts: dict[str, Any] = dict(
        hook=cfg.hook, transcoder=cfg.transcoder, skip_first=cfg.skip_first, dtype=torch.float32
    )
    train_acts: ModelActivations | CachedActivations = ModelActivations(
        src.model, _batches(src.x_train, rows, cfg.seed), batch_size=cfg.batch_size, **opts
    )
    prepare_run_folder(out, overwrite, resume_hint=False)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", asdict(cfg))
    if cfg.cache:  # through a resumable disk cache: as many rows as the steps need, then read shuffled
        write_cache(
            ModelActivations(src.model, _batches(src.x_train, rows, cfg.seed), **opts),
            cfg.cache,
            max_rows=cfg.steps * cfg.batch_size,
        )
        train_acts = CachedActivations(cfg.cache, cfg.batch_size, seed=cfg.seed, epochs=10**9, drop_last=True)
    d_in, d_out = train_acts.d_in, train_acts.d_out
    sae_cfg = SAEConfig(
        d_in=d_in,
        n_latents=cfg.latents,
        architecture=cfg.architecture,
        k=cfg.k,
        d_out=d_out if cfg.transcoder else None,
        skip=cfg.skip,
        # --k is the L0 for every architecture: TopK/BatchTopK keep k, JumpReLU/ReLU steer their L0 to it
        target_l0=None if ARCHITECTURES[cfg.architecture].uses_k else float(cfg.k),
    )
    t1 = time.perf_counter()
    log_every = max(1, cfg.steps // 100)
    if sheet is None:
        sae, hist = train_sae(
            sae_cfg, train_acts, cfg.steps, cfg.lr, seed=cfg.seed, progress=progress, log_every=log_every
        )
    else:  # τ = 0 and no mid-run move is train_sae exactly; the final relocation is done below, checked
        from topotorch.sae.topographic import train_topographic

        sae, hist = train_topographic(
            sae_cfg,
            train_acts,
            cfg.steps,
            sheet,
            tau=cfg.tau,
            relocate_at=(MID_RUN,) if cfg.relocate and cfg.tau > 0 else (),
            relocate_tokens=RELOCATE_TOKENS,
            coactivation=COACTIVATION,
            final_relocation=False,
            lr=cfg.lr,
            seed=cfg.seed,
            progress=progress,
            log_every=log_every,
        )
    train_s = time.perf_counter() - t1
    sae.eval()
    x_test, y_test = src.x_test[: cfg.eval_windows], src.y_test[: cfg.eval_windows]
    test_batches = _batches(x_test, rows, None)

    test_acts = list(ModelActivations(src.model, test_batches, batch_size=cfg.batch_size, **opts))  # small: in memory
    topo = None if sheet is None else topographic_step(sae, sheet, cfg, train_acts, test_acts, hist)
    table = evaluate_sae(sae, test_acts)
    freq = table.pop("freq")
    pairs = [(x_test[i : i + rows], y_test[i : i + rows]) for i in range(0, len(x_test), rows)]
    table.update(splice_eval(src.model, sae, pairs, cfg.hook, transcoder=cfg.transcoder))
    shown = [i for i, f in enumerate(freq) if f > 0][: cfg.show_latents]
    examples = top_examples(sae, test_acts, x_test, src.labels, shown, cfg.examples, skip_first=cfg.skip_first)
    sae.save(out / "sae")
    for fmt in cfg.export:
        export(sae, out / fmt, fmt, hook_name=cfg.hook, model_name=src.name)
    _write_metrics(out / "metrics.csv", hist)
    atomic_write_json(out / "top_examples.json", {"latents": examples, "freq": freq})
    drawn = _draw_sheet(sae, test_acts, x_test, src.labels, cfg, out / "sheet.png")
    summary = {
        "kind": RUN_KIND,
        "source": src.name,
        "hook": cfg.hook,
        "sae": sae_cfg.to_dict(),
        "eval": table,
        "train": {
            "steps": hist["steps_done"],
            "tokens": hist["tokens"][-1] if hist["tokens"] else 0,
            "seconds": round(train_s, 3),
            "fvu_final": hist["fvu"][-1] if hist["fvu"] else None,
            "dead_final": hist["dead_final"],
        },
        "files": sorted(["sae", "metrics.csv", "top_examples.json", *cfg.export, *(["sheet.png"] * drawn)]),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if topo is not None:
        summary["topographic"] = topo
    atomic_write_json(out / "summary.json", summary)
    return summary


def topographic_sheet(cfg: SAERunConfig) -> Any:
    """The run's :class:`LatentSheet` (None when the run is not topographic); a clear ``ValueError`` for a
    --sheet that does not hold --latents, or a bad --tau. Usage: ``topographic_sheet(cfg)``."""
    if not (isinstance(cfg.tau, (int, float)) and math.isfinite(cfg.tau) and cfg.tau >= 0):
        raise ValueError(f"--tau must be a finite number >= 0, got {cfg.tau!r}")
    if not cfg.topographic:
        return None
    from topotorch.sae.topographic import LatentSheet

    try:
        return LatentSheet.of(cfg.latents, cfg.sheet)
    except ValueError as e:
        raise ValueError(f"--sheet: {e}") from None


def _first_rows(acts: Any, n: int) -> Any:
    """The first ``n`` input rows of an activation source (pairs give their input), concatenated."""
    import torch

    got, have = [], 0
    for a in acts:
        x = a[0] if isinstance(a, tuple) else a
        got.append(x[: n - have])
        have += len(got[-1])
        if have >= n:
            break
    return torch.cat(got)


def output_change(before: Any, after: Any, batches: list) -> float:
    """max |after(x) − before(x)| over ``batches`` with both coders in float64: 0 up to rounding for a
    permutation of latents (float32 would add TopK's exact ties, which ``topk`` breaks by position).
    Usage: ``output_change(copy_before, sae, test_acts)``."""
    import copy

    import torch

    b64, a64 = copy.deepcopy(before).double(), copy.deepcopy(after).double()
    worst = 0.0
    with torch.no_grad():
        for a in batches:
            x = (a[0] if isinstance(a, tuple) else a).double()
            worst = max(worst, float((a64(x) - b64(x)).abs().max()))
    return worst


def topographic_step(sae: Any, sheet: Any, cfg: SAERunConfig, train_acts: Any, test_acts: list, hist: dict) -> dict:
    """``--relocate`` (in place, on RELOCATE_TOKENS training tokens) and the neighbour measures on the held-out
    ``test_acts`` before and after it: the ``summary["topographic"]`` block.
    Usage: ``topo = topographic_step(sae, LatentSheet.of(512), cfg, train_acts, test_acts, hist)``."""
    import copy

    import torch

    from topotorch.sae.topographic import relocate, topographic_measures

    def measures() -> dict:
        with torch.no_grad():
            z = torch.cat([sae.encode((a[0] if isinstance(a, tuple) else a).to(sae.W_enc.dtype)) for a in test_acts])
        out = {k: v.to_dict() for k, v in topographic_measures(sae.W_dec, z, sheet).items()}
        # strict JSON: a ratio over a baseline <= 0 (Pearson's, whose all-pairs mean is ~0) is null, not NaN
        return {
            k: {f: None if isinstance(v, float) and not math.isfinite(v) else v for f, v in m.items()}
            for k, m in out.items()
        }

    topo: dict[str, Any] = {
        "sheet": [sheet.h, sheet.w],
        "tau": cfg.tau,
        "relocated": cfg.relocate,
        "mid_run_relocations": hist.get("relocations", []),
    }
    if cfg.relocate:
        topo["before_relocation"] = measures()
        before = copy.deepcopy(sae)
        t = time.perf_counter()
        with torch.no_grad():
            z = sae.encode(_first_rows(train_acts, RELOCATE_TOKENS).to(sae.W_enc.dtype))
        st = relocate(sae, z, sheet, COACTIVATION)
        topo["relocation"] = {
            "tokens": len(z),
            "coactivation_weight": COACTIVATION,
            "adjacency_before": round(st.before, 6),
            "adjacency_after": round(st.after, 6),
            "swaps": st.swaps,
            "seconds": round(time.perf_counter() - t, 3),
            "output_change_float64": output_change(before, sae, test_acts),
        }
    topo["measures"] = measures()
    return topo


def _draw_sheet(sae: Any, acts: Any, windows: Any, labels: list[str] | None, cfg: SAERunConfig, path: Path) -> bool:
    """The latent sheet coloured by the token that drives each latent, if the topographic module is there."""
    try:
        from topotorch.sae.topographic import LatentSheet, draw_latent_sheet, latent_labels
    except ImportError:
        return False
    import torch

    try:
        sheet = LatentSheet.of(cfg.latents, cfg.sheet)
    except ValueError:
        return False
    with torch.no_grad():
        z = torch.cat([sae.encode((a[0] if isinstance(a, tuple) else a).to(sae.W_enc.dtype)) for a in acts])
    tokens = windows[:, cfg.skip_first :].reshape(-1)
    top, purity = latent_labels(z, tokens, len(labels) if labels else None)
    draw_latent_sheet(
        top,
        purity,
        sheet,
        path,
        names=labels,
        title=f"{cfg.hook}: {cfg.latents} latents on a {sheet.h}x{sheet.w} sheet"
        f"{' (relocated)' if cfg.relocate else ''}, coloured by the token that activates each most",
    )
    return True


def _fail(msg: str) -> None:
    typer.echo(f"error: {' '.join(str(msg).split())}", err=True)
    raise typer.Exit(2)


def sae(
    source: str = typer.Argument(..., help="a `topotorch train` run folder, or a model: hf:NAME | pkg.module:function"),
    hook: str = typer.Option(..., help="hook point: module name pattern (fnmatch over named_modules); NAME:input"),
    latents: int = typer.Option(..., help="number of latents (dictionary size)"),
    k: int = typer.Option(32, help="active latents per token (topk, batchtopk; the target L0 of jumprelu, relu)"),
    architecture: str = typer.Option("topk", help="topk | batchtopk | jumprelu | relu"),
    transcoder: bool = typer.Option(False, help="predict the hook module's output from its input (a transcoder)"),
    skip: bool = typer.Option(False, help="transcoder with a linear skip path"),
    steps: int = typer.Option(2000, help="training steps"),
    batch_size: int = typer.Option(4096, help="activation rows (tokens) per step"),
    lr: float | None = typer.Option(None, help="learning rate (default: 2e-4 / sqrt(latents / 2^14))"),
    seed: int = typer.Option(0, help="random seed"),
    data: str | None = typer.Option(
        None, help="task whose windows feed the model (default: the run's, or shakespeare-char)"
    ),
    model_config: str | None = typer.Option(None, help="K=V,... for a model spec, e.g. n_layer=2,n_embd=64,n_head=4"),
    skip_first: int = typer.Option(0, help="drop the first n positions of every window (a BOS token)"),
    eval_windows: int = typer.Option(128, help="held-out windows for the evaluation table"),
    show_latents: int = typer.Option(32, help="latents with top-activating examples in the report"),
    cache: Path | None = typer.Option(None, help="activation cache folder (written once, resumable; read shuffled)"),
    export: str = typer.Option("", help="also write these formats: saelens,sparsify"),
    sheet: str | None = typer.Option(
        None, help="topographic: the latents' HxW sheet, h*w = --latents (default: the divisor rule, 2048 -> 32x64)"
    ),
    relocate: bool = typer.Option(
        False, help="topographic: move the trained latents so similar ones are neighbours (output unchanged)"
    ),
    tau: float = typer.Option(0.0, help="topographic: weight of TopoLoss on the decoder sheet while training"),
    out: Path | None = typer.Option(None, help="run folder (default: runs/sae-HOOK-ARCH-LATENTS)"),
    overwrite: bool = typer.Option(False, help="if --out already holds a run, move it aside to OUT.old-<time> first"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    threads: int | None = typer.Option(None, help="torch threads"),
) -> None:
    """Train a sparse autoencoder / transcoder on a model's activations at --hook; evaluate (FVU, L0, dead
    latents, CE-loss recovered, KL) and write a run folder (summary.json, metrics.csv, sae/, report data)."""
    import warnings

    import torch

    from topotorch.checkpoint import CheckpointError, RunFolderExists
    from topotorch.sae.activations import CacheError, HookPointError
    from topotorch.sae.interop import FORMATS

    formats = [f for f in (s.strip() for s in export.split(",")) if f]
    for name, value, low in (
        ("latents", latents, 1),
        ("k", k, 1),
        ("steps", steps, 1),
        ("batch-size", batch_size, 1),
        ("eval-windows", eval_windows, 1),
        ("skip-first", skip_first, 0),
        ("show-latents", show_latents, 0),
    ):
        if value < low:
            _fail(f"--{name} must be >= {low}, got {value}")
    bad = [f for f in formats if f not in FORMATS or f == "topotorch"]
    if bad:
        _fail(f"--export {','.join(bad)}: known formats are saelens, sparsify")
    if threads is not None:
        if threads < 1:
            _fail(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    folder = out or Path("runs") / f"sae-{hook.replace('*', 'x').replace(':', '-')}-{architecture}-{latents}"
    cfg = SAERunConfig(
        source=source,
        hook=hook,
        latents=latents,
        k=k,
        architecture=architecture,
        transcoder=transcoder,
        skip=skip,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        data=data,
        model_config=model_config,
        skip_first=skip_first,
        eval_windows=eval_windows,
        show_latents=show_latents,
        cache=str(cache) if cache else None,
        export=formats,
        sheet=sheet,
        tau=tau,
        relocate=relocate,
    )
    try:
        with warnings.catch_warnings():  # a 1xN sheet's warning is reported once, by run_sae below
            warnings.simplefilter("ignore")
            topographic_sheet(cfg)  # the same check run_sae makes, before the model is loaded
    except ValueError as e:
        _fail(str(e))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            summary = run_sae(cfg, folder, progress=progress, overwrite=overwrite)
        except (HookPointError, CacheError, RunFolderExists, CheckpointError, FileNotFoundError, ValueError) as e:
            _fail(str(e))
        finally:
            for msg in dict.fromkeys(
                " ".join(str(w.message).split()) for w in caught if issubclass(w.category, UserWarning)
            ):
                typer.echo(f"warning: {msg}", err=True)
    ev = summary["eval"]
    typer.echo(
        f"{summary['source']} @ {hook}: FVU {ev['fvu']:.4f}, L0 {ev['l0']:.1f}, dead {100 * ev['dead']:.1f}%, "
        f"CE recovered {ev['ce_recovered']:.3f}, KL {ev['kl']:.4f} ({summary['train']['steps']} steps, "
        f"{summary['train']['seconds']:.1f} s)"
    )
    topo = summary.get("topographic")
    if topo:
        typer.echo(topographic_line(topo))
    typer.echo(f"wrote {folder} (summary.json, metrics.csv, sae/{''.join(', ' + f + '/' for f in formats)})")


def topographic_line(topo: dict) -> str:
    """One line for ``summary["topographic"]``: the sheet, the neighbour / shuffled ratios (before -> after a
    relocation) and the relocation's output change. Usage: ``print(topographic_line(summary["topographic"]))``."""

    def ratio(m: dict, key: str) -> str:
        r = m[key]["ratio"]
        return "n/a" if r is None else f"{r:.2f}"  # null: a baseline <= 0 (e.g. fewer than two live latents)

    def ratios(key: str) -> str:
        after = ratio(topo["measures"], key)
        return f"{ratio(topo['before_relocation'], key)} -> {after}" if "before_relocation" in topo else after

    h, w = topo["sheet"]
    tau = f", tau {topo['tau']:g}" if topo.get("tau") else ""
    line = (
        f"sheet {h}x{w}{tau}: "
        f"neighbours / shuffled: decoder |cos| x{ratios('decoder')}, co-activation x{ratios('coactivation')}"
    )
    rel = topo.get("relocation")
    if rel:
        line += f" (relocated in {rel['seconds']:.1f} s; output change {rel['output_change_float64']:.1e} in float64)"
    return line
