"""Dead neurons, channels and heads removed through the coupling graph: smaller, and exactly the same function."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from torch import nn

from topotorch.compression.shrink import dead_neurons, load_shrunk, save_shrunk, shrink, threshold_model
from topotorch.graph import SpatialGraph
from topotorch.graph.conv import conv_graph
from topotorch.graph.traced import coupling_graph
from topotorch.graph.transformer import transformer_graph
from topotorch.models import MLP, SmallResNet, TinyGPT, TokenMLP


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def kill(graph: SpatialGraph, seed: int = 0, p_out: float = 0.35, p_in: float = 0.25) -> None:
    """Hand-made sparsity through the graph: zero all outgoing weights of some hidden neurons, all incoming
    weights of others (their bias stays, so their output is a nonzero constant)."""
    g = torch.Generator().manual_seed(seed)
    for sp in graph.spaces:
        if sp.role != "hidden" or sp.size < 2:
            continue
        r = torch.rand(sp.size, generator=g)
        for conns, side, mask in (
            (graph.outgoing(sp.name), "source", r < p_out),
            (graph.incoming(sp.name), "target", (r >= p_out) & (r < p_out + p_in)),
        ):
            for c in conns:
                sl = c.source_slice if side == "source" else c.target_slice
                w = graph.tensor(c.weight)
                w.index_fill_(sl.dim, sl.index[mask].reshape(-1).to(w.device), 0.0)


def noisy(model: nn.Module, scale: float = 0.02, seed: int = 1) -> None:
    """Small weights everywhere that the threshold must remove."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.where(p == 0, (torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5) * scale, 0))


def check(model, graph, x, threshold, tol):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = shrink(model, graph, threshold)
    ref = threshold_model(model, graph, threshold).eval()
    with torch.no_grad():
        diff = (res.model(x) - ref(x)).abs().max().item()
    assert diff <= tol, diff
    assert sum(res.removed.values()) > 0
    assert n_params(res.model) < n_params(model)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    return res, diff


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_mlp_chain(dtype, tol):
    torch.manual_seed(0)
    net = MLP([16, 48, 48, 5], activation="silu").to(dtype)
    g = SpatialGraph.from_chain(net)
    kill(g)
    noisy(net)
    res, _ = check(net, g, torch.randn(256, 16, dtype=dtype), 0.011, tol)
    # both kinds of dead neurons went: out-dead dropped, in-dead folded (SiLU(bias) != 0)
    assert res.removed["hidden1"] >= 20 and res.removed["hidden2"] >= 20
    assert res.removed["input"] == 0 and res.removed["output"] == 0
    assert res.model.widths == [16, 48 - res.removed["hidden1"], 48 - res.removed["hidden2"], 5]
    mask = dead_neurons(g, 0.011)
    assert int(mask["hidden1"].sum()) == res.removed["hidden1"]
    assert torch.equal((~mask["hidden2"]).nonzero().view(-1), res.kept["hidden2"])


def test_fold_is_needed():
    """Dropping in-dead neurons without folding their constant would change the output: the test can fail."""
    torch.manual_seed(0)
    net = MLP([6, 10, 3], activation="silu").double()
    with torch.no_grad():
        net[0].weight[:4] = 0.0
        net[0].bias[:4] = 1.0
    g = SpatialGraph.from_chain(net)
    res = shrink(net, g, 0.0)
    assert res.removed["hidden1"] == 4
    x = torch.randn(32, 6, dtype=torch.float64)
    assert torch.allclose(res.model(x), net(x), atol=1e-12)
    naive = MLP([6, 6, 3], activation="silu").double()
    with torch.no_grad():
        naive[0].weight.copy_(net[0].weight[4:])
        naive[0].bias.copy_(net[0].bias[4:])
        naive[2].weight.copy_(net[2].weight[:, 4:])
        naive[2].bias.copy_(net[2].bias)
    assert (naive(x) - net(x)).abs().max() > 1e-3


