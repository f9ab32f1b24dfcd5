"""Layouts (line / grid / circle / square), make_layout resolution and errors, pairwise distances."""

import math

import pytest
import torch

from topotorch.geometry import as_plane, circle, grid, line, make_layout, pairwise_distance, square_grid


# -- line -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 7, 20])
def test_line_is_cell_centres_of_unit_interval(n):
    pos = line(n)
    assert pos.shape == (n, 1)
    assert pos.dtype == torch.float64
    expected = torch.tensor([[(2 * j + 1) / (2 * n)] for j in range(n)], dtype=torch.float64)
    assert torch.equal(pos, expected)


def test_line_four_documented_values():
    assert line(4).flatten().tolist() == [0.125, 0.375, 0.625, 0.875]


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4"])
def test_line_rejects_bad_counts(bad):
    with pytest.raises(ValueError):
        line(bad)


# -- grid -----------------------------------------------------------------------------------------
def test_grid_shape_and_row_major_centres():
    g = grid(2, 3)
    assert g.shape == (6, 2)
    assert g.dtype == torch.float64
    # (x, y) = (column centre, row centre), row-major
    expected = [[(2 * c + 1) / 6, (2 * r + 1) / 4] for r in range(2) for c in range(3)]
    assert torch.allclose(g, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


def test_grid_square_default_and_8x8():
    g = grid(8)
    assert g.shape == (64, 2)
    assert torch.equal(g, grid(8, 8))
    centres = sorted(set(g[:, 0].tolist()))
    assert centres == [(2 * k + 1) / 16 for k in range(8)]
    # every (x, y) combination occurs exactly once
    assert len({tuple(p) for p in g.tolist()}) == 64
    # index r*8+c is row r, column c
    assert g[8 * 3 + 5].tolist() == [11 / 16, 7 / 16]


def test_grid_rejects_bad_counts():
    with pytest.raises(ValueError):
        grid(0, 3)
    with pytest.raises(ValueError):
        grid(3, 0)


def test_square_grid_is_most_square_factorisation():
    assert torch.equal(square_grid(12), grid(3, 4))
    assert torch.equal(square_grid(100), grid(10, 10))
    assert torch.equal(square_grid(7), grid(1, 7))  # prime: a single row


# -- circle ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 10])
def test_circle_radius_quarter_around_centre(n):
    c = circle(n)
    assert c.shape == (n, 2)
    assert c.dtype == torch.float64
    r = (c - 0.5).pow(2).sum(1).sqrt()
    assert torch.allclose(r, torch.full((n,), 0.25, dtype=torch.float64), rtol=0, atol=1e-15)
    # evenly spaced angles starting at angle 0, i.e. the point (0.75, 0.5)
    ang = torch.atan2(c[:, 1] - 0.5, c[:, 0] - 0.5) % (2 * math.pi)
    expected = torch.tensor([2 * math.pi * k / n for k in range(n)], dtype=torch.float64)
    assert torch.allclose(ang, expected, rtol=0, atol=1e-12)
    assert torch.allclose(c[0], torch.tensor([0.75, 0.5], dtype=torch.float64), rtol=0, atol=1e-15)


def test_circle_custom_radius_and_centre():
    c = circle(6, radius=0.1, centre=(0.2, 0.7))
    r = (c - torch.tensor([0.2, 0.7], dtype=torch.float64)).pow(2).sum(1).sqrt()
    assert torch.allclose(r, torch.full((6,), 0.1, dtype=torch.float64), rtol=0, atol=1e-15)


# -- make_layout ----------------------------------------------------------------------------------
def test_make_layout_names():
    assert torch.equal(make_layout(None, 5), line(5))
    assert torch.equal(make_layout("line", 5), line(5))
    assert torch.equal(make_layout("circle", 10), circle(10))
    assert torch.equal(make_layout("grid:8x8", 64), grid(8, 8))
    assert torch.equal(make_layout("grid:4x5", 20), grid(4, 5))  # H rows x W columns
    assert torch.equal(make_layout("grid:4X5", 20), grid(4, 5))
    assert torch.equal(make_layout("grid", 12), square_grid(12))
    assert torch.equal(make_layout("square", 12), square_grid(12))


def test_make_layout_grid_hxw_orientation():
    pos = make_layout("grid:2x3", 6)
    # 2 rows, 3 columns: 3 distinct x values, 2 distinct y values
    assert len(set(pos[:, 0].tolist())) == 3
    assert len(set(pos[:, 1].tolist())) == 2


@pytest.mark.parametrize("spec", ["grid:8", "grid:8x", "grid:axb", "grid:2x3x4", "grid:x8"])
def test_make_layout_bad_grid_spec(spec):
    with pytest.raises(ValueError, match="grid"):
        make_layout(spec, 64)


def test_make_layout_grid_wrong_count():
    with pytest.raises(ValueError, match="holds 64 neurons but the layer has 63"):
        make_layout("grid:8x8", 63)


def test_make_layout_unknown_name():
    with pytest.raises(ValueError, match="unknown layout"):
        make_layout("hexagon", 10)


def test_make_layout_user_coordinates():
    pts = torch.rand(5, 2, dtype=torch.float32)
    pos = make_layout(pts, 5)
    assert pos.dtype == torch.float64
    assert torch.equal(pos, pts.double())
    pts[0, 0] = 99.0  # the layout is a copy: later edits to the user's tensor do not leak in
    assert pos[0, 0] != 99.0
    one_d = make_layout(torch.tensor([0.1, 0.2, 0.3]), 3)
    assert one_d.shape == (3, 1)


@pytest.mark.parametrize("shape", [(4, 2), (6, 2), (5, 3), (5, 0), (5, 2, 1), ()])
def test_make_layout_bad_user_coordinates_shape(shape):
    with pytest.raises(ValueError, match="user coordinates"):
        make_layout(torch.rand(shape), 5)


def test_make_layout_rejects_non_spec_types():
    with pytest.raises(TypeError):
        make_layout(5, 5)


# -- distances ------------------------------------------------------------------------------------
def test_pairwise_distance_line_l1_equals_l2():
    a, b = line(3), line(4)
    d1, d2 = pairwise_distance(a, b, "l1"), pairwise_distance(a, b, "l2")
    assert d1.shape == (3, 4)
    expected = torch.tensor(
        [[abs((2 * i + 1) / 6 - (2 * j + 1) / 8) for j in range(4)] for i in range(3)], dtype=torch.float64
    )
    assert torch.allclose(d1, expected, rtol=0, atol=1e-15)
    assert torch.allclose(d2, expected, rtol=0, atol=1e-15)


def test_pairwise_distance_plane_l1_l2():
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.3, 0.4], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(
        pairwise_distance(a, b, "l1"), torch.tensor([[0.7, 0.0, 1.0], [1.3, 2.0, 1.0]], dtype=torch.float64), atol=1e-15
    )
    assert torch.allclose(
        pairwise_distance(a, b, "l2"),
        torch.tensor([[0.5, 0.0, 1.0], [math.hypot(0.7, 0.6), math.sqrt(2), 1.0]], dtype=torch.float64),
        atol=1e-15,
    )
    assert torch.equal(pairwise_distance(a, b), pairwise_distance(a, b, "l1"))  # l1 is the default


def test_pairwise_distance_mixed_line_and_plane():
    """A 1-D line meeting a 2-D layer sits at y = 0.5."""
    a = torch.tensor([[0.1], [0.9]], dtype=torch.float64)
    b = torch.tensor([[0.4, 0.1], [0.1, 0.5]], dtype=torch.float64)
    l1 = pairwise_distance(a, b, "l1")
    l2 = pairwise_distance(a, b, "l2")
    exp_l1 = [[0.3 + 0.4, 0.0], [0.5 + 0.4, 0.8]]
    exp_l2 = [[0.5, 0.0], [math.hypot(0.5, 0.4), 0.8]]
    assert torch.allclose(l1, torch.tensor(exp_l1, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(l2, torch.tensor(exp_l2, dtype=torch.float64), atol=1e-15)
    # symmetric: the other order gives the transpose
    assert torch.allclose(pairwise_distance(b, a, "l1"), l1.T, atol=0)
    assert torch.equal(as_plane(a), torch.tensor([[0.1, 0.5], [0.9, 0.5]], dtype=torch.float64))
    assert torch.equal(as_plane(b), b)


def test_pairwise_distance_unknown_metric():
    with pytest.raises(ValueError, match="metric"):
        pairwise_distance(line(2), line(2), "linf")
