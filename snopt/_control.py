"""Control variables and their policies: horizons and other architecture parameters, tuned in training.

A *control variable* ``phi`` is a continuous architecture parameter that the optimizer of
the network parameters ``theta`` does not move: the horizon ``t1`` of every
:class:`~snopt._ode.ODEBlock`, and any scalar declared with :class:`ControlParameter`.
A :class:`Controller` moves them inside training to lower ``J = L + c(phi)``, the training
loss plus a cost on the architecture, following SNOpt's policy (Liu, Chen & Theodorou,
NeurIPS 2021, section 3.3).

The math, for one variable (``l_i`` is the loss of sample ``i``; ``L`` their batch mean):

- ``Q_phi = dL/dphi + c'(phi)``.  For a horizon, ``dL/dT = mean_i dl_i/dx(T) . f(T, x_i(T))``
  is exact and comes from the backward pass (:attr:`ODEBlock.t1_grad`); for a declared
  parameter it is the gradient autograd leaves on it.
- ``Q_phiphi = E_i[(dl_i/dphi)^2] + c''(phi)``: the Gauss-Newton (outer-product) estimate.
  Horizons have exact per-sample terms (:attr:`ODEBlock.t1_grad_samples`).  A declared
  parameter only has the batch gradients ``g_s`` of the steps ``s`` between two updates;
  with their mean ``m`` and variance ``v``, ``E_i[(dl_i/dphi)^2] = mu^2 + sigma^2`` is
  estimated as ``m^2 + B v`` (``B``: the batch size seen by the parameter's ODE block, as a
  batch mean of ``B`` independent samples has variance ``sigma^2 / B``).  It needs ``every >=
  2``; with one step per update it falls back to ``g^2``, the form of the paper's reference
  code.  Like any outer-product estimate it matches the Hessian for a calibrated negative
  log-likelihood and vanishes at the optimum of a noise-free problem, where a cost with
  ``c'' > 0`` (or ``max_step``) keeps the step finite.
- ``Q_phitheta . dtheta``: the same outer-product approximation of the cross block of the
  Hessian of ``(phi, theta)`` gives ``Q_phitheta ~ E[dL/dphi * grad_theta L]`` (from the batch
  gradients of each step) and, for the parameter change ``dtheta`` made by the optimizer,
  ``Q_phitheta . dtheta ~ E[dL/dphi * (grad_theta L . dtheta)]``: the predicted change of
  ``Q_phi`` caused by the optimizer's move.  The estimates of a step are taken at the
  parameters before that step's optimizer update, so each is carried to the current
  parameters with the change made since (see ``_Estimator``).

Minimising the second-order expansion of ``J`` in ``dphi`` for a given ``dtheta``,
``Q_phi dphi + 1/2 Q_phiphi dphi^2 + dphi Q_phitheta . dtheta``, gives the feedback policy
``dphi = -eta Q_phiphi^-1 (Q_phi + Q_phitheta . dtheta)``: an open-loop gain plus a
feedback gain on the optimizer's update.  The first-order baseline is ``dphi = -eta Q_phi``.

Between control updates (every ``every`` steps) the controller averages its per-step
estimates with momentum (a bias-corrected running average restarted after each update, so
every estimate belongs to the current value of the variable).  An update is then limited
to a relative trust region (``max_step``) and projected onto the bounds; both events are
counted in :attr:`Controller.stats`, never silent.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar, NamedTuple, Union, final

import torch
from torch import Tensor, nn

from . import _defaults as D
from ._defaults import COSTS, POLICIES
from ._ode import ODEBlock, ode_blocks

#: A constant step size, or a callable of the 0-based update index returning it.
Schedule = Union[float, Callable[[int], float]]  # noqa: UP007 - a runtime alias
Bounds = tuple[float, float]
# (dL/dphi, second moment, batch size): the second moment is per-sample when the batch size is
# None, else the square of the batch gradient.
Reading = tuple[float, float, Union[int, None]]  # noqa: UP007

#: Without bounds a horizon stays at least this far above its block's ``t0``.
MIN_HORIZON = 1e-3
#: Step size ``eta`` of each policy when none is given (tuned on the built-in tasks; see
#: ``benchmarks/horizon.py``).  The gradient policy's step is in units of T per unit of
#: ``Q_phi``, the feedback policy's is a fraction of a Gauss-Newton step.
DEFAULT_LR = D.POLICY_LR


# ---------------------------------------------------------------------------- checks
def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite real number, but got {name}={value!r}.")
    return float(value)


def _nonnegative(name: str, value: Any) -> float:
    value = _real(name, value)
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, but got {name}={value!r}.")
    return value


def check_momentum(name: str, value: Any) -> float:
    """The running-average momentum, in [0, 1]; ``name`` is the caller's argument."""
    value = _real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], but got {name}={value}.")
    return value


