"""ODEBlock against closed-form linear ODEs, finite differences and bad input."""

import math

import pytest
import torch
from torch import nn

from snopt._ode import METHODS, ODEBlock, SolverError

DT = torch.float64


class Linear(nn.Module):
    """dx/dt = x A^T, whose flow is the matrix exponential."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t, x):
        return x @ self.a.T


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = 0.5 * torch.randn(3, 3, generator=g, dtype=DT)
    x0 = torch.randn(4, 3, generator=g, dtype=DT)
    w = torch.randn(4, 3, generator=g, dtype=DT)
    return a, x0, w


def _loss(block, x0, w):
    return (w * block(x0)).sum()


@pytest.mark.parametrize("adjoint", [True, False])
def test_gradients_match_matrix_exponential(adjoint):
    a, x0, w = _problem()
    T = 1.3
    block = ODEBlock(Linear(a), 0.0, T, rtol=1e-10, atol=1e-10, adjoint=adjoint)
    x = x0.clone().requires_grad_()
    loss = _loss(block, x, w)
    loss.backward()
    e = torch.linalg.matrix_exp(a * T)
    # L = sum w * (x0 E^T)  =>  dL/dx0 = w E,  dL/dT = sum w * (x0 E^T A^T),  dL/dA = int_0^T ...
    assert loss.item() == pytest.approx((w * (x0 @ e.T)).sum().item(), rel=1e-8)
    torch.testing.assert_close(x.grad, w @ e, rtol=1e-7, atol=1e-9)
    assert block.t1_grad.item() == pytest.approx((w * (x0 @ e.T @ a.T)).sum().item(), rel=1e-7)
    assert block.t1_grad_samples.shape == (4,)
    assert block.t1_grad_samples.sum().item() == pytest.approx(block.t1_grad.item(), rel=1e-12)


@pytest.mark.parametrize("adjoint", [True, False])
def test_horizon_terms_of_a_partial_batch_without_zeroing(adjoint):
    """A plain loop that never zeroes: same-batch passes add up, a smaller batch replaces."""
    a, x0, w = _problem()
    block = ODEBlock(Linear(a), 0.0, 0.7, rtol=1e-10, atol=1e-10, adjoint=adjoint)
    e = torch.linalg.matrix_exp(a * 0.7)
    per_sample = (w * (x0 @ e.T @ a.T)).sum(1)  # closed-form dL_i/dT
    _loss(block, x0.clone().requires_grad_(), w).backward()
    _loss(block, x0.clone().requires_grad_(), w).backward()
    torch.testing.assert_close(block.t1_grad_samples, 2 * per_sample, rtol=1e-7, atol=1e-10)
    _loss(block, x0[:3].clone().requires_grad_(), w[:3]).backward()  # the final, partial batch
    torch.testing.assert_close(block.t1_grad_samples, per_sample[:3], rtol=1e-7, atol=1e-10)
    assert block.t1_grad.item() == pytest.approx(
        (2 * per_sample.sum() + per_sample[:3].sum()).item(), rel=1e-7
    )


@pytest.mark.parametrize("adjoint", [True, False])
@pytest.mark.parametrize("method,options", [("dopri5", None), ("rk4", {"step_size": 0.01})])
def test_horizon_and_parameter_gradients_match_finite_differences(adjoint, method, options):
    torch.manual_seed(1)
    field = nn.Sequential()
    field = _MLP()
    x0 = torch.randn(5, 2, dtype=DT)
    block = ODEBlock(field, 0.0, 0.7, method=method, options=options, rtol=1e-10, atol=1e-10, adjoint=adjoint)
    loss = (block(x0) ** 2).sum()
    loss.backward()
    h = 1e-6

    def value(t1):
        b = ODEBlock(field, 0.0, t1, method=method, options=options, rtol=1e-10, atol=1e-10, adjoint=adjoint)
        with torch.no_grad():
            return (b(x0) ** 2).sum().item()

    fd = (value(0.7 + h) - value(0.7 - h)) / (2 * h)
    tol = 1e-6 if method == "dopri5" else 1e-4  # rk4's last step changes length with t1
    assert block.t1_grad.item() == pytest.approx(fd, rel=tol, abs=tol)
    p = field.l1.weight
    grad = p.grad[0, 0].item()
    with torch.no_grad():
        p[0, 0] += h
        up = value(0.7)
        p[0, 0] -= 2 * h
        down = value(0.7)
        p[0, 0] += h
    assert grad == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-7)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(2, 8).double()
        self.l2 = nn.Linear(8, 2).double()

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(x)))


class _Pair(nn.Module):
    """Tuple state: dx/dt = x A^T, dy/dt = -y; closed form for both."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t, state):
        x, y = state
        return x @ self.a.T, -y


