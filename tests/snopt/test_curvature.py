"""Curvature collection against brute-force sums of outer products on the sampled grid.

References are independent of the collector: states and adjoints come from closed forms
(``torch.linalg.matrix_exp``) or a tight separate solve, layer inputs and output
gradients from explicit formulas (no hooks), conv patches from explicit loops.
"""

import copy
import math
import pickle

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

from snopt._curvature import CurvatureCollector, adapter_for, time_weights
from snopt._models import CNF, ODERNN, ODEClassifier
from snopt._ode import ODEBlock

DT = torch.float64


class AffineField(nn.Module):
    """dx/dt = W x + b: one nn.Linear, so z = [x, 1] and g = a."""

    def __init__(self, dim, generator):
        super().__init__()
        self.lin = nn.Linear(dim, dim).to(DT)
        with torch.no_grad():
            self.lin.weight.copy_(0.6 * torch.randn(dim, dim, generator=generator, dtype=DT))
            self.lin.bias.copy_(torch.randn(dim, generator=generator, dtype=DT))

    def forward(self, t, x):
        return self.lin(x)


class TanhField(nn.Module):
    """dx/dt = W2 tanh(W1 x + b1): layer 1 sees g = (a W2) * tanh'(.), layer 2 sees g = a."""

    def __init__(self, dim, hidden, generator):
        super().__init__()
        self.l1 = nn.Linear(dim, hidden).to(DT)
        self.l2 = nn.Linear(hidden, dim, bias=False).to(DT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.7 * torch.randn(p.shape, generator=generator, dtype=DT))

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(x)))


def _closed_form_affine(field, x0, w, T):
    """x(t) and a(t) = dL/dx(t) for L = mean_i w_i . x_i(T) under dx/dt = W x + b."""
    W, b = field.lin.weight.detach(), field.lin.bias.detach()
    d = W.shape[0]
    M = torch.zeros(d + 1, d + 1, dtype=DT)
    M[:d, :d], M[:d, d] = W, b
    x0_aug = torch.cat([x0, torch.ones(len(x0), 1, dtype=DT)], 1)
    n = len(x0)

    def state(t):
        return (x0_aug @ torch.linalg.matrix_exp(M * t).T)[:, :d]

    def adjoint(t):
        return (w / n) @ torch.linalg.matrix_exp(W * (T - t))

    return state, adjoint


def _grid_times(T, h, adjoint):
    k = round(T / h)
    # Step starts of the backward solve (T, T - h, ..., h in adjoint mode, 0, ..., T - h in
    # direct mode) plus the end that the step starts miss: every grid point 0, h, ..., T.
    return [h * j for j in range(0, k + 1)]


def _trapezoid(times):
    """Trapezoid weights of the sorted grid ``times`` (by hand: h/2 at the ends, h inside)."""
    h = times[1] - times[0]
    return [h / 2 if j in (0, len(times) - 1) else h for j in range(len(times))]


def _armed_collector(model, sample_step):
    collector = CurvatureCollector(model, sample_step=sample_step)
    collector.arm(True)
    return collector


