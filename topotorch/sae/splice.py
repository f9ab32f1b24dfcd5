"""Downstream evaluation: the model's loss with the dictionary's reconstruction spliced in.

Reconstruction error (FVU) says how far x̂ is from x, not whether the model still works on x̂:
a small error in a direction the model reads can cost more than a large one it ignores. So the
model is run three times on the same tokens, differing only at the hook point:

* clean — untouched: cross-entropy CE_clean;
* spliced — the hook point's activation x replaced by the dictionary's x̂ (a forward hook that
  returns x̂; for a transcoder, the module's output replaced by the transcoder applied to its input):
  CE_sae;
* zero-ablated — the activation replaced by zeros: CE_zero, the "knows nothing" reference.

    CE-loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)

is 1 for a perfect dictionary and 0 for one no better than deleting the layer. The KL divergence
KL(p_clean ‖ p_spliced) per token says how far the next-token distribution moved (0 when x̂ = x).

Works for any causal LM whose forward gives logits ``[B, T, V]`` (ours) or an object with
``.logits`` (Hugging Face). A batch is a tensor of token ids (targets: the ids shifted by one),
an ``(ids, targets)`` pair (a task's ``(x, y)``; targets of -100 are ignored) or a dict for
``model(**batch)`` with ``input_ids`` (and ``attention_mask``: padding is not scored).

    >>> splice_eval(model, sae, batches, "gpt.blocks.1")
    {'ce_clean': 1.52, 'ce_spliced': 1.61, 'ce_zero': 4.02, 'ce_recovered': 0.964, 'kl': 0.081, 'tokens': 16384}
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from topotorch.sae.activations import (
    HookPoint,
    call_model,
    find_hook_points,
    transcoder_points,
)

IGNORE = -100


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` (Hugging Face), or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _targets(batch: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) aligned position by position, -100 where nothing is scored."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        y = batch[1].to(logits.device)
        if y.shape != logits.shape[:-1]:
            raise ValueError(f"targets of shape {tuple(y.shape)} do not match logits {tuple(logits.shape)}")
        return logits, y
    if isinstance(batch, dict):
        ids = batch["input_ids"].to(logits.device)
        y = ids[:, 1:].clone()
        if batch.get("attention_mask") is not None:
            y[batch["attention_mask"][:, 1:].to(logits.device) == 0] = IGNORE
        return logits[:, :-1], y
    ids = batch.to(logits.device)
    return logits[:, :-1], ids[:, 1:]


def _replace(value: Any, new: torch.Tensor) -> Any:
    """``value`` (a module's output or args) with its first tensor replaced by ``new``."""
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, (tuple, list)):
        out = list(value)
        i = next(i for i, v in enumerate(out) if isinstance(v, torch.Tensor))
        out[i] = new
        return type(value)(out) if isinstance(value, list) else tuple(out)
    raise TypeError(f"cannot splice into a module output of type {type(value).__name__}")


