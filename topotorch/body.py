"""A network's body as one object: its spatial graph, the structure objectives, their schedules, relocation.

Training a network with a body adds two things to any loop. Before the optimizer step, the
gradient of the structure penalty

    P(θ, t) = λ(t) · cc(θ)  +  τ(t) · TopoLoss(θ)  +  γ(t) · Σ_neurons ‖outgoing weights‖₂

(wiring cost, cortical-sheet smoothness, neuron group lasso; each weight a ``step:value`` schedule,
biases joining cc from ``bias_penalty_from``). After it, every ``relocate_every`` steps, a
relocation: a permutation of each space's neurons that lowers cc without changing the function,
applied to the parameters *and* to every optimizer's per-parameter state, so training continues
exactly as it would have on the permuted network. :class:`Body` holds all of it, so a plain loop is

    >>> body = Body(net, example_inputs=x, lam=1e-2, relocation="swap", relocate_every=200)
    >>> for step in range(n):
    ...     loss = task_loss(net(x), y) + body.penalty(step)
    ...     opt.zero_grad()
    ...     loss.backward()
    ...     opt.step()
    ...     body.after_step(step, opt)

The wiring term's gradient is closed form (``(wf·d + l0)·sign(W)``, :func:`add_wiring_grad_`),
never an autograd graph over the weights: :meth:`Body.penalty` returns a tensor whose backward
*is* that closed form, and :meth:`Body.add_gradients` adds the same gradients in place after
``loss.backward()`` (what the trainer does, after DDP's all-reduce, so every rank adds the same term once).

What a run needs to resume exactly besides the model and optimizer is small: the coordinates of
every space (input/output relocation moves coordinates, not weights), the step and the relocation
count — :meth:`Body.state_dict`, tensors and JSON values only. Under ``torch.distributed`` with more
than one process, rank 0 alone decides a relocation and broadcasts the permutations
(:func:`relocate_everywhere`), so replicas stay identical.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from topotorch.config import parse_schedule, schedule_value
from topotorch.graph import SpatialGraph
from topotorch.objectives.group import group_spaces as default_group_spaces
from topotorch.objectives.group import neuron_group_norm
from topotorch.objectives.topoloss import TauSchedule, TopoLoss
from topotorch.objectives.wiring import WiringConfig, add_wiring_grad_, wiring_cost
from topotorch.relocation import Method, apply_permutation, relocate

if TYPE_CHECKING:
    from topotorch.config import TrainConfig

RELOCATIONS = ("swap", "assign")
STATE_FORMAT = "topotorch.body/1"
Schedule = float | str | list  # a number, "0:1e-3,5000:1e-2" phases, or [[step, value], ...]


# -- relocation across processes -----------------------------------------------------------------


def _optimizer_list(optimizers: Any) -> list:
    """An optimizer, or an iterable of them, as a list (anything with a ``.state`` mapping counts)."""
    if optimizers is None:
        return []
    if hasattr(optimizers, "state") and hasattr(optimizers, "param_groups"):
        return [optimizers]
    return list(optimizers)


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` job; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def relocate_everywhere(
    graph: SpatialGraph,
    cfg: WiringConfig,
    method: Method = "swap",
    top_k: int = 5,
    optimizers: Any = (),
    rank: int | None = None,
    world: int | None = None,
) -> tuple[list[tuple[str, torch.Tensor]], int]:
    """Relocate on rank 0, broadcast the permutations as one integer tensor, apply them in place on every other
    rank (parameters, grads, optimizer state, coordinates). Returns ``(applied, comm_bytes)``: the (space, perm)
    list in the order applied, and the payload bytes this rank put into or took from broadcasts.

    ``rank``/``world`` default to the initialised ``torch.distributed`` job (a single process without one).
    Usage: ``applied, sent = relocate_everywhere(g, WiringConfig(), "swap", 5, [opt])``.
    """
    if rank is None or world is None:
        rank, world = _world()
    optimizers = _optimizer_list(optimizers)
    applied: list[tuple[str, torch.Tensor]] = []
    if rank == 0:
        applied = relocate(graph, cfg, method, top_k=top_k, optimizer=optimizers).applied
    if world == 1:
        return applied, 0
    import torch.distributed as dist

    # nccl only moves device tensors; gloo (the CPU default) host tensors
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    index = {s.name: i for i, s in enumerate(graph.spaces)}
    if rank == 0:  # [space index, perm...] per permutation, in the order applied
        parts = [torch.cat([torch.tensor([index[n]]), p.to(torch.long)]) for n, p in applied]
        payload = (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)
        n = torch.tensor([payload.numel()], dtype=torch.long, device=device)
    else:
        n = torch.zeros(1, dtype=torch.long, device=device)
    dist.broadcast(n, 0)
    sent = 8
    if rank != 0:
        payload = torch.empty(int(n), dtype=torch.long, device=device)
    if int(n):
        dist.broadcast(payload, 0)
        sent += payload.numel() * 8
    if rank != 0:
        payload, i = payload.cpu(), 0
        while i < payload.numel():
            sp = graph.spaces[int(payload[i])]
            perm = payload[i + 1 : i + 1 + sp.size].clone()
            apply_permutation(graph, sp, perm, optimizers)
            applied.append((sp.name, perm))
            i += 1 + sp.size
    return applied, sent


# -- the wiring term with its closed-form gradient -----------------------------------------------


def _wiring_tensors(graph: SpatialGraph, cfg: WiringConfig) -> list[torch.Tensor]:
    """The tensors :func:`add_wiring_grad_` writes a gradient into (each once, in first-seen order)."""
    seen: dict[int, torch.Tensor] = {}
    for conn in graph.connections:
        if cfg.excluded(conn.weight):
            continue
        names = [conn.weight]
        if cfg.penalize_bias and conn.bias is not None and not cfg.excluded(conn.bias):
            names.append(conn.bias)
        for name in names:
            t = graph.tensor(name)
            seen.setdefault(id(t), t)
    return list(seen.values())


class _ClosedFormWiring(torch.autograd.Function):
    """λ·cc(θ) whose backward is the closed form ``λ·(wf·d + l0)·sign(θ)`` (scaled by the incoming gradient).

    The gradient is made by :func:`add_wiring_grad_` itself (cached factors, streaming for large
    graphs) into freshly emptied ``.grad`` slots that are restored at once, so it is the trainer's
    gradient to the last bit and autograd accumulates it like any other term.
    """

    @staticmethod
    def forward(ctx, graph, cfg, lam, tensors, *params):
        ctx.graph, ctx.cfg, ctx.lam, ctx.tensors = graph, cfg, lam, tensors
        with torch.no_grad():
            return lam * wiring_cost(graph, cfg)

    @staticmethod
    def backward(ctx, grad_out):
        tensors = ctx.tensors
        saved = [t.grad for t in tensors]
        try:
            for t in tensors:
                t.grad = None
            scale = float(grad_out)
            add_wiring_grad_(ctx.graph, ctx.cfg, ctx.lam if scale == 1.0 else ctx.lam * scale)
            fresh = {id(t): t.grad for t in tensors}
        finally:
            for t, g in zip(tensors, saved):
                t.grad = g
        params = [t for t in tensors if t.requires_grad]
        return (None, None, None, None, *(fresh[id(p)] for p in params))


# -- settings --------------------------------------------------------------------------------------


def _phases(name: str, spec: Any) -> list[tuple[int, float]]:
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str, list, tuple)):
        raise ValueError(f"{name} must be a number, a 'STEP:VALUE,...' schedule or [[step, value], ...], got {spec!r}")
    try:
        return parse_schedule(list(spec) if isinstance(spec, tuple) else spec)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive integer" if low == 1 else "a non-negative integer"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def _wiring_config(name: str, value: Any) -> WiringConfig:
    if isinstance(value, WiringConfig):
        return dataclasses.replace(value, exclude=list(value.exclude))
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(WiringConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"{name}: unknown wiring setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return WiringConfig(**value)
    raise ValueError(f"{name} must be a WiringConfig or a dict of its fields, got {type(value).__name__}")


def _active(phases: list[tuple[int, float]]) -> bool:
    return any(v for _, v in phases)


class Body:
    """A model's spatial graph, the structure objectives with their schedules, and the relocation cadence.

    ``graph``: the model's :class:`SpatialGraph`; without one it is built from the data flow on
    ``example_inputs`` (:func:`topotorch.graph.flow.flow_graph`, checked to keep the function).

    Objectives (each off at 0):

    * wiring cost: ``lam`` (a ``step:value`` schedule or a number) · ``wiring_cost(graph, wiring)``;
      biases count only from step ``bias_penalty_from``;
    * TopoLoss: ``topo_tau`` (a number or a :class:`TauSchedule`) over the sheets of ``topo_layers``
      (``"auto"``: :func:`topotorch.sheets.default_layers`), blur factor ``topo_factor``;
    * group lasso: ``group_lam`` (a schedule) · ``neuron_group_norm(graph, group_spaces)``.

    Relocation: ``relocation`` ``"swap"`` (greedy swaps of the ``top_k`` busiest neurons per space)
    or ``"assign"`` (exact per-space assignment), after every ``relocate_every``-th step, judged by
    ``relocation_cost`` (default: ``wiring``); None: never.

    Usage: ``body = Body(net, example_inputs=x, lam="0:1e-3,5000:1e-2", relocation="swap")``.
    """

    def __init__(
        self,
        model: nn.Module,
        graph: SpatialGraph | None = None,
        *,
        example_inputs: Any = None,
        wiring: WiringConfig | dict | None = None,
        lam: Schedule = 0.0,
        bias_penalty_from: int = 0,
        topo_tau: float | TauSchedule = 0.0,
        topo_layers: str = "auto",
        topo_factor: float = 3.0,
        group_lam: Schedule = 0.0,
        group_spaces: Iterable[str] | None = None,
        relocation: Literal["swap", "assign"] | None = None,
        relocate_every: int = 200,
        top_k: int = 5,
        relocation_cost: WiringConfig | dict | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if graph is None:
            if example_inputs is None:
                raise ValueError("Body needs the model's graph or example_inputs to build it from (flow_graph)")
            from topotorch.graph.flow import flow_graph

            graph = flow_graph(model, example_inputs)
        elif not isinstance(graph, SpatialGraph):
            raise ValueError(f"graph must be a SpatialGraph, got {type(graph).__name__}")
        elif not any(m is graph.model for m in model.modules()):  # the model, or the network it wraps (a task's
            raise ValueError(  # LastToken/CharLM around the TinyGPT its graph describes)
                f"the graph was built for another model ({type(graph.model).__name__} object at "
                f"{id(graph.model):#x}, not this {type(model).__name__} nor one of its submodules); "
                "build it from this model"
            )
        self.model, self.graph = model, graph
        self.wiring = _wiring_config("wiring", WiringConfig() if wiring is None else wiring)
        # the cost before ``bias_penalty_from``, made once rather than every step
        self._wiring_no_bias = dataclasses.replace(self.wiring, penalize_bias=False, exclude=list(self.wiring.exclude))
        self.relocation_cost = (
            dataclasses.replace(self.wiring, exclude=list(self.wiring.exclude))
            if relocation_cost is None
            else _wiring_config("relocation_cost", relocation_cost)
        )
        self.lam = _phases("lam", lam)
        self.bias_penalty_from = _count("bias_penalty_from", bias_penalty_from, 0)
        self.group_lam = _phases("group_lam", group_lam)
        self.group_spaces = None if group_spaces is None else [graph.space(s).name for s in group_spaces]
        if relocation is not None and relocation not in RELOCATIONS:
            raise ValueError(f"unknown relocation {relocation!r}; use 'swap', 'assign' or None")
        self.relocation = relocation
        self.relocate_every = _count("relocate_every", relocate_every, 1)
        self.top_k = _count("top_k", top_k, 1)
        if _active(self.lam) and not _wiring_tensors(graph, self.wiring):
            raise ValueError(f"lam > 0 but the wiring cost has nothing to penalise (exclude={self.wiring.exclude})")
        chosen = self.group_spaces if self.group_spaces is not None else default_group_spaces(graph)
        if _active(self.group_lam) and not chosen:
            raise ValueError("group_lam > 0 but the graph has no hidden space for the group lasso; pass group_spaces")
        self.topo_settings = {
            "tau": dataclasses.asdict(topo_tau) if isinstance(topo_tau, TauSchedule) else topo_tau,
            "layers": topo_layers,
            "factor": topo_factor,
        }
        self.topo = _topo_loss(model, topo_tau, topo_layers, topo_factor)
        self.step = 0  # steps completed (after_step calls); where a resumed loop continues
        self.relocations = 0  # relocations that ran
        self.comm_bytes = 0  # bytes this rank sent/received deciding relocations

    @classmethod
    def from_config(cls, config: TrainConfig, model: nn.Module, graph: SpatialGraph) -> Body:
        """The body ``topotorch train`` gives ``model`` under ``config``: the method's penalty (L1 for
        ``l1``/``swap``, wiring cost for ``local``/``bimt``, none for ``none``) with its λ schedule,
        relocation judged by the full wiring cost for ``swap``/``bimt``, TopoLoss and group lasso.
        Usage: ``body = Body.from_config(cfg, model, graph)``.
        """
        from topotorch.config import TrainConfig

        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        return cls(
            model,
            graph,
            wiring=config.wiring(train=True),
            lam=config.lam if config.uses_penalty else 0.0,
            bias_penalty_from=config.bias_penalty_from,
            topo_tau=config.topo_tau,
            topo_layers=config.topo_layers,
            topo_factor=config.topo_factor,
            group_lam=config.group_lam,
            relocation=config.relocation if config.uses_relocation else None,
            relocate_every=config.swap_every,
            top_k=config.top_k,
            relocation_cost=config.wiring(train=False),
        )

    # -- the penalty -----------------------------------------------------------------------------
    def lam_at(self, step: int) -> float:
        """λ of the wiring cost at ``step``. Usage: ``body.lam_at(5000)``."""
        return schedule_value(self.lam, step)

    def wiring_config(self, step: int) -> WiringConfig:
        """The wiring cost the penalty uses at ``step`` (biases only from ``bias_penalty_from``)."""
        if step >= self.bias_penalty_from or not self.wiring.penalize_bias:
            return self.wiring
        return self._wiring_no_bias

    def penalty(self, step: int) -> torch.Tensor:
        """The structure penalty at ``step`` as a scalar tensor to add to the loss (0 when nothing is on).

        Its backward gives TopoLoss's and the group lasso's gradients and the wiring cost's closed
        form. Usage: ``(task_loss + body.penalty(step)).backward()``.
        """
        terms = []
        if self.topo is not None:
            terms.append(self.topo(step) if self.topo.schedule is not None else self.topo())
        g = schedule_value(self.group_lam, step)
        if g:
            terms.append(g * neuron_group_norm(self.graph, self.group_spaces))
        lam = self.lam_at(step)
        if lam:
            cfg = self.wiring_config(step)
            tensors = _wiring_tensors(self.graph, cfg)
            terms.append(
                _ClosedFormWiring.apply(self.graph, cfg, lam, tensors, *(t for t in tensors if t.requires_grad))
            )
        if not terms:
            p = next(self.model.parameters(), None)
            return torch.zeros(
                (),
                dtype=p.dtype if p is not None else torch.get_default_dtype(),
                device=p.device if p is not None else None,
            )
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    def add_gradients(self, step: int) -> None:
        """Add the penalty's gradient at ``step`` to every parameter's ``.grad`` in place, after ``loss.backward()``:
        TopoLoss, then the group lasso, then the wiring cost in closed form (the trainer's order and numbers;
        under DDP call it after the all-reduce, every rank adding the same term once).
        Usage: ``loss.backward(); body.add_gradients(step); opt.step()``.
        """
        if self.topo is not None:
            (self.topo(step) if self.topo.schedule is not None else self.topo()).backward()
        g = schedule_value(self.group_lam, step)
        if g:
            (g * neuron_group_norm(self.graph, self.group_spaces)).backward()
        add_wiring_grad_(self.graph, self.wiring_config(step), self.lam_at(step))

    # -- after the optimizer step ---------------------------------------------------------------
    def relocation_due(self, step: int) -> bool:
        """Whether :meth:`after_step` relocates after step ``step`` (0-based): every ``relocate_every``-th step."""
        return self.relocation is not None and (step + 1) % self.relocate_every == 0

    def after_step(
        self, step: int, optimizers: Any = (), *, relocate: bool | None = None
    ) -> list[tuple[str, torch.Tensor]]:
        """Call after the optimizer step of step ``step`` (0-based, as given to :meth:`penalty`).

        Relocates when due (or when ``relocate`` says so: a caller with its own cadence, e.g. DiLoCo
        at outer syncs), permuting every optimizer's per-parameter state in place; on rank 0 with the
        permutations broadcast when ``torch.distributed`` runs more than one process. Returns the
        (space, permutation) pairs applied, in order (empty when none). Usage: ``body.after_step(step, opt)``.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.step = step + 1
        due = self.relocation_due(step) if relocate is None else bool(relocate)
        if not due:
            return []
        if self.relocation is None:
            raise ValueError("relocate=True but this Body has no relocation method (relocation=None)")
        applied, sent = relocate_everywhere(self.graph, self.relocation_cost, self.relocation, self.top_k, optimizers)
        self.relocations += 1
        self.comm_bytes += sent
        return applied

    # -- resume ----------------------------------------------------------------------------------
    def settings(self) -> dict:
        """Every setting that shapes the run, JSON-able (a resumed body must have the same)."""
        return {
            "wiring": dataclasses.asdict(self.wiring),
            "lam": [list(p) for p in self.lam],
            "bias_penalty_from": self.bias_penalty_from,
            "relocation_cost": dataclasses.asdict(self.relocation_cost),
            "topo": self.topo_settings if self.topo is not None else None,
            "group_lam": [list(p) for p in self.group_lam],
            "group_spaces": self.group_spaces,
            "relocation": self.relocation,
            "relocate_every": self.relocate_every,
            "top_k": self.top_k,
        }

    def state_dict(self) -> dict:
        """What resumes this body exactly: the coordinates of every space (tensors), the step, the relocation
        count and the settings (JSON values). No pickle needed. Usage: ``torch.save(body.state_dict(), f)``
        or safetensors for ``["positions"]`` and JSON for the rest."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "relocations": self.relocations,
            "comm_bytes": self.comm_bytes,
            "settings": json.loads(json.dumps(self.settings())),
            "positions": {s.name: s.positions.clone() for s in self.graph.spaces if s.positions is not None},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; refuses one written under other settings or another graph."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a Body state (expected format {STATE_FORMAT!r})")
        ours = json.loads(json.dumps(self.settings()))
        theirs = state.get("settings", {})
        diff = [f"{k}={theirs.get(k)!r} (this Body: {ours[k]!r})" for k in ours if theirs.get(k) != ours[k]]
        if diff:
            raise ValueError(f"the Body state was written under other settings: {'; '.join(diff[:3])}")
        positions = state.get("positions", {})
        mine = {s.name: s.positions for s in self.graph.spaces if s.positions is not None}
        if set(positions) != set(mine):
            raise ValueError(
                f"the Body state's spaces ({', '.join(sorted(positions))}) are not this graph's "
                f"({', '.join(sorted(mine))})"
            )
        for name, pos in positions.items():
            if tuple(pos.shape) != tuple(mine[name].shape):
                raise ValueError(
                    f"space {name!r}: the state has coordinates of shape {tuple(pos.shape)}, "
                    f"the graph {tuple(mine[name].shape)}"
                )
        for name, pos in positions.items():
            if not torch.equal(pos.to(torch.float64), mine[name]):  # unchanged coordinates keep the caches
                self.graph.set_positions(name, pos)
        self.step = _count("step", state.get("step"), 0)
        self.relocations = _count("relocations", state.get("relocations"), 0)
        self.comm_bytes = _count("comm_bytes", state.get("comm_bytes", 0), 0)

    def __repr__(self) -> str:
        on = [
            f"lam={self.lam}" if _active(self.lam) else None,
            f"topo_tau={self.topo_settings['tau']}" if self.topo is not None else None,
            f"group_lam={self.group_lam}" if _active(self.group_lam) else None,
            f"relocation={self.relocation!r} every {self.relocate_every}" if self.relocation else None,
        ]
        return f"Body({self.graph!r}, {', '.join(x for x in on if x) or 'no objectives'}, step={self.step})"


def _topo_loss(model: nn.Module, tau: Any, layers: str, factor: float) -> TopoLoss | None:
    """τ·TopoLoss over the sheets of ``layers`` (``"auto"``: the paper's layers), or None when τ is 0."""
    if isinstance(tau, TauSchedule):
        if not (tau.start or tau.end):
            return None
    elif isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"topo_tau must be a number >= 0 or a TauSchedule, got {tau!r}")
    elif not tau:
        return None
    if not isinstance(layers, str) or not layers.strip():
        raise ValueError(f"topo_layers must be 'auto' or a layer-name pattern like '*.mlp.0', got {layers!r}")
    from topotorch.sheets import default_layers

    pattern = default_layers(model) if layers == "auto" else layers
    try:
        return TopoLoss(model, pattern, factor=factor, tau=tau)
    except ValueError as e:
        raise ValueError(f"TopoLoss (topo_layers={layers!r}, topo_factor={factor!r}): {e}") from None
