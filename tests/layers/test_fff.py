"""FFF and UltraFFF: hard inference equals the soft forward with rounded decisions, shapes, errors, peer parity."""

import math

import pytest
import torch
from torch import nn

from topotorch.layers import FFF, UltraFFF, bernoulli_entropy, fff_layers, hardening_loss
from topotorch.layers._cpu_kernel import kernel

IMPLS = ("auto", "gather", "grouped") + (("kernel",) if kernel() is not None else ())


def _layer(depth, i=12, l=3, o=5, seed=0, **kw):
    torch.manual_seed(seed)
    return FFF(i, l, o, depth, **kw)


@pytest.mark.parametrize("depth", range(13))
def test_hard_equals_soft_with_rounded_decisions(depth):
    layer = _layer(depth).eval()
    x = torch.randn(48, 12)
    with torch.no_grad():
        ref = layer.soft_forward(x, hard_decisions=True)
        assert torch.equal(layer.mixture(x, hard_decisions=True).sum(1), torch.ones(48))  # one-hot
        for impl in IMPLS:
            layer.hard_impl = impl
            assert (layer(x) - ref).abs().max() <= 1e-6, impl
        for impl in ("auto", "gather"):  # the batch-1 paths (kernel, host walk)
            layer.hard_impl = impl
            assert (layer(x[:1]) - ref[:1]).abs().max() <= 1e-6
        assert torch.equal(layer.route(x), layer.mixture(x, hard_decisions=True).argmax(1))


def test_grouped_path_is_chosen_for_large_batches_and_agrees():
    layer = _layer(2).eval()
    x = torch.randn(200, 12)  # 50 samples per leaf: grouped bmm path under "auto"
    with torch.no_grad():
        auto = layer(x)
        layer.hard_impl = "gather"
        assert (auto - layer(x)).abs().max() <= 1e-6
        assert (auto - layer.soft_forward(x, hard_decisions=True)).abs().max() <= 1e-6


def test_route_follows_the_sign_rule_by_hand():
    layer = _layer(2, i=2, l=1, o=1)
    with torch.no_grad():
        layer.node_weights.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))  # root: x1, children: x2
        layer.node_biases.zero_()
    x = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0], [0.0, 0.0]])
    assert layer.route(x).tolist() == [0, 1, 2, 3, 3]  # >= 0 goes right


def test_soft_mixture_is_a_distribution_and_matches_path_products():
    layer = _layer(3)
    x = torch.randn(7, 12)
    mix = layer.mixture(x)
    assert torch.allclose(mix.sum(1), torch.ones(7))
    p = torch.sigmoid(x @ layer.node_weights.t() + layer.node_biases)
    # leaf 5 = binary 101: right at root (node 0), left at node 2, right at node 5
    assert torch.allclose(mix[:, 5], p[:, 0] * (1 - p[:, 2]) * p[:, 5])


def test_soft_forward_equals_explicit_mixture_of_leaves():
    layer = _layer(3, activation="gelu")
    x = torch.randn(9, 12)
    mix = layer.mixture(x)
    leaves = torch.stack(
        [
            layer.activation(x @ layer.w1s[j] + layer.b1s[j]) @ layer.w2s[j] + layer.b2s[j]
            for j in range(layer.n_leaves)
        ],
        1,
    )
    assert torch.allclose(layer(x), (mix.unsqueeze(2) * leaves).sum(1), atol=1e-6)


def test_depth_zero_is_a_plain_feedforward_in_both_modes():
    layer = _layer(0)
    x = torch.randn(4, 12)
    ff = torch.relu(x @ layer.w1s[0] + layer.b1s[0]) @ layer.w2s[0] + layer.b2s[0]
    assert layer.n_nodes == 0 and layer.n_leaves == 1
    assert torch.allclose(layer.train()(x), ff, atol=1e-6)
    assert torch.allclose(layer.eval()(x), ff, atol=1e-6)
    assert torch.equal(layer.route(x), torch.zeros(4, dtype=torch.long))
    assert hardening_loss(layer.train(), 3.0).item() == 0.0


@pytest.mark.parametrize("training", [True, False])
def test_empty_batches_and_leading_dims(training):
    layer = _layer(3).train(training)
    assert layer(torch.randn(0, 12)).shape == (0, 5)
    assert layer(torch.randn(2, 0, 12)).shape == (2, 0, 5)
    x = torch.randn(2, 3, 12)
    y = layer(x)
    assert y.shape == (2, 3, 5)
    with torch.no_grad():
        assert torch.allclose(y, layer(x.reshape(6, 12)).reshape(2, 3, 5), atol=1e-6)
    assert layer.route(x).shape == (2, 3)
    assert layer(torch.randn(12)).shape == (5,)  # a single unbatched sample


