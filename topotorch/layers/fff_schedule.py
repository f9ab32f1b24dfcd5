"""The soft-to-hard training schedule for every FFF layer of a model.

An FFF trained soft to the end loses accuracy once its decisions are rounded (digits ℓ=8: 97%
soft, 76% hard). The schedule trains soft for the first ``1 - hard_frac`` of the steps while
the decisions sharpen geometrically from sigmoid(z) to sigmoid(final_sharpness · z), then with
hard decisions (``train_hardened``: rounded routing, straight-through node gradients) so that
the leaves fit the routing they are deployed with.

    >>> schedule = SoftToHard(model, total_steps=6300, hard_frac=0.5)
    >>> for step in range(6300):
    ...     schedule.step(step)  # sets sharpness / train_hardened on every FFF layer
    ...     ...  # forward, loss, backward, optimiser step
    >>> schedule.finish()  # back to plain soft training mode; eval() is hard anyway
"""

from __future__ import annotations

from torch import nn

from topotorch.layers.fff import FFF, fff_layers

__all__ = ["SoftToHard"]


class SoftToHard:
    """Drive ``sharpness`` and ``train_hardened`` of every :class:`FFF` in ``model`` by step.

    ``step(s)`` sets sharpness ``final_sharpness ** min(1, s / soft_steps)`` (soft_steps =
    round(total_steps · (1 - hard_frac))); before soft_steps the decisions are soft, from then on
    hard (whose straight-through node gradients scale with the sharpness, so a run resumed
    inside the hard phase behaves like an uninterrupted one). Returns the phase name.
    Usage: ``SoftToHard(model, total_steps=1000, hard_frac=0.5).step(0)``.
    """

    def __init__(self, model: nn.Module, total_steps: int, hard_frac: float = 0.5, final_sharpness: float = 30.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= hard_frac <= 1.0:
            raise ValueError(f"hard_frac must be in [0, 1], got {hard_frac}")
        if final_sharpness < 1.0:
            raise ValueError(f"final_sharpness must be >= 1 (1 = no sharpening), got {final_sharpness}")
        self.layers = [m for _, m in fff_layers(model) if isinstance(m, FFF)]
        if not self.layers:
            raise ValueError("SoftToHard: the model has no FFF layer")
        self.total_steps, self.hard_frac, self.final_sharpness = (
            int(total_steps),
            float(hard_frac),
            float(final_sharpness),
        )
        self.soft_steps = round(self.total_steps * (1.0 - self.hard_frac))

    def phase(self, step: int) -> str:
        """``"soft"`` or ``"hard"`` at ``step``."""
        return "soft" if step < self.soft_steps else "hard"

    def step(self, step: int) -> str:
        """Set every FFF layer for training step ``step``; returns its phase."""
        phase = self.phase(step)
        sharpness = self.final_sharpness ** (min(1.0, step / self.soft_steps) if self.soft_steps else 1.0)
        for layer in self.layers:
            layer.train_hardened = phase == "hard"
            layer.sharpness = sharpness
        return phase

    def finish(self) -> None:
        """End of training: soft (unhardened) training mode at the final sharpness, the decision
        temperature the model was trained to (``eval()`` routes hard regardless)."""
        for layer in self.layers:
            layer.train_hardened = False
            layer.sharpness = self.final_sharpness
