"""Studies and comparisons in MLflow: parent runs, nested trial runs (several workers), reports."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from snopt.search import PruningCallback

from snopt._training import Callback, Status, StopTraining
from snopt.tracking import (
    PARENT_RUN_ATTR,
    StudyTracker,
    log_report,
    parent_run_id,
    start_parent_run,
    tracking_callback_factory,
)

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def children(client: MlflowClient, run_id: str):
    exp = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")


class _PruneAt(Callback):
    def __init__(self, trial, step: int) -> None:
        self.trial, self.step = trial, step

    def on_evaluate(self, trainer, record):
        if record["step"] == self.step:  # as Optuna's pruner would, on an evaluation
            raise StopTraining(Status.PRUNED, f"pruned at step {self.step}")


WORKER = textwrap.dedent(
    """
    import sys
    import optuna
    import torch
    from torch import nn
    from snopt import fit
    from snopt._ode import ODEBlock
    from snopt.tracking import StudyTracker

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))

        def forward(self, t, x):
            return self.net(x)

    study = optuna.load_study(study_name="toy", storage=sys.argv[1])
    tracker = StudyTracker.for_study(study, system_metrics=False)
    assert tracker is not None, "the study does not record its MLflow parent run"

    def objective(trial):
        lr = trial.suggest_float("lr", 0.01, 0.5, log=True)
        torch.manual_seed(0)
        model = nn.Sequential(ODEBlock(Field(), method="euler", options={"step_size": 0.5}), nn.Linear(2, 2))
        x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
        data = [(x[:4], (x[:4, 0] > 0).long()), (x[4:], (x[4:, 0] > 0).long())]
        result = fit(model, data, data, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                     loss_fn=nn.functional.cross_entropy, max_steps=4, eval_every=2,
                     callbacks=tracker(trial, {"lr": lr}), progress=False)
        return result.final["val_loss"]

    study.optimize(objective, n_trials=1)
    """
)


def _run_study(mlflow_server, tmp_path, toy, second_worker):
    """Two trials here (one pruned), one more from a second worker; returns (client, parent, study)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="toy", storage=storage)
    tracker = StudyTracker(
        kind="study",
        name="toy-study",
        tracking_uri=mlflow_server.uri,
        experiment="studies",
        params={"budget": {"n_trials": 3}},
        system_metrics=False,
    )
    parent = tracker.start(study)
    assert study.user_attrs[PARENT_RUN_ATTR] == parent == parent_run_id(study)
    assert tracker.start(study) == parent  # idempotent
    tracker = pickle.loads(pickle.dumps(tracker))  # workers get it pickled

    def objective(trial):
        lr = trial.suggest_float("lr", 0.01, 0.5, log=True)
        callbacks = tracker(trial, {"lr": lr})
        if trial.number == 1:
            callbacks.insert(0, _PruneAt(trial, 2))
        result = toy.fit(callbacks, lr=lr, max_steps=4, eval_every=2)
        return PruningCallback.raise_if_pruned(result).final["val_loss"]

    study.optimize(objective, n_trials=2)
    second_worker(storage, objective)
    tracker.end()

    return MlflowClient(mlflow_server.uri), parent, study


def _check_study_runs(client, parent, study):
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "toy-study"
    assert run.data.tags["snopt.kind"] == "study" and run.data.tags["optuna.study_name"] == "toy"
    assert run.data.params["budget.n_trials"] == "3"
    kids = {int(r.data.tags["optuna.trial_number"]): r for r in children(client, parent)}
    assert sorted(kids) == [0, 1, 2]
    for number, kid in kids.items():
        assert kid.data.tags["snopt.kind"] == "trial"
        assert kid.info.run_name == f"trial #{number}"
        assert "trial.lr" not in kid.data.params and kid.data.params["lr"]  # said once
        # Optuna's trial and MLflow's run point at each other.
        assert study.trials[number].user_attrs["mlflow_run_id"] == kid.info.run_id
        expected = 2 if number == 1 else 4  # the pruned trial stopped at step 2
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, expected + 1)), (number, steps)
    assert kids[0].info.status == kids[2].info.status == "FINISHED"
    assert kids[1].info.status == "KILLED" and kids[1].data.tags["snopt.status"] == "pruned"
    # The pruned step (its hooks never reached the MLflow callback) is logged all the same.
    assert [m.step for m in client.get_metric_history(kids[1].info.run_id, "val_loss")] == [2]
    assert [m.step for m in client.get_metric_history(kids[0].info.run_id, "val_loss")] == [2, 4]
    trials = {t.number: t for t in study.trials}
    assert float(kids[2].data.params["lr"]) == pytest.approx(trials[2].params["lr"])


