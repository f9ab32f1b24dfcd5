"""BIMT connection (wiring) cost.

    cc = Σ_connections Agg_ij |W_ij| · (wf · d_ij + l0)   [+ Σ |b_i| · l0]

``d_ij`` is the within-layer distance between the two neurons, ``l0`` the fixed
layer-to-layer gap (so even a straight connection costs something), ``wf``
weighs locality; ``wf = 0`` is plain L1 (times ``l0``). ``agg = "sum"`` adds
every weight's cost, ``"mean"`` divides each connection's sum by its number of
weights (the paper's choice for its larger networks).

    >>> cfg = WiringConfig(wf=1.0, l0=0.1)
    >>> loss = task_loss + lam * wiring_cost(graph, cfg)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

import torch

from topotorch.geometry import as_plane
from topotorch.graph import Connection, SpatialGraph


@dataclass
class WiringConfig:
    """Options of the wiring cost. Usage: ``WiringConfig(wf=2.0, l0=0.5, agg="mean")``."""

    wf: float = 1.0
    l0: float = 0.1
    metric: Literal["l1", "l2"] = "l1"
    agg: Literal["sum", "mean"] = "sum"
    penalize_bias: bool = True
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns of weight names left out

    def __post_init__(self) -> None:
        if not (self.wf >= 0):
            raise ValueError(f"wf must be >= 0, got {self.wf}")
        if not (self.l0 >= 0):
            raise ValueError(f"l0 must be >= 0, got {self.l0}")
        if self.metric not in ("l1", "l2"):
            raise ValueError(f"metric must be 'l1' or 'l2', got {self.metric!r}")
        if self.agg not in ("sum", "mean"):
            raise ValueError(f"agg must be 'sum' or 'mean', got {self.agg!r}")

    def excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


def cost_weights(graph: SpatialGraph, conn: Connection, cfg: WiringConfig, like: torch.Tensor) -> torch.Tensor:
    """Per-weight cost factors (wf·d + l0) shaped to broadcast against the weight tensor.

    Built from the (target, source) neuron distance matrix by expanding each neuron to the
    indices it owns; cached on the graph until coordinates change.
    """
    key = ("factor", conn.weight, conn.target, conn.source, cfg.wf, cfg.l0, cfg.metric, like.device, like.dtype)

    def build() -> torch.Tensor:
        d = graph.distances(conn, cfg.metric, like)
        t_of = conn.target_slice.neuron_of(like.shape[conn.target_slice.dim], partial=True).to(like.device)
        s_of = conn.source_slice.neuron_of(like.shape[conn.source_slice.dim], partial=True).to(like.device)
        full = cfg.wf * d[t_of.clamp(min=0)][:, s_of.clamp(min=0)] + cfg.l0  # (S_target, S_source)
        if bool((t_of < 0).any() or (s_of < 0).any()):  # entries another connection of this weight covers
            full = full * ((t_of >= 0).unsqueeze(1) & (s_of >= 0).unsqueeze(0)).to(full.dtype)
        td, sd = conn.target_slice.dim, conn.source_slice.dim
        if td > sd:
            full = full.T
        shape = [1] * like.ndim
        shape[td], shape[sd] = like.shape[td], like.shape[sd]
        return full.reshape(shape).contiguous()

    return graph.cached(key, build)


# Graphs whose connection weights hold more entries than this (a GPT-2-sized model) never cache a
# weight-sized factor tensor: the factors (wf·d + l0) are rebuilt from the neurons' coordinates in
# row chunks each time, so the penalty's memory stays a few MB instead of a second copy of the model.
CACHE_ENTRIES = 1 << 22
_CHUNK = (
    1 << 17
)  # entries per streamed chunk (512 KB in float32: in the L2 cache; fewer chunks, less Python: measured fastest)


def _streaming(graph: SpatialGraph) -> bool:
    return graph.cached(
        ("streaming",), lambda: sum(graph.tensor(c.weight).numel() for c in graph.connections) > CACHE_ENTRIES
    )


def _layout(graph: SpatialGraph, conn: Connection, w: torch.Tensor):
    """Per-connection data for streaming, cached (small: one coordinate row per weight row/column)."""

    def build():
        td, sd = conn.target_slice.dim, conn.source_slice.dim
        n_rows, n_cols = w.shape[td], w.shape[sd]
        t_of = conn.target_slice.neuron_of(n_rows, partial=True).to(w.device)
        s_of = conn.source_slice.neuron_of(n_cols, partial=True).to(w.device)
        t_sp, s_sp = graph.space(conn.target), graph.space(conn.source)
        if t_sp.positions is None or s_sp.positions is None:  # no coordinates: distance 0
            t_pos = torch.zeros(n_rows, 1, dtype=w.dtype, device=w.device)
            s_pos = torch.zeros(n_cols, 1, dtype=w.dtype, device=w.device)
        else:
            tp, sp = t_sp.positions, s_sp.positions
            if tp.shape[1] != sp.shape[1]:
                tp, sp = as_plane(tp), as_plane(sp)
            t_pos = tp.to(w.device, w.dtype)[t_of.clamp(min=0)]
            s_pos = sp.to(w.device, w.dtype)[s_of.clamp(min=0)]
        partial = bool((t_of < 0).any() or (s_of < 0).any())
        masks = ((t_of >= 0).to(w.dtype), (s_of >= 0).to(w.dtype)) if partial else None
        return t_pos.T.contiguous(), s_pos.T.contiguous(), masks

    return graph.cached(("stream", conn.weight, conn.target, conn.source, w.device, w.dtype), build)


def _chunks(graph: SpatialGraph, conn: Connection, cfg: WiringConfig, w: torch.Tensor, scale: float = 1.0):
    """(weight view rows, factor rows · scale) for consecutive row chunks of ``w`` seen as (target, source, ...).

    The factor is wf·d + l0 between each entry's target and source neuron (0 where a partial
    connection does not cover the entry), built from the coordinates in place, chunk by chunk."""
    view = w.movedim((conn.target_slice.dim, conn.source_slice.dim), (0, 1))
    n_rows, n_cols = view.shape[0], view.shape[1]
    rest = view[0, 0].numel() if view.ndim > 2 else 1
    t_pos, s_pos, masks = _layout(graph, conn, w)
    step = max(1, _CHUNK // max(1, n_cols * rest))
    tail = (1,) * (view.ndim - 2)
    l1 = cfg.metric == "l1" or len(t_pos) == 1
    k = cfg.wf * scale if l1 else 1.0  # |k·x − k·y| = k·|x − y|: the scale rides on the coordinates
    t_pos, s_pos = t_pos * k, s_pos * k
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        f = None
        for xt, ys in zip(t_pos, s_pos):  # one coordinate at a time
            diff = torch.sub(xt[r0:r1, None], ys[None, :])
            if l1:
                diff.abs_()
            else:
                diff.square_()
            f = diff if f is None else f.add_(diff)
        assert f is not None  # one coordinate at least (positions are (N, D), D >= 1)
        if l1:
            f.add_(cfg.l0 * scale)
        else:
            f.sqrt_().mul_(cfg.wf * scale).add_(cfg.l0 * scale)
        if masks is not None:
            f.mul_(masks[0][r0:r1, None] * masks[1][None, :])
        yield view[r0:r1], f.view(f.shape + tail)


def connection_costs(graph: SpatialGraph, cfg: WiringConfig | None = None) -> dict[str, torch.Tensor]:
    """Wiring cost of each connection (weight name -> scalar tensor, differentiable)."""
    cfg = cfg or WiringConfig()
    out: dict[str, torch.Tensor] = {}
    streaming = _streaming(graph)
    for conn in graph.connections:
        if cfg.excluded(conn.weight):
            continue
        w = graph.tensor(conn.weight)
        if streaming:
            c = sum((rows.abs() * f).sum() for rows, f in _chunks(graph, conn, cfg, w))
        else:
            c = (w.abs() * cost_weights(graph, conn, cfg, w)).sum()
        if cfg.agg == "mean":
            c = c / w.numel()
        if cfg.penalize_bias and conn.bias is not None and not cfg.excluded(conn.bias):
            b = graph.tensor(conn.bias)
            cb = b.abs().sum() * cfg.l0
            c = c + (cb / b.numel() if cfg.agg == "mean" else cb)
        if conn.weight in out:  # one weight split between several connections (torch.cat)
            out[conn.weight] = out[conn.weight] + c
        else:
            out[conn.weight] = c
    return out


def wiring_cost(graph: SpatialGraph, cfg: WiringConfig | None = None) -> torch.Tensor:
    """Total wiring cost of the graph's model (a differentiable scalar). Usage: ``wiring_cost(g, cfg)``."""
    costs = connection_costs(graph, cfg)
    if not costs:
        raise ValueError("wiring cost: every connection is excluded")
    return torch.stack(list(costs.values())).sum()


