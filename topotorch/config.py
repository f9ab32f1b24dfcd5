"""Configuration of a training run: every knob of `topotorch train`, each declared once.

A setting is one dataclass field. Its type annotation says what kind of value it takes (``int``,
``float``, ``bool``, ``str``, a ``Literal`` of choices, ``X | None`` when it may be left out), and
its :func:`setting` metadata says the rest: the help text, the range, whether it is a command-line
option, whether it is a runtime field (may differ between a run and its resumption). Everything
else is generated from that one declaration:

- validation (:func:`validate`, run by every config's ``__post_init__``): one ``ValueError`` naming
  the field, the value and the allowed range, e.g. ``steps must be a positive integer, got 0``;
- the ``topotorch train`` / ``topotorch fff`` options (:mod:`topotorch.cli` builds them from
  :func:`settings_of`), ``--help`` showing the same help text and range;
- a task's defaults, a partial config checked when the task is registered (:func:`validate_partial`).

Schedules (λ over steps) are ``step:value`` phases, parsed by :func:`parse_schedule` and read by
:func:`schedule_value`.

    >>> cfg = TrainConfig.for_task("independence", steps=2000)
    >>> schedule_value(parse_schedule(cfg.lam), 1000)
    >>> TrainConfig(steps=0)  # ValueError: steps must be a positive integer, got 0
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from topotorch.objectives.wiring import WiringConfig
from topotorch.runs import get_run_kind, run_kind

METHODS = ("none", "l1", "local", "swap", "bimt")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_INT = 2**62  # seeds and counts beyond this overflow torch's generators


# -- the declaration of one setting --------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """What a config field declares besides its type and default (see :func:`setting`).

    ``lo``/``hi`` bound a number (``lo_open``/``hi_open``: the bound itself excluded); ``cli``: the
    field is an option of the command that builds this config; ``runtime``: it may change between a
    run and its resumption; ``expect`` describes a valid value for the type error; ``check`` is a
    further test of the value, raising ``ValueError``; ``allow_blank``: a string may be empty.
    """

    help: str
    lo: float | None = None
    lo_open: bool = False
    hi: float | None = None
    hi_open: bool = False
    cli: bool = True
    runtime: bool = False
    expect: str | None = None
    check: Callable[[Any], None] | None = None
    allow_blank: bool = False


def setting(
    default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING, **declared: Any
) -> Any:
    """A dataclass field carrying its :class:`Setting`.

    Usage: ``steps: int = setting(20000, "training steps", lo=1)``.
    """
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"setting": Setting(help, **declared)}
    )


@dataclass(frozen=True)
class FieldSpec:
    """One declared field resolved: name, default, the value type (``base``, ``None`` removed),
    ``optional`` (None allowed), ``choices`` (a ``Literal``) and its :class:`Setting`."""

    name: str
    default: Any
    base: Any
    optional: bool
    choices: tuple | None
    setting: Setting

    @property
    def option(self) -> str:
        """The command-line spelling: ``--top-k`` for ``top_k``."""
        return "--" + self.name.replace("_", "-")


@functools.cache
def settings_of(cls: type) -> tuple[FieldSpec, ...]:
    """Every declared field of the config dataclass ``cls``, in declaration order.

    Usage: ``[s.option for s in settings_of(TrainConfig) if s.setting.cli]``.
    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        s = f.metadata.get("setting")
        if s is None:  # e.g. a nested config: validated by its own class
            continue
        base, optional, choices = _resolve(hints[f.name])
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        out.append(FieldSpec(f.name, default, base, optional, choices, s))
    return tuple(out)


def _resolve(hint: Any) -> tuple[Any, bool, tuple | None]:
    """``int | None`` -> (int, True, None); ``Literal["a", "b"]`` -> (str, False, ("a", "b"))."""
    args = typing.get_args(hint)
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        optional = type(None) in args
        rest = tuple(a for a in args if a is not type(None))
        hint = functools.reduce(operator.or_, rest)  # a genuine union stays one (lam: str | float | list)
        args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return type(args[0]), optional, tuple(args)
    return hint, optional, None


# -- validation, generated from the declarations --------------------------------------------------