def test_study_parent_with_trial_children_from_two_workers(mlflow_server, tmp_path, toy):
    def second_worker(storage, objective):
        # Another worker loads the study from its storage and finds the parent run there.
        joined = optuna.load_study(study_name="toy", storage=storage)
        tracker = StudyTracker.for_study(joined, system_metrics=False)
        assert tracker is not None and tracker.tracking_uri == mlflow_server.uri

        def objective2(trial):
            lr = trial.suggest_float("lr", 0.01, 0.5, log=True)
            return toy.fit(tracker(trial, {"lr": lr}), lr=lr, max_steps=4, eval_every=2).final["val_loss"]

        joined.optimize(objective2, n_trials=1)

    _check_study_runs(*_run_study(mlflow_server, tmp_path, toy, second_worker))


@pytest.mark.integration
def test_study_trials_from_a_worker_process(mlflow_server, tmp_path, toy):
    def second_worker(storage, objective):
        # A separate process joins the study through its storage alone.
        proc = subprocess.run(
            [sys.executable, "-c", WORKER, storage], capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    _check_study_runs(*_run_study(mlflow_server, tmp_path, toy, second_worker))


def test_log_report_on_parent(mlflow_server, tmp_path):
    from matplotlib.figure import Figure

    parent = start_parent_run(
        kind="comparison", name="report", tracking_uri=mlflow_server.uri, experiment="reports"
    )
    fig = Figure()
    fig.add_subplot().plot([1, 2, 3])
    md = tmp_path / "report.md"
    md.write_text("# report\n")
    rows = [
        {"strategy": "tpe", "best": 0.9, "hyperparams": {"lr": 0.01}},
        {"strategy": "feedback", "best": 0.95},
    ]
    log_report(
        parent,
        table=rows,
        figures={"curve": fig},
        files={"markdown": md},
        metrics={"target": 0.95},
        tracking_uri=mlflow_server.uri,
    )
    with pytest.raises(FileNotFoundError, match="do not exist"):
        log_report(parent, files=[tmp_path / "missing.md"], tracking_uri=mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    paths = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/summary.json", "report/report.md", "report/figures"} <= paths
    assert [a.path for a in client.list_artifacts(parent, "report/figures")] == ["report/figures/curve.png"]
    table = json.loads(Path(client.download_artifacts(parent, "report/summary.json")).read_text())
    assert table["columns"] == ["strategy", "best", "hyperparams"]
    assert table["data"][0] == ["tpe", 0.9, '{"lr": 0.01}']
    assert table["data"][1][:2] == ["feedback", 0.95]
    assert client.get_run(parent).data.metrics["target"] == 0.95
    # The UI lists logged tables from this tag.
    assert "report/summary.json" in client.get_run(parent).data.tags["mlflow.loggedArtifacts"]


def test_comparison_of_two_strategies(mlflow_server, tmp_path):
    search = pytest.importorskip("snopt.search")
    from snopt import RunConfig

    config = RunConfig(
        task="digits",
        task_kwargs={"val_fraction": 0.05},
        model_kwargs={"width": 4},
        method="rk4",
        max_steps=2,
        batch_size=16,
        epochs=None,
    )
    tracker = StudyTracker(
        kind="comparison",
        name="cmp",
        tracking_uri=mlflow_server.uri,
        experiment="comparisons",
        params={"strategies": ["random", "tpe"], "budget": {"n_trials": 1}},
        system_metrics=False,
    )
    with tracker:
        report = search.compare(
            config,
            strategies=["random", "tpe"],
            budget=search.Budget(n_trials=1),
            seeds=[0],
            space=search.SearchSpace({"lr": search.Float(1e-3, 5e-2, log=True)}),
            storage=f"sqlite:///{tmp_path / 'optuna.db'}",
            output_dir=tmp_path / "report",
            progress=False,
            warm_up=False,
            **tracker.hooks(),
        )
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["snopt.kind"] == "comparison"
    studies = {r.data.tags["strategy"]: r for r in children(client, tracker.parent_run_id)}
    assert sorted(studies) == ["random", "tpe"]
    for strategy, study_run in studies.items():
        assert study_run.data.tags["snopt.kind"] == "study" and study_run.info.status == "FINISHED"
        assert study_run.info.run_name == f"digits · {strategy} · seed 0"
        assert study_run.data.metrics["trials"] == 1
        trials = children(client, study_run.info.run_id)
        assert len(trials) == 1
        for trial_run in trials:
            assert trial_run.data.tags["strategy"] == strategy
            assert trial_run.info.run_name == f"{strategy} #0"
            # The study's best trial (its only one) keeps its model and figures.
            (output,) = trial_run.outputs.model_outputs
            assert client.get_logged_model(output.model_id).name == f"digits-{strategy}-s0-trial-0"
            assert any(a.path == "figures" for a in client.list_artifacts(trial_run.info.run_id))
            assert trial_run.info.status == "FINISHED"
            steps = [m.step for m in client.get_metric_history(trial_run.info.run_id, "train_loss")]
            assert sorted(steps) == [1, 2]
        best = report.study(strategy, 0).best_value
        assert study_run.data.metrics["best_value"] == pytest.approx(best)
        assert parent.data.metrics[f"best/{strategy}"] == pytest.approx(best)
    artifacts = {a.path for a in client.list_artifacts(tracker.parent_run_id, "report")}
    assert {
        "report/summary.json",
        "report/studies.json",
        "report/report.md",
        "report/report.json",
    } <= artifacts
    assert any(p.endswith(".png") for p in artifacts), artifacts
    table = json.loads(
        Path(client.download_artifacts(tracker.parent_run_id, "report/summary.json")).read_text()
    )
    assert [row[table["columns"].index("strategy")] for row in table["data"]] == ["random", "tpe"]


def test_mlflow_storage_trials_log_into_their_own_runs(mlflow_server, monkeypatch, toy):
    from mlflow.optuna.storage import MlflowStorage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment("optuna-in-mlflow")
    study = optuna.create_study(storage=MlflowStorage(experiment_id=experiment_id), study_name="in-mlflow")
    factory = tracking_callback_factory(
        parent_run_id(study),
        tracking_uri=mlflow_server.uri,
        experiment="optuna-in-mlflow",
        system_metrics=False,
    )
    assert factory.parent_run_id == study._study_id

    def objective(trial):
        lr = trial.suggest_float("lr", 0.01, 0.5, log=True)
        return toy.fit(factory(trial, {"lr": lr}), lr=lr, max_steps=3, eval_every=None).final["val_loss"]

    study.optimize(objective, n_trials=2)
    study._storage.flush_all_batches()
    runs = client.search_runs([experiment_id])
    assert len(runs) == 3  # the study and one run per trial: no extra runs
    trial_runs = children(client, study._study_id)
    assert len(trial_runs) == 2
    for run in trial_runs:
        assert run.info.status == "FINISHED"  # set by the storage, from the trial state
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
        assert run.data.metrics["value"] == pytest.approx(run.data.metrics["val_loss"])
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]


def test_study_tracked_while_mlflow_is_down_is_synced_with_its_structure(
    mlflow_server, tmp_path, toy, unused_port, monkeypatch
):
    from snopt.tracking import TrackingWarning, sync_fallback

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    fallback = tmp_path / "fallback"
    dead = f"http://127.0.0.1:{unused_port}"
    study = optuna.create_study(study_name="offline", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    tracker = StudyTracker(
        kind="study",
        name="offline-study",
        tracking_uri=dead,
        experiment="offline",
        fallback_dir=fallback,
        system_metrics=False,
    )
    with pytest.warns(TrackingWarning, match="failed"):
        parent = tracker.start(study)
        assert parent.startswith("offline:")

        def objective(trial):
            lr = trial.suggest_float("lr", 0.01, 0.5, log=True)
            return toy.fit(tracker(trial, {"lr": lr}), lr=lr, max_steps=3, eval_every=3).final["val_loss"]

        study.optimize(objective, n_trials=2)
        tracker.on_study_end(study)
        log_report(parent, table=[{"best": study.best_value}], tracking_uri=dead, fallback_dir=fallback)
        tracker.end()
    # The parent, two trials, the study's outcome, the report and the parent's end.
    assert len(list(fallback.glob("*.jsonl"))) == 6
    # A child found before its parent waits for it: put the parent's journal last.
    (parent_journal,) = [p for p in fallback.glob("*.jsonl") if '"snopt.kind": "study"' in p.read_text()]
    parent_journal.rename(fallback / "zzz-parent.jsonl")
    results = sync_fallback(fallback, tracking_uri=mlflow_server.uri)
    assert sorted(r.status for r in results) == ["synced"] * 6, results
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("offline").experiment_id], "tags.snopt.kind = 'study'"
    )
    assert run.info.run_name == "offline-study" and run.info.status == "FINISHED"
    assert run.data.metrics["trials"] == 2 and run.data.metrics["best_value"] == pytest.approx(
        study.best_value
    )
    assert "report/summary.json" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    kids = children(client, run.info.run_id)
    assert sorted(k.info.run_name for k in kids) == ["trial #0", "trial #1"]
    for kid in kids:
        assert kid.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "train_loss")] == [1, 2, 3]


