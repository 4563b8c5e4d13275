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
