"""Control policies: small objects with explicit state that turn ``Q`` estimates into a change.

``state = policy.init(value)`` once, then ``delta, state = policy.update(grad, state,
curvature=..., dtheta=...)`` for every control update (optax's gradient transformations).
Policies are found by name in :data:`POLICY_REGISTRY`; a variant with another step size is
``policy.with_lr(lr)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple, final

from .. import _defaults as D
from .._defaults import POLICIES
from ._checks import Bounds, Schedule, check_real, check_schedule, step_size

#: Step size ``eta`` of each policy when none is given (:data:`snopt._defaults.POLICY_LR` says how
#: each was chosen).  The gradient policy's step is in units of T per unit of ``Q_phi``, the
#: feedback policy's is a fraction of a Gauss-Newton step.
DEFAULT_LR = D.POLICY_LR


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
        check_real("value", value)
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

    def with_lr(self, lr: Schedule) -> BasePolicy:
        """This policy with another step size (a policy without one is returned as is)."""
        return self


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
        self.lr = check_schedule("lr", lr)

    def update(
        self, grad: float, state: PolicyState, *, curvature: float | None = None, dtheta: float | None = None
    ) -> tuple[float, PolicyState]:
        """``-eta * grad``; ``curvature`` and ``dtheta`` are ignored."""
        eta = step_size("lr", self.lr, state.updates)
        return -eta * float(grad), PolicyState(state.updates + 1)

    def with_lr(self, lr: Schedule) -> GradientPolicy:
        """This policy with the step size ``lr``."""
        return GradientPolicy(lr)

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
        self.lr = check_schedule("lr", lr)
        eps = check_real("eps", eps)
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
        eta = step_size("lr", self.lr, state.updates)
        feedback = 0.0 if dtheta is None else float(dtheta)
        return -eta * (float(grad) + feedback) / (float(curvature) + self.eps), PolicyState(state.updates + 1)

    def with_lr(self, lr: Schedule) -> FeedbackPolicy:
        """This policy with the step size ``lr`` (the same ``eps``)."""
        return FeedbackPolicy(lr, eps=self.eps)

    def __repr__(self) -> str:
        return f"FeedbackPolicy(lr={self.lr!r}, eps={self.eps})"


#: Policy classes by name (:data:`snopt._defaults.POLICIES` lists the names).
POLICY_REGISTRY: dict[str, type[BasePolicy]] = {
    cls.name: cls for cls in (FixedPolicy, GradientPolicy, FeedbackPolicy)
}


def make_policy(policy: str | BasePolicy, lr: Schedule | None = None) -> BasePolicy:
    """A policy from its name (``"fixed"``, ``"gradient"``, ``"feedback"``) and step size.

    Args:
        policy: a name from :data:`POLICY_REGISTRY`, or a :class:`BasePolicy` (returned as is).
        lr: the step size of a named policy; None for its :data:`DEFAULT_LR`.

    Returns:
        The :class:`BasePolicy`.
    """
    if isinstance(policy, BasePolicy):
        return policy
    if not isinstance(policy, str) or policy not in POLICY_REGISTRY:
        raise ValueError(
            f"`policy` must be one of {list(POLICIES)} or a BasePolicy, but got policy={policy!r}."
        )
    made = POLICY_REGISTRY[policy]()
    return made if lr is None else made.with_lr(lr)


def project(value: float, bounds: Bounds | None) -> tuple[float, bool]:
    """Clip ``value`` into ``bounds``; returns the result and whether it was clipped."""
    if bounds is None:
        return value, False
    low, high = bounds
    clipped = min(max(value, low), high)
    return clipped, clipped != value
