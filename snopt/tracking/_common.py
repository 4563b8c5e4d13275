"""Shared pieces of tracking: MLflow import guard, URIs, names and limits, params, versions."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .._redact import redact_text

_logger = logging.getLogger("snopt.tracking")

#: Experiment that runs land in unless told otherwise.
DEFAULT_EXPERIMENT = "snopt"
#: Optuna study user attribute holding the MLflow run id of the study's parent run.
PARENT_RUN_ATTR = "mlflow_parent_run_id"
#: Optuna trial user attribute: the MLflow run of the trial.
RUN_ID_ATTR = "mlflow_run_id"
#: Optuna study user attributes holding where the parent run lives.
TRACKING_URI_ATTR = "mlflow_tracking_uri"
EXPERIMENT_ATTR = "mlflow_experiment"

# snopt.Status -> MLflow run status.
_STATUS = {
    "completed": "FINISHED",
    "failed": "FAILED",
    "interrupted": "KILLED",
    "pruned": "KILLED",
    "budget": "KILLED",
}
#: The Optuna trial state a study gives a run of each status (a budget stop is pruned, never complete).
_OPTUNA_STATE = {
    "completed": "COMPLETE",
    "failed": "FAIL",
    "interrupted": "FAIL",
    "pruned": "PRUNED",
    "budget": "PRUNED",
}
_TERMINAL = ("FINISHED", "FAILED", "KILLED")
_PARENT_TAG = "mlflow.parentRunId"
_EXPERIMENT_KIND = "mlflow.experimentKind"
_OFFLINE_PREFIX = "offline:"
_JOURNAL_FORMAT = "snopt-mlflow-journal"
# MLflow's limits (mlflow.utils.validation).
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_PARAM_LENGTH = 6000
_MAX_TAG_LENGTH = 8000
_MAX_KEY_LENGTH = 250
# Error codes that mean "the server is up and refuses this", not "the server is unreachable".
_REJECTED_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "BAD_REQUEST",
        "INVALID_STATE",
    }
)
# Short retries while a run lasts: a dead server must cost seconds, not minutes.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_PACKAGES = ("torch", "torchdiffeq", "optuna", "mlflow", "snopt")


class TrackingWarning(UserWarning):
    """MLflow tracking failed; training goes on and the data is kept locally."""


# --------------------------------------------------------------------------- basics
def _mlflow() -> Any:
    """Import MLflow, with a clear message when it is missing or shadowed."""
    try:
        import mlflow
    except ImportError as exc:  # pragma: no cover - mlflow is a dependency
        raise ImportError("MLflow tracking needs the `mlflow` package: pip install 'mlflow>=2.12'.") from exc
    if not hasattr(mlflow, "MlflowClient"):
        where = list(getattr(mlflow, "__path__", []))
        raise ImportError(
            f"`import mlflow` found a folder without the MLflow package ({where}); run from another "
            "directory or install MLflow with pip install 'mlflow>=2.12'."
        )
    return mlflow


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else MLflow's embedded default ``sqlite:///<cwd>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _resolve_uri(tracking_uri: str | None) -> str:
    if tracking_uri is None or tracking_uri == "":
        return default_tracking_uri()
    if not isinstance(tracking_uri, str):
        raise TypeError(f"`tracking_uri` must be a string, but got {type(tracking_uri).__name__}.")
    from .._checks import tracking_uri as check_tracking_uri

    return str(check_tracking_uri("tracking_uri", tracking_uri))


def default_fallback_dir() -> Path:
    """Where runs go when the tracking server fails: ``./snopt_runs/fallback``."""
    return Path.cwd() / "snopt_runs" / "fallback"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def _metric_key(key: str) -> str:
    """A name MLflow accepts: allowed characters only, no empty or relative path parts."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [p if p not in (".", "..") else "_" for p in key.split("/") if p]
    return _truncate("/".join(parts) or "_", _MAX_KEY_LENGTH)


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return _truncate(text, _MAX_PARAM_LENGTH)