def check_max_step(name: str, value: Any) -> float | None:
    """The trust region of one update: a positive number, or None for no limit."""
    if value is None:
        return None
    value = _real(name, value)
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive number or None, but got {name}={value}.")
    return value


def check_warmup(name: str, value: Any) -> int:
    """The steps before the first estimate: an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, but got {name}={value!r}.")
    return value


def _schedule(name: str, value: Any) -> Schedule:
    """A positive finite constant, or a callable checked each time it is used."""
    if callable(value):
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(
            f"`{name}` must be a positive number or a callable of the update index, but got {name}={value!r}."
        )
    return float(value)


def _eta(name: str, schedule: Schedule, count: int) -> float:
    value = schedule(count) if callable(schedule) else schedule
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"The `{name}` schedule must return a positive number, but returned {value!r}."
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"The `{name}` schedule must return a positive number, but returned {value!r} at update {count}."
        )
    return value


def _bounds(name: str, bounds: Any) -> Bounds | None:
    """None or ``(low, high)`` with ``low < high``; infinite ends are allowed."""
    if bounds is None:
        return None
    try:
        low, high = bounds
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be None or a pair (low, high), but got {name}={bounds!r}.") from None
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"`{name}` must not contain NaN, but got {name}={bounds!r}.")
    if not low < high:
        raise ValueError(
            f"`{name}` must have its lower bound below its upper bound, but got low={low}, high={high}."
        )
    return low, high


# ----------------------------------------------------------------------------- costs
class BaseCost(ABC):
    """A cost ``c(phi)`` on a control variable, added to the training loss.

    Costs contribute ``c'(phi)`` to ``Q_phi`` and ``c''(phi)`` to ``Q_phiphi``.

    Args:
        weight: the cost's weight (>= 0).
    """

    name: ClassVar[str]

    def __init__(self, weight: float) -> None:
        self.weight = _nonnegative("penalty", weight)

    @abstractmethod
    def value(self, phi: float) -> float:
        """The cost ``c(phi)``."""

    @abstractmethod
    def grad(self, phi: float) -> float:
        """The derivative ``c'(phi)``."""

    @abstractmethod
    def curvature(self, phi: float) -> float:
        """The second derivative ``c''(phi)``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight})"


@final
class QuadraticCost(BaseCost):
    """``c(phi) = weight / 2 * phi^2``, the paper's cost on the horizon."""

    name = "quadratic"

    def value(self, phi: float) -> float:
        """``weight / 2 * phi^2``."""
        return 0.5 * self.weight * phi * phi

    def grad(self, phi: float) -> float:
        """``weight * phi``."""
        return self.weight * phi

    def curvature(self, phi: float) -> float:
        """``weight``."""
        return self.weight


@final
class LinearCost(BaseCost):
    """``c(phi) = weight * phi``: for a horizon, proportional to the function evaluations."""

    name = "linear"

    def value(self, phi: float) -> float:
        """``weight * phi``."""
        return self.weight * phi

    def grad(self, phi: float) -> float:
        """``weight``."""
        return self.weight

    def curvature(self, phi: float) -> float:
        """0."""
        return 0.0


def make_cost(cost: str | BaseCost, penalty: float = 0.0) -> BaseCost:
    """A cost object from a name (``"quadratic"`` or ``"linear"``) and a weight.

    Args:
        cost: a name from :data:`COSTS`, or a :class:`BaseCost` (then ``penalty`` is ignored).
        penalty: the weight of a named cost (>= 0).

    Returns:
        The :class:`BaseCost`.
    """
    if isinstance(cost, BaseCost):
        return cost
    if cost == "quadratic":
        return QuadraticCost(penalty)
    if cost == "linear":
        return LinearCost(penalty)
    raise ValueError(f"`cost` must be one of {list(COSTS)} or a BaseCost, but got cost={cost!r}.")


# -------------------------------------------------------------------------- policies
class PolicyState(NamedTuple):
    """The state of a policy: the number of updates made so far (the schedule's index)."""

    updates: int = 0