@pytest.mark.parametrize("adjoint", [True, False])
def test_affine_field_factors_equal_brute_force_on_the_grid(adjoint):
    g = torch.Generator().manual_seed(0)
    T, h, n = 1.5, 0.05, 5
    field = AffineField(3, g)
    block = ODEBlock(field, 0.0, T, method="rk4", options={"step_size": h}, adjoint=adjoint)
    collector = _armed_collector(block, sample_step=h / T)
    x0 = torch.randn(n, 3, generator=g, dtype=DT)
    w = torch.randn(n, 3, generator=g, dtype=DT)
    (w * block(x0)).sum(1).mean().backward()

    times = _grid_times(T, h, adjoint)
    assert block.stats.samples == len(times) == collector.samples == 31
    state, adj = _closed_form_affine(field, x0, w, T)
    a_ref = torch.zeros(4, 4, dtype=DT)
    b_ref = torch.zeros(3, 3, dtype=DT)
    for t, wt in zip(times, _trapezoid(times)):
        z = torch.cat([state(t), torch.ones(n, 1, dtype=DT)], 1)
        a = adj(t)  # f = h, so g = a
        a_ref += wt * z.T @ z / n
        b_ref += wt * n * a.T @ a
    (layer,) = collector.layers
    A, B, locations = layer.factors()
    assert locations == 1
    torch.testing.assert_close(A, a_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(B, b_ref, rtol=1e-6, atol=1e-12)


def _affine_reference(field, x0, w, T, times):
    """Closed-form time-weighted factors of one solve of an affine field (batch-mean loss)."""
    n = len(x0)
    state, adj = _closed_form_affine(field, x0, w, T)
    a_ref = torch.zeros(4, 4, dtype=DT)
    b_ref = torch.zeros(3, 3, dtype=DT)
    for t, wt in zip(times, _trapezoid(times)):
        z = torch.cat([state(t), torch.ones(n, 1, dtype=DT)], 1)
        a = adj(t)
        a_ref += wt * z.T @ z / n
        b_ref += wt * n * a.T @ a
    return a_ref, b_ref


@pytest.mark.parametrize("adjoint", [True, False])
def test_a_block_solved_twice_per_forward_carries_both_horizons(adjoint):
    """Two solves of one block in a step (an ODE-RNN's gaps): the factors are the sum of each
    solve's closed-form factors, since the gradient sums both integrals (not their average)."""
    g = torch.Generator().manual_seed(5)
    T, h, n = 1.0, 0.05, 5
    field = AffineField(3, g)
    block = ODEBlock(field, 0.0, T, method="rk4", options={"step_size": h}, adjoint=adjoint)
    collector = _armed_collector(block, sample_step=h / T)
    x1, x2, w1, w2 = (torch.randn(n, 3, generator=g, dtype=DT) for _ in range(4))
    ((w1 * block(x1)).sum(1).mean() + (w2 * block(x2)).sum(1).mean()).backward()
    times = _grid_times(T, h, adjoint)
    a1, b1 = _affine_reference(field, x1, w1, T, times)
    a2, b2 = _affine_reference(field, x2, w2, T, times)
    (layer,) = collector.layers
    A, B, _ = layer.factors()
    torch.testing.assert_close(A, a1 + a2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(B, b1 + b2, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("adjoint", [True, False])
def test_nonlinear_field_factors_equal_explicit_jacobian_products(adjoint):
    """Two layers; g of the inner layer needs the chain rule through tanh and W2."""
    g = torch.Generator().manual_seed(1)
    T, h, n = 1.0, 0.1, 4
    field = TanhField(2, 5, g)
    block = ODEBlock(field, 0.0, T, method="rk4", options={"step_size": h}, adjoint=adjoint)
    collector = _armed_collector(block, sample_step=h / T)
    x0 = torch.randn(n, 2, generator=g, dtype=DT)
    w = torch.randn(n, 2, generator=g, dtype=DT)
    (w * block(x0)).sum(1).mean().backward()

    W1, b1, W2 = field.l1.weight.detach(), field.l1.bias.detach(), field.l2.weight.detach()

    def f(t, x):
        return torch.tanh(x @ W1.T + b1) @ W2.T

    times = _grid_times(T, h, adjoint)
    assert block.stats.samples == len(times)
    # Reference states by a tight dopri5 solve; adjoints by differentiating the loss of a
    # tight solve started at x(t).  Both independent of the rk4 grid and of any hook.
    grid = torch.tensor(sorted({0.0, *times}), dtype=DT)
    with torch.no_grad():
        xs = dict(zip(grid.tolist(), odeint(f, x0, grid, rtol=1e-12, atol=1e-12)))
    refs = {
        1: [torch.zeros(3, 3, dtype=DT), torch.zeros(2, 2, dtype=DT)],
        2: [torch.zeros(5, 5, dtype=DT), None],
    }
    refs[1][1] = torch.zeros(5, 5, dtype=DT)
    refs[2][1] = torch.zeros(2, 2, dtype=DT)
    for t, wt in zip(times, _trapezoid(times)):
        x = xs[t].clone().requires_grad_()
        xT = odeint(f, x, torch.tensor([t, T], dtype=DT), rtol=1e-12, atol=1e-12)[-1] if t < T - 1e-12 else x
        (a,) = torch.autograd.grad((w * xT).sum(1).mean(), x)
        x = x.detach()
        pre = x @ W1.T + b1
        z1 = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)
        g1 = (a @ W2) * (1 - torch.tanh(pre) ** 2)
        z2, g2 = torch.tanh(pre), a
        refs[1][0] += wt * z1.T @ z1 / n
        refs[1][1] += wt * n * g1.T @ g1
        refs[2][0] += wt * z2.T @ z2 / n
        refs[2][1] += wt * n * g2.T @ g2
    layers = {layer.name: layer for layer in collector.layers}
    for key, name in ((1, "field.func.l1"), (2, "field.func.l2")):
        A, B, _ = layers[name].factors()
        # rk4 with h = 0.1 against a tight solve: agreement to the rk4 error, relative to the
        # largest entry (direct mode differentiates the discrete rk4 solution).
        for got, ref in ((A, refs[key][0]), (B, refs[key][1])):
            torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * ref.abs().max().item())


def test_time_weights_are_the_trapezoid_rule_by_hand():
    # Sorted 0, 0.5, 2 on [0, 2]: 0.25, 0.25 + 0.75, 0.75; unsorted input keeps its order.
    assert time_weights([2.0, 0.0, 0.5], 0.0, 2.0) == pytest.approx([0.75, 0.25, 1.0])
    # Ends not sampled: the outer pieces go to the outer samples.
    assert time_weights([0.5, 1.5], 0.0, 2.0) == pytest.approx([1.0, 1.0])
    assert time_weights([0.3], 0.0, 2.0) == [2.0]
    assert time_weights([], 0.0, 1.0) == []


def _fine_integral(field, x0, w, T, points=801):
    """``int_0^T (A(t), B(t)) dt`` by the trapezoid rule on a fine fixed grid of the closed form.

    801 points: the rule's own error is ~1e-5 relative here (4001 points move the result by
    2e-5), three orders below the 1e-2 the solver's ~30 uneven steps are held to.
    """
    state, adj = _closed_form_affine(field, x0, w, T)
    n = len(x0)
    ts = torch.linspace(0, T, points, dtype=DT).tolist()
    weights = [T / (points - 1)] * points
    weights[0] = weights[-1] = T / (points - 1) / 2
    a_ref = torch.zeros(4, 4, dtype=DT)
    b_ref = torch.zeros(3, 3, dtype=DT)
    for t, wt in zip(ts, weights):
        z = torch.cat([state(t), torch.ones(n, 1, dtype=DT)], 1)
        a_ref += wt * z.T @ z / n
        b_ref += wt * n * adj(t).T @ adj(t)
    return a_ref, b_ref


@pytest.mark.parametrize("adjoint", [True, False])
def test_adaptive_solver_factors_match_a_brute_force_integral_on_a_fine_grid(adjoint):
    """Uneven dopri5 steps, weighted by the time each sample represents, integrate A(t) and B(t).

    The old rule (every sampled step start weighted equally, the end near t0 never sampled)
    is computed from the same samples and must be far worse: the test is sharp.
    """
    g = torch.Generator().manual_seed(2)
    T, n = 2.0, 3
    field = AffineField(3, g)
    with torch.no_grad():
        field.lin.weight.mul_(2.0)  # a faster field: uneven adaptive steps
    block = ODEBlock(field, 0.0, T, rtol=1e-8, atol=1e-8, adjoint=adjoint)
    collector = _armed_collector(block, sample_step=0.001)
    x0 = torch.randn(n, 3, generator=g, dtype=DT)
    w = torch.randn(n, 3, generator=g, dtype=DT)
    (w * block(x0)).sum(1).mean().backward()
    (layer,) = collector.layers
    times = list(layer.pending.values())[0].times
    assert min(times) == 0.0 and max(times) == pytest.approx(T) and 5 < len(times) < 100
    steps = sorted(times)
    assert max(b - a for a, b in zip(steps, steps[1:])) > 2 * min(b - a for a, b in zip(steps, steps[1:]))
    A, B, _ = layer.factors()
    a_ref, b_ref = _fine_integral(field, x0, w, T)
    err_a = ((A - a_ref).norm() / a_ref.norm()).item()
    err_b = ((B - b_ref).norm() / b_ref.norm()).item()
    assert err_a < 1e-2 and err_b < 1e-2, (err_a, err_b)  # trapezoid error of ~30 uneven steps
    # The old equal weighting of the step starts (t0 excluded) from the same solve.
    state, adj = _closed_form_affine(field, x0, w, T)
    starts = [t for t in times if t > 0] if adjoint else [t for t in times if t < T]
    a_old = sum(
        torch.cat([state(t), torch.ones(n, 1, dtype=DT)], 1).T.matmul(
            torch.cat([state(t), torch.ones(n, 1, dtype=DT)], 1)
        )
        / n
        for t in starts
    ) * (T / len(starts))
    b_old = sum(n * adj(t).T @ adj(t) for t in starts) * (T / len(starts))
    old = max(((a_old - a_ref).norm() / a_ref.norm()).item(), ((b_old - b_ref).norm() / b_ref.norm()).item())
    assert old > 10 * max(err_a, err_b), (old, err_a, err_b)


def _unfold_by_loops(x, k, pad):
    """Patches [n * H * W, C * k * k] of a stride-1 convolution, by explicit loops."""
    n, c, hgt, wid = x.shape
    xp = torch.zeros(n, c, hgt + 2 * pad, wid + 2 * pad, dtype=x.dtype)
    xp[:, :, pad : pad + hgt, pad : pad + wid] = x
    rows = []
    for i in range(n):
        for r in range(hgt):
            for s in range(wid):
                rows.append(xp[i, :, r : r + k, s : s + k].reshape(-1))
    return torch.stack(rows)


class ConvField(nn.Module):
    def __init__(self, generator):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1).to(DT)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=generator, dtype=DT))

    def forward(self, t, x):
        return self.conv(x)


