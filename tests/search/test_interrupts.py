"""Interrupted trials fail with a reason: a signal in a trial, a dead process, a stopped heartbeat."""

import os
import signal
import socket
import sqlite3
import subprocess

import optuna
import pytest
from optuna.trial import TrialState
from snopt.search import Budget, Float, SearchSpace, create_study, load_study

from snopt._signals import Terminated, terminate_as_interrupt
from snopt._training import Callback

SPACE = SearchSpace({"x": Float(0.0, 1.0)})


def _x(trial):
    return trial.suggest_float("x", 0.0, 1.0)


class _SignalAt(Callback):
    def on_step_end(self, trainer, record):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would, mid-training


def test_sigterm_in_a_trial_fails_it_with_the_signal_and_the_checkpoint(tmp_path, monkeypatch, tiny_config):
    monkeypatch.chdir(tmp_path)
    study = create_study(
        tiny_config(),
        strategy="random",
        space=SearchSpace({"t1": Float(0.5, 2.0, default=1.0)}),
        budget=Budget(n_trials=2),
        storage=None,
        pruner="none",
        trial_callbacks_factory=lambda trial, config: [_SignalAt()],
    )
    with pytest.raises(Terminated) as info, pytest.warns(UserWarning, match="by SIGTERM"):
        study.optimize()
    assert info.value.exit_status == 143
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL
    reason = trial.user_attrs["fail_reason"]
    saved = tmp_path / "snopt_checkpoints" / study.study_name / "trial-0.pt"
    assert "SIGTERM" in reason and str(saved) in reason and saved.exists()
    assert not (tmp_path / "snopt-interrupted.pt").exists()  # a trial's own file, never a shared one
    # An interrupted trial is owed again: it does not count against the budget.
    assert "snopt_status" not in trial.user_attrs and study.spent().trials == 0


@pytest.mark.integration  # an SQLite database shared by two workers
def test_two_workers_write_distinct_interrupt_checkpoints(tmp_path, monkeypatch, tiny_config):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'w.db'}"
    space = SearchSpace({"t1": Float(0.5, 2.0, default=1.0)})
    create_study(
        tiny_config(), strategy="random", space=space, storage=url, study_name="w/../x", pruner="none"
    )
    for worker in (0, 1):  # two workers of one study in one folder, one after the other, both killed
        study = load_study(
            "w/../x", url, worker=worker, trial_callbacks_factory=lambda trial, config: [_SignalAt()]
        )
        with pytest.raises(Terminated), pytest.warns(UserWarning, match="by SIGTERM"):
            study.optimize(n_trials=1)
    trials = optuna.load_study(study_name="w/../x", storage=url).trials
    saved = [tmp_path / "snopt_checkpoints" / "w_.._x" / f"trial-{n}.pt" for n in (0, 1)]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    for trial, path in zip(trials, saved):
        assert path.exists() and str(path) in trial.user_attrs["fail_reason"]
    assert sorted(p.name for p in (tmp_path / "snopt_checkpoints" / "w_.._x").iterdir()) == [
        "trial-0.pt",
        "trial-1.pt",
    ]  # no temporary file left, none shared


@pytest.mark.integration  # an SQLite database
def test_a_checkpoint_path_stored_in_a_study_never_reaches_a_worker(tmp_path, monkeypatch, tiny_config):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    space = SearchSpace({"t1": Float(0.5, 2.0, default=1.0)})
    with pytest.raises(
        ValueError, match="`checkpoint` and `resume` of a study's RunConfig must be left unset"
    ):
        create_study(tiny_config(checkpoint="planted.pt"), strategy="random", space=space, storage=url)
    create_study(tiny_config(), strategy="random", space=space, storage=url, study_name="p", pruner="none")
    # Someone with access to the database plants a checkpoint path in the stored configuration.
    stored = optuna.load_study(study_name="p", storage=url)
    desc = stored.user_attrs["snopt"]
    planted = tmp_path / "elsewhere" / "planted.pt"
    desc["config"].update(checkpoint=str(planted), resume=True, checkpoint_every=1)
    stored.set_user_attr("snopt", desc)

    study = load_study("p", url, trial_callbacks_factory=lambda trial, config: [_SignalAt()])
    assert study.objective.config.checkpoint is None and not study.objective.config.resume
    with pytest.raises(Terminated), pytest.warns(UserWarning, match="by SIGTERM"):
        study.optimize(n_trials=1)
    assert not (tmp_path / "elsewhere").exists()
    assert (tmp_path / "snopt_checkpoints" / "p" / "trial-0.pt").exists()


