"""A :class:`~topotorch.body.Body` inside ``lightning.pytorch.Trainer``: one callback.

Lightning's automatic optimization runs, per optimizer step (``Precision._after_closure``, Lightning 2.6)::

    training_step, backward (all-reduced under DDP; accumulated over accumulate_grad_batches)
    [AMP: GradScaler.unscale_]
    on_before_optimizer_step      <- body.add_gradients(trainer.global_step)
    clip gradients                (gradient_clip_val: clips the penalty's gradient too)
    optimizer.step(); global_step += 1
    on_train_batch_end            <- body.after_step(step, trainer.optimizers)

so the gradients the body adds to are final and unscaled, and the penalty's gradient is clipped
together with the task's (unlike HF's Trainer, which clips before its hook). With gradient
accumulation ``on_train_batch_end`` follows every batch, so the callback relocates only after a batch
whose optimizer step it saw. Relocation permutes the parameters and every optimizer's per-parameter
state (``trainer.optimizers``: the torch optimizers); under DDP rank 0 decides and broadcasts
(:func:`topotorch.body.relocate_everywhere`). The body's schedules are indexed by ``global_step``
(optimizer steps), which Lightning restores on resume; lr schedulers are untouched.

Checkpoints carry the body state under ``checkpoint["topotorch_body"]``: the coordinates as plain
tensors and the step, relocation count and settings as JSON values (:meth:`Body.state_dict`);
``on_load_checkpoint`` restores it and a checkpoint without it is refused. Manual optimization is
refused too (call ``body.add_gradients`` / ``body.after_step`` in your ``training_step`` instead).

    >>> trainer = Trainer(max_steps=1000, callbacks=[BodyCallback(body)])
    >>> trainer.fit(module, loader)
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback

from topotorch.body import Body

CHECKPOINT_KEY = "topotorch_body"


class BodyCallback(Callback):
    """Train ``body``'s structure objectives and relocation inside a Lightning ``Trainer`` (see the module notes).

    ``last_applied``: the (space, permutation) pairs of the most recent relocation.
    Usage: ``Trainer(max_steps=1000, callbacks=[BodyCallback(body)]).fit(module, loader)``.
    """

    def __init__(self, body: Body):
        if not isinstance(body, Body):
            raise ValueError(f"BodyCallback needs a topotorch Body, got {type(body).__name__}")
        self.body = body
        self.last_applied: list[tuple[str, torch.Tensor]] = []
        self._stepped: int | None = None  # the optimizer step taken in this batch, not yet followed by after_step

    def on_fit_start(self, trainer, pl_module):
        if not pl_module.automatic_optimization:
            raise ValueError(
                "BodyCallback needs automatic optimization; with manual optimization call "
                "body.add_gradients(step) before and body.after_step(step, optimizers) after your opt.step()"
            )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if self._stepped == step:
            raise ValueError(f"a second optimizer step at step {step}: BodyCallback supports one optimizer")
        self.body.add_gradients(step)
        self._stepped = step

    def _after_step(self, trainer) -> None:
        if self._stepped is None:
            return
        step, self._stepped = self._stepped, None
        applied = self.body.after_step(step, list(trainer.optimizers))
        if applied:
            self.last_applied = applied

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._after_step(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._after_step(trainer)  # a checkpoint taken between the optimizer step and our batch end
        checkpoint[CHECKPOINT_KEY] = self.body.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY not in checkpoint:
            raise ValueError(
                "this Lightning checkpoint has no topotorch body state (it was not saved with BodyCallback); "
                "the weights may sit on relocated coordinates, so the body cannot continue from it"
            )
        self.body.load_state_dict(checkpoint[CHECKPOINT_KEY])
        step = checkpoint.get("global_step")
        if step is not None and step != self.body.step:
            raise ValueError(f"the body state is at step {self.body.step}, the checkpoint at global step {step}")


__all__ = ["CHECKPOINT_KEY", "BodyCallback"]