def describe(spec: FieldSpec) -> str:
    """The allowed values of a field in words, as errors and ``--help`` say them: ``a positive integer``,
    ``>= 0 and finite``, ``a number in [0, 1)``, ``one of none, l1, ...``."""
    s = spec.setting
    if spec.choices is not None:
        return (
            "one of " + ", ".join(spec.choices) if len(spec.choices) > 2 else " or ".join(repr(c) for c in spec.choices)
        )
    if s.expect is not None:
        return s.expect
    base = spec.base
    if base is bool:
        return "true or false"
    if base is int:
        if s.lo is None:
            return "an integer"
        least = int(s.lo)
        return {1: "a positive integer", 0: "a non-negative integer"}.get(least, f"an integer >= {least}")
    if base is float:
        lo = s.lo if s.lo is not None else -math.inf
        if s.hi is not None:
            return f"a number in {'(' if s.lo_open else '['}{lo:g}, {s.hi:g}{')' if s.hi_open else ']'}"
        if s.lo_open:
            return "a positive number" if lo == 0 else f"> {lo:g} and finite"
        return f">= {lo:g} and finite"
    if base is str:
        return "a string" if s.allow_blank else "a non-empty string"
    return f"a {getattr(base, '__name__', base)}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _in_range(v: float, s: Setting) -> bool:
    if s.lo is not None and (v <= s.lo if s.lo_open else v < s.lo):
        return False
    return not (s.hi is not None and (v >= s.hi if s.hi_open else v > s.hi))


def _ok_int(v: Any, s: Setting) -> bool:
    return _is_int(v) and _in_range(v, s) and abs(v) <= (MAX_INT if s.hi is None else s.hi)


def _ok_float(v: Any, s: Setting) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and _in_range(v, s)


def _ok_str(v: Any, s: Setting) -> bool:
    return isinstance(v, str) and (s.allow_blank or bool(v.strip())) and "\0" not in v


def _ok_str_list(v: Any, s: Setting) -> bool:
    return isinstance(v, list) and all(isinstance(e, str) for e in v)


# one test per value type; a type not listed (a union like lam's) is left to the field's own check
_TYPE_CHECKS: dict[Any, Callable[[Any, Setting], bool]] = {
    bool: lambda v, s: isinstance(v, bool),
    int: _ok_int,
    float: _ok_float,
    str: _ok_str,
    list[str]: _ok_str_list,
}


def check_value(spec: FieldSpec, value: Any) -> None:
    """Raise ``ValueError`` naming the field, its allowed values and ``value`` unless ``value`` fits ``spec``.

    Usage: ``check_value(settings_by_name(TrainConfig)["steps"], 0)``.
    """
    name = spec.name
    if value is None and spec.optional:
        return
    if spec.choices is not None:
        if not isinstance(value, str) or value not in spec.choices:
            raise ValueError(f"unknown {name} {value!r}; use {describe(spec)}")
    else:
        ok = _TYPE_CHECKS.get(spec.base)
        if ok is not None and not ok(value, spec.setting):
            raise ValueError(f"{name} must be {describe(spec)}{' or None' if spec.optional else ''}, got {value!r}")
    if spec.setting.check is not None:
        try:
            spec.setting.check(value)
        except (ValueError, TypeError) as e:
            msg = " ".join(str(e).split())
            raise ValueError(msg if name in msg else f"{name}: {msg}") from None


@functools.cache
def settings_by_name(cls: type) -> dict[str, FieldSpec]:
    """:func:`settings_of` as a dict by field name. Usage: ``settings_by_name(TrainConfig)["lr"].setting.help``."""
    return {s.name: s for s in settings_of(cls)}


def validate(config: Any) -> None:
    """Check every declared field of a config dataclass instance; raise ``ValueError`` on the first bad one.

    Usage: ``validate(cfg)`` (every config's ``__post_init__`` does it).
    """
    cls: type = type(config)
    for spec in settings_of(cls):
        check_value(spec, getattr(config, spec.name))


