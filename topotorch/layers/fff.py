"""Fast Feedforward layers (Belcak & Wattenhofer 2023) whose hard inference is actually fast.

A :class:`FFF` is a balanced binary tree of depth ``d``: ``2**d - 1`` node neurons
``p = sigmoid(w·x + b)`` and ``2**d`` leaves, each a small feedforward net
``in -> leaf_width -> out``. Training mixes all leaves, weighting each by the product of
``p`` (right) or ``1 - p`` (left) along its root path; inference goes right iff
``w·x + b >= 0`` and evaluates only the one leaf each sample lands in.

    >>> layer = FFF(768, leaf_width=8, output_width=768, depth=9)  # training width 4096
    >>> y = layer(x)  # train(): soft mixture of all 512 leaves
    >>> loss = task_loss + hardening_loss(model, h=3.0)  # h · Σ_nodes H(p)
    >>> y = layer.eval()(x)  # eval(): one leaf per sample, ~25 dot products each

The soft forward is four dense tensor ops (node logits in one matmul, the path products by
one broadcasted multiply per tree level, all leaves' hidden units in one matmul, and the
mixture-weighted output in one more: weighting the hidden units by their leaf's mixture
weight first turns the mixture of leaf outputs into a single matmul). The hard forward, for
float32/float64 CPU inputs when no gradient is wanted (``torch.no_grad()`` /
``torch.inference_mode()``), runs a small compiled C kernel (:mod:`._cpu_kernel`, built with
the system compiler on first use): per sample ``d`` vectorised dot products down the tree,
then the chosen leaf straight from its weights, samples visited in leaf order so a leaf is
read once per batch chunk, second-layer rows of zero (ReLU) activations skipped, the batch
split over ``torch.get_num_threads()`` threads. Otherwise (gradients wanted, other dtypes or
devices, no compiler) it routes with one gather-dot per level and evaluates the chosen leaves
with ``embedding_bag`` (rows of the leaf weights summed with the input as per-sample weights:
no copy of the gathered weights), a direct weight view at batch 1, or, for batches much
larger than the number of leaves, samples sorted by leaf and cut into equal chunks that go
through ``bmm`` with each chunk's leaf weights. CUDA inputs without gradients go through two
Triton kernels (:mod:`._triton_kernel`) when ``triton`` imports. ``layer.hard_impl_used(x)``
says which.

Also: :class:`UltraFFF`, the UltraFastBERT variant (each node one neuron; the output sums
the neurons on the path; K parallel trees).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from topotorch.layers import _cpu_kernel
from topotorch.models import activation as _activation_by_name

__all__ = ["FFF", "UltraFFF", "hardening_loss", "fff_layers", "bernoulli_entropy"]

HardImpl = Literal["auto", "kernel", "triton", "gather", "grouped"]

# Hard path policy. Below this many samples per leaf (on average) each sample reads its
# leaf's rows in place (embedding_bag); above it, samples are grouped by leaf for bmm.
GROUPED_MIN_SAMPLES_PER_LEAF = 16
# Routing of a batch: the top levels' logits in one matmul (2**k - 1 nodes), then per-level gathers.
ROUTE_DENSE_LEVELS = 4
# At batch 1, node logits come from one small matvec per block of this many levels.
BATCH1_TOP_LEVELS = 6


_WEIGHT_NAMES = ("node_weights", "node_biases", "w1s", "b1s", "w2s", "b2s")
# the six weights in _WEIGHT_NAMES' order, as the kernels take them
KernelWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _make_activation(activation: str | nn.Module) -> nn.Module:
    return _activation_by_name(activation) if isinstance(activation, str) else activation


def bernoulli_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), computed stably from the logits.

    H = p·softplus(-z) + (1 - p)·softplus(z); 0 for |z| -> inf, log 2 at z = 0.
    Usage: ``bernoulli_entropy(torch.zeros(3))  # = log 2``.
    """
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