def test_sigterm_outside_training_fails_the_trial_with_the_signal():
    def objective(trial):
        trial.suggest_float("x", 0.0, 1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # while sampling or building the model, say

    study = create_study(objective, strategy="random", space=SPACE, storage=None, budget=Budget(n_trials=2))
    with pytest.raises(Terminated), terminate_as_interrupt():  # as every snopt command runs
        study.optimize()
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted by SIGTERM"
    assert trial.user_attrs["snopt_pid"] == os.getpid()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def _running_trial(study, **attrs):
    """A trial left RUNNING by a process, as ``ask`` leaves it (Optuna warns: no heartbeat thread)."""
    with pytest.warns(UserWarning, match="Heartbeat of storage is supposed to be used with Study.optimize"):
        trial = study.study.ask()
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    study.study._storage.record_heartbeat(trial._trial_id)  # a fresh heartbeat: not stale by time
    return trial.number


@pytest.mark.integration  # an SQLite database and a child process (for a pid that is gone)
def test_a_resumed_study_fails_the_trials_of_a_dead_process_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_study(
        _x, strategy="random", space=SPACE, storage=url, study_name="s", budget=Budget(n_trials=1)
    )
    host = socket.gethostname()
    dead = _running_trial(study, snopt_host=host, snopt_pid=_dead_pid())
    alive = _running_trial(study, snopt_host=host, snopt_pid=os.getppid())  # another live worker
    remote = _running_trial(study, snopt_host=host + "-elsewhere", snopt_pid=_dead_pid())

    # Resumed well within the 30 s grace period of the heartbeat.
    load_study("s", url, objective=_x).optimize()
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert trials[dead].state == TrialState.FAIL
    reason = trials[dead].user_attrs["fail_reason"]
    assert f"pid {trials[dead].user_attrs['snopt_pid']} on {host}" in reason and "ended" in reason
    # What cannot be proven dead is left to its heartbeat.
    assert trials[alive].state == TrialState.RUNNING and trials[remote].state == TrialState.RUNNING
    assert [t.state for t in trials[3:]] == [TrialState.COMPLETE]
    assert trials[3].user_attrs["snopt_host"] == host and trials[3].user_attrs["snopt_pid"] == os.getpid()


@pytest.mark.integration  # an SQLite database
def test_a_trial_whose_heartbeat_stopped_fails_with_a_reason(tmp_path):
    path = tmp_path / "h.db"
    url = f"sqlite:///{path}"
    study = create_study(
        _x, strategy="random", space=SPACE, storage=url, study_name="h", budget=Budget(n_trials=1)
    )
    number = _running_trial(study, snopt_host="elsewhere", snopt_pid=1)
    with sqlite3.connect(path) as db:  # its last heartbeat, a minute ago: past the 30 s grace period
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-60 seconds')")

    load_study("h", url, objective=_x).optimize()
    trial = optuna.load_study(study_name="h", storage=url).trials[number]
    assert trial.state == TrialState.FAIL
    reason = trial.user_attrs["fail_reason"]
    assert "no heartbeat for over 30 s" in reason and "pid 1 on elsewhere" in reason


def test_heartbeats_are_on_by_default_for_database_storages(tmp_path):
    from optuna.storages import RDBStorage
    from snopt.search import resolve_storage

    storage = resolve_storage(f"sqlite:///{tmp_path / 'd.db'}")
    assert isinstance(storage, RDBStorage)
    assert (storage.get_heartbeat_interval(), storage.grace_period) == (10, 30)


def test_a_stop_during_a_report_lets_the_storage_write_finish_first(tmp_path, sigterm_inside_sql):
    """SIGTERM inside the pruning callback's report: the value is stored, then the stop is raised."""
    import types

    from snopt.search._objective import PruningCallback

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    trial = study.ask()
    with sigterm_inside_sql("INSERT INTO trial_intermediate_values") as sent:
        with pytest.raises(Terminated), terminate_as_interrupt():
            PruningCallback(trial).on_evaluate(types.SimpleNamespace(step=3), {"metric": 0.5})
    assert len(sent) == 1
    assert study.trials[0].intermediate_values == {3: 0.5}
    study.tell(trial, 0.5)  # the storage takes writes after the stop
    assert study.trials[0].state == TrialState.COMPLETE


@pytest.mark.integration  # an SQLite database
def test_a_stop_after_a_storage_read_leaves_the_database_unlocked(tmp_path, sigterm_inside_sql):
    """SIGTERM after a SELECT ran, before its rows were read: the read ends first, then the stop.

    Raised there, it left the connection holding SQLite's read lock, and the trial's clean-up
    (its fail reason, its state) waited 60 s on it: `snopt worker` hung on SIGTERM.
    """
    from snopt.search import resolve_storage

    path = tmp_path / "s.db"
    study = optuna.create_study(storage=resolve_storage(f"sqlite:///{path}", heartbeat_interval=None))
    trial = study.ask()
    with sigterm_inside_sql("SELECT", after=True) as sent:
        with pytest.raises(Terminated), terminate_as_interrupt():
            study.get_trials(deepcopy=False)
    assert len(sent) == 1
    with sqlite3.connect(path, timeout=0.5) as db:  # fails with "database is locked" under a read lock
        db.execute("BEGIN EXCLUSIVE")
        db.rollback()
    trial.set_user_attr("fail_reason", "interrupted by SIGTERM")
    study.tell(trial, state=TrialState.FAIL)
    assert study.trials[0].user_attrs["fail_reason"] == "interrupted by SIGTERM"
