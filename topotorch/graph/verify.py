"""The safety net: every space a graph calls movable is checked to keep the model's function.

A graph builder's claim "permuting these neurons together changes nothing" is tested,
not trusted: on a float64 copy of the model whose parameters are jittered (so that
symmetric initialisations — LayerNorm weights of one, zero biases — cannot hide a
parameter the builder forgot), every movable space gets a random permutation of the kind
relocation may apply (whole groups shuffled, then neurons within each group), and the
outputs are compared with the unpermuted copy's. One forward for all spaces together; only
when that fails, one forward per space to name the culprits.

    >>> check_graph(graph, example_inputs)  # raises ValueError naming any space that fails
"""

from __future__ import annotations

import copy

import torch
from torch.overrides import TorchFunctionMode

from topotorch.graph.core import Space, SpatialGraph, group_matrix


def random_permutation(space: Space, generator: torch.Generator) -> torch.Tensor:
    """A random permutation that relocation could apply to ``space`` (whole groups, then within groups)."""
    n = space.size
    if space.groups is None:
        return torch.randperm(n, generator=generator)
    g = group_matrix(space.groups.cpu())  # (n_groups, size)
    n_groups, size = g.shape
    order = torch.randperm(n_groups, generator=generator)
    within = torch.argsort(torch.rand(n_groups, size, generator=generator), dim=1)
    perm = torch.empty(n, dtype=torch.long)
    perm[g.reshape(-1)] = g[order].gather(1, within).reshape(-1)
    return perm


class _DtypeSpy(TorchFunctionMode):
    """Records the lowest floating precision any torch call of a forward pass produced.

    A function mode, not a dispatch mode: entering a dispatch mode imports torch._dynamo (seconds),
    and every builder runs this check."""

    def __init__(self) -> None:
        super().__init__()
        self.lowest: torch.dtype | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in output_tensors_of(out):
            if t.is_floating_point() and t.dtype != torch.float64:
                if self.lowest is None or torch.finfo(t.dtype).eps > torch.finfo(self.lowest).eps:
                    self.lowest = t.dtype
        return out


def output_tensors_of(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors_of(o)]
    return []


def _jitter_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random offsets for every small parameter (norm weights, biases) and every constant one (a zero-initialised
    projection); large random-initialised weights are generic already, and jittering 100M entries costs seconds."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 << 16 and bool(p.min() != p.max()):
                continue
            scale = 0.1 * (float(p.abs().mean()) + 0.05)
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(torch.randn(b.shape, generator=generator, dtype=b.dtype) * 0.1)
            elif name.endswith("running_var"):
                b.mul_(torch.exp(torch.randn(b.shape, generator=generator, dtype=b.dtype) * 0.2))


def _to_double(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_double(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_double(v) for v in x)
    return x


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        scale = float(x.abs().max()) if x.numel() else 0.0
        err = float((x - y).abs().max()) if x.numel() else 0.0
        worst = max(worst, err / (scale + 1e-300))
    return worst


def check_graph(
    graph: SpatialGraph, example_inputs, rtol: float = 1e-10, seed: int = 0, raise_on_failure: bool = True
) -> dict[str, float]:
    """Permute every movable (``weights``) space of a float64 copy; return {space: relative error} of
    those that change the output (empty when all keep it). Raises ``ValueError`` naming them unless
    ``raise_on_failure=False``. Usage: ``check_graph(g, torch.randn(2, 16))``.
    """
    from topotorch.graph.flow import output_tensors, run_model
    from topotorch.relocation import apply_permutation

    spaces = [s for s in graph.spaces if s.relocate == "weights" and s.size > 1]
    if not spaces:
        return {}
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(graph.model).double().eval()
    _jitter_(model, gen)
    inputs = _to_double(example_inputs)
    twin = SpatialGraph(model, graph.spaces, graph.connections)
    with torch.no_grad():
        with _DtypeSpy() as spy:
            base = output_tensors(run_model(model, inputs))
        if spy.lowest is not None:  # the model computes in lower precision inside (e.g. a float32 RMSNorm)
            rtol = max(rtol, 1e3 * torch.finfo(spy.lowest).eps)
        perms = {s.name: random_permutation(s, gen) for s in spaces}
        for s in spaces:
            apply_permutation(twin, s, perms[s.name])
        if _relative_error(base, output_tensors(run_model(model, inputs))) <= rtol:
            return {}
        for s in reversed(spaces):  # undo, newest first
            apply_permutation(twin, s, torch.argsort(perms[s.name]))
        failed = {}
        for s in spaces:
            apply_permutation(twin, s, perms[s.name])
            err = _relative_error(base, output_tensors(run_model(model, inputs)))
            apply_permutation(twin, s, torch.argsort(perms[s.name]))
            if err > rtol:
                failed[s.name] = err
    if failed and raise_on_failure:
        raise ValueError(refusal(graph, failed))
    return failed


def refusal(graph: SpatialGraph, failed: dict[str, float]) -> str:
    """The error message for spaces that fail the check: which layers, how far the output moved."""
    parts = []
    for name, err in failed.items():
        layers = sorted({sl.name.rpartition(".")[0] or sl.name for sl in graph.space(name).slices})
        shown = ", ".join(repr(n) for n in layers[:4]) + (", ..." if len(layers) > 4 else "")
        parts.append(
            f"space {name!r} (layers {shown}): a random permutation changed the output by {err:.2g} (relative)"
        )
    return (
        "refusing a graph whose relocation would change the model's function: "
        + "; ".join(parts)
        + ". The layers hide structure the graph builder does not understand (e.g. a head reshape); "
        "keep them out of the graph or give them a coupling rule"
    )


def checked(graph: SpatialGraph, example_inputs, verify: bool = True) -> SpatialGraph:
    """``graph`` after :func:`check_graph` on ``example_inputs`` (a tensor, tuple or dict, or a callable
    making one). A builder that cannot make an example for a model it does not know warns instead of
    failing; pass ``example_inputs`` to check it. Usage: ``return checked(SpatialGraph(...), x)``."""
    if not verify:
        return graph
    if callable(example_inputs):
        try:
            example_inputs = example_inputs()
            from topotorch.graph.flow import run_model

            with torch.no_grad():
                run_model(graph.model, example_inputs)
        except Exception as e:  # noqa: BLE001 - the model's forward does not take the builder's guess
            import warnings

            warnings.warn(
                f"graph of {type(graph.model).__name__} not checked for function preservation: could not "
                f"make an example input ({type(e).__name__}: {e}); pass example_inputs=",
                stacklevel=3,
            )
            return graph
    check_graph(graph, example_inputs)
    return graph
