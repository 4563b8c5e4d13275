"""The search space, budgets and storage URLs: validation and mapping to a run."""

import datetime
import math

import optuna
import pytest
from optuna.trial import TrialState, create_trial
from snopt.search import (
    DEFAULT_STORAGE,
    SUPPORTED_SCHEMES,
    Budget,
    Categorical,
    Float,
    Int,
    SearchSpace,
    default_space,
    resolve_storage,
)
from snopt.search._budget import STATUS_ATTR, counts, spent

from snopt import RunConfig


# ----------------------------------------------------------------- space
def test_empty_space_is_an_error():
    with pytest.raises(ValueError, match="search space is empty"):
        SearchSpace({})


@pytest.mark.parametrize(
    "param, message",
    [
        (Float(2.0, 1.0), r"`low <= high` must hold for parameter 'p', but got low=2.0, high=1.0"),
        (Int(5, 3), r"`low <= high` must hold for parameter 'p', but got low=5, high=3"),
        (Float(0.0, 1.0, log=True), r"log-scale parameter needs `low > 0`"),
        (Float(0.0, math.inf), r"`high` of parameter 'p' must be a finite number"),
        (Float(0.1, 1.0, default=2.0), r"`default` of 'p' must lie in \[0.1, 1.0\]"),
        (Int(0, 8, log=True), r"needs `low >= 1`"),
        (Int(1, 8, step=0), r"`step` of 'p' must be >= 1"),
        (Categorical([]), r"needs at least one choice"),
    ],
)
def test_bad_parameters_raise_clear_errors(param, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace({"p": param})


def test_non_parameter_values_are_rejected():
    with pytest.raises(TypeError, match="must be a Float, Int or Categorical"):
        SearchSpace({"t1": (0.1, 1.0)})


def test_defaults_are_midpoints_unless_given():
    space = SearchSpace(
        {
            "a": Float(1.0, 3.0),
            "b": Float(1e-4, 1e-2, log=True),
            "c": Int(4, 16, log=True),
            "d": Categorical(["x", "y"]),
            "e": Float(0.1, 1.0, default=0.2),
        }
    )
    d = space.defaults()
    assert d["a"] == 2.0
    assert d["b"] == pytest.approx(1e-3)
    assert d["c"] == 8
    assert d["d"] == "x"
    assert d["e"] == 0.2


def test_grid_includes_bounds_and_is_log_spaced():
    space = SearchSpace(
        {"t1": Float(0.25, 4.0, log=True), "w": Int(4, 32, log=True), "m": Categorical(["a", "b"])}
    )
    grid = space.grid(3)
    assert grid["t1"] == pytest.approx([0.25, 1.0, 4.0])
    assert grid["w"] == [4, 11, 32]
    assert grid["m"] == ["a", "b"]
    with pytest.raises(ValueError, match="`grid_size` must be a positive integer"):
        space.grid(0)


def test_suggest_with_fixed_trial_and_defaults_for_unsampled():
    space = SearchSpace({"t1": Float(0.5, 2.0), "lr": Float(1e-3, 1e-1, log=True, default=1e-2)})
    values = space.suggest(optuna.trial.FixedTrial({"t1": 1.5}), names=["t1"])
    assert values == {"t1": 1.5, "lr": 1e-2}


def test_apply_maps_config_fields_model_arguments_and_tol():
    space = SearchSpace({"t1": Float(0.5, 2.0), "width": Int(4, 8), "tol": Float(1e-4, 1e-2, log=True)})
    config = space.apply(RunConfig(task="digits"), {"t1": 1.5, "width": 6, "tol": 1e-3})
    assert config.t1 == 1.5 and config.rtol == 1e-3 and config.atol == 1e-3
    assert config.model_kwargs == {"width": 6}
    assert config.lr is None  # the default stays "per optimizer", not a resolved number


def test_unknown_parameter_names_list_the_valid_ones():
    space = SearchSpace({"t1": Float(0.5, 2.0), "widht": Int(4, 8)})
    with pytest.raises(ValueError, match=r"Unknown search parameters \['widht'\].*width"):
        space.validate_for(RunConfig(task="digits"))
    # The width argument is named per task.
    default_space("timeseries").validate_for(RunConfig(task="timeseries"))
    default_space("digits").validate_for(RunConfig(task="digits"))


def test_round_trip_and_parse():
    space = SearchSpace.parse("t1=0.25:4:log,lr=1e-3:5e-2:log,width=4:32:int:log,method=dopri5|rk4,x=0:1")
    assert space["t1"] == Float(0.25, 4.0, log=True)
    assert space["width"] == Int(4, 32, log=True)
    assert space["method"] == Categorical(["dopri5", "rk4"])
    assert space["x"] == Float(0.0, 1.0)
    assert SearchSpace.from_dict(space.to_dict()) == space
    with pytest.raises(ValueError, match="must look like"):
        SearchSpace.parse("t1")
    with pytest.raises(ValueError, match="unknown flags"):
        SearchSpace.parse("t1=0.1:1:lgo")
    with pytest.raises(ValueError, match=r"`low <= high`"):
        SearchSpace.parse("t1=4:1")


# ----------------------------------------------------------------- budget
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_trials": 0}, r"Budget `n_trials` must be a positive integer or None, but got n_trials=0"),
        ({"n_trials": -3}, r"n_trials=-3"),
        ({"nfe": 0}, r"Budget `nfe` must be a positive integer"),
        ({"nfe": 1.5}, r"nfe=1.5"),
        ({"timeout": 0}, r"Budget `timeout` must be a positive number of seconds"),
        ({"timeout": -1.0}, r"timeout=-1.0"),
        ({"timeout": math.inf}, r"timeout=inf"),
        ({"n_trials": True}, r"n_trials=True"),
    ],
)
def test_budget_must_be_positive(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


def _trial(state, nfe=0, seconds=1.0, status=True):
    start = datetime.datetime(2024, 1, 1)
    attrs = {"nfe_total": nfe}
    if status:
        attrs[STATUS_ATTR] = state.name.lower()
    trial = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None, user_attrs=attrs)
    trial.datetime_start = start
    trial.datetime_complete = start + datetime.timedelta(seconds=seconds)
    return trial


