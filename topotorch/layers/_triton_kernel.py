"""Triton kernels for the FFF hard forward on GPU (optional: used only when ``triton`` imports).

Two launches per call, no Python loop over samples or leaves:

1. ``_route_hidden``: one program per block of BM samples walks the tree (per level, a gathered
   dot product of each sample with its current node's row, tiled over the input), then computes
   the chosen leaf's first layer ``x @ w1[leaf] + b1[leaf]`` (a gathered BM × BK × ℓ tile per
   step) and the activation (ReLU, exact GELU and identity fused; any other activation runs in
   torch between the launches). Writes the hidden units (BM × ℓ) and the leaf index.
2. ``_leaf_output``: a (sample block, output block) grid computes ``h @ w2[leaf] + b2[leaf]``,
   one gathered BM × BN tile of second-layer rows per hidden unit.

Accumulation is float32 (float64 for float64 inputs); inputs may be float16/bfloat16/float32/
float64. ``TRITON_INTERPRET=1`` (set before this module is imported) runs the same kernels on
CPU tensors through Triton's interpreter: that is how the tests check them without a GPU.

    >>> from topotorch.layers import _triton_kernel
    >>> y, leaf = _triton_kernel.hard_forward(x, nw, nb, w1, b1, w2, b2, depth, _triton_kernel.ACT_RELU)
"""

from __future__ import annotations

import os

import torch

from topotorch.layers._cpu_kernel import ACT_GELU, ACT_IDENTITY, ACT_NONE, ACT_RELU  # one set of codes

try:  # optional dependency: CUDA builds of torch ship it; CPU-only installs usually do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["available", "interpreting", "hard_forward", "ACT_NONE", "ACT_IDENTITY", "ACT_RELU", "ACT_GELU"]

BLOCK_M = 16  # samples per program
BLOCK_N = 64  # outputs per program of the second launch
TILE_ELEMENTS = 8192  # BM × BK × ℓ elements of the gathered first-layer tile
MAX_LEAF_WIDTH = 256  # wider leaves would need tiles past TILE_ELEMENTS: the layer uses tensor ops instead