@torch.no_grad()
def add_wiring_grad_(graph: SpatialGraph, cfg: WiringConfig, lam: float) -> None:
    """Add ∂(λ·cc)/∂θ to every parameter's ``.grad`` in closed form, without autograd.

    ∂cc/∂W = (wf·d + l0)·sign(W) (scaled by 1/numel for ``agg="mean"``): one fused
    multiply-add per weight tensor, all tensors in one ``_foreach`` call. The same gradient
    as ``(lam * wiring_cost(g, cfg)).backward()`` (sign(0) = 0 in both) at a fraction of the
    cost, which matters for small networks where the penalty's autograd graph would rival
    the task's. Call after ``loss.backward()``.
    Usage: ``loss.backward(); add_wiring_grad_(g, cfg, lam); opt.step()``.
    """
    if lam == 0:
        return
    if _streaming(graph):
        _add_grad_streaming_(graph, cfg, float(lam))
        return
    params, factors = _grad_factors(graph, cfg, float(lam))
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    signs = torch._foreach_sign([p.detach() for p in params])
    torch._foreach_addcmul_([p.grad for p in params], factors, signs)


def _add_grad_streaming_(graph: SpatialGraph, cfg: WiringConfig, lam: float) -> None:
    """:func:`add_wiring_grad_` for large graphs: factors rebuilt chunk by chunk, nothing weight-sized kept.

    Runs on the caller's threads (the trainer picks them by load): on an idle 2-core box 2 threads take
    273 ms for GPT-2 small against 458 ms on one."""
    for conn in graph.connections:
        if cfg.excluded(conn.weight):
            continue
        w = graph.tensor(conn.weight)
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        scale = lam / w.numel() if cfg.agg == "mean" else lam
        grad_view = w.grad.movedim((conn.target_slice.dim, conn.source_slice.dim), (0, 1))
        start, signs = 0, None
        for rows, f in _chunks(graph, conn, cfg, w.detach(), scale):
            n = rows.shape[0]
            if signs is None or signs.shape != rows.shape:
                signs = torch.empty_like(rows)
            torch.sign(rows, out=signs)  # one buffer for every chunk of this weight
            grad_view[start : start + n].addcmul_(f, signs)
            start += n
        if cfg.penalize_bias and conn.bias is not None and not cfg.excluded(conn.bias):
            b = graph.tensor(conn.bias)
            if b.grad is None:
                b.grad = torch.zeros_like(b)
            b.grad.add_(b.detach().sign(), alpha=(lam / b.numel() if cfg.agg == "mean" else lam) * cfg.l0)


