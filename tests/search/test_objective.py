"""The training objective, tested with ``optuna.trial.FixedTrial`` against direct training runs."""

import math
import time

import optuna
import pytest
import snopt.search._objective as objective_module
import torch
from snopt.search import (
    Budget,
    Float,
    Int,
    PruningCallback,
    SearchSpace,
    TrainingObjective,
    TrialFailed,
    create_study,
    load_study,
)

from snopt import RunConfig, run_training
from snopt._training import SOLVE_CHECK_EVERY, Callback

SPACE = SearchSpace(
    {"t1": Float(0.5, 2.0, log=True, default=1.0), "lr": Float(1e-3, 1e-1, log=True), "width": Int(2, 6)}
)


def test_value_equals_an_independent_training_run(tiny_config):
    base = tiny_config()
    objective = TrainingObjective(base, SPACE, "tpe")
    trial = optuna.trial.FixedTrial({"t1": 1.5, "lr": 0.02, "width": 3})
    value = objective(trial)
    # The same run built by hand, without the study machinery.
    direct = run_training(
        RunConfig(**{**base.__dict__, "t1": 1.5, "lr": 0.02, "model_kwargs": {"width": 3}}), progress=False
    )
    assert value == direct.final["metric"]
    attrs = trial.user_attrs
    assert attrs["nfe_total"] == direct.stats["nfe_total"]
    assert attrs["nfe_forward"] + attrs["nfe_backward"] == attrs["nfe_total"]
    assert attrs["steps"] == 3
    assert attrs["t1_initial"] == attrs["t1_final"] == 1.5
    assert attrs["hyperparams"] == {"t1": 1.5, "lr": 0.02, "width": 3}
    assert attrs["snopt_status"] == "completed"
    assert objective.direction == "maximize" and objective.metric_name == "accuracy"


def test_unsampled_parameters_keep_defaults_and_strategy_sets_control(tiny_config):
    objective = TrainingObjective(tiny_config(), SPACE, "hybrid")
    assert objective.sampled_names() == ["lr", "width"]
    values = objective.hyperparams(optuna.trial.FixedTrial({"lr": 0.01, "width": 5}))
    assert values["t1"] == 1.0
    config = objective.config_for(values)
    assert config.control == "feedback" and config.t1_bounds == (0.5, 2.0) and config.t1 == 1.0
    black_box = TrainingObjective(tiny_config(), SPACE, "random").config_for(values)
    assert black_box.control == "fixed" and black_box.t1_bounds is None
    gradient = TrainingObjective(tiny_config(), SPACE, "gradient")
    assert gradient.sampled_names() == ["lr", "width"]  # a sampler tunes everything but T
    assert gradient.config_for(SPACE.defaults()).control == "gradient"
    ablation = TrainingObjective(tiny_config(), SPACE, "feedback-only")
    assert ablation.sampled_names() == []  # only the controller tunes
    assert ablation.config_for(SPACE.defaults()).control == "feedback"


def test_a_solver_failure_fails_the_trial_with_its_reason(tiny_config):
    # SGD with an absurd learning rate: the loss overflows within the three steps.
    config = tiny_config(optimizer="sgd", momentum=0.0)
    space = SearchSpace({"lr": Float(1e-3, 1e12, log=True)})
    objective = TrainingObjective(config, space, "random")
    trial = optuna.trial.FixedTrial({"lr": 1e12})
    with pytest.raises(TrialFailed, match="NonFiniteLossError"):
        objective(trial)
    assert trial.user_attrs["snopt_status"] == "failed"
    assert "loss became" in trial.user_attrs["fail_reason"]
    assert trial.user_attrs["nfe_total"] > 0  # the work done before the failure is counted


def test_failed_trials_do_not_stop_the_study(tiny_config):
    from snopt.search import Budget, create_study

    config = tiny_config(optimizer="sgd", momentum=0.0)
    study = create_study(
        config,
        strategy="random",
        space=SearchSpace({"lr": Float(1e10, 1e12, log=True)}),
        budget=Budget(n_trials=2),
        storage=None,
        pruner="none",
    )
    study.optimize()
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL] * 2
    assert all("NonFiniteLossError" in t.user_attrs["fail_reason"] for t in study.trials)


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_pruning_through_intermediate_reports(tiny_config):
    study = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    objective = TrainingObjective(tiny_config(), SPACE, "random")
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.intermediate_values == {1: trial.user_attrs["curve"]["metric"][0]}
    assert trial.user_attrs["snopt_status"] == "pruned"
    assert trial.user_attrs["steps"] == 1


