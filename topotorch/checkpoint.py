"""Pickle-free, atomic checkpoints: model, optimizer state and neuron coordinates in safetensors.

A checkpoint is ``NAME.safetensors`` plus ``NAME.json`` (step, optimizer hyper-parameters,
the tensor file's SHA-256): an artifact of :mod:`topotorch.artifacts`, written to temporary files,
fsync'ed and renamed. The previous checkpoint is kept as ``NAME.prev.*``, so a crash mid-write
never loses the last good one; a truncated or corrupted file is detected by its checksum.

    >>> save_checkpoint(run_dir / "checkpoint", model, optimizer, graph, step=1200)
    >>> meta = load_checkpoint(run_dir / "checkpoint", model, optimizer, graph)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

# the atomic writers live in topotorch.artifacts; re-exported here, where callers have always found them
from topotorch.artifacts import (  # noqa: F401
    ArtifactError,
    atomic_write_bytes,
    atomic_write_json,
    file_mode,
    read_artifact,
    set_file_mode,
    write_artifact,
)
from topotorch.graph import SpatialGraph


class CheckpointError(ArtifactError, RuntimeError):
    """A checkpoint is missing, truncated, corrupted or does not fit the model."""


class FallbackWarning(UserWarning):
    """A file was unusable and an older copy (or nothing) was used instead; every command reports it."""


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    if optimizer is None:
        return tensors, scalars
    names: dict[torch.Tensor, str] = {p: n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        n = names.get(p)
        if n is None:
            continue
        for k, v in state.items():
            if isinstance(v, torch.Tensor):  # 0-d tensors too (Adam's step): dtype kept exactly
                tensors[f"optim/{n}/{k}"] = v.detach().cpu().contiguous()
            elif isinstance(v, (int, float, bool)):
                scalars.setdefault(n, {})[k] = v
            else:
                raise CheckpointError(
                    f"optimizer state {n}/{k} of type {type(v).__name__} cannot be saved without pickle"
                )
    return tensors, scalars


def save_checkpoint(
    base: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    graph: SpatialGraph | None = None,
    step: int = 0,
    extra: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Atomically write ``base.safetensors`` + ``base.json``, keeping the previous pair as ``base.prev.*``.

    ``extra`` (JSON-able) and ``extra_tensors`` (e.g. RNG states) travel with the checkpoint and come
    back from :func:`load_checkpoint` as ``meta["extra"]`` and ``meta["extra_tensors"]``.
    Usage: ``save_checkpoint(run / "checkpoint", model, opt, graph, step=1200, extra={"seconds": 3.2})``.
    """
    base = Path(base)
    # tied weights (an embedding that is also the output head) are stored once each: write_artifact copies them
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"extra/{k}": v for k, v in (extra_tensors or {}).items()})
    opt_tensors, opt_scalars = _optimizer_tensors(model, optimizer)
    tensors.update(opt_tensors)
    if graph is not None:
        tensors.update({f"positions/{s.name}": s.positions for s in graph.spaces if s.positions is not None})
    meta = {
        "step": int(step),
        "optimizer": {
            "class": type(optimizer).__name__ if optimizer else None,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            if optimizer
            else [],
            "scalars": opt_scalars,
        },
        "extra": extra or {},
    }
    st_path, js_path = _pair_paths(base)
    write_artifact(st_path, js_path, tensors, meta, previous=_pair_paths(base, prev=True))  # keeps the last good pair


def _pair_paths(base: Path, prev: bool | str = False) -> tuple[Path, Path]:
    """The (tensor file, metadata file) of the checkpoint ``base``, or of its kept previous pair."""
    if prev == "cross":  # a kill between the two renames of save_checkpoint leaves this consistent pair
        return base.with_suffix(".prev.safetensors"), base.with_suffix(".json")
    tag = ".prev" if prev else ""
    return base.with_suffix(f"{tag}.safetensors"), base.with_suffix(f"{tag}.json")


