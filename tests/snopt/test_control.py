"""Control variables and their policies, checked against finite differences and closed-form optima."""

import math
import re

import pytest
import torch
from scipy.optimize import brentq
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snopt._control import (
    DEFAULT_LR,
    MIN_HORIZON,
    Controller,
    ControlParameter,
    FeedbackPolicy,
    FixedPolicy,
    GradientPolicy,
    LinearCost,
    PolicyState,
    QuadraticCost,
    make_cost,
    make_policy,
    project,
)
from snopt._ode import ODEBlock
from snopt._training import fit


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ------------------------------------------------------------------ policy contract
POLICY_CASES = [FixedPolicy(), GradientPolicy(0.5), FeedbackPolicy(0.5)]


@pytest.mark.parametrize("policy", POLICY_CASES, ids=lambda p: p.name)
def test_policy_contract_state_and_types(policy):
    state = policy.init(2.0)
    assert state == PolicyState(0)
    delta, state = policy.update(0.3, state, curvature=2.0, dtheta=0.1)
    assert isinstance(delta, float) and state.updates == 1
    _, state = policy.update(0.3, state, curvature=2.0, dtheta=0.1)
    assert state.updates == 2


@pytest.mark.parametrize("policy", [GradientPolicy(0.25), FeedbackPolicy(1.0)], ids=lambda p: p.name)
def test_policies_converge_on_a_quadratic(policy):
    # J(phi) = h/2 (phi - 3)^2: grad h (phi - 3), curvature h.
    h, phi = 2.0, -1.0
    state = policy.init(phi)
    for _ in range(40):
        delta, state = policy.update(h * (phi - 3.0), state, curvature=h)
        phi += delta
    assert phi == pytest.approx(3.0, abs=1e-8)


def test_policy_formulas_and_schedule():
    delta, _ = GradientPolicy(0.5).update(2.0, PolicyState(0))
    assert delta == -1.0
    delta, _ = FeedbackPolicy(0.5, eps=1e-12).update(2.0, PolicyState(0), curvature=4.0, dtheta=-1.0)
    assert delta == pytest.approx(-0.5 * (2.0 - 1.0) / 4.0)
    seen = []
    policy = GradientPolicy(lambda k: seen.append(k) or 0.1 / (k + 1))
    state = policy.init(0.0)
    deltas = []
    for _ in range(3):
        delta, state = policy.update(1.0, state)
        deltas.append(delta)
    assert seen == [0, 1, 2] and deltas == pytest.approx([-0.1, -0.05, -0.1 / 3])
    assert FixedPolicy().update(5.0, PolicyState(0))[0] == 0.0


def test_policy_input_errors():
    with pytest.raises(ValueError, match="`lr` must be a positive number"):
        GradientPolicy(0.0)
    with pytest.raises(ValueError, match="`lr` must be a positive number"):
        FeedbackPolicy(-1.0)
    with pytest.raises(ValueError, match="`eps` must be > 0"):
        FeedbackPolicy(0.1, eps=0.0)
    with pytest.raises(ValueError, match="needs `curvature`"):
        FeedbackPolicy(0.1).update(1.0, PolicyState(0))
    with pytest.raises(ValueError, match="schedule must return a positive number"):
        GradientPolicy(lambda k: -1.0).update(1.0, PolicyState(0))
    with pytest.raises(ValueError, match=r"`policy` must be one of \['fixed', 'gradient', 'feedback'\]"):
        make_policy("newton")
    with pytest.raises(ValueError, match=r"`cost` must be one of \['quadratic', 'linear'\]"):
        make_cost("cubic", 1.0)
    with pytest.raises(ValueError, match="`penalty` must be >= 0"):
        make_cost("linear", -1.0)


@pytest.mark.parametrize("cost", [QuadraticCost(0.3), LinearCost(0.3)], ids=lambda c: c.name)
def test_cost_derivatives_match_finite_differences(cost):
    h = 1e-4
    for phi in (-1.3, 0.2, 2.5):
        fd1 = (cost.value(phi + h) - cost.value(phi - h)) / (2 * h)
        fd2 = (cost.value(phi + h) - 2 * cost.value(phi) + cost.value(phi - h)) / h**2
        assert cost.grad(phi) == pytest.approx(fd1, rel=1e-7, abs=1e-9)
        assert cost.curvature(phi) == pytest.approx(fd2, abs=1e-5)