def test_pruning_callback_never_prunes_the_last_evaluation(tiny_config):
    study = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    trial = study.ask()
    config = tiny_config(max_steps=2, eval_every=5)  # a single evaluation, at the end
    result = run_training(config, callbacks=[PruningCallback(trial)], progress=False)
    assert result.status == "completed"
    assert list(trial.storage.get_trial(trial._trial_id).intermediate_values) == [2]


def test_trial_callbacks_factory_gets_each_trial_and_config(tiny_config):
    seen = []

    class Spy(Callback):
        def __init__(self, trial, config):
            self.trial, self.config = trial, config

        def on_fit_end(self, trainer, result):
            seen.append((self.trial.params["t1"], self.config.t1, result.status))

    objective = TrainingObjective(
        tiny_config(), SPACE, "tpe", trial_callbacks_factory=lambda t, c: [Spy(t, c)]
    )
    objective(optuna.trial.FixedTrial({"t1": 0.7, "lr": 0.01, "width": 2}))
    assert seen == [(0.7, 0.7, "completed")]


def test_nan_metric_is_a_failure(tiny_config, monkeypatch):
    from snopt._tasks import DigitsTask

    monkeypatch.setattr(
        DigitsTask, "evaluate", lambda self, model, loader: {"val_loss": math.nan, "metric": math.nan}
    )
    objective = TrainingObjective(tiny_config(), SPACE, "random")
    trial = optuna.trial.FixedTrial({"t1": 1.0, "lr": 0.01, "width": 2})
    with pytest.raises(TrialFailed, match="validation metric is nan"):
        objective(trial)
    assert trial.user_attrs["snopt_status"] == "failed"