def _first(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return next(v for v in value if isinstance(v, torch.Tensor))


def _apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """``fn`` on the rows of ``x`` (feature axis ``feature_dim``), reshaped back to ``x``'s shape."""
    xm = x.movedim(feature_dim, -1)
    shape = xm.shape
    rows = fn(xm.reshape(-1, shape[-1]))
    return rows.reshape(*shape[:-1], rows.shape[-1]).to(x.dtype).movedim(-1, feature_dim)


@contextlib.contextmanager
def spliced(
    model: nn.Module,
    replace: Callable[[torch.Tensor], torch.Tensor] | None,
    point: HookPoint,
    source: HookPoint | None = None,
    feature_dim: int = -1,
) -> Iterator[None]:
    """Within the block, the activation at ``point`` is ``replace(rows)`` applied to the activation at
    ``source`` (default: ``point`` itself); ``replace=None`` zero-ablates it. For a transcoder, ``source`` is
    the module's input and ``point`` its output.
    Usage: ``with spliced(model, sae, HookPoint("gpt.blocks.1")): model(ids)``."""
    modules = dict(model.named_modules())
    source = source or point
    seen: dict[str, torch.Tensor] = {}  # the source activation of the current call
    busy: list[bool] = []  # the replacement may call the hooked module itself (a transcoder made of it)
    handles = []
    try:
        if source != point:  # remember the source activation for the replacement at ``point``
            m = modules[source.module_name]
            if source.side == "input":

                def keep_input(mod, args, kwargs):
                    if not busy:
                        seen["x"] = _first(tuple(args) + tuple(kwargs.values()))

                handles.append(m.register_forward_pre_hook(keep_input, with_kwargs=True))
            else:

                def keep_output(mod, args, out):
                    if not busy:
                        seen["x"] = _first(out)

                handles.append(m.register_forward_hook(keep_output))

        def new_value(current: torch.Tensor) -> torch.Tensor:
            if replace is None:
                return torch.zeros_like(current)
            x = seen["x"] if source != point else current
            busy.append(True)
            try:
                return _apply(replace, x, feature_dim)
            finally:
                busy.pop()

        m = modules[point.module_name]
        if point.side == "input":

            def pre(mod, args, kwargs):
                if busy:
                    return None
                if args:
                    return _replace(args, new_value(_first(args))), kwargs
                key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
                return args, {**kwargs, key: new_value(kwargs[key])}

            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            handles.append(
                m.register_forward_hook(lambda mod, args, out: None if busy else _replace(out, new_value(_first(out))))
            )
        yield
    finally:
        for h in handles:
            h.remove()


def _ce_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).double(), y.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


@torch.no_grad()
def splice_eval(
    model: nn.Module,
    sae: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[Any],
    hook: str,
    *,
    transcoder: bool = False,
    feature_dim: int = -1,
    max_batches: int | None = None,
) -> dict[str, float]:
    """CE-loss recovered against zero-ablation and KL(clean ‖ spliced) per token, over ``batches``.

    ``hook``: the hook point (one pattern naming one point) whose activation ``sae`` reconstructs;
    ``transcoder=True``: ``sae`` maps the input of ``hook``'s module to its output, which it replaces.
    Returns ``ce_clean``, ``ce_spliced``, ``ce_zero`` (nats per scored token), ``ce_recovered``,
    ``kl`` (nats per scored token) and ``tokens``. Usage: ``splice_eval(model, sae, [ids], "gpt.blocks.1")``.
    """
    if transcoder:
        source, point = transcoder_points(model, hook)
    else:
        points = find_hook_points(model, hook)
        if len(points) != 1:
            raise ValueError(
                f"splice at one hook point; {hook!r} matches {len(points)}: {', '.join(p.name for p in points[:6])}"
            )
        source = point = points[0]
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # ce clean, ce spliced, ce zero, kl
    tokens = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            logits, y = _targets(batch, logits_of(call_model(model, batch)))
            with spliced(model, sae, point, source, feature_dim):
                s_logits, _ = _targets(batch, logits_of(call_model(model, batch)))
            with spliced(model, None, point, source, feature_dim):
                z_logits, _ = _targets(batch, logits_of(call_model(model, batch)))
            scored = y != IGNORE
            logp = F.log_softmax(logits.double(), -1)
            logq = F.log_softmax(s_logits.double(), -1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
            sums += torch.stack([_ce_sum(logits, y), _ce_sum(s_logits, y), _ce_sum(z_logits, y), kl[scored].sum()])
            tokens += int(scored.sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("splice_eval: no scored tokens in the batches")
    ce_clean, ce_sae, ce_zero, kl = (sums / tokens).tolist()
    gap = ce_zero - ce_clean
    recovered = (ce_zero - ce_sae) / gap if gap != 0 else math.nan
    return {
        "ce_clean": ce_clean,
        "ce_spliced": ce_sae,
        "ce_zero": ce_zero,
        "ce_recovered": recovered,
        "kl": kl,
        "tokens": tokens,
    }
