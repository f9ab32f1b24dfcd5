"""Atomic, pickle-free checkpoints (topotorch.checkpoint)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from topotorch.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from topotorch.graph import SpatialGraph
from topotorch.objectives.wiring import WiringConfig, wiring_cost
from topotorch.relocation import relocate


def make(seed: int = 0, lr: float = 1e-2, widths=(3, 8, 8, 2)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    net = nn.Sequential(*layers[:-1]).double()
    graph = SpatialGraph.from_chain(net)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    return net, graph, opt


DATA = torch.Generator().manual_seed(42)
X = torch.randn(32, 3, dtype=torch.float64, generator=DATA)
Y = torch.randn(32, 2, dtype=torch.float64, generator=DATA)
CFG = WiringConfig(wf=1.0, l0=0.1)


def step(net, graph, opt, i: int) -> None:
    loss = ((net(X) - Y) ** 2).mean() + 1e-3 * wiring_cost(graph, CFG)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if i % 5 == 4:
        relocate(graph, CFG, "swap", top_k=3, optimizer=opt)


def params(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    base = tmp_path / "ckpt"
    net, graph, opt = make()
    for i in range(12):
        step(net, graph, opt, i)
    save_checkpoint(base, net, opt, graph, step=12, extra={"note": "hi"})
    for i in range(12, 30):
        step(net, graph, opt, i)
    reference = params(net)
    ref_positions = {s.name: s.positions.clone() for s in graph.spaces}

    # a fresh process: other initial weights, other lr; everything must come from the checkpoint
    net2, graph2, opt2 = make(seed=1, lr=0.5)
    meta = load_checkpoint(base, net2, opt2, graph2)
    assert meta["step"] == 12 and meta["extra"] == {"note": "hi"}
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["weight_decay"] == 0.01
    for i in range(12, 30):
        step(net2, graph2, opt2, i)
    assert_same(params(net2), reference)
    for s in graph2.spaces:
        assert torch.equal(s.positions, ref_positions[s.name]), s.name


def test_optimizer_state_round_trip(tmp_path):
    net, graph, opt = make()
    for i in range(7):
        step(net, graph, opt, i)
    save_checkpoint(tmp_path / "c", net, opt, graph, step=7)
    net2, graph2, opt2 = make(seed=3)
    load_checkpoint(tmp_path / "c", net2, opt2, graph2)
    by_name = dict(net.named_parameters())
    for n, p2 in net2.named_parameters():
        s1, s2 = opt.state[by_name[n]], opt2.state[p2]
        assert s1.keys() == s2.keys()
        for k in s1:
            assert torch.equal(torch.as_tensor(s1[k]), torch.as_tensor(s2[k])), (n, k)
            assert torch.as_tensor(s1[k]).dtype == torch.as_tensor(s2[k]).dtype, (n, k)


def test_positions_are_restored_and_cache_invalidated(tmp_path):
    net, graph, _ = make()
    new = graph.space("input").positions.flip(0)
    graph.set_positions("input", new)
    cost = float(wiring_cost(graph, CFG).detach())
    save_checkpoint(tmp_path / "c", net, None, graph)
    net2, graph2, _ = make()
    wiring_cost(graph2, CFG)  # fills the distance cache with the old layout
    v = graph2.version
    load_checkpoint(tmp_path / "c", net2, None, graph2)
    assert torch.equal(graph2.space("input").positions, new)
    assert graph2.version > v
    assert float(wiring_cost(graph2, CFG).detach()) == cost


def test_previous_checkpoint_kept_and_no_temp_files(tmp_path):
    base = tmp_path / "checkpoint"
    net, graph, opt = make()
    save_checkpoint(base, net, opt, graph, step=1)
    first = params(net)
    assert not (tmp_path / "checkpoint.prev.safetensors").exists()
    step(net, graph, opt, 0)
    save_checkpoint(base, net, opt, graph, step=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.json", "checkpoint.prev.json", "checkpoint.prev.safetensors", "checkpoint.safetensors"]
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 2
    assert json.loads((tmp_path / "checkpoint.prev.json").read_text())["step"] == 1
    tensors, meta = read_checkpoint(base, prev=True)
    assert meta["step"] == 1
    assert_same({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}, first)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoint_is_detected_by_checksum(tmp_path):
    base = tmp_path / "checkpoint"
    net, graph, opt = make()
    save_checkpoint(base, net, opt, graph, step=1)
    truncate(tmp_path / "checkpoint.safetensors")
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(base)
    net2, graph2, opt2 = make(seed=1)
    with pytest.raises(CheckpointError, match=r"corrupt or truncated.*checksum"):
        load_checkpoint(base, net2, opt2, graph2)  # no .prev to fall back to


def test_flipped_byte_is_detected(tmp_path):
    base = tmp_path / "checkpoint"
    net, graph, _ = make()
    save_checkpoint(base, net, None, graph)
    p = tmp_path / "checkpoint.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF  # same length, one weight changed
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(base, make(seed=1)[0])


def test_corrupt_checkpoint_falls_back_to_previous_with_a_warning(tmp_path):
    base = tmp_path / "checkpoint"
    net, graph, opt = make()
    save_checkpoint(base, net, opt, graph, step=1)
    first = params(net)
    step(net, graph, opt, 0)
    save_checkpoint(base, net, opt, graph, step=2)
    truncate(tmp_path / "checkpoint.safetensors")

    net2, graph2, opt2 = make(seed=1)
    with pytest.warns(UserWarning, match=r"checksum.*previous checkpoint .*checkpoint\.prev"):
        meta = load_checkpoint(base, net2, opt2, graph2)
    assert meta["step"] == 1
    assert_same(params(net2), first)

    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(base, make(seed=1)[0], fallback=False)


def test_both_checkpoints_broken_is_an_error(tmp_path):
    base = tmp_path / "checkpoint"
    net, graph, _ = make()
    save_checkpoint(base, net, None, graph, step=1)
    save_checkpoint(base, net, None, graph, step=2)
    truncate(tmp_path / "checkpoint.safetensors")
    truncate(tmp_path / "checkpoint.prev.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "using the previous checkpoint" warning when that one is broken too
        with pytest.raises(
            CheckpointError,
            match=r"checkpoint\.safetensors .*checksum.*previous checkpoint is "
            r"unusable too: .*checkpoint\.prev\.safetensors .*checksum",
        ):
            load_checkpoint(base, make(seed=1)[0])


def test_corrupt_json_is_a_checkpoint_error(tmp_path):
    base = tmp_path / "checkpoint"
    net, graph, _ = make()
    save_checkpoint(base, net, None, graph)
    (tmp_path / "checkpoint.json").write_text('{"step": 3, "sha2')
    with pytest.raises(CheckpointError, match=r"metadata .*checkpoint\.json.* corrupt"):
        load_checkpoint(base, make(seed=1)[0])
    (tmp_path / "checkpoint.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(base)


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing", make()[0])


def test_model_mismatch_is_a_checkpoint_error(tmp_path):
    net, graph, opt = make()
    save_checkpoint(tmp_path / "c", net, opt, graph)
    # the first layer has the same shape in both: it must not be loaded on its own
    other, _, _ = make(seed=1, widths=(3, 8, 2))
    before = params(other)
    with pytest.raises(CheckpointError, match=r"does not fit the model: .*'2\.weight' has shape \(8, 8\)"):
        load_checkpoint(tmp_path / "c", other)
    assert_same(params(other), before)  # nothing half-loaded
    with pytest.raises(CheckpointError, match=r"missing '0\.0\.weight'.*more\)"):
        load_checkpoint(tmp_path / "c", nn.Sequential(nn.Sequential(nn.Linear(3, 8))).double())


def test_kill_between_the_two_renames_still_finds_the_newest_consistent_pair(tmp_path):
    """save_checkpoint moves NAME.safetensors to .prev, then NAME.json to .prev: a kill in between leaves
    (.prev.safetensors, NAME.json) as the only matching pair, and it is the newest checkpoint."""
    import os

    base = tmp_path / "checkpoint"
    net, graph, opt = make()
    save_checkpoint(base, net, opt, graph, step=1)
    step(net, graph, opt, 0)
    save_checkpoint(base, net, opt, graph, step=2)
    second = params(net)
    os.replace(tmp_path / "checkpoint.safetensors", tmp_path / "checkpoint.prev.safetensors")  # killed here
    net2, graph2, opt2 = make(seed=1)
    with pytest.warns(UserWarning, match="previous checkpoint"):
        meta = load_checkpoint(base, net2, opt2, graph2)
    assert meta["step"] == 2
    assert_same(params(net2), second)
