"""Per-module resize rules for :func:`topotorch.compression.shrink.shrink`: one registry, no if-chains.

When shrink cuts entries out of tensors it describes the cut per module as a :data:`Cut`:
``{(tensor name relative to the module, dim): (old size, kept indices)}``. Every module that owns a
cut tensor, and every ancestor of one, is looked up here by its class (walking the MRO, keyed by
``"module:Qualname"`` so Hugging Face classes need no import):

* ``check(module, cut)`` runs before anything changes: ``None`` if the module stays valid, else a
  sentence saying why not (shrink then keeps those neurons and reports the sentence);
* ``apply(module, cut)`` runs after the tensors were replaced: it updates the attributes the
  module's forward reads (``out_features``, ``groups``, ``num_heads``, ``split_size``...).

A ``torch.nn`` class that owns a cut tensor and has no rule is refused (its attributes are unknown);
a user's own module that owns one directly is trusted to read sizes from its tensors.

:data:`ATTENTION` says, per attention class, where the value projection is, so shrink can tell
dead heads (no output, or a constant value folded into the output bias) from live ones.

    >>> find_rule(nn.Linear(3, 4)).apply  # sets in_features / out_features from the weight
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Cut = dict[tuple[str, int], tuple[int, torch.Tensor]]


@dataclass
class Rule:
    check: Callable[[nn.Module, Cut], str | None] | None = None
    apply: Callable[[nn.Module, Cut], None] | None = None


RULES: dict[str, Rule] = {}


def register(*names: str, check=None, apply=None) -> None:
    """Add a rule for classes named ``"module:Qualname"`` (matched through the MRO)."""
    for n in names:
        RULES[n] = Rule(check, apply)


def class_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _lookup(registry: dict, module: nn.Module):
    """The entry for the module's class or its nearest registered base class, or None."""
    for cls in type(module).__mro__:
        entry = registry.get(class_key(cls))
        if entry is not None:
            return entry
    return None


def find_rule(module: nn.Module) -> Rule | None:
    return _lookup(RULES, module)


