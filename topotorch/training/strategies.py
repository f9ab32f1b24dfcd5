"""How a step's gradient is made and shared across processes: one process, DDP, or DiLoCo.

The step loop (:mod:`topotorch.training.loop`) is the same for all three; a strategy answers the
questions where they differ:

* ``forward(step, rows)``: the loss of this step's batch (``rows``: indices into the training set,
  None for the full set), as the value to log and to check for NaN. One process computes the
  mean loss; with ``world`` processes each takes every ``world``-th row of the global batch and
  scales its *sum* so that Σ over ranks = the global mean (so DDP's averaged gradient equals the
  one-process gradient at the same global batch). DDP also runs the backward here: its all-reduce
  of the loss overlaps with the gradient's.
* ``finite(step, loss)``: the NaN stop. Where every rank sees the same loss (one process, DDP's
  all-reduced loss) a non-finite loss raises :class:`TrainingDiverged` at once, on every rank
  together; DiLoCo replicas see only their own, so a divergence rides on the next outer sync.
* ``sync(done)``: DiLoCo's outer step every H steps — average the pseudo-gradients θ_outer − θ_local
  over replicas (one all-reduce), step the outer Nesterov-SGD on a shadow copy of the model, reset
  every replica to θ_outer. ``synced`` then says whether replicas are identical after this step.
* ``due(done, every)``: whether a cadence of ``every`` steps (relocation, checkpoints) fires now:
  at a synchronised step, when a multiple of ``every`` was passed since the previous sync (for one
  process and DDP: ``done % every == 0``).
* ``relocated(applied)``: DiLoCo applies rank 0's permutations to its shadow model and the outer
  optimizer's momentum too, so the outer step continues exactly on the permuted network.

    >>> strategy = make_strategy(ctx, config, task, data, model, graph, opt, global_batch)
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch

from topotorch.config import TrainConfig
from topotorch.graph import SpatialGraph
from topotorch.relocation import apply_permutation
from topotorch.tasks import Task, TaskData
from topotorch.training.core import TrainingDiverged, graph_for, task_loss
from topotorch.training.distributed import DistContext


def diverged_error(step: int, value: float) -> TrainingDiverged:
    """The NaN stop's error for a loss ``value`` at ``step`` (0-based). Usage: ``raise diverged_error(35, nan)``."""
    return TrainingDiverged(
        f"loss became {value} at step {step}; lower the learning rate or λ. The last checkpoint is intact."
    )


