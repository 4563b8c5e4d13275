"""SIGTERM/SIGINT of `snopt train`, `search` and `worker`: a checkpoint, KILLED runs, a FAIL trial."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from snopt._checkpoint import read_checkpoint

pytestmark = pytest.mark.integration  # the installed command, in a subprocess, on SQLite stores

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

SNOPT = str(Path(sys.executable).parent / "snopt")
# Long enough that the signal always lands in training; tiny, so a step takes milliseconds.
RUN = ["--task", "digits", "--method", "rk4", "--model-kwargs", "width=4", "--batch-size", "32"]
RUN += ["--max-steps", "100000", "--eval-every", "100000", "--no-progress"]


def _start(args, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    with open(cwd / "out.log", "wb") as log:  # the child writes to its own copy
        return subprocess.Popen(
            [SNOPT, *args],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # SIGINT as in a terminal, even where pytest runs with it ignored (a background job).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def _stop_when(proc: subprocess.Popen, cwd: Path, started, sig: int) -> int:
    """Send ``sig`` once ``started()`` holds (training is under way); the exit status."""
    try:
        deadline = time.monotonic() + 120
        while not started():
            if proc.poll() is not None:
                pytest.fail(f"snopt ended before the signal: {(cwd / 'out.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("training never started")
            time.sleep(0.1)
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _runs(tracking_db: Path):
    client = MlflowClient(f"sqlite:///{tracking_db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _running_trial_trains(db: Path, trials: int = 1):
    """``trials`` RUNNING trials have reported their NFE (every 5 steps): they are training."""

    def started() -> bool:
        if not db.exists():
            return False
        query = (
            "SELECT count(*) FROM trial_user_attributes a JOIN trials t ON a.trial_id = t.trial_id "
            "WHERE t.state = 'RUNNING' AND a.key = 'nfe_total'"
        )
        try:
            with sqlite3.connect(db, timeout=10) as con:
                return con.execute(query).fetchone()[0] >= trials
        except sqlite3.OperationalError:  # the tables are not there yet
            return False

    return started


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_snopt_train_with_a_checkpoint_and_a_killed_run(tmp_path, sig):
    ckpt = tmp_path / "c.pt"
    args = ["train", *RUN, "--checkpoint", str(ckpt), "--checkpoint-every", "1"]
    proc = _start([*args, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path)
    status = _stop_when(proc, tmp_path, ckpt.exists, sig)

    log = (tmp_path / "out.log").read_text()
    assert status == 128 + sig, log[-3000:]
    assert "Traceback" not in log
    state = read_checkpoint(ckpt, "cpu")  # written on the signal, loads as data
    (run,) = _runs(tmp_path / "mlflow.db")
    assert run.info.status == "KILLED" and run.data.tags["snopt.signal"] == sig.name
    assert state["step"] == int(run.data.tags["summary.steps"]) >= 1  # the checkpoint is where it stopped


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_snopt_search_with_failed_trials_and_killed_runs(tmp_path, workers):
    db = tmp_path / "o.db"
    args = ["search", *RUN, "--strategy", "random", "--n-trials", "3", "--storage", f"sqlite:///{db}"]
    args += ["--workers", str(workers), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = _start(args, tmp_path)
    # The signal goes to the main process alone; it passes it on to the other worker.
    status = _stop_when(proc, tmp_path, _running_trial_trains(db, workers), signal.SIGTERM)

    assert status == 143, (tmp_path / "out.log").read_text()[-3000:]
    trials = optuna.load_study(study_name="digits-random-s0", storage=f"sqlite:///{db}").trials
    assert len(trials) == workers and len({t.user_attrs["snopt_pid"] for t in trials}) == workers
    for trial in trials:
        assert trial.state == TrialState.FAIL and "by SIGTERM" in trial.user_attrs["fail_reason"]
        # Each worker process saved its trial in a file of its own, named in the trial's reason.
        saved = tmp_path / "snopt_checkpoints" / "digits-random-s0" / f"trial-{trial.number}.pt"
        assert str(saved) in trial.user_attrs["fail_reason"]
        assert read_checkpoint(saved, "cpu")["step"] >= 5
    assert not (tmp_path / "snopt-interrupted.pt").exists()
    runs = _runs(tmp_path / "mlflow.db")
    (study,) = [r for r in runs if r.data.tags["snopt.kind"] == "study"]
    kids = [r for r in runs if r.data.tags["snopt.kind"] == "trial"]
    assert len(kids) == workers and all(r.data.tags["mlflow.parentRunId"] == study.info.run_id for r in kids)
    for run in runs:  # the trials' runs and the study's parent run
        assert run.info.status == "KILLED" and run.data.tags["snopt.signal"] == "SIGTERM"


def test_sigterm_stops_snopt_worker_with_a_failed_trial_and_a_killed_run(tmp_path):
    from snopt.search import Budget, Float, SearchSpace, create_study

    from snopt import RunConfig

    db = tmp_path / "w.db"
    config = RunConfig(
        model_kwargs={"width": 4}, method="rk4", epochs=None, max_steps=10**5, eval_every=10**5
    )
    space = SearchSpace({"t1": Float(0.5, 2.0, default=1.0)})
    create_study(
        config,
        strategy="random",
        space=space,
        budget=Budget(n_trials=2),
        storage=f"sqlite:///{db}",
        study_name="w",
        pruner="none",
    )
    args = ["worker", "--storage", f"sqlite:///{db}", "--study", "w", "--no-progress"]
    proc = _start([*args, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path)
    status = _stop_when(proc, tmp_path, _running_trial_trains(db), signal.SIGTERM)

    assert status == 143, (tmp_path / "out.log").read_text()[-3000:]
    (trial,) = optuna.load_study(study_name="w", storage=f"sqlite:///{db}").trials
    assert trial.state == TrialState.FAIL and "by SIGTERM" in trial.user_attrs["fail_reason"]
    assert trial.user_attrs["snopt_pid"] == proc.pid
    assert read_checkpoint(tmp_path / "snopt_checkpoints" / "w" / "trial-0.pt", "cpu")["step"] >= 5
    (run,) = _runs(tmp_path / "mlflow.db")
    assert run.info.status == "KILLED" and run.data.tags["snopt.signal"] == "SIGTERM"
    assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
