"""Time-dependent layers and vector fields for ODE blocks.

The curvature code hooks ``nn.Linear`` and ``nn.Conv2d`` submodules, so the
time-concatenated layers here are thin wrappers around a plain inner ``nn.Linear``
(:attr:`ConcatLinear.linear`) or ``nn.Conv2d`` (:attr:`ConcatConv2d.conv`) whose first
input feature / channel is the time ``t``.  Every vector field is an ``nn.Module``
called as ``field(t, x)``, the signature :class:`~snopt._ode.ODEBlock` expects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._checks import flag, integer

TimeLike = Tensor | float

#: Activation names accepted by the vector fields, with their module factories.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
}
ACTIVATIONS = tuple(_ACTIVATIONS)


def _make_activation(activation: str) -> nn.Module:
    """A fresh activation module for a name in :data:`ACTIVATIONS`."""
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"`activation` must be one of {list(ACTIVATIONS)}, but got activation={activation!r}."
        )
    return _ACTIVATIONS[activation]()


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups <= 32 that divides ``channels``."""
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _time_column(t: TimeLike, like: Tensor) -> Tensor:
    """``t`` as a tensor broadcastable against ``like`` with one trailing feature.

    ``t`` may be a Python number, a 0-d (or one-element) tensor, or a tensor with one
    time per sample (shape ``[batch]``).  The result has shape ``like.shape[:-1] + (1,)``.
    """
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    shape = (*like.shape[:-1], 1)
    if t.numel() == 1:
        return t.reshape(()).expand(shape)
    if like.dim() >= 2 and t.shape == like.shape[:1]:
        return t.reshape(-1, *([1] * (like.dim() - 1))).expand(shape)
    raise ValueError(
        f"`t` must be a scalar or have one entry per sample (shape {tuple(like.shape[:1])}), "
        f"but got t of shape {tuple(t.shape)}."
    )


