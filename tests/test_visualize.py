"""Snapshots, connectivity drawings and animations (topotorch.visualize)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection
from torch import nn

from topotorch.graph import SpatialGraph
from topotorch.relocation import apply_permutation
from topotorch.visualize import (
    Snapshot,
    draw_connectivity,
    ffmpeg_available,
    load_snapshots,
    render_animation,
    save_snapshots,
    take_snapshot,
)

N_WEIGHTS = 4 * 20 + 20 * 20 + 20 * 2  # edges of the 4-20-20-2 MLP


def mlp_graph(layouts=None, widths=(4, 20, 20, 2), seed=0) -> SpatialGraph:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return SpatialGraph.from_chain(nn.Sequential(*layers[:-1]), layouts=layouts or {})


def edge_collections(fig):
    return [c for ax in fig.axes for c in ax.collections if isinstance(c, LineCollection)]


def n_segments(fig) -> int:
    fig.canvas.draw()  # 3-D collections project their segments at draw time
    return sum(len(c.get_segments()) for c in edge_collections(fig))


def labels(fig, space: str) -> dict[int, object]:
    out = {}
    for t in fig.axes[0].texts:
        gid = t.get_gid() or ""
        if gid.startswith(f"label:{space}:"):
            out[int(gid.rsplit(":", 1)[1])] = t
    return out


# -- snapshots --------------------------------------------------------------------------------
def test_snapshot_copies_weights_biases_positions():
    g = mlp_graph()
    snap = take_snapshot(g, 7)
    names = {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert snap.step == 7 and set(snap.weights) == names
    assert set(snap.positions) == {"input", "hidden1", "hidden2", "output"}
    assert all(w.dtype == torch.float32 and w.device.type == "cpu" for w in snap.weights.values())
    before = snap.weights["0.weight"].clone()
    with torch.no_grad():
        g.tensor("0.weight").add_(1.0)
    g.set_positions("input", g.space("input").positions + 0.5)
    assert torch.equal(snap.weights["0.weight"], before)  # a copy, not a view
    assert not torch.equal(snap.positions["input"], g.space("input").positions)


def test_snapshot_roundtrip_safetensors(tmp_path):
    # folded embedding: the token space has no coordinates (positions None must survive)
    torch.manual_seed(1)
    g = SpatialGraph.from_chain(nn.Sequential(nn.Embedding(5, 3), nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 5)))
    snaps = [take_snapshot(g, 0)]
    with torch.no_grad():
        g.tensor("1.weight").mul_(-2)
    snaps += [take_snapshot(g, 12), take_snapshot(g, 12), take_snapshot(g, 1_234_567)]  # repeated and long steps
    path = tmp_path / "snaps.safetensors"
    save_snapshots(snaps, path)
    assert path.read_bytes()[8:].lstrip().startswith(b"{")  # safetensors header, no pickle
    back = load_snapshots(path)
    assert [s.step for s in back] == [0, 12, 12, 1_234_567]
    for a, b in zip(snaps, back):
        assert list(a.weights) == list(b.weights)
        for k in a.weights:
            assert torch.equal(a.weights[k], b.weights[k]) and b.weights[k].dtype == torch.float32
        assert a.positions.keys() == b.positions.keys()
        for k, p in a.positions.items():
            if p is None:
                assert b.positions[k] is None
            else:
                assert torch.equal(p, b.positions[k]) and b.positions[k].dtype == torch.float64
    assert back[0].positions["tokens"] is None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert "000012/1.weight" in f.keys() and "000012/pos/hidden1" in f.keys()


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a topotorch snapshot"):
        load_snapshots(tmp_path / "x.safetensors")


# -- drawing ----------------------------------------------------------------------------------
def test_draw_png_has_content(tmp_path):
    g = mlp_graph()
    fig = draw_connectivity(g, path=tmp_path / "net.png", title="mlp")
    import imageio.v3 as iio

    img = iio.imread(tmp_path / "net.png")[..., :3]
    assert (img < 250).any(axis=-1).mean() > 0.005  # lines and points on a white background
    blue = (img[..., 2] > 150) & (img[..., 0] < 100)
    red = (img[..., 0] > 150) & (img[..., 2] < 100)
    assert blue.any() and red.any()
    assert fig.axes[0].get_title() == "mlp"


def test_threshold_and_segment_counts():
    g = mlp_graph()
    assert n_segments(draw_connectivity(g)) == N_WEIGHTS
    top = max(float(g.tensor(c.weight).detach().abs().max()) for c in g.connections)
    assert n_segments(draw_connectivity(g, threshold=top + 1e-3)) == 0
    # one LineCollection per connection, widths/alpha scaled per connection, colour = sign
    fig = draw_connectivity(g)
    colls = {c.get_gid(): c for c in edge_collections(fig)}
    assert set(colls) == {"edges:0.weight", "edges:2.weight", "edges:4.weight"}
    w = g.tensor("2.weight").detach()
    rgba = colls["edges:2.weight"].get_colors()
    assert int((rgba[:, 2] == 1).sum()) == int((w >= 0).sum())
    assert np.isclose(rgba[:, 3].max(), 1.0) and np.isclose(np.max(colls["edges:2.weight"].get_linewidths()), 2.0)
    # at most max_edges strongest per connection
    assert n_segments(draw_connectivity(g, max_edges=10)) == 30


def test_snapshot_weights_are_drawn_not_live_ones():
    g = mlp_graph()
    snap = take_snapshot(g, 3)
    with torch.no_grad():
        for c in g.connections:
            g.tensor(c.weight).zero_()
    assert n_segments(draw_connectivity(g)) == 0
    fig = draw_connectivity(g, snap)
    assert n_segments(fig) == N_WEIGHTS and fig.axes[0].get_title() == "step 3"


def test_labels_follow_relocated_input_neurons():
    g = mlp_graph()
    g.space("output").labels = ["no", "yes"]
    perm = torch.tensor([2, 0, 3, 1])  # slot q receives neuron perm[q]
    old = g.space("input").positions[:, 0].clone()
    apply_permutation(g, "input", perm)
    new = g.space("input").positions[:, 0]
    assert torch.equal(new[perm], old)
    fig = draw_connectivity(g)
    lab = labels(fig, "input")
    assert sorted(lab) == [0, 1, 2, 3]
    for i, t in lab.items():
        assert t.get_text() == f"x{i + 1}"
        assert t.get_position()[0] == pytest.approx(float(new[i]))
    assert [t.get_text() for _, t in sorted(labels(fig, "output").items())] == ["no", "yes"]
    # the hidden layer is not labelled; edges leave input neuron i from its new position
    assert not labels(fig, "hidden1")
    segs = next(c for c in edge_collections(fig) if c.get_gid() == "edges:0.weight").get_segments()
    starts = {round(float(s[0][0]), 9) for s in segs}
    assert starts == {round(float(x), 9) for x in new}


def test_3d_mode_for_grid_input(tmp_path):
    from mpl_toolkits.mplot3d.art3d import Line3DCollection

    g = mlp_graph({"input": "grid:8x8", "output": "circle"}, widths=(64, 12, 10))
    fig = draw_connectivity(g, path=tmp_path / "net3d.png")
    ax = fig.axes[0]
    assert ax.name == "3d"
    colls = edge_collections(fig)
    assert len(colls) == 2 and all(isinstance(c, Line3DCollection) for c in colls)
    assert n_segments(fig) == 64 * 12 + 12 * 10
    # the hidden line is lifted to y = 0.5 in the plane; labels sit over each input neuron
    segs = next(c for c in colls if c.get_gid() == "edges:0.weight")._segments3d
    assert np.allclose(np.asarray(segs)[:, 1, 1], 0.5)
    lab = labels(fig, "input")
    pos = g.space("input").positions
    assert len(lab) == 64 and lab[9].get_position() == pytest.approx(tuple(pos[9].tolist()))
    assert (tmp_path / "net3d.png").stat().st_size > 0


def test_draw_into_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert draw_connectivity(mlp_graph(), ax=ax) is fig
    with pytest.raises(ValueError, match="3-D axes"):
        draw_connectivity(mlp_graph({"input": "grid:2x2"}), ax=fig.add_subplot(2, 1, 2))


def test_import_and_draw_leave_pyplot_alone(tmp_path):
    code = (
        "import sys, matplotlib; b = matplotlib.get_backend.__module__;"
        "import torch.nn as nn; from topotorch.graph import SpatialGraph; import topotorch.visualize as v;"
        "g = SpatialGraph.from_chain(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)));"
        f"v.draw_connectivity(g, path={str(tmp_path / 'p.png')!r});"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- animation --------------------------------------------------------------------------------
def trained_snapshots(g: SpatialGraph, n: int) -> list[Snapshot]:
    opt = torch.optim.SGD(g.model.parameters(), lr=0.1)
    x = torch.randn(32, 4)
    snaps = []
    for step in range(n):
        loss = g.model(x).pow(2).mean() + 1e-2 * sum(p.abs().sum() for p in g.model.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
        snaps.append(take_snapshot(g, step))
    return snaps


def test_render_animation_gif_frames(tmp_path):
    import imageio.v3 as iio

    g = mlp_graph()
    snaps = trained_snapshots(g, 7)
    n = render_animation(g, snaps, gif_path=tmp_path / "a.gif", fps=5, max_frames=4, figsize=(3, 2), dpi=50)
    assert n == 4
    frames = iio.imread(tmp_path / "a.gif", index=None)
    assert frames.shape[0] == 4 and frames.shape[1:3] == (100, 150)
    assert not np.array_equal(frames[0], frames[-1])


@pytest.mark.skipif(not ffmpeg_available(), reason="imageio-ffmpeg has no ffmpeg binary on this machine")
def test_render_animation_mp4(tmp_path):
    g = mlp_graph()
    snaps = trained_snapshots(g, 3)
    # odd pixel dimensions (151 x 101) are padded to even ones for yuv420p
    n = render_animation(g, snaps, mp4_path=tmp_path / "a.mp4", fps=5, figsize=(3.02, 2.02), dpi=50)
    assert n == 3
    assert (tmp_path / "a.mp4").stat().st_size > 0


def test_render_animation_needs_an_output():
    g = mlp_graph()
    with pytest.raises(ValueError, match="gif_path"):
        render_animation(g, [take_snapshot(g, 0)])