def test_comparison_rerun_gets_a_parent_with_this_runs_studies(mlflow_server, tmp_path):
    # Issue 14: a second compare continues the studies; its parent holds this run's study runs
    # and trials instead of being an empty duplicate of the first.
    search = pytest.importorskip("snopt.search")
    from snopt import RunConfig

    config = RunConfig(
        task="digits",
        task_kwargs={"val_fraction": 0.05},
        model_kwargs={"width": 4},
        method="rk4",
        max_steps=1,
        batch_size=16,
        epochs=None,
    )
    parents = []
    for _ in range(2):
        tracker = StudyTracker(
            kind="comparison", name="cmp", tracking_uri=mlflow_server.uri, system_metrics=False
        )
        with tracker:
            search.compare(
                config,
                strategies=["random"],
                budget=search.Budget(n_trials=1),
                space=search.SearchSpace({"lr": search.Float(1e-3, 5e-2, log=True)}),
                storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                output_dir=None,
                progress=False,
                warm_up=False,
                **tracker.hooks(),
            )
        parents.append(tracker.parent_run_id)
    client = MlflowClient(mlflow_server.uri)
    assert parents[0] != parents[1]
    for parent in parents:
        (study_run,) = children(client, parent)
        assert len(children(client, study_run.info.run_id)) == 1  # this run's one trial