class ConcatLinear(nn.Module):
    """A linear layer of ``[t, x]``: time enters as one extra input feature.

    Args:
        in_features: size of the last dimension of ``x`` (>= 1).
        out_features: size of the output (>= 1).
        bias: whether the inner linear layer has a bias.

    Attributes:
        linear: the inner ``nn.Linear(in_features + 1, out_features)``; its first input
            column multiplies ``t``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = integer("in_features", in_features)
        self.out_features = integer("out_features", out_features)
        self.linear = nn.Linear(self.in_features + 1, self.out_features, bias=flag("bias", bias))

    def forward(self, t: TimeLike, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            t: time, a scalar or one time per sample.
            x: input of shape ``[..., in_features]``.

        Returns:
            Tensor of shape ``[..., out_features]``.
        """
        return self.linear(torch.cat([_time_column(t, x), x], dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class ConcatConv2d(nn.Module):
    """A 2-d convolution of ``[t, x]``: time enters as one extra constant input channel.

    Args:
        in_channels: channels of ``x`` (>= 1).
        out_channels: channels of the output (>= 1).
        kernel_size: square kernel size (>= 1).
        stride: stride (>= 1).
        padding: zero padding (>= 0); the defaults keep the spatial shape.
        bias: whether the inner convolution has a bias.

    Attributes:
        conv: the inner ``nn.Conv2d(in_channels + 1, out_channels, ...)``; its first input
            channel is ``t``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = integer("in_channels", in_channels)
        self.out_channels = integer("out_channels", out_channels)
        self.conv = nn.Conv2d(
            self.in_channels + 1,
            self.out_channels,
            kernel_size=integer("kernel_size", kernel_size),
            stride=integer("stride", stride),
            padding=integer("padding", padding, low=0),
            bias=flag("bias", bias),
        )

    def forward(self, t: TimeLike, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            t: time, a scalar or one time per sample.
            x: input of shape ``[batch, in_channels, height, width]``.

        Returns:
            Tensor of shape ``[batch, out_channels, height', width']``.
        """
        if x.dim() != 4:
            raise ValueError(
                f"`x` must have shape [batch, channels, height, width], but got {tuple(x.shape)}."
            )
        b, _, h, w = x.shape
        tt = _time_column(t, x.reshape(b, -1)).reshape(b, 1, 1, 1).expand(b, 1, h, w)
        return self.conv(torch.cat([tt, x], dim=1))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"


class MLPField(nn.Module):
    """A multilayer-perceptron vector field ``f(t, x)`` on ``R^dim``.

    ``depth`` hidden layers of width ``hidden``: ``dim -> hidden -> ... -> hidden -> dim``
    (``depth + 1`` linear layers), with the activation between them and none at the end.

    Args:
        dim: dimension of the state (>= 1).
        hidden: width of the hidden layers (>= 1).
        depth: number of hidden layers (>= 1).
        activation: one of ``"tanh"``, ``"softplus"``, ``"relu"``, ``"elu"``, ``"sigmoid"``.
        time: use :class:`ConcatLinear` layers, so the field depends on ``t``; with False
            the layers are plain ``nn.Linear`` and the field is autonomous.

    Attributes:
        layers: the ``nn.ModuleList`` of linear layers.
    """

    def __init__(
        self, dim: int, hidden: int = 64, depth: int = 2, activation: str = "tanh", time: bool = True
    ) -> None:
        super().__init__()
        self.dim = integer("dim", dim)
        self.hidden = integer("hidden", hidden)
        self.depth = integer("depth", depth)
        self.time = flag("time", time)
        self.activation = _make_activation(activation)
        sizes = [self.dim] + [self.hidden] * self.depth + [self.dim]
        layer = ConcatLinear if self.time else nn.Linear
        self.layers = nn.ModuleList(layer(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, t: TimeLike, x: Tensor) -> Tensor:
        """Evaluate the field.

        Args:
            t: time, a scalar or one time per sample (ignored when ``time=False``).
            x: state of shape ``[..., dim]``.

        Returns:
            ``dx/dt``, same shape as ``x``.
        """
        for i, layer in enumerate(self.layers):
            x = layer(t, x) if self.time else layer(x)
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x


class ConvField(nn.Module):
    """A convolutional vector field ``f(t, x)`` on feature maps; keeps the shape of ``x``.

    ``ConcatConv2d -> GroupNorm -> activation -> ConcatConv2d -> GroupNorm`` with 3x3
    kernels.  GroupNorm uses the largest number of groups <= 32 that divides the channels.

    Args:
        channels: channels of the state (>= 1).
        hidden: channels after the first convolution (>= 1); defaults to ``channels``.
        activation: one of ``"tanh"``, ``"softplus"``, ``"relu"``, ``"elu"``, ``"sigmoid"``.
        norm: whether to apply the GroupNorm layers.
    """

    def __init__(
        self, channels: int, hidden: int | None = None, activation: str = "relu", norm: bool = True
    ) -> None:
        super().__init__()
        self.channels = integer("channels", channels)
        self.hidden = self.channels if hidden is None else integer("hidden", hidden)
        self.norm = flag("norm", norm)
        self.conv1 = ConcatConv2d(self.channels, self.hidden)
        self.norm1 = _group_norm(self.hidden) if self.norm else nn.Identity()
        self.activation = _make_activation(activation)
        self.conv2 = ConcatConv2d(self.hidden, self.channels)
        self.norm2 = _group_norm(self.channels) if self.norm else nn.Identity()

    def forward(self, t: TimeLike, x: Tensor) -> Tensor:
        """Evaluate the field.

        Args:
            t: time, a scalar or one time per sample.
            x: state of shape ``[batch, channels, height, width]``.

        Returns:
            ``dx/dt``, same shape as ``x``.
        """
        h = self.activation(self.norm1(self.conv1(t, x)))
        return self.norm2(self.conv2(t, h))