@pytest.mark.parametrize("adjoint", [True, False])
def test_conv_factors_use_unfolded_patches_and_count_locations(adjoint):
    g = torch.Generator().manual_seed(3)
    T, h, n = 0.6, 0.1, 2
    field = ConvField(g)
    block = ODEBlock(field, 0.0, T, method="rk4", options={"step_size": h}, adjoint=adjoint)
    collector = _armed_collector(block, sample_step=h / T)
    x0 = torch.randn(n, 2, 3, 3, generator=g, dtype=DT)
    w = torch.randn(n, 2, 3, 3, generator=g, dtype=DT)
    (w * block(x0)).sum((1, 2, 3)).mean().backward()

    # The conv as a dense affine operator on the flattened state, for a closed-form flow.
    d = 18
    with torch.no_grad():
        bias_part = field.conv(torch.zeros(1, 2, 3, 3, dtype=DT)).reshape(-1)
        eye = torch.eye(d, dtype=DT).reshape(d, 2, 3, 3)
        M_lin = (field.conv(eye).reshape(d, d) - bias_part).T
    M = torch.zeros(d + 1, d + 1, dtype=DT)
    M[:d, :d], M[:d, d] = M_lin, bias_part
    x0_aug = torch.cat([x0.reshape(n, d), torch.ones(n, 1, dtype=DT)], 1)
    L = 9
    a_ref = torch.zeros(19, 19, dtype=DT)
    b_ref = torch.zeros(2, 2, dtype=DT)
    times = _grid_times(T, h, adjoint)
    for t, wt in zip(times, _trapezoid(times)):
        x = (x0_aug @ torch.linalg.matrix_exp(M * t).T)[:, :d].reshape(n, 2, 3, 3)
        a = ((w.reshape(n, d) / n) @ torch.linalg.matrix_exp(M_lin * (T - t))).reshape(n, 2, 3, 3)
        z = torch.cat([_unfold_by_loops(x, 3, 1), torch.ones(n * L, 1, dtype=DT)], 1)
        grows = a.permute(0, 2, 3, 1).reshape(-1, 2)
        a_ref += wt * z.T @ z / (n * L)
        b_ref += wt * (n * grows).T @ (n * grows) / (n * L)
    A, B, locations = collector.layers[0].factors()
    assert locations == L
    # Agreement to the rk4 error, relative to the largest entry.
    torch.testing.assert_close(A, a_ref, rtol=0, atol=1e-5 * a_ref.abs().max().item())
    torch.testing.assert_close(B, b_ref, rtol=0, atol=1e-5 * b_ref.abs().max().item())


