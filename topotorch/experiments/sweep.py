"""Accuracy vs sparsity: BIMT and L1 against the sparse-training baselines, on one task, several seeds.

Methods (all prune the weights of Linear/Conv layers, see :mod:`topotorch.compression.pruning`;
the retraining procedures are :mod:`topotorch.experiments.retrain`):

=============  ==================================================================================
``magnitude``  dense training, one-shot *global* magnitude pruning, masked fine-tune
``layerwise``  dense training, one-shot magnitude pruning at the same sparsity in every layer, fine-tune
``random``     dense training, random mask (uniform sparsity per layer), fine-tune
``bimt``       training with topotorch's BIMT (the task's defaults), global magnitude pruning, fine-tune
``l1``         training with plain L1 (the task's defaults), global magnitude pruning, fine-tune
``imp``        iterative magnitude pruning with weight rewinding to step k = 5% of training (lottery tickets)
``imp-ft``     iterative magnitude pruning, each cycle fine-tuning the previous cycle's weights (no rewind)
``soup``       sparse model soups: each cycle of ``imp-ft`` retrains m copies (batch orders differ), averages
``nm24``       dense training, 2:4 semi-structured mask (only at sparsity 0.5), fine-tune
=============  ==================================================================================

Budgets (sequential optimizer steps from initialisation): every method first trains T steps (the task's
``steps`` unless ``dense_steps`` is given; ``none``, ``bimt`` or ``l1``). The i-th sparsity level
(i = 1..L) is then reached after T + i·R steps by every method: the iterative methods run one R-step
retrain per level, the one-shot methods prune the trained model once and fine-tune for i·R steps.
Soups spend m·R gradient steps per cycle (the members train in parallel): their ``budget`` column counts
them all. Fine-tunes and retrains use AdamW at the task's learning rate, cosine-decayed to 0 within each
phase, on mini-batches (the task's batch size; 128 for full-batch tasks, so that soup members differ).
``accuracy_pruned`` is the test metric right after pruning, before any fine-tune (for ``bimt`` and
``l1``: the "no fine-tune" figure); ``seconds`` is the wall time since the method started on that seed
(dense training not included); ``steps`` the sequential steps and ``budget`` all gradient steps behind the row.

    >>> cfg = SweepConfig("digits", methods=["bimt", "imp", "soup"], sparsities=[0.5, 0.9], seeds=[0], out="runs/sw")
    >>> rows = run_sweep(cfg)  # writes sweep.csv, table.md, sweep.png, summary.json
"""

from __future__ import annotations

import copy
import csv
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from topotorch.analysis import active_weights
from topotorch.compression import pruning
from topotorch.experiments import retrain
from topotorch.progress import progress_bar
from topotorch.tasks import get_task
from topotorch.training import TrainConfig, evaluate, parse_schedule, train

METHODS = ("magnitude", "layerwise", "random", "bimt", "l1", "imp", "imp-ft", "soup", "nm24")
DEFAULT_METHODS = ("bimt", "l1", "imp", "random", "soup", "magnitude")
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
ONE_SHOT = {
    "magnitude": "global",
    "layerwise": "layerwise",
    "random": "random",
    "bimt": "global",
    "l1": "global",
    "nm24": "2:4",
}
BASE = {"bimt": "bimt", "l1": "l1"}  # the training method behind each sweep method (others: dense "none")
CSV_FIELDS = ["method", "sparsity", "seed", "accuracy", "accuracy_pruned", "steps", "budget", "seconds"]


def parse_methods(spec: str | list[str]) -> list[str]:
    """``"bimt,l1,imp"`` → ``["bimt", "l1", "imp"]``; unknown or repeated names raise ``ValueError``.

    Usage: ``parse_methods("bimt,soup")``.
    """
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    if not names:
        raise ValueError(f"no methods given; choose from {', '.join(METHODS)}")
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, bad))}; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"methods repeated in {','.join(names)}")
    return names


