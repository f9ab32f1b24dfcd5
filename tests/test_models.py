"""Convenience models (topotorch.models): MLP and the folded-embedding TokenMLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from topotorch.graph import SpatialGraph
from topotorch.models import ACTIVATIONS, MLP, TokenMLP, activation


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_mlp_layer_widths_and_activation_placement():
    net = MLP([4, 20, 7, 2], activation="tanh")
    assert net.widths == [4, 20, 7, 2]
    assert [(l.in_features, l.out_features) for l in linears(net)] == [(4, 20), (20, 7), (7, 2)]
    kinds = [type(m) for m in net]
    # Linear, act, Linear, act, Linear: an activation between layers, none after the last
    assert kinds == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]
    assert net(torch.zeros(5, 4)).shape == (5, 2)


def test_mlp_default_activation_is_silu_and_bias_switch():
    net = MLP([3, 5, 1])
    assert isinstance(net[1], nn.SiLU)
    assert all(l.bias is not None for l in linears(net))
    nobias = MLP([3, 5, 1], bias=False)
    assert all(l.bias is None for l in linears(nobias))
    # a single layer: no activation at all
    single = MLP([3, 2], activation="relu")
    assert len(single) == 1 and isinstance(single[0], nn.Linear)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_named_activation_is_used(name):
    net = MLP([2, 3, 1], activation=name)
    assert isinstance(net[1], ACTIVATIONS[name])
    assert isinstance(activation(name), ACTIVATIONS[name])


def test_activation_computes_what_its_name_says():
    x = torch.linspace(-2, 2, 9)
    torch.testing.assert_close(activation("relu")(x), x.clamp(min=0))
    torch.testing.assert_close(activation("silu")(x), x * torch.sigmoid(x))
    torch.testing.assert_close(activation("identity")(x), x)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*silu.*relu"):
        activation("swish")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        MLP([2, 3, 1], activation="swish")


@pytest.mark.parametrize("widths", [[4], [], [4, 0, 2], [4, -1]])
def test_mlp_rejects_bad_widths(widths):
    with pytest.raises(ValueError, match="at least two positive widths"):
        MLP(widths)


def test_token_mlp_forward_shape_and_computation():
    torch.manual_seed(0)
    net = TokenMLP(vocab=11, embed_dim=6, n_tokens=2, widths=[8, 11])
    tokens = torch.tensor([[0, 3], [10, 10], [5, 1]])
    out = net(tokens)
    assert out.shape == (3, 11)
    # concatenated token embeddings go through the MLP
    manual = net.mlp(torch.cat([net.embedding.weight[tokens[:, 0]], net.embedding.weight[tokens[:, 1]]], 1))
    torch.testing.assert_close(out, manual)
    assert net.mlp.widths == [12, 8, 11]


@pytest.mark.parametrize("shape", [(4,), (4, 3), (4, 1), (4, 2, 1)])
def test_token_mlp_wrong_input_shape_names_expected_shape(shape):
    net = TokenMLP(vocab=5, embed_dim=3, n_tokens=2, widths=[4, 5])
    with pytest.raises(ValueError, match=r"expects \(batch, 2\) token ids, got shape"):
        net(torch.zeros(shape, dtype=torch.long))


def test_token_mlp_is_folded_by_from_chain():
    net = TokenMLP(vocab=7, embed_dim=4, n_tokens=3, widths=[5, 7])
    g = SpatialGraph.from_chain(net)
    names = [s.name for s in g.spaces]
    assert names == ["tokens", "embed", "hidden1", "output"]
    assert g.space("embed").size == 4  # one neuron per embedding dimension, shared by the 3 tokens
    assert g.space("tokens").positions is None