def is_torch_class(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.")


# -- helpers ---------------------------------------------------------------------------------------
def _kept(cut: Cut, name: str, dim: int) -> tuple[int, torch.Tensor] | None:
    return cut.get((name, dim))


def _blocks(old: int, kept: torch.Tensor, width: int) -> tuple[torch.Tensor, bool]:
    """Kept count per block of ``width`` consecutive indices, and whether every block is whole or gone."""
    counts = torch.bincount(kept // width, minlength=old // width)
    return counts, bool(((counts == 0) | (counts == width)).all())


def _whole_heads(cut: Cut, name: str, dim: int, head_dim: int, parts: int = 1) -> tuple[int, str | None]:
    """Heads kept along a (possibly fused q/k/v) dimension, or a reason when heads are cut partly
    (or the parts lose different heads)."""
    got = _kept(cut, name, dim)
    if got is None:
        return -1, None
    old, kept = got
    counts, whole = _blocks(old, kept, head_dim)
    if not whole:
        return -1, f"{name} would lose part of a head (heads keep equal width {head_dim})"
    per_part = counts.view(parts, -1)
    if parts > 1 and not bool((per_part == per_part[0]).all()):
        return -1, f"{name}: the q, k and v parts would lose different heads"
    return int((per_part[0] > 0).sum()), None


# -- leaf modules ----------------------------------------------------------------------------------
def _linear_apply(m, cut):
    m.out_features, m.in_features = m.weight.shape


def _conv1d_apply(m, cut):  # Hugging Face Conv1D: weight (in, out)
    m.nx, m.nf = m.weight.shape


def _conv_check(m, cut):
    if m.groups == 1:
        return None
    if m.transposed:
        return f"{type(m).__name__} with groups={m.groups}: no resize rule for grouped transposed convolutions"
    got = _kept(cut, "weight", 0)
    if got is None:
        return None
    old, kept = got
    counts = torch.bincount(kept // (old // m.groups), minlength=m.groups)
    live = counts[counts > 0]
    if live.numel() and not bool((live == live[0]).all()):
        return (
            f"{type(m).__name__} with groups={m.groups} would keep unequal channel counts per group ({counts.tolist()})"
        )
    return None


def _conv_apply(m, cut):
    got = _kept(cut, "weight", 0)
    if got is not None and m.groups > 1 and not m.transposed:
        old, kept = got
        counts = torch.bincount(kept // (old // m.groups), minlength=m.groups)
        m.groups = int((counts > 0).sum())
    w = m.weight
    if m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


def _batchnorm_apply(m, cut):
    t = m.weight if m.weight is not None else m.running_mean
    if t is not None:
        m.num_features = t.shape[0]


def _groupnorm_check(m, cut):
    got = _kept(cut, "weight", 0) or _kept(cut, "bias", 0)
    if got is None:
        return None
    old, kept = got
    _, whole = _blocks(old, kept, old // m.num_groups)
    return (
        None
        if whole
        else f"GroupNorm({m.num_groups}, {m.num_channels}) would lose part of a group (its statistics change)"
    )


def _groupnorm_apply(m, cut):
    got = _kept(cut, "weight", 0) or _kept(cut, "bias", 0)
    if got is not None:
        old, kept = got
        counts, _ = _blocks(old, kept, old // m.num_groups)
        m.num_groups = int((counts > 0).sum())
    t = m.weight if m.weight is not None else m.bias
    if t is not None:
        m.num_channels = t.shape[0]


def _shape_apply(m, cut):  # LayerNorm, RMSNorm
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _embedding_check(m, cut):
    if _kept(cut, "weight", 0) is not None and m.padding_idx is not None:
        return f"{type(m).__name__} with padding_idx: its rows cannot be cut"
    return None


def _embedding_apply(m, cut):
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _refuse(reason: str):
    return lambda m, cut: reason


register("torch.nn.modules.linear:Linear", apply=_linear_apply)
register("torch.nn.modules.conv:_ConvNd", check=_conv_check, apply=_conv_apply)
register("torch.nn.modules.batchnorm:_NormBase", apply=_batchnorm_apply)
register("torch.nn.modules.normalization:GroupNorm", check=_groupnorm_check, apply=_groupnorm_apply)
register("torch.nn.modules.normalization:LayerNorm", "torch.nn.modules.normalization:RMSNorm", apply=_shape_apply)
register(
    "torch.nn.modules.sparse:Embedding",
    "torch.nn.modules.sparse:EmbeddingBag",
    check=_embedding_check,
    apply=_embedding_apply,
)
register(
    "torch.nn.modules.rnn:RNNBase",
    "torch.nn.modules.rnn:RNNCellBase",
    check=_refuse("recurrent layer: its gates' sizes are baked into its weights (no resize rule)"),
)
register(
    "torch.nn.modules.activation:MultiheadAttention",
    check=_refuse(
        "nn.MultiheadAttention ties its inner width to its input width "
        "(head_dim = embed_dim // num_heads), so its heads cannot be removed"
    ),
)
register("transformers.pytorch_utils:Conv1D", apply=_conv1d_apply)


# -- Hugging Face attention ------------------------------------------------------------------------
def _gpt2_check(m, cut):
    if getattr(m, "is_cross_attention", False):
        return "GPT2Attention used as cross-attention: no resize rule"
    n, why = _whole_heads(cut, "c_attn.weight", 1, m.head_dim, parts=3)
    if why:
        return why
    n2, why = _whole_heads(cut, "c_proj.weight", 0, m.head_dim)
    if why:
        return why
    if n >= 0 and n2 >= 0 and n != n2:
        return "GPT2Attention: c_attn and c_proj would keep different heads"
    return None


def _gpt2_apply(m, cut):
    got = _kept(cut, "c_attn.weight", 1)
    if got is not None:
        m.num_heads = len(got[1]) // 3 // m.head_dim
        m.split_size = m.num_heads * m.head_dim


def _bert_check(m, cut):
    ns = set()
    for p in ("query", "key", "value"):
        n, why = _whole_heads(cut, f"{p}.weight", 0, m.attention_head_size)
        if why:
            return why
        ns.add(n)
    ns.discard(-1)
    return None if len(ns) <= 1 else f"{type(m).__name__}: query, key and value would keep different heads"


def _bert_apply(m, cut):
    got = _kept(cut, "query.weight", 0)
    if got is not None:
        m.num_attention_heads = len(got[1]) // m.attention_head_size
        m.all_head_size = m.num_attention_heads * m.attention_head_size


def _llama_check(m, cut):
    hd = m.head_dim
    nq, why = _whole_heads(cut, "q_proj.weight", 0, hd)
    if why:
        return why
    no, why = _whole_heads(cut, "o_proj.weight", 1, hd)
    if why:
        return why
    nk, why = _whole_heads(cut, "k_proj.weight", 0, hd)
    if why:
        return why
    nv, why = _whole_heads(cut, "v_proj.weight", 0, hd)
    if why:
        return why
    if nq >= 0 and no >= 0 and nq != no:
        return f"{type(m).__name__}: q_proj and o_proj would keep different heads"
    if nk != nv or (nq >= 0 and nk >= 0 and nq != nk * m.num_key_value_groups):
        return (
            f"{type(m).__name__}: query heads must go with their key/value head "
            f"({m.num_key_value_groups} per key/value head)"
        )
    return None


def _llama_apply(m, cut):
    for attr, name in (("num_heads", "q_proj.weight"), ("num_key_value_heads", "k_proj.weight")):
        got = _kept(cut, name, 0)
        if got is not None and isinstance(getattr(m, attr, None), int):
            setattr(m, attr, len(got[1]) // m.head_dim)


register("transformers.models.gpt2.modeling_gpt2:GPT2Attention", check=_gpt2_check, apply=_gpt2_apply)
register(
    "transformers.models.bert.modeling_bert:BertSelfAttention",
    "transformers.models.roberta.modeling_roberta:RobertaSelfAttention",
    check=_bert_check,
    apply=_bert_apply,
)
register(
    "transformers.models.llama.modeling_llama:LlamaAttention",
    "transformers.models.mistral.modeling_mistral:MistralAttention",
    "transformers.models.qwen2.modeling_qwen2:Qwen2Attention",
    check=_llama_check,
    apply=_llama_apply,
)


@dataclass
class AttentionSpec:
    """Where an attention module's value projection is (relative names); ``fused``: the value is the
    last third of a fused q/k/v tensor."""

    value_weight: str
    value_bias: str | None
    fused: bool = False


ATTENTION: dict[str, AttentionSpec] = {
    "transformers.models.gpt2.modeling_gpt2:GPT2Attention": AttentionSpec("c_attn.weight", "c_attn.bias", True),
    "transformers.models.bert.modeling_bert:BertSelfAttention": AttentionSpec("value.weight", "value.bias"),
    "transformers.models.roberta.modeling_roberta:RobertaSelfAttention": AttentionSpec("value.weight", "value.bias"),
    "transformers.models.llama.modeling_llama:LlamaAttention": AttentionSpec("v_proj.weight", "v_proj.bias"),
    "transformers.models.mistral.modeling_mistral:MistralAttention": AttentionSpec("v_proj.weight", "v_proj.bias"),
    "transformers.models.qwen2.modeling_qwen2:Qwen2Attention": AttentionSpec("v_proj.weight", "v_proj.bias"),
    "torch.nn.modules.activation:MultiheadAttention": AttentionSpec("in_proj_weight", "in_proj_bias", True),
}


def attention_spec(module: nn.Module) -> AttentionSpec | None:
    return _lookup(ATTENTION, module)


# -- applying a cut to a model ---------------------------------------------------------------------
def _by_module(model: nn.Module, cuts: Cut) -> dict[str, Cut]:
    """For each module that owns a cut tensor or is an ancestor of one: its part of the cut (relative names)."""
    out: dict[str, Cut] = {}
    for (name, dim), v in cuts.items():
        parts = name.split(".")
        for i in range(len(parts)):
            prefix = ".".join(parts[:i])
            rel = ".".join(parts[i:])
            out.setdefault(prefix, {})[(rel, dim)] = v
    return out


def check_cut(model: nn.Module, cuts: Cut) -> str | None:
    """None if every module touched by ``cuts`` (full tensor names) can be resized, else the reason."""
    for prefix, sub in _by_module(model, cuts).items():
        m = model.get_submodule(prefix) if prefix else model
        rule = find_rule(m)
        owns = any("." not in rel for rel, _ in sub)
        where = prefix or type(model).__name__
        if rule is None:
            if owns and is_torch_class(m):
                return f"{where}: no resize rule for {class_key(type(m))}"
            continue
        if rule.check is not None:
            why = rule.check(m, sub)
            if why:
                return f"{where}: {why}"
    return None


def apply_cut(model: nn.Module, cuts: Cut) -> None:
    """Update the attributes of every module touched by ``cuts`` (after the tensors were replaced)."""
    for prefix, sub in _by_module(model, cuts).items():
        m = model.get_submodule(prefix) if prefix else model
        rule = find_rule(m)
        if rule is not None and rule.apply is not None:
            rule.apply(m, sub)