@pytest.mark.parametrize("adjoint", [True, False])
def test_tuple_state(adjoint):
    a, x0, w = _problem(3)
    y0 = torch.ones(4, 2, dtype=DT, requires_grad=True)
    block = ODEBlock(_Pair(a), 0.0, 0.9, rtol=1e-10, atol=1e-10, adjoint=adjoint)
    x, y = block((x0, y0))
    assert x.shape == (4, 3) and y.shape == (4, 2)
    torch.testing.assert_close(y, torch.full_like(y, math.exp(-0.9)))
    e = torch.linalg.matrix_exp(a * 0.9)
    torch.testing.assert_close(x, x0 @ e.T, rtol=1e-8, atol=1e-10)
    ((w * x).sum() + y.sum()).backward()
    torch.testing.assert_close(y0.grad, torch.full_like(y0, math.exp(-0.9)), rtol=1e-8, atol=1e-10)
    expected = (w * (x0 @ e.T @ a.T)).sum() - y.detach().sum()
    assert block.t1_grad.item() == pytest.approx(expected.item(), rel=1e-7)


def test_stats_count_forward_and_backward_evaluations():
    a, x0, w = _problem()
    calls = []

    class Counting(Linear):
        def forward(self, t, x):
            calls.append(torch.is_grad_enabled())
            return super().forward(t, x)

    block = ODEBlock(Counting(a), 0.0, 1.0, method="rk4", options={"step_size": 0.1})
    block.horizon_grad = False
    _loss(block, x0, w).backward()
    s = block.stats
    # rk4: 4 evaluations per step, 10 steps forward and 10 backward.
    assert (s.nfe_forward, s.steps_forward, s.nfe_backward, s.steps_backward) == (40, 10, 40, 10)
    assert len(calls) == s.nfe_forward + s.nfe_backward
    assert s.t1 == 1.0


def test_totals_cover_every_call_of_a_block_used_twice():
    a, x0, w = _problem()
    calls = []

    class Counting(Linear):
        def forward(self, t, x):
            calls.append(t)
            return super().forward(t, x)

    block = ODEBlock(Counting(a), 0.0, 1.0, method="dopri5", rtol=1e-6, atol=1e-8)
    block.horizon_grad = False
    first = block(x0)
    first_stats = block.stats
    second = block(first * 0.5)
    assert block.stats is not first_stats  # `stats` is the last call's
    forward_calls = len(calls)
    (w * second).sum().backward()
    t = block.totals
    assert t.nfe_forward == first_stats.nfe_forward + block.stats.nfe_forward == forward_calls
    assert t.nfe_backward == len(calls) - forward_calls > 0
    assert t.steps_forward == first_stats.steps_forward + block.stats.steps_forward
    block.reset_totals()
    assert block.totals.nfe_forward == block.totals.nfe_backward == 0


def test_set_t1_and_state_dict_round_trip():
    a, _, _ = _problem()
    block = ODEBlock(Linear(a), 0.0, 1.0)
    block.set_t1(2.5)
    assert block.t1 == 2.5
    other = ODEBlock(Linear(a), 0.0, 1.0)
    other.load_state_dict(block.state_dict())
    assert other.t1 == 2.5
    with pytest.raises(ValueError, match=r"`t1 > t0` must hold, but got t0=0.0, t1=-1.0"):
        block.set_t1(-1.0)


class _Recorder:
    """A StateSampler that records what the block hands it."""

    def __init__(self, spacing):
        self.spacing = spacing
        self.samples = []

    def sampling(self, block):
        return True

    def sample_spacing(self, block):
        return self.spacing

    def sample(self, block, t, state, adjoint, call):
        self.samples.append((t, state.clone(), adjoint.clone(), call))


