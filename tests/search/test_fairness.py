"""Issue 14: running trials count, per-block horizons, Pareto studies, honest states."""

import threading
import time

import optuna
import pytest
from optuna.trial import TrialState
from snopt.search import Budget, Float, SearchSpace, compare, create_study

from snopt._ode import ode_blocks


def test_two_workers_never_exceed_a_trial_budget():
    # Two workers start together on a study with one trial left to run; without counting
    # the running trial both would run one.
    space = SearchSpace({"t1": Float(0.5, 2.0)})

    def slow(trial):
        time.sleep(0.3)
        return trial.suggest_float("t1", 0.5, 2.0)

    study = create_study(slow, strategy="random", space=space, budget=Budget(n_trials=1), storage=None)
    study.begin_session()
    start = threading.Barrier(2)

    def worker():
        start.wait()
        study.optimize(join=True)

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ran = [t for t in study.trials if t.user_attrs.get("snopt_status") != "skipped"]
    assert len(ran) == 1 and ran[0].state == TrialState.COMPLETE
    assert study.spent().trials == 1


def test_black_box_searches_one_horizon_per_block(tiny_config):
    config = tiny_config(task="multiblock", task_kwargs={}, max_steps=1)
    study = create_study(config, strategy="random", storage=None, budget=Budget(n_trials=1), pruner="none")
    assert study.space.horizon_names() == ["t1/blocks.0", "t1/blocks.1", "t1/blocks.2"]
    study.optimize()
    t = study.trials[0]
    for block in ("blocks.0", "blocks.1", "blocks.2"):
        # the sampled horizon of each block is the one the model trained with
        assert t.user_attrs[f"t1_final/{block}"] == pytest.approx(t.params[f"t1/{block}"])
    assert study.study.metric_names == ["accuracy"]


def test_feedback_starts_from_the_best_trials_final_horizons(tiny_config):
    config = tiny_config(task="multiblock", task_kwargs={}, max_steps=2)
    study = create_study(config, strategy="feedback", storage=None, budget=Budget(n_trials=3), pruner="none")
    study.optimize()
    trials = study.trials
    assert all(not any(k.startswith("t1") for k in t.params) for t in trials)  # T is not a param
    for i in (1, 2):
        best = max(trials[:i], key=lambda t: t.value)
        for block in ("blocks.0", "blocks.1", "blocks.2"):
            assert trials[i].user_attrs[f"t1_initial/{block}"] == pytest.approx(
                best.user_attrs[f"t1_final/{block}"]
            )


def test_pareto_comparison_produces_fronts(tiny_config):
    space = SearchSpace({"t1": Float(0.5, 2.0, log=True, default=1.0), "lr": Float(1e-3, 1e-1, log=True)})
    report = compare(
        tiny_config(max_steps=2),
        strategies=["feedback", "nsga2", "tpe"],
        budget=Budget(n_trials=3),
        space=space,
        storage=None,
        output_dir=None,
        objectives="metric,nfe",
        progress=False,
        warm_up=False,
    )
    assert report.objectives == ["metric", "nfe"]
    hv = report.hypervolumes()
    for s in report.studies:
        assert s.front and all(c > 0 for _, c in s.front)  # (accuracy, inference NFE) points
        assert hv[(s.strategy, s.seed)] >= 0
    samplers = report.settings["samplers"]
    assert samplers["nsga2"]["class"] == "NSGAIISampler" and samplers["tpe"]["class"] == "TPESampler"
    # the feedback strategy sweeps the policy's cost weight
    feedback = report.study("feedback", 0)
    assert {t["number"] for t in feedback.trials} == {0, 1, 2}


def test_multi_objective_study_has_no_pruner_and_two_values(tiny_config):
    study = create_study(
        tiny_config(), strategy="tpe", storage=None, budget=Budget(n_trials=1), objectives=["metric", "nfe"]
    )
    assert isinstance(study.pruner, optuna.pruners.NopPruner)
    study.optimize()
    t = study.trials[0]
    assert len(t.values) == 2 and t.values[1] == t.user_attrs["inference_nfe"]
    assert study.study.metric_names == ["accuracy", "inference_nfe"]


def test_work_budget_cuts_the_trial_and_prunes_it(tiny_config):
    probe = create_study(tiny_config(), strategy="random", storage=None, budget=Budget(n_trials=1))
    probe.optimize()
    per_trial = probe.trials[0].user_attrs["work"]
    study = create_study(
        tiny_config(), strategy="random", storage=None, budget=Budget(work=1.5 * per_trial), pruner="none"
    )
    study.optimize()
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.COMPLETE and states[-1] == TrialState.PRUNED
    assert "budget ran out (work" in study.trials[-1].user_attrs["stop_reason"]
    assert study.spent().work >= 1.5 * per_trial
    # the truncated score is kept as an intermediate value (Optuna shows a pruned trial's last
    # one as its value) and a user attribute, not as a complete result
    cut = study.trials[-1]
    assert cut.user_attrs["steps"] >= 1
    assert cut.intermediate_values[cut.user_attrs["steps"]] == cut.user_attrs["metric"] == cut.value


def test_solver_failure_message_is_the_solvers(tiny_config, monkeypatch):
    from snopt._ode import SolverError

    def boom(self, x):
        raise SolverError("max_num_steps exceeded at t=0.3")

    study = create_study(tiny_config(), strategy="random", storage=None, budget=Budget(n_trials=1))
    block = type(ode_blocks(study.objective.task.build_model())[0][1])
    monkeypatch.setattr(block, "forward", boom)
    study.optimize()
    t = study.trials[0]
    assert t.state == TrialState.FAIL
    assert t.user_attrs["fail_reason"] == "SolverError: max_num_steps exceeded at t=0.3"


def test_sampler_flag_picks_the_sampler_of_in_training_strategies_only(tmp_path, capsys):
    # `--sampler random` makes feedback's other hyperparameters random-searched; a black-box
    # strategy keeps its own sampler.
    from snopt.cli import main

    url = f"sqlite:///{tmp_path / 's.db'}"
    base = ["--task", "digits", "--task-kwargs", "val_fraction=0.05", "--model-kwargs", "width=4"]
    base += ["--method", "rk4", "--max-steps", "1", "--batch-size", "16", "--eval-every", "1"]
    base += ["--n-trials", "1", "--storage", url, "--no-tracking", "--no-progress", "--sampler", "random"]
    for strategy in ("feedback", "tpe"):
        assert main(["search", "--strategy", strategy, "--study-name", strategy, *base]) == 0
    samplers = {
        s: optuna.load_study(study_name=s, storage=url).user_attrs["snopt"]["sampler"]["class"]
        for s in ("feedback", "tpe")
    }
    assert samplers == {"feedback": "RandomSampler", "tpe": "TPESampler"}