def test_outer_layers_get_ordinary_kfac_statistics():
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(4)
    stem, head = nn.Linear(4, 3).to(DT), nn.Linear(3, 2).to(DT)
    block = ODEBlock(TanhField(3, 4, g), 0.0, 0.5, method="rk4", options={"step_size": 0.25})
    model = nn.Sequential(stem, block, head)
    collector = _armed_collector(model, sample_step=0.5)
    x = torch.randn(6, 4, dtype=DT)
    y = torch.randint(0, 2, (6,))
    hidden = block(stem(x))
    hidden.retain_grad()
    logits = head(hidden)
    logits.retain_grad()
    nn.functional.cross_entropy(logits, y).backward()
    layers = {layer.name: layer for layer in collector.layers}
    A, B, _ = layers["2"].factors()
    z = torch.cat([hidden.detach(), torch.ones(6, 1, dtype=DT)], 1)
    torch.testing.assert_close(A, z.T @ z / 6)
    torch.testing.assert_close(B, 6 * logits.grad.T @ logits.grad)
    A, B, _ = layers["0"].factors()
    z = torch.cat([x, torch.ones(6, 1, dtype=DT)], 1)
    torch.testing.assert_close(A, z.T @ z / 6)
    # The stem's output is the block's input: its gradient is the adjoint at t0.
    assert B.shape == (3, 3) and torch.linalg.eigvalsh(B).min() > -1e-12
    assert [name for name in layers] == ["1.field.func.l1", "1.field.func.l2", "0", "2"]