def parse_sparsities(spec: str | list[float]) -> list[float]:
    """``"0.5,0.8,0.9"`` → ``[0.5, 0.8, 0.9]``: each in (0, 1), strictly increasing, else ``ValueError``.

    Usage: ``parse_sparsities("0.5,0.8,0.9,0.95,0.98")``.
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for p in parts:
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise ValueError(f"bad sparsity {p!r}: expected a number in (0, 1), e.g. 0.9") from None
        if not 0 < v < 1:
            raise ValueError(f"sparsity must be in (0, 1) (the fraction of weights removed), got {v:g}")
        out.append(v)
    if not out:
        raise ValueError("no sparsities given, e.g. --sparsities 0.5,0.8,0.9")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"sparsities must increase, got {','.join(f'{v:g}' for v in out)}")
    return out


def parse_seeds(spec: str | list[int]) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]`` (non-negative, distinct), else ``ValueError``. Usage: ``parse_seeds("0,1,2")``."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        seeds = [int(str(p).strip()) for p in parts if str(p).strip()]
    except ValueError:
        raise ValueError(f"seeds must be non-negative integers like 0,1,2, got {spec!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct non-negative integers like 0,1,2, got {spec!r}")
    return seeds


@dataclass
class SweepConfig:
    """What a sparsity sweep runs. ``None`` fields take the task's settings.

    Usage: ``SweepConfig("digits", out="runs/sw")``.
    """

    task: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    sparsities: list[float] = field(default_factory=lambda: list(DEFAULT_SPARSITIES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str | None = None
    dense_steps: int | None = None  # T; None: the task's steps
    cycle_steps: int = 1000  # R: steps per prune–retrain cycle (one-shot methods fine-tune i·R at level i)
    soup_size: int = 3  # m
    rewind_fraction: float = 0.05  # IMP rewinds to step k = round(fraction · T)
    lr: float | None = None  # fine-tune learning rate (None: the task's)
    batch_size: int | None = None  # fine-tune batch (None: the task's, or 128 for full-batch tasks)
    lam: str | None = None  # λ schedule for the bimt / l1 training (None: the task's, scaled to T)
    progress: bool = True

    def __post_init__(self) -> None:

        get_task(self.task)
        self.methods = parse_methods(self.methods)
        self.sparsities = parse_sparsities(self.sparsities)
        self.seeds = parse_seeds(self.seeds)
        for name, lo in (("cycle_steps", 1), ("soup_size", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.dense_steps is not None and (not isinstance(self.dense_steps, int) or self.dense_steps < 1):
            raise ValueError(f"dense_steps must be a positive integer, got {self.dense_steps!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not 0 < self.rewind_fraction < 1:
            raise ValueError(f"rewind_fraction must be in (0, 1), got {self.rewind_fraction!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.lam is not None:
            parse_schedule(self.lam)


def _scaled_schedule(lam: Any, factor: float) -> Any:
    """A λ phase schedule with its phase starts scaled (so a shorter run keeps the task's phases)."""

    if factor == 1.0:
        return lam
    phases = parse_schedule(lam)
    return ",".join(f"{round(s * factor)}:{v:g}" for s, v in phases)


def _train_base(task_name: str, method: str, seed: int, steps: int, rewind_step: int | None, lam: str | None = None):
    """Train with topotorch's trainer (task defaults; ``lam`` overrides λ).

    Returns (result, state at ``rewind_step``)."""

    defaults = get_task(task_name).defaults
    task_steps = int(defaults.get("steps", steps))
    over: dict[str, Any] = dict(method=method, seed=seed, steps=steps, progress=False, animation=False)
    if steps != task_steps:
        f = steps / task_steps
        over["lam"] = _scaled_schedule(defaults.get("lam", "0:1e-3"), f)
        if defaults.get("bias_penalty_from"):
            over["bias_penalty_from"] = round(defaults["bias_penalty_from"] * f)
    if lam is not None and method != "none":
        over["lam"] = lam
    captured: dict[str, torch.Tensor] = {}

    def hook(done, model, graph) -> None:
        if rewind_step is not None and done == rewind_step:
            captured.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    result = train(TrainConfig.for_task(task_name, **over), on_step=hook)
    return result, (captured or None)


def _row(method: str, s: float, seed: int, acc: float, acc_pruned: float, steps: int, budget: int, t0: float) -> dict:
    return {
        "method": method,
        "sparsity": s,
        "seed": seed,
        "accuracy": round(acc, 6),
        "accuracy_pruned": round(acc_pruned, 6),
        "steps": steps,
        "budget": budget,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def run_sweep(cfg: SweepConfig) -> list[dict]:
    """Run every method at every sparsity for every seed; write the outputs if ``cfg.out`` is set.

    Returns the rows of ``sweep.csv`` (one per method, sparsity and seed). Writes ``sweep.csv``,
    ``table.md`` (medians over seeds), ``sweep.png`` and ``summary.json`` into ``cfg.out``.
    Usage: ``run_sweep(SweepConfig("mnist1d", seeds=[0, 1, 2], out="results/sparsity/mnist1d"))``.
    """

    task = get_task(cfg.task)
    d = task.defaults
    T = cfg.dense_steps or int(d.get("steps", 1000))
    R = cfg.cycle_steps
    lr = cfg.lr or float(d.get("lr", 1e-3))
    bs = cfg.batch_size or d.get("batch_size") or 128
    k = max(1, round(cfg.rewind_fraction * T))
    levels = cfg.sparsities
    L = len(levels)
    need_dense = any(m not in BASE for m in cfg.methods)
    bases = (["none"] if need_dense else []) + [BASE[m] for m in cfg.methods if m in BASE]
    ft_steps = {
        "imp": L * R,
        "imp-ft": L * R,
        "soup": L * R * cfg.soup_size,
        "nm24": R * (levels.index(0.5) + 1) if 0.5 in levels else 0,
    }
    per_seed = T * len(bases) + sum(ft_steps.get(m, R * L * (L + 1) // 2) for m in cfg.methods)
    if "nm24" in cfg.methods and 0.5 not in levels:
        import warnings

        warnings.warn("nm24 (2:4) has sparsity 0.5 only, which is not among the sparsities: no nm24 rows", stacklevel=2)
    rows: list[dict] = []
    extra: dict[str, Any] = {"dense": {}, "soup_members": {}}
    t_start = time.perf_counter()
    with progress_bar(cfg.progress, description_width=34) as bar:
        job = bar.add_task(f"{cfg.task} sweep", total=per_seed * len(cfg.seeds)) if bar else None

        def advance(n: int, what: str) -> None:
            if bar:
                bar.update(job, advance=n, description=f"{cfg.task} {what}")

        for seed in cfg.seeds:
            trained: dict[str, Any] = {}
            rewind_state = None
            for b in bases:
                res, cap = _train_base(cfg.task, b, seed, T, k if b == "none" else None, cfg.lam)
                trained[b] = res
                if b == "none":
                    rewind_state = cap
                data = res.data

                extra["dense"].setdefault(b, {})[seed] = {
                    "accuracy": evaluate(task, res.model, data.x_test, data.y_test),
                    "fraction_abs_w_le_0.05": 1 - active_weights(res.graph, 0.05)["fraction"],
                    "weight_sparsity": pruning.weight_sparsity(res.model),
                }
                advance(T, f"seed {seed}: trained {b}")
            data = next(iter(trained.values())).data
            for method in cfg.methods:
                t0 = time.perf_counter()
                base = trained[BASE.get(method, "none")].model
                if method in ONE_SHOT:
                    for i, s in enumerate(levels, start=1):
                        if method == "nm24" and s != 0.5:
                            continue
                        kind = ONE_SHOT[method]
                        if kind == "global":
                            masks = pruning.global_magnitude_masks(base, s)
                        elif kind == "layerwise":
                            masks = pruning.layerwise_magnitude_masks(base, s)
                        elif kind == "random":
                            masks = pruning.random_masks(base, s, torch.Generator().manual_seed(seed * 7919 + i))
                        else:
                            masks = pruning.semi_structured_masks(base, skip_incompatible=True)
                        model = copy.deepcopy(base)
                        ms = pruning.MaskSet(masks).apply(model)
                        acc0 = evaluate(task, model, data.x_test, data.y_test)
                        retrain.finetune(task, model, data, ms, i * R, lr, bs, seed=seed * 1000 + i)
                        acc = evaluate(task, model, data.x_test, data.y_test)
                        rows.append(_row(method, s, seed, acc, acc0, T + i * R, T + i * R, t0))
                        advance(i * R, f"seed {seed}: {method} {s:.0%}")
                elif method == "imp":
                    assert rewind_state is not None  # captured while training the dense "none" base, which imp needs
                    for c in retrain.imp_rewind(
                        task, base, rewind_state, data, levels, R, lr, bs, seed=seed, base_steps=T, rewind_step=k
                    ):
                        rows.append(
                            _row(method, c.sparsity, seed, c.accuracy, c.accuracy_pruned, c.steps, c.budget, t0)
                        )
                        advance(R, f"seed {seed}: imp {c.sparsity:.0%}")
                else:  # imp-ft, soup
                    m = cfg.soup_size if method == "soup" else 1
                    for c in retrain.sparse_soup(task, base, data, levels, R, lr, m, bs, seed=seed, base_steps=T):
                        rows.append(
                            _row(method, c.sparsity, seed, c.accuracy, c.accuracy_pruned, c.steps, c.budget, t0)
                        )
                        if method == "soup":
                            extra["soup_members"].setdefault(str(c.sparsity), {})[seed] = c.members
                        advance(m * R, f"seed {seed}: {method} {c.sparsity:.0%}")
    seconds = time.perf_counter() - t_start
    budgets = {
        "dense_steps": T,
        "cycle_steps": R,
        "soup_size": cfg.soup_size,
        "rewind_step": k,
        "finetune_lr": lr,
        "finetune_batch": bs,
        "per_seed_gradient_steps": per_seed,
        "lam": cfg.lam or d.get("lam"),
    }
    if cfg.out:
        write_outputs(Path(cfg.out), cfg, rows, budgets, extra, seconds)
    return rows


def medians(rows: list[dict], key: str = "accuracy") -> dict[str, dict[float, float]]:
    """``{method: {sparsity: median of key over seeds}}``. Usage: ``medians(rows)["soup"][0.9]``."""
    groups: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        groups.setdefault(r["method"], {}).setdefault(float(r["sparsity"]), []).append(float(r[key]))
    return {m: {s: statistics.median(v) for s, v in sorted(by.items())} for m, by in groups.items()}


def _budget_text(method: str, i: int, b: dict) -> str:
    m = b["soup_size"]
    if method == "soup":
        return f"T + {i}·R sequential, T + {i * m}·R gradient steps"
    return f"T + {i}·R"


def write_outputs(out: Path, cfg: SweepConfig, rows: list[dict], budgets: dict, extra: dict, seconds: float) -> None:
    """Write ``sweep.csv``, ``table.md``, ``sweep.png`` and ``summary.json`` for a finished sweep.

    Usage: ``write_outputs(Path("runs/sw"), cfg, rows, budgets, extra, seconds)`` (``run_sweep`` calls it).
    """
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    med, med0 = medians(rows), medians(rows, "accuracy_pruned")
    levels = cfg.sparsities
    methods = [m for m in cfg.methods if m in med]
    winners = {}
    for s in levels:
        cands = {m: med[m][s] for m in methods if s in med[m]}
        if cands:
            best = max(cands.values())
            winners[str(s)] = sorted(m for m, v in cands.items() if v == best)
    soup_vs = {}
    for s in levels:
        entry: dict[str, float | None] = {m: med[m].get(s) for m in ("soup", "imp", "imp-ft") if m in med}
        soup = entry.get("soup")
        if soup is not None:
            for ref in ("imp", "imp-ft"):
                other = entry.get(ref)
                if other is not None:
                    entry[f"soup_minus_{ref}"] = round(soup - other, 6)
            members = extra["soup_members"].get(str(s), {})
            if members:
                entry["best_member"] = statistics.median(max(v) for v in members.values())
                entry["mean_member"] = statistics.median(statistics.mean(v) for v in members.values())
            soup_vs[str(s)] = entry
    dense_med = {b: statistics.median(v["accuracy"] for v in by.values()) for b, by in extra["dense"].items()}
    T, R, m = budgets["dense_steps"], budgets["cycle_steps"], budgets["soup_size"]

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}"

    head = "| method | " + " | ".join(f"{100 * s:g}%" for s in levels) + " |"
    sep = "|---|" + "---|" * len(levels)
    lines = [
        f"# {cfg.task}: test accuracy (%) vs sparsity, median of seeds {','.join(map(str, cfg.seeds))}",
        "",
        f"Budgets: T = {T} training steps (task defaults; `none`, `bimt` or `l1`), R = {R} steps per cycle. "
        f"At the i-th sparsity level every model has had T + i·R sequential steps (one-shot methods fine-tune "
        f"i·R; iterative ones run i retrains of R); soups train {m} members per cycle, i.e. T + {m}·i·R "
        f"gradient steps. IMP rewinds to step k = {budgets['rewind_step']}. Fine-tunes: AdamW lr "
        f"{budgets['finetune_lr']:g} cosine-decayed per phase, batch {budgets['finetune_batch']}. "
        f"λ schedule of bimt/l1: `{budgets['lam']}`{'' if cfg.lam else ' (the task default)'}. "
        f"Dense accuracy before pruning: " + ", ".join(f"{b} {pct(v)}" for b, v in dense_med.items()) + ".",
        "",
        "After fine-tuning (best per column in bold):",
        "",
        head,
        sep,
    ]
    for meth in methods:
        cells = []
        for s in levels:
            v = med[meth].get(s)
            best = v is not None and meth in winners.get(str(s), [])
            cells.append(f"**{pct(v)}**" if best else pct(v))
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Right after pruning, before any fine-tune (IMP: the trained weights pruned, before rewinding):",
        "",
        head,
        sep,
    ]
    for meth in methods:
        lines.append(f"| {meth} | " + " | ".join(pct(med0[meth].get(s)) for s in levels) + " |")
    lines += ["", "Gradient steps per model at each level:", "", head, sep]
    for meth in methods:
        lines.append(
            f"| {meth} | "
            + " | ".join(
                str(T + (m if meth == "soup" else 1) * (i + 1) * R) if s in med[meth] else "—"
                for i, s in enumerate(levels)
            )
            + " |"
        )
    if soup_vs:
        lines += [
            "",
            "Soup vs IMP at equal sparsity (median accuracy %; members: the soup's ingredients before averaging):",
            "",
            "| sparsity | soup | imp (rewind) | imp-ft (m = 1) | best member | mean member |",
            "|---|---|---|---|---|---|",
        ]
        for level, e in soup_vs.items():
            lines.append(
                f"| {100 * float(level):g}% | {pct(e.get('soup'))} | {pct(e.get('imp'))} | {pct(e.get('imp-ft'))} "
                f"| {pct(e.get('best_member'))} | {pct(e.get('mean_member'))} |"
            )
    lines += [
        "",
        f"Whole sweep: {seconds / 60:.1f} min. Command: `topotorch sweep-sparsity {cfg.task} --methods "
        f"{','.join(cfg.methods)} --sparsities {','.join(f'{s:g}' for s in levels)} --seeds "
        f"{','.join(map(str, cfg.seeds))} --dense-steps {T} --cycle-steps {R} --soup-size {m}"
        + (f" --lam {cfg.lam}" if cfg.lam else "")
        + "`",
        "",
    ]
    (out / "table.md").write_text("\n".join(lines))
    plot(
        out / "sweep.png",
        rows,
        levels,
        methods,
        dense_med,
        title=f"{cfg.task}: accuracy vs sparsity (median of {len(cfg.seeds)} seeds, band: min–max)",
    )
    summary = {
        "task": cfg.task,
        "config": asdict(cfg),
        "budgets": budgets,
        "seconds": round(seconds, 1),
        "dense_accuracy_median": dense_med,
        "dense": extra["dense"],
        "median_accuracy": {mm: {str(s): v for s, v in by.items()} for mm, by in med.items()},
        "median_accuracy_no_finetune": {mm: {str(s): v for s, v in by.items()} for mm, by in med0.items()},
        "winners": winners,
        "soup_vs_imp": soup_vs,
        "soup_members": extra["soup_members"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def plot(
    path: Path, rows: list[dict], levels: list[float], methods: list[str], dense: dict[str, float], title: str = ""
) -> Path:
    """Accuracy vs sparsity, one line per method (median, min–max band), x on a log(1/density) axis.

    Usage: ``plot(Path("sweep.png"), rows, [0.5, 0.9], ["imp", "soup"], {"none": 0.97})``.
    """
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = {s: -math.log10(1 - s) for s in levels}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for meth in methods:
        pts = []
        for s in levels:
            v = [float(r["accuracy"]) for r in rows if r["method"] == meth and float(r["sparsity"]) == s]
            if v:
                pts.append((xs[s], statistics.median(v), min(v), max(v)))
        if not pts:
            continue
        x, mid, lo, hi = zip(*pts)
        (line,) = ax.plot(x, [100 * a for a in mid], marker="o", label=meth, lw=2 if meth in ("bimt", "soup") else 1.3)
        ax.fill_between(x, [100 * a for a in lo], [100 * a for a in hi], color=line.get_color(), alpha=0.12)
    if dense:  # the unpruned reference: plain training if it ran, else the first trained base
        b, ref = ("none", dense["none"]) if "none" in dense else next(iter(dense.items()))
        ax.axhline(100 * ref, ls="--", lw=0.8, color="grey")
        ax.text(
            xs[levels[0]], 100 * ref, f" dense ({b}) {100 * ref:.1f}%", va="top", ha="left", fontsize=7, color="grey"
        )
    ax.set_xticks(list(xs.values()), [f"{100 * s:g}%" for s in levels])
    ax.set_xlabel("sparsity (fraction of Linear/Conv weights removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def replot(folder: Path) -> Path:
    """Redraw ``folder/sweep.png`` from its ``sweep.csv`` and ``summary.json`` (no training).

    Usage: ``replot(Path("results/sparsity/digits"))``.
    """
    folder = Path(folder)
    with open(folder / "sweep.csv", newline="") as f:  # closed (no ResourceWarning), as csv wants
        rows = list(csv.DictReader(f))
    s = json.loads((folder / "summary.json").read_text())
    cfg = s["config"]
    methods = [m for m in cfg["methods"] if any(r["method"] == m for r in rows)]
    return plot(
        folder / "sweep.png",
        rows,
        [float(v) for v in cfg["sparsities"]],
        methods,
        s["dense_accuracy_median"],
        title=f"{cfg['task']}: accuracy vs sparsity (median of {len(cfg['seeds'])} seeds, band: min–max)",
    )
