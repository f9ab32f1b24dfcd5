"""Spatial graph of a residual conv net: channels are neurons, kernels are connections.

Coupling: a **stream channel** j is output channel j of the stem and of every block's second
conv (with biases), input channel j of every block's first conv, and the ``H·W`` consecutive
columns of the flattened head that came from channel j. A **hidden channel** of block l is
output channel j of its first conv (and bias, BatchNorm weight, bias and running
statistics) and input channel j of its second conv. The wiring cost treats a kernel as one
connection per channel pair (``|W|`` summed over the kernel window).

Works with :class:`topotorch.models.SmallResNet` and any module with the same parts
(``stem``, ``blocks[i].{conv1, bn, conv2}``, ``head``).

    >>> g = conv_graph(SmallResNet(channels=16))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from topotorch.geometry import make_layout
from topotorch.graph import Connection, Slice, Space, SpatialGraph, slice_index
from topotorch.graph.transformer import check_all_parameters_placed


def conv_graph(
    model: nn.Module,
    layouts: dict | None = None,
    input_labels: list[str] | None = None,
    output_labels: list[str] | None = None,
    example_inputs=None,
    verify: bool = True,
) -> SpatialGraph:
    """Spaces ``input`` → ``resid`` ⇄ ``blocks.{l}.hidden`` → ``output``. Usage: ``conv_graph(resnet)``.

    Raises ``ValueError`` naming any layer it cannot place. The graph is checked to keep the
    model's function (on ``example_inputs`` or random square images of the head's size). Any
    other conv net: :func:`~topotorch.graph.flow.flow_graph`.
    """
    layouts = dict(layouts or {})
    for part in ("stem", "blocks", "head"):
        if not hasattr(model, part):
            raise ValueError(f"conv_graph needs a model with .stem, .blocks and .head; missing .{part}")
    stem, head = model.stem, model.head
    if not isinstance(stem, nn.Conv2d) or stem.groups != 1:
        raise ValueError(f"cannot place stem layer 'stem' ({type(stem).__name__}): expected an ungrouped nn.Conv2d")
    c = stem.out_channels
    if not isinstance(head, nn.Linear) or head.in_features % c:
        raise ValueError(f"cannot place head 'head': expected an nn.Linear over the flattened {c}-channel map")
    per_channel = head.in_features // c

    def layout(name: str, n: int) -> torch.Tensor:
        return make_layout(layouts.get(name), n)

    n_in = stem.in_channels
    inp = Space(
        "input",
        n_in,
        layout("input", n_in),
        0.0,
        "input",
        "fixed" if n_in == 1 else "positions",
        slices=[Slice("stem.weight", 1, slice_index(n_in))],
        labels=input_labels,
    )
    resid = Space("resid", c, layout("resid", c), 0.5, "hidden", "weights", stream=True)
    sb = "stem.bias" if stem.bias is not None else None
    resid.slices += [Slice("stem.weight", 0, slice_index(c))] + ([Slice(sb, 0, slice_index(c))] if sb else [])
    conns = [
        Connection(
            "stem.weight",
            "resid",
            "input",
            Slice("stem.weight", 0, slice_index(c)),
            Slice("stem.weight", 1, slice_index(n_in)),
            sb,
        )
    ]
    spaces = [inp, resid]
    blocks: Any = model.blocks  # any iterable of blocks (nn.ModuleList, nn.Sequential ...)
    for li, block in enumerate(blocks):
        pre = f"blocks.{li}"
        conv1, conv2 = getattr(block, "conv1", None), getattr(block, "conv2", None)
        for name, conv in (("conv1", conv1), ("conv2", conv2)):
            if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
                raise ValueError(
                    f"cannot place layer {pre}.{name!s} ({type(conv).__name__}): expected an ungrouped nn.Conv2d"
                )
        assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)  # checked just above
        h = conv1.out_channels
        name = f"{pre}.hidden"
        hid = Space(name, h, layout(name, h), float(li + 1), "hidden", "weights")
        b1 = f"{pre}.conv1.bias" if conv1.bias is not None else None
        b2 = f"{pre}.conv2.bias" if conv2.bias is not None else None
        hid.slices += [Slice(f"{pre}.conv1.weight", 0, slice_index(h)), Slice(f"{pre}.conv2.weight", 1, slice_index(h))]
        hid.slices += [Slice(b1, 0, slice_index(h))] if b1 else []
        bn = getattr(block, "bn", nn.Identity())
        if isinstance(bn, nn.BatchNorm2d):
            for t in ("weight", "bias", "running_mean", "running_var"):
                if getattr(bn, t, None) is not None:
                    hid.slices.append(Slice(f"{pre}.bn.{t}", 0, slice_index(h)))
        elif not isinstance(bn, nn.Identity):
            raise ValueError(f"cannot place normalisation layer {pre}.bn ({type(bn).__name__})")
        resid.slices += [
            Slice(f"{pre}.conv1.weight", 1, slice_index(c)),
            Slice(f"{pre}.conv2.weight", 0, slice_index(c)),
        ]
        resid.slices += [Slice(b2, 0, slice_index(c))] if b2 else []
        conns.append(
            Connection(
                f"{pre}.conv1.weight",
                name,
                "resid",
                Slice(f"{pre}.conv1.weight", 0, slice_index(h)),
                Slice(f"{pre}.conv1.weight", 1, slice_index(c)),
                b1,
            )
        )
        conns.append(
            Connection(
                f"{pre}.conv2.weight",
                "resid",
                name,
                Slice(f"{pre}.conv2.weight", 0, slice_index(c)),
                Slice(f"{pre}.conv2.weight", 1, slice_index(h)),
                b2,
            )
        )
        spaces.append(hid)
    n_out = head.out_features
    out = Space(
        "output", n_out, layout("output", n_out), float(len(blocks) + 1), "output", "positions", labels=output_labels
    )
    flat = torch.arange(c * per_channel).view(c, per_channel)  # channel j owns H*W consecutive columns
    resid.slices.append(Slice("head.weight", 1, flat))
    hb = "head.bias" if head.bias is not None else None
    out.slices += [Slice("head.weight", 0, slice_index(n_out))] + ([Slice(hb, 0, slice_index(n_out))] if hb else [])
    conns.append(
        Connection(
            "head.weight",
            "output",
            "resid",
            Slice("head.weight", 0, slice_index(n_out)),
            Slice("head.weight", 1, flat),
            hb,
        )
    )
    spaces.append(out)
    check_all_parameters_placed(model, spaces)
    from topotorch.graph.verify import checked

    side = getattr(model, "image_size", None) or round(per_channel**0.5)

    def example():
        return torch.randn(2, n_in, side, side, dtype=stem.weight.dtype, device=stem.weight.device)

    return checked(
        SpatialGraph(model, spaces, conns), example_inputs if example_inputs is not None else example, verify
    )
