"""Models users bring to the trainer: a Hugging Face architecture by name, or their own builder function.

``topotorch train TASK --model SPEC --model-config K=V,...`` trains any model on any task; its
spatial graph comes from :func:`topotorch.graph.flow.flow_graph` (checked on the task's inputs).

* ``hf:NAME`` — a Hugging Face causal LM built from a config (random weights, no download):
  ``hf:gpt2``, ``hf:llama``, ``hf:gpt_neox``, ... (any ``model_type`` of ``transformers``).
  The vocabulary and context length come from the task; ``--model-config`` sets the rest
  (``n_layer=4,n_embd=128,n_head=4``). Its output is the logits.
* ``package.module:function`` — ``function(**model_config)`` must return an ``nn.Module`` whose
  forward takes the task's inputs and returns what the task's loss reads.

    >>> model = build_user_model("hf:gpt2", "n_layer=2,n_embd=64,n_head=4", vocab=65, block=64)
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from torch import nn


def parse_model_config(text: str | None) -> dict[str, Any]:
    """A ``key=value,...`` model config as a dict with parsed values.

    ``"n_layer=4,n_embd=128,act=gelu,tie=false"`` -> ``{"n_layer": 4, "n_embd": 128, "act": "gelu", "tie": False}``.
    """
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"model config item {item!r} is not KEY=VALUE")
        out[key] = _value(value.strip())
    return out


def _value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM whose forward takes token ids and returns the logits (batch, time, vocab)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, ids):
        return self.hf(input_ids=ids).logits


# config fields that carry the vocabulary size and the context length, by family
_CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


def hugging_face_lm(name: str, vocab: int, block: int, **overrides: Any) -> nn.Module:
    """A randomly initialised Hugging Face causal LM of family ``name`` sized for ``vocab`` and ``block``.

    Usage: ``hugging_face_lm("llama", 65, 64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4)``.
    """
    try:
        import transformers
    except ImportError as e:
        raise ValueError("--model hf:... needs the transformers package: pip install transformers") from e
    transformers.logging.set_verbosity_error()
    if name not in transformers.CONFIG_MAPPING:
        raise ValueError(f"unknown Hugging Face model type {name!r}; e.g. gpt2, llama, gpt_neox, mistral, qwen2")
    try:
        config = transformers.AutoConfig.for_model(name, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad --model-config for hf:{name}: {e}") from None
    config.vocab_size = vocab
    for key in _CONTEXT_KEYS:
        if hasattr(config, key) and (overrides.get(key) is None):
            setattr(config, key, max(block, 1))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= vocab:
            setattr(config, key, 0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ValueError(f"hf:{name} has no causal-LM head in transformers ({e})") from None
    return CausalLMLogits(model)


def build_user_model(
    spec: str, model_config: str | None = None, vocab: int | None = None, block: int | None = None
) -> nn.Module:
    """The model ``spec`` names (see the module docstring), built with ``model_config``.

    ``vocab``/``block`` (the task's vocabulary and sequence length) size ``hf:`` models.
    Usage: ``build_user_model("my_pkg.nets:build", "width=64")``.
    """
    kwargs = parse_model_config(model_config)
    if spec.startswith("hf:"):
        if vocab is None or block is None:
            raise ValueError(f"--model {spec} is a language model: use it with a token task such as text:FILE")
        return hugging_face_lm(spec[3:], vocab, block, **kwargs)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model {spec!r}: give hf:NAME or package.module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--model {spec!r}: cannot import it ({e})") from None
    try:
        model = fn(**kwargs)
    except TypeError as e:
        raise ValueError(f"--model {spec!r}: calling it with {kwargs} failed ({e})") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model