def test_project_reports_clipping():
    assert project(0.5, (0.0, 1.0)) == (0.5, False)
    assert project(1.5, (0.0, 1.0)) == (1.0, True)
    assert project(-2.0, (0.0, 1.0)) == (0.0, True)
    assert project(7.0, None) == (7.0, False)


# ------------------------------------------------------------- Q_T vs finite differences
class MLP(nn.Module):
    def __init__(self, dim=3):
        super().__init__()
        self.l1 = nn.Linear(dim + 1, 8)
        self.l2 = nn.Linear(8, dim)

    def forward(self, t, x):
        tt = t.expand(x.shape[0], 1).to(x.dtype)
        return self.l2(torch.tanh(self.l1(torch.cat([x, tt], 1))))


@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "direct"])
@pytest.mark.parametrize("cost", ["quadratic", "linear"])
def test_q_t_and_fisher_match_finite_differences(float64, adjoint, cost):
    torch.manual_seed(1)
    block = ODEBlock(MLP(), 0.0, 0.7, method="dopri5", rtol=1e-11, atol=1e-11, adjoint=adjoint)
    x = torch.randn(6, 3)
    y = torch.randn(6, 3)
    c = 0.05
    ctl = Controller(
        block,
        warmup=0,
        policy="feedback",
        lr=0.1,
        penalty=c,
        cost=cost,
        every=1,
        momentum=0.0,
        curvature="fisher",
    )

    def losses(t1):
        block.set_t1(t1)
        with torch.no_grad():
            return ((block(x) - y) ** 2).sum(1)

    h, t1 = 1e-5, 0.7
    per_sample = (losses(t1 + h) - losses(t1 - h)) / (2 * h)
    block.set_t1(t1)
    loss = ((block(x) - y) ** 2).sum(1).mean()
    loss.backward()
    ctl.step()
    stats = ctl.stats
    dcost, d2cost = (c * t1, c) if cost == "quadratic" else (c, 0.0)
    assert stats["t1/Q_phi"] == pytest.approx(float(per_sample.mean()) + dcost, rel=1e-6)
    assert stats["t1/Q_phiphi"] == pytest.approx(float((per_sample**2).mean()) + d2cost, rel=1e-6)
    assert stats["t1/updates"] == 1 and ctl.values["t1"] != t1


