"""Tests of the Neural ODE models against closed forms and independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from snopt._layers import ConvField, MLPField
from snopt._models import CNF, ODERNN, CNFField, ODEClassifier, standard_normal_log_prob
from snopt._ode import ODEBlock

TIGHT = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class _LinearField(nn.Module):
    """dz/dt = A z, a field with the closed-form flow expm(A t)."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return z @ self.a.T


def _normal_log_prob(z: Tensor) -> Tensor:
    """Independent of the library: a sum of 1-d normal log-densities."""
    return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)


# --- ODEClassifier -------------------------------------------------------------------------------


def test_image_classifier_shapes_and_blocks() -> None:
    model = ODEClassifier.for_images(3, 5, width=8, n_blocks=2, t1=0.5, pool=2)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 2
    assert all(isinstance(b, ODEBlock) and isinstance(b.func, ConvField) for b in model.blocks)
    assert all(b.t1 == 0.5 for b in model.blocks)
    assert model(torch.randn(4, 3, 8, 8)).shape == (4, 5)
    assert model(torch.randn(2, 3, 5, 7)).shape == (2, 5)


def test_vector_classifier_shapes_and_blocks() -> None:
    model = ODEClassifier.for_vectors(
        6, 3, width=8, hidden=16, n_blocks=3, method="rk4", options={"step_size": 0.25}
    )
    assert len(model.blocks) == 3
    assert all(isinstance(b.func, MLPField) and b.func.hidden == 16 for b in model.blocks)
    out = model(torch.randn(5, 6))
    assert out.shape == (5, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ODEClassifier.for_images(0, 10), "`in_channels` must be a positive integer"),
        (
            lambda: ODEClassifier.for_images(1, 1),
            r"`num_classes` must be an integer >= 2, but got num_classes=1",
        ),
        (lambda: ODEClassifier.for_images(1, 10, width=0), "`width` must be a positive integer"),
        (lambda: ODEClassifier.for_images(1, 10, n_blocks=0), "`n_blocks` must be a positive integer"),
        (lambda: ODEClassifier.for_images(1, 10, pool=0), "`pool` must be a positive integer"),
        (lambda: ODEClassifier.for_images(1, 10, t1=-1.0), r"`t1 > t0` must hold"),
        (lambda: ODEClassifier.for_vectors(0, 3), "`in_features` must be a positive integer"),
        (lambda: ODEClassifier.for_vectors(4, 3, depth=0), "`depth` must be a positive integer"),
        (lambda: ODEClassifier(nn.Identity(), [], nn.Identity()), "`blocks` must hold at least one ODEBlock"),
    ],
)
def test_classifier_invalid_arguments(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


# --- CNF -----------------------------------------------------------------------------------------


def _linear_cnf(a: Tensor, t1: float, trace: str, adjoint: bool = True) -> CNF:
    cnf = CNF(a.shape[0], t1=t1, trace=trace, adjoint=adjoint, **TIGHT).double()
    cnf.field.field = _LinearField(a)
    return cnf


def _closed_form(a: Tensor, t1: float, x: Tensor) -> Tensor:
    z = x @ torch.linalg.matrix_exp(a * t1).T
    return _normal_log_prob(z) + t1 * torch.trace(a)


def test_cnf_shapes_and_blocks() -> None:
    cnf = CNF(2, hidden=8)
    assert isinstance(cnf.blocks[0], ODEBlock) and isinstance(cnf.field, CNFField)
    x = torch.randn(6, 2)
    lp = cnf(x)
    assert lp.shape == (6,)
    lp.mean().backward()
    assert all(p.grad is not None for p in cnf.parameters())


def test_standard_normal_log_prob() -> None:
    z = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(standard_normal_log_prob(z), _normal_log_prob(z))


@pytest.mark.parametrize("adjoint", [True, False])
def test_cnf_exact_trace_matches_the_linear_closed_form(adjoint: bool) -> None:
    a = 0.5 * torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64)
    cnf = _linear_cnf(a, 0.7, "exact", adjoint=adjoint)
    expected = _closed_form(a, 0.7, x)
    torch.testing.assert_close(cnf.log_prob(x), expected, rtol=0, atol=1e-6)
    with torch.no_grad():  # the inner trace gradient must also run under no_grad
        torch.testing.assert_close(cnf.log_prob(x), expected, rtol=0, atol=1e-6)


