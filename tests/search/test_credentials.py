"""A comparison on a PostgreSQL storage and an MLflow server with passwords: neither password leaks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
from snopt.search import resolve_storage

SECRET = "s3cret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compare_keeps_passwords_out_of_its_output_report_journal_and_studies(postgres_url, tmp_path):
    # The test server trusts every connection, so any password is accepted (and must not leak).
    storage = postgres_url.replace("postgres@", f"postgres:{SECRET}@")
    port = _free_port()
    tracking = f"http://alice:{SECRET}@127.0.0.1:{port}"  # nothing listens: the runs are journaled
    name = f"credentials{port}"
    args = [
        "compare", "--storage", storage, "--tracking-uri", tracking, "--study-name", name,
        "--strategies", "random", "--n-trials", "1", "--task-kwargs", "val_fraction=0.05",
        "--model-kwargs", "width=4", "--method", "rk4", "--max-steps", "2", "--eval-every", "2",
        "--batch-size", "64", "--output-dir", str(tmp_path / "report"), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    exe = Path(sys.executable).parent / "snopt"
    done = subprocess.run(
        [str(exe), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "postgres:***@" in done.stdout and "alice:***@" in done.stdout
    assert "TrackingWarning" in done.stderr  # the server was down, and the warning said so
    assert SECRET not in done.stdout + done.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".md", ".json", ".jsonl")]
    assert {"report.md", "report.json"} <= {p.name for p in files}
    assert any(p.suffix == ".jsonl" for p in files)  # the journal of the unreachable server
    for path in files:
        assert SECRET not in path.read_text(errors="replace"), path
    opened = resolve_storage(storage)
    try:
        names = [
            s.study_name for s in optuna.get_all_study_summaries(opened) if s.study_name.startswith(name)
        ]
        assert names
        for study_name in names:
            study = optuna.load_study(study_name=study_name, storage=opened)
            attrs = [study.user_attrs] + [t.user_attrs for t in study.trials]
            assert SECRET not in json.dumps(attrs, default=str)
            assert "alice:***@" in json.dumps(study.user_attrs, default=str)
    finally:  # close the pool's connections before the database goes away
        opened.engine.dispose()