def _grad_factors(graph: SpatialGraph, cfg: WiringConfig, lam: float) -> tuple[list, list]:
    """The penalised tensors and λ·∂cc/∂|θ| for each, cached until coordinates or tensors change."""
    key = ("grad", cfg.wf, cfg.l0, cfg.metric, cfg.agg, cfg.penalize_bias, tuple(cfg.exclude), lam)

    def build() -> tuple[list, list]:
        params, factors = [], []
        for conn in graph.connections:
            if cfg.excluded(conn.weight):
                continue
            w = graph.tensor(conn.weight)
            scale = lam / w.numel() if cfg.agg == "mean" else lam
            params.append(w)
            factors.append((cost_weights(graph, conn, cfg, w) * scale).expand_as(w).contiguous())
            if cfg.penalize_bias and conn.bias is not None and not cfg.excluded(conn.bias):
                b = graph.tensor(conn.bias)
                params.append(b)
                factors.append(torch.full_like(b, (lam / b.numel() if cfg.agg == "mean" else lam) * cfg.l0))
        return params, factors

    params, factors = graph.cached(key, build)
    if params and (params[0].dtype != factors[0].dtype or params[0].device != factors[0].device):
        graph.forget(key)  # the model was moved (model.to(...)) since: rebuild
        return _grad_factors(graph, cfg, lam)
    return params, factors
