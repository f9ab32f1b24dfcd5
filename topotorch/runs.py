"""Run folders: each says what kind of run it holds, and one :func:`open_run` opens any of them.

A command that creates a run folder writes ``run.json`` first (atomically): ``{"kind": "train"}``
(``topotorch train``), ``{"kind": "fff"}`` (``topotorch fff``), and so on. Opening a folder reads
that kind and dispatches to the loader registered for it (:func:`register_run_kind`), so a reader
never guesses from which keys a config happens to have. Folders written before ``run.json`` existed
still open: their kind is a ``"kind"`` key of ``config.json`` when there is one (an alias the kind
registered, e.g. a versioned name), else each kind's ``looks_like(config)`` test, ``train`` last.

    >>> write_run_kind("runs/ind", "train")  # what topotorch.training does when it creates a run
    >>> run_kind("runs/ind")  # "train"
    >>> result = open_run("runs/ind")  # a TrainResult; open_run("runs/digits-fff"): an FFFRunResult
    >>> cfg = open_config("runs/ind", kind="train")  # the folder's TrainConfig (refuses another kind)

A kind is registered by the module that writes it (``topotorch.training`` registers ``train``,
``topotorch.training_fff`` registers ``fff``); :data:`KIND_MODULES` names those modules so that a
reader needs no import of its own. A new kind (``sae``) adds one line there and one
``register_run_kind`` call in its module.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from topotorch.artifacts import atomic_write_json

RUN_FILE = "run.json"
FORMAT = 1

# the module that registers each kind (imported on first use, so readers import nothing by hand)
KIND_MODULES: dict[str, str] = {
    "train": "topotorch.training",
    "fff": "topotorch.training_fff",
}


@dataclass(frozen=True)
class RunKind:
    """How to open one kind of run folder.

    ``open``: the folder -> its result (model, summary, ...); ``config``: the folder -> its config object;
    ``looks_like``: for folders without ``run.json``, whether a parsed ``config.json`` is of this kind;
    ``aliases``: other names of the kind found in old ``config.json`` files; ``command``: the command
    that writes it, for error messages.
    """

    name: str
    open: Callable[[Path], Any]
    config: Callable[[Path], Any]
    looks_like: Callable[[dict], bool] | None = None
    aliases: tuple[str, ...] = ()
    command: str = ""


RUN_KINDS: dict[str, RunKind] = {}


def register_run_kind(kind: RunKind) -> RunKind:
    """Register how to open run folders of ``kind.name``. Usage: ``register_run_kind(RunKind("fff", load, cfg))``."""
    RUN_KINDS[kind.name] = kind
    return kind


def _kinds() -> dict[str, RunKind]:
    """Every known kind, its module imported on first use."""
    for name, module in KIND_MODULES.items():
        if name not in RUN_KINDS:
            importlib.import_module(module)
    return RUN_KINDS


def get_run_kind(name: str) -> RunKind:
    """The registered kind ``name`` (or an alias of it); a clear error lists the known ones."""
    kinds = _kinds()
    for k in kinds.values():
        if name == k.name or name in k.aliases:
            return k
    raise ValueError(f"unknown run kind {name!r}; known kinds: {', '.join(sorted(kinds))}")


def write_run_kind(run_dir: str | Path, kind: str) -> None:
    """Write ``RUN/run.json`` saying what ``run_dir`` holds (atomically). Usage: ``write_run_kind(out, "train")``."""
    atomic_write_json(Path(run_dir) / RUN_FILE, {"kind": kind, "format": FORMAT})


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt: {' '.join(str(e).split())}") from None


def run_kind(run_dir: str | Path) -> str:
    """The kind of run in ``run_dir``: its ``run.json``, else (older folders) read off ``config.json``.

    Raises ``FileNotFoundError`` for a missing folder or one that is not a run folder, ``ValueError``
    for an unreadable ``run.json`` or an unknown kind. Usage: ``run_kind("runs/ind") == "train"``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    marker = run_dir / RUN_FILE
    if marker.exists():
        data = _read_json(marker)
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
            raise ValueError(f'{marker} does not say the run\'s kind (expected {{"kind": ...}}), got {data!r}')
        return get_run_kind(data["kind"]).name
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    config = _read_json(cfg_path)
    if isinstance(config, dict) and isinstance(config.get("kind"), str):
        return get_run_kind(config["kind"]).name
    kinds = _kinds()
    for k in kinds.values():  # written before run.json: the old guess, kept for those folders only
        if k.name != "train" and k.looks_like is not None and k.looks_like(config):
            return k.name
    return "train"


def _kind_of(run_dir: str | Path, kind: str | None) -> RunKind:
    """The folder's kind; with ``kind``, refuse a folder of another kind, naming both."""
    found = get_run_kind(run_kind(run_dir))
    if kind is not None and found.name != kind:
        want = get_run_kind(kind)
        raise ValueError(
            f"{run_dir} is a `{found.command or found.name}` run, not a `{want.command or want.name}` "
            f"run; open it with topotorch.runs.open_run"
        )
    return found


def open_run(run_dir: str | Path, kind: str | None = None) -> Any:
    """Open any run folder with the loader of its kind (a ``TrainResult``, an ``FFFRunResult``, ...);
    with ``kind``, refuse a folder of another kind. Usage: ``open_run("runs/ind").model``."""
    return _kind_of(run_dir, kind).open(Path(run_dir))


def open_config(run_dir: str | Path, kind: str | None = None) -> Any:
    """The config a run folder was made with; with ``kind``, refuse a folder of another kind, naming both.

    Usage: ``open_config("runs/ind", kind="train").steps``.
    """
    return _kind_of(run_dir, kind).config(Path(run_dir))