def test_cnf_hutchinson_keeps_one_noise_along_the_solve() -> None:
    # For dz/dt = A z the estimator is the constant e^T A e, so with one noise vector per
    # row for the whole solve, log p = log N(expm(AT) x) + T e^T A e exactly.
    a = 0.5 * torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64)
    cnf = _linear_cnf(a, 0.7, "hutchinson")
    lp = cnf.log_prob(x)
    e = cnf.field.noise
    assert e is not None and e.shape == x.shape and set(e.unique().tolist()) <= {-1.0, 1.0}
    z = x @ torch.linalg.matrix_exp(a * 0.7).T
    expected = _normal_log_prob(z) + 0.7 * torch.einsum("bi,ij,bj->b", e, a, e)
    torch.testing.assert_close(lp, expected, rtol=0, atol=1e-6)


def test_cnf_hutchinson_is_unbiased() -> None:
    cnf = CNF(2, hidden=16, trace="hutchinson", rtol=1e-7, atol=1e-7).double()
    x = torch.randn(1, 2, dtype=torch.float64)
    n = 4000
    with torch.no_grad():
        estimates = cnf.log_prob(x.expand(n, 2).contiguous())  # one noise draw per row
        cnf.field.trace = "exact"
        exact = cnf.log_prob(x)[0]
    std = float(estimates.std())
    assert std > 1e-3  # the estimator really is random
    assert abs(float(estimates.mean()) - float(exact)) < 5 * std / math.sqrt(n)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_cnf_adjoint_gradients_match_direct(trace: str) -> None:
    direct = CNF(2, hidden=8, trace=trace, adjoint=False, **TIGHT).double()
    adjoint = CNF(2, hidden=8, trace=trace, adjoint=True, **TIGHT).double()
    adjoint.load_state_dict(direct.state_dict())
    x = torch.randn(5, 2, dtype=torch.float64)
    grads = []
    for model in (direct, adjoint):
        torch.manual_seed(1)  # the same Hutchinson noise for both
        model.log_prob(x).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for g_direct, g_adjoint in zip(*grads):
        torch.testing.assert_close(g_adjoint, g_direct, rtol=1e-6, atol=1e-8)


