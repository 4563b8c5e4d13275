"""Costs ``c(phi)`` on control variables, added to the training loss (a registry by name).

For a horizon the cost acts on the *duration* ``t1 - t0`` of its block, not on the absolute
end time: a block that starts at ``t0 = 5`` and runs for 0.1 costs what one from 0 to 0.1 does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, final

from .._defaults import COSTS
from ._checks import check_nonnegative


class BaseCost(ABC):
    """A cost ``c(phi)`` on a control variable, added to the training loss.

    Costs contribute ``c'(phi)`` to ``Q_phi`` and ``c''(phi)`` to ``Q_phiphi``.

    Args:
        weight: the cost's weight (>= 0).
    """

    name: ClassVar[str]

    def __init__(self, weight: float) -> None:
        self.weight = check_nonnegative("penalty", weight)

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


#: Cost classes by name (:data:`snopt._defaults.COSTS` lists the names).
COST_REGISTRY: dict[str, type[BaseCost]] = {cls.name: cls for cls in (QuadraticCost, LinearCost)}


def make_cost(cost: str | BaseCost, penalty: float = 0.0) -> BaseCost:
    """A cost object from a name (``"quadratic"`` or ``"linear"``) and a weight.

    Args:
        cost: a name from :data:`COST_REGISTRY`, or a :class:`BaseCost` (then ``penalty`` is ignored).
        penalty: the weight of a named cost (>= 0).

    Returns:
        The :class:`BaseCost`.
    """
    if isinstance(cost, BaseCost):
        return cost
    if not isinstance(cost, str) or cost not in COST_REGISTRY:
        raise ValueError(f"`cost` must be one of {list(COSTS)} or a BaseCost, but got cost={cost!r}.")
    return COST_REGISTRY[cost](penalty)
