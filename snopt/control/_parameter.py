"""Declared control variables: scalar architecture parameters moved by a controller."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._checks import Bounds, Schedule, check_bounds, check_real, check_schedule
from ._costs import BaseCost, make_cost


class ControlParameter(nn.Module):
    """A scalar architecture parameter moved by a :class:`~snopt.Controller`, not by the optimizer.

    Place it in a vector field (or anywhere in the model) and call it to read its value as
    a tensor::

        class DampedField(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = snopt.MLPField(2)
                self.damping = snopt.ControlParameter(0.5, bounds=(0.0, 5.0))

            def forward(self, t, x):
                return self.net(t, x) - self.damping() * x

    The value is a buffer that requires grad, so it is saved in the model's
    ``state_dict`` and receives a gradient in backward, but it is not in
    ``model.parameters()``: the parameter optimizer never sees it.  Every
    :class:`~snopt.Controller` built on the model finds it and controls it under the name
    ``name`` (by default the module's qualified name).  In adjoint mode the
    :class:`~snopt._ode.ODEBlock` passes the field's buffers that require grad to the
    adjoint solve.

    Its curvature is the Gauss-Newton one (the parameter's tangent pushed through the model
    by a finite difference of the output) or, with ``curvature="fisher"``, the outer product
    of its batch gradients scaled by the batch size (see :mod:`snopt.control`).

    Args:
        value: the initial value (finite).
        bounds: ``(low, high)`` kept by projection after every update, or None.
        penalty: weight of the cost on this parameter (>= 0; default 0: no cost).
        cost: ``"quadratic"`` or ``"linear"`` (or a :class:`BaseCost`).
        lr: this parameter's step size; None uses the controller's ``lr``.
        name: the key in :attr:`Controller.values`; None uses the qualified module name.
    """

    value: Tensor

    def __init__(
        self,
        value: float,
        *,
        bounds: Bounds | None = None,
        penalty: float = 0.0,
        cost: str | BaseCost = "quadratic",
        lr: Schedule | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        value = check_real("value", value)
        self.bounds = check_bounds("bounds", bounds)
        if self.bounds is not None and not self.bounds[0] <= value <= self.bounds[1]:
            raise ValueError(f"`value` must lie within `bounds` {self.bounds}, but got value={value}.")
        self.cost = make_cost(cost, penalty)
        self.lr = None if lr is None else check_schedule("lr", lr)
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"`name` must be a non-empty string or None, but got name={name!r}.")
        self.name = name
        self.register_buffer("value", torch.tensor(value, dtype=torch.get_default_dtype()).requires_grad_())

    def forward(self) -> Tensor:
        """The value as a 0-dim tensor that requires grad."""
        return self.value

    def __float__(self) -> float:
        return float(self.value.detach())

    @property
    def grad(self) -> Tensor | None:
        """The gradient accumulated by backward since the controller last read it."""
        return self.value.grad

    def set(self, value: float) -> None:
        """Set the value (finite and within :attr:`bounds`)."""
        value = check_real("value", value)
        if self.bounds is not None and not self.bounds[0] <= value <= self.bounds[1]:
            raise ValueError(f"`value` must lie within `bounds` {self.bounds}, but got value={value}.")
        with torch.no_grad():
            self.value.fill_(value)

    def _apply(self, fn: Any, recurse: bool = True) -> ControlParameter:
        # A device or dtype move returns a non-leaf copy of a tensor that requires grad;
        # make it a leaf again so that backward fills its .grad.
        super()._apply(fn, recurse)
        value = self._buffers["value"]
        if value is not None and not value.is_leaf:
            self._buffers["value"] = value.detach().requires_grad_()
        return self

    def extra_repr(self) -> str:
        return f"value={float(self):.4g}, bounds={self.bounds}, cost={self.cost!r}"
