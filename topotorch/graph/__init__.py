"""The model's coupling graph (`core`: Slice, Space, Connection, SpatialGraph) and its builders:
`flow` (any model, from its data flow: `rules` per ATen op over `axes`; `traced.coupling_graph` is its old name),
`transformer` (our TinyGPT), `conv` (our SmallResNet); `verify` checks every graph keeps the model's function."""

from .core import (  # noqa: F401  (the core API, importable from the package)
    Connection,
    RelocateMode,
    Role,
    Slice,
    Space,
    SpatialGraph,
    active_mask,
    aggregate,
    check_threshold,
    normalised_by_feature_norm,
    slice_index,
    zero_inactive_,
)