def test_spent_counts_finished_trials_but_not_interrupted_ones():
    trials = [
        _trial(TrialState.COMPLETE, nfe=100, seconds=2.0),
        _trial(TrialState.PRUNED, nfe=40, seconds=1.0),
        _trial(TrialState.FAIL, nfe=7, seconds=0.5),  # a solver failure: recorded, counts
        _trial(TrialState.FAIL, nfe=0, seconds=9.0, status=False),  # a killed process: does not count
    ]
    assert [counts(t) for t in trials] == [True, True, True, False]
    s = spent(trials)
    assert (s.trials, s.nfe) == (3, 147)
    assert s.wall_time == pytest.approx(3.5)
    assert Budget(nfe=147).exhausted(s) and not Budget(nfe=148).exhausted(s)
    assert Budget(n_trials=3).exhausted(s) and not Budget(n_trials=4).exhausted(s)
    assert Budget(timeout=3.5).exhausted(s) and not Budget(timeout=3.6).exhausted(s)
    assert not Budget().limited and not Budget().exhausted(s)


# ----------------------------------------------------------------- storage
@pytest.mark.parametrize(
    "url", ["redis://localhost:6379", "postgres://u@h/db", "snopt.db", "file:///tmp/x.db"]
)
def test_unknown_storage_scheme_lists_supported_ones(url):
    with pytest.raises(ValueError, match=r"one of the schemes \['sqlite', 'postgresql', 'mysql'\]"):
        resolve_storage(url)
    assert SUPPORTED_SCHEMES == ("sqlite", "postgresql", "mysql")


def test_storage_kinds(tmp_path):
    assert isinstance(resolve_storage(None), optuna.storages.InMemoryStorage)
    rdb = resolve_storage(f"sqlite:///{tmp_path / 'a.db'}", heartbeat_interval=1, grace_period=2)
    assert isinstance(rdb, optuna.storages.RDBStorage)
    assert rdb.get_heartbeat_interval() == 1
    assert resolve_storage(rdb) is rdb
    assert DEFAULT_STORAGE == "sqlite:///snopt.db"
    with pytest.raises(ValueError, match=r"`grace_period >= heartbeat_interval` must hold"):
        resolve_storage(f"sqlite:///{tmp_path / 'b.db'}", heartbeat_interval=5, grace_period=2)
