"""How many torch threads a run uses: one below a measured amount of work per step, else what the load leaves.

>>> torch.set_num_threads(choose_threads(step_work(model, data.x_train, 64)))
"""

from __future__ import annotations

import os

import numpy as np
import torch

# Below this many multiply-adds per step (parameters x samples x positions in a batch) a run uses one
# torch thread. Measured on the 2-core box shared with other sessions (MLP 64-w-w-10 with SiLU,
# cross-entropy, forward + backward + AdamW step, widths 20-1024, batches 100-4096, best of 3 x 30
# steps after 5 warm-up steps, 1 thread against 2 in the same process). In the quietest moments
# (load ~2.4) 2 threads took 0.84x the 1-thread time at 2.2e7 and 0.73x at 8.7e7 (0.41-0.56x at
# 3e8-1e9); with other work on the cores they were always SLOWER: load 1.5-3.7: 3.1x at 1.9e6, 9.8x at
# 2.3e6, 5.2x at 1.8e7, 3.4x at 3.1e8, 2.6x at 1.2e9; load 4.5: 3.7x at 1.9e5, 7.1x at 2.3e6, 19x at
# 2.7e7, 4.8x at 8.7e7, 6.0x at 3.1e8. So: 1 thread below 1e8 (at most ~1.4x lost on a quiet box,
# up to 19x saved on a busy one), and above it torch's thread count capped by the cores the 1-minute
# load average leaves free.
ONE_THREAD_WORK = 1e8


def step_work(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    """Rough multiply-adds of one training step's forward: parameters x batch x positions per sample
    (token sequences: their length; images: their pixels). Usage: ``step_work(model, data.x_train, 64)``."""
    params = sum(p.numel() for p in model.parameters())
    if x.ndim <= 1:
        positions = 1
    elif not x.is_floating_point():
        positions = x[0].numel()  # token ids: one position each
    else:
        positions = 1 if x.ndim == 2 else (x.shape[1] if x.ndim == 3 else int(np.prod(x.shape[2:])))
    return float(params) * batch * positions


def choose_threads(work: float, cores: int | None = None, load: float | None = None) -> int:
    """Torch threads for a run whose step costs ``work`` multiply-adds (:func:`step_work`): 1 below
    :data:`ONE_THREAD_WORK`, else torch's current count capped by the cores the 1-minute load average
    leaves free (at least 1). Usage: ``torch.set_num_threads(choose_threads(step_work(m, x, 64)))``."""
    if work < ONE_THREAD_WORK:
        return 1
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            load = 0.0
    return max(1, min(torch.get_num_threads(), cores, round(cores - load)))