def read_checkpoint(base: Path, prev: bool | str = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint pair (``prev``: the kept previous one); raise :class:`CheckpointError`.

    Usage: ``tensors, meta = read_checkpoint(run / "checkpoint")``.
    """
    base = Path(base)
    st_path, js_path = _pair_paths(base, prev)
    if not st_path.exists() or not js_path.exists():
        raise CheckpointError(f"no checkpoint at {base} (expected {st_path.name} and {js_path.name})")
    return read_artifact(st_path, js_path, error=CheckpointError)


def load_checkpoint(
    base: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    graph: SpatialGraph | None = None,
    fallback: bool = True,
    check_meta: Callable[[dict], None] | None = None,
) -> dict:
    """Load model (and optimizer, coordinates) from ``base``; on corruption fall back to ``base.prev``
    (warning with :class:`FallbackWarning`, naming the broken file and the one used).

    ``check_meta(meta)`` runs on the chosen checkpoint's metadata before anything is loaded into the
    model (e.g. to refuse a checkpoint of another config). Returns the checkpoint's metadata
    (``step``, ``extra``...). Usage: ``load_checkpoint(run / "checkpoint", model)``.
    """
    base = Path(base)
    try:
        tensors, meta = read_checkpoint(base)
    except CheckpointError as err:
        # NB: base.with_suffix(".prev").with_suffix(".safetensors") would name the broken file again
        prev_st, _ = _pair_paths(base, prev=True)
        if not fallback or not prev_st.exists():
            raise
        try:
            tensors, meta = read_checkpoint(base, prev=True)
        except CheckpointError as prev_err:
            try:  # killed between moving NAME.safetensors to .prev and NAME.json to .prev: that pair matches
                tensors, meta = read_checkpoint(base, prev="cross")
            except CheckpointError:
                raise CheckpointError(f"{err}, and the previous checkpoint is unusable too: {prev_err}") from None
        import warnings

        warnings.warn(f"{err}; using the previous checkpoint {prev_st}", FallbackWarning, stacklevel=2)
    if check_meta is not None:
        check_meta(meta)
    state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    # check before loading: load_state_dict copies the tensors that fit before it raises (half-loaded model)
    own = model.state_dict()
    problems = [f"missing {k!r}" for k in own if k not in state]
    problems += [f"unexpected {k!r}" for k in state if k not in own]
    problems += [
        f"{k!r} has shape {tuple(state[k].shape)}, model has {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"checkpoint does not fit the model: {'; '.join(problems[:3])}{more}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not fit the model: {str(e).splitlines()[0]}") from None
    if optimizer is not None and meta["optimizer"]["class"]:
        names = dict(model.named_parameters())
        for key, v in tensors.items():
            if key.startswith("optim/"):
                pname, _, sk = key[len("optim/") :].rpartition("/")
                p = names[pname]
                optimizer.state[p][sk] = v.to(p.device) if v.ndim > 0 else v  # 0-d (step) stays on the CPU
        for pname, sc in meta["optimizer"]["scalars"].items():
            p = names[pname]
            for sk, v in sc.items():
                optimizer.state[p][sk] = torch.tensor(v) if isinstance(v, float) and sk == "step" else v
        for g, saved in zip(optimizer.param_groups, meta["optimizer"]["param_groups"]):
            g.update(saved)
    if graph is not None:
        for s in graph.spaces:
            key = f"positions/{s.name}"
            if key in tensors:
                s.positions = tensors[key].to(torch.float64)
        graph.version += 1
    meta["extra_tensors"] = {k[len("extra/") :]: v for k, v in tensors.items() if k.startswith("extra/")}
    return meta


# -- run folders -------------------------------------------------------------------------------

# what marks a folder as holding a run (`topotorch train` or `topotorch fff`)
RUN_FILES = (
    "config.json",
    "summary.json",
    "metrics.csv",
    "checkpoint.safetensors",
    "checkpoint.json",
    "checkpoint.prev.safetensors",
    "checkpoint.prev.json",
    "snapshots.safetensors",
    "model.safetensors",
    "model.json",
)


class RunFolderExists(ValueError):
    """``--out`` names a folder that already holds a run (and ``--overwrite`` was not given)."""


def run_files(folder: Path) -> list[str]:
    """The run files (:data:`RUN_FILES`) present in ``folder``; [] for a missing or empty folder."""
    folder = Path(folder)
    return [n for n in RUN_FILES if (folder / n).exists()] if folder.is_dir() else []


def prepare_run_folder(folder: Path, overwrite: bool | None, resume_hint: bool = True) -> Path | None:
    """Make ``folder`` ready for a new run; never mix two runs in one folder.

    A folder holding a run (:func:`run_files`) is refused with :class:`RunFolderExists` when
    ``overwrite`` is False; otherwise it is moved aside whole, with one atomic rename, to
    ``FOLDER.old-YYYYmmdd-HHMMSS`` (``-2``, ``-3``... if taken), and that path is returned
    (with a warning naming it). Returns None when nothing was there.
    Usage: ``prepare_run_folder(Path("runs/x"), overwrite=False)``.
    """
    import time

    folder = Path(folder)
    found = run_files(folder)
    if not found:
        return None
    if overwrite is False:
        also = f", or --resume {folder} to continue it" if resume_hint else ""
        raise RunFolderExists(
            f"{folder} already holds a run ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}); pass --overwrite to move it aside to "
            f"{folder.name}.old-<time>{also}, or choose another --out"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, k = folder.with_name(f"{folder.name}.old-{stamp}"), 1
    while dest.exists():
        k += 1
        dest = folder.with_name(f"{folder.name}.old-{stamp}-{k}")
    os.rename(folder, dest)  # one atomic step: the old run is whole either here or there
    import warnings

    warnings.warn(f"{folder} held a run; moved it to {dest}", UserWarning, stacklevel=3)
    return dest