def test_wrong_input_width_names_the_expected_width():
    layer = _layer(2)
    for mode in (True, False):
        with pytest.raises(ValueError, match=r"\(\.\.\., 12\)"):
            layer.train(mode)(torch.randn(4, 13))
    with pytest.raises(ValueError, match="12"):
        layer.route(torch.randn(3, 7))
    with pytest.raises(ValueError, match="input_width"):
        UltraFFF(8, 4, 2)(torch.randn(2, 9))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(depth=-1),
        dict(depth=1.5),
        dict(leaf_width=0),
        dict(region_leak=2.0),
        dict(dropout=-0.1),
        dict(hard_impl="fast"),
    ],
)
def test_bad_constructor_arguments(kwargs):
    args = dict(input_width=4, leaf_width=2, output_width=3, depth=2) | kwargs
    with pytest.raises(ValueError):
        FFF(**args)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 0.05)])
def test_dtypes(dtype, tol):
    torch.manual_seed(0)
    layer = FFF(12, 3, 5, 4, dtype=dtype).eval()
    x = torch.randn(16, 12, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        assert y.dtype == dtype
        ref = layer.soft_forward(x, hard_decisions=True)
    assert (y.float() - ref.float()).abs().max() <= tol
    assert layer.train()(x).dtype == dtype


def test_entropies_and_hardening_loss_have_gradients():
    layer = _layer(3).train()
    net = nn.Sequential(nn.Linear(12, 12), layer)
    x = torch.randn(32, 12)
    _y, ent = layer(x, return_entropies=True)
    assert ent.shape == (7,) and (ent >= 0).all() and (ent <= math.log(2) + 1e-6).all()
    net(x)
    loss = hardening_loss(net, h=3.0)
    assert torch.allclose(loss, 3.0 * layer.last_entropies.sum())
    loss.backward()
    assert layer.node_weights.grad.abs().sum() > 0
    assert fff_layers(net) == [("1", layer)]
    with pytest.raises(ValueError, match="soft"):
        layer.eval()(x, return_entropies=True)


def test_bernoulli_entropy_is_stable():
    z = torch.tensor([0.0, 1.0, -1.0, 200.0, -200.0])
    h = bernoulli_entropy(z)
    p = torch.sigmoid(z[:3])
    assert torch.allclose(h[:3], -p * p.log() - (1 - p) * (1 - p).log())
    assert torch.isfinite(h).all() and h[3] < 1e-30 and h[4] < 1e-30


def test_hardening_lowers_node_entropy():
    torch.manual_seed(0)
    layer = FFF(2, 2, 1, 3)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(256, 2)
    layer(x)
    before = layer.last_entropies.sum().item()
    for _ in range(60):
        loss = layer(x).square().mean() + hardening_loss(layer, h=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert layer.last_entropies.sum().item() < 0.5 * before


def test_region_leak_swaps_decisions_only_in_training():
    layer = _layer(4, region_leak=1.0)  # always swap p <-> 1-p: every node decides the other way
    x = torch.randn(20, 12)
    flipped = _layer(4)
    with torch.no_grad():
        flipped.node_weights.neg_()
        flipped.node_biases.neg_()
        mix = layer.train().mixture(x, hard_decisions=True)
        assert torch.equal(mix.argmax(1), flipped.route(x))
        assert not torch.equal(mix.argmax(1), layer.route(x))
        assert torch.equal(layer.eval().mixture(x, hard_decisions=True).argmax(1), layer.route(x))
    half = _layer(4, region_leak=0.3).train()
    torch.manual_seed(1)
    a = half.mixture(x, hard_decisions=True).argmax(1)
    assert not torch.equal(a, half.route(x))  # some decisions leaked


def test_train_hardened_forward_is_hard_with_straight_through_gradients():
    layer = _layer(3, train_hardened=True).train()
    x = torch.randn(16, 12)
    y = layer(x)
    with torch.no_grad():
        assert (y - layer.eval().hard_forward(x)).abs().max() <= 1e-6
    y.square().sum().backward()
    assert layer.node_weights.grad.abs().sum() > 0  # straight-through reaches the nodes


def test_dropout_only_in_training():
    layer = _layer(2, dropout=0.5)
    x = torch.randn(64, 12)
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), layer.eval()(x))
        layer.train()
        torch.manual_seed(0)
        a = layer(x)
        torch.manual_seed(1)
        assert not torch.equal(a, layer(x))


def test_flops_and_training_width():
    layer = FFF(768, 8, 768, 9)
    assert layer.training_width == 4096
    assert layer.flops_per_sample(hard=True) == 9 * 768 + 8 * 1536
    assert layer.flops_per_sample(hard=False) == 511 * 768 + 4096 * 1536


