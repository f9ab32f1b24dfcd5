"""``coupling_graph``: the name earlier versions used for the traced builder, now the data-flow builder.

Earlier releases grouped channels with Torch-Pruning's DependencyGraph, which knows nothing of
attention heads: on a BERT model it grouped each layer's query/key/value columns into one space
and relocation then mixed heads, silently changing the model's output. The builder is now
:func:`topotorch.graph.flow.flow_graph` (one tracer, one registry of per-op rules, a safety net
that checks every movable space); this module keeps the old name and signature.

    >>> g = coupling_graph(my_model, torch.randn(1, 64))
    >>> relocate(g, WiringConfig(wf=2, l0=0.5), "assign")  # the same function, lower wiring cost
"""

from __future__ import annotations

import torch
from torch import nn

from topotorch.graph.core import SpatialGraph
from topotorch.graph.flow import flow_graph


def coupling_graph(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple | dict,
    layouts: dict | None = None,
    input_labels: list[str] | None = None,
    output_labels: list[str] | None = None,
    verify: bool = True,
    unknown_ops: str = "raise",
) -> SpatialGraph:
    """Trace ``model`` on ``example_inputs`` and build its checked spatial graph (see :func:`flow_graph`).

    Spaces are named after the layer that writes them (``"fc1"``, ``"blocks.0.conv1"``; a residual
    stream after its first writer, marked ``stream``), ``input``/``tokens`` for the model's inputs and
    ``output`` for its output. Usage: ``coupling_graph(resnet, torch.randn(1, 1, 8, 8))``.
    """
    return flow_graph(
        model,
        example_inputs,
        layouts=layouts,
        input_labels=input_labels,
        output_labels=output_labels,
        verify=verify,
        unknown_ops=unknown_ops,
    )