@pytest.mark.parametrize("adjoint", [True, False])
@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.1}), ("dopri5", None)])
@pytest.mark.parametrize("horizon_grad", [True, False])
def test_hook_calls_match_nfe_plus_samples(adjoint, method, options, horizon_grad):
    g = torch.Generator().manual_seed(5)
    block = ODEBlock(TanhField(2, 4, g), 0.0, 1.0, method=method, options=options, adjoint=adjoint)
    block.horizon_grad = horizon_grad
    collector = _armed_collector(block, sample_step=0.05)
    x0 = torch.randn(3, 2, generator=g, dtype=DT)
    for refresh in (True, False):
        collector.arm(refresh)
        before = {layer.name: (layer.calls, layer.sample_calls) for layer in collector.layers}
        (block(x0) ** 2).sum().backward()
        s = block.stats
        assert (s.samples > 0) == refresh
        # The horizon gradient's one extra evaluation is counted in nfe_backward; an unarmed
        # pass runs without the hooks.
        expected = s.nfe_forward + s.nfe_backward + s.samples if refresh else 0
        for layer in collector.layers:
            calls, sample_calls = before[layer.name]
            assert layer.calls - calls == expected
            assert layer.sample_calls - sample_calls == s.samples
        if adjoint:
            assert s.nfe_backward > 0


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_cnf_inner_trace_gradient_adds_no_hook_calls_or_samples(trace):
    torch.manual_seed(6)
    model = CNF(2, hidden=4, depth=1, trace=trace, method="rk4", options={"step_size": 0.25}).to(DT)
    block = model.blocks[0]
    collector = _armed_collector(model, sample_step=0.25)
    x = torch.randn(5, 2, dtype=DT)
    (-model.log_prob(x).mean()).backward()
    s = block.stats
    assert s.samples == 5  # the 4 step starts and t0
    assert len(collector.layers) == 2
    for layer in collector.layers:
        assert layer.calls == s.nfe_forward + s.nfe_backward + s.samples  # dL/dt1's call in nfe_backward
        assert layer.sample_calls == s.samples == layer.count
        A, B, _ = layer.factors()
        assert torch.isfinite(A).all() and torch.isfinite(B).all() and B.abs().sum() > 0


def test_unarmed_collector_collects_nothing_and_no_grad_never_samples():
    g = torch.Generator().manual_seed(7)
    block = ODEBlock(TanhField(2, 3, g), 0.0, 1.0, method="rk4", options={"step_size": 0.5})
    collector = CurvatureCollector(block, sample_step=0.5)
    x0 = torch.randn(3, 2, dtype=DT)
    (block(x0) ** 2).sum().backward()
    assert collector.samples == 0 and all(layer.factors() is None for layer in collector.layers)
    collector.arm(True)
    with torch.no_grad():
        block(x0)
    assert collector.samples == 0 and all(layer.factors() is None for layer in collector.layers)


def test_multi_block_factors_carry_each_blocks_horizon():
    torch.manual_seed(8)
    model = ODEClassifier.for_vectors(
        3, 2, width=2, n_blocks=2, depth=1, method="rk4", options={"step_size": 0.25}
    ).to(DT)
    model.blocks[1].set_t1(2.0)
    collector = _armed_collector(model, sample_step=0.25)
    nn.functional.cross_entropy(model(torch.randn(4, 3, dtype=DT)), torch.tensor([0, 1, 0, 1])).backward()
    spans = {
        layer.name.split(".field")[0]: layer.span for layer in collector.layers if layer.block is not None
    }
    assert spans == {"blocks.0": 1.0, "blocks.1": 2.0}
    assert model.blocks[0].stats.samples > 0 and model.blocks[1].stats.samples > 0
    for layer in collector.layers:
        assert layer.factors() is not None


