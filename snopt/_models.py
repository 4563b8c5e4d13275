"""Neural ODE models: classifiers, a continuous normalizing flow and an ODE-RNN.

Every model exposes its ODE blocks as ``blocks`` (an ``nn.ModuleList`` of
:class:`~snopt._ode.ODEBlock`), whose horizons ``t1`` are the control variables that
the training loop may tune.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._checks import integer
from ._layers import ConvField, MLPField, TimeLike, _group_norm
from ._ode import ODEBlock

#: Trace estimators accepted by :class:`CNFField` and :class:`CNF`.
TRACES = ("hutchinson", "exact")


def _solver_kwargs(
    t1: float, method: str, rtol: float, atol: float, adjoint: bool, options: dict[str, Any] | None
) -> dict[str, Any]:
    return dict(t0=0.0, t1=t1, method=method, rtol=rtol, atol=atol, adjoint=adjoint, options=options)


class ODEClassifier(nn.Module):
    """A classifier ``head(block_n(... block_1(stem(x))))`` with one or more ODE blocks.

    Build one with :meth:`for_images` or :meth:`for_vectors`, or pass your own parts.

    Args:
        stem: maps the input to the ODE state.
        blocks: one or more :class:`~snopt._ode.ODEBlock`, applied in order.
        head: maps the final state to logits.

    Attributes:
        stem: the stem module.
        blocks: ``nn.ModuleList`` of the ODE blocks.
        head: the head module.
    """

    def __init__(self, stem: nn.Module, blocks: Iterable[ODEBlock], head: nn.Module) -> None:
        super().__init__()
        for name, module in (("stem", stem), ("head", head)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"`{name}` must be an nn.Module, but got {type(module).__name__}.")
        blocks = list(blocks)
        if not blocks:
            raise ValueError("`blocks` must hold at least one ODEBlock, but got none.")
        for i, block in enumerate(blocks):
            if not isinstance(block, ODEBlock):
                raise TypeError(f"`blocks[{i}]` must be an ODEBlock, but got {type(block).__name__}.")
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    @classmethod
    def for_images(
        cls,
        in_channels: int,
        num_classes: int,
        *,
        width: int = 16,
        n_blocks: int = 1,
        pool: int = 4,
        t1: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = True,
        options: dict[str, Any] | None = None,
    ) -> ODEClassifier:
        """An image classifier: conv stem, ``n_blocks`` ODE blocks on :class:`ConvField`, pooled head.

        The head is GroupNorm, ReLU, adaptive average pooling to ``pool x pool``, flatten and
        a linear layer.  Pooling to a small grid rather than to one pixel keeps where the
        features are, which a shallow field on small images needs to learn in a few steps.

        Args:
            in_channels: channels of the input images (>= 1).
            num_classes: number of classes (>= 2).
            width: channels of the ODE state (>= 1).
            n_blocks: number of ODE blocks (>= 1).
            pool: side of the pooled feature grid of the head (>= 1).
            t1: horizon of every block (> 0).
            method: torchdiffeq method of every block.
            rtol: relative tolerance (> 0).
            atol: absolute tolerance (> 0).
            adjoint: use the adjoint method for the backward pass.
            options: torchdiffeq solver options.

        Returns:
            A model mapping ``[batch, in_channels, H, W]`` images to ``[batch, num_classes]`` logits.
        """
        in_channels = integer("in_channels", in_channels)
        num_classes = integer("num_classes", num_classes, low=2)
        width = integer("width", width)
        n_blocks = integer("n_blocks", n_blocks)
        pool = integer("pool", pool)
        stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), _group_norm(width), nn.ReLU())
        kwargs = _solver_kwargs(t1, method, rtol, atol, adjoint, options)
        blocks = [ODEBlock(ConvField(width), **kwargs) for _ in range(n_blocks)]
        head = nn.Sequential(
            _group_norm(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(),
            nn.Linear(width * pool * pool, num_classes),
        )
        return cls(stem, blocks, head)

    @classmethod
    def for_vectors(
        cls,
        in_features: int,
        num_classes: int,
        *,
        width: int = 32,
        n_blocks: int = 1,
        hidden: int | None = None,
        depth: int = 2,
        activation: str = "tanh",
        t1: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = True,
        options: dict[str, Any] | None = None,
    ) -> ODEClassifier:
        """A vector classifier: linear stem, ``n_blocks`` ODE blocks on :class:`MLPField`, linear head.

        Args:
            in_features: size of the input vectors (>= 1).
            num_classes: number of classes (>= 2).
            width: dimension of the ODE state (>= 1).
            n_blocks: number of ODE blocks (>= 1).
            hidden: hidden width of each field (>= 1); defaults to ``width``.
            depth: hidden layers of each field (>= 1).
            activation: activation of each field.
            t1: horizon of every block (> 0).
            method: torchdiffeq method of every block.
            rtol: relative tolerance (> 0).
            atol: absolute tolerance (> 0).
            adjoint: use the adjoint method for the backward pass.
            options: torchdiffeq solver options.

        Returns:
            A model mapping ``[batch, in_features]`` to ``[batch, num_classes]`` logits.
        """
        in_features = integer("in_features", in_features)
        num_classes = integer("num_classes", num_classes, low=2)
        width = integer("width", width)
        n_blocks = integer("n_blocks", n_blocks)
        hidden = width if hidden is None else hidden
        kwargs = _solver_kwargs(t1, method, rtol, atol, adjoint, options)
        blocks = [ODEBlock(MLPField(width, hidden, depth, activation), **kwargs) for _ in range(n_blocks)]
        return cls(nn.Linear(in_features, width), blocks, nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``x``.

        Args:
            x: a batch of inputs (batch dimension first).

        Returns:
            Tensor of shape ``[batch, num_classes]``.
        """
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _exact_trace(dz: Tensor, z: Tensor, create_graph: bool) -> Tensor:
    """Per-sample ``trace(d dz / d z)`` by one gradient per dimension (``z`` is ``[batch, dim]``)."""
    trace = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    if not dz.requires_grad:
        return trace
    for i in range(z.shape[1]):
        (grad,) = torch.autograd.grad(
            dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True, allow_unused=True
        )
        if grad is not None:
            trace = trace + grad[:, i]
    return trace