def test_best_mode_keeps_artifacts_of_trials_that_beat_the_best_so_far():
    import optuna

    from snopt import FitResult
    from snopt.tracking._studies import _keep_artifacts

    def result(metric):
        return FitResult(status="completed", final={"metric": metric}, history=[], stats={})

    for direction, better, worse in (("maximize", 0.9, 0.7), ("minimize", 0.7, 0.9)):
        study = optuna.create_study(direction=direction)
        trial = study.ask()
        keep = _keep_artifacts("best", trial)
        assert keep(result(0.5))  # nothing completed yet: the first trial is the best so far
        study.tell(trial, 0.8)
        keep = _keep_artifacts("best", study.ask())
        assert keep(result(better)) and not keep(result(worse)) and not keep(result(float("nan")))
    assert _keep_artifacts("all", None) is True and _keep_artifacts("none", None) is False
    with pytest.raises(ValueError, match="`log_models` must be one of"):
        StudyTracker(log_models=True)


def test_report_parts_of_a_comparison_report_a_mapping_and_anything_else():
    from snopt.search import ComparisonReport, StudyResult

    from snopt.tracking._studies import _report_parts

    studies = []
    for strategy, best in (("feedback", 0.9), ("tpe", 0.8)):
        study = StudyResult(strategy, 0, f"x-{strategy}-s0")
        study.curve.append(
            {"trial": 0, "state": "COMPLETE", "value": best, "cum_time": 1.0, "cum_nfe": 10, "best": best}
        )
        study.best_value = best
        studies.append(study)
    report = ComparisonReport.build(
        name="x",
        metric_name="accuracy",
        direction="maximize",
        budget={"nfe": 10},
        epsilon=0.0,
        studies=studies,
        storage=None,
    )
    parts = _report_parts(report)
    assert [row["strategy"] for row in parts["table"]] == ["feedback", "tpe"]
    assert parts["metrics"] == {"target": 0.8, "best/feedback": 0.9, "best/tpe": 0.8}
    assert [s["strategy"] for s in parts["studies"]] == ["feedback", "tpe"]
    assert "curve" not in parts["studies"][0] and parts["json"]["target"] == 0.8
    assert _report_parts({"rows": [{"a": 1}], "metrics": {"m": 1.0}})["table"] == [{"a": 1}]

    class LooksLikeAReport:  # the duck-typed reports of before are refused, by name
        def summary(self):
            return []

    with pytest.raises(TypeError, match="`report` must be a snopt.search.ComparisonReport or a mapping"):
        _report_parts(LooksLikeAReport())