def test_cnf_field_standalone_draws_noise_once() -> None:
    field = CNFField(MLPField(2, hidden=4), "hutchinson")
    z = torch.randn(3, 2)
    dz, dlogp = field(0.0, (z, torch.zeros(3)))
    assert dz.shape == (3, 2) and dlogp.shape == (3,)
    noise = field.noise
    field(0.5, (z, torch.zeros(3)))
    assert field.noise is noise


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: CNF(0), "`dim` must be a positive integer, but got dim=0"),
        (lambda: CNF(2, trace="skilling"), r"`trace` must be one of \['hutchinson', 'exact'\]"),
        (lambda: CNF(2, hidden=0), "`hidden` must be a positive integer"),
        (lambda: CNF(2, activation="gelu"), "`activation` must be one of"),
        (lambda: CNF(2, rtol=0.0), "`rtol` must be a positive finite number"),
        (lambda: CNF(2).log_prob(torch.zeros(4, 3)), r"`x` must have shape \[batch, 2\]"),
    ],
)
def test_cnf_invalid_arguments(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


# --- ODERNN --------------------------------------------------------------------------------------


def _series(batch: int = 3, length: int = 5, dim: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    times = torch.sort(torch.rand(batch, length, dtype=torch.float64) * 3, dim=1).values
    values = torch.randn(batch, length, dim, dtype=torch.float64)
    mask = (torch.rand(batch, length, dim) > 0.3).double()
    return times, values, mask


def test_odernn_shapes_and_blocks() -> None:
    model = ODERNN(2, 8, 3)
    assert len(model.blocks) == 1 and isinstance(model.blocks[0], ODEBlock)
    assert isinstance(model.blocks[0].func.field, MLPField)
    times, values, mask = (t.float() for t in _series())
    out = model(times, values, mask, until=times[:, -1] + 1)
    assert out.shape == (3, 3)
    out.sum().backward()
    assert model.blocks[0].t1_grad is not None
    assert model(times, values).shape == (3, 3)


def test_odernn_ignores_masked_values() -> None:
    model = ODERNN(2, 8, 1, **TIGHT).double()
    times, values, mask = _series()
    poisoned = torch.where(mask > 0, values, torch.full_like(values, float("nan")))
    torch.testing.assert_close(model(times, poisoned, mask), model(times, values, mask))


def test_odernn_padding_repeats_last_time_with_zero_mask() -> None:
    model = ODERNN(2, 8, 1, **TIGHT).double()
    times, values, mask = _series(batch=1, length=4)
    pad = 3
    times_p = torch.cat([times, times[:, -1:].expand(1, pad)], dim=1)
    values_p = torch.cat([values, torch.randn(1, pad, 2, dtype=torch.float64)], dim=1)
    mask_p = torch.cat([mask, torch.zeros(1, pad, 2, dtype=torch.float64)], dim=1)
    until = times[:, -1] + 0.5
    torch.testing.assert_close(
        model(times_p, values_p, mask_p, until=until), model(times, values, mask, until=until)
    )


def test_odernn_horizon_is_a_time_scale() -> None:
    # dh/ds = dt * f(h) on [0, T]: doubling T while halving every time gives the same result.
    slow = ODERNN(2, 8, 1, t1=1.0, **TIGHT).double()
    fast = ODERNN(2, 8, 1, t1=2.0, **TIGHT).double()
    state = slow.state_dict()
    state["blocks.0.horizon"] = fast.state_dict()["blocks.0.horizon"]
    fast.load_state_dict(state)
    times, values, mask = _series()
    until = times[:, -1] + 0.8
    expected = slow(times, values, mask, until=until)
    torch.testing.assert_close(fast(times / 2, values, mask, until=until / 2), expected, rtol=1e-7, atol=1e-8)
    assert not torch.allclose(fast(times, values, mask, until=until), expected)


def test_odernn_horizon_gradient_matches_finite_differences() -> None:
    model = ODERNN(1, 6, 1, t1=1.3, **TIGHT).double()
    times, values, mask = _series(batch=2, length=4, dim=1)
    until = times[:, -1] + 0.5
    block = model.blocks[0]
    model(times, values, mask, until=until).sum().backward()
    grad = float(block.t1_grad)
    h = 1e-5
    with torch.no_grad():
        block.set_t1(1.3 + h)
        up = float(model(times, values, mask, until=until).sum())
        block.set_t1(1.3 - h)
        down = float(model(times, values, mask, until=until).sum())
    assert grad == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)


def test_odernn_invalid_inputs() -> None:
    model = ODERNN(2, 4, 1)
    times, values, mask = (t.float() for t in _series())
    with pytest.raises(ValueError, match="`hidden_dim` must be a positive integer, but got hidden_dim=0"):
        ODERNN(2, 0, 1)
    with pytest.raises(ValueError, match=r"`times` must have shape \[batch, L\]"):
        model(times[:, 0], values, mask)
    with pytest.raises(ValueError, match=r"`values` must have shape \[3, 5, 2\]"):
        model(times, values[..., :1], mask)
    with pytest.raises(ValueError, match=r"`mask` must have shape \[3, 5, 2\]"):
        model(times, values, mask[:, :2])
    with pytest.raises(ValueError, match="`times` must be non-decreasing"):
        model(times.flip(1), values, mask)
    with pytest.raises(ValueError, match="`until` must not be before"):
        model(times, values, mask, until=times[:, -1] - 1)
    with pytest.raises(ValueError, match=r"`until` must have shape \[3\]"):
        model(times, values, mask, until=times[:, -1:])
