"""The feedback policy with default settings finds closed-form optimal horizons T* in training.

The whole grid of the one-block problem (three noise levels, two starts, dopri5, 1,100 steps
each) and the three-block problem take minutes: they run this file as a script in a
subprocess (``python test_control_optimum.py horizon NOISE START`` or ``... three``) and are
marked ``integration``.  One case of the grid, with a solver that is exact on its field, runs
in the fast suite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import nn

from snopt import Controller, ODEBlock


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _in_subprocess(*args: str) -> dict:
    """Run this file as a script with ``args``; the dict it prints as JSON."""
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


# --------------------------------------- one block: constant velocity, a trained head
class Velocity(nn.Module):
    """``dx/dt = 1`` (frozen): ``x(T) = x0 + T``."""

    def forward(self, t, x):
        return torch.ones_like(x)


T_TRUE, PENALTY = 1.5, 0.01
#: The solver of the grid; RK4 and any step size are exact on a constant field too.
DOPRI5 = dict(method="dopri5", rtol=1e-7, atol=1e-7)


def velocity_data(noise, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, generator=g) * 2.0 - 2.0
    y = 2.0 * torch.tanh(x0 + T_TRUE) - 0.5 + noise * torch.randn(n, 1, generator=g)
    return x0, y


def velocity_optimum(x0, y, c=PENALTY):
    """argmin_T min_{w,b} mean((w tanh(x0 + T) + b - y)^2) + c/2 T^2: least squares inside."""

    def profile(t):
        features = torch.cat([torch.tanh(x0 + t), torch.ones_like(x0)], 1)
        coef = torch.linalg.lstsq(features, y).solution
        return float(((features @ coef - y) ** 2).mean()) + 0.5 * c * t * t

    grid = [0.05 * k for k in range(1, 200)]
    best = min(grid, key=profile)  # unimodal on the grid; refine around its minimum
    return minimize_scalar(
        profile, bounds=(best - 0.05, best + 0.05), method="bounded", options={"xatol": 1e-10}
    ).x


def train_velocity(x0, y, start, steps=1100, **solver):  # the slowest case settles by step 904
    torch.manual_seed(0)
    block = ODEBlock(Velocity(), 0.0, start, **(solver or DOPRI5))
    model = nn.Sequential(block, nn.Tanh(), nn.Linear(1, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ctl = Controller(model, penalty=PENALTY, optimizer=opt)  # every other setting: the defaults
    path = []
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x0), y).backward()
        opt.step()
        ctl.step(lambda: F.mse_loss(model(x0), y))
        path.append(block.t1)
    return path, ctl


def horizon_case(noise, start, steps=1100, **solver) -> dict:
    """The optimum T* of one case and the path of T that training takes towards it."""
    x0, y = velocity_data(noise)
    path, ctl = train_velocity(x0, y, start, steps, **solver)
    return {"t_star": velocity_optimum(x0, y), "path": path, "updates": ctl.stats["t1/0/updates"]}


def check_horizon_case(case: dict) -> None:
    t_star, path = case["t_star"], case["path"]
    assert 0.2 < t_star < 3.5  # an interior optimum, away from both starts
    # T follows the optimum of the head it has; the joint optimum comes at the head's pace.
    tail = path[-100:]  # the last 20 updates
    assert all(abs(t - t_star) <= 0.02 * t_star for t in tail), (t_star, path[::25])
    assert case["updates"] > 0


def test_feedback_finds_the_optimal_horizon_of_a_trained_head(float64):
    # The grid's quickest case (it settles by step 429), with RK4: exact on dx/dt = 1.
    case = horizon_case(0.05, 0.3, steps=600, method="rk4", options={"step_size": 0.5})
    check_horizon_case(case)


@pytest.mark.integration
@pytest.mark.parametrize("noise, start", [(n, s) for n in (0.05, 1.0, 3.0) for s in (0.3, 4.0)])
def test_feedback_finds_the_optimal_horizon_on_the_whole_grid(noise, start):
    check_horizon_case(_in_subprocess("horizon", str(noise), str(start)))


# -------------------------- three blocks in sequence, optima ten times apart, one scale
OMEGA = 1.0
THREE_TRUE = (0.2, 1.0, 2.0)
THREE_PENALTY = 1e-3


class PairRotation(nn.Module):
    """Rotates coordinates ``(2k, 2k+1)`` of a 6-vector at rate OMEGA; leaves the rest."""

    def __init__(self, k):
        super().__init__()
        generator = torch.zeros(6, 6)
        generator[2 * k, 2 * k + 1], generator[2 * k + 1, 2 * k] = -OMEGA, OMEGA
        self.register_buffer("generator", generator)

    def forward(self, t, x):
        return x @ self.generator.T


class ThreeBlocks(nn.Module):
    def __init__(self, starts):
        super().__init__()
        solver = dict(method="rk4", options={"step_size": 0.1})
        self.blocks = nn.ModuleList(ODEBlock(PairRotation(k), 0.0, t, **solver) for k, t in enumerate(starts))
        self.scale = nn.Parameter(torch.tensor(0.5))  # the one trained parameter

    def forward(self, x):
        x = x * self.scale
        for block in self.blocks:
            x = block(x)
        return x


def rotate_pairs(x, angles):
    out = []
    for k, a in enumerate(angles):
        c, s = torch.cos(a), torch.sin(a)
        u, v = x[:, 2 * k], x[:, 2 * k + 1]
        out += [c * u - s * v, s * u + c * v]
    return torch.stack(out, 1)


def three_data(n=128, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 6, generator=g)
    angles = torch.tensor(THREE_TRUE) * OMEGA
    return x0, 1.3 * rotate_pairs(x0, angles) + noise * torch.randn(n, 6, generator=g)


def three_optimum(x0, y, c):
    """Full-batch L-BFGS on the closed form over (T1, T2, T3, scale)."""
    z = torch.tensor([*THREE_TRUE, 1.0], requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15)

    def objective():
        opt.zero_grad()
        t = z[:3]
        loss = F.mse_loss(rotate_pairs(x0 * z[3], t * OMEGA), y) + 0.5 * c * (t**2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    return [float(t) for t in z.detach()[:3]]


def three_blocks_case(steps=300) -> dict:
    """The closed-form optima of the three horizons and where training takes them."""
    x0, y = three_data()
    model = ThreeBlocks((1.0, 1.0, 1.0))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ctl = Controller(model, penalty=THREE_PENALTY, optimizer=opt)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x0), y).backward()
        opt.step()
        ctl.step(lambda: F.mse_loss(model(x0), y))
    return {
        "t_star": three_optimum(x0, y, THREE_PENALTY),
        "values": [ctl.values[f"t1/blocks.{k}"] for k in range(3)],
        "limited": sum(ctl.stats[f"t1/blocks.{k}/limited"] for k in range(3)),
        "updates": ctl.stats["updates"],
        "scale": float(model.scale),
    }


@pytest.mark.integration
def test_three_blocks_with_tenfold_different_horizons():
    case = _in_subprocess("three")
    t_star, values = case["t_star"], case["values"]
    assert t_star[2] > 8 * t_star[0]
    for value, target in zip(values, t_star):
        assert value == pytest.approx(target, rel=0.05), (values, t_star)
    assert case["limited"] <= 0.1 * 3 * case["updates"] + 6  # the trust region cuts few updates
    assert math.isfinite(case["scale"])


if __name__ == "__main__":  # the long runs of the integration tests, in their own process
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    if sys.argv[1] == "horizon":
        result = horizon_case(float(sys.argv[2]), float(sys.argv[3]))
    else:
        result = three_blocks_case()
    print(json.dumps(result))
