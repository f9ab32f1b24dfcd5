"""Activations for sparse dictionaries: from any model by hook-point name, on the fly or from a disk cache.

A dictionary is trained on the rows of one layer's activations. Which layer is named the way
``model.named_modules()`` names it, with shell patterns (:func:`fnmatch.fnmatch`), so the same
string works for our models (``gpt.blocks.1``), Hugging Face models (``hf.transformer.h.1``) and
any ``nn.Module``. The point is the module's *output* by default; ``NAME:input`` is its (first)
input. A transcoder reads a pair: the input of a block and its output (``transcoder_points``).

Capturing uses plain forward hooks (nothing to wrap or convert). The model does not have to finish
its forward: once the last hook point needed has fired, that hook raises a private exception that
:func:`capture` catches, so the layers above the hook point never run (an SAE on block 0 of a
12-block model costs one block per batch, not twelve).

Every batch of activations is flattened over positions to ``[B·T, d]`` (the feature axis is the
last one unless ``feature_dim`` says otherwise); positions can be dropped first: the first
``skip_first`` of each sequence (a BOS token whose activations are outliers) and padding (an
``attention_mask`` in a dict batch, or ``pad_id`` in the token ids).

Two sources, one API (both are iterables of ``[batch_size, d]`` tensors, or ``(x_in, x_out)``
pairs for a transcoder, with ``d_in``/``d_out``):

* :class:`ModelActivations` — computed on the fly from an iterable of model inputs;
* :class:`CachedActivations` — read from a folder written by :func:`write_cache`: safetensors
  shards, each written to a temporary file and renamed (a crash never leaves a half shard that
  looks finished), listed in ``manifest.json`` as they finish. A rerun after a crash skips the
  finished shards' input batches without running the model (checking that they are the same
  inputs) and continues. Reading memory-maps the shards (numpy ``memmap`` on the safetensors data
  offsets), so a cache larger than RAM is fine, and shuffles rows across all shards with a seed.

    >>> acts = ModelActivations(model, batches, "gpt.blocks.1", batch_size=4096)
    >>> write_cache(acts, "cache/blocks.1")  # resumable
    >>> for x in CachedActivations("cache/blocks.1", batch_size=4096, seed=0):
    ...     ...
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from topotorch.checkpoint import atomic_write_json, set_file_mode

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
SIDES = ("output", "input")
MANIFEST = "manifest.json"
CACHE_VERSION = 1


class HookPointError(ValueError):
    """A hook-point pattern matched no module (the message lists close names) or is malformed."""


class CacheError(ValueError):
    """An activation cache folder is unusable: missing or truncated shard, shapes that disagree, bad manifest."""


class _StopForward(Exception):
    """Raised by the last hook a capture needs: the rest of the forward is skipped. Never escapes :func:`capture`."""


# -- hook points ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookPoint:
    """One place to read: a module (by its ``named_modules`` name) and which side of it."""

    module_name: str
    side: str = "output"  # "output" | "input"

    @property
    def name(self) -> str:
        return self.module_name if self.side == "output" else f"{self.module_name}:{self.side}"


def _split_side(pattern: str) -> tuple[str, str]:
    base, sep, side = pattern.rpartition(":")
    if not sep:
        return pattern, "output"
    if side not in SIDES:
        raise HookPointError(f"hook point {pattern!r}: the part after ':' must be one of {', '.join(SIDES)}")
    return base, side


def find_hook_points(model: nn.Module, patterns: str | Sequence[str]) -> list[HookPoint]:
    """The hook points ``patterns`` name in ``model`` (module order; each pattern must match something).

    A pattern is an fnmatch pattern over ``model.named_modules()`` names, optionally followed by
    ``:input`` or ``:output`` (default). A pattern that matches nothing raises :class:`HookPointError`
    listing the closest module names. Usage: ``find_hook_points(model, "gpt.blocks.*")``.
    """
    names = [n for n, _ in model.named_modules() if n]  # the root module is the model itself: not a hook point
    found: list[HookPoint] = []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        base, side = _split_side(pattern)
        hits = [n for n in names if fnmatch.fnmatchcase(n, base)]
        if not hits:
            close = difflib.get_close_matches(base, names, n=6, cutoff=0.3) or names[:6]
            raise HookPointError(
                f"hook point {pattern!r} matches no module of {type(model).__name__}; close names: {', '.join(close)}"
            )
        found += [HookPoint(n, side) for n in hits if HookPoint(n, side) not in found]
    return found


def transcoder_points(model: nn.Module, pattern: str) -> tuple[HookPoint, HookPoint]:
    """(input, output) of the one module ``pattern`` names: what a transcoder maps. Usage:
    ``transcoder_points(model, "gpt.blocks.0.mlp")``."""
    base, _ = _split_side(pattern)
    points = find_hook_points(model, base)
    if len(points) != 1:
        raise HookPointError(
            f"a transcoder reads one module; {pattern!r} matches {len(points)}: "
            f"{', '.join(p.module_name for p in points[:6])}"
        )
    return HookPoint(points[0].module_name, "input"), points[0]


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The activation a module hands on: the tensor itself, or the first tensor of a tuple / HF output."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, torch.Tensor):
                return v
    return None


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return _first_tensor(args) if _first_tensor(args) is not None else _first_tensor(kwargs)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on one batch: a tensor, a tuple/list (its first element is the input, e.g. ``(x, y)``),
    or a dict of keyword arguments (Hugging Face style)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(inputs[0])
    return model(inputs)


def capture(
    model: nn.Module, inputs: Any, points: Sequence[HookPoint], stop_early: bool = True
) -> dict[str, torch.Tensor]:
    """One forward of ``model`` on ``inputs``; the activation at each hook point, by ``HookPoint.name``.

    A module called several times gives its first call. With ``stop_early`` the forward ends as
    soon as every point has fired. Raises :class:`HookPointError` if a point never fired.
    Usage: ``capture(model, ids, find_hook_points(model, "gpt.blocks.0"))["gpt.blocks.0"]``.
    """
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    wanted = {p.name for p in points}

    def record(name: str, value: torch.Tensor | None) -> None:
        if name in got:
            return
        if value is None:
            raise HookPointError(f"hook point {name!r} carries no tensor")
        got[name] = value.detach().clone()  # the model may later write into this tensor in place
        if stop_early and wanted <= got.keys():
            raise _StopForward

    handles = []
    try:
        for p in points:
            m = modules[p.module_name]
            if p.side == "input":
                handles.append(
                    m.register_forward_pre_hook(
                        lambda mod, args, kwargs, n=p.name: record(n, _input_tensor(args, kwargs)), with_kwargs=True
                    )
                )
            else:
                handles.append(m.register_forward_hook(lambda mod, args, out, n=p.name: record(n, _first_tensor(out))))
        try:
            call_model(model, inputs)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = wanted - got.keys()
    if missing:
        raise HookPointError(
            f"hook point(s) {', '.join(sorted(missing))} never ran in the forward of {type(model).__name__}"
        )
    return got


# -- flattening over positions ---------------------------------------------------------------------


def _token_ids(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, dict):
        return inputs.get("input_ids")
    t = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    return t if isinstance(t, torch.Tensor) and not t.is_floating_point() else None


def keep_mask(
    inputs: Any, shape: tuple[int, ...], skip_first: int = 0, pad_id: int | None = None
) -> torch.Tensor | None:
    """Which positions of a ``[B, T]`` batch to keep (None: all): not the first ``skip_first`` of each
    sequence, not padding (``attention_mask == 0`` in a dict batch, or token id ``pad_id``)."""
    masked = isinstance(inputs, dict) and "attention_mask" in inputs
    if len(shape) < 2 or (skip_first == 0 and pad_id is None and not masked):
        return None
    keep = torch.ones(shape[:2], dtype=torch.bool)
    keep[:, :skip_first] = False
    if isinstance(inputs, dict) and inputs.get("attention_mask") is not None:
        keep &= inputs["attention_mask"].to(torch.bool).reshape(shape[:2]).cpu()
    ids = _token_ids(inputs)
    if pad_id is not None and ids is not None and tuple(ids.shape[:2]) == tuple(shape[:2]):
        keep &= ids.cpu() != pad_id
    return keep


def flatten_positions(act: torch.Tensor, keep: torch.Tensor | None = None, feature_dim: int = -1) -> torch.Tensor:
    """``[B, T, ..., d]`` -> ``[N, d]`` rows (feature axis ``feature_dim`` moved last), only kept positions."""
    if act.ndim < 2:
        raise ValueError(f"an activation needs a batch and a feature axis, got shape {tuple(act.shape)}")
    act = act.movedim(feature_dim, -1)
    if keep is not None:
        act = act[keep.to(act.device)]
    return act.reshape(-1, act.shape[-1])


def _rebatch(
    chunks: Iterable[tuple[torch.Tensor, ...]], batch_size: int | None, drop_last: bool
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Re-cut a stream of row chunks (tuples of equally long tensors) into batches of ``batch_size`` rows."""
    if batch_size is None:
        yield from chunks
        return
    buf: list[tuple[torch.Tensor, ...]] = []
    n = 0
    for chunk in chunks:
        buf.append(chunk)
        n += len(chunk[0])
        if n >= batch_size:
            cat = tuple(torch.cat(parts) for parts in zip(*buf))
            full = (n // batch_size) * batch_size
            for i in range(0, full, batch_size):
                yield tuple(t[i : i + batch_size] for t in cat)
            buf, n = ([tuple(t[full:] for t in cat)], n - full) if n > full else ([], 0)
    if buf and n and not drop_last:
        yield tuple(torch.cat(parts) for parts in zip(*buf))


def _single(batch: tuple[torch.Tensor, ...]) -> Batch:
    return batch[0] if len(batch) == 1 else (batch[0], batch[1])


# -- on the fly ----------------------------------------------------------------------------------


class ModelActivations:
    """Activations of ``model`` at a hook point, computed batch by batch from ``batches`` of model inputs.

    ``hook``: one pattern that names exactly one point (``"gpt.blocks.1"``, ``"hf.transformer.h.0:input"``).
    ``out_hook``: for a transcoder, the point it predicts (each item is then a pair ``(x_in, x_out)``);
    ``transcoder=True`` takes ``hook``'s module's input and output. ``batch_size`` rows per item (None:
    one item per model batch). ``dtype``: cast the rows (default: as the model gives them).

    Usage: ``ModelActivations(model, [ids[i:i+32] for i in range(0, len(ids), 32)], "gpt.blocks.0", batch_size=2048)``.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        hook: str,
        *,
        out_hook: str | None = None,
        transcoder: bool = False,
        batch_size: int | None = None,
        skip_first: int = 0,
        pad_id: int | None = None,
        feature_dim: int = -1,
        dtype: torch.dtype | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ):
        self.model, self.batches = model, batches
        if transcoder:
            if out_hook is not None:
                raise ValueError("give either transcoder=True (input -> output of one module) or out_hook, not both")
            self.points: list[HookPoint] = list(transcoder_points(model, hook))
        else:
            self.points = [self._one(hook)] + ([self._one(out_hook)] if out_hook is not None else [])
        self.batch_size, self.skip_first, self.pad_id = batch_size, skip_first, pad_id
        self.feature_dim, self.dtype, self.drop_last, self.device = feature_dim, dtype, drop_last, device
        self._dims: tuple[int, int | None] | None = None

    def _one(self, pattern: str) -> HookPoint:
        points = find_hook_points(self.model, pattern)
        if len(points) != 1:
            names = ", ".join(p.name for p in points[:6])
            raise HookPointError(f"{pattern!r} matches {len(points)} hook points ({names}); name exactly one")
        return points[0]

    @property
    def hook_names(self) -> list[str]:
        return [p.name for p in self.points]

    def _dims_from(self, rows: tuple[torch.Tensor, ...]) -> None:
        if self._dims is None:
            self._dims = (rows[0].shape[1], rows[1].shape[1] if len(rows) > 1 else None)

    @property
    def d_in(self) -> int:
        """Width of the activations (runs the model on the first batch if not yet known)."""
        if self._dims is None:
            next(iter(self.per_input_batch()))
        assert self._dims is not None
        return self._dims[0]

    @property
    def d_out(self) -> int | None:
        """Width of a transcoder's target (None for an SAE)."""
        _ = self.d_in
        assert self._dims is not None
        return self._dims[1]

    def rows(self, inputs: Any) -> tuple[torch.Tensor, ...]:
        """The rows (one per kept position) of one model batch: ``(x,)`` or ``(x_in, x_out)``."""
        if self.device is not None:
            inputs = _to(inputs, self.device)
        with torch.no_grad():
            got = capture(self.model, inputs, self.points)
        acts = [got[p.name] for p in self.points]
        if len(acts) == 2 and acts[0].shape[:-1] != acts[1].shape[:-1] and self.feature_dim == -1:
            raise ValueError(
                f"transcoder points {self.hook_names[0]} {tuple(acts[0].shape)} and {self.hook_names[1]} "
                f"{tuple(acts[1].shape)} have different positions"
            )
        keep = keep_mask(inputs, tuple(acts[0].shape), self.skip_first, self.pad_id)
        out = tuple(flatten_positions(a, keep, self.feature_dim) for a in acts)
        if self.dtype is not None:
            out = tuple(a.to(self.dtype) for a in out)
        self._dims_from(out)
        return out

    def per_input_batch(self, skip: int = 0, seen: list | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """The rows of each model batch in turn; the first ``skip`` batches are passed over without
        running the model (their inputs are appended to ``seen`` if given, for checking)."""
        for i, inputs in enumerate(self.batches):
            if i < skip:
                if seen is not None:
                    seen.append(inputs)
                continue
            yield self.rows(inputs)

    def __iter__(self) -> Iterator[Batch]:
        for b in _rebatch(self.per_input_batch(), self.batch_size, self.drop_last):
            yield _single(b)


def _to(inputs: Any, device: torch.device | str) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


# -- disk cache: write ---------------------------------------------------------------------------


def _fingerprint(inputs_list: Sequence[Any]) -> str:
    """A hash of a shard's model inputs: a resumed cache checks it is fed the same batches."""
    h = hashlib.sha1()
    for inputs in inputs_list:
        for t in _tensors(inputs):
            t = t.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tensors(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, dict):
        return [t for k in sorted(inputs) for t in _tensors(inputs[k])]
    if isinstance(inputs, (tuple, list)):
        return [t for v in inputs for t in _tensors(v)]
    return []


def _write_shard(path: Path, rows: tuple[torch.Tensor, ...]) -> None:
    """A safetensors shard (``x``, and ``y`` for a transcoder), via a temporary file, fsync and rename."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in zip(("x", "y"), rows)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    set_file_mode(tmp)
    os.replace(tmp, path)


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path} is unreadable: {' '.join(str(e).split())}") from None
    if not isinstance(m, dict) or m.get("version") != CACHE_VERSION or not isinstance(m.get("shards"), list):
        raise CacheError(f"{path} is not an activation cache manifest (version {CACHE_VERSION})")
    return m


def write_cache(
    source: ModelActivations,
    folder: str | Path,
    *,
    batches_per_shard: int = 16,
    max_rows: int | None = None,
    progress: Any = None,
) -> dict:
    """Write ``source``'s activations to ``folder`` as shards of ``batches_per_shard`` model batches; resumable.

    Each finished shard is renamed into place and then recorded in ``manifest.json``; a rerun on
    the same folder (after a crash or Ctrl-C) skips the recorded shards' input batches without
    running the model, checks they are the same inputs, and continues. ``max_rows`` stops after the
    shard that reaches it. A folder whose manifest says it is complete is returned as it is.
    ``progress``: called with the number of rows written so far after each shard. Returns the manifest.
    Usage: ``write_cache(ModelActivations(model, batches, "gpt.blocks.1"), "cache/b1")``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(folder)
    header = {"version": CACHE_VERSION, "hooks": source.hook_names, "batches_per_shard": batches_per_shard}
    if manifest is None:
        manifest = {**header, "shards": [], "complete": False, "rows": 0}
    elif manifest.get("hooks") != source.hook_names or manifest.get("batches_per_shard") != batches_per_shard:
        raise CacheError(
            f"{folder / MANIFEST} was written for hooks {manifest.get('hooks')} with "
            f"{manifest.get('batches_per_shard')} batches per shard; this call asks for "
            f"{source.hook_names} with {batches_per_shard}: use another folder"
        )
    if manifest["complete"]:
        return manifest
    for tmp in folder.glob("*.tmp"):  # a shard being written when the last run died
        tmp.unlink()
    done = len(manifest["shards"])
    seen: list = []
    pending: list[tuple[torch.Tensor, ...]] = []
    pending_inputs: list = []
    checked = 0

    def check_skipped() -> None:
        nonlocal checked
        while len(seen) >= (checked + 1) * batches_per_shard and checked < done:
            chunk = seen[checked * batches_per_shard : (checked + 1) * batches_per_shard]
            if _fingerprint(chunk) != manifest["shards"][checked]["inputs_sha1"]:
                raise CacheError(
                    f"resuming {folder}: the model inputs of shard {checked} differ from the ones it was "
                    "written from (the batches must come in the same order on every run)"
                )
            checked += 1

    def flush() -> None:
        i = len(manifest["shards"])
        rows = tuple(torch.cat(parts) for parts in zip(*pending))
        name = f"shard-{i:05d}.safetensors"
        _write_shard(folder / name, rows)
        manifest["shards"].append(
            {
                "file": name,
                "rows": len(rows[0]),
                "inputs_sha1": _fingerprint(pending_inputs),
                "d": [int(r.shape[1]) for r in rows],
                "dtype": str(rows[0].dtype).removeprefix("torch."),
            }
        )
        manifest["rows"] = int(sum(s["rows"] for s in manifest["shards"]))
        atomic_write_json(folder / MANIFEST, manifest)
        pending.clear()
        pending_inputs.clear()
        if progress is not None:
            progress(manifest["rows"])

    if max_rows is not None and manifest["rows"] >= max_rows:
        manifest["complete"] = True
        atomic_write_json(folder / MANIFEST, manifest)
        return manifest
    skip = done * batches_per_shard
    for i, inputs in enumerate(source.batches):
        if i < skip:
            seen.append(inputs)
            check_skipped()
            continue
        pending.append(source.rows(inputs))
        pending_inputs.append(inputs)
        if len(pending) == batches_per_shard:
            flush()
            if max_rows is not None and manifest["rows"] >= max_rows:
                break
    else:
        check_skipped()
        if checked < done:
            raise CacheError(
                f"resuming {folder}: the inputs ran out after {len(seen)} batches, before the "
                f"{done * batches_per_shard} the finished shards were written from"
            )
        if pending:
            flush()
    manifest["complete"] = True
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


# -- disk cache: read ----------------------------------------------------------------------------

_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts; :class:`CacheError` if the file is
    cut short or not safetensors (checked against the file size: a truncated tensor is caught here)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CacheError(f"{path} is truncated ({size} bytes): not a safetensors file")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise CacheError(f"{path} is truncated: its header says {n} bytes, the file has {size - 8}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheError(f"{path} has a corrupt header: {e}") from None
    start = 8 + n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if start + end > size:
        raise CacheError(f"{path} is truncated: its tensors need {start + end} bytes, the file has {size}")
    return header, start


def _memmap(path: Path, key: str) -> tuple[np.memmap, str]:
    header, start = safetensors_header(path)
    if key not in header:
        raise CacheError(f"{path} has no tensor {key!r} (has {', '.join(k for k in header if k != '__metadata__')})")
    info = header[key]
    if info["dtype"] not in _NP_DTYPES:
        raise CacheError(f"{path}: tensor {key!r} has dtype {info['dtype']}, not a float type")
    lo = info["data_offsets"][0]
    shape = tuple(info["shape"])
    if len(shape) != 2:
        raise CacheError(f"{path}: tensor {key!r} has shape {list(shape)}, expected [rows, d]")
    return np.memmap(path, dtype=_NP_DTYPES[info["dtype"]], mode="r", offset=start + lo, shape=shape), info["dtype"]


class CachedActivations:
    """Activations read back from a :func:`write_cache` folder, memory-mapped, optionally shuffled.

    Each pass (``epochs`` of them) visits every row once, in an order drawn from ``seed`` and the
    epoch across all shards (``shuffle=False``: shard order). Rows come as ``batch_size`` tensors
    (the last one may be short unless ``drop_last``), or ``(x_in, x_out)`` pairs for a transcoder cache.
    The folder is checked on open: an unfinished cache, a missing or truncated shard, or shards whose
    widths disagree raise :class:`CacheError` naming the shard.
    Usage: ``for x in CachedActivations("cache/b1", batch_size=4096, seed=0): ...``.
    """

    def __init__(
        self,
        folder: str | Path,
        batch_size: int = 4096,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int = 1,
        drop_last: bool = False,
        allow_incomplete: bool = False,
        dtype: torch.dtype | None = None,
    ):
        self.folder = Path(folder)
        manifest = _read_manifest(self.folder)
        if manifest is None:
            raise CacheError(f"{self.folder} is not an activation cache (no {MANIFEST})")
        if not manifest["complete"] and not allow_incomplete:
            raise CacheError(
                f"{self.folder} is an unfinished cache ({len(manifest['shards'])} shards): rerun "
                "write_cache to finish it, or pass allow_incomplete=True"
            )
        if not manifest["shards"]:
            raise CacheError(f"{self.folder} holds no shards")
        self.manifest, self.hooks = manifest, manifest["hooks"]
        self.batch_size, self.shuffle, self.seed, self.epochs = batch_size, shuffle, seed, epochs
        self.drop_last, self.dtype = drop_last, dtype
        self.arrays: list[list[np.memmap]] = []
        self.torch_dtype: torch.dtype | None = None
        keys = ("x", "y")[: len(self.hooks)]
        widths = None
        for s in manifest["shards"]:
            path = self.folder / s["file"]
            if not path.exists():
                raise CacheError(f"{path} is missing (listed in {self.folder / MANIFEST})")
            maps = [_memmap(path, k) for k in keys]
            shard_widths = [m.shape[1] for m, _ in maps]
            if any(m.shape[0] != s["rows"] for m, _ in maps):
                raise CacheError(f"{path} has {maps[0][0].shape[0]} rows, the manifest says {s['rows']}")
            if widths is None:
                widths, self.torch_dtype = shard_widths, _TORCH_DTYPES[maps[0][1]]
            elif shard_widths != widths:
                raise CacheError(f"shape mismatch: {path} has width {shard_widths}, earlier shards have {widths}")
            self.arrays.append([m for m, _ in maps])
        assert widths is not None
        self.d_in, self.d_out = widths[0], (widths[1] if len(widths) > 1 else None)
        self.rows = np.array([s["rows"] for s in manifest["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)])

    def __len__(self) -> int:
        """Number of rows (positions) in the cache."""
        return int(self.offsets[-1])

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.torch_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.to(self.dtype) if self.dtype is not None else t

    def gather(self, index: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Rows ``index`` (global row numbers) as tensors, read shard by shard in sorted order (page-friendly)."""
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        order = np.argsort(shard, kind="stable")
        out = []
        for k in range(len(self.arrays[0])):
            parts = []
            for s in np.unique(shard):
                local = index[order][shard[order] == s] - self.offsets[s]
                sort = np.argsort(local, kind="stable")
                rows = np.empty((len(local), self.arrays[s][k].shape[1]), dtype=self.arrays[s][k].dtype)
                rows[sort] = self.arrays[s][k][local[sort]]
                parts.append(rows)
            cat = np.concatenate(parts)
            back = np.empty_like(cat)
            back[order] = cat
            out.append(self._tensor(back))
        return tuple(out)

    def order(self, epoch: int) -> np.ndarray:
        """The row order of pass ``epoch``."""
        if not self.shuffle:
            return np.arange(len(self))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def __iter__(self) -> Iterator[Batch]:
        n = len(self)
        for epoch in range(self.epochs):
            idx = self.order(epoch)
            stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
            for i in range(0, stop, self.batch_size):
                yield _single(self.gather(idx[i : i + self.batch_size]))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every row, in shard order, in memory."""
        return tuple(self._tensor(np.concatenate([a[k] for a in self.arrays])) for k in range(len(self.arrays[0])))


def activations(source: Any, *args: Any, **kwargs: Any) -> ModelActivations | CachedActivations:
    """The one entry point: a cache folder (a path) -> :class:`CachedActivations`, a model ->
    :class:`ModelActivations`. Usage: ``activations("cache/b1", batch_size=4096)`` or
    ``activations(model, batches, "gpt.blocks.1", batch_size=4096)``."""
    if isinstance(source, (str, os.PathLike)):
        return CachedActivations(Path(source), *args, **kwargs)
    if isinstance(source, nn.Module):
        return ModelActivations(source, *args, **kwargs)
    raise TypeError(f"activations(): give a cache folder or an nn.Module, not {type(source).__name__}")
