"""Small convenience models. Any ``nn.Module`` chain of Linear layers works; these just save typing.

    >>> MLP([4, 20, 20, 2], activation="silu")
    >>> TokenMLP(vocab=59, embed_dim=32, n_tokens=2, widths=[50, 50, 59])   # folded embeddings
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    """An activation module by name (see :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


class MLP(nn.Sequential):
    """Linear layers with an activation between them (none after the last). Usage: ``MLP([64, 100, 10])``."""

    def __init__(self, widths: Sequence[int], activation: str = "silu", bias: bool = True):
        if len(widths) < 2 or any(int(w) < 1 for w in widths):
            raise ValueError(f"MLP needs at least two positive widths, got {list(widths)}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(int(a), int(b), bias=bias))
            if i < len(widths) - 2:
                layers.append(globals()["activation"](activation))
        super().__init__(*layers)
        self.widths = [int(w) for w in widths]


class TokenMLP(nn.Module):
    """Embed ``n_tokens`` tokens with one shared table, concatenate, then an MLP.

    Dimension j of every token's embedding is one neuron in space (the paper's "folded"
    embedding): :meth:`SpatialGraph.from_chain` detects the fold from the widths.
    Input: a (batch, n_tokens) integer tensor. Usage: ``TokenMLP(59, 32, 2, [50, 50, 59])``.
    """

    def __init__(self, vocab: int, embed_dim: int, n_tokens: int, widths: Sequence[int], activation: str = "silu"):
        super().__init__()
        self.n_tokens = n_tokens
        self.embedding = nn.Embedding(vocab, embed_dim)  # N(0, 1) init, as in the paper
        self.mlp = MLP([n_tokens * embed_dim, *widths], activation=activation)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.n_tokens:
            raise ValueError(f"TokenMLP expects (batch, {self.n_tokens}) token ids, got shape {tuple(tokens.shape)}")
        return self.mlp(self.embedding(tokens).flatten(1))