def _hutchinson_trace(dz: Tensor, z: Tensor, noise: Tensor, create_graph: bool) -> Tensor:
    """Per-sample Hutchinson estimate ``e^T (d dz / d z) e`` with one vector-Jacobian product."""
    if not dz.requires_grad:
        return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    (vjp,) = torch.autograd.grad((dz * noise).sum(), z, create_graph=create_graph, allow_unused=True)
    if vjp is None:
        return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    return (vjp * noise).reshape(z.shape[0], -1).sum(1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Log-density of the standard normal distribution, summed over all but the batch dimension.

    Args:
        z: points of shape ``[batch, ...]``.

    Returns:
        Tensor of shape ``[batch]``.
    """
    z = z.reshape(z.shape[0], -1)
    return -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi))


class CNFField(nn.Module):
    """The augmented field of a continuous normalizing flow on the state ``(z, delta)``.

    ``dz/dt = f(t, z)`` and ``d delta/dt = -trace(df/dz)``, so that integrating from data
    ``x`` at ``t0`` gives ``log p(x) = log p_base(z(t1)) - delta(t1)``.

    The trace is computed exactly, with one gradient per dimension, or estimated with
    Hutchinson's estimator ``e^T (df/dz) e`` for a Rademacher vector ``e``.  The noise is
    stored in :attr:`noise` so that the same ``e`` is used along the whole forward solve and
    the adjoint solve that follows it: call :meth:`sample_noise` before each forward solve
    (``CNF.log_prob`` does) and run the backward pass of one forward before the next.  When
    :attr:`noise` is unset or of the wrong shape, fresh noise is drawn at the first call.

    The inner gradients run under ``torch.enable_grad()``, so the field also works inside
    ``torch.no_grad()`` (then the results are detached).

    Args:
        field: the vector field ``f``, an ``nn.Module`` called as ``f(t, z)`` with ``z`` of
            shape ``[batch, dim]``.
        trace: ``"hutchinson"`` or ``"exact"``.
    """

    def __init__(self, field: nn.Module, trace: str = "hutchinson") -> None:
        super().__init__()
        if not isinstance(field, nn.Module):
            raise TypeError(
                f"`field` must be an nn.Module called as field(t, z), but got {type(field).__name__}."
            )
        if trace not in TRACES:
            raise ValueError(f"`trace` must be one of {list(TRACES)}, but got trace={trace!r}.")
        self.field = field
        self.trace = trace
        self.noise: Tensor | None = None

    def sample_noise(self, z: Tensor) -> Tensor:
        """Draw and store a Rademacher vector (entries +-1) shaped like ``z``; return it."""
        self.noise = (torch.randint(0, 2, z.shape, device=z.device) * 2 - 1).to(z.dtype)
        return self.noise

    def forward(self, t: TimeLike, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Evaluate the augmented field.

        Args:
            t: time.
            state: ``(z, delta)`` with shapes ``[batch, dim]`` and ``[batch]``.

        Returns:
            ``(dz/dt, d delta/dt)`` with the shapes of ``state``.
        """
        z = state[0]
        grad_on = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.field(t, z)
            if self.trace == "exact":
                div = _exact_trace(dz, z, create_graph=grad_on)
            else:
                noise = self.noise
                if noise is None or noise.shape != z.shape:
                    noise = self.sample_noise(z)
                div = _hutchinson_trace(dz, z, noise.to(dtype=z.dtype, device=z.device), create_graph=grad_on)
        if not grad_on:
            dz, div = dz.detach(), div.detach()
        return dz, -div


class CNF(nn.Module):
    """A continuous normalizing flow (FFJORD) on ``R^dim`` with a standard normal base.

    Data ``x`` at ``t0 = 0`` flows to ``z(t1)`` under ``dz/dt = f(t, z)``, an
    :class:`MLPField`; the change of variables gives
    ``log p(x) = log N(z(t1); 0, I) + integral_0^t1 trace(df/dz(t, z(t))) dt``.

    Args:
        dim: dimension of the data (>= 1).
        hidden: hidden width of the field (>= 1).
        depth: hidden layers of the field (>= 1).
        t1: horizon of the flow (> 0).
        trace: ``"hutchinson"`` (unbiased, one vector-Jacobian product per evaluation) or
            ``"exact"`` (``dim`` gradients per evaluation).
        method: torchdiffeq method.
        rtol: relative tolerance (> 0).
        atol: absolute tolerance (> 0).
        adjoint: use the adjoint method for the backward pass.
        activation: activation of the field.
        options: torchdiffeq solver options.

    Attributes:
        blocks: ``nn.ModuleList`` holding the one ODE block, whose field is a :class:`CNFField`.
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden: int = 64,
        depth: int = 2,
        t1: float = 1.0,
        trace: str = "hutchinson",
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        adjoint: bool = True,
        activation: str = "tanh",
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.dim = integer("dim", dim)
        field = CNFField(MLPField(self.dim, hidden, depth, activation), trace)
        self.blocks = nn.ModuleList(
            [ODEBlock(field, **_solver_kwargs(t1, method, rtol, atol, adjoint, options))]
        )

    @property
    def field(self) -> CNFField:
        """The augmented field of the flow."""
        return cast(CNFField, self.blocks[0].func)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of each row of ``x``, in nats.

        Args:
            x: data of shape ``[batch, dim]``.

        Returns:
            Tensor of shape ``[batch]``.
        """
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"`x` must have shape [batch, {self.dim}], but got {tuple(x.shape)}.")
        field = self.field
        if field.trace == "hutchinson":
            field.sample_noise(x)
        else:
            field.noise = None
        z, delta = self.blocks[0]((x, x.new_zeros(x.shape[0])))
        return standard_normal_log_prob(z) - delta

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x)


