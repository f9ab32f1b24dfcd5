"""Where this process stands in a ``torch.distributed`` job, and joining the one torchrun describes.

>>> ctx = dist_context()  # world 1, rank 0 without torchrun
>>> ctx.main  # rank 0: the one that writes files
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistContext:
    """Where this process stands in a ``torch.distributed`` job (world 1: a plain single process)."""

    world: int = 1
    rank: int = 0
    created: bool = False  # we initialised the process group, so we tear it down
    comm_bytes: int = 0  # payload bytes this rank put into collectives (all-reduce, broadcast)

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_context() -> DistContext:
    """Join the ``torch.distributed`` job described by torchrun's environment, if any.

    An already initialised process group is used as is; otherwise ``WORLD_SIZE`` > 1 (with
    ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) starts one: backend ``gloo`` on CPU, or the one named
    by ``TOPOTORCH_DIST_BACKEND`` (e.g. ``nccl``). Usage: ``ctx = dist_context(); ctx.rank``.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return DistContext()
    if dist.is_initialized():
        return DistContext(dist.get_world_size(), dist.get_rank())
    raw = os.environ.get("WORLD_SIZE", "1") or "1"
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {raw!r}") from None
    if world <= 1:
        return DistContext()
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun")
    dist.init_process_group(backend=os.environ.get("TOPOTORCH_DIST_BACKEND", "gloo"))
    return DistContext(dist.get_world_size(), dist.get_rank(), created=True)
