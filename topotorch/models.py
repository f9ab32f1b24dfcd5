"""Small convenience models. Any ``nn.Module`` chain of Linear layers works; these just save typing.

>>> MLP([4, 20, 20, 2], activation="silu")
>>> TokenMLP(vocab=59, embed_dim=32, n_tokens=2, widths=[50, 50, 59])  # folded embeddings
"""

from __future__ import annotations

from collections.abc import Sequence

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


class CausalSelfAttention(nn.Module):
    """Hand-written multi-head causal attention: one fused ``qkv`` Linear and an output ``proj``.

    Head h owns dimensions ``[h*head_dim, (h+1)*head_dim)`` of q, k and v (rows of ``qkv``
    within each third) and the same columns of ``proj``, the layout ``nn.MultiheadAttention``
    uses too. Usage: ``CausalSelfAttention(32, 4)(x)`` with x of shape (batch, time, 32).

    ``head_dims`` (optional) gives each head its own width (their sum is the width of q, k and v,
    which may then differ from ``d_model``) and ``scale`` fixes the score scale (default
    ``1/sqrt(head_dim)``): a network shrunk by :func:`topotorch.compression.shrink.shrink` keeps the scale
    of its original heads. ``n_heads = 0`` (every head removed) outputs ``proj.bias``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        bias: bool = True,
        head_dims: Sequence[int] | None = None,
        scale: float | None = None,
    ):
        super().__init__()
        if head_dims is None:
            if d_model % n_heads:
                raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
            head_dims = [d_model // n_heads] * n_heads
        head_dims = [int(h) for h in head_dims]
        if len(head_dims) != n_heads or any(h < 1 for h in head_dims):
            raise ValueError(f"head_dims {head_dims} must give {n_heads} positive widths")
        self.n_heads = n_heads
        self.head_dims = head_dims
        self.inner = sum(head_dims)
        self.scale = None if scale is None else float(scale)
        self.qkv = nn.Linear(d_model, 3 * self.inner, bias=bias)
        self.proj = nn.Linear(self.inner, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        dims = getattr(self, "head_dims", None) or [d // self.n_heads] * self.n_heads
        inner = sum(dims)
        scale = getattr(self, "scale", None)
        q, k, v = self.qkv(x).split(inner, dim=-1)
        if len(set(dims)) <= 1 and dims:  # equal heads: one batched call
            shape = (b, t, len(dims), dims[0])
            q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            y = y.transpose(1, 2).reshape(b, t, inner)
        elif dims:  # heads of different widths (a shrunk model): one call per head
            ys = [
                torch.nn.functional.scaled_dot_product_attention(
                    qh.unsqueeze(1), kh.unsqueeze(1), vh.unsqueeze(1), is_causal=True, scale=scale
                ).squeeze(1)
                for qh, kh, vh in zip(q.split(dims, -1), k.split(dims, -1), v.split(dims, -1))
            ]
            y = torch.cat(ys, dim=-1)
        else:
            y = x.new_zeros(b, t, 0)
        return self.proj(y)


class TorchAttention(nn.Module):
    """``nn.MultiheadAttention`` with a causal mask, as a drop-in for :class:`CausalSelfAttention`."""

    def __init__(self, d_model: int, n_heads: int, bias: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.mha = nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). ``layernorm=False`` drops the norms."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_mlp: int,
        layernorm: bool = True,
        attention: str = "manual",
        activation: str = "gelu",
    ):
        super().__init__()
        attn_cls = {"manual": CausalSelfAttention, "torch": TorchAttention}.get(attention)
        if attn_cls is None:
            raise ValueError(f"unknown attention {attention!r}; use 'manual' or 'torch'")
        self.ln1 = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.attn = attn_cls(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_mlp), globals()["activation"](activation), nn.Linear(d_mlp, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small decoder-only transformer (pre-norm, learned positions).

    Token inputs (``vocab`` set: ``nn.Embedding``, optionally tied to the output head) or
    vector inputs (``in_dim`` set: an ``nn.Linear`` embedding, e.g. in-context regression's
    (x, y) tokens). Usage: ``TinyGPT(vocab=65, d_model=64, n_layers=2, n_heads=4, block_size=64)``.
    """

    def __init__(
        self,
        vocab: int | None = None,
        d_model: int = 32,
        n_layers: int = 2,
        n_heads: int = 1,
        d_mlp: int | None = None,
        block_size: int = 64,
        in_dim: int | None = None,
        out_dim: int | None = None,
        layernorm: bool = True,
        attention: str = "manual",
        tie_embeddings: bool = True,
        activation: str = "gelu",
    ):
        super().__init__()
        if (vocab is None) == (in_dim is None):
            raise ValueError("give exactly one of vocab (token inputs) or in_dim (vector inputs)")
        self.vocab, self.in_dim, self.block_size = vocab, in_dim, block_size
        d_mlp = d_mlp or 4 * d_model
        if vocab is not None:
            self.embed: nn.Embedding | nn.Linear = nn.Embedding(vocab, d_model)
        elif in_dim is not None:  # always, given the check above
            self.embed = nn.Linear(in_dim, d_model)
        self.pos = nn.Parameter(torch.zeros(block_size, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_mlp, layernorm, attention, activation) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        n_out = out_dim or vocab
        if n_out is None:
            raise ValueError("vector inputs need out_dim")
        self.head = nn.Linear(d_model, n_out, bias=False)
        self.tied = bool(tie_embeddings and vocab is not None and n_out == vocab)
        if self.tied:
            self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        if self.vocab is not None and x.dtype not in (torch.long, torch.int, torch.int32):
            raise ValueError(f"TinyGPT with a vocabulary expects integer token ids, got {x.dtype}")
        h = self.embed(x) + self.pos[:t]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


class ConvBlock(nn.Module):
    """Residual conv block: x + conv2(act(bn(conv1(x)))) — the channel count of x is kept."""

    def __init__(self, channels: int, hidden: int, batchnorm: bool = True, activation: str = "relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.bn = nn.BatchNorm2d(hidden) if batchnorm else nn.Identity()
        self.act = globals()["activation"](activation)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.bn(self.conv1(x))))


class SmallResNet(nn.Module):
    """A small residual conv net for small images: stem conv, residual blocks, flatten, linear head.

    Usage: ``SmallResNet(in_channels=1, channels=16, hidden=16, n_blocks=2, image_size=8, n_classes=10)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 16,
        hidden: int = 16,
        n_blocks: int = 2,
        image_size: int = 8,
        n_classes: int = 10,
        batchnorm: bool = True,
    ):
        super().__init__()
        self.image_size = image_size
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ConvBlock(channels, hidden, batchnorm) for _ in range(n_blocks))
        self.head = nn.Linear(channels * image_size * image_size, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # flat images, e.g. scikit-learn's digits rows
            x = x.view(x.shape[0], -1, self.image_size, self.image_size)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.flatten(1))
