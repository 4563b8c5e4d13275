"""Studies: Optuna's surface, budgets, resuming from the storage, and bad input."""

import optuna
import pytest
from optuna.trial import TrialState
from snopt.search import Budget, Float, SearchSpace, Study, compare, create_study, load_study

from snopt._training import SOLVE_CHECK_EVERY

SPACE = SearchSpace({"t1": Float(0.5, 2.0, log=True, default=1.0), "lr": Float(1e-3, 1e-1, log=True)})


def _study(config, **kwargs):
    kwargs.setdefault("strategy", "random")
    kwargs.setdefault("space", SPACE)
    kwargs.setdefault("pruner", "none")
    kwargs.setdefault("storage", None)
    return create_study(config, **kwargs)


def test_optuna_surface(tiny_config, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = _study(tiny_config(), storage=url, budget=Budget(n_trials=2), seed=5)
    assert isinstance(study, Study) and isinstance(study.study, optuna.Study)
    assert study.study_name == "digits-random-s5"
    assert study.storage_url == url
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    study.optimize()
    assert len(study.trials) == 2
    best = max(study.trials, key=lambda t: t.value)
    assert study.best_trial.number == best.number and study.best_value == best.value
    assert study.best_params == best.params
    # Forwarded to the Optuna study, and visible to plain Optuna (and optuna-dashboard).
    assert len(study.trials_dataframe()) == 2
    plain = optuna.load_study(study_name="digits-random-s5", storage=url)
    assert [t.value for t in plain.trials] == [t.value for t in study.trials]
    desc = plain.user_attrs["snopt"]
    assert desc["strategy"] == "random" and desc["budget"]["n_trials"] == 2
    assert desc["sampler"] == {"class": "RandomSampler", "kwargs": {}}
    assert desc["space"] == SPACE.to_dict()


def test_each_optimize_runs_the_budget_again_and_total_caps_the_study(tiny_config):
    # Optuna's convention: optimize(n_trials=N) runs N more trials each call.
    study = _study(tiny_config(), budget=Budget(n_trials=3), total=Budget(n_trials=7))
    study.optimize(n_trials=2)  # this call's own cap
    assert len(study.trials) == 2 and study.session == {"first_trial": 0, "index": 0}
    study.optimize()  # a new session: the budget runs again
    assert len(study.trials) == 5 and study.session == {"first_trial": 2, "index": 1}
    study.optimize()  # the total caps the study as a whole
    assert len(study.trials) == 7 and study.exhausted()
    study.optimize()
    assert len(study.trials) == 7


def test_nfe_budget_stops_the_last_trial_where_it_runs_out(tiny_config):
    # Each tiny trial spends 3 steps of RK4 (9 NFE a step): 27 NFE; a budget of 60 allows
    # two whole trials and cuts the third inside the solves of its first step (6 NFE left).
    study = _study(tiny_config(), budget=Budget(nfe=60))
    study.optimize()
    trials = study.trials
    assert [t.user_attrs["nfe_total"] for t in trials[:2]] == [27, 27]
    assert [t.user_attrs["snopt_status"] for t in trials] == ["completed", "completed", "budget"]
    # A budget-cut trial is pruned, never complete: samplers must not learn from a truncated run.
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[2].user_attrs["steps"] == 0
    assert 60 <= study.spent().nfe <= 60 + SOLVE_CHECK_EVERY + 1
    assert "budget ran out (NFE" in trials[2].user_attrs["stop_reason"]
    # Cut before it trained a step: no score, and no evaluation of the untrained model.
    assert trials[2].intermediate_values == {} and "metric" not in trials[2].user_attrs


def test_resume_tops_up_to_the_budget_and_keeps_finished_trials(tiny_config, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    study = _study(tiny_config(), storage=url, budget=Budget(n_trials=3), seed=1)
    study.optimize(n_trials=2)
    before = [(t.number, t.params, t.value) for t in study.trials]
    # resuming an interrupted study up to its budget: cap the whole study with `total`
    again = load_study("digits-random-s1", url, total=Budget(n_trials=3))
    assert again.strategy == "random" and again.budget == Budget(n_trials=3) and again.space == SPACE
    again.optimize()
    after = [(t.number, t.params, t.value) for t in again.trials]
    assert after[:2] == before and len(after) == 3
    # The resumed sampler does not replay the parameters already tried.
    assert after[2][1] not in [b[1] for b in before]


def test_reopening_with_other_settings_is_an_error(tiny_config, tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    _study(tiny_config(), storage=url, budget=Budget(n_trials=1))
    with pytest.raises(ValueError, match="already exists with a different space"):
        _study(tiny_config(), storage=url, space=SearchSpace({"t1": Float(0.5, 3.0)}))
    with pytest.raises(ValueError, match="already exists with a different config"):
        _study(tiny_config(max_steps=4), storage=url)
    with pytest.raises(ValueError, match="already exists"):
        _study(tiny_config(), storage=url, load_if_exists=False)
    with pytest.raises(ValueError, match=r"No study named 'nope'.*studies there: \['digits-random-s0'\]"):
        load_study("nope", url)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"strategy": "bayes"},
            ValueError,
            r"`strategy` must be one of \['feedback', 'gradient', 'tpe', 'gp'",
        ),
        ({"pruner": "asha"}, ValueError, r"`pruner` must be one of \['none', 'median', 'hyperband'\]"),
        ({"storage": "redis://h:1"}, ValueError, r"one of the schemes \['sqlite', 'postgresql', 'mysql'\]"),
        ({"budget": {"nfe": 0}}, ValueError, r"Budget `nfe` must be a positive integer"),
        ({"budget": {"trials": 3}}, ValueError, r"Unknown budget keys \['trials'\]"),
        ({"seed": -1}, ValueError, r"`seed` must be a non-negative integer"),
        (
            {"space": SearchSpace({"depth": Float(1, 2)})},
            ValueError,
            r"Unknown search parameters \['depth'\]",
        ),
        (
            {"sampler_kwargs": {"n_startup": 3}},
            ValueError,
            r"Unknown arguments \['n_startup'\] for RandomSampler",
        ),
        ({"direction": "up"}, ValueError, r"`direction` must be 'maximize' or 'minimize'"),
    ],
)
def test_bad_input_raises_clear_errors(tiny_config, kwargs, error, message):
    with pytest.raises(error, match=message):
        _study(tiny_config(), **kwargs)