@pytest.mark.parametrize("adjoint", [True, False])
def test_sampler_gets_exact_state_and_adjoint(adjoint):
    """State and adjoint at the sampled times equal expm(A t) x0 and expm(A^T (T - t)) w."""
    a, x0, w = _problem(5)
    T, h = 1.0, 0.05
    block = ODEBlock(Linear(a), 0.0, T, method="rk4", options={"step_size": h}, adjoint=adjoint)
    rec = _Recorder(h)
    block.sampler = rec
    _loss(block, x0, w).backward()
    times = sorted(t for t, *_ in rec.samples)
    # One sample per step start of the backward sweep (T, T - h, ..., h in adjoint mode,
    # 0, ..., T - h in direct mode) plus the end the step starts miss: 0, h, ..., T.
    expected = [h * k for k in range(0, 21)]
    assert times == pytest.approx(expected, abs=1e-9)
    assert block.stats.samples == 21
    assert len({id(call) for *_, call in rec.samples}) == 1  # all from one solve
    for t, state, adj, _ in rec.samples:
        x_ref = x0 @ torch.linalg.matrix_exp(a * t).T
        a_ref = w @ torch.linalg.matrix_exp(a * (T - t))
        torch.testing.assert_close(state, x_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adj, a_ref, rtol=1e-5, atol=1e-6)


class _StageRecorder:
    """A StateSampler of the solver's own evaluations: its field records what the block publishes."""

    def sampling(self, block):
        return True

    def sample_spacing(self, block):
        return 1.0

    def sample(self, block, t, state, adjoint, call):
        raise AssertionError("a stage sampler is never handed step-start samples")

    def stages(self, block):
        return True


class _Published(Linear):
    def __init__(self, a):
        super().__init__(a)
        self.block = None
        self.seen = []

    def forward(self, t, x):
        self.seen.append(self.block.evaluation)
        return super().forward(t, x)


@pytest.mark.parametrize("adjoint", [True, False])
def test_stage_sampling_publishes_the_evaluations_of_the_solve_that_carries_the_gradient(adjoint):
    """Adjoint mode: the adjoint solve's evaluations, numbered by its own steps (the forward
    solve's rejected step marks nothing); direct mode: the forward solve's, and the step
    starts' times as their gradients arrive, from t1 down."""
    a, x0, w = _problem(2)
    field = _Published(2 * a)
    block = ODEBlock(field, 0.0, 2.0, rtol=1e-6, atol=1e-6, adjoint=adjoint)
    field.block = block
    block.sampler = _StageRecorder()
    out = block(x0)
    forward = list(field.seen)
    (w * out).sum().backward()
    s = block.stats
    assert s.rejected_forward == 1 and s.rejected_backward == 0
    published = [e for e in field.seen if e is not None]
    if adjoint:
        assert all(e is None for e in forward)
        assert len(published) == s.nfe_backward - 1  # dL/dt1's evaluation is not the solver's
        steps = [e.step for e in published]
        assert steps[0] == 0 and steps == sorted(steps) and steps[-1] == s.steps_backward
        assert published[0].t.item() == 2.0 and not published[0].rejected
    else:
        assert len(published) == len(forward) == s.nfe_forward
        assert published[-1].step == s.steps_forward and len(published[0].rejected) == 1
        bounds = [b.item() for b in published[0].bounds]
        # t1, then the starts of the attempted steps but the first (x0 needs no gradient).
        assert bounds[0] == 2.0 and bounds == sorted(bounds, reverse=True)
        assert len(bounds) == s.steps_forward and bounds[-1] > 0.0
    assert len({id(e.solve) for e in published}) == 1 and block.evaluation is None


def test_sampler_is_not_called_without_grad():
    a, x0, _ = _problem()
    block = ODEBlock(Linear(a), 0.0, 1.0)
    rec = _Recorder(0.01)
    block.sampler = rec
    with torch.no_grad():
        block(x0)
    assert rec.samples == [] and block.stats.samples == 0


