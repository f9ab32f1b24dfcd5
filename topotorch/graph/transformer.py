"""Spatial graph of a pre-norm transformer: one residual stream shared by every block, heads, MLPs.

Which tensor dimensions move together when a neuron moves (the coupling):

* **residual neuron j** — column j of every weight that reads the stream (q/k/v, the MLP's
  first layer, the output head), row j of every weight that writes it (the embedding, the
  attention output, the MLP's second layer) with their biases, column j of the position
  table, and entry j of every LayerNorm's weight and bias (LayerNorm commutes with a joint
  permutation of its input and affine parameters). One permutation for all blocks.
* **attention neuron j of block l** — rows j of q, k and v (with biases) and column j of
  the output projection. q·k and the weighted sum of v are unchanged when q, k, v and the
  output columns of one head are permuted together, so neurons trade places only within a
  head (:attr:`Space.groups`).
* **MLP neuron j of block l** — row j of the first layer (and bias), column j of the second.

Works with :class:`topotorch.models.TinyGPT` and any module with the same parts
(``embed``, ``pos``, ``blocks[i].{ln1, attn, ln2, mlp}``, ``ln_f``, ``head``), where
``attn`` is a fused ``qkv``/``proj`` pair or wraps an ``nn.MultiheadAttention`` (``mha``).

    >>> g = transformer_graph(TinyGPT(vocab=65, d_model=64, n_layers=2, n_heads=4))
    >>> relocate(g, WiringConfig(wf=1, l0=0.5, agg="mean"), "assign")  # same function, lower cost
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from topotorch.geometry import make_layout
from topotorch.graph import Connection, Slice, Space, SpatialGraph, slice_index


def _attention_tensors(prefix: str, attn: nn.Module) -> tuple[str, str | None, str, str | None, int]:
    """(qkv weight, qkv bias, out weight, out bias, n_heads) names of a supported attention module."""
    if hasattr(attn, "qkv") and hasattr(attn, "proj"):
        duck: Any = attn  # read by attribute names (nn.Module types its attributes Tensor | Module)
        qkv, proj = duck.qkv, duck.proj
        return (
            f"{prefix}.qkv.weight",
            f"{prefix}.qkv.bias" if qkv.bias is not None else None,
            f"{prefix}.proj.weight",
            f"{prefix}.proj.bias" if proj.bias is not None else None,
            duck.n_heads,
        )
    mha = attn if isinstance(attn, nn.MultiheadAttention) else getattr(attn, "mha", None)
    if isinstance(mha, nn.MultiheadAttention):
        if not mha._qkv_same_embed_dim:
            raise ValueError(f"{prefix}: nn.MultiheadAttention with separate kdim/vdim is not supported")
        p = prefix if mha is attn else f"{prefix}.mha"
        return (
            f"{p}.in_proj_weight",
            f"{p}.in_proj_bias" if mha.in_proj_bias is not None else None,
            f"{p}.out_proj.weight",
            f"{p}.out_proj.bias" if mha.out_proj.bias is not None else None,
            mha.num_heads,
        )
    raise ValueError(
        f"cannot place attention layer {prefix!r} ({type(attn).__name__}): expected a fused "
        "qkv/proj pair or nn.MultiheadAttention"
    )


def head_line(n_heads: int, head_dim: int, gap: float = 1.0) -> torch.Tensor:
    """Attention neurons on a line in [0, 1], head by head, with a gap of ``gap`` slots between heads
    (so drawings show each head and the wiring cost sees heads as separate places).

    Usage: ``Space("attn", 64, head_line(4, 16), ...)``.
    """
    slot = torch.arange(n_heads * head_dim, dtype=torch.float64)
    x = slot + gap * (slot // head_dim)
    span = x.max() + 1.0
    return ((x + 0.5) / span).unsqueeze(1)


def _norm_slices(prefix: str, norm: nn.Module, d: int) -> list[Slice]:
    if isinstance(norm, nn.Identity):
        return []
    if isinstance(norm, nn.LayerNorm):
        out = []
        if norm.weight is not None:
            out.append(Slice(f"{prefix}.weight", 0, slice_index(d)))
        if norm.bias is not None:
            out.append(Slice(f"{prefix}.bias", 0, slice_index(d)))
        return out
    raise ValueError(
        f"cannot place normalisation layer {prefix!r} ({type(norm).__name__}); supported: nn.LayerNorm, nn.Identity"
    )


def transformer_graph(
    model: nn.Module,
    layouts: dict | None = None,
    output_labels: list[str] | None = None,
    relocate_outputs: bool = True,
    input_labels: list[str] | None = None,
    example_inputs=None,
    verify: bool = True,
) -> SpatialGraph:
    """Spaces: ``input``/``tokens`` → ``resid`` ⇄ ``blocks.{l}.attn``, ``blocks.{l}.mlp`` → ``output``.

    Heights follow the forward pass (embedding 0, block l's attention 2l+1 and MLP 2l+2, the
    output on top); the residual stream is drawn at height 0.5 and shared by all blocks.
    Raises ``ValueError`` naming any part it cannot place. The graph is checked to keep the
    model's function (:func:`~topotorch.graph.verify.check_graph`, on ``example_inputs`` or a
    short random sequence). Any other transformer: :func:`~topotorch.graph.flow.flow_graph`.
    Usage: ``transformer_graph(gpt)``.
    """
    layouts = dict(layouts or {})
    for part in ("embed", "blocks", "head"):
        if not hasattr(model, part):
            raise ValueError(f"transformer_graph needs a model with .embed, .blocks and .head; missing .{part}")
    embed, head = model.embed, model.head
    if isinstance(embed, nn.Embedding):
        d, n_in = embed.embedding_dim, embed.num_embeddings
    elif isinstance(embed, nn.Linear):
        d, n_in = embed.out_features, embed.in_features
    else:
        raise ValueError(f"cannot place embedding layer 'embed' ({type(embed).__name__})")
    if not isinstance(head, nn.Linear) or head.in_features != d:
        raise ValueError("the output head must be an nn.Linear reading the residual stream")
    tied = head.weight is getattr(embed, "weight", None)
    blocks: Any = model.blocks  # any iterable of blocks (nn.ModuleList, nn.Sequential ...)

    def layout(name: str, n: int) -> torch.Tensor:
        return make_layout(layouts.get(name), n)

    resid = Space("resid", d, layout("resid", d), 0.5, "hidden", "weights", stream=True)
    spaces: list[Space] = []
    conns: list[Connection] = []
    if isinstance(embed, nn.Embedding):
        tokens = Space("tokens", n_in, None, 0.0, "input", "fixed")
        resid.slices.append(Slice("embed.weight", 1, slice_index(d)))
        if not tied:  # tied: the table is penalised once, as the output head
            conns.append(
                Connection(
                    "embed.weight",
                    "resid",
                    "tokens",
                    Slice("embed.weight", 1, slice_index(d)),
                    Slice("embed.weight", 0, slice_index(n_in)),
                )
            )
        spaces.append(tokens)
    else:
        spaces.append(Space("input", n_in, layout("input", n_in), 0.0, "input", "positions", labels=input_labels))
        spaces[-1].slices.append(Slice("embed.weight", 1, slice_index(n_in)))
        resid.slices.append(Slice("embed.weight", 0, slice_index(d)))
        b = "embed.bias" if embed.bias is not None else None
        if b:
            resid.slices.append(Slice(b, 0, slice_index(d)))
        conns.append(
            Connection(
                "embed.weight",
                "resid",
                "input",
                Slice("embed.weight", 0, slice_index(d)),
                Slice("embed.weight", 1, slice_index(n_in)),
                b,
            )
        )
    if isinstance(getattr(model, "pos", None), nn.Parameter):
        resid.slices.append(Slice("pos", 1, slice_index(d)))
    spaces.append(resid)

    for li, block in enumerate(blocks):
        pre = f"blocks.{li}"
        for part in ("ln1", "attn", "ln2", "mlp"):
            if not hasattr(block, part):
                raise ValueError(f"cannot place block {pre!r}: missing .{part}")
        resid.slices += _norm_slices(f"{pre}.ln1", block.ln1, d) + _norm_slices(f"{pre}.ln2", block.ln2, d)
        # attention: neuron j owns q/k/v rows j, d+j, 2d+j and output column j
        qkv_w, qkv_b, out_w, out_b, n_heads = _attention_tensors(f"{pre}.attn", block.attn)
        hd = d // n_heads
        name = f"{pre}.attn"
        attn = Space(
            name,
            d,
            layout(name, d) if name in layouts else head_line(n_heads, hd),
            2.0 * li + 1,
            "hidden",
            "weights",
            groups=torch.arange(d) // hd,
            labels=[f"h{j // hd}.{j % hd}" for j in range(d)],
        )
        three = slice_index(d, 3, d)
        attn.slices += [Slice(qkv_w, 0, three), Slice(out_w, 1, slice_index(d))]
        if qkv_b:
            attn.slices.append(Slice(qkv_b, 0, three))
        resid.slices += [Slice(qkv_w, 1, slice_index(d)), Slice(out_w, 0, slice_index(d))]
        if out_b:
            resid.slices.append(Slice(out_b, 0, slice_index(d)))
        conns.append(Connection(qkv_w, name, "resid", Slice(qkv_w, 0, three), Slice(qkv_w, 1, slice_index(d)), qkv_b))
        conns.append(
            Connection(out_w, "resid", name, Slice(out_w, 0, slice_index(d)), Slice(out_w, 1, slice_index(d)), out_b)
        )
        spaces.append(attn)
        # MLP
        mlp = block.mlp
        lins = [m for m in mlp.children() if isinstance(m, nn.Linear)] if isinstance(mlp, nn.Sequential) else []
        others = [
            m
            for m in (mlp.children() if isinstance(mlp, nn.Sequential) else [mlp])
            if not isinstance(m, nn.Linear) and len(list(m.parameters())) > 0
        ]
        if len(lins) != 2 or others:
            raise ValueError(f"cannot place MLP {pre}.mlp: expected nn.Sequential(Linear, activation, Linear)")
        i1 = next(i for i, m in enumerate(mlp) if m is lins[0])
        i2 = next(i for i, m in enumerate(mlp) if m is lins[1])
        fc1, fc2 = lins
        w1, w2 = f"{pre}.mlp.{i1}.weight", f"{pre}.mlp.{i2}.weight"
        b1 = f"{pre}.mlp.{i1}.bias" if fc1.bias is not None else None
        b2 = f"{pre}.mlp.{i2}.bias" if fc2.bias is not None else None
        m = fc1.out_features
        name = f"{pre}.mlp"
        msp = Space(name, m, layout(name, m), 2.0 * li + 2, "hidden", "weights")
        msp.slices += [Slice(w1, 0, slice_index(m)), Slice(w2, 1, slice_index(m))] + (
            [Slice(b1, 0, slice_index(m))] if b1 else []
        )
        resid.slices += [Slice(w1, 1, slice_index(d)), Slice(w2, 0, slice_index(d))] + (
            [Slice(b2, 0, slice_index(d))] if b2 else []
        )
        conns.append(Connection(w1, name, "resid", Slice(w1, 0, slice_index(m)), Slice(w1, 1, slice_index(d)), b1))
        conns.append(Connection(w2, "resid", name, Slice(w2, 0, slice_index(d)), Slice(w2, 1, slice_index(m)), b2))
        spaces.append(msp)

    resid.slices += _norm_slices("ln_f", getattr(model, "ln_f", nn.Identity()), d)
    n_out = head.out_features
    out = Space(
        "output",
        n_out,
        layout("output", n_out),
        2.0 * len(blocks) + 1,
        "output",
        "positions" if relocate_outputs else "fixed",
        labels=output_labels,
    )
    hw = "embed.weight" if tied else "head.weight"
    hb = "head.bias" if head.bias is not None else None
    if not tied:
        resid.slices.append(Slice(hw, 1, slice_index(d)))
    out.slices.append(Slice(hw, 0, slice_index(n_out)))
    if hb:
        out.slices.append(Slice(hb, 0, slice_index(n_out)))
    conns.append(Connection(hw, "output", "resid", Slice(hw, 0, slice_index(n_out)), Slice(hw, 1, slice_index(d)), hb))
    spaces.append(out)
    known = {s.name for s in spaces}
    for name in layouts:
        if name not in known:
            raise ValueError(f"layout given for unknown space {name!r}; spaces: {', '.join(sorted(known))}")
    check_all_parameters_placed(model, spaces)
    from topotorch.graph.verify import checked

    w = embed.weight
    t = min(5, getattr(model, "block_size", 5))

    def example():
        if isinstance(embed, nn.Embedding):
            return torch.randint(0, n_in, (2, t), device=w.device)
        return torch.randn(2, t, n_in, dtype=w.dtype, device=w.device)

    return checked(
        SpatialGraph(model, spaces, conns), example_inputs if example_inputs is not None else example, verify
    )


def check_all_parameters_placed(model: nn.Module, spaces: list[Space]) -> None:
    """Every parameter with a residual-sized dimension must be coupled, or a relocation would break it.

    Usage: ``check_all_parameters_placed(model, spaces)`` at the end of a hand-written graph builder.
    """
    placed = {sl.name for s in spaces for sl in s.slices}
    missing = [n for n, _ in model.named_parameters() if n not in placed]
    if missing:
        raise ValueError(f"cannot place parameter {missing[0]!r}: the graph builder does not know this layer")
