"""Control variables and their policies: horizons and other architecture parameters, tuned in training.

A *control variable* ``phi`` is a continuous architecture parameter that the optimizer of the
network parameters ``theta`` does not move: the horizon ``t1`` of every :class:`~snopt.ODEBlock`,
and any scalar declared with :class:`ControlParameter`.  A :class:`Controller` moves them inside
training to lower ``J = L + c(phi)``, the training loss plus a cost on the architecture,
following SNOpt's policy (Liu, Chen & Theodorou, NeurIPS 2021, section 3.3).  For a horizon the
cost and the trust region act on the block's duration ``t1 - t0``.

The math, for one variable:

- ``Q_phi = dL/dphi + c'(phi)``.  For a horizon, ``dL/dT = dL/dx(T) . f(T, x(T))`` is exact
  and comes from the backward pass (:attr:`ODEBlock.t1_grad`), whatever else requires grad;
  for a declared parameter it is the gradient autograd leaves on it.  Between two updates
  (every ``every`` steps) the controller averages them with momentum.
- ``Q_phiphi``: by default the Gauss-Newton ``J^T H J`` (``J = d output / dphi``, ``H`` the
  Hessian of the loss in the model output), which carries the loss's own scale, so the
  feedback step does not change when the loss is multiplied by a constant; or the paper's
  empirical Fisher ``E_i[(dl_i/dphi)^2]`` (``curvature="fisher"``).  See
  :mod:`snopt.control._estimators` for when each is right.
- ``Q_phitheta . dtheta``: the Gauss-Newton cross term along the optimizer's last update,
  ``(H J) . (output(theta) - output(theta - dtheta))``, the predicted change of ``Q_phi``
  that the parameter update causes.

Minimising the second-order expansion of ``J`` in ``dphi`` for a given ``dtheta`` gives the
feedback policy ``dphi = -eta Q_phiphi^-1 (Q_phi + Q_phitheta . dtheta)``: an open-loop gain
plus a feedback gain on the optimizer's update.  The first-order baseline is ``dphi = -eta
Q_phi``.  An update is limited to a relative trust region (``max_step``) and projected onto the
bounds; both events are counted in :attr:`Controller.stats`, never silent.

Modules: ``_costs`` (costs), ``_policies`` (policies), ``_estimators`` (curvature and feedback
estimates), ``_parameter`` (:class:`ControlParameter`), ``_controller`` (:class:`Controller`).
"""

from .._defaults import CURVATURES
from ._checks import Bounds, Schedule, check_max_step, check_momentum, check_warmup
from ._controller import MIN_HORIZON, Controller
from ._costs import COST_REGISTRY, BaseCost, LinearCost, QuadraticCost, make_cost
from ._parameter import ControlParameter
from ._policies import (
    DEFAULT_LR,
    POLICY_REGISTRY,
    BasePolicy,
    FeedbackPolicy,
    FixedPolicy,
    GradientPolicy,
    PolicyState,
    make_policy,
    project,
)

__all__ = [
    "COST_REGISTRY",
    "CURVATURES",
    "DEFAULT_LR",
    "MIN_HORIZON",
    "POLICY_REGISTRY",
    "BaseCost",
    "BasePolicy",
    "Bounds",
    "ControlParameter",
    "Controller",
    "FeedbackPolicy",
    "FixedPolicy",
    "GradientPolicy",
    "LinearCost",
    "PolicyState",
    "QuadraticCost",
    "Schedule",
    "check_max_step",
    "check_momentum",
    "check_warmup",
    "make_cost",
    "make_policy",
    "project",
]
