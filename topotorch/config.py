"""Configuration of a training run: every knob of `topotorch train`, validated on creation.

A run is defined by one :class:`TrainConfig`; its fields are the settings, their validation and the
`topotorch train` options. Schedules (λ over steps) are ``step:value`` phases, parsed by
:func:`parse_schedule` and read by :func:`schedule_value`.

    >>> cfg = TrainConfig.for_task("independence", steps=2000)
    >>> schedule_value(parse_schedule(cfg.lam), 1000)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from topotorch.objectives.wiring import WiringConfig
from topotorch.tasks import get_task

METHODS = ("none", "l1", "local", "swap", "bimt")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


_INT_MIN = {"steps": 1, "top_k": 1, "swap_every": 1, "log_every": 1, "snapshot_every": 0, "checkpoint_every": 0,
            "bias_penalty_from": 0, "seed": 0, "local_steps": 0}
_FLOAT_RANGE = {"lr": (0.0, False), "threshold": (0.0, False), "weight_decay": (0.0, True), "l0": (0.0, True),
                "wf": (0.0, True), "outer_lr": (0.0, False), "topo_tau": (0.0, True),
                "topo_factor": (1.0, True), "group_lam": (0.0, True)}  # (bound, bound allowed)
_CHOICES = {"method": METHODS, "dtype": tuple(DTYPES), "metric": ("l1", "l2"), "agg": ("sum", "mean"),
            "relocation": ("swap", "assign")}
_BOOLS = ("penalize_bias", "relocate_inputs", "relocate_outputs", "animation", "progress")
_MAX_INT = 2**62  # seeds and counts beyond this overflow torch's generators


def _validate_config(c: "TrainConfig") -> None:
    """Check every field's type and range; raise ``ValueError`` with one line naming field and value."""
    if not isinstance(c.task, str) or not c.task:
        raise ValueError(f"task must be a task name (string), got {c.task!r}")
    get_task(c.task)  # unknown task -> clear error listing the known ones
    for name, choices in _CHOICES.items():
        v = getattr(c, name)
        if not isinstance(v, str) or v not in choices:
            if name in ("metric", "agg"):
                raise ValueError(f"{name} must be {' or '.join(map(repr, choices))}, got {v!r}")
            hint = {"dtype": "float32 or float64", "relocation": "'swap' or 'assign'"}.get(name, "one of " + ", ".join(choices))
            raise ValueError(f"unknown {name} {v!r}; use {hint}")
    for name, lo in _INT_MIN.items():
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or v > _MAX_INT:
            kind = "a positive integer" if lo == 1 else "a non-negative integer"
            raise ValueError(f"{name} must be {kind}, got {v!r}")
    if c.batch_size is not None and (not isinstance(c.batch_size, int) or isinstance(c.batch_size, bool)
                                     or not 1 <= c.batch_size <= _MAX_INT):
        raise ValueError(f"batch_size must be a positive integer or None, got {c.batch_size!r}")
    for name, (lo, inclusive) in _FLOAT_RANGE.items():
        v = getattr(c, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v >= lo if inclusive else v > lo)
        if not ok:
            kind = ">= 0 and finite" if inclusive else "a positive number"
            raise ValueError(f"{name} must be {kind}, got {v!r}")
    m = c.outer_momentum
    if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0 <= m < 1:
        raise ValueError(f"outer_momentum must be a number in [0, 1), got {m!r}")
    for name in _BOOLS:
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(c, name)!r}")
    if not isinstance(c.exclude, list) or not all(isinstance(e, str) for e in c.exclude):
        raise ValueError(f"exclude must be a list of weight-name patterns (strings), got {c.exclude!r}")
    if not isinstance(c.lam, (str, int, float, list)) or isinstance(c.lam, bool):
        raise ValueError(f"lam must be a schedule like '0:1e-3,5000:1e-2' or a number, got {c.lam!r}")
    if isinstance(c.lam, list) and not all(isinstance(ph, (list, tuple)) and len(ph) == 2 for ph in c.lam):
        raise ValueError(f"lam as a list must hold [step, value] pairs, got {c.lam!r}")
    if not isinstance(c.topo_layers, str) or not c.topo_layers.strip() or "\0" in c.topo_layers:
        raise ValueError(f"topo_layers must be 'auto' or a layer-name pattern like '*.mlp.0', got {c.topo_layers!r}")
    if c.out is not None and (not isinstance(c.out, str) or not c.out.strip() or "\0" in c.out):
        raise ValueError(f"out must be a folder path, got {c.out!r}")
    if c.threads is not None and (not isinstance(c.threads, int) or isinstance(c.threads, bool)
                                  or not 1 <= c.threads <= 4096):
        raise ValueError(f"threads must be a positive integer or None (automatic), got {c.threads!r}")


