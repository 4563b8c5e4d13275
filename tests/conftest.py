"""Shared fixtures: fixed seeds, every test in its own temporary folder, and a tiny training run."""

import contextlib
import os
import random
import shutil
import signal

import numpy as np
import pytest
import torch

from snopt import RunConfig


@pytest.fixture(autouse=True)
def _seeded_tmp_cwd(tmp_path, monkeypatch):
    """Seed every RNG and run in a temporary working directory (nothing lands in the repo)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    # Keep MLflow's embedded store inside the test's folder unless a test points elsewhere.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    yield


@pytest.fixture(scope="session")
def _mlflow_store_template(tmp_path_factory):
    """An empty MLflow SQLite store, created once: a new store runs MLflow's schema migrations (~1 s)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the Default experiment's artifacts would go here, not to the repo
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def mlflow_store(_mlflow_store_template):
    """``mlflow_store(path) -> "sqlite:///path"``: an empty, already migrated MLflow store at ``path``.

    For tests about what lands in a store, not about creating one (the default-store test
    creates its own from nothing).
    """

    def make(path) -> str:
        shutil.copyfile(_mlflow_store_template, path)
        return f"sqlite:///{path}"

    return make


@pytest.fixture
def sigterm_inside_sql():
    """``with sigterm_inside_sql("INSERT INTO tags") as sent:`` sends this process SIGTERM from
    inside the first SQL statement (of any SQLAlchemy engine) that starts with that text.

    The handler runs there, in the middle of the write; ``sent`` lists the statement it hit.
    ``after=True`` sends it once the statement ran, before its rows are read (a SELECT then
    holds SQLite's read lock).
    """
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @contextlib.contextmanager
    def arm(prefix: str, after: bool = False):
        sent: list[str] = []
        when = "after_cursor_execute" if after else "before_cursor_execute"

        def stop_inside(conn, cursor, statement, parameters, context, executemany):  # noqa: ARG001
            if not sent and statement.lstrip().upper().startswith(prefix.upper()):
                sent.append(statement)
                os.kill(os.getpid(), signal.SIGTERM)

        event.listen(Engine, when, stop_inside)
        try:
            yield sent
        finally:
            event.remove(Engine, when, stop_inside)

    return arm


def _tiny_config(**overrides) -> RunConfig:
    """Digits with a width-4 model, 3 fixed RK4 steps of training, a 36-image validation set."""
    values = dict(
        task="digits",
        task_kwargs={"val_fraction": 0.02},
        model_kwargs={"width": 4},
        method="rk4",
        epochs=None,
        max_steps=3,
        batch_size=32,
        eval_every=1,
        t1_every=1,
    )
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture(scope="session")
def tiny_config():
    """A factory of tiny runs: ``tiny_config(**overrides) -> RunConfig``."""
    return _tiny_config


#: Fixtures that start a server, a database, a browser or a process: tests using one are
#: marked ``integration`` here, so that no such test can miss the mark.
INTEGRATION_FIXTURES = frozenset({"mlflow_server", "postgres_url", "ui_server", "processes"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("integration") is not None:
            # With `--dist loadgroup` (pyproject's addopts) the integration tests share one
            # worker and run one at a time: each session's server and database start once,
            # and two servers never compete for the cores the other tests use.
            item.add_marker(pytest.mark.xdist_group("integration"))


def pytest_configure(config):
    # One thread: on a loaded 2-core CI machine two threads made steps several times slower.
    torch.set_num_threads(1)
    _sqlite_without_fsync()


def _sqlite_without_fsync() -> None:
    """SQLite files opened by this test process (Optuna's and MLflow's stores) skip fsync.

    Every commit of an SQLite store waits for the disk (~10 ms each on CI's disk); a comparison
    makes a thousand of them, MLflow's schema migrations hundreds.  The tests check what is
    stored, not that it survives a power cut, and with ``synchronous=OFF`` the data still
    reaches the operating system at every commit, so a killed process loses nothing.
    Subprocesses (the CLI, servers) keep SQLite's defaults.
    """
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _no_fsync(dbapi_connection, connection_record):  # noqa: ARG001 - SQLAlchemy's signature
        if type(dbapi_connection).__module__.startswith("sqlite3"):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA synchronous=OFF")
            cursor.close()
