"""MLflow tracking against a real ``mlflow server``: what a run logs, failures, fallback and sync."""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from snopt import RunConfig, run_training
from snopt._training import Callback, NonFiniteLossError
from snopt.cli._tracking import TrackingCommand, UiCommand, add_tracking_arguments, tracking_callbacks
from snopt.tracking import (
    DEFAULT_EXPERIMENT,
    MlflowCallback,
    TrackingWarning,
    default_tracking_uri,
    flatten_params,
    pending_journals,
    sync_fallback,
)

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

STEPS = 10


def tiny_config(**overrides) -> RunConfig:
    values = dict(
        task="digits",
        model_kwargs={"width": 4},
        method="rk4",
        max_steps=STEPS,
        eval_every=5,
        batch_size=16,
        seed=0,
    )
    values.update(overrides)
    return RunConfig(**values)


def only_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} was not created"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def history_of(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out |= artifact_paths(client, run_id, item.path)
        else:
            out.add(item.path)
    return out


def assert_complete_run(client: MlflowClient, run, result, tracking_uri: str, *, model: nn.Module) -> None:
    """Everything a completed tiny digits run must show in MLflow, checked against the FitResult."""
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    # Params: the resolved configuration (flattened), versions.
    params = run.data.params
    assert params["task"] == "digits"
    assert params["model_kwargs.width"] == "4"
    assert params["method"] == "rk4"
    assert params["max_steps"] == str(STEPS)
    assert params["lr"] == str(RunConfig(optimizer="adam").resolved_lr)
    for pkg in ("torch", "torchdiffeq", "optuna", "mlflow", "snopt"):
        assert params[f"version.{pkg}"], pkg
    assert params["version.mlflow"] == mlflow.__version__
    # No torch switches and no key said twice (the configuration already names the solver).
    assert not [k for k in params if k.split(".")[-1] in ("fused", "foreach", "capturable", "differentiable")]
    prefixes = ("ode.", "optimizer.", "trial.")
    repeated = [k for k in params if k.startswith(prefixes) and k != "optimizer.class"]
    assert not repeated, sorted(params)
    # Tags.
    tags = run.data.tags
    assert tags["task"] == "digits" and tags["strategy"] == "fixed" and tags["optimizer"] == "adam"
    assert tags["snopt.status"] == "completed"
    # Per-step metric histories equal the FitResult's history, step by step.
    history = result.history
    assert len(history) == STEPS
    for key in ("train_loss", "lr", "wall_time", "nfe_forward", "nfe_backward", "nfe_total", "t1/blocks.0"):
        got = history_of(client, run_id, key)
        assert got == [(int(r["step"]), float(r[key])) for r in history], key
    # The validation metric is logged under the task's name for it.
    for key, logged_as in (("val_loss", "val_loss"), ("metric", "accuracy")):
        got = history_of(client, run_id, logged_as)
        assert got == [(int(r["step"]), float(r[key])) for r in history if key in r], key
        assert [s for s, _ in got] == [5, 10]
    assert "metric" not in run.data.metrics
    # Totals are a summary (tags and summary.json), not single-point charts.
    assert not [k for k in run.data.metrics if k.startswith("stats/")], sorted(run.data.metrics)
    assert tags["summary.steps"] == str(STEPS)
    assert tags["summary.nfe_total"] == str(result.stats["nfe_total"])
    assert float(tags["summary.accuracy"]) == pytest.approx(result.final["metric"], rel=1e-5)
    # Artifacts.
    paths = artifact_paths(client, run_id)
    for name in (
        "config.json",
        "result.json",
        "summary.json",
        "figures/loss.png",
        "figures/metric.png",
        "figures/horizons.png",
    ):
        assert name in paths, (name, paths)
    assert any(p.startswith("checkpoint/") for p in paths), paths
    local = client.download_artifacts(run_id, "config.json")
    assert json.loads(Path(local).read_text())["config"]["model_kwargs"] == {"width": 4}
    # The model, a READY logged model of the run, loads back and predicts like the trained one.
    outputs = client.get_run(run_id).outputs
    assert outputs is not None and len(outputs.model_outputs) == 1
    model_id = outputs.model_outputs[0].model_id
    logged = client.get_logged_model(model_id)
    assert str(logged.status) == "READY" and logged.source_run_id == run_id
    assert logged.name == "digits-adam-fixed"  # the run "digits · adam · fixed", not "model"
    local_model = mlflow.artifacts.download_artifacts(
        artifact_uri=logged.artifact_location, tracking_uri=tracking_uri
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = mlflow.pytorch.load_model(local_model)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# ---------------------------------------------------------------- against the server
def test_training_run_logs_everything(mlflow_server, tmp_path):
    from snopt import build_run

    config = tiny_config(checkpoint=str(tmp_path / "ckpt.pt"))
    callback = MlflowCallback(
        config,
        tracking_uri=mlflow_server.uri,
        experiment="run-logging",
        tags={"task": "digits", "strategy": "fixed", "optimizer": "adam"},
        system_metrics=True,
        system_metrics_interval=0.05,
        flush_every=3,
    )
    run = build_run(config)
    result = run_training(config, callbacks=[callback], progress=False, run=run)
    assert result.status == "completed"
    assert not callback.offline
    client = MlflowClient(mlflow_server.uri)
    logged = only_run(client, "run-logging")
    assert logged.info.run_id == callback.run_id
    assert logged.info.run_name == "digits · adam · fixed"
    assert_complete_run(client, logged, result, mlflow_server.uri, model=run.model)
    assert logged.data.tags["metric_name"] == "accuracy"
    import subprocess

    import snopt

    in_git = (
        subprocess.run(
            ["git", "-C", str(Path(snopt.__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True,
        ).returncode
        == 0
    )
    if in_git:  # the commit is logged where the source is a git checkout (an sdist or archive has none)
        assert logged.data.params["git_commit"] == logged.data.tags["mlflow.source.git.commit"]
    else:
        assert "git_commit" not in logged.data.params
    system = [k for k in logged.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system, sorted(logged.data.metrics)


def test_failed_run_on_nonfinite_loss(mlflow_server, toy):
    calls = {"n": 0}

    def loss_fn(out, y):
        loss = nn.functional.cross_entropy(out, y)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        calls["n"] += 1
        return loss * math.nan if calls["n"] == 3 else loss

    callback = MlflowCallback(
        {"experiment": "nan"}, tracking_uri=mlflow_server.uri, experiment="failures", system_metrics=False
    )
    with pytest.raises(NonFiniteLossError, match="step 3"):
        toy.fit([callback], loss_fn=loss_fn, max_steps=5, eval_every=None)
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(callback.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["snopt.status"] == "failed"
    assert "NonFiniteLossError" in run.data.tags["snopt.message"]
    assert "step 3" in run.data.tags["snopt.message"]
    assert [s for s, _ in history_of(client, run.info.run_id, "train_loss")] == [1, 2]
    assert run.data.params["model.class"] == "Sequential"
    assert run.data.params["ode.0.method"] == "euler"
    assert not client.get_run(callback.run_id).outputs.model_outputs  # no model of a failed run
    assert "result.json" in artifact_paths(client, run.info.run_id)


class _KillServerAt(Callback):
    def __init__(self, server, step: int) -> None:
        self.server, self.step = server, step

    def on_step_end(self, trainer, record):
        if record["step"] == self.step:
            self.server.kill()


def test_server_killed_mid_run_loses_nothing(mlflow_server, tmp_path, monkeypatch):
    from snopt import build_run

    # Retries without back-off: the same code path, seconds faster (a user setting wins over ours).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    config = tiny_config(checkpoint=str(tmp_path / "ckpt.pt"))
    fallback = tmp_path / "fallback"
    callback = MlflowCallback(
        config,
        tracking_uri=mlflow_server.uri,
        experiment="killed-server",
        tags={"task": "digits", "strategy": "fixed", "optimizer": "adam"},
        system_metrics=False,
        flush_every=2,
        fallback_dir=fallback,
    )
    run = build_run(config)
    with pytest.warns(TrackingWarning) as caught:
        result = run_training(
            config, callbacks=[_KillServerAt(mlflow_server, 3), callback], progress=False, run=run
        )
    assert result.status == "completed"
    tracking = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(tracking) == 1, [str(w.message) for w in tracking]
    assert "snopt tracking sync" in str(tracking[0].message)
    assert callback.offline and callback.journal is not None and callback.journal.exists()
    run_id = callback.run_id
    pending = pending_journals(fallback)
    assert len(pending) == 1 and pending[0]["run_id"] == run_id

    mlflow_server.start()  # the same backend and port
    client = MlflowClient(mlflow_server.uri)
    before = client.get_run(run_id)
    assert before.info.status == "RUNNING"
    assert len(history_of(client, run_id, "train_loss")) == 2  # only what was sent before the crash
    results = sync_fallback(fallback)
    assert [r.status for r in results] == ["synced"], results
    assert results[0].run_id == run_id
    assert not list(fallback.glob("*.jsonl")) and (fallback / "synced" / callback.journal.name).exists()
    assert_complete_run(client, client.get_run(run_id), result, mlflow_server.uri, model=run.model)
    # A second sync has nothing left to do and duplicates nothing.
    assert sync_fallback(fallback) == []
    assert len(history_of(client, run_id, "train_loss")) == STEPS


def test_unreachable_server_from_the_start_is_synced_into_a_new_run(
    mlflow_server, tmp_path, unused_port, toy, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    dead = f"http://127.0.0.1:{unused_port}"
    fallback = tmp_path / "fallback"
    callback = MlflowCallback(
        {"lr": 0.1},
        tracking_uri=dead,
        experiment="never-reached",
        tags={"strategy": "fixed"},
        system_metrics=False,
        fallback_dir=fallback,
        log_model=False,
    )
    with pytest.warns(TrackingWarning, match="failed"):
        result = toy.fit([callback], max_steps=6, eval_every=3)
    assert result.status == "completed"
    assert callback.run_id.startswith("offline:")
    parser = argparse.ArgumentParser()
    TrackingCommand().add_arguments(parser)
    assert TrackingCommand().run(parser.parse_args(["status", "--dir", str(fallback)])) == 0
    listed = capsys.readouterr().out
    assert callback.journal.name in listed and dead in listed
    # The CLI replays it into the live server (another URI than the one it was meant for).
    args = parser.parse_args(["sync", "--dir", str(fallback), "--tracking-uri", mlflow_server.uri])
    assert TrackingCommand().run(args) == 0
    client = MlflowClient(mlflow_server.uri)
    run = only_run(client, "never-reached")
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.1"
    assert run.data.tags["strategy"] == "fixed"
    assert history_of(client, run.info.run_id, "train_loss") == [
        (int(r["step"]), float(r["train_loss"])) for r in result.history
    ]
    assert [s for s, _ in history_of(client, run.info.run_id, "val_loss")] == [3, 6]
    assert {"config.json", "result.json", "figures/loss.png"} <= artifact_paths(client, run.info.run_id)


class _InterruptAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, record):
        if record["step"] == self.step:
            raise KeyboardInterrupt  # as Ctrl-C would


def test_interrupted_run_is_killed_and_resuming_continues_it(mlflow_server, tmp_path, toy):
    checkpoint = tmp_path / "ck.pt"

    def callback():
        return MlflowCallback(
            {"lr": 0.1},
            tracking_uri=mlflow_server.uri,
            experiment="resume",
            system_metrics=False,
            log_model=False,
        )

    first = callback()
    with pytest.warns(UserWarning, match="Interrupted at step 3"):
        result = toy.fit([_InterruptAt(3), first], max_steps=6, eval_every=None, checkpoint=checkpoint)
    assert result.status == "interrupted"
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "KILLED" and run.data.tags["snopt.status"] == "interrupted"
    assert any(p.startswith("checkpoint/") for p in artifact_paths(client, first.run_id))

    second = callback()
    result = toy.fit([second], max_steps=6, eval_every=None, checkpoint=checkpoint, resume=True)
    assert result.status == "completed"
    assert second.run_id == first.run_id  # the same MLflow run goes on
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert history_of(client, run.info.run_id, "train_loss") == [
        (int(r["step"]), float(r["train_loss"])) for r in result.history
    ]


# -------------------------------------------------------------- defaults and the CLI
def test_default_store_is_the_sqlite_file_in_the_working_directory(tmp_path, monkeypatch, toy):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    parser = argparse.ArgumentParser()
    add_tracking_arguments(parser)
    args = parser.parse_args([])
    assert args.experiment == DEFAULT_EXPERIMENT == "snopt"
    (callback,) = tracking_callbacks(args, {"task": "toy"}, {"strategy": "fixed"})
    toy.fit([callback], max_steps=2, eval_every=None)
    assert (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns" / "0" / "meta.yaml").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = only_run(client, "snopt")
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == "fixed"
    assert len(history_of(client, run.info.run_id, "train_loss")) == 2
    (output,) = run.outputs.model_outputs  # the model, in the local store too
    assert client.get_logged_model(output.model_id).name == "toy-fixed"  # from the run's name
    assert tracking_callbacks(parser.parse_args(["--no-tracking"]), {}, {}) == []


def test_sqlite_store_keeps_its_artifacts_next_to_its_file(tmp_path, toy, mlflow_store):
    store = tmp_path / "store" / "runs.db"
    store.parent.mkdir()
    callback = MlflowCallback(
        {}, tracking_uri=mlflow_store(store), experiment="a b", system_metrics=False, log_model=False
    )
    toy.fit([callback], max_steps=1, eval_every=None)
    run = MlflowClient(f"sqlite:///{store}").get_run(callback.run_id)
    assert run.info.artifact_uri.startswith((store.parent / "mlruns" / "a_b").as_uri())
    files = store.parent / "mlruns" / "a_b" / callback.run_id / "artifacts"
    assert (files / "config.json").exists() and (files / "figures" / "loss.png").exists()
    assert not (tmp_path / "mlruns").exists()  # not in the working directory


def test_callback_follows_set_tracking_uri_set_experiment_and_nests_under_the_active_run(
    tmp_path, toy, monkeypatch, mlflow_store
):
    from mlflow.tracking import fluent

    monkeypatch.setattr(fluent, "_active_experiment_id", None)  # set_experiment sets both: undo them
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    store = mlflow_store(tmp_path / "elsewhere.db")
    mlflow.set_tracking_uri(store)
    try:
        mlflow.set_experiment("mine")
        with mlflow.start_run(run_name="outer") as outer:
            callback = MlflowCallback({}, system_metrics=False, log_model=False, log_figures=False)
            toy.fit([callback], max_steps=1, eval_every=None)
        client = MlflowClient(store)
        inner = client.get_run(callback.run_id)
        assert callback.tracking_uri == store and callback.experiment == "mine"
        assert inner.data.tags["mlflow.parentRunId"] == outer.info.run_id
        assert inner.info.experiment_id == outer.info.experiment_id
        assert client.get_experiment(inner.info.experiment_id).name == "mine"
        assert inner.info.status == "FINISHED" and client.get_run(outer.info.run_id).info.status == "FINISHED"
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to the default store
    finally:
        mlflow.set_tracking_uri(None)


def test_tracking_arguments_reach_the_callback():
    parser = argparse.ArgumentParser()
    add_tracking_arguments(parser)
    args = parser.parse_args(["--tracking-uri", "http://host:5000", "--experiment", "e1", "--run-name", "r"])
    (callback,) = tracking_callbacks(args, tiny_config(), {"task": "digits"})
    assert (callback.tracking_uri, callback.experiment, callback.run_name) == ("http://host:5000", "e1", "r")
    assert callback.config["model_kwargs"] == {"width": 4}


def test_flatten_params():
    flat = flatten_params({"a": 1, "b": {"c": [1, 2], "d": {"e": None}}, "f": {}, "g": "x" * 7000})
    assert flat["a"] == "1"
    assert flat["b.c"] == "[1, 2]"
    assert flat["b.d.e"] == "None"
    assert flat["f"] == "{}"
    assert len(flat["g"]) == 6000 and flat["g"].endswith("...")
    assert flatten_params(tiny_config())["model_kwargs.width"] == "4"
    with pytest.raises(TypeError, match="`config` must be a mapping"):
        flatten_params(3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"flush_every": 0}, "`flush_every` must be a positive integer, but got flush_every=0"),
        ({"flush_interval": -1.0}, "`flush_interval` must be a positive number"),
        ({"experiment": " "}, "`experiment` must be a non-empty string"),
    ],
)
def test_callback_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MlflowCallback(**kwargs)


def test_ui_command_line_binds_localhost_and_uses_the_default_store(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parser = argparse.ArgumentParser()
    command = UiCommand()
    command.add_arguments(parser)
    cmd = command.command_line(parser.parse_args(["--port", "5123"]))
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "5123"
    # A server URI needs no local UI: the command says where to look instead.
    assert command.run(parser.parse_args(["--tracking-uri", "http://example.org:5000"])) == 0
    assert "http://example.org:5000" in capsys.readouterr().out


def test_tracking_status_lists_nothing_in_an_empty_folder(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    TrackingCommand().add_arguments(parser)
    assert TrackingCommand().run(parser.parse_args(["status", "--dir", str(tmp_path)])) == 0
    assert "nothing to sync" in capsys.readouterr().out
