"""Exact resume: every random state as JSON + tensors, the checks that a folder really holds this run.

A resumed run equals an uninterrupted one bit for bit because a checkpoint holds, besides model,
optimizer and coordinates (:mod:`topotorch.checkpoint`), the state of every generator the run
draws from (Python, NumPy, torch's global one and the batch sampler's), without pickle; DiLoCo
replicas also keep their own AdamW moments beside rank 0's checkpoint. Before any of it is loaded,
the folder's ``config.json`` and the checkpoint's copy of the config must match the run asked for.

    >>> meta, tensors = rng_state(batch_gen)  # into save_checkpoint(extra=..., extra_tensors=...)
    >>> restore_rng(meta, tensors, batch_gen)
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from topotorch.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from topotorch.config import RUNTIME_FIELDS, TrainConfig, config_mismatch


def rng_state(batch_gen: torch.Generator) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every random state a run depends on, as JSON + tensors (no pickle). Usage: ``meta, t = rng_state(gen)``."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    meta = {
        "numpy": {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    tensors = {
        "rng/torch": torch.get_rng_state(),
        "rng/batch": batch_gen.get_state(),
        "rng/numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
    }
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor], batch_gen: torch.Generator) -> None:
    """Put back what :func:`rng_state` saved. Usage: ``restore_rng(meta, tensors, batch_gen)``."""
    n, p = meta["numpy"], meta["python"]
    np.random.set_state(
        ("MT19937", tensors["rng/numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    torch.set_rng_state(tensors["rng/torch"])
    batch_gen.set_state(tensors["rng/batch"])


def check_resumable(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to resume ``run_dir`` when its ``config.json`` differs from ``config`` in a run-defining field."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    saved = TrainConfig.from_json(path).to_dict()
    ours = config.to_dict()
    diff = [k for k in ours if k not in RUNTIME_FIELDS and saved.get(k) != ours[k]]
    if diff:
        shown = ", ".join(f"{k}={saved.get(k)!r} (asked {ours[k]!r})" for k in diff[:3])
        raise ValueError(f"cannot resume {run_dir}: its config.json differs in {shown}")


def checkpoint_config_check(base: Path, config: TrainConfig) -> Callable[[dict], None]:
    """A ``check_meta`` for :func:`load_checkpoint`: refuse a checkpoint written under another config
    (checkpoints before this check carry none and pass). Usage: ``load_checkpoint(b, m, check_meta=...)``."""

    def check(meta: dict) -> None:
        saved = (meta.get("extra") or {}).get("config")
        if saved is None:
            return
        diff = config_mismatch(saved, config)
        if diff:
            more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
            raise CheckpointError(
                f"{base.parent}: the checkpoint was written by another run than {base.parent / 'config.json'} "
                f"describes; checkpoint has {', '.join(diff[:4])}{more}. "
                "The folder mixes two runs: train afresh with --overwrite"
            )

    return check


def has_checkpoint(base: Path) -> bool:
    """Whether a checkpoint (or its previous copy) exists at ``base``."""
    return any(base.with_suffix(s).exists() for s in (".safetensors", ".json", ".prev.safetensors"))


def inner_base(run_dir: Path, rank: int, step: int) -> Path:
    """Where DiLoCo rank ``rank`` keeps its own optimizer state at ``step``."""
    return run_dir / f"inner-rank{rank}-step{step:09d}"


def save_inner_state(run_dir: Path, rank: int, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """Rank ``rank``'s inner optimizer state at ``step`` (DiLoCo); the two newest steps are kept."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(inner_base(run_dir, rank, step), model, opt, None, step=step)
    for old in sorted(run_dir.glob(f"inner-rank{rank}-step*.json"))[:-2]:
        for f in run_dir.glob(old.stem + ".*"):
            f.unlink(missing_ok=True)


def load_inner_state(run_dir: Path, rank: int, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """This DiLoCo replica's own AdamW state at ``step``, saved beside rank 0's; rank 0's (a warning) without it."""
    inner = inner_base(run_dir, rank, step)
    if has_checkpoint(inner):
        load_checkpoint(inner, model, opt, None)
    else:
        warnings.warn(
            f"no inner optimizer state for rank {rank} at step {step} ({inner.name}); using rank 0's", stacklevel=3
        )