def validate_partial(cls: type, values: dict[str, Any], where: str = "") -> None:
    """Check a partial config (a task's defaults): every key a declared field of ``cls``, every value in its range.

    The error names ``where`` (e.g. ``task 'digits'``) and the field. Usage:
    ``validate_partial(TrainConfig, {"steps": 100}, "task 'x'")``.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix}defaults must be a dict of {cls.__name__} fields, got {type(values).__name__}")
    specs = settings_by_name(cls)
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ValueError(f"{prefix}unknown {cls.__name__} field(s) {', '.join(unknown)} in the defaults")
    for name, value in values.items():
        try:
            check_value(specs[name], value)
        except ValueError as e:
            raise ValueError(f"{prefix}bad default {name}: {e}") from None


# -- the fields' own checks ----------------------------------------------------------------------


def _check_task(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"task must be a task name (string), got {name!r}")
    from topotorch.tasks import get_task  # tasks import this module (their defaults are checked here)

    get_task(name)  # unknown task -> clear error listing the known ones


def _check_schedule(spec: Any) -> None:
    if isinstance(spec, list) and not all(isinstance(ph, (list, tuple)) and len(ph) == 2 for ph in spec):
        raise ValueError(f"lam as a list must hold [step, value] pairs, got {spec!r}")
    if not isinstance(spec, (str, int, float, list)) or isinstance(spec, bool):
        raise ValueError(f"lam must be a schedule like '0:1e-3,5000:1e-2' or a number, got {spec!r}")
    parse_schedule(spec)


def _check_model(spec: Any) -> None:
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be hf:NAME or package.module:function, got {spec!r}")


def _check_model_config(text: Any) -> None:
    from topotorch.user_models import parse_model_config  # user models pull in their own dependencies

    parse_model_config(text)


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
    """The value of a parsed schedule at ``step``. Usage: ``schedule_value(parse_schedule("0:1,10:2"), 12) == 2.0``."""
    value = phases[0][1]
    for s, v in phases:
        if step >= s:
            value = v
    return value


# -- the training run's settings -------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every knob of a training run, validated on creation. Usage: ``TrainConfig.for_task("digits", steps=2000)``."""

    task: str = setting("independence", "task name (see `topotorch tasks`)", cli=False, check=_check_task)
    method: Literal["none", "l1", "local", "swap", "bimt"] = setting(
        "bimt",
        "training penalty / relocation: none, l1 (plain L1), local (wiring cost), swap (L1 + relocation), "
        "bimt (wiring cost + relocation); default: bimt",
    )
    steps: int = setting(20000, "training steps (default: the task's)", lo=1)
    lr: float = setting(2e-3, "learning rate", lo=0.0, lo_open=True)
    weight_decay: float = setting(0.0, "AdamW weight decay", lo=0.0, cli=False)
    batch_size: int | None = setting(None, "mini-batch size (default: full batch); global under torchrun", lo=1)
    seed: int = setting(0, "random seed (default: 0)", lo=0)
    dtype: Literal["float32", "float64"] = setting("float32", "parameter dtype (default: the task's)")
    lam: str | float | list = setting(  # noqa: RUF009 - setting() is dataclasses.field with metadata
        "0:1e-3",
        "λ schedule as step:value phases, e.g. 0:1e-3,5000:1e-2",
        expect="a schedule like '0:1e-3,5000:1e-2' or a number",
        check=_check_schedule,
    )
    l0: float = setting(0.1, "layer-to-layer gap added to every connection's length", lo=0.0)
    wf: float = setting(1.0, "weight of distance in the wiring cost (0: plain L1)", lo=0.0)
    metric: Literal["l1", "l2"] = setting("l1", "distance between neurons", cli=False)
    agg: Literal["sum", "mean"] = setting("sum", "how the per-weight costs add up", cli=False)
    penalize_bias: bool = setting(True, "biases pay the wiring cost too", cli=False)
    bias_penalty_from: int = setting(
        0, "biases join the penalty at this step (the paper: 15000 on symbolic tasks)", lo=0, cli=False
    )
    exclude: list[str] = setting(  # noqa: RUF009 - setting() is dataclasses.field with metadata
        default_factory=list,
        help="weight-name patterns left out of the penalty",
        cli=False,
        expect="a list of weight-name patterns (strings)",
    )
    relocation: Literal["swap", "assign"] = setting(
        "swap", "how neurons move: swap (the paper's greedy swaps) or assign (exact, per layer)"
    )
    top_k: int = setting(5, "neurons tried per layer per relocation", lo=1)
    swap_every: int = setting(200, "relocate every n steps", lo=1)
    relocate_inputs: bool = setting(True, "relocation may move input neurons", cli=False)
    relocate_outputs: bool = setting(True, "relocation may move output neurons", cli=False)
    threshold: float = setting(0.05, "|w| above which a weight counts as active", lo=0.0, lo_open=True)
    log_every: int = setting(100, "metrics.csv row every n steps", lo=1)
    snapshot_every: int = setting(0, "snapshot every n steps (0: about 100 per run)", lo=0, cli=False)
    checkpoint_every: int = setting(0, "checkpoint every n steps (default 0: 10 per run)", lo=0)
    animation: bool = setting(True, "render training.gif / training.mp4 (after summary.json is written)", runtime=True)
    progress: bool = setting(True, "show a progress bar", runtime=True)
    out: str | None = setting(
        None, "run folder (default: runs/TASK-METHOD-sSEED)", runtime=True, expect="a folder path"
    )
    threads: int | None = setting(
        None, "torch threads (default: 1 for small models, measured rule)", lo=1, hi=4096, runtime=True
    )
    # DiLoCo-style local updates: 0 = every step synchronised (DDP); H > 0 = H inner AdamW steps per
    # replica, then an outer Nesterov-SGD step on the averaged pseudo-gradient (θ_outer − θ_local)
    local_steps: int = setting(0, "DiLoCo: local steps between outer syncs (0: DDP)", lo=0)
    outer_lr: float = setting(0.7, "DiLoCo: outer Nesterov-SGD learning rate", lo=0.0, lo_open=True, cli=False)
    outer_momentum: float = setting(0.9, "DiLoCo: outer momentum", lo=0.0, hi=1.0, hi_open=True, cli=False)
    # TopoNets: + τ · TopoLoss of the cortical sheets of the layers matching topo_layers (fnmatch,
    # comma-separated; "auto": every transformer c_fc / residual-block conv / hidden Linear), blur φ
    topo_tau: float = setting(0.0, "TopoNets: weight τ of TopoLoss (0: off)", lo=0.0)
    topo_layers: str = setting(
        "auto",
        "layers with a cortical sheet: fnmatch pattern(s), e.g. '*.mlp.0' (default: auto)",
        expect="'auto' or a layer-name pattern like '*.mlp.0'",
    )
    topo_factor: float = setting(3.0, "TopoLoss blur factor φ (default: 3)", lo=1.0)
    # structured sparsity: + group_lam · Σ_neurons ‖outgoing weights‖₂ (neuron_group_norm) over the
    # graph's hidden spaces, so whole neurons/channels/head dims die and `shrink` can cut them out
    group_lam: float = setting(0.0, "neuron group lasso weight (whole neurons die; 0: off)", lo=0.0)
    # bring your own model (topotorch/user_models.py); its graph comes from the data-flow builder,
    # checked on the task's inputs
    model: str | None = setting(
        None,
        "your model: hf:NAME (e.g. hf:gpt2, hf:llama) or package.module:function (default: the task's)",
        check=_check_model,
    )
    model_config: str = setting(
        "",
        "K=V,... for --model, e.g. n_layer=4,n_embd=128,n_head=4",
        allow_blank=True,
        expect="a K=V,... string",
        check=_check_model_config,
    )

    def __post_init__(self) -> None:
        validate(self)
        self.wiring(train=True)  # the wiring cost's own checks

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> TrainConfig:
        """The task's reference settings, with ``overrides`` (None values ignored) on top."""
        from topotorch.tasks import get_task

        t = get_task(task)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        values = {**t.defaults, **{k: v for k, v in overrides.items() if v is not None}, "task": task}
        return cls(**values)

    @classmethod
    def from_json(cls, path: Path) -> TrainConfig:
        """Read a run's ``config.json``; unknown fields or bad values raise ``ValueError``."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is corrupt: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        path = Path(path)
        kind = get_run_kind(run_kind(path.parent)) if path.name == "config.json" else None
        if kind is not None and kind.name != "train":  # the folder says what it holds
            raise ValueError(
                f"{path.parent} is a `{kind.command or kind.name}` run, not a `topotorch train` run; "
                "open it with topotorch.runs.open_run"
            )
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
        return WiringConfig(
            wf=wf,
            l0=self.l0,
            metric=self.metric,
            agg=self.agg,
            penalize_bias=self.penalize_bias and bias,
            exclude=list(self.exclude),
        )


# may differ between a run and its resumption (declared runtime=True above)
RUNTIME_FIELDS = tuple(s.name for s in settings_of(TrainConfig) if s.setting.runtime)


def run_config(config: TrainConfig | dict) -> dict:
    """The fields that define a run (runtime fields left out), JSON round-tripped so saved and live compare."""
    d = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in RUNTIME_FIELDS}))


def config_mismatch(saved: dict, config: TrainConfig | dict) -> list[str]:
    """``key=saved (config.json: ours)`` for every run-defining field where ``saved`` (a checkpoint's copy) and
    ``config`` differ; a field only one side knows (another version of TrainConfig) is not compared."""
    a, b = run_config(saved), run_config(config)
    return [f"{k}={a[k]!r} (config.json: {b[k]!r})" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
