"""A :class:`~topotorch.body.Body` inside Hugging Face ``transformers.Trainer``: one callback.

Where each piece goes follows from the Trainer's step (``Trainer._run_epoch``, transformers 5.24)::

    backward on each micro-batch (the last one all-reduces under DDP)
    clip_grad_norm_            (args.max_grad_norm > 0; unscales fp16 gradients first)
    on_pre_optimizer_step      <- body.add_gradients(global_step)
    optimizer.step()
    lr_scheduler.step(); model.zero_grad(); global_step += 1
    on_step_end                <- body.after_step(global_step - 1, the torch optimizer)
    save checkpoint-N, then on_save  <- the body state into checkpoint-N/

* **Gradients** are added in ``on_pre_optimizer_step``: the task gradients there are final —
  accumulated over ``gradient_accumulation_steps`` micro-batches and all-reduced across processes —
  so every rank adds the same penalty gradient once, as in the plain loop's
  ``loss.backward(); body.add_gradients(step); opt.step()``. **Gradient clipping runs before this
  hook**, so ``max_grad_norm`` clips the task gradient only, never the structure penalty (set
  ``max_grad_norm=0`` for no clipping at all). Under fp16 without clipping the gradients are still
  scaled at this hook; the callback unscales them first (``GradScaler.unscale_``, which the optimizer
  step then skips), so the penalty is never divided by the loss scale.
* **Relocation** runs in ``on_step_end``, after the optimizer and the scheduler stepped: the Trainer's
  optimizer is Accelerate's ``AcceleratedOptimizer``, unwrapped to the torch optimizer whose ``.state`` is
  keyed by the parameters, and Adam's moments are permuted with the weights. Under several processes
  (``torchrun`` / ``accelerate launch``: ``torch.distributed`` is initialised) rank 0 decides each
  relocation and broadcasts it (:func:`topotorch.body.relocate_everywhere`), so replicas stay identical.
  N processes equal one process accumulating the same N micro-batches (``gradient_accumulation_steps=N``;
  bitwise in float64, tests/integrations/test_integrations.py): the all-reduce sums in accumulation's order. One
  N-times-larger batch sums in another order, and with a wiring penalty that can show: a parameter whose
  task gradient is analytically zero (GPT-2's key bias — softmax ignores a shift shared by all keys) sits
  at rounding noise, and the closed-form gradient ``λ·(wf·d + l0)·sign(θ)`` follows the noise's sign, so
  that dead parameter alone ends with other signs (same magnitudes, same function).
* **The scheduler and the learning rate** need nothing: a relocation permutes parameters and their
  per-parameter optimizer state only, the param groups (the Trainer's decay / no-decay split) hold the
  same parameter objects, and the scheduler's state has no per-parameter entries. The body's own
  schedules (``lam``, ``group_lam``, TopoLoss τ, ``bias_penalty_from``, the relocation cadence) are
  indexed by the optimizer step (``state.global_step``), so they survive resumes and gradient
  accumulation; the penalty gradient is then scaled by the scheduled lr like any other.
* **Checkpoints**: ``on_save`` writes ``topotorch_body.safetensors`` + ``topotorch_body.json``
  (atomic, checksummed; main process only) into the folder the Trainer just wrote,
  ``output_dir/checkpoint-N``. ``on_train_begin`` of a resumed run (``state.global_step > 0``) reads them
  back from ``resume_from`` if given, else ``args.resume_from_checkpoint``, else
  ``output_dir/checkpoint-N`` — and refuses to continue without them (the weights were trained on
  relocated coordinates; starting from the initial ones would silently change the objective).

FSDP and DeepSpeed shard parameters (a relocation needs whole weight matrices on every rank): refused.

    >>> body = Body(model, example_inputs={"input_ids": ids[:2]}, lam=1e-4, relocation="swap")
    >>> Trainer(model, args, train_dataset=ds, callbacks=[BodyCallback(body)]).train()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from topotorch.body import Body
from topotorch.integrations import has_body_state, load_body_state, save_body_state


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under Accelerate's (and similar) wrappers: the one whose ``.state`` is keyed by parameters.

    Usage: ``torch_optimizer(trainer.optimizer)``.
    """
    seen = 0
    while not type(optimizer).__module__.startswith("torch.optim") and hasattr(optimizer, "optimizer"):
        optimizer, seen = optimizer.optimizer, seen + 1
        if seen > 8:
            break
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"expected a torch optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return optimizer


def _unscale(optimizer: Any) -> None:
    """Unscale fp16 gradients before the penalty is added (once per step; a no-op without a GradScaler)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    try:
        scaler.unscale_(torch_optimizer(optimizer))
    except RuntimeError as e:  # clip_grad_norm_ already unscaled this step
        if "already been called" not in str(e):
            raise


class BodyCallback(TrainerCallback):
    """Train ``body``'s structure objectives and relocation inside ``transformers.Trainer`` (see the module notes).

    ``resume_from``: the checkpoint folder holding the body state when resuming from a folder that is
    neither ``args.resume_from_checkpoint`` nor ``output_dir/checkpoint-N`` (e.g. ``trainer.train(
    resume_from_checkpoint="elsewhere/checkpoint-400")``, which HF does not record in ``args``).
    ``last_applied``: the (space, permutation) pairs of the most recent relocation.
    Usage: ``Trainer(model, args, train_dataset=ds, callbacks=[BodyCallback(body)])``.
    """

    def __init__(self, body: Body, resume_from: str | os.PathLike | None = None):
        if not isinstance(body, Body):
            raise ValueError(f"BodyCallback needs a topotorch Body, got {type(body).__name__}")
        self.body = body
        self.resume_from = resume_from
        self.last_applied: list[tuple[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        for name, on in (("FSDP", args.fsdp), ("DeepSpeed", args.deepspeed)):
            if on:
                raise ValueError(
                    f"BodyCallback does not support {name}: relocation permutes whole weight matrices, "
                    "which sharded parameters do not hold; use DDP (torchrun / accelerate launch)"
                )
        if state.global_step > 0:
            folder = self._checkpoint(args, state)
            load_body_state(self.body, folder)
            if self.body.step != state.global_step:
                raise ValueError(
                    f"the body state in {folder} is at step {self.body.step}, the Trainer resumes at step "
                    f"{state.global_step}: pass BodyCallback(body, resume_from=<the checkpoint folder>)"
                )
        return control

    def _checkpoint(self, args, state) -> Path:
        """The folder a resumed run's body state is read from (see the module notes)."""
        candidates = [self.resume_from]
        if isinstance(args.resume_from_checkpoint, (str, os.PathLike)):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for c in candidates:
            if c is not None and has_body_state(c):
                return Path(c)
        tried = ", ".join(str(c) for c in candidates if c is not None)
        raise ValueError(
            f"the Trainer resumes at step {state.global_step} but no topotorch body state was found "
            f"(tried {tried}); pass BodyCallback(body, resume_from=<the checkpoint folder>)"
        )

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            _unscale(optimizer)
        self.body.add_gradients(state.global_step)
        return control

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        optimizers = [] if optimizer is None else [torch_optimizer(optimizer)]
        applied = self.body.after_step(state.global_step - 1, optimizers)
        if applied:
            self.last_applied = applied
        return control

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # the main process (of each node with save_on_each_node)
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not folder.is_dir():
                raise ValueError(f"the Trainer saved no checkpoint folder {folder} to put the body state in")
            save_body_state(self.body, folder)
        return control


__all__ = ["BodyCallback", "torch_optimizer"]