class _GapScaledField(nn.Module):
    """``dh/ds = gap * f(h)``, ``d gap/ds = 0``: one solve covers a different gap per series.

    The gap rides in the state rather than in an attribute so that every solve of a
    forward pass keeps its own gaps for the adjoint solves that run later in backward.
    """

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field

    def forward(self, s: TimeLike, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, gap = state
        return gap * self.field(s, h), torch.zeros_like(gap)


class ODERNN(nn.Module):
    """An ODE-RNN for irregularly sampled, partially observed time series.

    Between observations the hidden state ``h`` follows an ODE; at each observation a
    ``GRUCell`` updates ``h`` from the observed values and their mask.  Series in a batch
    are observed at different times, so the ODE is solved on a normalized interval
    ``s in [0, T]``, with the field scaled per series by its time gap ``dt_i``:
    ``dh_i/ds = dt_i * f(h_i)``.  One solve of one :class:`~snopt._ode.ODEBlock` (``t0 = 0``,
    ``t1 = T``) thus advances every series at once, each by the flow of ``f`` for time
    ``T * dt_i``.  The horizon ``T`` is therefore a time scale: ``T = 1`` evolves each series
    over its real gap, and a larger ``T`` makes the dynamics faster.  It stays a control
    variable, and its gradient sums the contributions of all the solves of a forward pass.

    Padding: a series with fewer observations repeats its last time (zero gap, so no
    evolution) with an all-zero mask (no update) at the padded positions.

    Args:
        input_dim: number of observed channels (>= 1).
        hidden_dim: size of the hidden state (>= 1).
        output_dim: size of the prediction (>= 1).
        hidden: hidden width of the field (>= 1); defaults to ``hidden_dim``.
        depth: hidden layers of the field (>= 1).
        activation: activation of the field.
        t1: the horizon ``T`` (> 0).
        method: torchdiffeq method.
        rtol: relative tolerance (> 0).
        atol: absolute tolerance (> 0).
        adjoint: use the adjoint method for the backward pass.
        options: torchdiffeq solver options.

    Attributes:
        blocks: ``nn.ModuleList`` holding the one ODE block; its ``func.field`` is an
            autonomous :class:`MLPField` ``f``.
        cell: the ``nn.GRUCell`` taking ``[values * mask, mask]``.
        head: the ``nn.Linear`` from the final hidden state to the prediction.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        *,
        hidden: int | None = None,
        depth: int = 2,
        activation: str = "tanh",
        t1: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = True,
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.input_dim = integer("input_dim", input_dim)
        self.hidden_dim = integer("hidden_dim", hidden_dim)
        self.output_dim = integer("output_dim", output_dim)
        hidden = self.hidden_dim if hidden is None else hidden
        field = _GapScaledField(MLPField(self.hidden_dim, hidden, depth, activation, time=False))
        self.blocks = nn.ModuleList(
            [ODEBlock(field, **_solver_kwargs(t1, method, rtol, atol, adjoint, options))]
        )
        self.cell = nn.GRUCell(2 * self.input_dim, self.hidden_dim)
        self.head = nn.Linear(self.hidden_dim, self.output_dim)

    def _evolve(self, h: Tensor, gap: Tensor) -> Tensor:
        if not bool((gap > 0).any()):
            return h
        h, _ = self.blocks[0]((h, gap.unsqueeze(1).to(h.dtype)))
        return h

    def forward(
        self, times: Tensor, values: Tensor, mask: Tensor | None = None, *, until: Tensor | None = None
    ) -> Tensor:
        """Predict from a batch of series.

        Args:
            times: observation times ``[batch, L]``, non-decreasing along each row.
            values: observed values ``[batch, L, input_dim]``; entries where ``mask`` is 0
                are ignored (they may be NaN).
            mask: 1 where a value is observed, 0 elsewhere, ``[batch, L, input_dim]``;
                defaults to all observed.
            until: optional times ``[batch]`` (not before each row's last time) to evolve
                the hidden state to before the prediction, e.g. the time to forecast.

        Returns:
            Tensor of shape ``[batch, output_dim]``.
        """
        if times.dim() != 2 or times.shape[1] < 1:
            raise ValueError(f"`times` must have shape [batch, L] with L >= 1, but got {tuple(times.shape)}.")
        b, length = times.shape
        expected = (b, length, self.input_dim)
        if tuple(values.shape) != expected:
            raise ValueError(f"`values` must have shape {list(expected)}, but got {tuple(values.shape)}.")
        if mask is None:
            mask = torch.ones_like(values)
        elif tuple(mask.shape) != expected:
            raise ValueError(f"`mask` must have shape {list(expected)}, but got {tuple(mask.shape)}.")
        if length > 1 and bool((times[:, 1:] < times[:, :-1]).any()):
            raise ValueError("`times` must be non-decreasing along each series, but some row decreases.")
        mask = mask.to(values.dtype)
        observed = torch.where(mask > 0, values, torch.zeros_like(values))
        h = values.new_zeros(b, self.hidden_dim)
        prev = times[:, 0]
        for k in range(length):
            h = self._evolve(h, times[:, k] - prev)
            updated = self.cell(torch.cat([observed[:, k], mask[:, k]], dim=-1), h)
            seen = (mask[:, k] > 0).any(dim=-1, keepdim=True)
            h = torch.where(seen, updated, h)
            prev = times[:, k]
        if until is not None:
            if tuple(until.shape) != (b,):
                raise ValueError(f"`until` must have shape [{b}], but got {tuple(until.shape)}.")
            gap = until.to(prev.dtype) - prev
            if bool((gap < 0).any()):
                raise ValueError("`until` must not be before the last observation time of its series.")
            h = self._evolve(h, gap)
        return self.head(h)


class MultiBlockClassifier(nn.Module):
    """An image classifier with three ODE blocks of different roles, and a layer between each.

    ``head(block_2(mix(block_1(pool(block_0(stem(x)))))))``:

    * ``blocks.0``: a :class:`ConvField` block on the full-resolution feature maps (local
      features);
    * ``blocks.1``: a :class:`ConvField` block after 2x2 average pooling (coarse features);
    * ``blocks.2``: an :class:`MLPField` block on a vector of ``2 * width`` features after
      pooling to 2x2 and a linear map (dynamics in the classifier's feature space).

    The blocks see states of different size and meaning, so the horizon each one needs
    differs: one T for all blocks cannot be right for each, which is where a per-block
    horizon (searched, or controlled in training) can pay.

    Args:
        in_channels: channels of the input images (>= 1).
        num_classes: number of classes (>= 2).
        width: channels of the convolutional blocks (>= 1); the vector block has ``2 * width``.
        t1: initial horizon of every block (> 0).
        method, rtol, atol, adjoint, options: solver settings of every block.

    Attributes:
        stem, pool, mix, head: the layers around the blocks.
        blocks: ``nn.ModuleList`` of the three ODE blocks.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        width: int = 8,
        t1: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = True,
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        in_channels = integer("in_channels", in_channels)
        num_classes = integer("num_classes", num_classes, low=2)
        width = integer("width", width)
        kwargs = _solver_kwargs(t1, method, rtol, atol, adjoint, options)
        dim = 2 * width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), _group_norm(width), nn.ReLU())
        self.pool = nn.AvgPool2d(2)
        self.mix = nn.Sequential(
            _group_norm(width), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, dim)
        )
        self.blocks = nn.ModuleList(
            [
                ODEBlock(ConvField(width), **kwargs),
                ODEBlock(ConvField(width), **kwargs),
                ODEBlock(MLPField(dim, dim, 1, "tanh"), **kwargs),
            ]
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[batch, num_classes]`` of images ``[batch, in_channels, H, W]``."""
        h = self.blocks[0](self.stem(x))
        h = self.blocks[1](self.pool(h))
        h = self.blocks[2](self.mix(h))
        return cast(Tensor, self.head(h))