class Single:
    """One process: the mean loss of the batch, backward, a NaN stops at once."""

    name: ClassVar[str] = "single"
    replica_state: ClassVar[bool] = False  # whether each rank keeps optimizer state of its own (DiLoCo)

    def __init__(
        self,
        ctx: DistContext,
        config: TrainConfig,
        task: Task,
        data: TaskData,
        model: torch.nn.Module,
        graph: SpatialGraph,
        opt: torch.optim.Optimizer,
        global_batch: int,
    ):
        self.ctx, self.config, self.task, self.data = ctx, config, task, data
        self.model, self.graph, self.opt = model, graph, opt
        self.net: torch.nn.Module = model  # what the forward runs (DDP: the wrapped model)
        self.global_batch = global_batch
        self.rows_all = torch.arange(len(data.x_train))
        self.per_sample = 0  # loss terms per sample (sequence positions), read off the first output
        self.loss: torch.Tensor | None = None  # this step's loss, awaiting backward
        self.synced = True

    # -- the step -------------------------------------------------------------------------------
    def begin(self) -> None:
        """Called once before the first step, after any resume."""

    def forward(self, step: int, rows: torch.Tensor | None) -> torch.Tensor:
        """The loss of the batch ``rows`` (None: every training sample), detached; keeps the graph for backward."""
        x, y = self.data.x_train, self.data.y_train
        xb, yb = (x[rows], y[rows]) if rows is not None else (x, y)
        self.loss = task_loss(self.task, self.net(xb), yb)
        return self.loss.detach()

    def share_sum(self, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's share of the global batch: (Σ loss over its rows, that sum scaled so Σ over ranks is the
        global mean, the global number of loss terms)."""
        world = self.ctx.world
        mine = (rows if rows is not None else self.rows_all)[self.ctx.rank :: world]
        out = self.net(self.data.x_train[mine])
        self.per_sample = self.per_sample or (1 if self.task.loss == "ce" else out[0].numel())
        denom = self.global_batch * self.per_sample
        loss_sum = task_loss(self.task, out, self.data.y_train[mine], reduction="sum")
        return loss_sum, loss_sum * (world / denom), denom

    def finite(self, step: int, loss: torch.Tensor) -> bool:
        """The NaN stop: raise :class:`TrainingDiverged` on a non-finite loss; True: take the step."""
        if not torch.isfinite(loss):
            raise diverged_error(step, loss.item())
        return True

    def backward(self) -> None:
        """This step's gradient into ``.grad`` (fresh)."""
        self.opt.zero_grad(set_to_none=True)
        assert self.loss is not None
        self.loss.backward()

    # -- after the optimizer step --------------------------------------------------------------
    def sync(self, done: int) -> bool:
        """Bring replicas together after step ``done`` (1-based) where the strategy does; whether they are now."""
        return self.synced

    def previous_sync(self, done: int) -> int:
        """The step count at the synchronisation before ``done``."""
        return done - 1

    def due(self, done: int, every: int) -> bool:
        """Whether a cadence of ``every`` steps fires after step ``done``: at a synchronised step, once a
        multiple of ``every`` was passed since the previous synchronisation."""
        return self.synced and done // every > self.previous_sync(done) // every

    def relocated(self, applied: list[tuple[str, torch.Tensor]]) -> None:
        """Rank 0's permutations (space, perm), applied to this rank's model already: mirror them where needed."""

    # -- resume ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint needs besides model, optimizer and graph (DiLoCo: outer momentum)."""
        return {}

    def resume(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Restore :meth:`state_tensors` after the model, optimizer and graph were loaded at ``step``."""


class DDP(Single):
    """``world`` processes, each on its share of the global batch; DistributedDataParallel averages the
    gradient in the backward, and the global loss is all-reduced alongside (every rank stops together)."""

    name: ClassVar[str] = "ddp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grad_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def begin(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.net = DistributedDataParallel(self.model)  # after resume: replicas start from rank 0's parameters

    def forward(self, step: int, rows: torch.Tensor | None) -> torch.Tensor:
        import torch.distributed as dist

        loss_sum, loss, denom = self.share_sum(rows)
        total = loss_sum.detach().reshape(1).clone()  # the global loss, overlapping with the backward
        work = dist.all_reduce(total, async_op=True)
        self.ctx.comm_bytes += total.numel() * total.element_size()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradient across ranks here
        self.ctx.comm_bytes += self.grad_bytes
        work.wait()
        return total[0] / denom

    def backward(self) -> None:
        """Done in :meth:`forward`."""


class DiLoCo(Single):
    """Replicas take H local AdamW steps between outer syncs; the outer parameters live in a shadow copy
    with its own graph, so relocation permutes them and the outer momentum exactly like the replicas."""

    name: ClassVar[str] = "diloco"
    replica_state: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        self.H = config.local_steps
        self.shadow = copy.deepcopy(self.model)
        self.shadow_graph = graph_for(self.task, config, self.shadow)
        self.outer_opt = torch.optim.SGD(
            self.shadow.parameters(),
            lr=config.outer_lr,
            momentum=config.outer_momentum,
            nesterov=config.outer_momentum > 0,
        )
        self.diverged: tuple[int, float] | None = None  # a local non-finite loss awaiting the next outer sync

    def forward(self, step: int, rows: torch.Tensor | None) -> torch.Tensor:
        if self.ctx.world == 1:
            return super().forward(step, rows)
        _, self.loss, _ = self.share_sum(rows)  # no per-step communication
        return self.loss.detach()

    def finite(self, step: int, loss: torch.Tensor) -> bool:
        if self.ctx.world == 1:
            return super().finite(step, loss)
        if not torch.isfinite(loss) and self.diverged is None:
            self.diverged = (step, loss.item())
        return self.diverged is None

    def sync(self, done: int) -> bool:
        self.synced = done % self.H == 0 or done == self.config.steps
        if self.synced:
            self.outer_step(done)
        return self.synced

    def previous_sync(self, done: int) -> int:
        return ((done - 1) // self.H) * self.H

    @torch.no_grad()
    def outer_step(self, done: int) -> None:
        """Average the pseudo-gradients θ_outer − θ_local over replicas (one all-reduce, a divergence flag
        riding along), step the outer optimizer, and reset every replica to θ_outer."""
        locals_, outers = list(self.model.parameters()), list(self.shadow.parameters())
        flag = torch.tensor([0.0 if self.diverged is None else 1.0], dtype=locals_[0].dtype)
        flat = torch.cat([(po - pl).reshape(-1) for po, pl in zip(outers, locals_)] + [flag])
        if self.ctx.world > 1:
            import torch.distributed as dist

            dist.all_reduce(flat)
            self.ctx.comm_bytes += flat.numel() * flat.element_size()
            flat /= self.ctx.world
        if flat[-1] > 0:
            where = f"at step {self.diverged[0]} ({self.diverged[1]})" if self.diverged else "on another replica"
            raise TrainingDiverged(
                f"loss became non-finite {where}, before the outer sync at step {done}; lower "
                "the learning rate or λ. The last checkpoint is intact."
            )
        i = 0
        for po in outers:
            n = po.numel()
            po.grad = flat[i : i + n].view_as(po).clone()
            i += n
        self.outer_opt.step()
        for po, pl in zip(outers, locals_):
            pl.copy_(po)

    def relocated(self, applied: list[tuple[str, torch.Tensor]]) -> None:
        for name, perm in applied:
            apply_permutation(self.shadow_graph, name, perm, self.outer_opt)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.shadow.named_parameters():
            buf = self.outer_opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"outer/{n}"] = buf
        return out

    def resume(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        with torch.no_grad():
            for ps, pm in zip(self.shadow.parameters(), self.model.parameters()):
                ps.copy_(pm)  # checkpoints are written right after an outer sync: outer == local
        for s_sp, m_sp in zip(self.shadow_graph.spaces, self.graph.spaces):
            if m_sp.positions is not None:
                self.shadow_graph.set_positions(s_sp.name, m_sp.positions.clone())
        for n, p in self.shadow.named_parameters():
            if f"outer/{n}" in tensors:
                self.outer_opt.state[p]["momentum_buffer"] = tensors[f"outer/{n}"].clone()


STRATEGIES: dict[str, type[Single]] = {s.name: s for s in (Single, DDP, DiLoCo)}


def strategy_name(ctx: DistContext, config: TrainConfig) -> str:
    """``diloco`` with ``local_steps`` > 0, else ``ddp`` under more than one process, else ``single``."""
    return "diloco" if config.local_steps else ("ddp" if ctx.world > 1 else "single")


def make_strategy(
    ctx: DistContext,
    config: TrainConfig,
    task: Task,
    data: TaskData,
    model: torch.nn.Module,
    graph: SpatialGraph,
    opt: torch.optim.Optimizer,
    global_batch: int,
) -> Single:
    """The strategy this process runs ``config`` with (see the module docstring).
    Usage: ``make_strategy(dist_context(), cfg, task, data, model, graph, opt, 64)``."""
    return STRATEGIES[strategy_name(ctx, config)](ctx, config, task, data, model, graph, opt, global_batch)
