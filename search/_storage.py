"""Optuna storages by URL, with the heartbeat that lets a study survive a killed process.

Interrupted trials are handled with Optuna's heartbeat: every running trial writes a
heartbeat to the database every ``heartbeat_interval`` seconds; when a process is killed
its trial stops beating, and after ``grace_period`` seconds the next process that works on
the study (a resumed run or another worker) marks it FAIL.  Marking every RUNNING trial
failed on start would be simpler, but it would also fail the live trials of other workers
sharing the study.  Interrupted trials carry no ``snopt_status`` attribute and do not
count against the budget, so a resumed study runs the trials it still owes.

A trial also records its owner (user attributes ``snopt_host`` and ``snopt_pid``), so that a
study resumed on the same machine fails the trials of a dead process at once, without
waiting out the grace period (a trial killed and resumed within it would otherwise stay
RUNNING).  Every trial failed this way, or by its heartbeat, gets a ``fail_reason``.

Every call of a database storage runs inside :func:`~snopt._signals.deferred_signals`: a
SIGTERM or Ctrl-C that lands in one raises when the call is done.  Raised in the middle of
one, after a SELECT ran and before its rows were read, it left that connection holding
SQLite's read lock, and the trial's own clean-up (its reason, its FAIL) then waited on it:
a worker that hung on SIGTERM instead of stopping.
"""

from __future__ import annotations

import inspect
import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from snopt._checks import sqlite_path, writable_file
from snopt._redact import redact_text, redact_url
from snopt._signals import deferred_signals

from ._choices import DEFAULT_STORAGE

#: URL schemes accepted (optionally with a driver, e.g. ``postgresql+psycopg2``).
SUPPORTED_SCHEMES = ("sqlite", "postgresql", "mysql")
#: Seconds between heartbeats of a running trial.
HEARTBEAT_INTERVAL = 10
#: Seconds without a heartbeat after which a running trial counts as interrupted.
GRACE_PERIOD = 30
#: Trial user attributes naming the process that runs the trial.
HOST_ATTR = "snopt_host"
PID_ATTR = "snopt_pid"


class _ReasonedRDBStorage(RDBStorage):
    """An ``RDBStorage`` whose heartbeat-stale trials get a ``fail_reason`` before they fail,
    and whose calls a stop signal does not cut in half (see the module's docstring).

    Optuna fails stale trials itself before each new trial, from the ids this method
    returns, and a finished trial's attributes can no longer be set: the reason is written
    here, while the trial still runs.
    """

    @deferred_signals()
    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        grace = self.grace_period if self.grace_period is not None else 2 * (self.heartbeat_interval or 0)
        for trial_id in stale:
            owner = _owner(self.get_trial(trial_id))
            reason = (
                f"interrupted: no heartbeat for over {grace} s (its process{owner} was killed, "
                "or lost the database); failed by the next process that worked on the study"
            )
            try:
                self.set_trial_user_attr(trial_id, "fail_reason", reason)
            except UpdateFinishedTrialError:  # another process failed it first
                pass
        return stale


# Every method of RDBStorage: its constructor (it creates or upgrades the tables), Optuna's
# storage API, and the private ones that its cache and fail_stale_trials call (_get_trials,
# _create_new_trial, ...); static methods run no SQL.  A contextmanager is also a decorator:
# each call gets a block of its own.
for _name, _method in inspect.getmembers(RDBStorage, inspect.isfunction):
    if (_name.startswith("__") and _name != "__init__") or _name in vars(_ReasonedRDBStorage):
        continue
    if isinstance(inspect.getattr_static(RDBStorage, _name), staticmethod):
        continue
    setattr(_ReasonedRDBStorage, _name, deferred_signals()(_method))


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
    scheme = check_storage(storage, create=create)
    _check_heartbeat(heartbeat_interval, grace_period)
    engine_kwargs = {}
    if scheme == "sqlite":
        # The file's folder, made now (check_storage made sure that it can be).
        writable_file("storage", sqlite_path(storage), create=True)
        # Several worker processes write to one file: wait for the lock instead of failing.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        # Optuna labels the heartbeat experimental; it is what makes resuming safe here.
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            return _ReasonedRDBStorage(
                storage,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period if heartbeat_interval is not None else None,
            )
        except ImportError as exc:
            raise ImportError(_missing_driver(storage, scheme)) from exc