class BasePolicy(ABC):
    """A control policy: maps estimates of ``Q`` to a change of one control variable.

    Policies are small objects with explicit state, in the style of optax's gradient
    transformations: ``state = policy.init(value)`` once, then for every control update
    ``delta, state = policy.update(grad, state, curvature=..., dtheta=...)``.

    Attributes:
        name: the policy's name in :data:`POLICIES`.
        uses_curvature: whether :meth:`update` needs ``curvature``.
        uses_feedback: whether :meth:`update` uses ``dtheta`` (the controller only
            estimates the cross term for policies that do).
    """

    name: ClassVar[str]
    uses_curvature: ClassVar[bool] = False
    uses_feedback: ClassVar[bool] = False

    def init(self, value: float) -> PolicyState:
        """The initial state for a variable whose current value is ``value``."""
        _real("value", value)
        return PolicyState(0)

    @abstractmethod
    def update(
        self, grad: float, state: PolicyState, *, curvature: float | None = None, dtheta: float | None = None
    ) -> tuple[float, PolicyState]:
        """The change of the variable.

        Args:
            grad: ``Q_phi``, the derivative of the training loss plus cost.
            state: the policy's state.
            curvature: ``Q_phiphi``, the Gauss-Newton curvature plus the cost's.
            dtheta: the feedback input ``Q_phitheta . dtheta``, the predicted change of
                ``Q_phi`` caused by the optimizer's parameter update ``dtheta``.

        Returns:
            ``(delta, new_state)``.
        """


@final
class FixedPolicy(BasePolicy):
    """Never moves the variable (a fixed architecture)."""

    name = "fixed"

    def update(
        self, grad: float, state: PolicyState, *, curvature: float | None = None, dtheta: float | None = None
    ) -> tuple[float, PolicyState]:
        """Returns a zero change."""
        return 0.0, PolicyState(state.updates + 1)

    def __repr__(self) -> str:
        return "FixedPolicy()"


@final
class GradientPolicy(BasePolicy):
    """The first-order baseline: ``delta = -eta * Q_phi``.

    Args:
        lr: the step size ``eta`` (> 0), or a callable of the update index returning it.
    """

    name = "gradient"

    def __init__(self, lr: Schedule = DEFAULT_LR["gradient"]) -> None:
        self.lr = _schedule("lr", lr)

    def update(
        self, grad: float, state: PolicyState, *, curvature: float | None = None, dtheta: float | None = None
    ) -> tuple[float, PolicyState]:
        """``-eta * grad``; ``curvature`` and ``dtheta`` are ignored."""
        eta = _eta("lr", self.lr, state.updates)
        return -eta * float(grad), PolicyState(state.updates + 1)

    def __repr__(self) -> str:
        return f"GradientPolicy(lr={self.lr!r})"


@final
class FeedbackPolicy(BasePolicy):
    """SNOpt's second-order policy: ``delta = -eta * (Q_phi + Q_phitheta . dtheta) / Q_phiphi``.

    An open-loop gain ``-eta Q_phi / Q_phiphi`` plus a feedback gain on the optimizer's
    parameter update.  Without ``dtheta`` it is the open-loop (Gauss-Newton) step.

    Args:
        lr: the step size ``eta`` (> 0; 1 is a full Gauss-Newton step), or a callable of
            the update index returning it.
        eps: damping added to ``Q_phiphi`` (> 0), so that a vanishing curvature with a
            linear cost still gives a finite step.
    """

    name = "feedback"
    uses_curvature = True
    uses_feedback = True

    def __init__(self, lr: Schedule = DEFAULT_LR["feedback"], eps: float = 1e-8) -> None:
        self.lr = _schedule("lr", lr)
        eps = _real("eps", eps)
        if eps <= 0:
            raise ValueError(f"`eps` must be > 0, but got eps={eps}.")
        self.eps = eps

    def update(
        self, grad: float, state: PolicyState, *, curvature: float | None = None, dtheta: float | None = None
    ) -> tuple[float, PolicyState]:
        """``-eta * (grad + dtheta) / (curvature + eps)``; ``curvature`` must be >= 0."""
        if curvature is None:
            raise ValueError("FeedbackPolicy.update needs `curvature` (Q_phiphi), but got None.")
        if not curvature >= 0:
            raise ValueError(
                f"`curvature` must be >= 0 (a Gauss-Newton estimate), but got curvature={curvature}."
            )
        eta = _eta("lr", self.lr, state.updates)
        feedback = 0.0 if dtheta is None else float(dtheta)
        return -eta * (float(grad) + feedback) / (float(curvature) + self.eps), PolicyState(state.updates + 1)

    def __repr__(self) -> str:
        return f"FeedbackPolicy(lr={self.lr!r}, eps={self.eps})"