def test_ultra_hard_equals_masked_dense_and_uses_path_neurons():
    torch.manual_seed(0)
    u = UltraFFF(12, 5, depth=4, n_trees=3, bias=True)
    with torch.no_grad():
        u.b_in.normal_()
        u.b_out.normal_()
    x = torch.randn(40, 12)
    with torch.no_grad():
        dense = u.train()(x)
        assert (u.eval()(x) - dense).abs().max() <= 1e-5
        path = u.path(x)
    assert path.shape == (40, 3, 5) and u.n_nodes == 31 and u.training_width == 93
    # the path descends one level per step within each tree's block of neurons
    local = path - torch.arange(3).view(1, 3, 1) * 31
    assert (local[..., 0] == 0).all() and ((local[..., 1:] - 1) // 2 == local[..., :-1]).all()
    assert u.eval()(torch.randn(0, 12)).shape == (0, 5) and u.eval()(torch.randn(2, 3, 12)).shape == (2, 3, 5)


def test_ultra_depth_zero_and_gradients():
    u = UltraFFF(6, 4, depth=0)
    x = torch.randn(5, 6)
    ref = torch.nn.functional.gelu(x @ u.w_in[0, 0]).unsqueeze(1) * u.w_out[0, 0]
    assert torch.allclose(u.train()(x), ref, atol=1e-6)
    assert torch.allclose(u.eval()(x), ref, atol=1e-6)
    u.train()(x).sum().backward()
    assert u.w_in.grad.abs().sum() > 0


def test_peer_parity_once_its_missing_leaf_output_bias_is_added():
    peer_mod = pytest.importorskip(
        "fastfeedforward", reason="peer package not installed (pip install fastfeedforward==0.2.1 --no-deps)"
    )
    torch.manual_seed(0)
    for depth in (1, 3, 6):
        peer = peer_mod.FFF(10, 4, 6, depth)
        ours = FFF.from_peer(peer)
        x = torch.randn(50, 10)
        with torch.no_grad():
            leaf = ours.eval().route(x)
            # the peer's eval forgets b2s; everything else matches (every hard path)
            for impl in IMPLS:
                ours.hard_impl = impl
                assert (ours(x) - (peer.eval()(x) + peer.b2s[leaf])).abs().max() <= 1e-6, impl
            assert (ours.train()(x) - peer.train()(x)).abs().max() <= 1e-5  # soft forward
        _y, ent = peer.train()(x, return_entropies=True)
        _, ours_ent = ours(x, return_entropies=True)
        assert torch.allclose(ent, ours_ent, atol=1e-5)


@pytest.mark.parametrize("depth", [0, 3, 6, 11])
@pytest.mark.parametrize("bias", [False, True])
def test_ultra_batch_one_path_equals_masked_dense(depth, bias):
    torch.manual_seed(depth)
    u = UltraFFF(12, 5, depth, bias=bias).eval()
    if bias:
        with torch.no_grad():
            u.b_in.normal_()
            u.b_out.normal_()
    x = torch.randn(4, 12)
    with torch.no_grad():
        ref = u.dense_forward(x)
        for i in range(4):  # each sample alone takes the batch-1 host-walk path
            assert (u(x[i : i + 1]) - ref[i : i + 1]).abs().max() <= 1e-6


def test_ultra_batch_one_keeps_gradients_when_enabled():
    torch.manual_seed(0)
    u = UltraFFF(8, 3, 7).eval()
    x = torch.randn(1, 8)
    u(x).sum().backward()
    assert u.w_in.grad.abs().sum() > 0 and u.w_out.grad.abs().sum() > 0
    with torch.no_grad():
        assert (u(x) - u.dense_forward(x)).abs().max() <= 1e-6


def test_sharpness_scales_soft_decisions_only():
    layer = _layer(3).train()
    x = torch.randn(9, 12)
    with torch.no_grad():
        z = x @ layer.node_weights.t() + layer.node_biases
        layer.sharpness = 5.0
        mix = layer.mixture(x)
        p = torch.sigmoid(5.0 * z)
        assert torch.allclose(mix[:, 5], p[:, 0] * (1 - p[:, 2]) * p[:, 5], atol=1e-6)
        hard = layer.eval()(x)
        layer.sharpness = 1.0
        assert torch.equal(hard, layer(x))  # the hard forward ignores it


def test_trained_layer_deepcopies_and_pickles():
    import copy
    import pickle

    layer = _layer(2).train()
    layer(torch.randn(4, 12)).sum().backward()  # last_entropies now holds a graph
    twin = copy.deepcopy(layer)
    assert twin.last_entropies is None and layer.last_entropies is not None
    assert torch.equal(pickle.loads(pickle.dumps(layer)).w1s, layer.w1s)
