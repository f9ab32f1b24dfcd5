"""Layers with a structure of their own: Fast Feedforward (FFF) trees and their conversion.

    >>> from topotorch.layers import FFF, fffify, hardening_loss
    >>> layer = FFF(64, leaf_width=8, output_width=10, depth=4)
"""

from .fff import FFF, UltraFFF, bernoulli_entropy, fff_layers, hardening_loss

__all__ = ["FFF", "UltraFFF", "bernoulli_entropy", "fff_layers", "hardening_loss"]
