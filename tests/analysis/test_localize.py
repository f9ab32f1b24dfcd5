"""Concept localisation: the region finder on planted maps, ablation hooks, and a planted responsive patch."""

import torch
from torch import nn

from topotorch.analysis.localize import ablated, find_region, localize


def test_find_region_picks_the_strongest_connected_blob():
    t = torch.zeros(8, 8)
    t[1:3, 1:3] = 5.0  # 4 units, Σt = 20
    t[5:8, 5:8] = 4.0  # 9 units, Σt = 36: the region
    t[0, 7] = 9.0  # a single strong unit, Σt = 9
    r = find_region(t.reshape(-1), 8, 8, threshold=3.0)
    assert sorted(r.tolist()) == sorted(i * 8 + j for i in range(5, 8) for j in range(5, 8))
    assert find_region(torch.zeros(64), 8, 8).numel() == 0  # nothing above t = 2


def test_ablation_zeroes_units_and_restores():
    net = nn.Sequential(nn.Linear(3, 6), nn.Identity(), nn.Linear(6, 2))
    x = torch.randn(4, 3)
    ref = net(x)
    with ablated(net, "0", torch.tensor([1, 4])):
        h = net[0](x)
    assert (h[:, [1, 4]] == 0).all() and (h[:, [0, 2, 3, 5]] != 0).all()
    assert torch.equal(net(x), ref)


def test_localize_finds_a_planted_patch():
    torch.manual_seed(0)
    lin = nn.Linear(4, 64)  # 8x8 sheet; units of the 3x3 patch at rows 2-4, cols 2-4 read input 0 strongly
    patch = [r * 8 + c for r in range(2, 5) for c in range(2, 5)]
    with torch.no_grad():
        lin.weight[:, 0] = 0.0  # only the patch reads input 0
        lin.weight[patch, 0] = 3.0
    net = nn.Sequential(lin, nn.ReLU(), nn.Linear(64, 1))
    x_other = torch.randn(200, 4)
    x_target = torch.randn(200, 4)
    x_target[:, 0] += 2.0  # the "concept": input 0 is on
    res = localize(net, "0", x_target, x_other, metric=lambda m, x: float(m(x).mean()))
    assert sorted(res["region_units"]) == patch
    assert res["target"]["region_ablated"] != res["target"]["intact"]
    assert len(res["t_map"]) == 64 and res["sheet"] == [8, 8]


def test_cli_localize_on_a_text_run(tmp_path):
    import json

    from typer.testing import CliRunner

    from topotorch.cli import app
    from topotorch.training import TrainConfig, train

    words = ["war", "sword", "blood", "love", "rose", "kiss", "the", "and"]
    g = torch.Generator().manual_seed(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(words[i] for i in torch.randint(0, 8, (700,), generator=g).tolist()))
    (tmp_path / "a.txt").write_text("war sword blood " * 30)
    (tmp_path / "b.txt").write_text("love rose kiss " * 30 + "@")  # '@' is not in the vocabulary
    run = tmp_path / "run"
    train(
        TrainConfig.for_task(
            f"text:{corpus}", method="none", steps=1, animation=False, progress=False, out=str(run), log_every=1
        )
    )
    res = CliRunner().invoke(
        app, ["localize", str(run), "--target", str(tmp_path / "a.txt"), "--other", str(tmp_path / "b.txt")]
    )
    assert res.exit_code == 0, res.output
    assert "gpt.blocks.0.mlp.0 (16x32): region of" in res.output and "dropped 1 characters" in res.output
    data = json.loads((run / "localize.json").read_text())
    assert set(data["target"]) == {"intact", "region_ablated", "random_ablated"}
    assert (run / "localize.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(
        app, ["localize", str(run), "--target", str(tmp_path / "nope.txt"), "--other", str(tmp_path / "b.txt")]
    )
    assert bad.exit_code == 2 and bad.output.startswith("error:")
