"""The model's coupling graph (`core`: Slice, Space, Connection, SpatialGraph) and its builders:
`transformer` (pre-norm transformers), `conv` (residual conv nets), `traced` (any model, via Torch-Pruning)."""

from .core import (  # noqa: F401  (the core API, importable from the package)
    Role,
    RelocateMode,
    Slice,
    Space,
    Connection,
    SpatialGraph,
    normalised_by_feature_norm,
)