def _walk_one(
    x: torch.Tensor, nw: torch.Tensor, nb: torch.Tensor | None, n_levels: int
) -> tuple[int, list[int], list[float], list[tuple[torch.Tensor, list[int]]]]:
    """Walk one sample x (in,) down a heap-ordered tree of node rows ``nw`` (biases ``nb``).

    Levels go in blocks of BATCH1_TOP_LEVELS: one small matvec over the subtree below the
    current node per block, walked on the host. Returns the index within the level below the
    last walked level, the heap ids of the nodes visited, their logits (host floats), and per
    block (logits tensor, positions of the visited nodes in it).
    """
    r, level, path, zpath, blocks = 0, 0, [], [], []
    while level < n_levels:
        t = min(n_levels - level, BATCH1_TOP_LEVELS)
        if level == 0:  # the top levels are contiguous rows
            w, b = nw[: 2**t - 1], (nb[: 2**t - 1] if nb is not None else None)
        else:  # the subtree below node (level, r), in local heap order
            idx = torch.tensor(
                [2 ** (level + j) - 1 + (r << j) + m for j in range(t) for m in range(2**j)], device=x.device
            )
            w, b = nw.index_select(0, idx), (nb.index_select(0, idx) if nb is not None else None)
        zt = F.linear(x, w, b)
        z = zt.tolist()
        rr, loc = 0, []
        for j in range(t):
            k = 2**j - 1 + rr
            loc.append(k)
            path.append(2 ** (level + j) - 1 + (r << j) + rr)
            zpath.append(z[k])
            rr = 2 * rr + (z[k] >= 0)
        blocks.append((zt, loc))
        r, level = (r << t) + rr, level + t
    return r, path, zpath, blocks