def test_token_mlp_folded_embedding():
    torch.manual_seed(0)
    net = TokenMLP(vocab=11, embed_dim=12, n_tokens=2, widths=[24, 11]).double()
    g = SpatialGraph.from_chain(net)
    kill(g, seed=3)
    x = torch.randint(0, 11, (64, 2))
    res, _ = check(net, g, x, 0.0, 1e-10)
    assert res.removed["embed"] > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_small_resnet(dtype, tol):
    torch.manual_seed(0)
    net = SmallResNet(channels=12, hidden=12, n_blocks=2, image_size=8).to(dtype)
    with torch.no_grad():  # trained-looking BatchNorm statistics
        for b in net.blocks:
            b.bn.running_mean.uniform_(-0.5, 0.5)
            b.bn.running_var.uniform_(0.5, 2.0)
            b.bn.weight.uniform_(0.5, 1.5)
            b.bn.bias.uniform_(-1, 0.2)
    net.eval()
    g = conv_graph(net)
    kill(g, seed=1)
    noisy(net, 0.01)
    res, _ = check(net, g, torch.randn(64, 1, 8, 8, dtype=dtype), 0.006, tol)
    assert res.removed["blocks.0.hidden"] > 0 and res.removed["resid"] > 0
    assert res.model.blocks[0].bn.num_features == 12 - res.removed["blocks.0.hidden"]
    assert res.model.stem.out_channels == 12 - res.removed["resid"]


def _gpt(layernorm: bool, dtype) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab=13, d_model=16, n_layers=2, n_heads=4, d_mlp=32, block_size=12, layernorm=layernorm).to(dtype)


