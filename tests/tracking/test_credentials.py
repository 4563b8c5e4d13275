"""Credentials never leave the process: a password planted in a tracking URI shows up nowhere."""

import json
import time
from types import SimpleNamespace

import pytest

from snopt._redact import redact_url
from snopt.cli import main
from snopt.tracking import MlflowCallback, StudyTracker, TrackingWarning
from snopt.tracking._common import EXPERIMENT_ATTR, PARENT_RUN_ATTR, TRACKING_URI_ATTR

SECRET = "s3cret"


def _texts(folder):
    return {str(p): p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()}


def test_a_password_in_an_unreachable_uri_stays_out_of_warnings_files_and_sync_output(
    tmp_path, unused_port, toy, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    uri = f"http://alice:{SECRET}@127.0.0.1:{unused_port}"
    fallback = tmp_path / "fallback"
    callback = MlflowCallback(
        {"lr": 0.1}, tracking_uri=uri, system_metrics=False, fallback_dir=fallback, log_model=False
    )
    with pytest.warns(TrackingWarning) as warned:
        result = toy.fit([callback], max_steps=4, eval_every=2, checkpoint=tmp_path / "c.pt")
    assert result.status == "completed" and callback.run_id.startswith("offline:")
    messages = [str(w.message) for w in warned]
    assert any("alice:***@" in m for m in messages) and not any(SECRET in m for m in messages)
    sidecar = (tmp_path / "c.pt.mlflow.json").read_text()
    assert json.loads(sidecar)["tracking_uri"] == f"http://alice:***@127.0.0.1:{unused_port}"
    journals = _texts(fallback)
    assert journals and not any(SECRET in text for text in journals.values())

    # Replayed to that URI, given with its password: the server is still down, and the error says so
    # without the password the failing request's URL held.
    assert main(["tracking", "sync", "--dir", str(fallback), "--tracking-uri", uri]) == 1
    out, err = capsys.readouterr()
    assert "failed" in out and "alice:***@" in out
    assert SECRET not in out + err


def test_a_resumed_run_finds_its_mlflow_run_from_the_redacted_sidecar(tmp_path):
    uri = f"http://alice:{SECRET}@mlflow.example"
    checkpoint = tmp_path / "c.pt"
    (tmp_path / "c.pt.mlflow.json").write_text(json.dumps({"run_id": "abc", "tracking_uri": redact_url(uri)}))
    resumed = SimpleNamespace(checkpoint_path=checkpoint, step=3)
    same = MlflowCallback(tracking_uri=uri)
    same._resume_from_checkpoint(resumed)
    assert same._attach_to == "abc"
    other = MlflowCallback(tracking_uri="http://bob:pw@mlflow.example")
    other._resume_from_checkpoint(resumed)
    assert other._attach_to is None  # another server's run: a new run


@pytest.mark.parametrize("usage", [False, True])
def test_the_command_line_redacts_every_error_it_prints(monkeypatch, capsys, usage):
    from snopt.cli import UsageError, _tracking

    def fail(self, args):
        raise (UsageError if usage else RuntimeError)(f"cannot reach postgresql://alice:{SECRET}@db/x")

    monkeypatch.setattr(_tracking.TrackingCommand, "run", fail)
    assert main(["tracking", "status"]) == (2 if usage else 1)
    err = capsys.readouterr().err
    assert "postgresql://alice:***@db/x" in err and SECRET not in err


def test_an_explicit_tracking_uri_wins_over_the_one_a_study_recorded(tmp_path):
    recorded, mine = (f"sqlite:///{tmp_path / name}" for name in ("recorded.db", "mine.db"))
    attrs = {PARENT_RUN_ATTR: "parent", TRACKING_URI_ATTR: recorded, EXPERIMENT_ATTR: "e"}
    trial = SimpleNamespace(
        number=0, user_attrs={}, study=SimpleNamespace(study_name="s", storage=None, user_attrs=attrs)
    )
    # A worker told nothing logs where the study's parent run is.
    default = StudyTracker(kind="study", log_models="none").callback(trial)
    assert (default.tracking_uri, default.parent_run_id) == (recorded, "parent")
    # A worker given --tracking-uri logs there: the study's database cannot send its runs elsewhere.
    told = StudyTracker(kind="study", tracking_uri=mine, log_models="none").callback(trial)
    assert told.tracking_uri == mine and told.parent_run_id is None
    same = StudyTracker(kind="study", tracking_uri=recorded, log_models="none").callback(trial)
    assert (same.tracking_uri, same.parent_run_id) == (recorded, "parent")


def test_an_unreachable_tracking_database_is_journaled_within_seconds(tmp_path, unused_port, toy):
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (pip install 'snopt[postgres]')")
    uri = f"postgresql://alice:{SECRET}@127.0.0.1:{unused_port}/mlflow"
    callback = MlflowCallback(
        {"lr": 0.1},
        tracking_uri=uri,
        system_metrics=False,
        fallback_dir=tmp_path / "fallback",
        log_model=False,
    )
    start = time.monotonic()
    with pytest.warns(TrackingWarning, match="did not accept a connection within 5 s") as warned:
        result = toy.fit([callback], max_steps=2, eval_every=2)
    assert time.monotonic() - start < 30  # MLflow alone retries a database for about 100 s
    assert result.status == "completed" and callback.run_id.startswith("offline:")
    assert not any(SECRET in str(w.message) for w in warned)