class FFF(nn.Module):
    """A fast feedforward layer: a depth-``d`` tree of routing neurons over ``2**d`` leaf FFs.

    Parameters (peer ``fastfeedforward`` layout, with biases flat):
    ``node_weights`` (2^d-1, in), ``node_biases`` (2^d-1,), ``w1s`` (2^d, in, ℓ),
    ``b1s`` (2^d, ℓ), ``w2s`` (2^d, ℓ, out), ``b2s`` (2^d, out). Node ``k``'s children are
    ``2k+1`` (left, ``w·x+b < 0``) and ``2k+2`` (right); leaf ``j`` is the ``j``-th node of
    the bottom level, so the root decision is its leading bit.

    Modes: ``train()`` computes the soft mixture (or, with ``train_hardened``, the mixture
    with rounded decisions and straight-through node gradients), applies region leak and
    leaf dropout, and records per-node mean entropies in ``last_entropies``; ``eval()``
    computes the hard forward. Inputs may have any leading dimensions.
    Usage: ``FFF(64, leaf_width=8, output_width=10, depth=4)``.
    """

    def __init__(
        self,
        input_width: int,
        leaf_width: int,
        output_width: int,
        depth: int,
        activation: str | nn.Module = "relu",
        *,
        dropout: float = 0.0,
        region_leak: float = 0.0,
        train_hardened: bool = False,
        hard_impl: HardImpl = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, v in (("input_width", input_width), ("leaf_width", leaf_width), ("output_width", output_width)):
            if int(v) != v or v < 1:
                raise ValueError(f"FFF {name} must be a positive integer, got {v!r}")
        if int(depth) != depth or depth < 0 or depth > 24:
            raise ValueError(f"FFF depth must be an integer in 0..24, got {depth!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if not 0.0 <= region_leak <= 1.0:
            raise ValueError(f"region_leak must be in [0, 1], got {region_leak}")
        if hard_impl not in ("auto", "kernel", "triton", "gather", "grouped"):
            raise ValueError(f"hard_impl must be 'auto', 'kernel', 'triton', 'gather' or 'grouped', got {hard_impl!r}")
        self.input_width, self.leaf_width, self.output_width = int(input_width), int(leaf_width), int(output_width)
        self.depth = int(depth)
        self.n_leaves = 2**self.depth
        self.n_nodes = self.n_leaves - 1
        self.activation = _make_activation(activation)
        self.leaf_dropout = nn.Dropout(dropout)
        self.region_leak = float(region_leak)
        self.train_hardened = bool(train_hardened)
        self.hard_impl: HardImpl = hard_impl
        self.last_entropies: torch.Tensor | None = None
        self.sharpness = 1.0  # soft decisions are sigmoid(sharpness · (w·x + b)); the hard ones ignore it
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        L, i, l, o = self.n_leaves, self.input_width, self.leaf_width, self.output_width
        self.node_weights = nn.Parameter(torch.empty(self.n_nodes, i, **kw))
        self.node_biases = nn.Parameter(torch.empty(self.n_nodes, **kw))
        self.w1s = nn.Parameter(torch.empty(L, i, l, **kw))
        self.b1s = nn.Parameter(torch.empty(L, l, **kw))
        self.w2s = nn.Parameter(torch.empty(L, l, o, **kw))
        self.b2s = nn.Parameter(torch.empty(L, o, **kw))
        self.reset_parameters()

    def __getstate__(self) -> dict:
        # last_entropies holds an autograd graph (for hardening_loss): not copied or pickled
        state = self.__dict__.copy()
        state["last_entropies"] = None
        return state

    def __deepcopy__(self, memo: dict) -> FFF:
        # Explicit (not via __getstate__) so that it also serves parametrised layers
        # (share_leaves), whose injected class refuses __getstate__.
        replica = self.__new__(type(self))
        memo[id(self)] = replica
        replica.__dict__ = copy.deepcopy(FFF.__getstate__(self), memo)
        return replica

    def reset_parameters(self) -> None:
        """The peer's initialisation: U(±1/√in) for nodes and first layers, U(±1/√ℓ) for second layers."""
        a, c = 1.0 / math.sqrt(self.input_width), 1.0 / math.sqrt(self.leaf_width)
        with torch.no_grad():
            for p in (self.node_weights, self.node_biases, self.w1s, self.b1s):
                p.uniform_(-a, a)
            for p in (self.w2s, self.b2s):
                p.uniform_(-c, c)

    @property
    def training_width(self) -> int:
        """Hidden neurons in all leaves together (what the soft forward computes): 2^d·ℓ."""
        return self.n_leaves * self.leaf_width

    def flops_per_sample(self, hard: bool = True) -> int:
        """Multiply-adds per sample: hard ``d·in + ℓ·(in+out)``; soft ``n_nodes·in + 2^d·ℓ·(in+out)``."""
        leaf = self.leaf_width * (self.input_width + self.output_width)
        if hard:
            return self.depth * self.input_width + leaf
        return self.n_nodes * self.input_width + self.n_leaves * leaf

    def extra_repr(self) -> str:
        return (
            f"input_width={self.input_width}, leaf_width={self.leaf_width}, output_width={self.output_width}, "
            f"depth={self.depth}, training_width={self.training_width}, region_leak={self.region_leak}, "
            f"train_hardened={self.train_hardened}"
        )

    # -- shape handling ---------------------------------------------------------------------

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 0 or x.shape[-1] != self.input_width:
            raise ValueError(
                f"FFF expects inputs of shape (..., {self.input_width}) (input_width={self.input_width}), "
                f"got shape {tuple(x.shape)}"
            )
        return x.reshape(-1, self.input_width)

    def forward(
        self, x: torch.Tensor, return_entropies: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Soft (train) or hard (eval) forward of ``x`` with shape (..., input_width) -> (..., output_width).

        ``return_entropies=True`` (soft mode only) also returns the per-node mean entropies.
        Usage: ``y = layer(x)``.
        """
        x2 = x if x.ndim == 2 and x.shape[1] == self.input_width else self._flat(x)
        if self.training:
            y = self.soft_forward(x2, hard_decisions=self.train_hardened)
        else:
            if return_entropies:
                raise ValueError("entropies are only computed by the soft (training) forward; call .train() first")
            y = self.hard_forward(x2)
        if x2 is not x:
            y = y.reshape(*x.shape[:-1], self.output_width)
        if return_entropies:
            return y, self.last_entropies
        return y

    # -- soft (training) forward -----------------------------------------------------------

    def mixture(self, x: torch.Tensor, hard_decisions: bool = False) -> torch.Tensor:
        """Leaf mixture weights (B, 2^d) for ``x`` (B, in): products of p / 1-p along root paths.

        In training mode region leak is applied and ``last_entropies`` is recorded.
        ``hard_decisions`` rounds each decision to ``w·x+b >= 0`` (straight-through gradient).
        Usage: ``layer.mixture(x).argmax(1)  # = layer.route(x) for hard decisions``.
        """
        B = x.shape[0]
        mix = x.new_ones(B, 1)
        if self.n_nodes == 0:
            self.last_entropies = x.new_zeros(0)
            return mix
        z = torch.addmm(self.node_biases, x, self.node_weights.t())  # (B, n_nodes)
        if self.sharpness != 1.0:  # an annealing schedule sharpens the soft decisions towards hard ones
            z = z * self.sharpness
        p = torch.sigmoid(z)
        if self.training or torch.is_grad_enabled():
            self.last_entropies = bernoulli_entropy(z).mean(0) if B else z.new_zeros(self.n_nodes)
        leak = None
        if self.training and self.region_leak > 0:
            leak = torch.rand_like(p) < self.region_leak
            p = torch.where(leak, 1 - p, p)
        if hard_decisions:
            ph = (z >= 0).to(p.dtype)
            if leak is not None:
                ph = torch.where(leak, 1 - ph, ph)
            p = ph + (p - p.detach()) if p.requires_grad else ph  # straight-through
        for level in range(self.depth):
            q = p[:, 2**level - 1 : 2 ** (level + 1) - 1].unsqueeze(2)  # (B, 2^level, 1)
            mix = torch.cat((mix.unsqueeze(2) * (1 - q), mix.unsqueeze(2) * q), dim=2).flatten(1)
        return mix

    def soft_forward(self, x: torch.Tensor, hard_decisions: bool = False) -> torch.Tensor:
        """The training forward on ``x`` (B, in): every leaf, mixed by the path products.

        With ``hard_decisions`` the mixture is one-hot, so the result is the hard forward
        computed densely (the reference the hard path is tested against).
        Usage: ``layer.soft_forward(x, hard_decisions=True)``.
        """
        B = x.shape[0]
        mix = self.mixture(x, hard_decisions)  # (B, L)
        L, l = self.n_leaves, self.leaf_width
        w1 = self.w1s.transpose(0, 1).reshape(self.input_width, L * l)
        h = self.activation(torch.addmm(self.b1s.reshape(-1), x, w1)).view(B, L, l)
        h = self.leaf_dropout(h) if self.training else h
        hm = (h * mix.unsqueeze(2)).view(B, L * l)
        return torch.addmm(mix @ self.b2s, hm, self.w2s.reshape(L * l, self.output_width))

    # -- hard (inference) forward ----------------------------------------------------------

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The leaf (int64) each sample of ``x`` (..., in) lands in: right iff ``w·x+b >= 0``.

        Usage: ``leaves = layer.route(x)  # shape x.shape[:-1]``.
        """
        x2 = self._flat(x)
        if self._kernel_ok(x2):
            _, leaves = _cpu_kernel.hard_forward(
                x2.contiguous(), *self._kernel_weights(), self.depth, 0, route_only=True
            )
            assert leaves is not None  # route_only computes the leaves alone
            return leaves.reshape(x.shape[:-1])
        return self._route(x2).reshape(x.shape[:-1])

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        if self.depth == 0 or B == 0:
            return torch.zeros(B, dtype=torch.long, device=x.device)
        nw, nb = self.node_weights, self.node_biases
        top = min(self.depth, ROUTE_DENSE_LEVELS)  # few nodes: one matmul for all of them
        scores = torch.addmm(nb[: 2**top - 1], x, nw[: 2**top - 1].t())
        k = torch.zeros(B, 1, dtype=torch.long, device=x.device)
        for _ in range(top):
            k = k * 2 + 1 + (torch.gather(scores, 1, k) >= 0)
        r = k.view(B) - (2**top - 1)  # index within the level
        for level in range(top, self.depth):  # many nodes: gather each sample's node row
            first = 2**level - 1
            w, b = nw[first : 2 * first + 1], nb[first : 2 * first + 1]
            z = torch.linalg.vecdot(w.index_select(0, r), x)
            r = r * 2 + (z >= -b.index_select(0, r))
        return r

    def _route_one(self, x: torch.Tensor) -> int:
        """Leaf of a single sample x (in,) (see :func:`_walk_one`)."""
        return _walk_one(x, self.node_weights, self.node_biases, self.depth)[0]

    def hard_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The inference forward on ``x`` (B, in): route, then compute only each sample's leaf.

        Usage: ``layer.hard_forward(x)  # same as layer.eval()(x) for 2-D x``.
        """
        B = x.shape[0]
        if B == 0:
            return x.new_zeros(0, self.output_width)
        if self._kernel_ok(x):  # first: at batch 1 the kernel call is mostly this Python
            act = self._modules.get("activation") or self.activation
            y, _ = _cpu_kernel.hard_forward(
                x.contiguous(),
                *self._kernel_weights(),
                self.depth,
                self._kernel_activation(act),
                activation=act,
                need_leaves=False,
            )
            assert y is not None  # only route_only leaves y out
            return y
        impl = self.hard_impl_used(x)
        if impl == "triton":
            from topotorch.layers import _triton_kernel  # imports triton: only when a GPU path runs

            return _triton_kernel.hard_forward(
                x, *self._kernel_weights(), self.depth, self._kernel_activation(), activation=self.activation
            )[0]
        if impl == "batch1":
            j = self._route_one(x[0])
            a = self.activation(torch.addmm(self.b1s[j], x, self.w1s[j]))
            return torch.addmm(self.b2s[j], a, self.w2s[j])
        leaf = self._route(x)
        return self._leaves_grouped(x, leaf) if impl == "grouped" else self._leaves_gather(x, leaf)

    def hard_impl_used(self, x: torch.Tensor) -> str:
        """Which hard path a batch ``x`` (B, in) takes now: ``"kernel"`` (compiled C, see
        :mod:`topotorch.layers._cpu_kernel`), ``"triton"`` (GPU, :mod:`topotorch.layers._triton_kernel`),
        ``"batch1"`` (host walk), ``"gather"`` or ``"grouped"``.

        Under ``hard_impl="auto"`` the kernel runs for float32/float64 CPU inputs and the Triton
        kernels for CUDA inputs (when ``triton`` imports), both only when no gradient is wanted;
        otherwise batch 1 walks on the host, batches with at least GROUPED_MIN_SAMPLES_PER_LEAF
        samples per leaf go grouped, the rest gather.
        Usage: ``layer.hard_impl_used(x)``.
        """
        if self._kernel_ok(x):
            return "kernel"
        if self._triton_ok(x):
            return "triton"
        if self.hard_impl in ("gather", "grouped"):
            return self.hard_impl
        if x.shape[0] == 1:
            return "batch1"
        return "grouped" if x.shape[0] >= GROUPED_MIN_SAMPLES_PER_LEAF * self.n_leaves else "gather"

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        """Whether the hard forward of ``x`` runs in the compiled CPU kernel (see :mod:`._cpu_kernel`).

        ``hard_impl="kernel"`` insists (and raises if there is no kernel); ``"auto"`` uses it for
        float32/float64 CPU tensors when no gradient is wanted (under ``torch.no_grad()`` /
        ``torch.inference_mode()``, or with parameters that do not require grad).
        """
        hi = self.hard_impl
        if hi != "auto" and hi != "kernel":
            return False
        nw = self._parameters.get("node_weights")  # direct read (parametrised: computed)
        if nw is None:
            nw = self.node_weights
        dt = x.dtype
        usable = (
            (dt is torch.float32 or dt is torch.float64)
            and x.is_cpu
            and nw.is_cpu
            and nw.dtype is dt
            and self.leaf_width <= _cpu_kernel.MAX_LEAF_WIDTH
        )
        if self.hard_impl == "kernel":
            if not usable:
                raise ValueError(
                    "hard_impl='kernel' needs float32/float64 CPU inputs and weights of the same dtype "
                    f"and leaf_width <= {_cpu_kernel.MAX_LEAF_WIDTH}"
                )
            if _cpu_kernel.kernel() is None:
                raise RuntimeError(f"FFF CPU kernel unavailable: {_cpu_kernel.kernel_error() or 'disabled'}")
            return True
        if not usable:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return _cpu_kernel.kernel() is not None

    def _triton_ok(self, x: torch.Tensor) -> bool:
        """Whether the hard forward of ``x`` runs in the Triton kernels (:mod:`._triton_kernel`).

        ``hard_impl="triton"`` insists (and raises if triton or a CUDA device is missing;
        ``TRITON_INTERPRET=1`` also runs them on CPU tensors); ``"auto"`` uses them for CUDA
        inputs when no gradient is wanted and ``triton`` imports.
        """
        if self.hard_impl not in ("auto", "triton") or (self.hard_impl == "auto" and x.device.type != "cuda"):
            return False
        from topotorch.layers import _triton_kernel

        if self.leaf_width > _triton_kernel.MAX_LEAF_WIDTH:
            if self.hard_impl == "triton":
                raise ValueError(f"hard_impl='triton' takes leaf_width <= {_triton_kernel.MAX_LEAF_WIDTH}")
            return False
        if self.hard_impl == "triton":
            if not _triton_kernel.available(x.device):
                raise RuntimeError(
                    "hard_impl='triton' needs the triton package and a CUDA input "
                    f"(or TRITON_INTERPRET=1); got a {x.device.type} input, "
                    f"triton {'present' if _triton_kernel.triton is not None else 'missing'}"
                )
            return True
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return _triton_kernel.available(x.device)

    def _kernel_weights(self) -> KernelWeights:
        # direct dict reads keep batch-1 calls cheap; parametrised weights are computed (not in _parameters)
        ps: dict[str, Any] = self._parameters
        ws = [ps[n] if n in ps else getattr(self, n) for n in _WEIGHT_NAMES]
        if not all(w.is_contiguous() for w in ws):  # the kernel only reads them through data_ptr()
            ws = [w.detach().contiguous() for w in ws]
        nw, nb, w1, b1, w2, b2 = ws
        return nw, nb, w1, b1, w2, b2

    def _kernel_activation(self, a: nn.Module | None = None) -> int:
        a = self.activation if a is None else a
        if type(a) is nn.ReLU:
            return _cpu_kernel.ACT_RELU
        if type(a) is nn.Identity:
            return _cpu_kernel.ACT_IDENTITY
        if type(a) is nn.GELU and a.approximate == "none":
            return _cpu_kernel.ACT_GELU
        return _cpu_kernel.ACT_NONE

    def _leaves_gather(self, x: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        """Each sample sums its own leaf's weight rows in place (embedding_bag, no weight copy)."""
        i, l, o = self.input_width, self.leaf_width, self.output_width
        leaf32 = leaf.to(torch.int32)
        ar_i = torch.arange(i, dtype=torch.int32, device=x.device)
        h = F.embedding_bag(leaf32.unsqueeze(1) * i + ar_i, self.w1s.view(-1, l), mode="sum", per_sample_weights=x)
        a = self.activation(h + self.b1s.index_select(0, leaf))
        ar_l = torch.arange(l, dtype=torch.int32, device=x.device)
        y = F.embedding_bag(leaf32.unsqueeze(1) * l + ar_l, self.w2s.view(-1, o), mode="sum", per_sample_weights=a)
        return y + self.b2s.index_select(0, leaf)

    def _leaves_grouped(self, x: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        """Samples sorted by leaf, cut into chunks of equal size, one bmm per layer over all chunks."""
        B, L = x.shape[0], self.n_leaves
        order = torch.argsort(leaf, stable=True)
        ls = leaf.index_select(0, order)
        counts = torch.bincount(leaf, minlength=L)
        c = max(1, B // max(1, int((counts > 0).sum())))  # chunk size ~ mean samples per used leaf
        n_chunk_leaf = (counts + c - 1) // c
        chunk_start = torch.cumsum(n_chunk_leaf, 0) - n_chunk_leaf
        seg_start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(B, device=x.device) - seg_start.index_select(0, ls)
        chunk = chunk_start.index_select(0, ls) + torch.div(rank, c, rounding_mode="floor")
        slot = rank % c
        chunk_leaf = torch.repeat_interleave(torch.arange(L, device=x.device), n_chunk_leaf)
        xp = x.new_zeros(chunk_leaf.shape[0], c, self.input_width)
        xp[chunk, slot] = x.index_select(0, order)
        h = torch.baddbmm(self.b1s.index_select(0, chunk_leaf).unsqueeze(1), xp, self.w1s.index_select(0, chunk_leaf))
        a = self.activation(h)
        yp = torch.baddbmm(self.b2s.index_select(0, chunk_leaf).unsqueeze(1), a, self.w2s.index_select(0, chunk_leaf))
        y = torch.empty(B, self.output_width, dtype=yp.dtype, device=x.device)
        y[order] = yp[chunk, slot]
        return y

    # -- interoperability -------------------------------------------------------------------

    @classmethod
    def from_peer(cls, peer: Any, **kwargs) -> FFF:  # Any: fastfeedforward is untyped
        """An FFF with the weights of a ``fastfeedforward.FFF`` (0.2.1) module (same function).

        Usage: ``FFF.from_peer(fastfeedforward.FFF(64, 8, 10, 4))``.
        """
        layer = cls(
            peer.input_width,
            peer.leaf_width,
            peer.output_width,
            int(peer.depth),
            activation=peer.activation,
            dropout=peer.dropout,
            region_leak=peer.region_leak,
            train_hardened=peer.train_hardened,
            device=peer.w1s.device,
            dtype=peer.w1s.dtype,
            **kwargs,
        )
        with torch.no_grad():
            layer.node_weights.copy_(peer.node_weights)
            layer.node_biases.copy_(peer.node_biases.view(-1))
            for name in ("w1s", "b1s", "w2s", "b2s"):
                getattr(layer, name).copy_(getattr(peer, name))
        return layer


class UltraFFF(nn.Module):
    """UltraFastBERT's FFF: each tree node is one neuron with input and output weights.

    ``n_trees`` (K) parallel trees of depth ``d`` with ``2**(d+1) - 1`` neurons each (depth 11
    gives 4095 neurons of which 12 are used per token). A neuron's pre-activation ``z``
    picks the child (right iff ``z >= 0``); the output sums ``act(z)·w_out`` over the
    ``d + 1`` neurons on each tree's path. Training computes all neurons and masks off the
    path (as UltraFastBERT does: gradients reach only the neurons used); inference
    computes only the path neurons. Usage: ``UltraFFF(768, 768, depth=11, n_trees=1)``.
    """

    def __init__(
        self,
        input_width: int,
        output_width: int,
        depth: int,
        n_trees: int = 1,
        activation: str | nn.Module = "gelu",
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, v in (("input_width", input_width), ("output_width", output_width), ("n_trees", n_trees)):
            if int(v) != v or v < 1:
                raise ValueError(f"UltraFFF {name} must be a positive integer, got {v!r}")
        if int(depth) != depth or depth < 0 or depth > 24:
            raise ValueError(f"UltraFFF depth must be an integer in 0..24, got {depth!r}")
        self.input_width, self.output_width, self.depth, self.n_trees = (
            int(input_width),
            int(output_width),
            int(depth),
            int(n_trees),
        )
        self.n_nodes = 2 ** (self.depth + 1) - 1
        self.activation = _make_activation(activation)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        a = 1.0 / math.sqrt(self.input_width)
        self.w_in = nn.Parameter(torch.empty(self.n_trees, self.n_nodes, self.input_width, **kw).uniform_(-a, a))
        c = 1.0 / math.sqrt(self.n_trees * (self.depth + 1))
        self.w_out = nn.Parameter(torch.empty(self.n_trees, self.n_nodes, self.output_width, **kw).uniform_(-c, c))
        self.b_in = nn.Parameter(torch.zeros(self.n_trees, self.n_nodes, **kw)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(self.output_width, **kw)) if bias else None

    @property
    def training_width(self) -> int:
        """All neurons of all trees: K·(2^(d+1) - 1)."""
        return self.n_trees * self.n_nodes

    def flops_per_sample(self, hard: bool = True) -> int:
        """Multiply-adds per sample: hard ``K·(d+1)·(in+out)``, masked-dense ``K·n_nodes·(in+out)``."""
        per = self.input_width + self.output_width
        return self.n_trees * ((self.depth + 1) if hard else self.n_nodes) * per

    def extra_repr(self) -> str:
        return (
            f"input_width={self.input_width}, output_width={self.output_width}, depth={self.depth}, "
            f"n_trees={self.n_trees}, bias={self.b_in is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Masked dense (train) or path-only (eval) forward of (..., in) -> (..., out). Usage: ``y = layer(x)``."""
        if x.ndim == 0 or x.shape[-1] != self.input_width:
            raise ValueError(
                f"UltraFFF expects inputs of shape (..., {self.input_width}) "
                f"(input_width={self.input_width}), got shape {tuple(x.shape)}"
            )
        x2 = x.reshape(-1, self.input_width)
        y = self.dense_forward(x2) if self.training else self.hard_forward(x2)
        return y.reshape(*x.shape[:-1], self.output_width)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """All K·n_nodes neurons computed, those off each tree's path masked to zero.

        Usage: ``layer.dense_forward(x)``."""
        B, K, n = x.shape[0], self.n_trees, self.n_nodes
        z = x @ self.w_in.view(K * n, -1).t()
        if self.b_in is not None:
            z = z + self.b_in.view(-1)
        z = z.view(B, K, n)
        with torch.no_grad():
            mask = torch.zeros_like(z)
            node = torch.zeros(B, K, 1, dtype=torch.long, device=x.device)
            mask.scatter_(2, node, 1.0)
            for _ in range(self.depth):
                node = 2 * node + 1 + (torch.gather(z, 2, node) >= 0)
                mask.scatter_(2, node, 1.0)
        y = (self.activation(z) * mask).view(B, K * n) @ self.w_out.view(K * n, -1)
        return y + self.b_out if self.b_out is not None else y

    def _walk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat neuron indices (B, K, d+1) on each tree's path and their pre-activations."""
        B, K, n = x.shape[0], self.n_trees, self.n_nodes
        w_in = self.w_in.view(K * n, -1)
        b_in = self.b_in.view(-1) if self.b_in is not None else None
        base = torch.arange(K, device=x.device).mul(n).expand(B, K)  # each tree's root, flat index
        xk = x.unsqueeze(1)
        node, nodes, zs = base, [], []
        for level in range(self.depth + 1):
            z = torch.linalg.vecdot(w_in[node], xk)
            if b_in is not None:
                z = z + b_in[node]
            nodes.append(node)
            zs.append(z)
            if level < self.depth:
                node = base + 2 * (node - base) + 1 + (z >= 0)
        return torch.stack(nodes, 2), torch.stack(zs, 2)

    def path(self, x: torch.Tensor) -> torch.Tensor:
        """Flat neuron indices (into K·n_nodes) on each tree's path, shape (B, K, d+1). Usage: ``layer.path(x)``."""
        return self._walk(x)[0]

    def hard_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Only the K·(d+1) path neurons per sample: gather-dot routing, one embedding_bag for the output.

        Usage: ``layer.hard_forward(x)``.
        """
        B, K, n = x.shape[0], self.n_trees, self.n_nodes
        if B == 0:
            return x.new_zeros(0, self.output_width)
        if B == 1 and K == 1:  # host-side walk, then one small matvec over the path's output rows
            b_in = self.b_in[0] if self.b_in is not None else None
            _, path, zpath, blocks = _walk_one(x[0], self.w_in[0], b_in, self.depth + 1)
            if torch.is_grad_enabled():  # keep the graph to w_in
                z = torch.cat([zt[loc] for zt, loc in blocks])
            else:  # the logits are exact in the host floats
                z = torch.tensor(zpath, dtype=x.dtype, device=x.device)
            rows = self.w_out[0].index_select(0, torch.tensor(path, device=x.device))
            y = (self.activation(z) @ rows).unsqueeze(0)
            return y + self.b_out if self.b_out is not None else y
        idx, z = self._walk(x)
        y = F.embedding_bag(
            idx.view(B, -1), self.w_out.view(K * n, -1), mode="sum", per_sample_weights=self.activation(z).view(B, -1)
        )
        return y + self.b_out if self.b_out is not None else y


def fff_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All FFF / UltraFFF submodules of ``model`` with their qualified names. Usage: ``fff_layers(net)``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (FFF, UltraFFF))]


def hardening_loss(model: nn.Module, h: float = 3.0) -> torch.Tensor:
    """``h · Σ_nodes H(p)`` over every FFF in ``model``, from each layer's last training forward.

    H is the batch-mean Bernoulli entropy of each node (the paper uses h = 3). For a schedule
    pass ``schedule_value(parse_schedule("0:0,1000:3"), step)`` from :mod:`topotorch.training`.
    Usage: ``loss = ce + hardening_loss(model, h=3.0)``.
    """
    terms = [
        m.last_entropies.sum() for _, m in fff_layers(model) if isinstance(m, FFF) and m.last_entropies is not None
    ]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return h * torch.stack(terms).sum()
