"""A study survives SIGKILL; several worker processes share one study (SQLite and PostgreSQL)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from optuna.trial import TrialState
from snopt.search import Budget, Float, SearchSpace, create_study, load_study, resolve_storage, run_workers

pytestmark = pytest.mark.integration  # worker processes, SQLite and PostgreSQL shared between them

SPACE = SearchSpace({"t1": Float(0.5, 2.0, log=True, default=1.0), "lr": Float(1e-3, 1e-1, log=True)})

# A study process whose third trial (number 2) blocks in training after writing a marker.
_KILLED_STUDY = textwrap.dedent(
    """
    import pathlib, sys, time
    import optuna
    from snopt import RunConfig
    from snopt._training import Callback
    from snopt.search import Budget, Float, SearchSpace, create_study

    url, marker = sys.argv[1], pathlib.Path(sys.argv[2])
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    class Block(Callback):
        def __init__(self, trial):
            self.trial = trial

        def on_step_end(self, trainer, record):
            if self.trial.number == 2:
                marker.write_text("in trial 2")
                time.sleep(600)

    config = RunConfig(task="digits", task_kwargs={"val_fraction": 0.05}, model_kwargs={"width": 4},
                       method="rk4", epochs=None, max_steps=3, batch_size=32, eval_every=1)
    space = SearchSpace({"t1": Float(0.5, 2.0, log=True, default=1.0), "lr": Float(1e-3, 1e-1, log=True)})
    study = create_study(config, strategy="tpe", space=space, budget=Budget(n_trials=4), storage=url,
                         study_name="killed", pruner="none", heartbeat_interval=1, grace_period=2,
                         trial_callbacks_factory=lambda trial, config: [Block(trial)])
    study.optimize()
    """
)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    return env


def test_killed_study_resumes_with_finished_trials_intact(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    marker = tmp_path / "marker"
    script = tmp_path / "study.py"
    script.write_text(_KILLED_STUDY)
    log = tmp_path / "study.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), url, str(marker)], env=_env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + 240
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the study process ended early: {log.read_text()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("the study never reached its third trial")
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = optuna.load_study(study_name="killed", storage=url).trials
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]
    # Past the grace period (2 s) with a margin: SQLite stores heartbeat times to the second.
    time.sleep(4.0)

    # Resuming up to the budget: cap the study as a whole (a plain re-run would run 4 more).
    study = load_study("killed", url, heartbeat_interval=1, grace_period=2, total=Budget(n_trials=4))
    study.optimize()
    after = optuna.load_study(study_name="killed", storage=url).trials
    # Finished trials intact, the interrupted one failed, the budget of 4 finished trials met.
    for old, new in zip(before[:2], after[:2]):
        assert (new.state, new.params, new.value, new.user_attrs) == (
            old.state,
            old.params,
            old.value,
            old.user_attrs,
        )
    assert after[2].state == TrialState.FAIL and "snopt_status" not in after[2].user_attrs
    assert [t.state for t in after[3:]] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert len(after) == 5 and study.spent().trials == 4
    assert len({t.number for t in after}) == 5


def _worker_cmd(url, name, n_trials):
    return [
        sys.executable,
        "-m",
        "snopt.cli",
        "worker",
        "--storage",
        url,
        "--study",
        name,
        "--n-trials",
        str(n_trials),
        "--no-progress",
    ]


def _two_workers_share(url, config):
    storage = resolve_storage(url)
    try:
        _check_two_workers_share(url, storage, config)
    finally:  # close the pool's connections before the database goes away
        storage.engine.dispose()


def _check_two_workers_share(url, storage, config):
    study = create_study(
        config, strategy="random", space=SPACE, storage=storage, study_name="shared", pruner="none"
    )
    assert study.trials == []
    procs = [
        subprocess.Popen(
            _worker_cmd(url, "shared", 2), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=280)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert len(trials) == 4  # the sum of both workers' trials
    assert sorted(t.number for t in trials) == list(range(4))  # no duplicates, no gaps
    assert len({t._trial_id for t in trials}) == 4
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # The workers' samplers are decorrelated: no parameter set is tried twice.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4


def test_two_worker_processes_on_one_sqlite_study(tiny_config, tmp_path):
    _two_workers_share(f"sqlite:///{tmp_path / 'w.db'}", tiny_config())


def test_two_worker_processes_on_postgresql(tiny_config, postgres_url):
    _two_workers_share(postgres_url, tiny_config())


def test_run_workers_shares_the_study_budget(tiny_config, tmp_path):
    url = f"sqlite:///{tmp_path / 'rw.db'}"
    study = create_study(
        tiny_config(), strategy="tpe", space=SPACE, storage=url, budget=Budget(n_trials=4), pruner="none"
    )
    run_workers(study, 2)
    trials = study.trials
    # Running trials count: the two processes never run more than the 4 trials of the budget;
    # a trial created while the others already held the budget is skipped, not run.
    ran = [t for t in trials if t.user_attrs.get("snopt_status") != "skipped"]
    assert len(ran) == 4 and all(t.state == TrialState.COMPLETE for t in ran)
    assert all(t.state == TrialState.FAIL for t in trials if t not in ran)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
