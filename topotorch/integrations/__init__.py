"""Thin adapters that put a :class:`~topotorch.body.Body` into other people's training loops.

A body needs three moments of any loop — after the gradients are final (add the structure
penalty's gradient), after the optimizer step (relocate, permuting the optimizer's state), and at
checkpoints (save / restore the coordinates) — so each adapter is a callback of a few lines over
:meth:`Body.add_gradients`, :meth:`Body.after_step` and :meth:`Body.state_dict`:

* :mod:`topotorch.integrations.hf` — ``BodyCallback`` for Hugging Face ``transformers.Trainer``
  (and through it Accelerate's single / multi-process runs);
* :mod:`topotorch.integrations.lightning` — ``BodyCallback`` for ``lightning.pytorch.Trainer``.

The frameworks are optional dependencies: they are imported by those modules only, never by
``import topotorch`` or by this package. What both share lives here: the body state as an atomic,
checksummed pair of files (``topotorch_body.safetensors`` for the coordinates, ``topotorch_body.json``
for the step, relocation count and settings) written by :mod:`topotorch.artifacts`.

    >>> save_body_state(body, "out/checkpoint-400")
    >>> load_body_state(body, "out/checkpoint-400")
"""

from __future__ import annotations

import os
from pathlib import Path

from topotorch.artifacts import read_artifact, write_artifact
from topotorch.body import STATE_FORMAT, Body

BODY_TENSORS = "topotorch_body.safetensors"
BODY_JSON = "topotorch_body.json"


def body_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """The (tensor file, JSON file) a body state occupies in ``folder``. Usage: ``st, js = body_files(ckpt)``."""
    folder = Path(folder)
    return folder / BODY_TENSORS, folder / BODY_JSON


def save_body_state(body: Body, folder: str | os.PathLike) -> Path:
    """Write ``body.state_dict()`` into ``folder`` atomically: coordinates as safetensors, the rest as JSON.

    Returns the JSON path. Usage: ``save_body_state(body, "out/checkpoint-400")``.
    """
    if not isinstance(body, Body):
        raise ValueError(f"body must be a topotorch Body, got {type(body).__name__}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"cannot save the body state: {folder} is not a folder")
    state = body.state_dict()
    positions = {name: t.contiguous() for name, t in state.pop("positions").items()}
    st, js = body_files(folder)
    write_artifact(st, js, positions, state)  # state keeps "format": STATE_FORMAT
    return js


def load_body_state(body: Body, folder: str | os.PathLike) -> dict:
    """Restore a state written by :func:`save_body_state` into ``body`` (checksum verified first); return it.

    Usage: ``load_body_state(body, "out/checkpoint-400")``.
    """
    st, js = body_files(folder)
    positions, meta = read_artifact(st, js, kind=STATE_FORMAT)
    meta.pop("sha256", None)
    state = {**meta, "positions": positions}
    body.load_state_dict(state)
    return state


def has_body_state(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a saved body state (both files). Usage: ``has_body_state(ckpt)``."""
    st, js = body_files(folder)
    return st.is_file() and js.is_file()


__all__ = ["BODY_JSON", "BODY_TENSORS", "body_files", "has_body_state", "load_body_state", "save_body_state"]
