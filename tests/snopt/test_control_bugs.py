"""The four control bugs of issue 13, each checked against an independent computation."""

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
    """``dx/dt = v``: ``x(T) = x(t0) + v (T - t0)``."""

    def __init__(self, dim, trainable=True):
        super().__init__()
        self.v = nn.Parameter(torch.linspace(0.5, 1.5, dim), requires_grad=trainable)

    def forward(self, t, x):
        return self.v.expand_as(x)


def _data(n=32, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randn(n, 2, generator=g)
    return x, y


# --------------------------------------------------------------- (1) no accumulation
def _plain_loop(zero_by_hand):
    torch.manual_seed(0)
    block = ODEBlock(Velocity(2), 0.0, 0.5, method="rk4", options={"step_size": 0.1}, adjoint=False)
    model = nn.Sequential(block, nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = Controller(model, warmup=0, policy="gradient", lr=0.5, every=2, penalty=0.0, optimizer=opt)
    x, y = _data()
    for _ in range(12):
        opt.zero_grad()
        if zero_by_hand:
            block.zero_t1_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        ctl.step(lambda: F.mse_loss(model(x), y))
    return block.t1


def test_plain_loop_as_in_the_docstring_does_not_accumulate_dl_dt(float64):
    # The docstring's loop never calls block.zero_t1_grad(); it must move T as fit() does.
    assert _plain_loop(zero_by_hand=False) == pytest.approx(_plain_loop(zero_by_hand=True), rel=1e-12)
    assert _plain_loop(zero_by_hand=True) != 0.5


# ------------------------------------------- (2) batch size outside any ODE block
class Scaled(nn.Module):
    """``out = s * head(x)`` with ``s`` a ControlParameter outside every ODE block."""

    def __init__(self):
        super().__init__()
        self.block = ODEBlock(Velocity(2), 0.0, 0.5, method="rk4", options={"step_size": 0.25})
        self.head = nn.Linear(2, 2)
        self.scale = ControlParameter(0.7)

    def forward(self, x):
        return self.scale() * self.head(self.block(x))


def test_fisher_term_of_a_parameter_outside_any_block_uses_the_batch_size(float64):
    torch.manual_seed(0)
    model = Scaled()
    x, y = _data(n=128, seed=1)
    # The brute-force empirical Fisher over the data set: mean_i (dl_i/ds)^2.
    per_sample = []
    for i in range(len(x)):
        model.scale.value.grad = None
        F.mse_loss(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        per_sample.append(float(model.scale.grad) ** 2)
    fisher = sum(per_sample) / len(per_sample)
    model.scale.value.grad = None
    ctl = Controller(
        model,
        warmup=0,
        policy="feedback",
        every=8,
        momentum=1.0,
        curvature="fisher",
        horizons=False,
        max_step=1e-12,
    )
    g = torch.Generator().manual_seed(2)
    estimates = []
    for _ in range(10):  # 10 windows of 8 batches of 32, the value kept (almost) fixed
        for _ in range(8):
            idx = torch.randint(0, len(x), (32,), generator=g)
            F.mse_loss(model(x[idx]), y[idx], reduction="sum").div(32).backward()
            ctl.step()
        estimates.append(ctl.stats["scale/Q_phiphi"])
    mean = sum(estimates) / len(estimates)
    # With batch size 1 in place of 32 the estimate would be about 20 times smaller.
    assert mean == pytest.approx(fisher, rel=0.3)


# --------------------------------------------- (3) frozen field, input without grad
def test_frozen_field_on_an_input_without_grad_still_gives_dl_dt(float64):
    block = ODEBlock(Velocity(2, trainable=False), 0.0, 0.8, method="rk4", options={"step_size": 0.1})
    head = nn.Linear(2, 2)
    x, y = _data()
    assert not x.requires_grad and not any(p.requires_grad for p in block.parameters())
    F.mse_loss(head(block(x)), y).backward()
    v = block.func.v.detach()

    def loss_of(t1):  # the closed form x(T) = x + v T through the head
        return F.mse_loss(head(x + v * t1), y)

    expected = torch.autograd.functional.jacobian(loss_of, torch.tensor(0.8))
    assert block.t1_grad is not None
    assert float(block.t1_grad) == pytest.approx(float(expected), rel=1e-10)

    # The same with the loss on the block's output alone (nothing else requires grad).
    block.zero_t1_grad()
    F.mse_loss(block(x), y).backward()
    expected = 2 * ((x + v * 0.8 - y) * v).mean()
    assert float(block.t1_grad) == pytest.approx(float(expected), rel=1e-10)


# ----------------------------------------------- (4) cost and trust region on t1 - t0
def _shifted_problem(t0, start, updates, max_step=None, penalty=0.5):
    block = ODEBlock(Velocity(1), t0, t0 + start, method="rk4", options={"step_size": 0.05}, adjoint=False)
    x = torch.zeros(16, 1)
    y = torch.full((16, 1), 1.5)
    ctl = Controller(block, warmup=0, policy="feedback", lr=1.0, penalty=penalty, every=1, max_step=max_step)
    path = [block.t1 - t0]
    for _ in range(updates):
        F.mse_loss(block(x), y).backward()
        ctl.step(lambda: F.mse_loss(block(x), y))
        path.append(block.t1 - t0)
    return path


def test_cost_acts_on_the_duration(float64):
    # x(T) = v d with d = T - t0: J(d) = (v d - 1.5)^2 + c/2 d^2, so d* = 3 v / (2 v^2 + c).
    c, v = 0.25, 0.5
    d_star = 3 * v / (2 * v * v + c)
    for t0 in (0.0, 3.0):
        path = _shifted_problem(t0, 0.4, 6, penalty=c)
        assert path[-1] == pytest.approx(d_star, rel=1e-6), (t0, path)


def test_trust_region_acts_on_the_duration(float64):
    # From a duration of 0.1 at t0 = 5 an update may double the duration, not move T by 5.1.
    path = _shifted_problem(5.0, 0.1, 1, max_step=1.0, penalty=0.0)
    assert path[1] == pytest.approx(0.2, rel=1e-9)
    assert math.isfinite(path[1])
