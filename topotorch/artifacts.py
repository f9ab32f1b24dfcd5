"""One way to put tensors on disk: an atomic, checksummed safetensors file plus a JSON description.

Everything topotorch saves for later — training checkpoints, compact and shrunk models, topographic
compressions — is the same pair of files:

* ``NAME.safetensors`` holds the tensors (no pickle: loading never runs code);
* ``NAME.json`` (or any JSON path the caller picks) describes them, and records the tensor file's
  SHA-256 under ``"sha256"``.

Why a pair, and why this order. A file is written to ``PATH.tmp``, fsync'ed, given the common file mode
(:func:`file_mode`) and renamed over ``PATH`` — a rename is atomic, so a crash leaves the old file or the
new one, never half of one. The tensor file goes first and the JSON last, so a JSON on disk always names
a complete tensor file; if a crash falls between the two, the checksum in the old JSON no longer matches
the new tensors and the pair is refused instead of silently mixing two saves. On reading, the tensor
file is hashed before safetensors parses it, so truncation or a flipped bit is reported as such (naming
the file), not as an obscure parser error.

    >>> write_artifact("out/model.safetensors", "out/model.json", {"w": torch.ones(3)}, {"format": "mine"})
    >>> tensors, meta = read_artifact("out/model.safetensors", "out/model.json", kind="mine")
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

# bytes hashed per read: big enough to be fast, small enough not to hold a model twice in memory
_HASH_CHUNK = 1 << 22


class ArtifactError(ValueError):
    """A saved artifact is missing, truncated, corrupt or not of the expected kind; the message names the file."""


_UMASK: int | None = None


def file_mode() -> int:
    """The mode every file topotorch writes gets: 0666 minus the process umask (0644 under umask 022).

    Usage: ``os.chmod(path, file_mode())``.
    """
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)  # read the umask (the only portable way), then put it back
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def set_file_mode(path: Path) -> None:
    """Give ``path`` the common mode (:func:`file_mode`): files from tempfile or safetensors come out 0600.

    Usage: ``set_file_mode(Path("out/report.html"))``.
    """
    os.chmod(path, file_mode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename (never a half-written file).

    Usage: ``atomic_write_bytes(Path("out/x.bin"), b"...")``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    set_file_mode(tmp)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically. Usage: ``atomic_write_json(run / "summary.json", s)``."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks. Usage: ``file_sha256(Path("out/model.safetensors"))``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies, one storage each (safetensors refuses tensors that share memory, e.g. tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"tensor {k!r} is a {type(v).__name__}, not a torch.Tensor")
        t = v.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _write_tmp(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[Path, str]:
    """Tensors to ``PATH.tmp``, fsync'ed, in the common mode: (that path, its SHA-256)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(_cpu_tensors(tensors), str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    set_file_mode(tmp)  # safetensors writes 0600; every file topotorch writes gets the same mode
    return tmp, file_sha256(tmp)


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write one safetensors file atomically (``PATH.tmp``, fsync, common mode, rename); return its SHA-256.

    For files that describe themselves in the safetensors header (snapshots). Usage:
    ``digest = write_tensors("out/snapshots.safetensors", tensors, {"format": "mine"})``.
    """
    path = Path(path)
    tmp, digest = _write_tmp(path, tensors, metadata)
    os.replace(tmp, path)
    return digest


def write_artifact(
    tensor_path: str | Path,
    json_path: str | Path,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    tensor_metadata: dict[str, str] | None = None,
    previous: tuple[str | Path, str | Path] | None = None,
) -> dict:
    """Write ``tensors`` and ``meta`` (+ the tensors' ``"sha256"``) as an atomic, checksummed pair.

    ``meta`` must be JSON-able; a ``"format"`` entry names the kind for :func:`read_artifact`.
    ``previous``: paths to move the pair already on disk to before the new one takes its place (a
    checkpoint keeps its last good pair). The tensor file is renamed into place before the JSON,
    so the JSON on disk always describes a whole tensor file. Returns the metadata written.
    Usage: ``write_artifact(d / "model.safetensors", d / "shrunk.json", state, {"format": "topotorch.shrunk"})``.
    """
    st, js = Path(tensor_path), Path(json_path)
    json.dumps(meta)  # refuse a meta that cannot be written before anything on disk changes
    tmp, digest = _write_tmp(st, tensors, tensor_metadata)
    full = {**meta, "sha256": digest}
    if previous is not None and st.exists() and js.exists():
        # a kill between these two renames leaves (previous tensors, current JSON): a consistent pair
        # that a reader may fall back to (see checkpoint's "cross" pair)
        os.replace(st, previous[0])
        os.replace(js, previous[1])
    os.replace(tmp, st)
    atomic_write_json(js, full)
    return full


def read_meta(json_path: str | Path, error: type[Exception] = ArtifactError) -> dict:
    """The JSON half of an artifact as a dict; ``error`` (naming the file) when missing or not a JSON object.

    Usage: ``meta = read_meta("runs/x/shrunk/shrunk.json")``.
    """
    js = Path(json_path)
    if not js.is_file():
        raise error(f"{js} is missing")
    try:
        meta = json.loads(js.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise error(f"metadata {js} is corrupt: {e}") from None
    if not isinstance(meta, dict):
        raise error(f"metadata {js} is corrupt: not a JSON object")
    return meta


def read_artifact(
    tensor_path: str | Path, json_path: str | Path, kind: str | None = None, error: type[Exception] = ArtifactError
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a pair written by :func:`write_artifact`: checksum verified before the tensors are parsed.

    ``kind``: the ``"format"`` the JSON must name (None: any). ``error``: the exception class raised
    (a subclass of :class:`ArtifactError` for each kind of artifact), always naming the broken file.
    Usage: ``tensors, meta = read_artifact(d / "model.safetensors", d / "shrunk.json", kind="topotorch.shrunk")``.
    """
    from safetensors.torch import load_file

    st, js = Path(tensor_path), Path(json_path)
    if not st.is_file():
        raise error(f"{st} is missing")
    meta = read_meta(js, error)
    if kind is not None and meta.get("format") != kind:
        raise error(f"metadata {js} is corrupt: format {meta.get('format')!r}, expected {kind!r}")
    if not isinstance(meta.get("sha256"), str):
        raise error(f"metadata {js} is corrupt: it records no checksum of {st.name}")
    if file_sha256(st) != meta["sha256"]:
        raise error(f"{st} is corrupt or truncated: its checksum does not match {js.name}")
    try:
        tensors = load_file(str(st))
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types (SafetensorError, OSError, ...) for a bad header
        raise error(f"{st} is corrupt: {e}") from None
    return tensors, meta
