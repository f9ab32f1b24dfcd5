"""topotorch.sae input/output: activations by hook point (on the fly and cached), the spliced-in
downstream loss, SAELens / sparsify files, and the ``topotorch sae`` command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

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
        "blocks.1", "blocks.0.mlp:input", "blocks.1.mlp:input", "blocks.2.mlp:input"]
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
    whole = torch.cat([x for x in ModelActivations(m, bs, "blocks.1")])
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
    with pytest.raises(CacheError, match="no manifest.json"):
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
    with pytest.raises(CacheError, match="shard-00000.safetensors is missing"):
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
