"""Layers with a structure of their own: Fast Feedforward (FFF) trees, their conversion and regions.

>>> from topotorch.layers import FFF, fffify, hardening_loss
>>> layer = FFF(64, leaf_width=8, output_width=10, depth=4)
>>> fffify(gpt, "blocks.*.mlp", leaf_width=8)
"""

from topotorch.layers.convert import fffify, mlp_blocks
from topotorch.layers.fff import FFF, UltraFFF, bernoulli_entropy, fff_layers, hardening_loss
from topotorch.layers.fff_regions import (
    LeafUsage,
    class_leaf_table,
    draw_regions,
    format_class_leaf_table,
    layer_inputs,
    leaf_usage,
)
from topotorch.layers.fff_schedule import SoftToHard
from topotorch.layers.fff_sharing import merge_shared_leaves, share_leaves

__all__ = [
    "FFF",
    "UltraFFF",
    "bernoulli_entropy",
    "fff_layers",
    "fffify",
    "hardening_loss",
    "mlp_blocks",
    "merge_shared_leaves",
    "share_leaves",
    "SoftToHard",
    "LeafUsage",
    "class_leaf_table",
    "draw_regions",
    "format_class_leaf_table",
    "layer_inputs",
    "leaf_usage",
]
