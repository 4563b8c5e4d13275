"""Tests of the time-concatenated layers and the vector fields."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snopt._layers import ACTIVATIONS, ConcatConv2d, ConcatLinear, ConvField, MLPField


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_concat_linear_is_a_linear_of_t_and_x() -> None:
    layer = ConcatLinear(3, 5).double()
    assert isinstance(layer.linear, nn.Linear)
    assert layer.linear.in_features == 4
    x = torch.randn(7, 3, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    expected = x @ layer.linear.weight[:, 1:].T + 0.3 * layer.linear.weight[:, 0] + layer.linear.bias
    torch.testing.assert_close(layer(t, x), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(layer(0.0, x), layer(1.0, x))


def test_concat_linear_leading_dims_and_per_sample_time() -> None:
    layer = ConcatLinear(2, 4)
    assert layer(0.5, torch.randn(3, 6, 2)).shape == (3, 6, 4)
    x = torch.randn(4, 2)
    t = torch.tensor([0.0, 1.0, 2.0, 3.0])
    out = layer(t, x)
    for i in range(4):
        torch.testing.assert_close(out[i], layer(float(t[i]), x[i : i + 1])[0])
    with pytest.raises(ValueError, match="`t` must be a scalar"):
        layer(torch.zeros(3), x)


def test_concat_conv2d_is_a_conv_of_t_and_x() -> None:
    layer = ConcatConv2d(3, 6).double()
    assert isinstance(layer.conv, nn.Conv2d)
    assert layer.conv.in_channels == 4
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = layer(0.7, x)
    assert out.shape == (2, 6, 5, 5)
    expected = layer.conv(torch.cat([torch.full((2, 1, 5, 5), 0.7, dtype=torch.float64), x], dim=1))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(layer(0.0, x), layer(1.0, x))
    strided = ConcatConv2d(3, 2, kernel_size=3, stride=2, padding=1)
    assert strided(0.0, torch.randn(2, 3, 8, 8)).shape == (2, 2, 4, 4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_field_shapes_and_time(activation: str) -> None:
    field = MLPField(3, hidden=8, depth=2, activation=activation)
    assert len(field.layers) == 3
    assert all(isinstance(layer, ConcatLinear) for layer in field.layers)
    x = torch.randn(5, 3)
    assert field(0.0, x).shape == (5, 3)
    assert not torch.allclose(field(0.0, x), field(2.0, x))


def test_mlp_field_without_time_is_autonomous() -> None:
    field = MLPField(3, hidden=8, depth=1, time=False)
    assert all(type(layer) is nn.Linear for layer in field.layers)
    x = torch.randn(5, 3)
    torch.testing.assert_close(field(0.0, x), field(5.0, x))


def test_conv_field_keeps_shape_and_uses_time() -> None:
    field = ConvField(16, hidden=8)
    assert field.norm1.num_groups == 8 and field.norm2.num_groups == 16
    x = torch.randn(2, 16, 6, 6)
    assert field(0.0, x).shape == x.shape
    assert not torch.allclose(field(0.0, x), field(1.0, x))
    assert ConvField(48).norm1.num_groups == 24  # the largest divisor of 48 that is <= 32
    plain = ConvField(3, norm=False, activation="tanh")
    assert isinstance(plain.norm1, nn.Identity)
    assert plain(0.0, torch.randn(1, 3, 4, 4)).shape == (1, 3, 4, 4)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ConcatLinear(0, 3), "`in_features` must be a positive integer"),
        (lambda: ConcatLinear(2, 2.5), "`out_features` must be a positive integer"),
        (lambda: ConcatLinear(2, 2, bias=1), "`bias` must be True or False"),
        (lambda: ConcatConv2d(True, 3), "`in_channels` must be a positive integer"),
        (lambda: ConcatConv2d(3, 3, kernel_size=0), "`kernel_size` must be a positive integer"),
        (lambda: ConcatConv2d(3, 3, stride=-1), "`stride` must be a positive integer"),
        (lambda: ConcatConv2d(3, 3, padding=-1), r"`padding` must be an integer >= 0, but got padding=-1"),
        (lambda: MLPField(0), "`dim` must be a positive integer, but got dim=0"),
        (lambda: MLPField(2, hidden=0), "`hidden` must be a positive integer"),
        (lambda: MLPField(2, depth=0), "`depth` must be a positive integer"),
        (lambda: MLPField(2, activation="gelu"), r"`activation` must be one of \['tanh'"),
        (lambda: MLPField(2, time="yes"), "`time` must be True or False"),
        (lambda: ConvField(0), "`channels` must be a positive integer"),
        (lambda: ConvField(4, hidden=-2), "`hidden` must be a positive integer"),
        (lambda: ConvField(4, activation="swish"), "`activation` must be one of"),
        (lambda: ConvField(4, norm=None), "`norm` must be True or False"),
    ],
)
def test_invalid_arguments(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_conv_layer_rejects_non_image_input() -> None:
    with pytest.raises(ValueError, match="`x` must have shape"):
        ConcatConv2d(3, 3)(0.0, torch.randn(2, 3))
