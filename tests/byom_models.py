"""Models people bring (Hugging Face, torch.nn, hand-written), tiny and random, for the coupling-graph tests.

Each entry builds (model in float64, example input). Hugging Face models are built from configs
(no downloads) and skipped when `transformers` is not installed.
"""

from __future__ import annotations

import torch
from torch import nn


def _hf():
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def gpt2():
    tf = _hf()
    cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg), torch.randint(0, 50, (2, 7))


def bert():
    tf = _hf()
    cfg = tf.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
        num_labels=3,
    )
    return tf.BertForSequenceClassification(cfg), torch.randint(0, 50, (2, 7))


def bert_base():
    tf = _hf()
    cfg = tf.BertConfig(
        num_hidden_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
    )
    return tf.BertModel(cfg), torch.randint(0, 50, (2, 7))


def llama():
    tf = _hf()
    cfg = tf.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=50,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return tf.LlamaForCausalLM(cfg), torch.randint(0, 50, (2, 7))


def hf_resnet():
    tf = _hf()
    cfg = tf.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=4
    )
    return tf.ResNetForImageClassification(cfg), torch.randn(2, 3, 16, 16)


class Head(nn.Module):
    """A readout so the encoder's stream is hidden (not the model's output)."""

    def __init__(self, body: nn.Module, d: int, n_out: int):
        super().__init__()
        self.body, self.out = body, nn.Linear(d, n_out)

    def forward(self, x):
        return self.out(self.body(x))


def transformer_encoder():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    return Head(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), 32, 5), torch.randn(2, 7, 32)


class TiedResidualMLP(nn.Module):
    """Token embedding, residual MLP blocks with LayerNorm and a layer scale, output tied to the embedding."""

    def __init__(self, vocab: int = 20, d: int = 16, hidden: int = 24, n_blocks: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
            for _ in range(n_blocks)
        )
        self.scale = nn.Parameter(torch.ones(n_blocks, d) * 0.5)
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids):
        h = self.embed(ids)
        for i, b in enumerate(self.blocks):
            h = h + self.scale[i] * b(h)
        return self.ln_f(h) @ self.embed.weight.T


class DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.gn = nn.GroupNorm(3, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.pw(self.dw(h)))
        h = torch.relu(self.gn(self.grouped(h)))
        return self.head(h.mean((2, 3)))


class Concatenating(nn.Module):
    """Two conv branches concatenated along channels, then a 1x1 conv and a flattening head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 1)
        self.join = nn.Conv2d(10, 5, 1)
        self.head = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], 1)
        return self.head(torch.relu(self.join(h)).flatten(1))


def tied_mlp():
    return TiedResidualMLP(), torch.randint(0, 20, (3, 5))


def depthwise():
    return DepthwiseSeparable(), torch.randn(2, 3, 6, 6)


def concatenating():
    return Concatenating(), torch.randn(2, 2, 4, 4)


HF = {"gpt2": gpt2, "bert": bert, "llama": llama, "hf-resnet": hf_resnet}
TORCH = {
    "transformer-encoder": transformer_encoder,
    "tied-mlp": tied_mlp,
    "depthwise": depthwise,
    "concatenating": concatenating,
}


def build(name: str, dtype=torch.float64):
    """(model, example input), seeded, in ``dtype``."""
    torch.manual_seed(0)
    model, x = {**HF, **TORCH}[name]()
    model = model.to(dtype).eval()
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        x = x.to(dtype)
    return model, x


_GRAPHS: dict = {}


def cached_graph(name: str):
    """(a fresh copy of the model, its example input, a graph over that copy): the flow graph is built
    and checked once per test session, the model and graph are copied for every caller."""
    import copy

    from topotorch.graph.core import SpatialGraph
    from topotorch.graph.flow import flow_graph

    if name not in _GRAPHS:
        model, x = build(name)
        _GRAPHS[name] = (model, x, flow_graph(model, x))
    model, x, g = _GRAPHS[name]
    model = copy.deepcopy(model)
    return model, x, SpatialGraph(model, copy.deepcopy(g.spaces), copy.deepcopy(g.connections))