def test_unsupported_modules_are_listed_and_copies_are_not_tracked():
    model = ODEClassifier.for_images(1, 3, width=2, method="rk4", options={"step_size": 0.5})
    collector = CurvatureCollector(model)
    assert collector.skipped["stem.1"] == "no curvature adapter for GroupNorm"
    assert adapter_for(nn.Conv2d(2, 2, 3, groups=2))[1] == "grouped convolution (groups=2)"
    assert adapter_for(nn.ReLU()) == (None, None)
    assert all(block.sampler is collector for block in model.blocks)
    clone = copy.deepcopy(model)
    assert clone.blocks[0].sampler is None
    calls = [layer.calls for layer in collector.layers]
    clone(torch.randn(2, 1, 8, 8))
    assert [layer.calls for layer in collector.layers] == calls
    restored = pickle.loads(pickle.dumps(model))
    assert restored.blocks[0].sampler is None
    restored(torch.randn(2, 1, 8, 8))
    collector.remove()
    assert model.blocks[0].sampler is None


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, math.nan, True, "0.1"])
def test_invalid_sample_step_is_rejected(bad):
    with pytest.raises(ValueError, match=r"`sample_step` must be a number in \(0, 1\]"):
        CurvatureCollector(nn.Linear(2, 2), sample_step=bad)


# ------------------------------------------------------------ sampling="stages"
def _stage_collector(model):
    collector = CurvatureCollector(model, sampling="stages")
    collector.arm(True)
    return collector


