"""fffify on the MLP blocks of models people use: HF GPT-2 (Conv1D), BERT (intermediate/output),
nn.TransformerEncoder(Decoder)Layer; gated MLPs (Llama) refused by name; a block whose forward is not
what its rule reads is refused, never silently changed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from topotorch.layers import FFF, fff_layers, fffify, hardening_loss, mlp_blocks

transformers = pytest.importorskip("transformers")


def gpt2(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return transformers.GPT2LMHeadModel(cfg).double()


def bert(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return transformers.BertModel(cfg).double()


def llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(cfg).double()


def out(y) -> torch.Tensor:
    return y if torch.is_tensor(y) else y[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


TOKENS = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))

CASES = {  # model, include, expected block names, where each FFF lands, hidden width
    "gpt2": (
        gpt2,
        "transformer.h.*.mlp",
        ["transformer.h.0.mlp", "transformer.h.1.mlp"],
        ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"],
        128,
    ),
    "bert": (
        bert,
        "encoder.layer.*",
        ["encoder.layer.0", "encoder.layer.1"],
        ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"],
        64,
    ),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_hf_mlp_blocks_become_fff_and_train(kind):
    build, include, names, where, hidden = CASES[kind]
    model = build()
    assert mlp_blocks(model) == names
    assert fffify(model, include, leaf_width=8) == names
    layers = fff_layers(model)
    assert [n for n, _ in layers] == where
    assert all(layer.training_width == hidden and layer.depth == hidden.bit_length() - 4 for _, layer in layers)
    assert not any(
        isinstance(getattr(m, "weight", None), torch.Tensor) and hidden in m.weight.shape
        for m in model.modules()
        if not isinstance(m, FFF)
    )  # both dense layers are gone
    model.train()
    y = out(model(TOKENS))
    (y.square().mean() + hardening_loss(model, 0.1)).backward()
    for _, layer in layers:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    with torch.no_grad():
        assert out(model.eval()(TOKENS)).shape == y.shape  # the hard path


@pytest.mark.parametrize("kind", list(CASES))
def test_hf_dense_init_keeps_the_function(kind):
    """init='dense': depth 0 (one leaf = the whole MLP) is the dense block in both modes; deeper trees
    equal it in the soft (training) forward."""
    build, include, _names, _, hidden = CASES[kind]
    model = build(dropout=0.0).eval()
    with torch.no_grad():
        ref = out(model(TOKENS))
    exact = copy.deepcopy(model)
    fffify(exact, include, leaf_width=hidden, depth=0, init="dense")
    soft = copy.deepcopy(model)
    fffify(soft, include, leaf_width=8, init="dense")
    with torch.no_grad():
        assert rel(out(exact(TOKENS)), ref) <= 1e-10
        assert rel(out(exact.train()(TOKENS)), ref) <= 1e-10
        assert rel(out(soft.train()(TOKENS)), ref) <= 1e-10
        assert rel(out(soft.eval()(TOKENS)), ref) > 1e-6  # the hard path of a deeper tree is not the dense block


def test_bert_output_keeps_its_norm_and_residual():
    model = bert()
    fffify(model, "encoder.layer.*")
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, FFF) and isinstance(layer.intermediate.intermediate_act_fn, nn.Identity)
    assert isinstance(layer.output.dense, nn.Identity) and isinstance(layer.output.LayerNorm, nn.LayerNorm)
    assert isinstance(
        layer.intermediate.dense.activation, type(bert().encoder.layer[0].intermediate.intermediate_act_fn)
    )


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_torch_transformer_encoder_layers():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True), 2).double().eval()
    assert enc.use_nested_tensor  # torch's fused inference path is on: it reads layers[0].linear1.weight
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=pad)
    conv = copy.deepcopy(enc)
    assert fffify(conv, depth=0, leaf_width=32, init="dense") == ["layers.0", "layers.1"]
    lay = conv.layers[0]
    assert (
        isinstance(lay.linear1, FFF)
        and isinstance(lay.linear2, nn.Identity)
        and isinstance(lay.activation, nn.Identity)
    )
    assert isinstance(lay.dropout, nn.Identity) and lay.linear1.leaf_dropout.p == 0.1  # hidden dropout moved inside
    assert (
        isinstance(lay.linear1.activation, nn.ReLU) and not conv.use_nested_tensor and lay.activation_relu_or_gelu == 0
    )
    with torch.no_grad():
        y = conv(x, src_key_padding_mask=pad)
    assert rel(y[~pad], ref[~pad]) <= 1e-10  # padded positions: the fused path leaves them 0
    assert rel(conv(x), enc(x)) <= 1e-10
    conv.train()
    conv(x).square().mean().backward()
    assert lay.linear1.w1s.grad.abs().sum() > 0
    # a bare layer (the model itself is the block) and a decoder layer (forward reads a memory)
    single = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, activation="gelu")
    assert fffify(single, leaf_width=8) == [""] and isinstance(single.linear1.activation, nn.GELU)
    assert single(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    dec = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True)
    assert fffify(dec, leaf_width=8) == [""] and dec(torch.randn(2, 5, 16), torch.randn(2, 3, 16)).shape == (2, 5, 16)


def test_gated_mlp_is_refused_by_name_and_nothing_changes():
    model = llama()
    before = [type(m) for m in model.modules()]
    assert mlp_blocks(model) == []
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp \(LlamaMLP\) is a gated MLP .*gate_proj.*"
        r"no multiplicative gate",
    ):
        fffify(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp \(LlamaMLP\) is a gated MLP"):
        fffify(model, "model.layers.1.*")
    assert [type(m) for m in model.modules()] == before  # refused before anything was replaced


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.gated = nn.Module()
        self.gated.gate_proj, self.gated.up_proj, self.gated.down_proj = (
            nn.Linear(8, 16),
            nn.Linear(8, 16),
            nn.Linear(16, 8),
        )

    def forward(self, x):
        g = self.gated
        return g.down_proj(nn.functional.silu(g.gate_proj(x)) * g.up_proj(x)) + self.plain(x)


def test_a_gated_block_blocks_a_wide_pattern_not_a_narrow_one():
    m = Mixed()
    with pytest.raises(ValueError, match=r"gated .*gated MLP"):
        fffify(m, leaf_width=4)
    assert isinstance(m.plain, nn.Sequential)
    assert fffify(m, "plain", leaf_width=4) == ["plain"] and m(torch.randn(3, 8)).shape == (3, 8)


class Doubling(nn.Module):
    """Looks like a GPT-2 MLP (c_fc / act / c_proj) but shifts the hidden layer: not fc2(act(fc1(x)))."""

    def __init__(self):
        super().__init__()
        Conv1D = transformers.pytorch_utils.Conv1D
        self.c_fc, self.act, self.c_proj = Conv1D(16, 8), nn.GELU(), Conv1D(8, 16)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)) + 1)


def test_a_block_whose_forward_differs_from_its_rule_is_refused():
    net = nn.Sequential(Doubling())
    with pytest.raises(
        ValueError,
        match=r"^0 \(Doubling\) looks like a hf-gpt2 MLP block, but its forward is not "
        r"c_proj\(act\(c_fc\(x\)\)\)",
    ):
        fffify(net)
    assert type(net[0].c_fc).__name__ == "Conv1D"
    assert fffify(net, check=False, leaf_width=4) == ["0"]  # the user's call, stated


def test_dense_init_and_errors():
    with pytest.raises(
        ValueError,
        match=r"transformer.h.0.mlp: init='dense' needs the training width 2\^depth·leaf_width = 64 to equal "
        "the block's hidden width 128",
    ):
        fffify(gpt2(), leaf_width=8, training_width=64, init="dense")
    with pytest.raises(ValueError, match="init must be"):
        fffify(gpt2(), init="copy")


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
FAMILIES = {  # models built from the same pieces: the rule registry and the reading check cover them
    "roberta": (
        lambda: transformers.RobertaModel(
            transformers.RobertaConfig(**SMALL, vocab_size=50, max_position_embeddings=20)
        ),
        ["encoder.layer.0", "encoder.layer.1"],
    ),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(**SMALL, image_size=8, patch_size=4)), None),
    "clip-text": (
        lambda: transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**SMALL, vocab_size=50, max_position_embeddings=16)
        ),
        ["encoder.layers.0.mlp", "encoder.layers.1.mlp"],
    ),
    "opt": (
        lambda: transformers.OPTModel(
            transformers.OPTConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                ffn_dim=64,
                vocab_size=50,
                max_position_embeddings=16,
                word_embed_proj_dim=32,
            )
        ),
        ["decoder.layers.0", "decoder.layers.1"],
    ),
    "distilbert": (
        lambda: transformers.DistilBertModel(
            transformers.DistilBertConfig(
                dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=50, max_position_embeddings=16
            )
        ),
        ["transformer.layer.0.ffn", "transformer.layer.1.ffn"],
    ),
    "gpt-neox": (
        lambda: transformers.GPTNeoXModel(
            transformers.GPTNeoXConfig(**SMALL, vocab_size=50, max_position_embeddings=16)
        ),
        ["layers.0.mlp", "layers.1.mlp"],
    ),
}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_more_hf_families_convert_exactly_at_depth_0(kind):
    build, names = FAMILIES[kind]
    torch.manual_seed(0)
    model = build().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64) if kind == "vit" else TOKENS
    with torch.no_grad():
        ref = out(model(x))
    found = fffify(model, depth=0, leaf_width=64, init="dense")
    assert len(found) == 2 and (names is None or found == names) and len(fff_layers(model)) == 2
    with torch.no_grad():
        assert rel(out(model(x)), ref) <= 1e-10
    model.train()
    out(model(x)).square().mean().backward()
    assert all(layer.w1s.grad is not None for _, layer in fff_layers(model))