def test_adaptive_sampling_dedupes_rejected_steps_and_stays_on_grid_cells():
    a, x0, w = _problem(2)
    block = ODEBlock(Linear(3 * a), 0.0, 2.0, rtol=1e-8, atol=1e-8)
    rec = _Recorder(0.1)
    block.sampler = rec
    _loss(block, x0, w).backward()
    # The end t0 is always sampled; the step starts at most once per grid cell.
    assert [t for t, *_ in rec.samples].count(0.0) == 1
    cells = [math.floor(t / 0.1 + 1e-6) for t, *_ in rec.samples if t != 0.0]
    assert len(cells) == len(set(cells)) > 0
    assert len(cells) <= block.stats.steps_backward


def test_solver_failure_is_a_solver_error():
    a, x0, _ = _problem()
    block = ODEBlock(Linear(a * 20), 0.0, 5.0, rtol=1e-9, atol=1e-9, options={"max_num_steps": 3})
    with pytest.raises(SolverError, match="max_num_steps"):
        block(x0)


@pytest.mark.parametrize(
    "method,options", [("dopri5", {}), ("rk4", {"step_size": 1e-3}), ("euler", {"step_size": 1e-3})]
)
def test_max_nfe_stops_a_forward_solve_at_the_cap(method, options):
    a, x0, _ = _problem()
    # dopri5 at rtol 1e-12 on a stiff field, or a fixed grid of 1000 steps: thousands of evaluations.
    block = ODEBlock(
        Linear(a * 50), 0.0, 1.0, method=method, rtol=1e-12, atol=1e-12, options=options, max_nfe=40
    )
    with pytest.raises(SolverError, match=r"forward solve took more than max_nfe=40 field evaluations"):
        block(x0)
    assert block.stats.nfe_forward == 41


def test_max_nfe_counts_the_backward_pass_of_each_call_on_its_own():
    a, x0, w = _problem()
    block = ODEBlock(Linear(a), 0.0, 1.0, method="rk4", options={"step_size": 0.05}, max_nfe=100)
    # An ODE-RNN calls its block twice: 2 x 80 backward evaluations, each solve under the cap.
    (w * block(block(x0))).sum().backward()
    assert block.totals.nfe_backward >= 160
    out = block(x0)
    assert block.stats.nfe_forward == 80  # 20 rk4 steps; the adjoint solve takes as many
    block.max_nfe = 79
    with pytest.raises(SolverError, match=r"backward solve took more than max_nfe=79"):
        (w * out).sum().backward()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("backward", [False, True])