@pytest.mark.parametrize("layernorm", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_tiny_gpt(layernorm, dtype, tol):
    gpt = _gpt(layernorm, dtype)
    g = transformer_graph(gpt)
    kill(g, seed=2)
    with torch.no_grad():
        a = gpt.blocks[0].attn
        d = 16
        a.qkv.weight[2 * d + 4 : 2 * d + 8] = 0.0  # head 1: v rows zero -> whole head goes, its v bias folded
        dead_cols = (a.qkv.weight == 0).all(0)  # residual dims that kill() cut off from every reader
        for r in (12, d + 12, 2 * d + 12):  # head 3 (dims 12-15): undo the random kill
            a.qkv.weight[r : r + 4] = 0.3 * torch.randn(4, d, dtype=dtype)
        a.proj.weight[:, 12:16] = 0.3 * torch.randn(d, 4, dtype=dtype)
        a.qkv.weight[12:14] = 0.0  # dims 12, 13: q rows zero (bias stays) -> the score term stays
        a.qkv.weight[d + 14] = 0.0  # dim 14: k row zero -> k constant over keys, score term removable
        a.proj.weight[:, 12:15] = 0.0  # dims 12-14 have no output: 14 goes, 12, 13 stay; 15 is alive
        a.qkv.weight[:, dead_cols] = 0.0
    x = torch.randint(0, 13, (8, 12))
    res, _ = check(gpt, g, x, 0.0, tol)
    assert res.removed["blocks.0.attn"] >= 6 and res.removed["blocks.1.mlp"] > 0
    attn = res.model.blocks[0].attn
    assert attn.scale == pytest.approx(0.5)  # 1/sqrt(original head dim 4)
    assert attn.n_heads == len(attn.head_dims) and sum(attn.head_dims) == attn.qkv.out_features // 3
    kept = set(res.kept["blocks.0.attn"].tolist())
    assert not kept & {4, 5, 6, 7, 14} and {12, 13, 15} <= kept
    if layernorm:
        assert res.removed["resid"] == 0 and "resid" in res.kept_why
    else:
        assert res.removed["resid"] > 0


def test_dead_qk_alone_keeps_the_head():
    """All q rows of a head zero (bias nonzero) gives scores from the bias, not zero output: the head stays."""
    gpt = _gpt(True, torch.float64)
    with torch.no_grad():
        gpt.blocks[0].attn.qkv.weight[0:4] = 0.0
        gpt.blocks[0].attn.qkv.weight[16:20] = 0.0
    g = transformer_graph(gpt)
    res = shrink(gpt, g, 0.0)
    assert res.removed["blocks.0.attn"] == 0
    x = torch.randint(0, 13, (4, 12))
    assert torch.allclose(res.model(x), gpt(x), atol=1e-10)


def test_coupling_graph_traced():
    torch.manual_seed(0)
    net = (
        nn.Sequential(
            nn.Conv2d(1, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 36, 32),
            nn.Tanh(),
            nn.Linear(32, 32),
            nn.ReLU(),
            nn.Linear(32, 4),
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].bias.uniform_(-0.5, 0.5)
    g = coupling_graph(net, torch.randn(1, 1, 8, 8, dtype=torch.float64))
    kill(g, seed=4, p_out=0.3, p_in=0.3)
    res, _ = check(net, g, torch.randn(32, 1, 8, 8, dtype=torch.float64), 0.0, 1e-10)
    assert res.removed["0"] > 0 and res.removed["4"] > 0 and res.removed["6"] > 0


def test_save_load_roundtrip(tmp_path):
    gpt = _gpt(False, torch.float32)
    g = transformer_graph(gpt)
    kill(g, seed=5)
    res = shrink(gpt, g, 0.0)
    save_shrunk(tmp_path / "s", res)
    meta = json.loads((tmp_path / "s" / "shrunk.json").read_text())
    assert meta["removed"] == res.removed and meta["parameters"] == n_params(res.model)
    back = load_shrunk(tmp_path / "s")
    assert back.head.weight is back.embed.weight  # tied weights stay tied
    x = torch.randint(0, 13, (4, 12))
    assert torch.equal(back(x), res.model(x))
    net = SmallResNet(channels=8, hidden=8, n_blocks=1).eval()
    kill(conv_graph(net))
    r2 = shrink(net, conv_graph(net), 0.0)
    save_shrunk(tmp_path / "c", r2)
    xi = torch.randn(3, 64)
    assert torch.equal(load_shrunk(tmp_path / "c")(xi), r2.model(xi))
    (tmp_path / "c" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checksum"):
        load_shrunk(tmp_path / "c")


def test_load_refuses_foreign_classes(tmp_path):
    net = MLP([4, 6, 2])
    res = shrink(net, SpatialGraph.from_chain(net), 0.0)
    save_shrunk(tmp_path, res)
    meta = json.loads((tmp_path / "shrunk.json").read_text())
    meta["spec"]["tree"]["class"] = "os:system"
    (tmp_path / "shrunk.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="refusing"):
        load_shrunk(tmp_path)


def test_graph_of_a_submodule_shrinks_inside_the_wrapper(tmp_path):
    """Tasks wrap their GPT (e.g. read the last token); the graph describes the inner model."""

    class LastToken(nn.Module):
        def __init__(self, gpt):
            super().__init__()
            self.gpt = gpt

        def forward(self, x):
            return self.gpt(x)[:, -1]

    gpt = _gpt(False, torch.float32)
    g = transformer_graph(gpt)
    kill(g, seed=3)
    wrapper = LastToken(gpt)
    x = torch.randint(0, 13, (8, 12))
    res = shrink(wrapper, g, 0.0)
    assert isinstance(res.model, LastToken) and res.model.gpt is not gpt
    assert sum(res.removed.values()) > 0 and n_params(res.model) < n_params(wrapper)
    ref = threshold_model(wrapper, g, 0.0).eval()
    with torch.no_grad():
        assert (res.model(x) - ref(x)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="does not describe"):
        shrink(nn.Linear(3, 3), g, 0.0)


def test_bad_threshold_and_corrupt_description_are_named(tmp_path):
    net = MLP([4, 6, 2])
    g = SpatialGraph.from_chain(net)
    for bad in (-0.1, float("nan"), "0.1x"):
        with pytest.raises(ValueError, match="threshold must be a number >= 0"):
            shrink(net, g, bad)
    save_shrunk(tmp_path, shrink(net, g, 0.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "shrunk.json"]  # no temporary left
    (tmp_path / "shrunk.json").write_text("{half a file")
    with pytest.raises(ValueError, match=r"shrunk\.json is corrupt"):
        load_shrunk(tmp_path)
    (tmp_path / "shrunk.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"shrunk\.json is corrupt"):
        load_shrunk(tmp_path)


# --- models from Hugging Face transformers and torch.nn's transformer: saved and reloaded without pickle ---


def _tiny_hf(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        m = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
        )
    elif kind == "bert":
        m = transformers.BertModel(
            transformers.BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                vocab_size=50,
                max_position_embeddings=16,
            )
        )
    else:
        m = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                vocab_size=50,
                max_position_embeddings=16,
            )
        )
    return m.double().eval()


def _out(y):
    return y if torch.is_tensor(y) else y[0]


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_hf_models_save_and_reload_without_pickle(tmp_path, kind):
    from topotorch.compression.shrink import ShrinkResult, model_spec

    model = _tiny_hf(kind)
    save_shrunk(tmp_path, ShrinkResult(model, {}, {}, model_spec(model)))
    text = (tmp_path / "shrunk.json").read_text()
    assert "pickle" not in text and type(model.config).__name__ in text  # the config is JSON + its class name
    back = load_shrunk(tmp_path)
    assert type(back) is type(model) and back.config.to_dict() == model.config.to_dict()
    inner = back.transformer if kind == "gpt2" else back.encoder if kind == "bert" else back.model
    assert inner.config is back.config  # one shared config object, as built
    x = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        assert (_out(back(x)) - _out(model(x))).abs().max().item() <= 1e-10


def test_shrunk_bert_saves_and_reloads_equal(tmp_path):
    bert = _tiny_hf("bert")
    x = torch.randint(0, 50, (3, 9))
    with torch.no_grad():  # some intermediate neurons dead (zero outgoing weights)
        for layer in bert.encoder.layer:
            layer.output.dense.weight[:, ::3] = 0
    res = shrink(bert, coupling_graph(bert, x), 0.0)
    assert sum(res.removed.values()) > 0 and n_params(res.model) < n_params(bert)
    save_shrunk(tmp_path, res)
    back = load_shrunk(tmp_path)
    with torch.no_grad():
        ref = _out(bert(x))
        assert (_out(res.model(x)) - ref).abs().max().item() <= 1e-10
        assert (_out(back(x)) - _out(res.model(x))).abs().max().item() <= 1e-12


def test_transformer_encoder_with_function_activation_roundtrips(tmp_path):
    from topotorch.compression.shrink import ShrinkResult, model_spec

    torch.manual_seed(0)
    enc = (
        nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False)
        .double()
        .eval()
    )  # activation = F.relu, a function
    save_shrunk(tmp_path, ShrinkResult(enc, {}, {}, model_spec(enc)))
    back = load_shrunk(tmp_path)
    assert back.layers[0].activation is nn.functional.relu
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert (back(x) - enc(x)).abs().max().item() <= 1e-10


def _with_class(tmp_path, qual: str, where: str = "tree") -> None:
    net = MLP([4, 6, 2])
    save_shrunk(tmp_path, shrink(net, SpatialGraph.from_chain(net), 0.0))
    meta = json.loads((tmp_path / "shrunk.json").read_text())
    meta["spec"]["tree"]["class"] = qual
    (tmp_path / "shrunk.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "qual",
    [
        "torch.nn:modules.module.torch.fx.GraphModule",  # module part allowed, the class outside it
        "torch.nn.modules.module:torch.fx.GraphModule",  # walks through an imported module
        "topotorch.__main__:X",  # importing it would run the command line
        "topotorch.__main__:main",
        "topotorch.cli:main",  # a function, not a class
        "torch.nn.modules.linear:Tensor",  # imported into an allowed module, defined elsewhere
        "topotorch.compression.shrink:ShrinkResult",  # not an nn.Module
        "topotorchx.models:MLP",  # a lookalike package
        "topotorch.layers.nothere:FFF",
        "builtins:object",
        "os:system",
    ],
)
def test_load_refuses_classes_outside_the_allow_list(tmp_path, qual):
    _with_class(tmp_path, qual)
    with pytest.raises(ValueError, match=f"refusing to load class '{re.escape(qual)}'"):
        load_shrunk(tmp_path)
    assert "topotorch.__main__" not in sys.modules


def test_allow_adds_exact_classes_or_packages(tmp_path):
    _with_class(tmp_path, "topotorch.models:MLP")  # the saved class itself: allowed by default
    assert isinstance(load_shrunk(tmp_path), MLP)
    _with_class(tmp_path, f"{__name__}:_Mine")
    with pytest.raises(ValueError, match="not an allowed source"):
        load_shrunk(tmp_path)
    assert isinstance(load_shrunk(tmp_path, allow=(f"{__name__}:_Mine",)), _Mine)
    assert isinstance(load_shrunk(tmp_path, allow=(__name__ + ".",)), _Mine)


def test_load_refuses_hostile_functions_and_configs(tmp_path):
    from topotorch.compression.shrink import ShrinkResult, model_spec

    enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    save_shrunk(tmp_path, ShrinkResult(enc, {}, {}, model_spec(enc)))
    meta = json.loads((tmp_path / "shrunk.json").read_text())
    assert meta["spec"]["tree"]["attrs"]["activation"] == {"__function__": "torch.nn.functional:relu"}
    for bad in ("builtins:eval", "torch:load", "os:system", "torch.nn.functional:_add_docstr"):
        meta["spec"]["tree"]["attrs"]["activation"] = {"__function__": bad}
        (tmp_path / "shrunk.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=f"refusing to load function '{re.escape(bad)}'"):
            load_shrunk(tmp_path)
    bert = _tiny_hf("bert")
    save_shrunk(tmp_path, ShrinkResult(bert, {}, {}, model_spec(bert)))
    meta = json.loads((tmp_path / "shrunk.json").read_text())
    meta["spec"]["objects"]["config0"]["class"] = "transformers.models.bert.modeling_bert:BertModel"
    (tmp_path / "shrunk.json").write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"refusing to load config class 'transformers\.models\.bert\.modeling_bert:Bert"
    ):
        load_shrunk(tmp_path)


class _Mine(MLP):
    pass


def test_fffified_hf_model_reloads_in_a_fresh_process(tmp_path):
    """The FFF's cache (last_entropies, a tensor with a graph) is left out like pickle would; a fresh
    interpreter imports only the library modules the saved classes name (transformers' GPT-2, topotorch's FFF)."""
    import subprocess

    from topotorch.compression.shrink import ShrinkResult, model_spec
    from topotorch.layers import fffify

    model = _tiny_hf("gpt2")
    fffify(model, "transformer.h.*.mlp", leaf_width=8)
    x = torch.randint(0, 50, (2, 7))
    model.train()
    model(x).logits.sum().backward()  # leaves last_entropies on the FFF layers
    model.eval()
    save_shrunk(tmp_path, ShrinkResult(model, {}, {}, model_spec(model)))
    with torch.no_grad():
        torch.save({"x": x, "y": model(x).logits}, tmp_path / "ref.pt")
    code = (
        "import sys, torch\n"
        "from topotorch.compression.shrink import load_shrunk\n"
        "assert 'transformers' not in sys.modules and 'topotorch.layers.fff' not in sys.modules\n"
        f"m = load_shrunk({str(tmp_path)!r}); ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "with torch.no_grad(): d = (m(ref['x']).logits - ref['y']).abs().max().item()\n"
        "print(type(m.transformer.h[0].mlp.c_fc).__name__, d)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    name, diff = done.stdout.split()[-2:]
    assert name == "FFF" and float(diff) == 0.0


def test_shrunk_cli_hf_model_reloads_in_a_fresh_process(tmp_path):
    """``topotorch train --model hf:gpt2`` wraps the HF model in user_models.CausalLMLogits: its shrunk copy
    (``topotorch compress RUN``) must reload where topotorch.user_models was never imported."""
    import subprocess

    pytest.importorskip("transformers")
    from topotorch.user_models import build_user_model

    torch.manual_seed(0)
    model = build_user_model("hf:gpt2", "n_layer=1,n_embd=16,n_head=2", vocab=20, block=8).double().eval()
    x = torch.randint(0, 20, (2, 8))
    with torch.no_grad():
        model.hf.transformer.h[0].mlp.c_proj.weight[::2] = 0  # half the MLP neurons dead (Conv1D: rows = inputs)
    res = shrink(model, coupling_graph(model, x), 0.0)
    assert sum(res.removed.values()) > 0
    save_shrunk(tmp_path / "s", res)
    torch.save({"x": x, "y": res.model(x).detach()}, tmp_path / "xy.pt")
    code = (
        "import sys, torch\n"
        "from topotorch.compression.shrink import load_shrunk\n"
        "assert 'topotorch.user_models' not in sys.modules\n"
        f"m = load_shrunk({str(tmp_path / 's')!r})\n"
        f"d = torch.load({str(tmp_path / 'xy.pt')!r})\n"
        "print(type(m).__name__, float((m(d['x']) - d['y']).abs().max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, diff = out.stdout.split()
    assert name == "CausalLMLogits" and float(diff) <= 1e-12
