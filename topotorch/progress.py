"""The progress bar every long job shows (training, FFF runs, sparsity sweeps): rich, or nothing.

>>> with progress_bar(enabled=True) as bar:
...     job = bar.add_task("training", total=100) if bar else None
"""

from __future__ import annotations

import contextlib
from typing import Any


def progress_bar(enabled: bool, description_width: int = 0) -> Any:
    """A ``rich.progress.Progress`` context (description, bar, n/total, elapsed, remaining), or a
    null context yielding None when ``enabled`` is false. Usage: ``with progress_bar(True) as bar: ...``."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    description = f"{{task.description:<{description_width}}}" if description_width else "{task.description}"
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