def parse_schedule(spec: str | float | list) -> list[tuple[int, float]]:
    """Parse a step:value phase schedule, e.g. ``"0:1e-3,5000:1e-2,15000:1e-3"`` (or a number).

    The value at step t is that of the last phase starting at or before t.
    Usage: ``parse_schedule("0:0.1,5000:1")``.
    """
    if isinstance(spec, (int, float)):
        phases = [(0, float(spec))]
    elif isinstance(spec, list):
        try:
            phases = [(int(s), float(v)) for s, v in spec]
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"bad schedule {spec!r}: expected [[step, value], ...]") from None
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
    threads: int | None = None  # torch threads; None: choose_threads' measured rule (runtime, like out)
    # DiLoCo-style local updates: 0 = every step synchronised (DDP); H > 0 = H inner AdamW steps per
    # replica, then an outer Nesterov-SGD step on the averaged pseudo-gradient (θ_outer − θ_local)
    local_steps: int = 0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    # TopoNets: + τ · TopoLoss of the cortical sheets of the layers matching topo_layers (fnmatch,
    # comma-separated; "auto": every transformer c_fc / residual-block conv / hidden Linear), blur φ
    topo_tau: float = 0.0
    topo_layers: str = "auto"
    topo_factor: float = 3.0
    # structured sparsity: + group_lam · Σ_neurons ‖outgoing weights‖₂ (neuron_group_norm) over the
    # graph's hidden spaces, so whole neurons/channels/head dims die and `shrink` can cut them out
    group_lam: float = 0.0
    # bring your own model (topotorch/user_models.py): "hf:gpt2", "my_pkg.nets:build"; None: the task's model.
    # Its graph comes from the data-flow builder, checked on the task's inputs
    model: str | None = None
    model_config: str = ""  # K=V,... for the model (e.g. n_layer=4,n_embd=128,n_head=4)

    def __post_init__(self) -> None:
        _validate_config(self)
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model must be hf:NAME or package.module:function, got {self.model!r}")
        if not isinstance(self.model_config, str):
            raise ValueError(f"model_config must be a K=V,... string, got {self.model_config!r}")
        from topotorch.user_models import parse_model_config

        parse_model_config(self.model_config)
        get_task(self.task)  # unknown task -> clear error
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
        """Read a run's ``config.json``; unknown fields or bad values raise ``ValueError``."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is corrupt: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        from topotorch.training_fff import is_fff_config

        if is_fff_config(data):
            raise ValueError(f"{Path(path).parent} is a `topotorch fff` run (FFF classifier), not a `topotorch train` "
                             "run: its figures are in summary.json, leaves.md and regions.png; load it with "
                             "topotorch.training_fff.load_fff_run")
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


RUNTIME_FIELDS = ("out", "progress", "animation", "threads")  # may differ between a run and its resumption


def run_config(config: "TrainConfig | dict") -> dict:
    """The fields that define a run (runtime fields left out), JSON round-tripped so saved and live compare."""
    d = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in RUNTIME_FIELDS}))


def config_mismatch(saved: dict, config: "TrainConfig | dict") -> list[str]:
    """``key=saved (config.json: ours)`` for every run-defining field where ``saved`` (a checkpoint's copy) and
    ``config`` differ; a field only one side knows (another version of TrainConfig) is not compared."""
    a, b = run_config(saved), run_config(config)
    return [f"{k}={a[k]!r} (config.json: {b[k]!r})" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
