"""topotorch: give neural networks a body in space, train brain-like structure, see it, cash it in."""

from .geometry import circle, grid, line, make_layout, pairwise_distance
from .graph import Connection, Slice, Space, SpatialGraph
from .graph_auto import coupling_graph
from .graph_conv import conv_graph
from .graph_transformer import transformer_graph
from .objectives import WiringConfig, wiring_cost
from .relocation import apply_permutation, placement_cost, relocate

__version__ = "0.1.0"

__all__ = [
    "circle", "grid", "line", "make_layout", "pairwise_distance",
    "Connection", "Slice", "Space", "SpatialGraph", "transformer_graph", "conv_graph", "coupling_graph",
    "WiringConfig", "wiring_cost",
    "apply_permutation", "placement_cost", "relocate",
]
