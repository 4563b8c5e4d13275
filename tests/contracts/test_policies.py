"""The policy contract: every control policy (and curvature) passes the same suite.

A new policy joins by subclassing :class:`PolicyContract` with its Controller settings, the
bare policy object, whether its step is invariant to the loss scale, and the arguments its
constructor refuses.  The problems are one ODE block with a frozen constant field, so that
``x(T) = x0 + T`` and the optimal horizon is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snopt import Controller, ODEBlock
from snopt.control import BasePolicy, FeedbackPolicy, FixedPolicy, GradientPolicy, PolicyState, project


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Velocity(nn.Module):
    def forward(self, t, x):
        return torch.ones_like(x)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(64, 1, generator=g) - 1.0
    y = 2.0 * torch.tanh(x + 1.2) + 0.1 * torch.randn(64, 1, generator=g)
    return x, y


#: Controller arguments every policy must refuse, naming the argument.
INVALID_CONTROLLER_ARGUMENTS = [
    (dict(lr=0.0), "lr"),
    (dict(every=0), "every"),
    (dict(momentum=2.0), "momentum"),
    (dict(max_step=-1.0), "max_step"),
    (dict(warmup=-2), "warmup"),
    (dict(penalty=-1.0), "penalty"),
    (dict(curvature="newton"), "curvature"),
    (dict(feedback="yes"), "feedback"),
]


class PolicyContract:
    """The suite; subclasses set the class attributes below."""

    #: Controller settings that select the policy (and its curvature).
    settings: ClassVar[dict[str, Any]]
    #: Whether the policy's step is unchanged when the loss is multiplied by a constant.
    scale_invariant: ClassVar[bool]
    #: Whether the policy moves T at all.
    moves: ClassVar[bool] = True
    #: The bare policy (its ``init``/``update`` interface, without a Controller).
    make_policy: ClassVar[Callable[[], BasePolicy]]
    #: ``(constructor keyword arguments, the argument its error must name)`` of the bare policy.
    invalid_policy_arguments: ClassVar[list[tuple[dict[str, Any], str]]] = []

    def run(self, steps=30, scale=1.0, seed=0, start=0.4, **extra):
        torch.manual_seed(seed)
        block = ODEBlock(Velocity(), 0.0, start, method="rk4", options={"step_size": 0.1})
        model = nn.Sequential(block, nn.Tanh(), nn.Linear(1, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1 / scale)  # the same parameter path at every scale
        settings = dict(self.settings, every=2, warmup=0, penalty=1e-3 * scale, optimizer=opt)
        settings.update(extra)
        ctl = Controller(model, **settings)
        x, y = _problem(seed)

        def loss():
            return scale * F.mse_loss(model(x), y)

        path = []
        for _ in range(steps):
            opt.zero_grad()
            loss().backward()
            opt.step()
            ctl.step(loss)
            path.append(block.t1)
        return path, ctl, model, opt

    def test_state_dict_round_trip(self, float64):
        path, ctl, model, opt = self.run(steps=7)
        state = ctl.state_dict()
        fresh = Controller(model, **dict(self.settings, every=2, warmup=0, optimizer=opt))
        fresh.load_state_dict(state)
        assert fresh.values == ctl.values and fresh.steps == ctl.steps
        assert fresh.state_dict() == state
        assert PolicyState(**dict(PolicyState(3)._asdict())) == PolicyState(3)

    def test_seeded_runs_are_reproducible(self, float64):
        first, _, _, _ = self.run(seed=3)
        second, _, _, _ = self.run(seed=3)
        assert first == second

    @pytest.mark.parametrize("kwargs, argument", INVALID_CONTROLLER_ARGUMENTS)
    def test_invalid_hyperparameters_name_the_argument(self, kwargs, argument):
        block = ODEBlock(Velocity(), 0.0, 1.0, method="rk4", options={"step_size": 0.5})
        with pytest.raises(ValueError, match=f"`{argument}`"):
            Controller(block, **dict(self.settings, **kwargs))

    def test_invalid_policy_arguments_name_the_argument(self):
        assert self.invalid_policy_arguments, "list the arguments the policy refuses"
        for kwargs, argument in self.invalid_policy_arguments:
            with pytest.raises(ValueError, match=f"`{argument}`"):
                type(self.make_policy())(**kwargs)

    def test_convergence_on_a_quadratic(self):
        # J(phi) = h/2 (phi - 3)^2: grad h (phi - 3), curvature h.  The fixed policy never moves.
        policy = self.make_policy()
        h, phi = 2.0, -1.0
        state = policy.init(phi)
        for _ in range(60):
            delta, state = policy.update(h * (phi - 3.0), state, curvature=h, dtheta=0.0)
            phi += delta
        assert phi == pytest.approx(3.0 if self.moves else -1.0, abs=1e-8)

    def test_controller_converges_on_a_quadratic_cost(self, float64):
        # x(T) = T (from x0 = 0) against noisy targets: L(T) = mean_i (T - y_i)^2, T* = mean(y).
        # The noise variance 1/2 makes this loss a calibrated Gaussian likelihood, the one case
        # where the empirical Fisher equals the Hessian (without noise it vanishes at T*).
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(256, 1, generator=g)
        y = 1.5 + math.sqrt(0.5) * (noise - noise.mean()) / noise.std(unbiased=False)
        block = ODEBlock(Velocity(), 0.0, 0.5, method="rk4", options={"step_size": 0.05})
        lr = 0.2 if self.settings["policy"] == "gradient" else None
        ctl = Controller(block, **dict(self.settings, every=1, warmup=0, penalty=0.0, momentum=0.0, lr=lr))
        x = torch.zeros(256, 1)
        for _ in range(40):
            ((block(x) - y) ** 2).mean().backward()
            ctl.step(lambda: ((block(x) - y) ** 2).mean())
        expected = float(y.mean()) if self.moves else 0.5
        assert block.t1 == pytest.approx(expected, rel=1e-6)

    def test_feedback_step_and_loss_scale(self, float64):
        steps = {
            s: self.run(steps=2, scale=s, max_step=None)[1].stats.get("t1/0/delta", 0.0)
            for s in (1.0, 0.01, 100.0)
        }
        if self.scale_invariant:
            assert steps[0.01] == pytest.approx(steps[1.0], rel=0.01, abs=1e-15)
            assert steps[100.0] == pytest.approx(steps[1.0], rel=0.01, abs=1e-15)
        else:  # the contract records that these scale with the loss
            assert abs(steps[100.0] - steps[1.0]) > 0.01 * abs(steps[1.0])

    def test_bounds_are_a_projection_and_counted(self, float64):
        path, ctl, _, _ = self.run(steps=20, start=0.4, bounds=(0.3, 0.5), max_step=None)
        assert all(0.3 <= t <= 0.5 for t in path)
        if self.moves:  # T* is about 1.2, above the upper bound
            assert path[-1] == 0.5 and ctl.stats["t1/0/clipped"] >= 1
        assert project(0.7, (0.3, 0.5)) == (0.5, True)

    def test_trust_region_cuts_are_counted(self, float64):
        _, ctl, _, _ = self.run(steps=6, start=0.05, max_step=0.1)
        stats = ctl.stats
        assert "t1/0/limited" in stats and math.isfinite(stats["t1/0/limited"])
        if self.moves:  # from T0 = 0.05 far below T*, every step is cut by a 10% trust region
            assert stats["t1/0/limited"] == stats["t1/0/updates"] == 3


class TestFixed(PolicyContract):
    settings = dict(policy="fixed")
    scale_invariant = True
    moves = False
    make_policy = FixedPolicy
    # FixedPolicy takes no arguments: nothing to refuse.
    test_invalid_policy_arguments_name_the_argument = None  # type: ignore[assignment]


class TestGradient(PolicyContract):
    settings = dict(policy="gradient", lr=0.5)
    scale_invariant = False
    make_policy = staticmethod(lambda: GradientPolicy(0.25))
    invalid_policy_arguments = [(dict(lr=-1.0), "lr")]


class TestFeedbackGaussNewton(PolicyContract):
    settings = dict(policy="feedback", curvature="gauss_newton")
    scale_invariant = True
    make_policy = staticmethod(lambda: FeedbackPolicy(1.0))
    invalid_policy_arguments = [(dict(lr=0.0), "lr"), (dict(eps=0.0), "eps")]


class TestFeedbackFisher(PolicyContract):
    settings = dict(policy="feedback", curvature="fisher")
    scale_invariant = False
    make_policy = staticmethod(lambda: FeedbackPolicy(1.0))
    invalid_policy_arguments = [(dict(lr=0.0), "lr"), (dict(eps=0.0), "eps")]
