"""topotorch.sae input/output: activations by hook point (on the fly and cached), the spliced-in
downstream loss, SAELens / sparsify files, and the ``topotorch sae`` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.sae.tiny_run import tiny_text_run
from topotorch.models import TinyGPT
from topotorch.sae.activations import (
    CachedActivations,
    CacheError,
    HookPointError,
    ModelActivations,
    capture,
    find_hook_points,
    write_cache,
)
from topotorch.sae.splice import splice_eval

VOCAB, T = 11, 8


def tiny_gpt(layers: int = 3) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab=VOCAB, d_model=16, n_layers=layers, n_heads=2, block_size=T).double()


def token_batches(n: int = 6, b: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, T), generator=g) for _ in range(n)]


def count_calls(model: nn.Module) -> dict[str, int]:
    calls = {n: 0 for n, _ in model.named_modules() if n}
    for n, m in model.named_modules():
        if n:
            m.register_forward_hook(lambda mod, a, o, n=n: calls.__setitem__(n, calls[n] + 1))
    return calls


# -- hook points ---------------------------------------------------------------------------------


def test_hook_points_by_pattern_and_close_names():
    m = tiny_gpt()
    assert [p.name for p in find_hook_points(m, ["blocks.1", "blocks.?.mlp:input"])] == [
        "blocks.1",
        "blocks.0.mlp:input",
        "blocks.1.mlp:input",
        "blocks.2.mlp:input",
    ]
    with pytest.raises(HookPointError, match=r"'block.1.mlpp' matches no module.*close names: blocks.1.mlp"):
        find_hook_points(m, "block.1.mlpp")
    with pytest.raises(HookPointError, match="after ':'"):
        find_hook_points(m, "blocks.1:inptu")
    with pytest.raises(HookPointError, match="name exactly one"):
        ModelActivations(m, [], "blocks.*")


def test_capture_matches_the_forward_and_stops_after_the_last_hook():
    m = tiny_gpt()
    ids = token_batches(1)[0]
    calls = count_calls(m)
    got = capture(m, ids, find_hook_points(m, ["blocks.0", "blocks.1.mlp:input"]))
    calls = dict(calls)  # as the capture left them
    h = m.embed(ids) + m.pos[:T]
    h0 = m.blocks[0](h)
    assert torch.equal(got["blocks.0"], h0)
    assert torch.equal(got["blocks.1.mlp:input"], m.blocks[1].ln2(h0 + m.blocks[1].attn(m.blocks[1].ln1(h0))))
    assert calls["blocks.0"] == 1 and calls["blocks.1.attn"] == 1
    assert calls["blocks.1.mlp"] == 0 and calls["blocks.2"] == 0 and calls["head"] == 0  # never ran


def test_hooks_on_sequential_and_flattening():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Linear(3, 2))
    calls = count_calls(m)
    x = torch.randn(10, 5)
    (a,) = ModelActivations(m, [x], "1")
    assert torch.equal(a, torch.relu(m[0](x)))
    assert calls["2"] == 0 and calls["3"] == 0
    (x_in, x_out) = next(iter(ModelActivations(m, [x], "2", transcoder=True)))
    assert torch.equal(x_in, a) and torch.equal(x_out, m[2](a))
    # a conv feature map: channels are the features, every pixel a row
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))
    (rows,) = ModelActivations(conv, [torch.randn(2, 1, 5, 5)], "0", feature_dim=1)
    assert rows.shape == (2 * 5 * 5, 4)


def test_hooks_on_hugging_face_gpt2_with_bos_and_padding_dropped():
    # its time is transformers' first import (~10 s on a busy box, shared with the other HF tests); the model is tiny
    from topotorch.user_models import hugging_face_lm

    torch.manual_seed(0)
    m = hugging_face_lm("gpt2", VOCAB, T, n_layer=3, n_embd=16, n_head=2).hf.eval()
    calls = count_calls(m)
    ids = token_batches(1)[0]
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    (rows,) = ModelActivations(m, [{"input_ids": ids, "attention_mask": mask}], "transformer.h.0", skip_first=1)
    assert rows.shape == (4 * (T - 1) - 3, 16)
    calls = dict(calls)  # as the capture left them
    full = m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    keep = mask.bool()
    keep[:, 0] = False
    torch.testing.assert_close(rows, full[keep], rtol=0, atol=0)
    assert calls["transformer.h.1"] == 0 and calls["lm_head"] == 0


def test_rebatching_keeps_every_row_in_order():
    m = tiny_gpt()
    bs = token_batches(5)
    whole = torch.cat(list(ModelActivations(m, bs, "blocks.1")))
    parts = list(ModelActivations(m, bs, "blocks.1", batch_size=48))
    assert [len(p) for p in parts] == [48, 48, 48, 16]
    assert torch.equal(torch.cat(parts), whole)
    assert [len(p) for p in ModelActivations(m, bs, "blocks.1", batch_size=48, drop_last=True)] == [48, 48, 48]


# -- disk cache ----------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def dying(batches: list, after: int):
    """The batches, but the process 'dies' (an exception) after ``after`` of them."""
    for i, b in enumerate(batches):
        if i == after:
            raise Interrupted
        yield b


def test_cache_killed_midway_resumes_to_identical_content(tmp_path):
    m = tiny_gpt()
    bs = token_batches(7)
    write_cache(ModelActivations(m, bs, "blocks.1"), tmp_path / "ref", batches_per_shard=2)
    with pytest.raises(Interrupted):
        write_cache(ModelActivations(m, dying(bs, 5), "blocks.1"), tmp_path / "c", batches_per_shard=2)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    (tmp_path / "c" / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # died while writing
    with pytest.raises(CacheError, match="unfinished"):
        CachedActivations(tmp_path / "c")
    calls = count_calls(m)
    done = write_cache(ModelActivations(m, bs, "blocks.1"), tmp_path / "c", batches_per_shard=2)
    assert calls["blocks.0"] == 3  # only the 3 batches after the finished shards ran the model
    assert done["complete"] and done["rows"] == 7 * 4 * T and not list((tmp_path / "c").glob("*.tmp"))
    for s in done["shards"]:
        assert (tmp_path / "c" / s["file"]).read_bytes() == (tmp_path / "ref" / s["file"]).read_bytes()
    # a rerun on a complete cache does nothing; other inputs on resume are refused
    assert write_cache(ModelActivations(m, bs, "blocks.1"), tmp_path / "c", batches_per_shard=2) == done
    with pytest.raises(Interrupted):
        write_cache(ModelActivations(m, dying(bs, 3), "blocks.1"), tmp_path / "d", batches_per_shard=2)
    with pytest.raises(CacheError, match="inputs of shard 0 differ"):
        write_cache(ModelActivations(m, token_batches(7, seed=9), "blocks.1"), tmp_path / "d", batches_per_shard=2)


def test_cache_reads_memory_mapped_and_shuffles_with_a_seed(tmp_path):
    m = tiny_gpt()
    bs = token_batches(5)
    ref = torch.cat(list(ModelActivations(m, bs, "blocks.2")))
    write_cache(ModelActivations(m, bs, "blocks.2"), tmp_path, batches_per_shard=2)
    c = CachedActivations(tmp_path, batch_size=50, seed=3)
    assert all(isinstance(a, np.memmap) for arrs in c.arrays for a in arrs)
    assert len(c) == len(ref) and c.d_in == 16 and c.d_out is None
    assert torch.equal(c.tensors()[0], ref)
    rows = torch.cat(list(c))
    assert torch.equal(rows, ref[torch.from_numpy(c.order(0))])  # every row once, in the seeded order
    assert not torch.equal(rows, ref)
    assert torch.equal(rows, torch.cat(list(CachedActivations(tmp_path, batch_size=50, seed=3))))
    assert not torch.equal(rows, torch.cat(list(CachedActivations(tmp_path, batch_size=50, seed=4))))
    seq = CachedActivations(tmp_path, batch_size=64, shuffle=False, epochs=2)
    assert torch.equal(torch.cat(list(seq)), torch.cat([ref, ref]))


def test_transcoder_cache_keeps_pairs_together(tmp_path):
    m = tiny_gpt()
    bs = token_batches(3)
    write_cache(ModelActivations(m, bs, "blocks.0.mlp", transcoder=True), tmp_path, batches_per_shard=2)
    c = CachedActivations(tmp_path, batch_size=40, seed=0)
    assert (c.d_in, c.d_out) == (16, 16)
    for x_in, x_out in c:
        torch.testing.assert_close(m.blocks[0].mlp(x_in), x_out, rtol=0, atol=1e-12)


def test_bad_cache_folders_name_the_problem(tmp_path):
    m = tiny_gpt()
    write_cache(ModelActivations(m, token_batches(4), "blocks.0"), tmp_path / "c", batches_per_shard=2)
    with pytest.raises(CacheError, match=r"no manifest\.json"):
        CachedActivations(tmp_path)
    bad = tmp_path / "truncated"
    shutil.copytree(tmp_path / "c", bad)
    shard = bad / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CacheError, match=r"shard-00001.safetensors is truncated"):
        CachedActivations(bad)
    wide = tmp_path / "mismatch"
    shutil.copytree(tmp_path / "c", wide)
    write_cache(ModelActivations(m, token_batches(2), "blocks.0.mlp.0"), tmp_path / "w", batches_per_shard=2)
    shutil.copy(tmp_path / "w" / "shard-00000.safetensors", wide / "shard-00001.safetensors")
    with pytest.raises(CacheError, match=r"shape mismatch: .*shard-00001.safetensors has width \[64\]"):
        CachedActivations(wide)
    gone = tmp_path / "missing"
    shutil.copytree(tmp_path / "c", gone)
    (gone / "shard-00000.safetensors").unlink()
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors is missing"):
        CachedActivations(gone)
    with pytest.raises(CacheError, match="written for hooks"):
        write_cache(ModelActivations(m, token_batches(4), "blocks.1"), tmp_path / "c", batches_per_shard=2)


# -- splice --------------------------------------------------------------------------------------


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_splice_identity_recovers_everything_and_zero_nothing():
    m = tiny_gpt()
    bs = token_batches(3)
    ident = splice_eval(m, nn.Identity(), bs, "blocks.1")
    assert ident["ce_recovered"] == 1.0 and ident["kl"] == 0.0 and ident["ce_spliced"] == ident["ce_clean"]
    assert ident["tokens"] == 3 * 4 * (T - 1)
    zero = splice_eval(m, Zero(), bs, "blocks.1")
    assert zero["ce_recovered"] == 0.0 and zero["ce_spliced"] == zero["ce_zero"] and zero["kl"] > 0
    # (x, y) task batches; a transcoder made of the module itself recovers everything
    pairs = [(b[:, :-1], b[:, 1:]) for b in bs]
    tc = splice_eval(m, lambda x: m.blocks[0].mlp(x), pairs, "blocks.0.mlp", transcoder=True)
    assert tc["ce_recovered"] == 1.0 and tc["kl"] == 0.0


def test_splice_on_hugging_face_gpt2():
    from topotorch.user_models import hugging_face_lm

    torch.manual_seed(0)
    m = hugging_face_lm("gpt2", VOCAB, T, n_layer=2, n_embd=16, n_head=2).double()
    bs = token_batches(2)
    assert splice_eval(m.hf, nn.Identity(), [{"input_ids": b} for b in bs], "transformer.h.0")["kl"] == 0.0
    r = splice_eval(m, Zero(), bs, "hf.transformer.h.0.mlp")
    assert r["ce_recovered"] == 0.0 and r["ce_zero"] != r["ce_clean"]


# -- interop -------------------------------------------------------------------------------------

from topotorch.sae import SAEConfig, SparseCoder  # noqa: E402
from topotorch.sae.interop import (  # noqa: E402
    InteropError,
    export,
    load_any,
    load_saelens,
    load_sparsify,
    save_saelens,
    save_sparsify,
)

D, N = 12, 48
CODERS = {
    "topk": SAEConfig(d_in=D, n_latents=N, k=4),
    "relu": SAEConfig(d_in=D, n_latents=N, architecture="relu", l1_coeff=3e-3),
    "jumprelu": SAEConfig(d_in=D, n_latents=N, architecture="jumprelu", target_l0=5.0),
    "batchtopk": SAEConfig(d_in=D, n_latents=N, architecture="batchtopk", k=6),
    "relu-transcoder": SAEConfig(d_in=D, n_latents=N, architecture="relu", d_out=7),
    "relu-skip-transcoder": SAEConfig(d_in=D, n_latents=N, architecture="relu", d_out=7, skip=True),
    "jumprelu-transcoder": SAEConfig(d_in=D, n_latents=N, architecture="jumprelu", d_out=7),
    "topk-skip-transcoder": SAEConfig(d_in=D, n_latents=N, k=4, d_out=D, skip=True),
}
SAELENS_OK = [k for k in CODERS if k != "topk-skip-transcoder"]
SPARSIFY_OK = ["topk", "topk-skip-transcoder"]


def coder(name: str) -> SparseCoder:
    """A float64 coder with every tensor perturbed (nothing left at its initial value)."""
    cfg = CODERS[name]
    sae = SparseCoder(cfg, dtype=torch.float64, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in sae.parameters():
            t.add_(0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype))
        if cfg.architecture == "jumprelu":
            sae.threshold.copy_(0.3 * torch.rand(N, generator=g, dtype=torch.float64))
        if cfg.architecture == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae


def assert_same_coder(a: SparseCoder, b: SparseCoder) -> None:
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    x = torch.randn(30, a.cfg.d_in, dtype=sa["W_enc"].dtype, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", SAELENS_OK)
def test_saelens_round_trip_is_exact(tmp_path, name):
    sae = coder(name)
    save_saelens(sae, tmp_path, hook_name="blocks.1", model_name="tiny")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_in"] == D and cfg["d_sae"] == N and cfg["metadata"]["hook_name"] == "blocks.1"
    assert cfg["apply_b_dec_to_input"] is (not sae.cfg.transcoder) and cfg["normalize_activations"] == "none"
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert torch.equal(w["W_enc"], sae.W_enc.t()) and w["W_enc"].shape == (D, N)  # SAELens: [d_in, d_sae]
    assert_same_coder(load_saelens(tmp_path), sae)
    assert_same_coder(load_any(tmp_path), sae)


@pytest.mark.parametrize("name", SPARSIFY_OK)
def test_sparsify_round_trip_is_exact(tmp_path, name):
    sae = coder(name)
    save_sparsify(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["num_latents"], cfg["k"], cfg["d_in"], cfg["transcode"]) == (N, sae.cfg.k, D, sae.cfg.transcoder)
    assert_same_coder(load_sparsify(tmp_path), sae)
    assert_same_coder(load_any(tmp_path), sae)


@pytest.fixture
def sparsify_eager(monkeypatch):
    """sparsify with its eager decoder (its Triton kernel needs a GPU)."""
    sparsify = pytest.importorskip("sparsify")
    import sparsify.sparse_coder as sc
    from sparsify.utils import eager_decode

    monkeypatch.setattr(sc, "decoder_impl", eager_decode)
    return sparsify


@pytest.mark.parametrize("name", SPARSIFY_OK)
def test_sparsify_own_loader_reads_ours_and_we_read_theirs(tmp_path, sparsify_eager, name):
    sae = coder(name)
    save_sparsify(sae, tmp_path / "ours")
    peer = sparsify_eager.SparseCoder.load_from_disk(tmp_path / "ours")
    x = torch.randn(30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    top_acts, top_idx, _ = peer.encode(x)
    y = peer.decode(top_acts, top_idx) + (x @ peer.W_skip.mT if peer.W_skip is not None else 0)
    torch.testing.assert_close(y, sae(x), rtol=0, atol=1e-12)
    # a coder sparsify wrote itself (its own layout and cfg.json) reads back exactly
    peer.save_to_disk(tmp_path / "theirs")
    back = load_sparsify(tmp_path / "theirs")
    names = (("W_enc", "encoder.weight"), ("b_enc", "encoder.bias"), ("W_dec", "W_dec"), ("b_dec", "b_dec"))
    for ours, theirs in names:
        assert torch.equal(getattr(back, ours), peer.get_parameter(theirs)), ours
    torch.testing.assert_close(back(x), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", SAELENS_OK)
def test_saelens_own_loader_reads_ours_and_we_read_theirs(tmp_path, name):
    sae_lens = pytest.importorskip("sae_lens", reason="peer sae-lens not installed")
    sae = coder(name)
    save_saelens(sae, tmp_path / "ours", hook_name="blocks.1")
    peer = sae_lens.SAE.load_from_disk(tmp_path / "ours")
    x = torch.randn(30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(peer(x), sae(x), rtol=0, atol=1e-12)
    peer.save_model(tmp_path / "theirs")
    assert_same_coder(load_saelens(tmp_path / "theirs"), sae)


def test_formats_refuse_what_they_cannot_express(tmp_path):
    with pytest.raises(InteropError, match="sparsify stores TopK coders only; this one is 'relu'"):
        save_sparsify(coder("relu"), tmp_path)
    with pytest.raises(InteropError, match="SAELens has no topk skip-transcoder"):
        save_saelens(coder("topk-skip-transcoder"), tmp_path)
    with pytest.raises(InteropError, match="maps 12 to 7"):
        save_sparsify(SparseCoder(SAEConfig(d_in=D, n_latents=N, k=4, d_out=7)), tmp_path)
    jr = coder("jumprelu")
    with torch.no_grad():
        jr.threshold[3] = -0.1
    with pytest.raises(InteropError, match="latent 3 has a negative JumpReLU threshold"):
        save_saelens(jr, tmp_path)
    with pytest.raises(InteropError, match="unknown format 'onnx'"):
        export(jr, tmp_path, "onnx")


def test_saelens_files_from_other_versions_and_settings(tmp_path):
    sae = coder("topk")
    sae.normalize_decoder_()  # as training leaves it: unit decoder rows
    save_saelens(sae, tmp_path)
    from safetensors.torch import load_file, save_file

    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    x = torch.randn(30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # SAELens < 6: hook_point, activation_fn "topk" with its k in activation_fn_kwargs, no architecture
    old = tmp_path / "old"
    old.mkdir()
    save_file(w, str(old / "sae_weights.safetensors"))
    (old / "cfg.json").write_text(
        json.dumps(
            {
                "d_in": D,
                "d_sae": N,
                "hook_point": "blocks.1.hook_resid_pre",
                "activation_fn_str": "topk",
                "activation_fn_kwargs": {"k": 4},
                "apply_b_dec_to_input": True,
                "normalize_activations": False,
            }
        )
    )
    assert torch.equal(load_saelens(old)(x), sae(x))
    # apply_b_dec_to_input false (b_dec folded into b_enc) and decoder-norm rescaling (folded): equal to rounding
    plain = tmp_path / "plain"
    plain.mkdir()
    scale = torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    # SAELens then computes topk((x W_enc + b_enc) * s) / s @ W_dec: the file's encoder carries 1/s
    b_enc = (w["b_enc"] - w["W_enc"].t() @ w["b_dec"]) / scale
    save_file(
        {**w, "W_enc": (w["W_enc"] / scale).contiguous(), "b_enc": b_enc, "W_dec": w["W_dec"] * scale[:, None]},
        str(plain / "sae_weights.safetensors"),
    )
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg.update(apply_b_dec_to_input=False, rescale_acts_by_decoder_norm=True)
    (plain / "cfg.json").write_text(json.dumps(cfg))
    torch.testing.assert_close(load_saelens(plain)(x), sae(x), rtol=0, atol=1e-12)


def test_bad_files_name_the_file_and_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    def fresh(name: str, fmt: str = "saelens") -> Path:
        folder = tmp_path / name
        export(coder("jumprelu" if fmt == "saelens" else "topk"), folder, fmt)
        return folder

    f = fresh("shape")
    w = load_file(str(f / "sae_weights.safetensors"))
    save_file({**w, "W_dec": w["W_dec"][:, :-1].contiguous()}, str(f / "sae_weights.safetensors"))
    with pytest.raises(
        InteropError,
        match=r"shape.sae_weights\.safetensors: tensor 'W_dec' has shape \[48, 11\], "
        r"cfg\.json \(jumprelu, d_in=12, d_sae=48\) implies \[48, 12\]",
    ):
        load_saelens(f)
    f = fresh("nothreshold")
    save_file({k: v for k, v in w.items() if k != "threshold"}, str(f / "sae_weights.safetensors"))
    with pytest.raises(InteropError, match=r"sae_weights\.safetensors: missing tensor 'threshold'"):
        load_saelens(f)
    f = fresh("nokey")
    cfg = json.loads((f / "cfg.json").read_text())
    (f / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_sae"}))
    with pytest.raises(InteropError, match=r"nokey.cfg\.json: missing key 'd_sae'"):
        load_saelens(f)
    f = fresh("arch")
    (f / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(InteropError, match=r"cfg\.json: key 'architecture' is 'gated'.*supported: standard, topk"):
        load_saelens(f)
    f = fresh("norm")
    (f / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(InteropError, match="'normalize_activations' is 'layer_norm'"):
        load_saelens(f)
    f = fresh("truncated", "sparsify")
    data = (f / "sae.safetensors").read_bytes()
    (f / "sae.safetensors").write_bytes(data[:-64])
    with pytest.raises(InteropError, match=r"truncated.sae\.safetensors is truncated"):
        load_sparsify(f)
    (f / "sae.safetensors").write_bytes(data[:5])
    with pytest.raises(InteropError, match=r"sae\.safetensors is truncated \(5 bytes\)"):
        load_sparsify(f)
    f = fresh("groupmax", "sparsify")
    cfg = json.loads((f / "cfg.json").read_text())
    (f / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(InteropError, match=r"cfg\.json: key 'activation' is 'groupmax'"):
        load_sparsify(f)
    (f / "cfg.json").write_text("{not json")
    with pytest.raises(InteropError, match=r"groupmax.cfg\.json: not valid JSON"):
        load_sparsify(f)
    (f / "cfg.json").unlink()
    with pytest.raises(InteropError, match=r"groupmax: missing cfg\.json"):
        load_sparsify(f)
    with pytest.raises(InteropError, match="expected exactly one of"):
        load_any(tmp_path)


# -- the command -----------------------------------------------------------------------------------


def test_cli_end_to_end_on_a_tiny_model(tmp_path):
    from typer.testing import CliRunner

    from topotorch.cli import app
    from topotorch.report import build_report

    run = tiny_text_run(tmp_path)  # a `topotorch train` run folder of a tiny model
    out = tmp_path / "sae"
    args = [
        str(run),
        "--hook",
        "blocks.0",
        "--latents",
        "64",
        "--k",
        "4",
        "--steps",
        "15",
        "--batch-size",
        "256",
        "--eval-windows",
        "8",
        "--show-latents",
        "4",
        "--export",
        "saelens,sparsify",
        "--out",
        str(out),
        "--no-progress",
    ]
    res = CliRunner().invoke(app, ["sae", *args])
    assert res.exit_code == 0, res.output
    assert "CE recovered" in res.output
    summary = json.loads((out / "summary.json").read_text())
    ev = summary["eval"]
    assert set(ev) >= {
        "fvu",
        "explained_variance",
        "l0",
        "dead",
        "dense",
        "cosine",
        "relative_reconstruction_bias",
        "ce_clean",
        "ce_spliced",
        "ce_zero",
        "ce_recovered",
        "kl",
    }
    assert ev["l0"] == 4.0 and summary["train"]["steps"] == 15
    assert (out / "metrics.csv").read_text().startswith("step,tokens,fvu,l0,dead,aux,loss,lr")
    sae = SparseCoder.load(out / "sae")
    assert_same_coder(load_saelens(out / "saelens"), sae)
    assert_same_coder(load_sparsify(out / "sparsify"), sae)
    top = json.loads((out / "top_examples.json").read_text())
    assert len(top["latents"]) == 4 and all(ex["act"] > 0 for lat in top["latents"] for ex in lat["examples"])
    page = build_report(out).read_text()
    assert "CE-loss recovered" in page and "Top-activating contexts" in page
    # through the disk cache: a transcoder of the first block's MLP, trained from shuffled shards
    cached = CliRunner().invoke(
        app,
        [
            "sae",
            str(run),
            "--hook",
            "blocks.0.mlp",
            "--transcoder",
            "--latents",
            "32",
            "--k",
            "4",
            "--steps",
            "6",
            "--batch-size",
            "128",
            "--eval-windows",
            "4",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "tc"),
            "--no-progress",
        ],
    )
    assert cached.exit_code == 0, cached.output
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] >= 6 * 128
    assert manifest["hooks"] == ["blocks.0.mlp:input", "blocks.0.mlp"]
    assert json.loads((tmp_path / "tc" / "summary.json").read_text())["sae"]["d_out"] == 16
    # refused: an existing run folder, a hook that names no module
    again = CliRunner().invoke(app, ["sae", *args])
    assert again.exit_code == 2 and "already holds a run" in again.output
    bad = CliRunner().invoke(
        app, ["sae", str(run), "--hook", "block.0", "--latents", "8", "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2 and "matches no module" in bad.output and "blocks.0" in bad.output
    assert not (tmp_path / "x").exists()