def test_bad_task_and_custom_objective_rules():
    with pytest.raises(
        ValueError, match=r"`task` must be one of \['digits', 'toy2d', 'timeseries', 'multiblock'\]"
    ):
        create_study("mnist", storage=None)
    with pytest.raises(ValueError, match="needs a task or a RunConfig"):
        create_study(lambda t: 0.0, strategy="feedback", space=SPACE, storage=None)
    with pytest.raises(ValueError, match="custom objective needs an explicit `space`"):
        create_study(lambda t: 0.0, strategy="tpe", storage=None)


def test_optimize_arguments_are_checked(tiny_config):
    study = _study(tiny_config())
    with pytest.raises(ValueError, match="`n_trials` must be a positive integer or None, but got n_trials=0"):
        study.optimize(n_trials=0)
    with pytest.raises(ValueError, match="`timeout` must be a positive number"):
        study.optimize(timeout=-1)


def test_custom_objective_black_box(tmp_path):
    def quadratic(trial):
        x = trial.suggest_float("t1", 0.5, 2.0, log=True)
        trial.set_user_attr("nfe_total", 10)
        return (x - 1.3) ** 2

    study = create_study(
        quadratic,
        strategy="tpe",
        space=SPACE,
        budget=Budget(nfe=50),
        storage=f"sqlite:///{tmp_path / 'q.db'}",
    )
    study.optimize()
    assert len(study.trials) == 5 and study.direction == optuna.study.StudyDirection.MINIMIZE
    assert all(t.user_attrs["t1_final"] == t.params["t1"] for t in study.trials)
    with pytest.raises(ValueError, match="runs a custom objective; pass it"):
        load_study("quadratic-tpe-s0", f"sqlite:///{tmp_path / 'q.db'}")
    resumed = load_study(
        "quadratic-tpe-s0", f"sqlite:///{tmp_path / 'q.db'}", objective=quadratic, budget=Budget(nfe=70)
    )
    resumed.optimize()  # a second session runs its budget again
    assert len(resumed.trials) == 12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategies": []}, r"`strategies` must name at least one of"),
        ({"strategies": ["tpe", "bo"]}, r"`strategy` must be one of"),
        ({"strategies": ["tpe", "tpe"]}, r"`strategies` must be distinct"),
        ({"seeds": []}, r"`seeds` must name at least one seed"),
        ({"seeds": [0, -1]}, r"`seeds` must be non-negative integers"),
        ({"budget": None}, r"`budget` must set at least one of n_trials, nfe or timeout"),
        ({"budget": Budget()}, r"`budget` must set at least one"),
        ({"workers": 0}, r"`workers` must be a positive integer"),
        ({"workers": 2, "storage": None}, r"`workers > 1` needs a storage URL"),
        ({"epsilon": -0.1}, r"`epsilon` must be a finite number >= 0"),
        ({"sampler_kwargs": {"gp": {}}}, r"`sampler_kwargs` names strategies \['gp'\] that are not compared"),
    ],
)
def test_compare_bad_input(tiny_config, tmp_path, kwargs, message):
    args = {
        "strategies": ["random"],
        "budget": Budget(n_trials=1),
        "storage": None,
        "output_dir": None,
        "progress": False,
        "space": SPACE,
        "warm_up": False,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        compare(tiny_config(), **args)


def test_a_study_stored_before_a_setting_existed_resumes(tiny_config, tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    study = _study(tiny_config(), storage=url, budget=Budget(n_trials=1), seed=3)
    desc = dict(study.study.user_attrs["snopt"])
    desc["config"] = {k: v for k, v in desc["config"].items() if k != "max_nfe"}  # an older snopt's
    study.study.set_user_attr("snopt", desc)
    again = _study(tiny_config(), storage=url, budget=Budget(n_trials=1), seed=3)
    assert again.study.study_name == study.study.study_name


def test_default_trial_budget_is_three_default_trials_on_the_budgets_axes(tiny_config):
    from snopt.search import TRIAL_FACTOR, TrainingObjective, default_trial_budget

    config = tiny_config()
    trial = optuna.trial.FixedTrial(SPACE.defaults())  # one trial of the default configuration
    TrainingObjective(config, SPACE, "random")(trial)
    work, nfe = trial.user_attrs["work"], trial.user_attrs["nfe_total"]
    assert TRIAL_FACTOR == 3
    cap = default_trial_budget(config, Budget(work=1e15, nfe=10**9), space=SPACE)
    assert cap is not None and (cap.work, cap.nfe, cap.timeout) == (pytest.approx(3 * work), 3 * nfe, None)
    timed = default_trial_budget(config, Budget(timeout=600.0), space=SPACE)
    assert timed is not None and (timed.work, timed.nfe) == (None, None) and 0 < timed.timeout < 600
    assert default_trial_budget(config, Budget(n_trials=10), space=SPACE) is None  # nothing to scale
    assert default_trial_budget(lambda trial: 0.0, Budget(work=1.0)) is None  # a custom objective


def test_default_trial_budget_keeps_one_wide_trial_from_taking_the_whole_budget(tiny_config):
    """compare's default: a trial may spend 3 default trials' work; the rest goes to other trials."""
    from snopt.search import Int, default_trial_budget

    config = tiny_config(max_steps=12)  # 108 evaluations: the budgets are checked every 8
    space = SearchSpace({"width": Int(2, 64, default=4)})
    probe = _study(config, space=space, budget=Budget(n_trials=1))
    probe.enqueue_trial({"width": 4})
    probe.optimize()
    unit = probe.trials[0].user_attrs["work"]  # one trial of the default (width-4) model
    budget = Budget(work=20 * unit)
    runs = {}
    for cap in (default_trial_budget(config, budget, space=space), None):
        study = _study(config, space=space, budget=budget, trial_budget=cap)
        study.enqueue_trial({"width": 32})  # about 50 width-4 trials' work: more than the budget
        for _ in range(2):
            study.enqueue_trial({"width": 4})
        study.optimize(n_trials=3)
        runs[cap is None] = study.trials
    wide, *rest = runs[False]
    assert wide.state == TrialState.PRUNED
    assert "the trial's budget ran out (work" in wide.user_attrs["stop_reason"]
    assert 3 * unit <= wide.user_attrs["work"] < 0.5 * 20 * unit  # cut near its cap
    assert [t.state for t in rest] == [TrialState.COMPLETE] * 2
    # Without a cap the wide trial spends the whole budget and the study has no result.
    ran = [t for t in runs[True] if t.state != TrialState.WAITING]
    assert [t.state for t in ran] == [TrialState.PRUNED]
    assert "the study's budget ran out (work" in ran[0].user_attrs["stop_reason"]


def test_compare_caps_each_trial_by_default(tiny_config, tmp_path):
    from snopt.search import TrainingObjective

    config = tiny_config(max_steps=1)
    trial = optuna.trial.FixedTrial(SPACE.defaults())
    TrainingObjective(config, SPACE, "random")(trial)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    for name, kwargs in (("auto", {}), ("none", {"trial_budget": None})):
        compare(
            config,
            strategies=["random"],
            budget=Budget(n_trials=1, work=1e15),
            space=SPACE,
            storage=url,
            output_dir=None,
            name=name,
            progress=False,
            warm_up=False,
            **kwargs,
        )
        desc = optuna.load_study(study_name=f"{name}-random-s0", storage=url).user_attrs["snopt"]
        expected = 3 * trial.user_attrs["work"] if name == "auto" else None
        assert desc["trial_budget"] == {"n_trials": None, "timeout": None, "nfe": None, "work": expected}
    with pytest.raises(ValueError, match=r"`trial_budget` must be a Budget, a dict, None or 'auto', but got"):
        compare(config, budget=Budget(n_trials=1), storage=None, output_dir=None, trial_budget="half")


def test_trials_enqueued_before_a_session_count_against_its_budget(tiny_config):
    # Enqueued trials get their numbers before optimize() starts the session; they run in it and
    # count (the session once began after them, so the budget saw none of their NFE).
    study = _study(tiny_config(), budget=Budget(nfe=60))
    for _ in range(4):
        study.enqueue_trial({"t1": 1.0, "lr": 0.01})
    study.optimize()
    assert study.session["first_trial"] == 0
    ran = [t for t in study.trials if t.state != TrialState.WAITING]
    assert [t.state for t in ran] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert "the study's budget ran out (NFE" in ran[2].user_attrs["stop_reason"]
