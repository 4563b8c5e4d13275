"""A comparison stopped by SIGTERM: its parent run, the running study's run and the trial's run end KILLED."""

import os
import signal

import optuna
import pytest
from snopt.search import Budget, Float, SearchSpace, compare

from snopt import RunConfig
from snopt._signals import Terminated
from snopt._training import Callback
from snopt.tracking import StudyTracker

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


class _SigtermAt(Callback):
    def on_step_end(self, trainer, record):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would, mid-trial


@pytest.mark.integration  # an SQLite MLflow store
def test_sigterm_ends_every_open_run_of_a_comparison_killed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = RunConfig(model_kwargs={"width": 4}, method="rk4", epochs=None, max_steps=4, eval_every=2)
    tracker = StudyTracker(kind="comparison", name="stopped", tracking_uri=uri, system_metrics=False)
    hooks = tracker.hooks()
    trial_runs = hooks["trial_callbacks_factory"]
    hooks["trial_callbacks_factory"] = lambda trial, cfg: [*trial_runs(trial, cfg), _SigtermAt()]
    with pytest.raises(Terminated), pytest.warns(UserWarning, match="by SIGTERM"), tracker:
        compare(
            config,
            strategies=["random"],
            budget=Budget(n_trials=2),
            storage=None,
            warm_up=False,
            space=SearchSpace({"t1": Float(0.5, 2.0, default=1.0)}),
            output_dir=None,
            **hooks,
        )

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    kinds = {r.data.tags["snopt.kind"]: r for r in runs}
    assert sorted(kinds) == ["comparison", "study", "trial"] and len(runs) == 3
    for run in runs:
        assert run.info.status == "KILLED" and run.data.tags["snopt.signal"] == "SIGTERM", run.data.tags
    assert "by SIGTERM" in kinds["comparison"].data.tags["mlflow.note.content"]


def test_a_stop_during_a_store_write_lets_the_write_finish_first(tmp_path, mlflow_store, sigterm_inside_sql):
    """SIGTERM inside an MLflow write: the write completes, the stop follows, the store stays writable.

    An interrupt raised mid-write could leave the connection in an open transaction that holds
    SQLite's lock, so that the cleanup's own writes (the KILLED status) failed with "database is
    locked"; the sink defers the stop to the end of the write.
    """
    from snopt._signals import terminate_as_interrupt
    from snopt.tracking._sink import _RunSink

    uri = mlflow_store(tmp_path / "mlflow.db")
    sink = _RunSink(uri, "stops", fallback_dir=tmp_path / "fallback")
    run_id = sink.create_run("stopped mid-write", {})
    with sigterm_inside_sql("INSERT INTO tags") as sent:
        with pytest.raises(Terminated), terminate_as_interrupt():
            # 150 tags: two requests (100 per request); the stop lands in the first one
            sink.log_batch(tags={"note": "written", **{f"tag{i}": str(i) for i in range(149)}})
    assert len(sent) == 1 and not sink.offline
    client = MlflowClient(uri)
    tags = client.get_run(run_id).data.tags
    assert tags["note"] == "written" and tags["tag148"] == "148"  # the whole batch landed
    sink.log_batch(tags={"after": "the stop"})  # nothing holds the database's lock
    assert client.get_run(run_id).data.tags["after"] == "the stop" and not sink.offline
