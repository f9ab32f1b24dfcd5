"""topotorch: give neural networks a body in space, train brain-like structure, see it, cash it in."""

from topotorch.body import Body
from topotorch.geometry import circle, grid, line, make_layout, pairwise_distance
from topotorch.graph import Connection, Slice, Space, SpatialGraph
from topotorch.graph.conv import conv_graph
from topotorch.graph.traced import coupling_graph
from topotorch.graph.transformer import transformer_graph
from topotorch.objectives import WiringConfig, wiring_cost
from topotorch.relocation import apply_permutation, placement_cost, relocate

__version__ = "0.1.0"

__all__ = [
    "Body",
    "circle",
    "grid",
    "line",
    "make_layout",
    "pairwise_distance",
    "Connection",
    "Slice",
    "Space",
    "SpatialGraph",
    "transformer_graph",
    "conv_graph",
    "coupling_graph",
    "WiringConfig",
    "wiring_cost",
    "apply_permutation",
    "placement_cost",
    "relocate",
]
