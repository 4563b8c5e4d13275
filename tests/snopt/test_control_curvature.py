"""Gauss-Newton curvature and feedback term, against autograd on closed-form models (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snopt import Controller, ControlParameter, ODEBlock


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Velocity(nn.Module):
    """``dx/dt = v``: ``x(T) = x0 + v T`` (linear in T, so Gauss-Newton is the exact Hessian)."""

    def __init__(self, dim):
        super().__init__()
        self.v = nn.Parameter(torch.randn(dim))

    def forward(self, t, x):
        return self.v.expand_as(x)


LOSSES = {
    "mse": (lambda out, y: F.mse_loss(out, y), lambda n, k, g: torch.randn(n, k, generator=g)),
    "cross_entropy": (F.cross_entropy, lambda n, k, g: torch.randint(0, k, (n,), generator=g)),
}


def _setup(loss, method, seed=0, dim=3, classes=4, n=16, step=0.1):
    torch.manual_seed(seed)
    options = {"step_size": step} if method == "rk4" else {}
    block = ODEBlock(Velocity(dim), 0.0, 0.8, method=method, options=options, rtol=1e-9, atol=1e-9)
    model = nn.Sequential(block, nn.Linear(dim, classes))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, dim, generator=g)
    fn, target = LOSSES[loss]
    return model, block, x, target(n, classes, g), fn


def _closed_form(model, block, x, y, fn, scale):
    head = model[1]
    v = block.func.v.detach()

    def loss_of(t):
        return scale * fn((x + v * t) @ head.weight.detach().T + head.bias.detach(), y)

    t = torch.tensor(block.t1)
    return float(torch.autograd.functional.jacobian(loss_of, t)), float(
        torch.autograd.functional.hessian(loss_of, t)
    )


def _one_update(model, x, y, fn, scale, **kwargs):
    settings = dict(policy="feedback", every=1, penalty=0.0, max_step=None, momentum=0.0, warmup=0)
    settings.update(kwargs)
    ctl = Controller(model, **settings)
    (scale * fn(model(x), y)).backward()
    ctl.step(lambda: scale * fn(model(x), y))
    ctl.remove_hooks()
    return ctl.stats


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_gauss_newton_matches_the_exact_second_derivative(float64, loss, method):
    model, block, x, y, fn = _setup(loss, method)
    grad, hessian = _closed_form(model, block, x, y, fn, 1.0)
    stats = _one_update(model, x, y, fn, 1.0)
    assert stats["t1/0/Q_phi"] == pytest.approx(grad, rel=1e-7)
    assert stats["t1/0/Q_phiphi"] == pytest.approx(hessian, rel=1e-6)
    assert stats["t1/0/Q_phi_now"] == pytest.approx(grad, rel=1e-6)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_feedback_step_is_invariant_to_the_scale_of_the_loss(float64, loss):
    deltas = {}
    for scale in (1.0, 0.01, 100.0):
        model, block, x, y, fn = _setup(loss, "rk4")
        stats = _one_update(model, x, y, fn, scale)
        deltas[scale] = stats["t1/0/delta"]
    assert deltas[1.0] != 0.0
    assert deltas[0.01] == pytest.approx(deltas[1.0], rel=0.01)
    assert deltas[100.0] == pytest.approx(deltas[1.0], rel=0.01)
    # The paper's outer product is not: a loss times 100 gives a step 100 times smaller.
    fisher = {}
    for scale in (1.0, 100.0):
        model, block, x, y, fn = _setup(loss, "rk4")
        fisher[scale] = _one_update(model, x, y, fn, scale, curvature="fisher", lr=0.01)["t1/0/delta"]
    assert fisher[100.0] == pytest.approx(fisher[1.0] / 100, rel=1e-6)


class ScaledHead(nn.Module):
    """``out = W x(T) * s`` with ``s`` a ControlParameter outside the ODE block."""

    def __init__(self):
        super().__init__()
        self.block = ODEBlock(Velocity(3), 0.0, 0.8, method="rk4", options={"step_size": 0.2})
        self.head = nn.Linear(3, 4)
        self.s = ControlParameter(0.7)

    def forward(self, x):
        return self.head(self.block(x)) * self.s()


class DampedField(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = ControlParameter(0.6)

    def forward(self, t, x):
        return -self.k() * x


@pytest.mark.parametrize("loss", list(LOSSES))
def test_gauss_newton_of_a_declared_parameter(float64, loss):
    torch.manual_seed(0)
    model = ScaledHead()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3, generator=g)
    fn, target = LOSSES[loss]
    y = target(16, 4, g)
    v, head = model.block.func.v.detach(), model.head

    def loss_of(s):  # linear in s: Gauss-Newton is exact
        return fn(head(x + v * 0.8).detach() * s, y)

    s = torch.tensor(0.7)
    hessian = float(torch.autograd.functional.hessian(loss_of, s))
    stats = _one_update(model, x, y, fn, 1.0, horizons=False)
    assert stats["s/Q_phiphi"] == pytest.approx(hessian, rel=1e-6)


def test_gauss_newton_inside_a_block_is_j_h_j(float64):
    # x(T) = x0 exp(-k T): the output is not linear in k, so compare with J^T H J itself.
    block = ODEBlock(DampedField(), 0.0, 1.0, method="dopri5", rtol=1e-10, atol=1e-10, adjoint=True)
    x = torch.linspace(0.5, 1.5, 8).reshape(8, 1)
    y = torch.full((8, 1), 0.3)
    stats = _one_update(block, x, y, F.mse_loss, 1.0, horizons=False)
    k = 0.6
    jac = -x * math.exp(-k)  # d x(1) / dk
    assert stats["field.func.k/Q_phiphi"] == pytest.approx(float((2 / 8) * (jac**2).sum()), rel=1e-4)


class ThreeHeads(nn.Module):
    """Blocks in sequence: a horizon's tangent goes through the later blocks' solves."""

    def __init__(self):
        super().__init__()
        solver = dict(method="dopri5", rtol=1e-9, atol=1e-9)
        self.a = ODEBlock(Rotation(0.9), 0.0, 0.3, **solver)
        self.b = ODEBlock(Rotation(-0.4), 0.0, 0.7, **solver)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


class Rotation(nn.Module):
    def __init__(self, omega):
        super().__init__()
        self.omega = omega

    def forward(self, t, x):
        return self.omega * torch.stack([-x[:, 1], x[:, 0]], 1)


def _rotate(x, angle):
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1]], 1)


def test_gauss_newton_through_later_blocks(float64):
    torch.manual_seed(0)
    model = ThreeHeads()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 2, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    weight, bias = model.head.weight.detach(), model.head.bias.detach()

    def logits(ta, tb):  # the closed form: two rotations, then the head
        return _rotate(_rotate(x, 0.9 * ta), -0.4 * tb) @ weight.T + bias

    def gauss_newton(direction):  # J^T H J along a direction in (T_a, T_b)
        def along(t):
            return logits(0.3 + direction[0] * t, 0.7 + direction[1] * t)

        zero = torch.tensor(0.0)
        jac = torch.autograd.functional.jacobian(along, zero)
        hjac = torch.autograd.functional.hvp(lambda out: F.cross_entropy(out, y), along(zero), jac)[1]
        return float((jac * hjac).sum())

    stats = _one_update(model, x, y, F.cross_entropy, 1.0)
    assert stats["t1/a/Q_phiphi"] == pytest.approx(gauss_newton((1.0, 0.0)), rel=1e-4)
    assert stats["t1/b/Q_phiphi"] == pytest.approx(gauss_newton((0.0, 1.0)), rel=1e-4)


@pytest.mark.parametrize("every, momentum, updates", [(1, 0.0, 25), (5, 0.9, 20)])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_feedback_term_predicts_the_drift_of_the_full_batch_gradient(float64, loss, every, momentum, updates):
    """Full batch, so the drift of dJ/dT caused by one optimizer step is exact by autograd on the
    closed form x(T) = x0 + v T (a trained field and head).  With updates every 5 steps and running
    averages (momentum 0.9), the term is the drift over the update step's own parameter change."""
    # RK4 is exact on x' = v at any step: two steps of 0.4 give the eight steps of 0.1's numbers.
    model, block, x, y, fn = _setup(loss, "rk4", n=64, step=0.4)
    head = model[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    ctl = Controller(
        model, warmup=0, policy="feedback", lr=0.3, every=every, momentum=momentum, penalty=0.0, optimizer=opt
    )

    def full_batch_q_t():
        v, weight, bias = block.func.v.detach(), head.weight.detach(), head.bias.detach()
        return float(
            torch.autograd.functional.jacobian(
                lambda t: fn((x + v * t) @ weight.T + bias, y), torch.tensor(block.t1)
            )
        )

    predicted, drift = [], []
    for step in range(1, every * updates + 1):
        opt.zero_grad()
        before = full_batch_q_t()
        fn(model(x), y).backward()
        opt.step()
        after = full_batch_q_t()
        ctl.step(lambda: fn(model(x), y))
        if step % every == 0:
            predicted.append(ctl.stats["t1/0/feedback"])
            drift.append(after - before)
    assert ctl.stats["t1/0/updates"] == updates
    p, d = torch.tensor(predicted), torch.tensor(drift)
    correlation = float(torch.corrcoef(torch.stack([p, d]))[0, 1])
    assert correlation > 0.4
    # Q_T + Q_Ttheta dtheta predicts the next Q_T better than Q_T alone; at every=5 a term built
    # from the window's five updates, from the step before, or from none would not.
    assert float((p - d).abs().mean()) < 0.9 * float(d.abs().mean())


def test_a_loss_linear_in_the_output_falls_back_to_the_fisher_curvature(float64):
    """A CNF's loss is ``-model(x).mean()``: no curvature in the output, so J^T H J = 0 says nothing."""
    torch.manual_seed(0)
    block = ODEBlock(Velocity(3), 0.0, 0.8, method="rk4", options={"step_size": 0.1})
    model = nn.Sequential(block, nn.Linear(3, 1))
    x = torch.randn(16, 3)
    stats = _one_update(model, x, None, lambda out, _: -out.mean(), 1.0)
    # l_i = -w . (x_i + v T) - b, so dl_i/dT = -w . v for every sample: E_i[(dl_i/dT)^2] = (w . v)^2.
    slope = float(model[1].weight.detach()[0] @ block.func.v.detach())
    assert stats["t1/0/Q_phiphi"] == pytest.approx(slope**2, rel=1e-9)
    assert stats["t1/0/fisher_fallback"] == 1
    assert stats["t1/0/delta"] == pytest.approx(1.0 / slope, rel=1e-6)  # -Q_T / Q_TT, Q_T = -w . v


class MeanAndLogVariance(nn.Module):
    """``x(T) = x0 + v T`` into a head with two outputs, a mean and a log-variance (both linear in T)."""

    def __init__(self, dim=3):
        super().__init__()
        self.block = ODEBlock(Velocity(dim), 0.0, 0.8, method="rk4", options={"step_size": 0.1})
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        return self.head(self.block(x))


def _gaussian_nll(out, y):
    return F.gaussian_nll_loss(out[:, 0], y, out[:, 1].exp())


def test_gauss_newton_of_a_gaussian_nll_matches_the_exact_second_derivative(float64):
    """The loss's Hessian in the output (heteroscedastic: 1/variance, and the log-variance's own
    terms) comes through the closure; the model output is linear in T, so J^T H J is d2J/dT2."""
    torch.manual_seed(0)
    model = MeanAndLogVariance()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 3, generator=g)
    y = torch.randn(32, generator=g)
    v, head = model.block.func.v.detach(), model.head

    def loss_of(t):
        out = (x + v * t) @ head.weight.detach().T + head.bias.detach()
        return _gaussian_nll(out, y)

    t = torch.tensor(0.8)
    hessian = float(torch.autograd.functional.hessian(loss_of, t))
    grad = float(torch.autograd.functional.jacobian(loss_of, t))
    assert hessian > 0.0  # else the controller would clip it at 0 and the comparison says nothing
    # Not the Hessian of an MSE on the mean: the variance weighs each sample.
    mse_like = float(
        torch.autograd.functional.hessian(
            lambda s: 0.5 * F.mse_loss((x + v * s) @ head.weight.detach()[0] + head.bias.detach()[0], y), t
        )
    )
    assert abs(mse_like - hessian) > 0.1 * hessian
    stats = _one_update(model, x, y, _gaussian_nll, 1.0)
    assert stats["t1/block/Q_phi"] == pytest.approx(grad, rel=1e-7)
    assert stats["t1/block/Q_phiphi"] == pytest.approx(hessian, rel=1e-6)
