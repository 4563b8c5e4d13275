"""The strategy contract: every search strategy runs two tiny trials, records what each ran, and
reproduces them from its seed.

A new strategy joins by subclassing :class:`StrategyContract` with its name and, for an
in-training strategy, where a trial starts its horizon.  Each class runs three studies once
(seed 3 in SQLite, seed 3 again and seed 4 in memory) and checks them in several tests.
"""

from __future__ import annotations

import math
from typing import ClassVar

import optuna
import pytest
from optuna.trial import TrialState
from snopt.search import BLACK_BOX, IN_TRAINING, STRATEGIES, Budget, Float, Int, SearchSpace, create_study
from snopt.search._strategies import START, sampled_names

SPACE = SearchSpace(
    {
        "t1": Float(0.5, 2.0, log=True, default=1.0),
        "lr": Float(1e-3, 1e-1, log=True, default=1e-2),
        "width": Int(2, 6, default=4),
    }
)
#: Two training steps of the tiny digits run (tests/conftest.py).
STEPS = 2


def _run(config, strategy, seed, storage=None):
    study = create_study(
        config,
        strategy=strategy,
        space=SPACE,
        budget=Budget(n_trials=2),
        storage=storage,
        seed=seed,
        pruner="none",
    )
    study.optimize()
    return study


def _signature(study):
    return [
        (t.number, t.state, dict(t.params), t.value, t.user_attrs["nfe_total"], t.user_attrs["t1_final"])
        for t in study.trials
    ]


def _chosen(study):
    return [(dict(t.params), t.user_attrs["t1_initial"]) for t in study.trials]


class StrategyContract:
    """The suite; subclasses set ``strategy`` and, for an in-training one, ``start``."""

    strategy: ClassVar[str]
    #: Where an in-training strategy starts a trial's horizon (``snopt.search._strategies.START``):
    #: ``best`` (the best trial's final horizons), ``default`` or ``random``; None: black-box.
    start: ClassVar[str | None] = None

    @pytest.fixture(scope="class")
    def studies(self, tiny_config, tmp_path_factory):
        """The studies of seed 3 (in SQLite), of seed 3 again and of seed 4 (in memory)."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        config = tiny_config(max_steps=STEPS)
        url = f"sqlite:///{tmp_path_factory.mktemp(self.strategy) / 'c.db'}"
        first = _run(config, self.strategy, seed=3, storage=url)
        return first, _run(config, self.strategy, seed=3), _run(config, self.strategy, seed=4)

    def test_the_strategy_is_declared_as_it_runs(self):
        assert self.strategy in STRATEGIES
        assert (self.strategy in IN_TRAINING) == (self.start is not None) == (self.strategy not in BLACK_BOX)
        assert START.get(self.strategy) == self.start

    def test_trials_complete_and_record_what_they_ran(self, studies):
        trials = studies[0].trials
        assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
        sampled = sampled_names(self.strategy, SPACE)
        for t in trials:
            # What the sampler chose is an Optuna param; everything the run used is recorded.
            assert sorted(t.params) == sorted(sampled)
            assert set(t.user_attrs["hyperparams"]) == set(SPACE.names)
            for name, value in t.user_attrs["hyperparams"].items():
                if name not in sampled:
                    assert value == SPACE[name].default_value()
            assert 0.0 <= t.value <= 1.0 and math.isfinite(t.value)
            assert t.user_attrs["strategy"] == self.strategy
            assert t.user_attrs["snopt_status"] == "completed"
            assert t.user_attrs["steps"] == STEPS
            # Fixed-grid RK4 on [0, T]: 4 evaluations forward, 4 back, per step (plus the adjoint's own).
            assert t.user_attrs["nfe_total"] >= 8 * STEPS
            assert t.user_attrs["curve"]["step"] == [1, 2]
            assert t.user_attrs["curve"]["metric"][-1] == pytest.approx(t.value)
            # the final horizon of every block is a user attribute (the T that produced the value)
            assert t.user_attrs["t1_final/blocks.0"] == pytest.approx(t.user_attrs["t1_final"])

    def test_horizons_start_and_move_as_the_strategy_says(self, studies):
        trials = studies[0].trials
        for t in trials:
            if self.start is not None:
                assert t.user_attrs["t1_trajectory"]["step"][0] == 0
                assert len(t.user_attrs["t1_trajectory"]["t1"]) == STEPS + 1
                lo, hi = 0.5, 2.0
                assert all(lo - 1e-9 <= v <= hi + 1e-9 for v in t.user_attrs["t1_trajectory"]["t1"])
                assert "t1" not in t.params  # never the starting T as param
            else:
                assert t.user_attrs["t1_final"] == t.params["t1"]
        if self.start is not None:
            # the first in-training run starts at the default
            assert trials[0].user_attrs["t1_initial"] == 1.0
        if self.start == "best":
            # the next trial starts from the best trial's final horizons (per block)
            best = max(trials[:1], key=lambda t: t.value)
            assert trials[1].user_attrs["t1_initial/blocks.0"] == pytest.approx(
                best.user_attrs["t1_final/blocks.0"]
            )
        if self.start == "default":
            assert all(t.user_attrs["t1_initial"] == 1.0 for t in trials)
        if self.start == "random":
            assert trials[1].user_attrs["t1_initial"] != 1.0  # a random restart

    def test_the_same_seed_reproduces_and_another_samples_elsewhere(self, studies):
        first, again, other = studies
        assert _signature(again) == _signature(first)
        assert _chosen(other) != _chosen(first)


class TestFeedback(StrategyContract):
    strategy, start = "feedback", "best"


class TestGradient(StrategyContract):
    strategy, start = "gradient", "best"


class TestHybrid(StrategyContract):
    strategy, start = "hybrid", "default"


class TestFeedbackOnly(StrategyContract):
    strategy, start = "feedback-only", "random"


class TestGradientOnly(StrategyContract):
    strategy, start = "gradient-only", "random"


class TestTPE(StrategyContract):
    strategy = "tpe"


class TestGP(StrategyContract):
    strategy = "gp"


class TestCMAES(StrategyContract):
    strategy = "cmaes"


class TestRandom(StrategyContract):
    strategy = "random"


class TestGrid(StrategyContract):
    strategy = "grid"


class TestNSGA2(StrategyContract):
    strategy = "nsga2"


def test_every_strategy_has_a_contract_class():
    covered = {cls.strategy for cls in StrategyContract.__subclasses__()}
    assert covered == set(STRATEGIES)