# --------------------------------------------------- closed-form optimal horizon (T*)
class GaussianDecay(nn.Module):
    """x' = -2 a t x, so x(T) = x0 exp(-a T^2): the loss is flat in T near 0 and for large T."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, t, x):
        return -2 * self.a * t * x


A, T_TRUE, C, SIGMA = 1.0, 1.0, 0.01, 0.5


def decay_data(n=64, seed=0, t_true=T_TRUE, sigma=SIGMA):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 1, generator=g) * 0.5 + 1.0
    y = x0 * math.exp(-A * t_true**2) + sigma * torch.randn(n, 1, generator=g)
    return x0, y


def optimal_horizon(x0, y, c=C):
    """Root of dJ/dT = 2 E[(x0 u - y) x0] du/dT + c T, with u = exp(-a T^2), du/dT = -2 a T u."""
    sxx, sxy = float((x0**2).mean()), float((x0 * y).mean())

    def djdt(t):
        u = math.exp(-A * t * t)
        return 2 * (u * sxx - sxy) * (-2 * A * t * u) + c * t

    return brentq(djdt, 1e-3, 20.0, xtol=1e-14)


def control_decay(policy, lr, t0, x0, y, updates, *, adjoint=False, bounds=None, max_step=1.0):
    block = ODEBlock(GaussianDecay(A), 0.0, t0, method="dopri5", rtol=1e-7, atol=1e-7, adjoint=adjoint)
    ctl = Controller(
        block, warmup=0, policy=policy, lr=lr, penalty=C, every=1, bounds=bounds, max_step=max_step
    )
    trajectory = [t0]
    for _ in range(updates):
        ((block(x0) - y) ** 2).mean().backward()
        ctl.step(lambda: ((block(x0) - y) ** 2).mean())
        trajectory.append(block.t1)
    return trajectory, ctl


def within(trajectory, target, tol=0.02):
    return [abs(t - target) <= tol * target for t in trajectory]


@pytest.mark.parametrize("start", [0.1, 3.0], ids=["T*/10", "3T*"])
def test_feedback_reaches_the_optimal_horizon_faster_than_gradient(float64, start):
    x0, y = decay_data()
    t_star = optimal_horizon(x0, y)
    assert 0.8 < t_star < 0.95  # the penalty pulls T* below the horizon that generated the data
    trajectory, ctl = control_decay("feedback", 1.0, start * t_star, x0, y, 20)
    inside = within(trajectory, t_star)
    reached = inside.index(True)
    assert reached <= 5 and all(inside[reached:])  # gets within 2% of T* and stays there
    assert trajectory[-1] == pytest.approx(t_star, rel=1e-3)
    # The first-order baseline, whatever its step size, is not there yet after as many updates.
    for lr in (0.3, 1.0, 3.0):
        gradient, _ = control_decay("gradient", lr, start * t_star, x0, y, reached)
        assert not any(within(gradient, t_star)), (lr, gradient)


def test_bounds_hold_and_clipping_is_counted(float64):
    x0, y = decay_data()
    t_star = optimal_horizon(x0, y)
    bounds = (0.2, 0.5)
    trajectory, ctl = control_decay("feedback", 0.5, 0.3, x0, y, 12, bounds=bounds)
    assert t_star > bounds[1]
    assert all(bounds[0] <= t <= bounds[1] for t in trajectory)
    assert trajectory[-1] == bounds[1]
    stats = ctl.stats
    assert stats["t1/clipped"] >= 1 and stats["t1/updates"] == 12
    # max_step cuts the first steps from far below T*, and says so.
    trajectory, ctl = control_decay("feedback", 0.5, 0.02, x0, y, 3, max_step=0.5)
    assert trajectory[1] == pytest.approx(0.03) and ctl.stats["t1/limited"] >= 1


def test_warmup_discards_the_first_estimates(float64):
    x0, y = decay_data()
    block = ODEBlock(GaussianDecay(A), 0.0, 0.5, method="rk4", options={"step_size": 0.05}, adjoint=False)
    ctl = Controller(block, policy="gradient", lr=1.0, every=2, warmup=3, momentum=1.0, max_step=None)
    seen = []
    for step in range(1, 6):
        block.zero_t1_grad()
        ((block(x0) - y) ** 2).mean().backward()
        seen.append(float(block.t1_grad))
        ctl.step()
        assert block.t1 == 0.5 or step == 5
    # One update, at step 3 + 2, from the mean of steps 4 and 5 only.
    assert ctl.stats["updates"] == 1
    assert ctl.stats["t1/Q_phi"] == pytest.approx((seen[3] + seen[4]) / 2 + 1e-3 * 0.5)


def test_without_bounds_the_horizon_stays_above_t0(float64):
    x0, y = decay_data()
    block = ODEBlock(GaussianDecay(A), 0.0, 0.5, method="rk4", options={"step_size": 0.05})
    # A huge linear cost drives T down as far as it may go.
    ctl = Controller(
        block, warmup=0, policy="gradient", lr=1.0, penalty=100.0, cost="linear", every=1, max_step=None
    )
    for _ in range(3):
        block.zero_t1_grad()
        ((block(x0) - y) ** 2).mean().backward()
        ctl.step()
    assert block.t1 == pytest.approx(MIN_HORIZON)
    assert ctl.stats["t1/clipped"] == 3


class TwoBlocks(nn.Module):
    """Two independent decays side by side, fitted to targets made with different horizons."""

    def __init__(self):
        super().__init__()
        solver = dict(method="dopri5", rtol=1e-7, atol=1e-7, adjoint=False)
        self.first = ODEBlock(GaussianDecay(A), 0.0, 0.3, **solver)
        self.second = ODEBlock(GaussianDecay(A), 0.0, 2.0, **solver)

    def forward(self, x):
        return torch.cat([self.first(x[:, :1]), self.second(x[:, 1:])], 1)


def test_two_blocks_get_independent_horizons(float64):
    xa, ya = decay_data(seed=1, t_true=0.7)
    xb, yb = decay_data(seed=2, t_true=1.4)
    model = TwoBlocks()
    ctl = Controller(model, warmup=0, policy="feedback", lr=0.5, penalty=C, every=1)
    assert ctl.names == ["t1/first", "t1/second"]
    x, y = torch.cat([xa, xb], 1), torch.cat([ya, yb], 1)
    for _ in range(10):  # both within 0.1% of their optima by then
        # The loss is a sum of one mean per block, so each horizon sees its own problem.
        ((model(x) - y) ** 2).mean(0).sum().backward()
        ctl.step(lambda: ((model(x) - y) ** 2).mean(0).sum())
    values = ctl.values
    assert values["t1/first"] == pytest.approx(optimal_horizon(xa, ya), rel=0.02)
    assert values["t1/second"] == pytest.approx(optimal_horizon(xb, yb), rel=0.02)
    assert optimal_horizon(xb, yb) > 1.3 * optimal_horizon(xa, ya)


# ---------------------------------------------------- declared (non-horizon) parameters
class DampedField(nn.Module):
    def __init__(self, damping):
        super().__init__()
        self.damping = ControlParameter(damping, bounds=(0.0, 5.0))

    def forward(self, t, x):
        return -self.damping() * x


def test_control_parameter_is_a_buffer_not_a_parameter(float64):
    model = nn.Sequential(nn.Linear(1, 1), ODEBlock(DampedField(0.5), adjoint=False))
    assert all(p is not model[1].func.damping.value for p in model.parameters())
    assert "1.field.func.damping.value" in model.state_dict()
    model.float()
    value = model[1].func.damping.value
    assert value.dtype == torch.float32 and value.is_leaf and value.requires_grad
    with pytest.raises(ValueError, match="must lie within `bounds`"):
        model[1].func.damping.set(6.0)
    with pytest.raises(ValueError, match="must lie within `bounds`"):
        ControlParameter(-1.0, bounds=(0.0, 1.0))


DAMPING_SIGMA = 0.3


def damping_data(n=256, k_true=0.8, sigma=DAMPING_SIGMA, seed=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, generator=g) + 0.5
    y = x0 * math.exp(-k_true) + sigma * torch.randn(n, 1, generator=g)
    # argmin_k mean (x0 e^{-k} - y)^2: e^{-k*} = E[x0 y] / E[x0^2].
    k_star = -math.log(float((x0 * y).mean()) / float((x0**2).mean()))
    return x0, y, k_star


def gaussian_nll(out, y):
    """The Gaussian negative log-likelihood (up to a constant): a calibrated loss for Gauss-Newton."""
    return ((out - y) ** 2).mean() / (2 * DAMPING_SIGMA**2)


def control_damping(adjoint, k0, updates=12):  # within 2% of k* by update 7 from either side
    x0, y, k_star = damping_data()
    # rtol 1e-6: the trajectory agrees with 1e-8's to 4 digits at 45% fewer evaluations.
    block = ODEBlock(DampedField(k0), 0.0, 1.0, method="dopri5", rtol=1e-6, atol=1e-6, adjoint=adjoint)
    ctl = Controller(block, warmup=0, policy="feedback", lr=0.5, every=4, momentum=1.0, horizons=False)
    assert ctl.names == ["field.func.damping"]
    loader = DataLoader(
        TensorDataset(x0, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    trajectory = [k0]
    for _ in range(updates):
        for xb, yb in loader:  # one update per epoch: 4 batches of 64
            gaussian_nll(block(xb), yb).backward()
            ctl.step(lambda xb=xb, yb=yb: gaussian_nll(block(xb), yb))
        trajectory.append(ctl.values["field.func.damping"])
    return trajectory, ctl, k_star, block


@pytest.mark.parametrize("k0", [0.1, 3.0])
def test_declared_damping_converges_to_its_optimum(float64, k0):
    trajectory, ctl, k_star, block = control_damping(adjoint=False, k0=k0)
    assert all(abs(k - k_star) <= 0.02 * k_star for k in trajectory[-5:]), (k_star, trajectory)
    assert block.t1 == 1.0  # horizons=False leaves T alone
    assert ctl.stats["field.func.damping/missing"] == 0


def test_declared_parameter_gets_its_adjoint_gradient(float64):
    block = ODEBlock(DampedField(0.5), 0.0, 1.0, method="dopri5", rtol=1e-10, atol=1e-10, adjoint=True)
    x0 = torch.tensor([[1.0], [2.0]], requires_grad=True)
    (block(x0) ** 2).mean().backward()
    grad = block.func.damping.grad
    assert grad is not None, "the adjoint solve must give declared parameters their gradient"
    # d/dk mean (x0 e^{-k})^2 = -2 mean(x0^2) e^{-2k}
    assert float(grad) == pytest.approx(-2 * 2.5 * math.exp(-1.0), rel=1e-7)


def test_unused_control_parameter_warns():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = ControlParameter(1.0)

        def forward(self, t, x):
            return -x

    block = ODEBlock(Unused(), method="rk4", options={"step_size": 0.5}, adjoint=False)
    ctl = Controller(block, warmup=0, every=2)
    x = torch.ones(2, 1, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="'field.func.k' received no gradient"):
        for _ in range(2):
            block(x).sum().backward()
            ctl.step(lambda: block(x).sum())
    assert ctl.stats["field.func.k/skipped"] == 1 and ctl.stats["t1/updates"] == 1


# ------------------------------------------------------- training loop and resume
class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 8)
        self.l2 = nn.Linear(8, 3)
        self.scale = ControlParameter(1.0, bounds=(0.1, 3.0), penalty=1e-3)

    def forward(self, t, x):
        return self.scale() * self.l2(torch.tanh(self.l1(x)))


def make_model():
    torch.manual_seed(0)
    block = ODEBlock(Field(), 0.0, 0.5, method="rk4", options={"step_size": 0.125}, adjoint=False)
    return nn.Sequential(nn.Linear(4, 3), block, nn.Linear(3, 2))


def make_loaders():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(96, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    train = DataLoader(
        TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)
    return train, val


def train(optimizer="sgd", max_steps=10, checkpoint=None, resume=False, policy="feedback"):
    model = make_model()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        from snopt._optimizer import SNOpt

        opt = SNOpt(model, lr=0.1, update_freq=3)
    ctl = Controller(
        model,
        warmup=0,
        policy=policy,
        lr=0.3,
        penalty=1e-3,
        every=2,
        bounds={"t1/1": (0.1, 2.0)},
        optimizer=opt,
    )
    train_loader, val_loader = make_loaders()
    result = fit(
        model,
        train_loader,
        val_loader,
        optimizer=opt,
        loss_fn=nn.functional.cross_entropy,
        max_steps=max_steps,
        controller=ctl,
        checkpoint=checkpoint,
        resume=resume,
        seed=7,
        progress=False,
    )
    return result, ctl


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "snopt"])
def test_controller_in_the_training_loop(optimizer):
    result, ctl = train(optimizer, max_steps=6)
    keys = ["t1/1", "1.field.func.scale"]
    assert ctl.names == keys
    assert all(key in result.history[-1] for key in keys)
    first, last = result.history[0], result.history[-1]
    assert last["t1/1"] != first["t1/1"] and last["1.field.func.scale"] != first["1.field.func.scale"]
    assert 0.1 <= last["t1/1"] <= 2.0 and 0.1 <= last["1.field.func.scale"] <= 3.0
    stats = result.stats["controller"]
    assert stats["steps"] == 6 and stats["t1/1/updates"] == 3 and stats["1.field.func.scale/updates"] == 3
    assert math.isfinite(stats["t1/1/feedback"]) and stats["t1/1/feedback"] != 0.0


def test_resumed_run_follows_the_same_trajectory(tmp_path):
    full, ctl_full = train(max_steps=11)
    ckpt = tmp_path / "run.pt"
    train(max_steps=5, checkpoint=ckpt)  # stops between two control updates
    resumed, ctl_resumed = train(max_steps=11, checkpoint=ckpt, resume=True)
    for key in ("t1/1", "1.field.func.scale", "train_loss"):
        assert [r[key] for r in resumed.history] == [r[key] for r in full.history]
    assert ctl_resumed.values == ctl_full.values

    def counted(stats):  # the time spent in the curvature passes is not reproducible
        return {k: v for k, v in stats.items() if k != "curvature_time"}

    assert counted(ctl_resumed.stats) == counted(ctl_full.stats)


def test_fixed_policy_never_moves_and_values_use_history_keys():
    result, ctl = train(policy="fixed", max_steps=4)
    assert {r["t1/1"] for r in result.history} == {0.5}
    assert ctl.stats["t1/1/updates"] == 2 and ctl.stats["t1/1/delta"] == 0.0
    block = ODEBlock(MLP(), 0.0, 1.0)
    assert Controller(block).names == ["t1"]


# ---------------------------------------------------------------------- bad input
def small_model():
    return nn.Sequential(nn.Linear(3, 3), ODEBlock(MLP(), 0.0, 1.0, method="rk4", options={"step_size": 0.5}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bounds=(2.0, 1.0)), "lower bound below its upper bound, but got low=2.0, high=1.0"),
        (dict(bounds=(1.0, 1.0)), "lower bound below its upper bound"),
        (dict(bounds=(1.5, 3.0)), r"initial horizon T0 of 't1/1' must lie within the bounds \(1.5, 3.0\)"),
        (dict(bounds=(0.0, 3.0)), r"lower bound of 't1/1' must be above the block's t0=0.0"),
        (dict(bounds={"t1/2": (0.1, 2.0)}), r"Unknown `bounds` keys \['t1/2'\]; valid keys are \['t1/1'\]"),
        (dict(lr=0.0), "`lr` must be a positive number"),
        (dict(lr=-0.1), "`lr` must be a positive number"),
        (dict(lr=float("nan")), "`lr` must be a positive number"),
        (dict(policy="newton"), r"`policy` must be one of \['fixed', 'gradient', 'feedback'\]"),
        (dict(cost="cubic"), r"`cost` must be one of \['quadratic', 'linear'\]"),
        (dict(penalty=-1.0), "`penalty` must be >= 0"),
        (dict(every=0), "`every` must be a positive integer, but got every=0"),
        (dict(every=2.5), "`every` must be a positive integer"),
        (dict(momentum=1.5), r"`momentum` must be in \[0, 1\]"),
        (dict(max_step=0.0), "`max_step` must be a positive number or None"),
        (dict(warmup=-1), "`warmup` must be an integer >= 0, but got warmup=-1"),
        (dict(horizons=["nope"]), r"Unknown `horizons` names \['nope'\]; the model's ODE blocks are \['1'\]"),
        (dict(horizons=False), "The model has no control variable"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Controller(small_model(), **kwargs)


def test_bad_model_and_optimizer_types():
    with pytest.raises(TypeError, match="`model` must be an nn.Module"):
        Controller("model")
    with pytest.raises(TypeError, match="`optimizer` must be a torch.optim.Optimizer"):
        Controller(small_model(), optimizer="adam")
    with pytest.raises(ValueError, match="no control variable"):
        Controller(nn.Linear(2, 2))


def test_load_state_dict_rejects_another_controllers_state():
    ctl = Controller(small_model())
    state = ctl.state_dict()
    other = Controller(ODEBlock(MLP(), 0.0, 1.0))
    with pytest.raises(ValueError, match=r"missing \['t1'\], unexpected \['t1/1'\]"):
        other.load_state_dict(state)


def test_run_config_passes_every_controller_setting():
    from snopt._run import RunConfig, build_run

    config = RunConfig(
        task="toy2d",
        control="feedback",
        t1_lr=0.3,
        t1_every=4,
        t1_momentum=0.5,
        t1_max_step=0.25,
        t1_warmup=7,
        t1_bounds=(0.5, 2.0),
        max_steps=1,
    )
    ctl = build_run(config).controller
    assert (ctl.every, ctl.momentum, ctl.max_step, ctl.warmup) == (4, 0.5, 0.25, 7)
    assert ctl.policy.lr == 0.3 and ctl._variables[ctl.names[0]].bounds == (0.5, 2.0)
    unlimited = build_run(RunConfig(task="toy2d", control="gradient", t1_max_step=None)).controller
    assert unlimited.max_step is None and unlimited.policy.lr == DEFAULT_LR["gradient"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"t1_momentum": 1.5}, "`t1_momentum` must be in [0, 1]"),
        ({"t1_max_step": 0.0}, "`t1_max_step` must be a positive number or None"),
        ({"t1_warmup": -1}, "`t1_warmup` must be an integer >= 0"),
    ],
)
def test_run_config_rejects_bad_controller_settings(kwargs, message):
    from snopt._run import RunConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig(**kwargs)