def config_dict(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A configuration as a plain dict: a :class:`snopt.RunConfig` with its defaults resolved
    (the learning rate the run used, not None), any other object through ``to_dict()``, or a
    mapping as it is."""
    if hasattr(config, "resolved") and not isinstance(config, Mapping):
        config = config.resolved()
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"`config` must be a mapping or have to_dict(), but got {type(config).__name__}.")
    return dict(config)


def flatten_params(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Flatten a (nested) configuration into MLflow params.

    Args:
        config: a mapping, or an object with ``to_dict()`` (such as :class:`snopt.RunConfig`).
        prefix: prepended to every key, joined with a dot.

    Returns:
        ``{"task": "digits", "model_kwargs.width": "4", ...}``: nested mappings become dotted
        keys, lists become JSON, values are strings cut to MLflow's length limit.
    """
    config = config_dict(config)
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            out[_truncate(name, _MAX_KEY_LENGTH)] = _param_value(value)
    return out


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (those that are installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            if name == "snopt":
                from .. import __version__

                out[name] = __version__
    return out


@functools.lru_cache(maxsize=8)
def _git_commit(where: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The git commit of the repository holding ``path`` (default: the snopt sources), or None."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    return _git_commit(str(where))


_http_lock = threading.Lock()
_http_users = 0
_http_saved: dict[str, str | None] = {}


@contextlib.contextmanager
def _short_http_retries() -> Iterator[None]:
    """Lower MLflow's HTTP retries while runs are active (user settings win).

    The one deliberate exception to "no process-wide environment mutation" (issue 11): MLflow
    3.17 has no public per-client or per-request retry or timeout setting.  ``MlflowClient``'s
    REST store calls ``mlflow.utils.rest_utils.http_request`` without retry arguments, which
    then reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``..._BACKOFF_FACTOR``, ``..._BACKOFF_JITTER``
    and ``..._TIMEOUT`` from the environment at each request; the public setters in
    ``mlflow.environment_variables`` write the same environment.  With MLflow's defaults a dead
    server stalls training for minutes before the fallback journal takes over.  The change is
    scoped: made when the first run starts, only for variables the user did not set, under a
    lock, and undone when the last run ends.
    """
    global _http_users
    with _http_lock:
        if _http_users == 0:
            for key, value in _HTTP_DEFAULTS.items():
                _http_saved[key] = os.environ.get(key)
                if key not in os.environ:
                    os.environ[key] = value
        _http_users += 1
    try:
        yield
    finally:
        with _http_lock:
            _http_users -= 1
            if _http_users == 0:
                for key, old in _http_saved.items():
                    if old is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = old
                _http_saved.clear()


#: Seconds a database tracking store (PostgreSQL, MySQL) has to accept a connection.
DB_CONNECT_TIMEOUT = 5


def _check_database(uri: str) -> None:
    """Raise ``ConnectionError`` within seconds when a database tracking store does not answer.

    MLflow 3.17 tries to reach a tracking database 10 times over about 100 s before it gives up
    (``MAX_RETRY_COUNT`` in ``mlflow.store.db.utils``, with no public setting), so one short
    connection first, through SQLAlchemy's public API with the driver's ``connect_timeout``,
    sends an unreachable store's run to the fallback journal at once.
    """
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme not in ("postgresql", "mysql"):
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(
        uri, poolclass=NullPool, connect_args={"connect_timeout": DB_CONNECT_TIMEOUT}
    )
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - any failure means: not reachable now
        raise ConnectionError(
            f"the tracking database did not accept a connection within {DB_CONNECT_TIMEOUT} s "
            f"({_describe(exc)})"
        ) from None
    finally:
        engine.dispose()


def _is_rejection(exc: BaseException) -> bool:
    """The server answered and refused the request (retrying cannot help)."""
    code = getattr(exc, "error_code", None)
    return code in _REJECTED_CODES


def _describe(exc: BaseException) -> str:
    """One line on ``exc`` for warnings, logs and notes; credentials redacted before it is cut."""
    text = redact_text(str(exc).splitlines()[0]) if str(exc) else ""
    return f"{type(exc).__name__}: {_truncate(text, 300)}"


_warned_uris: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(uri: str, message: str) -> None:
    with _warned_lock:
        if uri in _warned_uris:
            _logger.info(message)
            return
        _warned_uris.add(uri)
    warnings.warn(message, TrackingWarning, stacklevel=2)


def _mark_reachable(uri: str) -> None:
    with _warned_lock:
        _warned_uris.discard(uri)