def _rel(got, ref):
    return ((got - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("adjoint", [True, False])
@pytest.mark.parametrize("method,options", [("dopri5", None), ("rk4", {"step_size": 0.1})])
def test_stage_factors_match_a_brute_force_integral_on_a_fine_grid(adjoint, method, options):
    """The solver's own evaluations, weighted by the time each represents, integrate A(t) and B(t).

    Adaptive steps are uneven here; in direct mode B comes from the per-step sums of the
    stages' gradients (backprop scales each stage's by its solver weight).
    """
    g = torch.Generator().manual_seed(2)
    T, n = 2.0, 3
    field = AffineField(3, g)
    with torch.no_grad():
        field.lin.weight.mul_(2.0)
    block = ODEBlock(field, 0.0, T, method=method, options=options, rtol=1e-8, atol=1e-8, adjoint=adjoint)
    collector = _stage_collector(block)
    x0 = torch.randn(n, 3, generator=g, dtype=DT)
    w = torch.randn(n, 3, generator=g, dtype=DT)
    (w * block(x0)).sum(1).mean().backward()
    s = block.stats
    # Every evaluation of the solve that carries the gradient is a sample (the adjoint
    # solve; in direct mode the forward solve, whose rejected steps get no gradient).
    nfe = s.nfe_backward - 1 if adjoint else s.nfe_forward  # -1: dL/dt1's evaluation
    assert 20 < collector.samples <= nfe
    if method == "rk4":
        assert collector.samples == nfe
    (layer,) = collector.layers
    A, B, _ = layer.factors()
    a_ref, b_ref = _fine_integral(field, x0, w, T)
    assert _rel(A, a_ref) < 3e-3 and _rel(B, b_ref) < 3e-3, (_rel(A, a_ref), _rel(B, b_ref))


@pytest.mark.parametrize("adjoint", [True, False])
def test_stage_sampling_drops_the_evaluations_of_rejected_steps(adjoint):
    """A first step over half the horizon is rejected (three times here): its stages sit far
    off the trajectory (A would be 3% off with them) and must not count."""
    g = torch.Generator().manual_seed(2)
    T, n = 2.0, 3
    field = AffineField(3, g)
    with torch.no_grad():
        field.lin.weight.mul_(2.0)
    block = ODEBlock(field, 0.0, T, rtol=1e-8, atol=1e-8, options={"first_step": 1.0}, adjoint=adjoint)
    collector = _stage_collector(block)
    x0 = torch.randn(n, 3, generator=g, dtype=DT)
    w = torch.randn(n, 3, generator=g, dtype=DT)
    (w * block(x0)).sum(1).mean().backward()
    assert (block.stats.rejected_backward if adjoint else block.stats.rejected_forward) > 0
    A, B, _ = collector.layers[0].factors()
    a_ref, b_ref = _fine_integral(field, x0, w, T)
    assert _rel(A, a_ref) < 3e-3 and _rel(B, b_ref) < 3e-3, (_rel(A, a_ref), _rel(B, b_ref))


@pytest.mark.parametrize("adjoint", [True, False])
@pytest.mark.parametrize("method,options", [("dopri5", None), ("rk4", {"step_size": 0.1})])
def test_stage_sampling_adds_no_field_evaluation_and_records_only_on_refresh(adjoint, method, options):
    """A refresh pass evaluates the field exactly as often as a plain pass: the solver's own NFE."""
    g = torch.Generator().manual_seed(5)
    calls = []

    class Counted(TanhField):
        def forward(self, t, x):
            calls.append(t)
            return super().forward(t, x)

    field = Counted(2, 4, g)
    block = ODEBlock(field, 0.0, 1.0, method=method, options=options, adjoint=adjoint)
    collector = CurvatureCollector(block, sampling="stages")
    x0 = torch.randn(3, 2, generator=g, dtype=DT)
    seen = {}
    for refresh in (False, True, False):
        collector.arm(refresh)
        calls.clear()
        before = collector.samples
        (block(x0) ** 2).sum().backward()
        s = block.stats
        assert len(calls) == s.nfe_forward + s.nfe_backward  # dL/dt1's evaluation included
        seen.setdefault(refresh, []).append(len(calls))
        if refresh:
            assert collector.samples > before and s.samples == collector.samples - before
            assert all(layer.factors() is not None for layer in collector.layers)
            collector.reset()
        else:
            assert collector.samples == before and s.samples == 0
            assert all(not layer.stage_pending and layer.factors() is None for layer in collector.layers)
    assert seen[True][0] == seen[False][0] == seen[False][1]


def _closed_form_conv(field, x0, w, T):
    """x(t) and a(t) of the conv field as a dense affine flow on the flattened state."""
    n, d = len(x0), x0[0].numel()
    with torch.no_grad():
        bias_part = field.conv(torch.zeros(1, *x0.shape[1:], dtype=DT)).reshape(-1)
        eye = torch.eye(d, dtype=DT).reshape(d, *x0.shape[1:])
        m_lin = (field.conv(eye).reshape(d, d) - bias_part).T
    m = torch.zeros(d + 1, d + 1, dtype=DT)
    m[:d, :d], m[:d, d] = m_lin, bias_part
    x0_aug = torch.cat([x0.reshape(n, d), torch.ones(n, 1, dtype=DT)], 1)

    def state(t):
        return (x0_aug @ torch.linalg.matrix_exp(m * t).T)[:, :d].reshape(x0.shape)

    def adjoint(t):
        return ((w.reshape(n, d) / n) @ torch.linalg.matrix_exp(m_lin * (T - t))).reshape(x0.shape)

    return state, adjoint


@pytest.mark.parametrize("adjoint", [True, False])
def test_conv_stage_factors_match_a_brute_force_integral(adjoint):
    g = torch.Generator().manual_seed(3)
    T, n, L = 0.6, 2, 9
    field = ConvField(g)
    block = ODEBlock(field, 0.0, T, method="rk4", options={"step_size": 0.1}, adjoint=adjoint)
    collector = _stage_collector(block)
    x0 = torch.randn(n, 2, 3, 3, generator=g, dtype=DT)
    w = torch.randn(n, 2, 3, 3, generator=g, dtype=DT)
    (w * block(x0)).sum((1, 2, 3)).mean().backward()
    state, adj = _closed_form_conv(field, x0, w, T)
    points = 241
    a_ref = torch.zeros(19, 19, dtype=DT)
    b_ref = torch.zeros(2, 2, dtype=DT)
    for j, t in enumerate(torch.linspace(0, T, points, dtype=DT).tolist()):
        wt = T / (points - 1) / (2 if j in (0, points - 1) else 1)
        z = torch.cat([_unfold_by_loops(state(t), 3, 1), torch.ones(n * L, 1, dtype=DT)], 1)
        rows = adj(t).permute(0, 2, 3, 1).reshape(-1, 2)
        a_ref += wt * z.T @ z / (n * L)
        b_ref += wt * (n * rows).T @ (n * rows) / (n * L)
    A, B, locations = collector.layers[0].factors()
    assert locations == L
    assert _rel(A, a_ref) < 2e-3 and _rel(B, b_ref) < 2e-3, (_rel(A, a_ref), _rel(B, b_ref))


@pytest.mark.parametrize("adjoint", [True, False])
def test_stage_factors_of_a_block_solved_twice_carry_both_horizons(adjoint):
    """Two solves of one block per forward (an ODE-RNN's pattern): each weighted in its own solve."""
    g = torch.Generator().manual_seed(5)
    T, n = 1.0, 5
    field = AffineField(3, g)
    block = ODEBlock(field, 0.0, T, rtol=1e-8, atol=1e-8, adjoint=adjoint)
    collector = _stage_collector(block)
    x1, x2, w1, w2 = (torch.randn(n, 3, generator=g, dtype=DT) for _ in range(4))
    ((w1 * block(x1)).sum(1).mean() + (w2 * block(x2)).sum(1).mean()).backward()
    a1, b1 = _fine_integral(field, x1, w1, T)
    a2, b2 = _fine_integral(field, x2, w2, T)
    (layer,) = collector.layers
    assert len(layer.stage_pending) == 2
    A, B, _ = layer.factors()
    assert _rel(A, a1 + a2) < 3e-3 and _rel(B, b1 + b2) < 3e-3, (_rel(A, a1 + a2), _rel(B, b1 + b2))


def _steps_and_stages(build, loss, step):
    """Factors of the same pass sampled at the step starts and at the stages."""
    out = {}
    for sampling in ("steps", "stages"):
        torch.manual_seed(11)
        model = build()
        collector = CurvatureCollector(model, sample_step=step, sampling=sampling)
        collector.arm(True)
        loss(model).backward()
        out[sampling] = (model, collector, {layer.name: layer.factors() for layer in collector.layers})
    return out


@pytest.mark.parametrize("adjoint", [True, False])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_stage_sampling_of_a_cnf_ignores_the_inner_trace_gradient(trace, adjoint):
    """One output gradient per evaluation reaches each layer (the trace's own autograd calls,
    made while the evaluation runs, do not), and the factors agree with step sampling, which
    takes the adjoint's product through the field explicitly, to the quadrature error."""
    x = torch.randn(6, 2, dtype=DT)

    def build():
        rk4 = dict(method="rk4", options={"step_size": 0.05}, adjoint=adjoint)
        return CNF(2, hidden=4, depth=1, trace=trace, **rk4).to(DT)

    out = _steps_and_stages(build, lambda model: -model.log_prob(x).mean(), 0.05)
    model, collector, stages = out["stages"]
    s = model.blocks[0].stats
    assert collector.samples == (s.nfe_backward - 1 if adjoint else s.nfe_forward) == s.samples
    for layer in collector.layers:
        assert layer.count == collector.samples
    for name, (A, B, _) in stages.items():
        A_ref, B_ref, _ = out["steps"][2][name]
        assert _rel(A, A_ref) < 5e-3 and _rel(B, B_ref) < 5e-3, (name, _rel(A, A_ref), _rel(B, B_ref))


@pytest.mark.parametrize("adjoint", [True, False])
def test_stage_sampling_of_an_odernn_matches_step_sampling(adjoint):
    """Tuple states, a gap-scaled field and one solve per observation gap."""
    times = torch.tensor([[0.0, 0.4, 1.0, 1.3], [0.0, 0.5, 0.7, 1.5]], dtype=DT)
    values = torch.randn(2, 4, 2, dtype=DT)
    target = torch.randn(2, 1, dtype=DT)

    def build():
        rk4 = dict(method="rk4", options={"step_size": 0.05}, adjoint=adjoint)
        return ODERNN(2, 3, 1, hidden=4, depth=1, **rk4).to(DT)

    def loss(model):
        return nn.functional.mse_loss(model(times, values), target)

    out = _steps_and_stages(build, loss, 0.05)
    model, collector, stages = out["stages"]
    assert len(stages) == 3  # the field's two layers and the head; the GRU cell has no adapter
    assert len([layer for layer in collector.layers if layer.block is not None]) == 2
    assert collector.samples == model.blocks[0].totals.samples > 0
    for name, (A, B, _) in stages.items():
        A_ref, B_ref, _ = out["steps"][2][name]
        assert _rel(A, A_ref) < 5e-3 and _rel(B, B_ref) < 5e-3, (name, _rel(A, A_ref), _rel(B, B_ref))


@pytest.mark.parametrize("bad", ["stage", "", None, 1])
def test_invalid_sampling_is_rejected(bad):
    message = r"`sampling` must be one of \['steps', 'stages'\], but got sampling="
    with pytest.raises(ValueError, match=message):
        CurvatureCollector(nn.Linear(2, 2), sampling=bad)
