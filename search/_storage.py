"""Optuna storages by URL, with the heartbeat that lets a study survive a killed process.

Interrupted trials are handled with Optuna's heartbeat: every running trial writes a
heartbeat to the database every ``heartbeat_interval`` seconds; when a process is killed
its trial stops beating, and after ``grace_period`` seconds the next process that works on
the study (a resumed run or another worker) marks it FAIL.  Marking every RUNNING trial
failed on start would be simpler, but it would also fail the live trials of other workers
sharing the study.  Interrupted trials carry no ``snopt_status`` attribute and do not
count against the budget, so a resumed study runs the trials it still owes.
"""

from __future__ import annotations

import os
import warnings

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage

from snopt._checks import sqlite_path, writable_file
from snopt._redact import redact_url

#: The storage used when none is given: an SQLite file in the working directory.
DEFAULT_STORAGE = "sqlite:///snopt.db"
#: URL schemes accepted (optionally with a driver, e.g. ``postgresql+psycopg2``).
SUPPORTED_SCHEMES = ("sqlite", "postgresql", "mysql")
#: Seconds between heartbeats of a running trial.
HEARTBEAT_INTERVAL = 10
#: Seconds without a heartbeat after which a running trial counts as interrupted.
GRACE_PERIOD = 30


def resolve_storage(
    storage: str | BaseStorage | None,
    *,
    heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
    grace_period: int | None = GRACE_PERIOD,
    create: bool = True,
) -> BaseStorage:
    """The Optuna storage for ``storage``.

    Args:
        storage: a database URL (``sqlite:///file.db``, ``postgresql://user@host/db``,
            ``mysql+pymysql://...``), an Optuna storage object (used as is), or None for
            an in-memory storage (one process, lost at exit).
        heartbeat_interval: seconds between heartbeats of running trials (None: off).
        grace_period: seconds without heartbeat before a trial is failed as interrupted.
        create: whether a missing SQLite file may be created (False: opening an existing
            study, where a missing file is a wrong path, not a new database).

    Returns:
        The storage.

    Raises:
        ValueError: on a URL whose scheme is not supported (the message lists them), an
            SQLite file that cannot be written (or is missing, with ``create=False``) or bad
            heartbeat settings.
        ImportError: the database driver of the URL is not installed (the message names
            the extra that installs it).
    """
    if storage is None:
        return optuna.storages.InMemoryStorage()
    if isinstance(storage, BaseStorage):
        return storage
    if not isinstance(storage, str):
        raise TypeError(
            f"`storage` must be a URL string, an Optuna storage or None, but got {type(storage).__name__}."
        )
    scheme = storage.split("://", 1)[0].split("+", 1)[0].lower() if "://" in storage else ""
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"`storage` must be a database URL with one of the schemes {list(SUPPORTED_SCHEMES)} "
            f"(e.g. {DEFAULT_STORAGE!r} or 'postgresql://user:password@host:5432/db'), "
            f"but got storage={redact_url(storage)!r}."
        )
    for name, value in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"`{name}` must be a positive integer or None, but got {name}={value!r}.")
    if heartbeat_interval is not None and grace_period is not None and grace_period < heartbeat_interval:
        raise ValueError(
            f"`grace_period >= heartbeat_interval` must hold, but got grace_period={grace_period}, "
            f"heartbeat_interval={heartbeat_interval}."
        )
    engine_kwargs = {}
    if scheme == "sqlite":
        _check_sqlite(storage, create)
        # Several worker processes write to one file: wait for the lock instead of failing.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        # Optuna labels the heartbeat experimental; it is what makes resuming safe here.
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                storage,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period if heartbeat_interval is not None else None,
            )
        except ImportError as exc:
            raise ImportError(_missing_driver(storage, scheme)) from exc


#: The extra of snopt that installs the driver SQLAlchemy picks for a plain ``scheme://`` URL.
DRIVER_EXTRAS = {"postgresql": ("postgres", "psycopg (3)")}


def _missing_driver(storage: str, scheme: str) -> str:
    url = redact_url(storage)
    if scheme in DRIVER_EXTRAS and "+" not in storage.split("://", 1)[0]:
        extra, driver = DRIVER_EXTRAS[scheme]
        return (
            f"`storage` {url!r} needs the database driver {driver}, which is not installed: "
            f"pip install 'snopt[{extra}]'."
        )
    return f"`storage` {url!r} needs a database driver that is not installed; install the one its URL names."


def _check_sqlite(storage: str, create: bool) -> None:
    """An SQLite URL names a file (not memory) that exists (``create=False``) or can be written."""
    path = sqlite_path(storage)
    url = redact_url(storage)
    if path is None:
        raise ValueError(
            f"`storage` must name an SQLite file, e.g. {DEFAULT_STORAGE!r} (an in-memory database is lost "
            f"at once and is not shared with workers), but got storage={url!r}."
        )
    if not create and not os.path.isfile(path):
        raise ValueError(
            f"`storage` must name an existing SQLite file (a study's database), but {path!r} does not exist; "
            f"check the path, or create the study first (snopt search), storage={url!r}."
        )
    writable_file("storage", path)


def fail_interrupted_trials(study: optuna.Study) -> None:
    """Mark FAIL the running trials whose heartbeat stopped (their process was killed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def storage_url(storage: str | BaseStorage | None) -> str | None:
    """The URL of a storage, where it has one."""
    if isinstance(storage, str):
        return storage
    url = getattr(storage, "url", None)
    return url if isinstance(url, str) else None