@pytest.mark.parametrize("strategy, warmup, first", [("feedback", 1, 4), ("tpe", 1, 1)])
def test_every_strategy_is_prunable_in_training_ones_after_warmup_and_3_updates(
    tiny_config, strategy, warmup, first
):
    study = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    config = tiny_config(max_steps=8, t1_warmup=warmup, t1_every=1)
    study.optimize(TrainingObjective(config, SPACE, strategy), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["snopt_status"] == "pruned" and trial.user_attrs["nfe_total"] > 0
    # in-training: the pruner first judges at warm-up + 3 updates; values before are still reported
    assert trial.user_attrs["steps"] == first
    assert sorted(trial.intermediate_values) == list(range(1, first + 1))
    assert len(trial.user_attrs["t1_trajectory"]["t1"]) == first + 1  # T0 and T after each step


@pytest.mark.parametrize(
    "pruner, cls, kwargs",
    [
        (
            "median",
            optuna.pruners.MedianPruner,
            {"n_startup_trials": 2, "n_warmup_steps": 0, "interval_steps": 1},
        ),
        (
            "hyperband",
            optuna.pruners.HyperbandPruner,
            {"min_resource": 1, "max_resource": "auto", "reduction_factor": 3},
        ),
        ("none", optuna.pruners.NopPruner, {}),
    ],
)
def test_pruners_are_built_and_recorded(tiny_config, pruner, cls, kwargs):
    from snopt.search import create_study

    study = create_study(tiny_config(), strategy="gp", space=SPACE, storage=None, pruner=pruner)
    assert isinstance(study.pruner, cls)
    assert study.user_attrs["snopt"]["pruner"] == {"class": cls.__name__, "kwargs": kwargs}
    gp = study.user_attrs["snopt"]["sampler"]
    assert gp["class"] == "GPSampler" and gp["kwargs"]["n_startup_trials"] == 4


def _one_trial(objective):
    study = optuna.create_study(direction=objective.direction)
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    return study.trials[0]


# A tight tolerance: the first forward solve alone takes hundreds of field evaluations.
TIGHT = dict(method="dopri5", rtol=1e-6, atol=1e-6, max_steps=2)
#: An NFE budget that runs out inside the first forward solve.
LIMIT = 60


def test_a_trial_budget_stops_the_trial_inside_its_first_solve_and_prunes_it(tiny_config):
    space = SearchSpace({"lr": Float(1e-3, 1e-1, log=True)})
    objective = TrainingObjective(tiny_config(**TIGHT), space, "random", trial_budget=Budget(nfe=LIMIT))
    trial = _one_trial(objective)
    assert trial.state == optuna.trial.TrialState.PRUNED
    attrs = trial.user_attrs
    assert attrs["snopt_status"] == "budget" and attrs["steps"] == 0
    assert "the trial's budget ran out (NFE" in attrs["stop_reason"]
    assert LIMIT <= attrs["nfe_total"] <= LIMIT + SOLVE_CHECK_EVERY


def test_a_study_nfe_budget_is_enforced_inside_the_solve(tiny_config):
    config = tiny_config(**TIGHT)
    space = SearchSpace({"lr": Float(1e-3, 1e-1, log=True)})
    study = create_study(
        config, strategy="random", space=space, storage=None, budget=Budget(nfe=LIMIT), pruner="none"
    )
    study.optimize()
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs["steps"] == 0
    assert "the study's budget ran out (NFE" in trial.user_attrs["stop_reason"]
    assert LIMIT <= study.spent().nfe <= LIMIT + SOLVE_CHECK_EVERY


def test_a_tiny_trial_time_budget_prunes_a_solve_that_would_take_minutes(tiny_config):
    # rtol 1e-12: one training step takes minutes; the budget stops it inside that step.
    config = tiny_config(method="dopri5", rtol=1e-12, atol=1e-12, max_nfe=None)
    space = SearchSpace({"lr": Float(1e-3, 1e-1, log=True)})
    objective = TrainingObjective(config, space, "random", trial_budget=Budget(timeout=0.5))
    trial = _one_trial(objective)
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs["steps"] == 0
    assert "the trial's budget ran out (wall-clock" in trial.user_attrs["stop_reason"]


def test_a_trial_budget_takes_no_trial_count(tiny_config):
    with pytest.raises(ValueError, match=r"`trial_budget` .* takes no n_trials, but got n_trials=3"):
        TrainingObjective(tiny_config(), SPACE, "random", trial_budget=Budget(n_trials=3))


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_a_diverging_trial_fails_within_10_s_of_its_first_non_finite_value(tiny_config, monkeypatch, method):
    """SGD at lr 1e4 on digits: the trial fails soon after any output stops being finite."""
    config = tiny_config(optimizer="sgd", momentum=0.0, method=method, max_steps=10)
    objective = TrainingObjective(config, SearchSpace({"lr": Float(1.0, 1e4, log=True)}), "random")
    first: list[float] = []

    def hook(module, inputs, output):
        if not first and isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
            first.append(time.perf_counter())

    def build_run(cfg):
        run = real_build(cfg)
        for module in run.model.modules():
            module.register_forward_hook(hook)
        return run

    real_build = objective_module.build_run
    monkeypatch.setattr(objective_module, "build_run", build_run)
    study = optuna.create_study(direction=objective.direction)
    study.enqueue_trial({"lr": 1e4})
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    end = time.perf_counter()
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.FAIL
    assert any(m in trial.user_attrs["fail_reason"] for m in ("loss became nan", "ODE solve"))
    assert first, "the run never produced a non-finite value"
    assert end - first[0] < 10.0


def test_a_studys_trial_budget_is_stored_for_its_workers(tiny_config):
    storage = "sqlite:///s.db"
    create_study(tiny_config(), strategy="random", storage=storage, study_name="s", trial_budget={"nfe": 500})
    loaded = load_study("s", storage)
    assert loaded.objective.trial_budget == Budget(nfe=500)
    with pytest.raises(ValueError, match="`trial_budget` .* needs a task or a RunConfig"):
        create_study(lambda t: 0.0, strategy="random", space=SPACE, storage=None, trial_budget={"nfe": 5})
