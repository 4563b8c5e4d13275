"""The policy contract: every control policy (and curvature) passes the same suite."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snopt import Controller, ODEBlock
from snopt.control import FeedbackPolicy, FixedPolicy, GradientPolicy, PolicyState, project

#: (policy, controller settings): fixed, gradient, feedback with each curvature.
CASES = {
    "fixed": dict(policy="fixed"),
    "gradient": dict(policy="gradient", lr=0.5),
    "feedback-gauss_newton": dict(policy="feedback", curvature="gauss_newton"),
    "feedback-fisher": dict(policy="feedback", curvature="fisher"),
}
#: Whether the policy's step is unchanged when the loss is multiplied by a constant.
SCALE_INVARIANT = {"fixed": True, "gradient": False, "feedback-gauss_newton": True, "feedback-fisher": False}


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


def _run(case, steps=30, scale=1.0, seed=0, start=0.4, **extra):
    torch.manual_seed(seed)
    block = ODEBlock(Velocity(), 0.0, start, method="rk4", options={"step_size": 0.1})
    model = nn.Sequential(block, nn.Tanh(), nn.Linear(1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1 / scale)  # the same parameter path at every scale
    settings = dict(CASES[case], every=2, warmup=0, penalty=1e-3 * scale, optimizer=opt)
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


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip(float64, case):
    path, ctl, model, opt = _run(case, steps=7)
    state = ctl.state_dict()
    fresh = Controller(model, **dict(CASES[case], every=2, warmup=0, optimizer=opt))
    fresh.load_state_dict(state)
    assert fresh.values == ctl.values and fresh.steps == ctl.steps
    assert fresh.state_dict() == state
    assert PolicyState(**dict(PolicyState(3)._asdict())) == PolicyState(3)


@pytest.mark.parametrize("case", list(CASES))
def test_seeded_runs_are_reproducible(float64, case):
    first, _, _, _ = _run(case, seed=3)
    second, _, _, _ = _run(case, seed=3)
    assert first == second


@pytest.mark.parametrize(
    "case, kwargs, argument",
    [
        (case, kwargs, argument)
        for case in CASES
        for kwargs, argument in [
            (dict(lr=0.0), "lr"),
            (dict(every=0), "every"),
            (dict(momentum=2.0), "momentum"),
            (dict(max_step=-1.0), "max_step"),
            (dict(warmup=-2), "warmup"),
            (dict(penalty=-1.0), "penalty"),
            (dict(curvature="newton"), "curvature"),
            (dict(feedback="yes"), "feedback"),
        ]
    ],
)
def test_invalid_hyperparameters_name_the_argument(case, kwargs, argument):
    block = ODEBlock(Velocity(), 0.0, 1.0, method="rk4", options={"step_size": 0.5})
    settings = dict(CASES[case])
    settings.update(kwargs)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        Controller(block, **settings)


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: GradientPolicy(-1.0), "lr"),
        (lambda: FeedbackPolicy(0.0), "lr"),
        (lambda: FeedbackPolicy(eps=0.0), "eps"),
    ],
)
def test_invalid_policy_arguments_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        make()


@pytest.mark.parametrize(
    "policy", [FixedPolicy(), GradientPolicy(0.25), FeedbackPolicy(1.0)], ids=lambda p: p.name
)
def test_convergence_on_a_quadratic(policy):
    # J(phi) = h/2 (phi - 3)^2: grad h (phi - 3), curvature h.  The fixed policy never moves.
    h, phi = 2.0, -1.0
    state = policy.init(phi)
    for _ in range(60):
        delta, state = policy.update(h * (phi - 3.0), state, curvature=h, dtheta=0.0)
        phi += delta
    assert phi == pytest.approx(-1.0 if policy.name == "fixed" else 3.0, abs=1e-8)


@pytest.mark.parametrize("case", list(CASES))
def test_controller_converges_on_a_quadratic_cost(float64, case):
    # x(T) = T (from x0 = 0) against noisy targets: L(T) = mean_i (T - y_i)^2, T* = mean(y).
    # The noise variance 1/2 makes this loss a calibrated Gaussian likelihood, the one case
    # where the empirical Fisher equals the Hessian (without noise it vanishes at T*).
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 1, generator=g)
    y = 1.5 + math.sqrt(0.5) * (noise - noise.mean()) / noise.std(unbiased=False)
    block = ODEBlock(Velocity(), 0.0, 0.5, method="rk4", options={"step_size": 0.05})
    lr = 0.2 if case == "gradient" else None
    ctl = Controller(block, **dict(CASES[case], every=1, warmup=0, penalty=0.0, momentum=0.0, lr=lr))
    x = torch.zeros(256, 1)
    for _ in range(40):
        ((block(x) - y) ** 2).mean().backward()
        ctl.step(lambda: ((block(x) - y) ** 2).mean())
    expected = 0.5 if case == "fixed" else float(y.mean())
    assert block.t1 == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_feedback_step_and_loss_scale(float64, case):
    steps = {
        s: _run(case, steps=2, scale=s, max_step=None)[1].stats.get("t1/0/delta", 0.0)
        for s in (1.0, 0.01, 100.0)
    }
    if SCALE_INVARIANT[case]:
        assert steps[0.01] == pytest.approx(steps[1.0], rel=0.01, abs=1e-15)
        assert steps[100.0] == pytest.approx(steps[1.0], rel=0.01, abs=1e-15)
    else:  # the contract records that these scale with the loss
        assert abs(steps[100.0] - steps[1.0]) > 0.01 * abs(steps[1.0])


@pytest.mark.parametrize("case", list(CASES))
def test_bounds_are_a_projection_and_counted(float64, case):
    path, ctl, _, _ = _run(case, steps=20, start=0.4, bounds=(0.3, 0.5), max_step=None)
    assert all(0.3 <= t <= 0.5 for t in path)
    if case != "fixed":  # T* is about 1.2, above the upper bound
        assert path[-1] == 0.5 and ctl.stats["t1/0/clipped"] >= 1
    assert project(0.7, (0.3, 0.5)) == (0.5, True)


@pytest.mark.parametrize("case", list(CASES))
def test_trust_region_cuts_are_counted(float64, case):
    _, ctl, _, _ = _run(case, steps=6, start=0.05, max_step=0.1)
    stats = ctl.stats
    assert "t1/0/limited" in stats and math.isfinite(stats["t1/0/limited"])
    if case != "fixed":  # from T0 = 0.05 far below T*, every step is cut by a 10% trust region
        assert stats["t1/0/limited"] == stats["t1/0/updates"] == 3
