"""The fallback journal is data: it never unpickles, names no file outside its folder, and
replays only to the tracking URI it was written for (or one given explicitly)."""

import json
import os
import pickle

import torch

from snopt._redact import redact_url
from snopt.cli import main
from snopt.tracking import sync_fallback
from snopt.tracking._common import _JOURNAL_FORMAT


class Payload:
    """Unpickling this would create ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def write_journal(folder, ops, *, uri, local_id="20260101-000000-deadbeef"):
    folder.mkdir(parents=True, exist_ok=True)
    header = {
        "format": _JOURNAL_FORMAT,
        "version": 1,
        "local_id": local_id,
        "host": "elsewhere",
        "pid": 1,
        "tracking_uri": uri,
        "experiment": "planted",
        "run_id": None,
    }
    lines = [header, {"op": "create_run", "run_name": "x", "tags": {}, "start_time": 0}, *ops]
    lines.append({"op": "close"})
    path = folder / f"{local_id}.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (folder / local_id).mkdir(exist_ok=True)
    return path


def artifacts(uri, experiment="planted"):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    out = set()

    def walk(path=None):
        for item in client.list_artifacts(runs[0].info.run_id, path):
            walk(item.path) if item.is_dir else out.add(item.path)

    walk()
    return out


def test_a_planted_journal_runs_nothing_and_uploads_nothing_outside_its_folder(tmp_path, mlflow_store):
    uri = mlflow_store(tmp_path / "store.db")
    folder = tmp_path / "fallback"
    local_id = "20260101-000000-deadbeef"
    files = folder / local_id
    files.mkdir(parents=True)
    marker = tmp_path / "pwned"
    # A pickled "model" in the legacy op, and a weights file that is a pickle with a payload.
    (files / "0001").mkdir()
    with open(files / "0001" / "model.pkl", "wb") as fh:
        pickle.dump(Payload(marker), fh)
    (files / "0002" / "model").mkdir(parents=True)
    torch.save({"w": Payload(marker)}, files / "0002" / "model" / "weights.pt")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (files / "0003").mkdir()
    (files / "0003" / "link.txt").symlink_to(secret)
    (files / "0004").mkdir()
    (files / "0004" / "ok.txt").write_text("fine")
    ops = [
        {"op": "log_model", "path": "0001", "name": "model"},
        {
            "op": "log_model_weights",
            "path": "0002/model/weights.pt",
            "name": "model",
            "config": {"task": "toy2d"},
        },
        {"op": "log_artifact", "path": str(secret)},
        {"op": "log_artifact", "path": "../../secret.txt"},
        {"op": "log_artifact", "path": "0003/link.txt"},
        {"op": "log_artifact", "path": "0003"},
        {"op": "log_artifact", "path": "0004/ok.txt"},
    ]
    path = write_journal(folder, ops, uri=uri, local_id=local_id)
    (result,) = sync_fallback(folder)
    assert not marker.exists()
    assert result.status == "synced", result
    notes = "\n".join(result.notes)
    assert "pickled model was not loaded" in notes
    assert "holds objects other than tensors" in notes
    assert notes.count("journal's folder") == 4, notes
    assert artifacts(uri) == {"ok.txt"}
    assert not path.exists()  # replayed: moved to synced/


def test_a_journal_whose_id_names_another_folder_is_refused(tmp_path):
    folder = tmp_path / "fallback"
    path = write_journal(folder, [], uri=f"sqlite:///{tmp_path / 's.db'}", local_id="a")
    text = path.read_text().replace('"local_id": "a"', '"local_id": "../../etc"')
    path.write_text(text)
    (result,) = sync_fallback(folder)
    assert result.status == "refused" and "local_id" in result.error


def test_a_redacted_uri_replays_only_where_the_credentials_are_given(tmp_path, monkeypatch):
    folder = tmp_path / "fallback"
    secret_uri = "postgresql://user:hunter2@db.example:5432/mlflow"
    write_journal(folder, [], uri=redact_url(secret_uri))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    (result,) = sync_fallback(folder)
    assert result.status == "refused"
    assert "postgresql://user:***@db.example:5432/mlflow" in result.error and "--tracking-uri" in result.error
    assert "hunter2" not in json.dumps(result.__dict__)


def test_an_unknown_scheme_in_a_journal_is_refused(tmp_path):
    folder = tmp_path / "fallback"
    write_journal(folder, [], uri="foo://somewhere")
    (result,) = sync_fallback(folder)
    assert result.status == "refused" and "schemes" in result.error


def test_journal_headers_hold_no_password(tmp_path):
    from snopt.tracking._journal import _Journal

    journal = _Journal(tmp_path, {"tracking_uri": "https://alice:s3cret@mlflow.example", "experiment": "e"})
    text = journal.path.read_text()
    assert "s3cret" not in text and "https://alice:***@mlflow.example" in text


def test_tracking_sync_dir_must_be_a_folder(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for action in ("sync", "status"):
        assert main(["tracking", action, "--dir", str(afile)]) == 2
        assert "--dir" in capsys.readouterr().err
    assert main(["tracking", "sync", "--dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