def interpreting() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET=1``): kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | None = None) -> bool:
    """Whether the kernels can run on ``device``: triton imports, and the device is CUDA
    (or Triton's interpreter is on). Usage: ``available(x.device)``."""
    if triton is None:
        return False
    if device is not None and device.type != "cuda":
        return interpreting()
    return interpreting() or torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _route_hidden(
        x_ptr,
        nw_ptr,
        nb_ptr,
        w1_ptr,
        b1_ptr,
        h_ptr,
        leaf_ptr,
        M,
        IN,
        LW,
        DEPTH: tl.constexpr,
        ACT: tl.constexpr,
        ACC: tl.constexpr,
        BM: tl.constexpr,
        BK: tl.constexpr,
        LP: tl.constexpr,
    ):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        rows = rows.to(tl.int64)
        node = tl.zeros((BM,), dtype=tl.int64)
        for _level in tl.static_range(DEPTH):
            z = tl.zeros((BM,), dtype=ACC)
            for k0 in range(0, IN, BK):
                ks = k0 + tl.arange(0, BK)
                m2 = rmask[:, None] & (ks < IN)[None, :]
                xt = tl.load(x_ptr + rows[:, None] * IN + ks[None, :], mask=m2, other=0.0).to(ACC)
                wt = tl.load(nw_ptr + node[:, None] * IN + ks[None, :], mask=m2, other=0.0).to(ACC)
                z += tl.sum(xt * wt, axis=1)
            z += tl.load(nb_ptr + node, mask=rmask, other=0.0).to(ACC)
            node = 2 * node + 1 + (z >= 0).to(tl.int64)
        leaf = node - ((1 << DEPTH) - 1)
        js = tl.arange(0, LP)
        jmask = js < LW
        h = tl.zeros((BM, LP), dtype=ACC)
        for k0 in range(0, IN, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < IN
            xt = tl.load(x_ptr + rows[:, None] * IN + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0).to(
                ACC
            )
            m3 = rmask[:, None, None] & kmask[None, :, None] & jmask[None, None, :]
            w1t = tl.load(
                w1_ptr + leaf[:, None, None] * IN * LW + ks[None, :, None] * LW + js[None, None, :], mask=m3, other=0.0
            ).to(ACC)
            h += tl.sum(xt[:, :, None] * w1t, axis=1)
        m2 = rmask[:, None] & jmask[None, :]
        h += tl.load(b1_ptr + leaf[:, None] * LW + js[None, :], mask=m2, other=0.0).to(ACC)
        if ACT == 1:  # ACT_RELU
            h = tl.maximum(h, 0.0)
        if ACT == 2:  # ACT_GELU (exact)
            h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
        tl.store(h_ptr + rows[:, None] * LP + js[None, :], h, mask=m2)
        tl.store(leaf_ptr + rows, leaf, mask=rmask)

    @triton.jit
    def _leaf_output(
        h_ptr,
        leaf_ptr,
        w2_ptr,
        b2_ptr,
        y_ptr,
        M,
        OUT,
        LW,
        ACC: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        LP: tl.constexpr,
    ):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        rows = rows.to(tl.int64)
        ns = tl.program_id(1) * BN + tl.arange(0, BN)
        m2 = rmask[:, None] & (ns < OUT)[None, :]
        leaf = tl.load(leaf_ptr + rows, mask=rmask, other=0)
        base = leaf[:, None] * LW * OUT + ns[None, :]
        acc = tl.zeros((BM, BN), dtype=ACC)
        for j in range(LW):
            hj = tl.load(h_ptr + rows * LP + j, mask=rmask, other=0.0)
            acc += hj[:, None] * tl.load(w2_ptr + base + j * OUT, mask=m2, other=0.0).to(ACC)
        acc += tl.load(b2_ptr + leaf[:, None] * OUT + ns[None, :], mask=m2, other=0.0).to(ACC)
        tl.store(y_ptr + rows[:, None] * OUT + ns[None, :], acc, mask=m2)


def hard_forward(
    x: torch.Tensor,
    node_weights: torch.Tensor,
    node_biases: torch.Tensor,
    w1s: torch.Tensor,
    b1s: torch.Tensor,
    w2s: torch.Tensor,
    b2s: torch.Tensor,
    depth: int,
    act: int,
    activation: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard FFF forward of ``x`` (B, in) with the layer's weights; returns (y (B, out), leaf (B,)).

    ``act`` is one of ACT_IDENTITY / ACT_RELU / ACT_GELU (fused) or ACT_NONE, in which case
    ``activation`` is applied in torch between the two launches.
    Usage: ``y, leaf = hard_forward(x, *weights, depth, ACT_RELU)``.
    """
    if triton is None:
        raise RuntimeError("the FFF Triton kernel needs the `triton` package (pip install triton)")
    if act == ACT_NONE and activation is None:
        raise ValueError("act=ACT_NONE needs the activation module to apply between the launches")
    M, IN = x.shape
    LW, OUT = w1s.shape[2], w2s.shape[2]
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = tl.float64 if acc_torch == torch.float64 else tl.float32
    LP = triton.next_power_of_2(LW)
    if LW > MAX_LEAF_WIDTH:
        raise ValueError(f"the Triton FFF kernel takes leaf widths up to {MAX_LEAF_WIDTH}, got {LW}")
    BK = max(1, min(64, TILE_ELEMENTS // (BLOCK_M * LP)))  # powers of two: BM·BK·LP <= TILE_ELEMENTS
    args = [t.contiguous() for t in (x, node_weights, node_biases, w1s, b1s, w2s, b2s)]
    h = torch.empty(M, LP, dtype=acc_torch, device=x.device)
    leaf = torch.empty(M, dtype=torch.int64, device=x.device)
    y = torch.empty(M, OUT, dtype=x.dtype, device=x.device)
    if M == 0:
        return y, leaf
    fused = act if act != ACT_NONE else ACT_IDENTITY
    _route_hidden[(triton.cdiv(M, BLOCK_M),)](
        args[0],
        args[1],
        args[2],
        args[3],
        args[4],
        h,
        leaf,
        M,
        IN,
        LW,
        DEPTH=depth,
        ACT=fused,
        ACC=acc,
        BM=BLOCK_M,
        BK=BK,
        LP=LP,
    )
    if act == ACT_NONE:  # in the layer's dtype, as the torch path does (parametrised activations too)
        if activation is None:
            raise ValueError("act=ACT_NONE needs the activation module to apply")
        h[:, :LW] = activation(h[:, :LW].to(x.dtype)).to(h.dtype)
    _leaf_output[(triton.cdiv(M, BLOCK_M), triton.cdiv(OUT, BLOCK_N))](
        h, leaf, args[5], args[6], y, M, OUT, LW, ACC=acc, BM=BLOCK_M, BN=BLOCK_N, LP=LP
    )
    return y, leaf
