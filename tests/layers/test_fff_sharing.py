"""Path-shared leaves: exact function preservation, path sums, gradients, merging back."""

import copy

import pytest
import torch
from torch.nn.utils import parametrize

from topotorch.layers import FFF, merge_shared_leaves, share_leaves
from topotorch.layers.fff_sharing import LEAF_PARAMETERS, PathSum


def _ancestors(leaf: int, depth: int) -> list[int]:
    """Heap positions on the root path of leaf ``leaf`` (root first, the leaf last)."""
    node, path = 2**depth - 1 + leaf, []
    while True:
        path.append(node)
        if node == 0:
            return path[::-1]
        node = (node - 1) // 2


@pytest.mark.parametrize("depth", [0, 1, 3, 5])
def test_path_sum_adds_the_offsets_of_each_leafs_ancestors(depth):
    g = torch.Generator().manual_seed(depth)
    offsets = torch.randn(2 ** (depth + 1) - 1, 3, 2, generator=g, dtype=torch.float64)
    got = PathSum(depth)(offsets)
    want = torch.stack([offsets[_ancestors(j, depth)].sum(0) for j in range(2**depth)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_right_inverse_round_trips_exactly():
    w = torch.randn(8, 4, 5, dtype=torch.float64)
    p = PathSum(3)
    assert torch.equal(p(p.right_inverse(w)), w)
    with pytest.raises(ValueError, match="expects 15 offsets"):
        p(torch.zeros(8, 4, 5))


@pytest.mark.parametrize("training", [True, False])
def test_sharing_and_merging_preserve_the_function(training):
    torch.manual_seed(0)
    layer = FFF(6, 3, 4, depth=3, dtype=torch.float64).train(training)
    x = torch.randn(17, 6, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        share_leaves(layer)
        assert all(parametrize.is_parametrized(layer, n) for n in LEAF_PARAMETERS)
        assert torch.equal(layer(x), before)
    with torch.no_grad():  # move the root offset: every leaf moves with it
        layer.parametrizations.b2s.original[0] += 0.5
        shifted = layer(x)
    torch.testing.assert_close(shifted, before + 0.5, rtol=0, atol=1e-12)
    merge_shared_leaves(layer)
    assert not parametrize.is_parametrized(layer)
    assert set(dict(layer.named_parameters())) == {"node_weights", "node_biases", *LEAF_PARAMETERS}
    with torch.no_grad():
        assert torch.equal(layer(x), shifted)


def test_root_offset_gradient_is_the_sum_of_the_leaf_gradients():
    torch.manual_seed(1)
    plain = FFF(5, 2, 3, depth=2, dtype=torch.float64).train()
    shared = share_leaves(FFF(5, 2, 3, depth=2, dtype=torch.float64).train())
    shared.load_state_dict(plain.state_dict(), strict=False)  # node weights
    with torch.no_grad():
        for n in LEAF_PARAMETERS:
            shared.parametrizations[n].original.copy_(PathSum(2).right_inverse(getattr(plain, n)))
    x = torch.randn(9, 5, dtype=torch.float64)
    plain(x).square().sum().backward()
    shared(x).square().sum().backward()
    for n in LEAF_PARAMETERS:
        g_offsets = shared.parametrizations[n].original.grad
        g_leaves = getattr(plain, n).grad
        torch.testing.assert_close(g_offsets[0], g_leaves.sum(0), rtol=0, atol=1e-12)  # root: all leaves
        torch.testing.assert_close(g_offsets[1], g_leaves[:2].sum(0), rtol=0, atol=1e-12)  # left child
        torch.testing.assert_close(g_offsets[3:], g_leaves, rtol=0, atol=1e-12)  # leaves: their own


def test_merged_layer_uses_the_kernel_path_again_and_bad_calls_are_clear():
    layer = share_leaves(FFF(8, 2, 3, depth=2))
    with pytest.raises(ValueError, match="already parametrised"):
        share_leaves(layer)
    with pytest.raises(ValueError, match="unknown leaf parameter"):
        share_leaves(FFF(8, 2, 3, depth=2), ["node_weights"])
    with pytest.raises(TypeError, match="expects an FFF"):
        share_leaves(torch.nn.Linear(2, 2))  # type: ignore[arg-type]  # the wrong type is the point
    x = torch.randn(4, 8)
    with torch.no_grad():
        shared_out = layer.eval()(x)  # parametrised weights also go through the hard path
        merge_shared_leaves(layer)
        torch.testing.assert_close(layer(x), shared_out, rtol=0, atol=1e-6)
    assert merge_shared_leaves(layer) is layer  # no-op on a plain layer


def test_a_trained_shared_layer_deepcopies():
    layer = share_leaves(FFF(6, 2, 3, depth=2)).train()
    x = torch.randn(5, 6)
    layer(x).sum().backward()  # leaves an autograd graph in last_entropies
    twin = copy.deepcopy(layer)
    assert twin.last_entropies is None and parametrize.is_parametrized(twin, "w1s")
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x))