def check_storage(storage: str, *, create: bool = True) -> str:
    """Check a storage URL without connecting to it or creating anything; return its scheme.

    Args:
        storage: a database URL.
        create: whether a missing SQLite file may be created later (False: it must exist).

    Raises:
        ValueError: naming ``storage``: an unsupported scheme, a port that is not a number
            in 1..65535, or an SQLite file that is missing (with
            ``create=False``) or cannot be written.
    """
    scheme = _scheme(storage)
    url = redact_url(storage)
    try:
        port = urlsplit(storage).port
    except ValueError as exc:
        raise ValueError(
            f"`storage` must be a database URL of the form scheme://user:password@host:port/database, "
            f"but got storage={url!r} ({redact_text(str(exc))})."
        ) from None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"`storage` must name a port in 1..65535, but got port {port} in storage={url!r}.")
    if scheme == "sqlite":
        _check_sqlite(storage, create)
    return scheme


def _scheme(storage: str) -> str:
    """The database scheme of a storage URL (``postgresql+psycopg2://`` -> ``postgresql``), checked."""
    scheme = storage.split("://", 1)[0].split("+", 1)[0].lower() if "://" in storage else ""
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"`storage` must be a database URL with one of the schemes {list(SUPPORTED_SCHEMES)} "
            f"(e.g. {DEFAULT_STORAGE!r} or 'postgresql://user:password@host:5432/db'), "
            f"but got storage={redact_url(storage)!r}."
        )
    return scheme


def _check_heartbeat(heartbeat_interval: int | None, grace_period: int | None) -> None:
    for name, value in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"`{name}` must be a positive integer or None, but got {name}={value!r}.")
    if heartbeat_interval is not None and grace_period is not None and grace_period < heartbeat_interval:
        raise ValueError(
            f"`grace_period >= heartbeat_interval` must hold, but got grace_period={grace_period}, "
            f"heartbeat_interval={heartbeat_interval}."
        )


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


def owner_attrs() -> dict[str, str | int]:
    """The user attributes that name this process as a trial's owner."""
    return {HOST_ATTR: socket.gethostname(), PID_ATTR: os.getpid()}


def _owner(trial: FrozenTrial) -> str:
    host, pid = trial.user_attrs.get(HOST_ATTR), trial.user_attrs.get(PID_ATTR)
    return f" (pid {pid} on {host})" if host is not None and pid is not None else ""


def _process_gone(pid: int) -> bool:
    """Whether process ``pid`` of this machine is known to have ended (a zombie has)."""
    if os.name != "posix" or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:  # Linux: a killed child its parent has not reaped yet is a zombie, not alive
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def _owner_gone(trial: FrozenTrial) -> bool:
    """Whether the process that ran ``trial`` is provably gone: this machine's, another pid, ended."""
    pid = trial.user_attrs.get(PID_ATTR)
    if trial.user_attrs.get(HOST_ATTR) != socket.gethostname() or not isinstance(pid, int):
        return False
    return pid != os.getpid() and _process_gone(pid)


def fail_interrupted_trials(study: optuna.Study) -> None:
    """Mark FAIL, with a ``fail_reason``, the running trials whose process was killed.

    Those of a process of this machine that has ended fail at once; the others once their
    heartbeat stopped for the grace period (RDB storages with a heartbeat).
    """
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _owner_gone(trial):
            continue
        reason = (
            f"interrupted: its process{_owner(trial)} ended while the trial ran (killed, or a crash); "
            "failed when the study was resumed"
        )
        # Private storage and trial id, as Optuna's own fail_stale_trials does it: the public
        # Study.tell(trial.number, state=FAIL) also runs the sampler's after_trial, and
        # GridSampler's then calls study.stop(), which raises RuntimeError outside optimize()
        # (Optuna 5.0).  Optuna has no public call that fails a dead process's trial, nor one that
        # sets a user attribute of a trial given by number.
        storage, trial_id = study._storage, trial._trial_id
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # another process failed it first
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def storage_url(storage: str | BaseStorage | None) -> str | None:
    """The URL of a storage, where it has one."""
    if isinstance(storage, str):
        return storage
    url = getattr(storage, "url", None)
    return url if isinstance(url, str) else None