def test_stop_check_stops_the_solve_mid_way_forward_and_in_the_adjoint(backward):
    a, x0, w = _problem()
    block = ODEBlock(Linear(a), 0.0, 1.0, method="rk4", options={"step_size": 0.01})

    def check(b):
        run = b._run
        if run.backward_phase == backward and run.nfe >= 7:
            raise _Stop(f"stopped at {run.nfe}")

    block.stop_check = check
    with pytest.raises(_Stop, match="stopped at 7"):
        (w * block(x0.requires_grad_())).sum().backward()
    if not backward:
        assert block.stats.nfe_forward == 7
    else:
        assert block.stats.nfe_backward == 7 + 1  # and the one evaluation dL/dt1 costs
        assert block.stats.nfe_forward == 400  # the forward solve ran to its end


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(t0=1.0, t1=1.0), r"`t1 > t0` must hold, but got t0=1.0, t1=1.0"),
        (dict(t0=0.0, t1=-2.0), r"`t1 > t0` must hold"),
        (dict(t1=float("inf")), r"`t1` must be finite"),
        (dict(t0=float("nan")), r"`t0` must be finite"),
        (dict(method="rk5"), r"`method` must be one of .*'dopri5'.*but got 'rk5'"),
        (dict(method="scipy_solver"), r"`method` must be one of"),
        (dict(rtol=0.0), r"`rtol` must be a positive finite number, but got rtol=0.0"),
        (dict(atol=-1e-3), r"`atol` must be a positive finite number"),
        (
            dict(options={"stepsize": 0.1}, method="rk4"),
            r"Unknown `options` keys \['stepsize'\].*'step_size'",
        ),
        (dict(options={"step_size": 0.1}), r"Unknown `options` keys \['step_size'\] for method 'dopri5'"),
        (dict(options={"step_size": 0.0}, method="euler"), r"`options\['step_size'\]` must be a positive"),
        (dict(max_nfe=0), r"`max_nfe` must be a positive integer or None, but got max_nfe=0"),
        (dict(max_nfe=2.5), r"`max_nfe` must be a positive integer or None, but got max_nfe=2.5"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    a, _, _ = _problem()
    with pytest.raises(ValueError, match=match):
        ODEBlock(Linear(a), **kwargs)


def test_func_must_be_a_module():
    with pytest.raises(TypeError, match="`func` must be an nn.Module"):
        ODEBlock(lambda t, x: x)


def test_every_method_runs():
    a, x0, w = _problem()
    for method in METHODS:
        options = (
            {"step_size": 0.25}
            if method not in ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
            else None
        )
        # rtol 1e-4: the low-order adaptive_heun needs ~1,000 evaluations at 1e-6, 100 at 1e-4.
        block = ODEBlock(Linear(a), 0.0, 1.0, method=method, options=options, rtol=1e-4, atol=1e-4)
        _loss(block, x0, w).backward()
        assert block.stats.nfe_forward > 0 and block.stats.nfe_backward > 0, method


class _Scaled(nn.Module):
    """dx/dt = -k x with k a buffer that requires grad (how a ControlParameter is stored)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.tensor(0.7, dtype=DT, requires_grad=True))

    def forward(self, t, x):
        return -self.k * x


@pytest.mark.parametrize("adjoint", [True, False])
def test_buffers_that_require_grad_get_gradients(adjoint):
    """x(T) = exp(-k T) x0, so d sum x(T) / dk = -T exp(-k T) sum x0."""
    field = _Scaled()
    x0 = torch.tensor([[1.0, 2.0]], dtype=DT)
    block = ODEBlock(field, 0.0, 1.5, rtol=1e-10, atol=1e-10, adjoint=adjoint)
    block(x0).sum().backward()
    assert field.k.grad.item() == pytest.approx(-1.5 * math.exp(-0.7 * 1.5) * 3.0, rel=1e-7)


def test_each_call_of_a_block_is_sampled_in_its_own_adjoint_solve():
    """A block used twice in one forward: both backward solves take their samples."""
    a, x0, w = _problem(4)
    block = ODEBlock(Linear(a), 0.0, 1.0, method="rk4", options={"step_size": 0.1})
    rec = _Recorder(0.1)
    block.sampler = rec
    loss = (w * block(block(x0))).sum()
    loss.backward()
    # 10 step starts and t0 in each of the two adjoint solves, each solve with its own key.
    assert len(rec.samples) == 22
    calls = [id(call) for *_, call in rec.samples]
    assert len(set(calls)) == 2 and all(calls.count(c) == 11 for c in set(calls))


class _Tanh(nn.Module):
    """A nonlinear, time-dependent field: f(t, x) = tanh(W x + t b)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(3, 3, generator=gen, dtype=torch.float64) * 0.7)
        self.b = nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))

    def forward(self, t, x):
        return torch.tanh(x @ self.w.T + t * self.b)


class _LossOfHorizon(torch.autograd.Function):
    """L(T) = sum(w * x(T)) with the block's own dL/dT (``t1_grad``) as the backward pass."""

    @staticmethod
    def forward(ctx, t1, block, x0, w):
        block.set_t1(float(t1))
        block.zero_t1_grad()
        with torch.enable_grad():
            loss = (block(x0) * w).sum()
            loss.backward()
        ctx.save_for_backward(block.t1_grad.detach().clone())
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_out):
        (t1_grad,) = ctx.saved_tensors
        return (grad_out * t1_grad).reshape(1), None, None, None


@pytest.mark.parametrize("adjoint", [False, True])
def test_horizon_gradient_passes_gradcheck(adjoint):
    """dL/dT of a nonlinear field against central finite differences of the solve (float64)."""
    block = ODEBlock(_Tanh(), 0.0, 0.8, method="dopri5", rtol=1e-11, atol=1e-11, adjoint=adjoint)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    t1 = torch.tensor([0.8], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: _LossOfHorizon.apply(t, block, x0, w), (t1,), eps=1e-6, atol=1e-7, rtol=1e-6
    )
    # The same with an input that requires grad (the usual case inside a model).
    x0.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: _LossOfHorizon.apply(t, block, x0, w), (t1,), eps=1e-6, atol=1e-7, rtol=1e-6
    )