def make_policy(policy: str | BasePolicy, lr: Schedule | None = None) -> BasePolicy:
    """A policy from its name (``"fixed"``, ``"gradient"``, ``"feedback"``) and step size.

    Args:
        policy: a name from :data:`POLICIES`, or a :class:`BasePolicy` (returned as is).
        lr: the step size of a named policy; None for its :data:`DEFAULT_LR`.

    Returns:
        The :class:`BasePolicy`.
    """
    if isinstance(policy, BasePolicy):
        return policy
    if policy == "fixed":
        return FixedPolicy()
    if policy == "gradient":
        return GradientPolicy(DEFAULT_LR["gradient"] if lr is None else lr)
    if policy == "feedback":
        return FeedbackPolicy(DEFAULT_LR["feedback"] if lr is None else lr)
    raise ValueError(f"`policy` must be one of {list(POLICIES)} or a BasePolicy, but got policy={policy!r}.")


def project(value: float, bounds: Bounds | None) -> tuple[float, bool]:
    """Clip ``value`` into ``bounds``; returns the result and whether it was clipped."""
    if bounds is None:
        return value, False
    low, high = bounds
    clipped = min(max(value, low), high)
    return clipped, clipped != value


# ---------------------------------------------------------------- declared parameters
class ControlParameter(nn.Module):
    """A scalar architecture parameter moved by a :class:`Controller`, not by the optimizer.

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
    :class:`Controller` built on the model finds it and controls it under the name
    ``name`` (by default the module's qualified name).  In adjoint mode the
    :class:`~snopt._ode.ODEBlock` passes the field's buffers that require grad to the
    adjoint solve.

    Only the batch gradient is available for such a parameter, so its Gauss-Newton
    curvature is estimated from it, scaled by the batch size (see :mod:`snopt._control`).

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
        value = _real("value", value)
        self.bounds = _bounds("bounds", bounds)
        if self.bounds is not None and not self.bounds[0] <= value <= self.bounds[1]:
            raise ValueError(f"`value` must lie within `bounds` {self.bounds}, but got value={value}.")
        self.cost = make_cost(cost, penalty)
        self.lr = None if lr is None else _schedule("lr", lr)
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
        value = _real("value", value)
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


# ----------------------------------------------------------------------- estimation
class _Estimator:
    """Running averages, since the last control update, of one variable's estimates.

    With weights ``w_s = momentum^(n - s)`` over the steps ``s = 1..n`` of the window:
    ``grad`` averages ``dL/dphi``, ``second`` the Gauss-Newton term and ``cross`` the
    feedback term ``dL/dphi_s * (grad_theta L_s . (theta_now - theta_{s-1}))``, where
    ``theta_{s-1}`` are the parameters at which step ``s`` evaluated its gradients.  When
    the parameters move by ``d``, every term of ``cross`` gains ``dL/dphi_s grad_theta L_s . d``,
    i.e. ``vector . d`` with ``vector`` the running average of ``dL/dphi_s grad_theta L_s``;
    so both are updated recursively with one parameter-sized vector.
    """

    __slots__ = ("weight", "grad", "second", "cross", "vector", "samples")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.weight = 0.0
        self.grad = 0.0
        self.second = 0.0
        self.cross = 0.0
        self.vector: Tensor | None = None
        self.samples = 0

    def add(
        self, momentum: float, grad: float, second: float, theta_grad: Tensor | None, dtheta: Tensor | None
    ) -> None:
        self.weight = momentum * self.weight + 1.0
        alpha = 1.0 / self.weight
        self.samples += 1
        self.grad += alpha * (grad - self.grad)
        self.second += alpha * (second - self.second)
        if theta_grad is None or dtheta is None:
            return
        carried = self.cross if self.vector is None else self.cross + float(self.vector @ dtheta)
        self.cross = carried + alpha * (grad * float(theta_grad @ dtheta) - carried)
        if self.vector is None:
            self.vector = grad * theta_grad
        else:
            self.vector.add_(alpha * (grad * theta_grad - self.vector))

    def state_dict(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "grad": self.grad,
            "second": self.second,
            "cross": self.cross,
            "vector": None if self.vector is None else self.vector.clone(),
            "samples": self.samples,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weight = float(state["weight"])
        self.grad = float(state["grad"])
        self.second = float(state["second"])
        self.cross = float(state["cross"])
        vector = state["vector"]
        self.vector = None if vector is None else vector.clone()
        self.samples = int(state["samples"])


class _Variable:
    """One control variable: how to read and set it, its cost, bounds, policy and estimates."""

    def __init__(
        self,
        name: str,
        get: Callable[[], float],
        set: Callable[[float], None],
        read: Callable[[], Reading | None],
        *,
        cost: BaseCost,
        bounds: Bounds | None,
        policy: BasePolicy,
        kind: str,
    ) -> None:
        self.name = name
        self.get = get
        self.set = set
        self.read = read
        self.cost = cost
        self.bounds = bounds
        self.policy = policy
        self.kind = kind
        self.state = policy.init(get())
        self.estimator = _Estimator()
        self.batch: int | None = None
        self.counts = {"updates": 0, "clipped": 0, "limited": 0, "skipped": 0, "missing": 0}
        self.last: dict[str, float] = {}
        self.warned = False


def _horizon_reader(block: ODEBlock) -> Callable[[], Reading | None]:
    """``(dL/dT, mean_i (dl_i/dT)^2, None)`` of the last backward, for a batch-mean loss."""

    def read() -> Reading | None:
        if block.t1_grad is None:
            return None
        grad = float(block.t1_grad)
        samples = block.t1_grad_samples
        if samples is None or samples.numel() == 0:
            return grad, grad * grad, None
        # For a mean loss, term_i = (1/B) dl_i/dT, so mean_i (dl_i/dT)^2 = B * sum_i term_i^2.
        second = float(samples.numel() * samples.double().pow(2).sum())
        return grad, second, None

    return read


def _parameter_reader(param: ControlParameter, block: ODEBlock | None) -> Callable[[], Reading | None]:
    """``(dL/dphi, (dL/dphi)^2, B)``; ``B`` is the batch size seen by the enclosing block, else 1."""

    def read() -> Reading | None:
        grad = param.value.grad
        if grad is None:
            return None
        value = float(grad)
        param.value.grad = None
        samples = block.t1_grad_samples if block is not None else None
        batch = samples.numel() if samples is not None else 1
        return value, value * value, batch

    return read


# ------------------------------------------------------------------------ controller
class Controller:
    """Moves the control variables of a model inside training (horizons and declared parameters).

    The controlled variables are the horizon ``t1`` of every :class:`~snopt._ode.ODEBlock`
    (each its own variable, under the key ``t1/<block name>``, or ``t1`` when the model
    itself is the block) and every :class:`ControlParameter` in the model.  Call
    :meth:`step` once per training step, after ``loss.backward()`` and the optimizer's
    step (:func:`snopt.fit` does): it reads ``dL/dphi`` of that step, keeps running
    estimates, and every ``every`` steps changes each variable by its policy (see
    :mod:`snopt._control` for the math), limits the change to ``max_step`` of the
    current value, and projects it onto the bounds.

    Args:
        model: the model; its ODE blocks and :class:`ControlParameter` modules are found.
        policy: ``"fixed"``, ``"gradient"`` (first order, ``-eta Q_phi``), ``"feedback"``
            (SNOpt's second-order policy), or a :class:`BasePolicy`.
        lr: the step size ``eta`` (> 0), or a callable of the update index; None for the
            policy's :data:`DEFAULT_LR`.
        penalty: weight of the cost on the horizons (>= 0).
        cost: ``"quadratic"`` (``penalty / 2 * T^2``) or ``"linear"`` (``penalty * T``), or
            a :class:`BaseCost`; applies to horizons (a :class:`ControlParameter` has its own).
        every: steps between control updates (positive integer).
        bounds: ``(low, high)`` for every horizon, a dict from variable name to
            ``(low, high)``, or None.  Horizon bounds must satisfy ``t0 < low < high``
            and hold the current ``t1``.  Without bounds a horizon stays at least
            :data:`MIN_HORIZON` above ``t0`` (counted as clipping too).
        optimizer: the parameter optimizer; its parameters are the ``theta`` of the
            feedback term (default: the model's parameters that require grad).
        momentum: weight of older steps in the running averages between updates, in
            [0, 1] (0: the last step only; 1: the plain mean of the window).
        max_step: trust region of one update: a horizon changes at most by the factor
            ``1 + max_step`` either way (1: doubles or halves), a :class:`ControlParameter`
            by at most ``max_step * max(|value|, 1)``; None for no limit.  Changes cut by
            it are counted in :attr:`stats`.
        warmup: steps before the first estimate is kept (integer >= 0); the first update
            comes ``every`` steps after them.
        horizons: control the horizons of all blocks (True), of none (False), or of the
            blocks named in a sequence.

    Attributes:
        policy: the :class:`BasePolicy`.
        every: steps between updates.
        steps: calls of :meth:`step` so far.

    Example:
        >>> controller = snopt.Controller(model, policy="feedback", lr=0.5, every=20)
        >>> result = snopt.fit(model, train, val, task=task, optimizer=opt, controller=controller, epochs=3)
        >>> controller.values
        {'t1/blocks.0': 0.83}
    """

    def __init__(
        self,
        model: nn.Module,
        policy: str | BasePolicy = D.CONTROL["policy"],
        lr: Schedule | None = None,
        penalty: float = D.CONTROL["penalty"],
        cost: str | BaseCost = D.CONTROL["cost"],
        every: int = D.CONTROL["every"],
        bounds: Bounds | Mapping[str, Bounds] | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        momentum: float = D.CONTROL["momentum"],
        max_step: float | None = D.CONTROL["max_step"],
        warmup: int = D.CONTROL["warmup"],
        horizons: bool | Sequence[str] = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, but got {type(model).__name__}.")
        if isinstance(policy, str) and policy not in POLICIES:
            raise ValueError(
                f"`policy` must be one of {list(POLICIES)} or a BasePolicy, but got policy={policy!r}."
            )
        if not isinstance(policy, (str, BasePolicy)):
            raise ValueError(
                f"`policy` must be one of {list(POLICIES)} or a BasePolicy, but got policy={policy!r}."
            )
        self.policy = make_policy(policy, None if lr is None else _schedule("lr", lr))
        self.cost = make_cost(cost, penalty)
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"`every` must be a positive integer, but got every={every!r}.")
        self.every = every
        self.momentum = check_momentum("momentum", momentum)
        self.max_step = check_max_step("max_step", max_step)
        self.warmup = check_warmup("warmup", warmup)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"`optimizer` must be a torch.optim.Optimizer or None, but got {type(optimizer).__name__}."
            )
        self.model = model
        self.optimizer = optimizer
        self.steps = 0
        self._variables = self._build_variables(model, bounds, horizons)
        if optimizer is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
        else:
            params = [p for p in model.parameters() if p.requires_grad]
        self._params: list[Tensor] = list({id(p): p for p in params}.values())
        self._snapshot: Tensor | None = self._flat_params() if self._tracks_feedback else None

    # ------------------------------------------------------------- set-up
    @property
    def _tracks_feedback(self) -> bool:
        return bool(self._params) and any(v.policy.uses_feedback for v in self._variables.values())

    def _build_variables(
        self, model: nn.Module, bounds: Any, horizons: bool | Sequence[str]
    ) -> dict[str, _Variable]:
        blocks = ode_blocks(model)
        block_names = [name for name, _ in blocks]
        if isinstance(horizons, bool):
            chosen = set(block_names) if horizons else set()
        elif isinstance(horizons, Sequence) and not isinstance(horizons, str):
            unknown = sorted(set(horizons) - set(block_names))
            if unknown:
                raise ValueError(
                    f"Unknown `horizons` names {unknown}; the model's ODE blocks are {block_names}."
                )
            chosen = set(horizons)
        else:
            raise ValueError(f"`horizons` must be a bool or a sequence of block names, but got {horizons!r}.")
        params = [(name, m) for name, m in model.named_modules() if isinstance(m, ControlParameter)]
        keys = [_t1_key(name) for name, _ in blocks if name in chosen]
        keys += [p.name or name for name, p in params]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(
                f"Control variable names must be unique, but {duplicates} appear more than once."
            )
        if not keys:
            raise ValueError(
                "The model has no control variable: no ODEBlock horizon is selected (`horizons`) "
                "and there is no ControlParameter in it."
            )
        per_name = self._per_name_bounds(bounds, keys)
        variables: dict[str, _Variable] = {}
        for name, block in blocks:
            if name not in chosen:
                continue
            key = _t1_key(name)
            box = per_name.get(key) if per_name is not None else _bounds("bounds", bounds)
            box = self._horizon_bounds(key, block, box)
            block.horizon_grad = True
            variables[key] = _Variable(
                key,
                partial(_get_t1, block),
                block.set_t1,
                _horizon_reader(block),
                cost=self.cost,
                bounds=box,
                policy=self.policy,
                kind="horizon",
            )
        for name, param in params:
            key = param.name or name
            box = param.bounds
            if per_name is not None and key in per_name:
                box = per_name[key]
            value = float(param)
            if box is not None and not box[0] <= value <= box[1]:
                raise ValueError(
                    f"The initial value of {key!r} must lie within its bounds {box}, but got {value}."
                )
            policy = self._policy_with_lr(param.lr)
            variables[key] = _Variable(
                key,
                partial(float, param),
                param.set,
                _parameter_reader(param, _enclosing_block(param, blocks)),
                cost=param.cost,
                bounds=box,
                policy=policy,
                kind="parameter",
            )
        return variables

    def _policy_with_lr(self, lr: Schedule | None) -> BasePolicy:
        """The controller's policy, with a declared parameter's own step size where it has one."""
        if lr is None or isinstance(self.policy, FixedPolicy):
            return self.policy
        if isinstance(self.policy, GradientPolicy):
            return GradientPolicy(lr)
        if isinstance(self.policy, FeedbackPolicy):
            return FeedbackPolicy(lr, eps=self.policy.eps)
        raise ValueError(
            "A ControlParameter's own `lr` needs a built-in policy, "
            f"but the controller's policy is {self.policy!r}."
        )

    @staticmethod
    def _per_name_bounds(bounds: Any, keys: list[str]) -> dict[str, Bounds | None] | None:
        if not isinstance(bounds, Mapping):
            return None
        unknown = sorted(set(bounds) - set(keys))
        if unknown:
            raise ValueError(f"Unknown `bounds` keys {unknown}; valid keys are {sorted(keys)}.")
        return {k: _bounds(f"bounds[{k!r}]", v) for k, v in bounds.items()}

    @staticmethod
    def _horizon_bounds(key: str, block: ODEBlock, box: Bounds | None) -> Bounds:
        t1 = block.t1
        if box is None:
            return (block.t0 + MIN_HORIZON, math.inf)
        low, high = box
        if not low > block.t0:
            raise ValueError(
                f"The lower bound of {key!r} must be above the block's t0={block.t0}, but got bounds={box}."
            )
        if not low <= t1 <= high:
            raise ValueError(
                f"The initial horizon T0 of {key!r} must lie within the bounds {box}, but got t1={t1}."
            )
        return box

    # -------------------------------------------------------------- public
    @property
    def values(self) -> dict[str, float]:
        """Name -> current value of every control variable."""
        return {name: var.get() for name, var in self._variables.items()}

    @property
    def names(self) -> list[str]:
        """The names of the control variables, in order."""
        return list(self._variables)

    @property
    def stats(self) -> dict[str, float]:
        """Counters and the last estimates, as a flat dict.

        ``steps`` and ``updates`` overall; per variable ``<name>/updates``,
        ``<name>/clipped`` (projections onto the bounds), ``<name>/limited`` (changes cut
        by ``max_step``), ``<name>/skipped`` (updates without a usable estimate),
        ``<name>/missing`` (steps whose backward gave the variable no gradient), and, after
        an update, ``<name>/Q_phi``, ``<name>/Q_phiphi``, ``<name>/feedback`` (the term
        ``Q_phitheta . dtheta``), ``<name>/delta`` and ``<name>/lr``.
        """
        updates = max(self.steps - self.warmup, 0) // self.every
        out: dict[str, float] = {"steps": float(self.steps), "updates": float(updates)}
        for name, var in self._variables.items():
            for key, count in var.counts.items():
                out[f"{name}/{key}"] = float(count)
            for key, value in var.last.items():
                out[f"{name}/{key}"] = value
        return out

    def step(self) -> None:
        """Record this training step's estimates; every ``every`` steps, update the variables.

        Call after ``loss.backward()`` and ``optimizer.step()``.
        """
        self.steps += 1
        if self.steps <= self.warmup:
            # The estimates of an untrained network say little about its architecture.
            self._discard()
            return
        feedback = self._tracks_feedback
        theta_grad = dtheta = None
        if feedback:
            theta_grad, dtheta = self._theta_terms()
        for var in self._variables.values():
            reading = var.read()
            if reading is None or not (math.isfinite(reading[0]) and math.isfinite(reading[1])):
                var.counts["missing"] += 1
                continue
            grad, second, var.batch = reading
            use_feedback = var.policy.uses_feedback
            var.estimator.add(
                self.momentum,
                grad,
                second,
                theta_grad if use_feedback else None,
                dtheta if use_feedback else None,
            )
        if (self.steps - self.warmup) % self.every == 0:
            self._update()

    # ------------------------------------------------------------ internals
    def _flat_params(self) -> Tensor:
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in self._params])

    def _flat_grads(self) -> Tensor:
        parts = []
        for p in self._params:
            g = p.grad
            parts.append(
                torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
                if g is None
                else g.detach().reshape(-1).to(torch.float64)
            )
        return torch.cat(parts)

    def _theta_terms(self) -> tuple[Tensor, Tensor]:
        """This step's parameter gradient and the parameter change since the last step."""
        current = self._flat_params()
        if self._snapshot is None or self._snapshot.shape != current.shape:
            self._snapshot = current
        snapshot = self._snapshot.to(current.device)
        dtheta = current - snapshot
        self._snapshot = current
        return self._flat_grads(), dtheta

    def _update(self) -> None:
        for var in self._variables.values():
            est = var.estimator
            if est.samples == 0:
                var.counts["skipped"] += 1
                self._warn_missing(var)
                continue
            value = var.get()
            q_phi = est.grad + var.cost.grad(value)
            if var.batch is None:
                gauss_newton = est.second
            else:  # m^2 + B v from the batch gradients' running mean m and variance v
                gauss_newton = est.grad**2 + var.batch * max(est.second - est.grad**2, 0.0)
            q_phiphi = gauss_newton + var.cost.curvature(value)
            cross = est.cross if var.policy.uses_feedback else 0.0
            if not all(math.isfinite(x) for x in (q_phi, q_phiphi, cross)):
                var.counts["skipped"] += 1
                est.reset()
                continue
            schedule = getattr(var.policy, "lr", None)
            eta = _eta("lr", schedule, var.state.updates) if schedule is not None else math.nan
            delta, var.state = var.policy.update(
                q_phi,
                var.state,
                curvature=q_phiphi if var.policy.uses_curvature else None,
                dtheta=cross if var.policy.uses_feedback else None,
            )
            delta = float(delta)
            if not math.isfinite(delta):
                var.counts["skipped"] += 1
                est.reset()
                continue
            if self.max_step is not None:
                limited = _trust_region(value, delta, self.max_step, var.kind == "horizon")
                if limited != delta:
                    delta = limited
                    var.counts["limited"] += 1
            new, clipped = project(value + delta, var.bounds)
            if clipped:
                var.counts["clipped"] += 1
            var.set(new)
            var.counts["updates"] += 1
            var.last = {
                "Q_phi": q_phi,
                "Q_phiphi": q_phiphi,
                "feedback": cross,
                "delta": new - value,
                "lr": eta,
            }
            est.reset()

    def _discard(self) -> None:
        """Skip this step's estimates, keeping the parameter snapshot and gradients current."""
        if self._tracks_feedback:
            self._theta_terms()
        for var in self._variables.values():
            var.read()

    def _warn_missing(self, var: _Variable) -> None:
        if var.warned:
            return
        var.warned = True
        warnings.warn(
            f"Control variable {var.name!r} received no gradient in the last {self.every} steps, so it was "
            "not updated. Check that it is used in the loss; a ControlParameter inside an adjoint-mode "
            "ODEBlock needs the block to pass its buffers to the adjoint solve.",
            RuntimeWarning,
            stacklevel=3,
        )

    # --------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The controller's state: step counter, policy states, running estimates, snapshot."""
        return {
            "steps": self.steps,
            "snapshot": None if self._snapshot is None else self._snapshot.clone(),
            "variables": {
                name: {
                    "value": var.get(),
                    "batch": var.batch,
                    "policy": dict(var.state._asdict()),
                    "estimator": var.estimator.state_dict(),
                    "counts": dict(var.counts),
                    "last": dict(var.last),
                }
                for name, var in self._variables.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (the variables' values included)."""
        saved = state["variables"]
        missing = sorted(set(self._variables) - set(saved))
        extra = sorted(set(saved) - set(self._variables))
        if missing or extra:
            raise ValueError(
                f"The state does not match this controller's variables {sorted(self._variables)}: "
                f"missing {missing}, unexpected {extra}."
            )
        self.steps = int(state["steps"])
        snapshot = state["snapshot"]
        self._snapshot = None if snapshot is None else snapshot.clone()
        for name, var in self._variables.items():
            entry = saved[name]
            var.set(float(entry["value"]))
            var.batch = entry["batch"]
            var.state = PolicyState(**entry["policy"])
            var.estimator.load_state_dict(entry["estimator"])
            var.counts = dict(entry["counts"])
            var.last = dict(entry["last"])

    def __repr__(self) -> str:
        return f"Controller(policy={self.policy!r}, every={self.every}, variables={self.names})"


def _get_t1(block: ODEBlock) -> float:
    return block.t1


def _trust_region(value: float, delta: float, max_step: float, positive: bool) -> float:
    """Limit ``delta``: a positive variable (a horizon) changes at most by the factor
    ``1 + max_step`` either way; another by at most ``max_step * max(|value|, 1)``."""
    if positive and value > 0:
        up, down = value * max_step, value * max_step / (1.0 + max_step)
    else:
        up = down = max_step * max(abs(value), 1.0)
    return max(-down, min(up, delta))


def _enclosing_block(param: nn.Module, blocks: list[tuple[str, ODEBlock]]) -> ODEBlock | None:
    """The innermost ODE block whose modules include ``param``, if any."""
    found = None
    for _, block in blocks:
        if any(m is param for m in block.modules()):
            found = block
    return found


def _t1_key(name: str) -> str:
    """The history key of a block's horizon (as in the training loop)."""
    return f"t1/{name}" if name else "t1"
