"""The optimizer contract: every parameter optimizer snopt builds passes the same suite.

A new optimizer joins by subclassing :class:`OptimizerContract` with its ``name`` (the
``RunConfig.optimizer`` value) and the settings it is tested at. Each case runs on a small
Neural ODE in float64 (an ODE block between two linear layers, fixed-step RK4, adjoint mode)
fitted to a linear target, so losses compare exactly between runs.
"""

from __future__ import annotations

import copy
import io
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snopt import ODEBlock, RunConfig, SNOpt
from snopt._run import build_optimizer

DT = torch.float64


class Field(nn.Module):
    def __init__(self, dim: int = 3, hidden: int = 5) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim, hidden)
        self.l2 = nn.Linear(hidden, dim)

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(x)))


def _model(seed: int = 0, frozen: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    block = ODEBlock(Field(), 0.0, 0.5, method="rk4", options={"step_size": 0.25}, adjoint=True)
    model = nn.Sequential(nn.Linear(2, 3), block, nn.Linear(3, 1)).to(DT)
    if frozen:
        model[0].weight.requires_grad_(False)
    return model


def _batches(steps: int, seed: int = 1, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[1.5], [-0.7]], dtype=DT)
    out = []
    for _ in range(steps):
        x = torch.randn(n, 2, generator=g, dtype=DT)
        out.append((x, x @ w + 0.3))
    return out


class OptimizerContract:
    """The suite; subclasses set ``name`` and optionally ``settings`` and ``lr``."""

    name: ClassVar[str]
    lr: ClassVar[float] = 0.05
    settings: ClassVar[dict[str, Any]] = {}

    def make(self, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
        fields = dict(self.settings, optimizer=self.name, lr=self.lr)
        fields.update(overrides)
        return build_optimizer(RunConfig(**fields), model)

    def train(self, model, opt, batches) -> list[float]:
        losses = []
        for x, y in batches:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    def test_descends_on_a_smooth_problem(self):
        model = _model()
        losses = self.train(model, self.make(model), _batches(40))
        assert all(map(torch.isfinite, torch.tensor(losses)))
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.5 * first, (first, last)

    def test_seeded_runs_are_identical(self):
        runs = []
        for _ in range(2):
            model = _model(seed=3)
            runs.append(self.train(model, self.make(model), _batches(8)))
        assert runs[0] == runs[1]

    def test_state_dict_round_trip_continues_the_same_path(self):
        batches = _batches(12)
        model = _model()
        opt = self.make(model)
        self.train(model, opt, batches[:6])
        # Plain data only: the state travels through torch.save and a weights_only load.
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        straight = self.train(model, opt, batches[6:])

        fresh_model = _model(seed=7)  # other weights: everything must come from the state
        fresh_model.load_state_dict(saved["model"])
        fresh = self.make(fresh_model)
        fresh.load_state_dict(saved["opt"])
        assert self.train(fresh_model, fresh, batches[6:]) == straight

    def test_step_with_a_closure_returns_its_loss(self):
        model = _model()
        opt = self.make(model)
        x, y = _batches(1)[0]

        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        before = copy.deepcopy(model.state_dict())
        loss = opt.step(closure)
        assert loss is not None and torch.equal(loss, F.mse_loss(_rerun(before, x), y))
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    def test_parameters_without_gradients_stay_put(self):
        model = _model(frozen=True)
        frozen = model[0].weight.detach().clone()
        self.train(model, self.make(model), _batches(5))
        assert torch.equal(model[0].weight, frozen)
        assert model[0].bias.grad is not None  # its neighbour trained

    @pytest.mark.parametrize("lr", [0.0, -0.1, float("nan")])
    def test_a_bad_learning_rate_is_refused_naming_lr(self, lr):
        model = _model()
        with pytest.raises(ValueError, match="lr"):
            self.make(model, lr=lr)


def _rerun(state, x):
    model = _model()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


class TestSNOpt(OptimizerContract):
    name = "snopt"
    lr = 0.1


class TestSNOptReference(OptimizerContract):
    """The paper's reference form (``curvature="reference"``): the same contract."""

    name = "snopt"
    lr = 0.1
    settings: ClassVar[dict[str, Any]] = {"snopt_curvature": "reference"}


class TestSNOptStages(OptimizerContract):
    """Curvature from the adjoint solve's own stage evaluations (``sampling="stages"``).

    ``RunConfig`` has no field for it (``"steps"`` is the default), so the optimizer is built
    as :func:`snopt._run.build_optimizer` builds SNOpt, plus the keyword.
    """

    name = "snopt"
    lr = 0.1

    def make(self, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
        return SNOpt(model, lr=overrides.get("lr", self.lr), sampling="stages")

    def test_refresh_steps_record_the_stage_evaluations(self):
        model = _model()
        opt = self.make(model)
        self.train(model, opt, _batches(3))
        block = model[1]
        # One refresh (the first step), sampled at every evaluation of its adjoint solve
        # (rk4: 4 per step, 2 steps of 0.25 over [0, 0.5]) and no other.
        assert opt.stats["refreshes"] == 1 and opt.stats["samples"] == 8
        assert block.stats.samples == 0  # the last step was no refresh


class TestAdam(OptimizerContract):
    name = "adam"
    lr = 0.02


class TestSGD(OptimizerContract):
    name = "sgd"
    lr = 0.05