def test_budget_cut_and_solver_failure_runs_end_as_their_optuna_trials(mlflow_server, tmp_path):
    """A trial cut by the study's budget is PRUNED in Optuna and KILLED in MLflow; a solver failure
    is FAIL and FAILED, with the solver's message in both."""
    search = pytest.importorskip("snopt.search")
    from snopt import RunConfig

    base = dict(
        task="digits",
        task_kwargs={"val_fraction": 0.05},
        model_kwargs={"width": 4},
        max_steps=3,
        batch_size=32,
        eval_every=1,
        epochs=None,
    )
    space = search.SearchSpace({"lr": search.Float(1e-3, 5e-2, log=True)})
    cases = {
        # 3 fixed RK4 steps cost 27 NFE: a 60-NFE budget completes two trials and cuts the third.
        "cut": (RunConfig(method="rk4", **base), search.Budget(nfe=60)),
        # An adaptive forward solve capped at 5 evaluations fails at once.
        "failing": (RunConfig(method="dopri5", max_nfe=5, **base), search.Budget(n_trials=1)),
    }
    client = MlflowClient(mlflow_server.uri)
    runs = {}
    for name, (config, budget) in cases.items():
        tracker = StudyTracker(
            kind="study", name=name, tracking_uri=mlflow_server.uri, experiment="states", system_metrics=False
        )
        study = search.create_study(
            config,
            strategy="random",
            space=space,
            budget=budget,
            storage=f"sqlite:///{tmp_path / 'optuna.db'}",
            study_name=name,
            pruner="none",
            trial_callbacks_factory=tracker,
        )
        with tracker:
            tracker.start(study)
            study.optimize()
            tracker.on_study_end(study)
        runs[name] = (study.trials, {r.info.run_id: r for r in children(client, tracker.parent_run_id)})
    mlflow_status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for trials, kids in runs.values():
        assert len(kids) == len(trials)
        for trial in trials:
            run = kids[trial.user_attrs["mlflow_run_id"]]
            assert run.data.tags["snopt.trial_state"] == trial.state.name
            assert run.info.status == mlflow_status[trial.state.name]
    cut, kids = runs["cut"]
    assert [t.state.name for t in cut] == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned = kids[cut[2].user_attrs["mlflow_run_id"]]
    assert pruned.data.tags["snopt.status"] == "budget"
    assert "the study's budget ran out (NFE" in pruned.data.tags["snopt.message"]
    assert "the study's budget ran out (NFE" in cut[2].user_attrs["stop_reason"]
    (failed,), kids = runs["failing"]
    assert failed.state.name == "FAIL"
    run = kids[failed.user_attrs["mlflow_run_id"]]
    message = run.data.tags["snopt.message"]
    assert "forward solve took more than max_nfe=5 field evaluations" in message
    assert message in failed.user_attrs["fail_reason"]  # the same words in Optuna and in MLflow
    assert "snopt._" not in message  # no private module or class names
