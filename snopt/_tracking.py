"""MLflow tracking: every training run and every study, visible and comparable in the MLflow UI.

What is logged
--------------
:class:`MlflowCallback` is a training-loop callback.  One training run is one MLflow run:

* **params**: the whole resolved configuration (a :class:`snopt.RunConfig` or any dict,
  nested keys flattened with dots, e.g. ``model_kwargs.width``), the model and optimizer
  classes, the versions of torch, torchdiffeq, optuna, mlflow and snopt, and the git commit
  of the snopt source tree where there is one (also as MLflow's ``mlflow.source.git.commit``);
* **metrics** at ``step=record["step"]``: every numeric value of the step's history record
  (``train_loss``, ``lr``, ``wall_time``, ``epoch``, ``nfe_forward``/``nfe_backward``/
  ``nfe_total``, ``t1/<block>`` for every ODE block and every controller value) and, on
  evaluation steps, ``val_loss`` and ``metric``.  They are buffered and sent with
  ``log_batch`` every ``flush_every`` steps, every ``flush_interval`` seconds, at every
  evaluation and checkpoint, and at the end.  The final totals are logged as ``stats/...``;
* **system metrics** (``system/cpu_utilization_percentage``, memory, disk, network, GPU)
  sampled by MLflow's own monitors where psutil is installed, sent through the same buffer;
* **tags**: ``task``, ``strategy``, ``optimizer`` (and whatever else the caller passes),
  ``metric_name``, ``snopt.status`` and ``snopt.message``;
* **artifacts** at the end: ``config.json``, ``result.json`` (final values, stats, history),
  ``figures/`` (loss, metric, horizon T and NFE curves), ``checkpoint/`` (the last checkpoint)
  and the final model through ``mlflow.pytorch.log_model`` (pickle format: ODE solvers cannot
  be traced to ``pt2``; requirements are written explicitly, so nothing is looked up online).

The run ends ``FINISHED`` when training completed, ``FAILED`` when it failed (solver failure,
non-finite loss), ``KILLED`` when it was interrupted (Ctrl-C) and ``KILLED`` with the tag
``snopt.status=pruned`` when Optuna pruned it (the same mapping as MLflow's own Optuna
storage uses: a pruned trial is a run stopped on purpose, not a failure).

Where it goes
-------------
The tracking URI is ``--tracking-uri``/``tracking_uri=``, else ``MLFLOW_TRACKING_URI``, else
MLflow's embedded default, an SQLite file ``mlflow.db`` in the working directory (set
explicitly, so that MLflow never falls back to a ``./mlruns`` file store).  ``snopt ui``
starts the MLflow UI on that store.  Runs land in the experiment ``snopt`` unless told
otherwise.  A process started by ``mlflow run`` (``MLFLOW_RUN_ID`` set) logs into that run.

Nothing is lost
---------------
A tracking server that is unreachable, or dies during a run, never stops training.  While
the run lasts, MLflow's HTTP retries are kept short (2 retries, 10 s timeout, unless the
``MLFLOW_HTTP_REQUEST_*`` variables are set), so a dead server fails fast.  On the first
failure one :class:`TrackingWarning` is issued and the run switches to a local journal: every
later operation (metric batches, params, tags, artifacts, the model, the final status) and the
batch that failed are appended to ``./snopt_runs/fallback/<id>.jsonl`` (files are copied next
to it).  At the end of the run one replay is attempted; otherwise ``snopt tracking sync`` (or
:func:`sync_fallback`) replays the journals later, into the same MLflow run when it had been
created on the server, or into a new one.  A replay is resumable and idempotent for metrics.

Studies
-------
A study is a parent run and every trial a nested child run (tag ``mlflow.parentRunId``); a
comparison is a parent run with a child run per study (strategy and seed) and the trials
below those.  This holds when trials run in several worker processes or machines: the parent's
run id, tracking URI and experiment are kept in the Optuna study's user attributes
(:data:`PARENT_RUN_ATTR`), so any worker that loads the study nests its trials under the same
parent.  :class:`StudyTracker` is what ``snopt.search`` uses (``compare(..., **tracker.hooks())``);
:func:`start_parent_run`, :func:`tracking_callback_factory`, :func:`log_report` and
:func:`end_parent_run` are its pieces.  The comparison report goes on the parent run: its
summary table through ``log_table``, its figures, Markdown and JSON as artifacts.

A run resumed from a checkpoint continues the MLflow run of that checkpoint (its id is kept in
``<checkpoint>.mlflow.json``).

``mlflow.optuna.MlflowStorage`` stores an Optuna study *inside* MLflow (the study is a run,
each trial a child run).  It is supported, not the default: when a study uses it,
:func:`start_parent_run` returns the study's own run and the callbacks of
:func:`tracking_callback_factory` log into each trial's own run (the storage keeps the run's
status), so there is still one run per trial.  The default stays Optuna's RDB storage (SQLite,
PostgreSQL) because it is transactional and shared safely by many workers, works while the
tracking server is down (the study must go on when MLflow does not) and scales to many trials,
whereas ``MlflowStorage`` issues several requests per trial and sampler call and needs an
experiment of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._training import Callback, FitResult
from .cli import Command

if TYPE_CHECKING:
    from ._training import Trainer

__all__ = [
    "DEFAULT_EXPERIMENT",
    "PARENT_RUN_ATTR",
    "MlflowCallback",
    "StudyTracker",
    "SyncResult",
    "TrackingWarning",
    "add_tracking_arguments",
    "default_fallback_dir",
    "default_tracking_uri",
    "end_parent_run",
    "flatten_params",
    "log_report",
    "parent_run_id",
    "start_parent_run",
    "study_tracker",
    "sync_fallback",
    "tracking_callback_factory",
    "tracking_callbacks",
]

_logger = logging.getLogger(__name__)

#: Experiment that runs land in unless told otherwise.
DEFAULT_EXPERIMENT = "snopt"
#: Optuna study user attribute holding the MLflow run id of the study's parent run.
PARENT_RUN_ATTR = "mlflow_parent_run_id"
#: Optuna study user attributes holding where the parent run lives.
TRACKING_URI_ATTR = "mlflow_tracking_uri"
EXPERIMENT_ATTR = "mlflow_experiment"

_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "pruned": "KILLED"}
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
    return tracking_uri


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


def flatten_params(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Flatten a (nested) configuration into MLflow params.

    Args:
        config: a mapping, or an object with ``to_dict()`` (such as :class:`snopt.RunConfig`).
        prefix: prepended to every key, joined with a dot.

    Returns:
        ``{"task": "digits", "model_kwargs.width": "4", ...}``: nested mappings become dotted
        keys, lists become JSON, values are strings cut to MLflow's length limit.
    """
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"`config` must be a mapping or have to_dict(), but got {type(config).__name__}.")
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            out[_truncate(name, _MAX_KEY_LENGTH)] = _param_value(value)
    return out


def _jsonable(value: Any) -> Any:
    from ._training import _jsonable as convert

    return convert(value)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (those that are installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            if name == "snopt":
                from . import __version__

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
    """Lower MLflow's HTTP retries while runs are active (user settings win)."""
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


def _is_rejection(exc: BaseException) -> bool:
    """The server answered and refused the request (retrying cannot help)."""
    code = getattr(exc, "error_code", None)
    return code in _REJECTED_CODES


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
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


# ------------------------------------------------------------- applying operations
# An operation is a JSON-able dict; the same code applies it online and when a journal is
# replayed, so a synced run is exactly what an online run would have been.
def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where the artifacts of a local SQLite store go: next to its file.

    MLflow would use ``./mlruns`` of whatever folder the command ran in; servers and other
    stores choose their own location (None).
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0])
    if str(db) in ("", ":memory:"):
        return None
    folder = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment) or "experiment"
    return (db.resolve().parent / "mlruns" / folder).as_uri()


def _get_or_create_experiment(client: Any, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        # The kind tag makes the UI open the experiment on its training runs, not on GenAI views.
        return client.create_experiment(
            name,
            artifact_location=_artifact_location(tracking_uri, name),
            tags={_EXPERIMENT_KIND: "custom_model_development"},
        )
    except Exception as exc:  # another worker created it in between
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _experiment_for(client: Any, name: str, tags: Mapping[str, str], tracking_uri: str) -> str:
    """A child run goes into its parent's experiment (the UI nests runs within one experiment)."""
    parent = tags.get(_PARENT_TAG)
    if parent and not parent.startswith(_OFFLINE_PREFIX):
        try:
            return client.get_run(parent).info.experiment_id
        except Exception as exc:
            if not _is_rejection(exc):
                raise
    return _get_or_create_experiment(client, name, tracking_uri)


def _mlflow_run_env(tracking_uri: str) -> str | None:
    """The run of ``mlflow run`` (``MLFLOW_RUN_ID``), if it exists in ``tracking_uri``."""
    run_id = os.environ.get("MLFLOW_RUN_ID") or None
    if run_id is None:
        return None
    try:
        _mlflow().MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except Exception as exc:
        if not _is_rejection(exc):
            return run_id  # unreachable: the fallback journal keeps the run id
        warnings.warn(
            f"MLFLOW_RUN_ID={run_id} is not a run of {tracking_uri}; logging to a new run instead. "
            "(`mlflow run` starts its command in the project folder, so a relative sqlite:/// URI "
            "points elsewhere there: set MLFLOW_TRACKING_URI to an absolute URI.)",
            TrackingWarning,
            stacklevel=2,
        )
        return None
    return run_id


def _apply(
    client: Any, tracking_uri: str, run_id: str, op: Mapping[str, Any], base: Path | None
) -> list[str]:
    """Apply one operation to ``run_id``; returns notes on items the server refused."""
    kind = op["op"]
    notes: list[str] = []
    if kind == "log_batch":
        from mlflow.entities import Metric, Param, RunTag

        metrics = [Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in op.get("metrics", ())]
        params = [Param(k, v) for k, v in op.get("params", {}).items()]
        tags = [RunTag(k, v) for k, v in op.get("tags", {}).items()]
        try:
            client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
        except Exception as exc:
            if not (_is_rejection(exc) and params):
                raise
            # A param that already holds another value refuses the whole batch: log the rest.
            if metrics or tags:
                client.log_batch(run_id, metrics=metrics, tags=tags, synchronous=True)
            for p in params:
                try:
                    client.log_batch(run_id, params=[p], synchronous=True)
                except Exception as one:
                    if not _is_rejection(one):
                        raise
                    notes.append(f"param {p.key}={p.value!r} refused ({_describe(one)})")
    elif kind == "log_artifact":
        path = Path(op["path"]) if base is None else base / op["path"]
        if path.is_dir():
            client.log_artifacts(run_id, str(path), op.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), op.get("artifact_path"))
    elif kind == "log_table":
        client.log_table(run_id, data=op["data"], artifact_file=op["artifact_file"])
    elif kind == "log_model":
        mlflow = _mlflow()
        path = Path(op["path"]) if base is None else base / op["path"]
        with _quiet_mlflow():
            model = mlflow.pytorch.load_model(str(path), map_location="cpu")
        _log_model(client, tracking_uri, run_id, model, op.get("name", "model"), op.get("pip_requirements"))
    elif kind == "terminate":
        # MLflow prints a "View run" link for runs on a server: one per trial is noise.
        quiet = contextlib.redirect_stdout(io.StringIO()) if op.get("quiet") else contextlib.nullcontext()
        with quiet:
            client.set_terminated(run_id, status=op["status"], end_time=op.get("end_time"))
    else:
        raise ValueError(
            f"Unknown tracking operation {kind!r}; valid ones are log_batch, log_artifact, "
            "log_table, log_model, terminate."
        )
    return notes


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Hide MLflow's import-time and pickle-format chatter around model (de)serialisation."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Pickle or CloudPickle" not in record.getMessage()

    flt = _Drop()
    logger = logging.getLogger("mlflow.pytorch")
    logger.addFilter(flt)
    try:
        with warnings.catch_warnings():
            # mlflow.pyfunc warns about its own type hints when first imported.
            warnings.filterwarnings("ignore", message=r".*type hint is inferred as AnyType.*")
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
            yield
    finally:
        logger.removeFilter(flt)


def _model_requirements() -> list[str]:
    return [
        f"{name}=={ver}"
        for name, ver in package_versions().items()
        if name in ("torch", "torchdiffeq", "snopt")
    ]


def _log_model(
    client: Any, tracking_uri: str, run_id: str, model: Any, name: str, pip_requirements: list[str] | None
) -> None:
    mlflow = _mlflow()
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    experiment_id = client.get_run(run_id).info.experiment_id
    with _use_tracking_uri(tracking_uri), _quiet_mlflow():
        logged = client.create_logged_model(experiment_id=experiment_id, name=name, source_run_id=run_id)
        mlflow.pytorch.log_model(
            model,
            name=name,
            model_id=logged.model_id,
            run_id=run_id,
            pip_requirements=pip_requirements or _model_requirements(),
            serialization_format="pickle",
        )


@contextlib.contextmanager
def _picklable(model: Any) -> Iterator[Any]:
    """The model without hooks and solver samplers (curvature collectors), restored afterwards."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for module in model.modules():
            for attr, value in list(vars(module).items()):
                if attr.startswith("_") and attr.endswith("hooks") and isinstance(value, dict) and value:
                    saved.append((module, attr, value))
                    setattr(module, attr, type(value)())
            for attr in ("sampler", "_run"):
                if getattr(module, attr, None) is not None and attr in vars(module):
                    saved.append((module, attr, vars(module)[attr]))
                    setattr(module, attr, None)
        yield model
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


# ------------------------------------------------------------------ the journal
class _Journal:
    """The local record of one run's operations while the tracking server is unreachable."""

    def __init__(self, directory: Path, header: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.local_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.path = directory / f"{self.local_id}.jsonl"
        self.files = directory / self.local_id
        self._lock = threading.Lock()
        self._n_files = 0
        self.closed = False
        self._write(
            {
                "format": _JOURNAL_FORMAT,
                "version": 1,
                "local_id": self.local_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                **header,
            }
        )

    def _write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, default=str)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def append(self, op: dict[str, Any]) -> None:
        self._write(op)

    def close(self) -> None:
        """Mark the journal complete: nothing more will be appended, a sync may replay it."""
        if not self.closed:
            self._write({"op": "close"})
            self.closed = True

    def stash(self, source: Path) -> str:
        """Copy a file or folder next to the journal; returns its path relative to the files folder."""
        self._n_files += 1
        rel = f"{self._n_files:04d}/{source.name}"
        dest = self.files / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest)
        else:
            shutil.copy2(source, dest)
        return rel

    def new_dir(self, name: str) -> tuple[Path, str]:
        self._n_files += 1
        rel = f"{self._n_files:04d}/{name}"
        (self.files / rel).parent.mkdir(parents=True, exist_ok=True)
        return self.files / rel, rel


class _RunSink:
    """Delivers one run's operations to MLflow, or to a journal once MLflow fails."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        fallback_dir: Path,
        run_id: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.fallback_dir = fallback_dir
        self.run_id = run_id
        self.journal: _Journal | None = None
        self.notes: list[str] = []
        self._client: Any = None
        self._lock = threading.RLock()

    @property
    def offline(self) -> bool:
        return self.journal is not None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _mlflow().MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def create_run(self, run_name: str | None, tags: dict[str, str]) -> str:
        """Create the run (online, or as the journal's first operation)."""
        tags = {k: _truncate(str(v), _MAX_TAG_LENGTH) for k, v in tags.items()}
        start = _now_ms()
        with self._lock:
            try:
                if tags.get(_PARENT_TAG, "").startswith(_OFFLINE_PREFIX):
                    # Its parent will get its id only when synced: the child waits with it.
                    raise ConnectionError(
                        f"the parent run {tags[_PARENT_TAG]} exists only in the local fallback"
                    )
                experiment_id = _experiment_for(self.client, self.experiment, tags, self.tracking_uri)
                run = self.client.create_run(experiment_id, start_time=start, tags=tags, run_name=run_name)
                self.run_id = run.info.run_id
                _mark_reachable(self.tracking_uri)
                return self.run_id
            except Exception as exc:
                self._go_offline(exc)
                assert self.journal is not None
                self.journal.append(
                    {"op": "create_run", "run_name": run_name, "tags": tags, "start_time": start}
                )
                self.run_id = _OFFLINE_PREFIX + self.journal.local_id
                return self.run_id

    def _go_offline(self, exc: BaseException) -> None:
        if self.journal is None:
            remote = self.run_id if self.run_id and not self.run_id.startswith(_OFFLINE_PREFIX) else None
            self.journal = _Journal(
                self.fallback_dir,
                {
                    "tracking_uri": self.tracking_uri,
                    "experiment": self.experiment,
                    "run_id": remote or self.run_id,
                    "created": _now_ms(),
                },
            )
            _warn_once(
                self.tracking_uri,
                f"MLflow tracking at {self.tracking_uri} failed ({_describe(exc)}). Training goes on; "
                f"this run is logged to the local fallback {self.journal.path} from now on. Replay it into "
                f"MLflow with `snopt tracking sync --dir {self.fallback_dir}` once the server is reachable.",
            )

    def submit(self, op: dict[str, Any]) -> None:
        """Apply ``op`` online, or journal it (files are copied next to the journal)."""
        with self._lock:
            if self.journal is None and self.run_id is not None:
                try:
                    self.notes += _apply(self.client, self.tracking_uri, self.run_id, op, None)
                    return
                except Exception as exc:
                    if _is_rejection(exc):
                        self.notes.append(f"{op['op']} refused: {_describe(exc)}")
                        _logger.warning(
                            "MLflow refused %s for run %s: %s", op["op"], self.run_id, _describe(exc)
                        )
                        return
                    self._go_offline(exc)
            assert self.journal is not None
            if op["op"] == "log_artifact":
                op = {**op, "path": self.journal.stash(Path(op["path"]))}
            self.journal.append(op)

    def log_batch(
        self,
        metrics: Sequence[tuple[str, float, int, int]] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Send metrics/params/tags in chunks within MLflow's per-request limits."""
        params = dict(params or {})
        tags = {k: _truncate(str(v), _MAX_TAG_LENGTH) for k, v in (tags or {}).items()}
        keys = list(params)
        for i in range(0, len(keys), _MAX_PARAMS_TAGS_PER_BATCH):
            self.submit(
                {
                    "op": "log_batch",
                    "params": {k: params[k] for k in keys[i : i + _MAX_PARAMS_TAGS_PER_BATCH]},
                }
            )
        keys = list(tags)
        for i in range(0, len(keys), _MAX_PARAMS_TAGS_PER_BATCH):
            self.submit(
                {"op": "log_batch", "tags": {k: tags[k] for k in keys[i : i + _MAX_PARAMS_TAGS_PER_BATCH]}}
            )
        metrics = list(metrics)
        for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
            self.submit(
                {"op": "log_batch", "metrics": [list(m) for m in metrics[i : i + _MAX_METRICS_PER_BATCH]]}
            )

    def close(self) -> None:
        """Close the journal, if the run went offline (it is then ready for a sync)."""
        if self.journal is not None:
            self.journal.close()

    def log_model(self, model: Any, name: str = "model") -> None:
        requirements = _model_requirements()
        with self._lock:
            if self.journal is None and self.run_id is not None:
                try:
                    with _picklable(model):
                        _log_model(self.client, self.tracking_uri, self.run_id, model, name, requirements)
                    return
                except Exception as exc:
                    if _is_rejection(exc):
                        self.notes.append(f"model refused: {_describe(exc)}")
                        return
                    if not _is_connection_problem(exc):
                        raise
                    self._go_offline(exc)
            assert self.journal is not None
            mlflow = _mlflow()
            dest, rel = self.journal.new_dir(name)
            with _picklable(model), _quiet_mlflow():
                mlflow.pytorch.save_model(
                    model, str(dest), pip_requirements=requirements, serialization_format="pickle"
                )
            self.journal.append(
                {"op": "log_model", "path": rel, "name": name, "pip_requirements": requirements}
            )


def _is_connection_problem(exc: BaseException) -> bool:
    """Errors raised by the tracking client (not by pickling the model, say)."""
    mlflow = sys.modules.get("mlflow")
    exc_types: tuple[type, ...] = (OSError, ConnectionError, TimeoutError)
    if mlflow is not None:
        from mlflow.exceptions import MlflowException

        exc_types = (*exc_types, MlflowException)
    try:
        import requests

        exc_types = (*exc_types, requests.RequestException)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, exc_types)


# ------------------------------------------------------------------------ sync
@dataclass
class SyncResult:
    """What :func:`sync_fallback` did with one journal.

    Attributes:
        journal: path of the journal file.
        status: ``"synced"`` (all replayed; the journal moved to ``synced/``), ``"failed"``
            (MLflow still unreachable; the replay resumes where it stopped next time),
            ``"waiting"`` (its parent run has not been synced yet) or ``"open"`` (its run is
            still going).
        run_id: the MLflow run the journal was replayed into (None if not created yet).
        operations: operations replayed by this call.
        error: why it stopped, when it did.
        notes: items the server refused (for example a param that already had another value).
    """

    journal: str
    status: str
    run_id: str | None = None
    operations: int = 0
    error: str = ""
    notes: list[str] = field(default_factory=list)


def _read_journal(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or lines[0].get("format") != _JOURNAL_FORMAT:
        raise ValueError(f"{path} is not a snopt tracking journal (no {_JOURNAL_FORMAT!r} header).")
    return lines[0], lines[1:]


def pending_journals(directory: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The journals in ``directory`` that still wait for a sync, with their headers and sizes."""
    directory = Path(directory) if directory is not None else default_fallback_dir()
    out: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.jsonl")):
        try:
            header, ops = _read_journal(path)
        except (ValueError, json.JSONDecodeError) as exc:
            out.append({"journal": str(path), "error": str(exc)})
            continue
        progress = _read_progress(path)
        out.append(
            {
                "journal": str(path),
                "tracking_uri": header.get("tracking_uri"),
                "experiment": header.get("experiment"),
                "run_id": progress.get("run_id") or header.get("run_id"),
                "operations": len(ops),
                "done": progress.get("done", 0),
            }
        )
    return out


def _progress_path(journal: Path) -> Path:
    return journal.with_name(journal.stem + ".progress.json")


def _read_progress(journal: Path) -> dict[str, Any]:
    path = _progress_path(journal)
    return json.loads(path.read_text()) if path.exists() else {}


def _write_progress(journal: Path, progress: dict[str, Any]) -> None:
    path = _progress_path(journal)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, path)


def _map_offline(value: str | None, id_map: Mapping[str, str]) -> str | None:
    if value and value.startswith(_OFFLINE_PREFIX):
        return id_map.get(value[len(_OFFLINE_PREFIX) :])
    return value


def _journal_is_live(header: Mapping[str, Any], ops: Sequence[Mapping[str, Any]]) -> bool:
    """A journal still being written: not closed, and its writer process is alive on this host."""
    if ops and ops[-1].get("op") == "close":
        return False
    if header.get("host") != socket.gethostname():
        return False  # a journal copied from another machine: its writer is not here
    pid = header.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # the writer crashed: replay what it wrote
    except PermissionError:
        return True
    return True


def sync_fallback(
    directory: str | os.PathLike | None = None,
    *,
    tracking_uri: str | None = None,
    journals: Iterable[str | os.PathLike] | None = None,
) -> list[SyncResult]:
    """Replay the runs of the local fallback into MLflow.

    Every journal is replayed into the run it belongs to (created on the server if the server
    was down when the run started, with its parent mapped).  A replay that stops (server still
    down) resumes where it stopped on the next call; metrics that were already sent are not
    duplicated.  Fully replayed journals are moved to ``<directory>/synced``.

    Journals of runs that are still going (their process is alive on this machine) are left
    alone (status ``"open"``); those of a process that died are replayed as far as they go.

    Args:
        directory: the fallback folder (default ``./snopt_runs/fallback``).
        tracking_uri: replay into this tracking URI instead of the one each run was meant for.
        journals: only these journal files of ``directory`` (default: all).

    Returns:
        One :class:`SyncResult` per journal.
    """
    directory = Path(directory) if directory is not None else default_fallback_dir()
    if not directory.exists():
        return []
    id_map_path = directory / "id_map.json"
    id_map: dict[str, str] = json.loads(id_map_path.read_text()) if id_map_path.exists() else {}
    synced_map_path = directory / "synced" / "id_map.json"
    if synced_map_path.exists():
        id_map = {**json.loads(synced_map_path.read_text()), **id_map}
    results = []
    with _short_http_retries():
        if journals is None:
            pending = sorted(directory.glob("*.jsonl"))
        else:
            pending = sorted(Path(j) for j in journals if Path(j).exists())
        # Parents before children: a journal may refer to a run another journal creates.
        while pending:
            waiting = []
            for path in pending:
                result = _replay(path, id_map, tracking_uri)
                if result.status == "waiting":
                    waiting.append(path)
                else:
                    results.append(result)
                id_map_path.write_text(json.dumps(id_map))  # _replay adds the runs it creates
            if len(waiting) == len(pending):
                break
            pending = waiting
        results += [SyncResult(str(p), "waiting", error="its parent run is not synced yet") for p in pending]
    return results


def _replay(path: Path, id_map: dict[str, str], tracking_uri: str | None) -> SyncResult:
    header, ops = _read_journal(path)
    if _journal_is_live(header, ops):
        return SyncResult(str(path), "open", error="its run is still being written")
    uri = tracking_uri or header["tracking_uri"]
    progress = _read_progress(path)
    done = int(progress.get("done", 0))
    run_id = progress.get("run_id") or header.get("run_id")
    result = SyncResult(str(path), "failed", run_id=None)
    if run_id and run_id.startswith(_OFFLINE_PREFIX):
        if run_id[len(_OFFLINE_PREFIX) :] == header["local_id"]:
            run_id = None  # this journal creates the run
        else:
            mapped = _map_offline(run_id, id_map)
            if mapped is None:
                return SyncResult(str(path), "waiting", error=f"run {run_id} is not synced yet")
            run_id = mapped
    if progress.get("run_id") and any(op["op"] == "create_run" for op in ops[:done]):
        id_map[header["local_id"]] = progress["run_id"]  # created by an earlier, interrupted sync
    client = _mlflow().MlflowClient(tracking_uri=uri)
    base = path.parent / header["local_id"]
    try:
        for index, op in enumerate(ops):
            if index < done:
                if op["op"] == "create_run" and run_id is None:
                    raise RuntimeError(f"{path}: progress says the run was created but records no run id.")
                continue
            if op["op"] == "close":
                pass
            elif op["op"] == "create_run":
                tags = dict(op.get("tags", {}))
                if _PARENT_TAG in tags:
                    parent = _map_offline(tags[_PARENT_TAG], id_map)
                    if parent is None:
                        return SyncResult(
                            str(path), "waiting", error=f"parent {tags[_PARENT_TAG]} is not synced yet"
                        )
                    tags[_PARENT_TAG] = parent
                experiment_id = _experiment_for(client, header["experiment"], tags, uri)
                run = client.create_run(
                    experiment_id, start_time=op.get("start_time"), tags=tags, run_name=op.get("run_name")
                )
                run_id = run.info.run_id
                id_map[header["local_id"]] = run_id
            else:
                if run_id is None:
                    raise RuntimeError(f"{path}: operation {index} comes before the run is created.")
                if op["op"] == "log_batch" and _PARENT_TAG in op.get("tags", {}):
                    parent = _map_offline(op["tags"][_PARENT_TAG], id_map)
                    if parent is None:
                        return SyncResult(
                            str(path),
                            "waiting",
                            run_id=run_id,
                            error=f"parent {op['tags'][_PARENT_TAG]} is not synced yet",
                        )
                    op = {**op, "tags": {**op["tags"], _PARENT_TAG: parent}}
                try:
                    result.notes += _apply(client, uri, run_id, op, base)
                except Exception as exc:
                    if not _is_rejection(exc):
                        raise
                    result.notes.append(f"operation {index} ({op['op']}) refused: {_describe(exc)}")
            done = index + 1
            result.operations += 1
            _write_progress(path, {"run_id": run_id, "done": done})
    except Exception as exc:
        result.error = _describe(exc)
        result.run_id = run_id
        return result
    _mark_reachable(uri)
    synced = path.parent / "synced"
    synced.mkdir(exist_ok=True)
    for item in (path, _progress_path(path), base):
        if item.exists():
            target = synced / item.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            shutil.move(str(item), str(target))
    result.status, result.run_id = "synced", run_id
    return result


# ------------------------------------------------------------------ system metrics
class _SystemSampler:
    """Samples MLflow's system-metric monitors in a thread and hands the values to ``emit``."""

    def __init__(self, emit: Callable[[dict[str, float], int], None], interval: float) -> None:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            import torch

            if torch.cuda.is_available():
                from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

                self.monitors.append(GPUMonitor())
        except Exception:  # noqa: BLE001 - no pynvml: no GPU metrics
            pass
        self.emit = emit
        self.interval = interval
        self.step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="snopt-system-metrics")

    def start(self) -> None:
        self._thread.start()

    def _sample(self) -> None:
        values: dict[str, float] = {}
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            except Exception:  # noqa: BLE001 - one failing monitor must not stop the others
                continue
        if values:
            self.emit({f"system/{k}": float(v) for k, v in values.items()}, self.step)
            self.step += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def _psutil_available() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------- figures
def _history_figures(history: Sequence[Mapping[str, float]], metric_name: str = "metric") -> dict[str, Any]:
    """Loss, metric, horizon and NFE curves of a history, as matplotlib figures (Agg)."""
    from matplotlib.figure import Figure

    figures: dict[str, Any] = {}
    if not history:
        return figures
    steps = [r["step"] for r in history]

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(r["step"], r[key]) for r in history if key in r and isinstance(r[key], (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, [r.get("train_loss", math.nan) for r in history], label="train_loss", lw=1)
    xs, ys = series("val_loss")
    if xs:
        ax.plot(xs, ys, "o-", label="val_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend()
    fig.tight_layout()
    figures["loss.png"] = fig

    xs, ys = series("metric")
    if xs:
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.add_subplot()
        ax.plot(xs, ys, "o-")
        ax.set_xlabel("step")
        ax.set_ylabel(metric_name)
        ax.set_title(f"validation {metric_name}")
        fig.tight_layout()
        figures["metric.png"] = fig

    control = [k for k in history[-1] if k.startswith("t1")]
    known = {
        "step",
        "epoch",
        "wall_time",
        "train_loss",
        "lr",
        "nfe_forward",
        "nfe_backward",
        "nfe_total",
        "steps_forward",
        "steps_backward",
        "val_loss",
        "metric",
    }
    extra = [
        k
        for k in history[-1]
        if k not in known and k not in control and isinstance(history[-1][k], (int, float))
    ]
    if control or extra:
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.add_subplot()
        for key in control + extra:
            xs, ys = series(key)
            ax.plot(xs, ys, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("value")
        ax.set_title("horizons T and control variables")
        ax.legend(fontsize="small")
        fig.tight_layout()
        figures["horizons.png"] = fig

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for key in ("nfe_forward", "nfe_backward"):
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("function evaluations per step")
    ax.set_title("NFE")
    ax.legend()
    fig.tight_layout()
    figures["nfe.png"] = fig
    return figures


# --------------------------------------------------------------------- callback
class MlflowCallback(Callback):
    """Log a training run to MLflow (see the module documentation for what is logged).

    Tracking failures never stop training: after one :class:`TrackingWarning` the run is
    kept in a local journal that :func:`sync_fallback` (``snopt tracking sync``) replays.

    Args:
        config: the resolved configuration (a :class:`snopt.RunConfig`, or any mapping),
            logged as params and as ``config.json``.
        tracking_uri: where to log (default: ``MLFLOW_TRACKING_URI``, else
            ``sqlite:///<cwd>/mlflow.db``).
        experiment: experiment name (created when missing).
        run_name: name of the run (default ``<task>-<optimizer>-<strategy>`` from the tags).
        tags: run tags, e.g. ``{"task": ..., "strategy": ..., "optimizer": ...}``.
        parent_run_id: nest the run under this run (a study or comparison).
        run_id: log into this existing run instead of creating one (default: the run of
            ``mlflow run`` when ``MLFLOW_RUN_ID`` is set).
        end_run: set the run's final status; default True, False for a run owned by
            ``mlflow.optuna.MlflowStorage``.
        log_model: log the final model with ``mlflow.pytorch.log_model``.
        log_checkpoint: log the last checkpoint file.
        log_figures: log loss/metric/T/NFE figures.
        system_metrics: sample system metrics (default: when psutil is installed).
        system_metrics_interval: seconds between system-metric samples.
        flush_every: send buffered metrics after this many steps.
        flush_interval: and after this many seconds.
        fallback_dir: where the journal goes when MLflow fails (default
            ``./snopt_runs/fallback``).
        sync_on_end: replay the journal once at the end of a run that went offline.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | Any = None,
        *,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        end_run: bool = True,
        log_model: bool = True,
        log_checkpoint: bool = True,
        log_figures: bool = True,
        system_metrics: bool | None = None,
        system_metrics_interval: float = 10.0,
        flush_every: int = 100,
        flush_interval: float = 15.0,
        fallback_dir: str | os.PathLike | None = None,
        sync_on_end: bool = True,
    ) -> None:
        if not isinstance(experiment, str) or not experiment.strip():
            raise ValueError(f"`experiment` must be a non-empty string, but got experiment={experiment!r}.")
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(
                f"`flush_every` must be a positive integer, but got flush_every={flush_every!r}."
            )
        for name, value in (
            ("flush_interval", flush_interval),
            ("system_metrics_interval", system_metrics_interval),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a positive number of seconds, but got {name}={value!r}.")
        if config is not None and not isinstance(config, Mapping) and not hasattr(config, "to_dict"):
            raise TypeError(f"`config` must be a mapping or have to_dict(), but got {type(config).__name__}.")
        self.config: dict[str, Any] | None = (
            None if config is None else dict(config.to_dict() if hasattr(config, "to_dict") else config)
        )
        self.tracking_uri = _resolve_uri(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.parent_run_id = parent_run_id
        self._attach_to = run_id
        # A top-level run started by `mlflow run` logs into that run (checked at the start).
        self._attach_to_env = run_id is None and parent_run_id is None
        self.end_run = end_run
        self.log_model = log_model
        self.log_checkpoint = log_checkpoint
        self.log_figures = log_figures
        self.system_metrics = _psutil_available() if system_metrics is None else bool(system_metrics)
        self.system_metrics_interval = float(system_metrics_interval)
        self.flush_every = flush_every
        self.flush_interval = float(flush_interval)
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else default_fallback_dir()
        self.sync_on_end = sync_on_end
        self.sink: _RunSink | None = None
        self.checkpoint: str | None = None
        self._pending: list[tuple[str, float, int, int]] = []
        self._pending_lock = threading.Lock()
        self._steps_since_flush = 0
        self._last_flush = time.monotonic()
        self._logged_step: int | None = None
        self._logged_keys: set[str] = set()
        self._start_step = 0
        self._sampler: _SystemSampler | None = None
        self._http: contextlib.ExitStack | None = None

    # ------------------------------------------------------------ public state
    @property
    def run_id(self) -> str | None:
        """The MLflow run id (``offline:<id>`` while the run only exists in the fallback)."""
        return None if self.sink is None else self.sink.run_id

    @property
    def offline(self) -> bool:
        """Whether the run is being written to the local fallback."""
        return self.sink is not None and self.sink.offline

    @property
    def journal(self) -> Path | None:
        """The fallback journal of this run, if it went offline."""
        return None if self.sink is None or self.sink.journal is None else self.sink.journal.path

    # ---------------------------------------------------------------- helpers
    def _default_tags(self, trainer: Trainer | None) -> dict[str, str]:
        tags: dict[str, str] = {"mlflow.source.name": "snopt", "mlflow.source.type": "LOCAL"}
        try:
            import getpass

            tags["mlflow.user"] = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name on some systems
            pass
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if trainer is not None:
            task = getattr(trainer.objective, "task", None)
            if task is not None:
                tags.setdefault("task", str(getattr(task, "name", type(task).__name__)))
                if getattr(task, "metric_name", None):
                    tags["metric_name"] = str(task.metric_name)
            tags.setdefault("optimizer", type(trainer.optimizer).__name__.lower())
        if self.parent_run_id:
            tags[_PARENT_TAG] = self.parent_run_id
        tags.update(self.tags)
        return tags

    def _params(self, trainer: Trainer | None) -> dict[str, str]:
        params: dict[str, str] = {}
        if trainer is not None:
            model = trainer.model
            params["model.class"] = type(model).__name__
            params["model.n_params"] = str(sum(p.numel() for p in model.parameters()))
            params["optimizer.class"] = type(trainer.optimizer).__name__
            group = trainer.optimizer.param_groups[0]
            for key, value in group.items():
                if key != "params" and isinstance(value, (int, float, str, bool, tuple, type(None))):
                    params[f"optimizer.{key}"] = _param_value(value)
            if trainer.controller is not None:
                params["controller.class"] = type(trainer.controller).__name__
            from ._ode import ode_blocks

            for name, block in ode_blocks(model):
                prefix = f"ode.{name or 'block'}"
                params[f"{prefix}.method"] = block.method
                params[f"{prefix}.rtol"] = str(block.rtol)
                params[f"{prefix}.atol"] = str(block.atol)
                params[f"{prefix}.adjoint"] = str(block.adjoint)
        if self.config is not None:
            params.update(flatten_params(self.config))
        for name, ver in package_versions().items():
            params[f"version.{name}"] = ver
        commit = git_commit()
        if commit:
            params["git_commit"] = commit
        return params

    def _run_name(self) -> str | None:
        if self.run_name:
            return self.run_name
        parts: list[Any] = [self.tags.get(k) for k in ("task", "optimizer", "strategy")]
        if self.config is not None:
            parts = [
                parts[0] or self.config.get("task"),
                parts[1] or self.config.get("optimizer"),
                parts[2] or self.config.get("control"),
            ]
        names = [str(p) for p in parts if p]
        return "-".join(names) if names else None

    def _add_metrics(self, values: Mapping[str, Any], step: int, timestamp: int | None = None) -> None:
        ts = _now_ms() if timestamp is None else timestamp
        rows = []
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                try:
                    value = float(value)  # 0-dim tensors, numpy scalars
                except (TypeError, ValueError):
                    continue
            rows.append((_metric_key(key), float(value), ts, int(step)))
        with self._pending_lock:
            self._pending.extend(rows)

    def flush(self) -> None:
        """Send the buffered metrics now."""
        if self.sink is None:
            return
        with self._pending_lock:
            pending, self._pending = self._pending, []
        if pending:
            self.sink.log_batch(pending)
        self._steps_since_flush = 0
        self._last_flush = time.monotonic()

    def _safely(self, what: str, fn: Callable[[], None]) -> None:
        """Run a logging step; a bug in it must not stop training."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - tracking never stops training
            warnings.warn(
                f"MLflow tracking could not {what}: {_describe(exc)}. Training goes on.",
                TrackingWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer) -> None:
        """Create (or attach to) the run and log params and tags."""
        self._http = contextlib.ExitStack()
        self._http.enter_context(_short_http_retries())
        self._start_step = int(trainer.step)
        if self._attach_to is None and self._attach_to_env:
            self._attach_to = _mlflow_run_env(self.tracking_uri)
        self._logged_step, self._logged_keys = None, set()
        with self._pending_lock:
            self._pending = []
        self._resume_from_checkpoint(trainer)
        self.sink = _RunSink(
            self.tracking_uri, self.experiment, fallback_dir=self.fallback_dir, run_id=self._attach_to
        )
        tags = self._default_tags(trainer)
        if self._attach_to is None:
            self.sink.create_run(self._run_name(), tags)
        else:
            tags.pop("mlflow.user", None)
        params = self._params(trainer)
        self.sink.log_batch(params=params, tags=tags if self._attach_to is not None else {})
        if self.system_metrics:
            try:
                self._sampler = _SystemSampler(self._system_metrics, self.system_metrics_interval)
                self._sampler.start()
            except Exception as exc:  # noqa: BLE001 - system metrics are optional
                _logger.info("No system metrics: %s", _describe(exc))
                self._sampler = None

    def _system_metrics(self, values: dict[str, float], step: int) -> None:
        self._add_metrics(values, step)

    def _resume_from_checkpoint(self, trainer: Trainer) -> None:
        # A resumed run continues the MLflow run its checkpoint belongs to.
        path = getattr(trainer, "checkpoint_path", None)
        if self._attach_to is not None or path is None or trainer.step == 0:
            return
        side = Path(str(path) + ".mlflow.json")
        try:
            info = json.loads(side.read_text())
        except (OSError, ValueError):
            return
        if info.get("tracking_uri") == self.tracking_uri and info.get("run_id"):
            run_id = str(info["run_id"])
            if not run_id.startswith(_OFFLINE_PREFIX):
                self._attach_to = run_id

    def on_step_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        """Buffer the step's metrics; flush every ``flush_every`` steps or ``flush_interval`` s."""
        step = int(record["step"])
        if self._logged_step != step:
            self._logged_step, self._logged_keys = step, set()
        values = {k: v for k, v in record.items() if k != "step" and k not in self._logged_keys}
        self._logged_keys.update(values)
        self._add_metrics(values, step)
        self._steps_since_flush += 1
        if (
            self._steps_since_flush >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_interval
        ):
            self._safely("send metrics", self.flush)

    def on_evaluate(self, trainer: Trainer, record: dict[str, float]) -> None:
        """Log ``val_loss`` and ``metric`` at the record's step and flush."""
        step = int(record["step"])
        if self._logged_step != step:
            self._logged_step, self._logged_keys = step, set()
        values: dict[str, Any] = {k: record[k] for k in ("val_loss", "metric") if k in record}
        self._logged_keys.update(values)
        self._add_metrics(values, step)
        self._safely("send metrics", self.flush)

    def on_checkpoint(self, trainer: Trainer, path: str) -> None:
        """Remember the checkpoint (logged at the end) and note the run id next to it."""
        self.checkpoint = path
        self._safely("send metrics", self.flush)
        if self.sink is not None and self.sink.run_id:
            try:
                Path(path + ".mlflow.json").write_text(
                    json.dumps({"run_id": self.sink.run_id, "tracking_uri": self.tracking_uri})
                )
            except OSError:
                pass

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        """Flush, log stats, tags, artifacts and the model, and end the run with its status."""
        try:
            if self._sampler is not None:
                self._sampler.stop()
                self._sampler = None
            if self.sink is None:
                return
            self._catch_up(result.history)
            self._safely("send metrics", self.flush)
            self._safely("log the final stats", lambda: self._log_end(trainer, result))
            self._safely("log artifacts", lambda: self._log_artifacts(trainer, result))
            if self.log_model and result.status in ("completed", "interrupted"):
                self._safely("log the model", lambda: self.sink.log_model(trainer.model))  # type: ignore[union-attr]
            if self.end_run:
                status = _STATUS.get(result.status, "FAILED")
                self._safely(
                    "end the run",
                    lambda: self.sink.submit(  # type: ignore[union-attr]
                        {
                            "op": "terminate",
                            "status": status,
                            "end_time": _now_ms(),
                            "quiet": self.parent_run_id is not None,
                        }
                    ),
                )
            if self.sink.notes:
                _logger.warning(
                    "MLflow refused some items of run %s: %s", self.sink.run_id, "; ".join(self.sink.notes)
                )
            self.sink.close()
            if self.sink.offline and self.sync_on_end:
                self._try_sync()
        finally:
            if self._http is not None:
                self._http.close()
                self._http = None

    def _catch_up(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Log what the hooks did not see: a step that raised (a pruned trial's last evaluation)."""
        last = self._logged_step
        for record in reversed(history):
            step = int(record["step"])
            if step < (last if last is not None else self._start_step + 1):
                break
            if step == last:
                values = {k: v for k, v in record.items() if k != "step" and k not in self._logged_keys}
            else:
                values = {k: v for k, v in record.items() if k != "step"}
            if values:
                self._add_metrics(values, step)

    def _try_sync(self) -> None:
        assert self.sink is not None and self.sink.journal is not None
        try:
            results = sync_fallback(self.fallback_dir, journals=[self.sink.journal.path])
        except Exception as exc:  # noqa: BLE001 - the journal stays for a later sync
            _logger.info("Sync of %s failed: %s", self.sink.journal.path, _describe(exc))
            return
        for res in results:
            if res.journal == str(self.sink.journal.path) and res.status == "synced":
                _logger.info("Run replayed into MLflow as %s.", res.run_id)
                self.sink.run_id = res.run_id

    def _log_end(self, trainer: Trainer, result: FitResult) -> None:
        assert self.sink is not None
        step = int(result.stats.get("steps", trainer.step))
        stats: dict[str, Any] = {}
        for key, value in result.stats.items():
            if isinstance(value, Mapping):
                for sub, v in value.items():
                    stats[f"stats/{key}/{sub}"] = v
            else:
                stats[f"stats/{key}"] = value
        self._add_metrics(stats, step)
        self.flush()
        tags = {"snopt.status": result.status}
        if result.message:
            tags["snopt.message"] = result.message
            tags["mlflow.note.content"] = f"**{result.status}**: {result.message}"
        self.sink.log_batch(tags=tags)

    def _log_artifacts(self, trainer: Trainer, result: FitResult) -> None:
        assert self.sink is not None
        with tempfile.TemporaryDirectory(prefix="snopt-mlflow-") as tmp:
            folder = Path(tmp)
            config = {"config": self.config, "versions": package_versions(), "git_commit": git_commit()}
            (folder / "config.json").write_text(json.dumps(_jsonable(config), indent=2, default=str))
            self.sink.submit(
                {"op": "log_artifact", "path": str(folder / "config.json"), "artifact_path": None}
            )
            (folder / "result.json").write_text(
                json.dumps(_jsonable(result.to_dict()), indent=2, default=str)
            )
            self.sink.submit(
                {"op": "log_artifact", "path": str(folder / "result.json"), "artifact_path": None}
            )
            if self.log_figures and result.history:
                task = getattr(trainer.objective, "task", None)
                figures = _history_figures(result.history, getattr(task, "metric_name", None) or "metric")
                fig_dir = folder / "figures"
                fig_dir.mkdir()
                for name, fig in figures.items():
                    fig.savefig(fig_dir / name)
                self.sink.submit({"op": "log_artifact", "path": str(fig_dir), "artifact_path": "figures"})
            checkpoint = self.checkpoint or result.checkpoint
            if self.log_checkpoint and checkpoint and Path(checkpoint).exists():
                self.sink.submit({"op": "log_artifact", "path": checkpoint, "artifact_path": "checkpoint"})


# ---------------------------------------------------------------------- studies
def _optuna_study(study: Any) -> Any:
    """The ``optuna.Study`` inside a :class:`snopt.search.Study` (or the study itself)."""
    inner = getattr(study, "__dict__", {}).get("study")
    return inner if inner is not None and hasattr(inner, "_study_id") else study


def _study_storage(study: Any) -> Any:
    storage = getattr(_optuna_study(study), "_storage", None)
    return getattr(storage, "_backend", storage)


def _is_mlflow_storage(storage: Any) -> bool:
    return any(
        cls.__name__ == "MlflowStorage" and cls.__module__.startswith("mlflow.")
        for cls in type(storage).__mro__
    )


def parent_run_id(study: Any) -> str | None:
    """The MLflow parent run of an Optuna study (set by :func:`start_parent_run`), or None."""
    if _is_mlflow_storage(_study_storage(study)):
        return str(_optuna_study(study)._study_id)
    value = study.user_attrs.get(PARENT_RUN_ATTR)
    return str(value) if value else None


def start_parent_run(
    study: Any = None,
    *,
    name: str | None = None,
    kind: str = "study",
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    fallback_dir: str | os.PathLike | None = None,
    nest_under: str | None = None,
) -> str:
    """Create the parent run of a study or comparison (or find the one a worker should join).

    With an Optuna ``study`` whose user attributes already hold :data:`PARENT_RUN_ATTR`
    (another worker started it), that run id is returned and nothing is created; otherwise the
    new run's id is stored there, with the tracking URI and experiment, so that every worker
    nests its trials under the same parent.  A study stored in ``mlflow.optuna.MlflowStorage``
    is its own parent run.  Inside ``mlflow run`` (``MLFLOW_RUN_ID`` set) that run is the parent.

    Args:
        study: the Optuna study (optional for a comparison of several studies).
        name: run name (default: the study's name).
        kind: ``"study"`` or ``"comparison"`` (tag ``snopt.kind``).
        tracking_uri: as for :class:`MlflowCallback`.
        experiment: experiment name.
        tags: extra tags.
        params: params of the study (budget, strategies, search space...), flattened.
        fallback_dir: where the run goes if MLflow is unreachable.
        nest_under: make this run a child of that run (a study inside a comparison).

    Returns:
        The parent run id (``offline:<id>`` while it only exists in the local fallback).
    """
    if kind not in ("study", "comparison"):
        raise ValueError(f"`kind` must be 'study' or 'comparison', but got kind={kind!r}.")
    if study is not None:
        existing = parent_run_id(study)
        if existing:
            return existing
    uri = _resolve_uri(tracking_uri)
    sink = _RunSink(
        uri,
        experiment,
        fallback_dir=Path(fallback_dir) if fallback_dir else default_fallback_dir(),
        run_id=None if nest_under else _mlflow_run_env(uri),
    )
    all_tags = {"snopt.kind": kind, "mlflow.source.name": "snopt", "mlflow.source.type": "LOCAL"}
    if nest_under:
        all_tags[_PARENT_TAG] = nest_under
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    if study is not None:
        all_tags["optuna.study_name"] = study.study_name
    all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    with _short_http_retries():
        if sink.run_id is None:
            run_id = sink.create_run(name or (study.study_name if study is not None else None), all_tags)
        else:
            run_id = sink.run_id
            sink.log_batch(tags=all_tags)
        flat = flatten_params(params or {})
        flat.update({f"version.{k}": v for k, v in package_versions().items()})
        sink.log_batch(params=flat)
        sink.close()
    if study is not None:
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        study.set_user_attr(TRACKING_URI_ATTR, uri)
        study.set_user_attr(EXPERIMENT_ATTR, experiment)
        # Two workers that started at once: the attribute written last wins for everyone.
        winner = study.user_attrs.get(PARENT_RUN_ATTR, run_id) if hasattr(study, "user_attrs") else run_id
        if winner != run_id:
            end_parent_run(run_id, status="KILLED", tracking_uri=uri, quiet=True)
            return str(winner)
    return run_id


def _parent_sink(run_id: str, tracking_uri: str | None, fallback_dir: str | os.PathLike | None) -> _RunSink:
    uri = _resolve_uri(tracking_uri)
    fallback = Path(fallback_dir) if fallback_dir else default_fallback_dir()
    sink = _RunSink(uri, DEFAULT_EXPERIMENT, fallback_dir=fallback, run_id=run_id)
    if run_id.startswith(_OFFLINE_PREFIX):
        # The parent only exists in the fallback: record what happens to it there too.
        sink.journal = _Journal(
            fallback,
            {"tracking_uri": uri, "experiment": DEFAULT_EXPERIMENT, "run_id": run_id, "created": _now_ms()},
        )
    return sink


def end_parent_run(
    run_id: str,
    status: str = "FINISHED",
    *,
    tracking_uri: str | None = None,
    fallback_dir: str | os.PathLike | None = None,
    quiet: bool = False,
) -> None:
    """End a parent run with ``status`` (``FINISHED``, ``FAILED`` or ``KILLED``).

    Args:
        run_id: the run.
        status: its final status.
        tracking_uri: as for :class:`MlflowCallback`.
        fallback_dir: where the status goes if MLflow is unreachable.
        quiet: do not print MLflow's link to the run.
    """
    if status not in _TERMINAL:
        raise ValueError(f"`status` must be one of {list(_TERMINAL)}, but got status={status!r}.")
    if os.environ.get("MLFLOW_RUN_ID") == run_id:
        return  # `mlflow run` ends its own run from the exit code
    with _short_http_retries():
        sink = _parent_sink(run_id, tracking_uri, fallback_dir)
        sink.submit({"op": "terminate", "status": status, "end_time": _now_ms(), "quiet": quiet})
        sink.close()


class StudyTracker:
    """MLflow runs of a study or a comparison: a parent run and a nested run per trial.

    A comparison gets one parent run, one child run per study (strategy and seed) and one
    grandchild per trial; a single study gets a parent run and one child per trial.  The
    tracker is picklable (it holds only names and ids), so it can be handed to worker
    processes as ``trial_callbacks_factory``; a worker that loads the study from its storage
    finds the run ids in the study's user attributes (:data:`PARENT_RUN_ATTR`).

    Use it with :func:`snopt.search.compare`::

        with StudyTracker(kind="comparison", name="digits", params={...}) as tracker:
            report = compare(..., **tracker.hooks())

    and with one study (``snopt search``)::

        with StudyTracker(kind="study", name=study.study_name) as tracker:
            tracker.start(study)  # records the parent run in the study, for its workers
            study.optimize(...)   # the study's objective uses tracker as trial_callbacks_factory
            tracker.on_study_end(study)

    The context manager starts the parent run and ends it ``FINISHED``, ``FAILED`` on an
    exception or ``KILLED`` on Ctrl-C (:meth:`start` and :meth:`end` do the same by hand).

    Args:
        kind: ``"comparison"`` or ``"study"``.
        name: name of the parent run.
        tracking_uri: as for :class:`MlflowCallback`.
        experiment: experiment name.
        tags: tags of the parent run and of every trial run.
        params: params of the parent run (budget, strategies, base configuration...).
        log_models: log each trial's final model (off by default: studies run many trials).
        parent_run_id: an existing parent run to use instead of creating one.
        fallback_dir: where runs go if MLflow is unreachable.
        **callback_kwargs: further :class:`MlflowCallback` arguments for the trial runs
            (``log_figures`` is off by default for trials).
    """

    def __init__(
        self,
        *,
        kind: str = "comparison",
        name: str | None = None,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        log_models: bool = False,
        parent_run_id: str | None = None,
        fallback_dir: str | os.PathLike | None = None,
        **callback_kwargs: Any,
    ) -> None:
        if kind not in ("study", "comparison"):
            raise ValueError(f"`kind` must be 'study' or 'comparison', but got kind={kind!r}.")
        valid = set(inspect.signature(MlflowCallback.__init__).parameters) - {
            "self", "config", "tracking_uri", "experiment", "tags", "parent_run_id", "run_id", "log_model",
            "fallback_dir",
        }  # fmt: skip
        unknown = sorted(set(callback_kwargs) - valid)
        if unknown:
            raise ValueError(f"Unknown StudyTracker arguments {unknown}; valid ones are {sorted(valid)}.")
        self.kind = kind
        self.name = name
        self.tracking_uri = _resolve_uri(tracking_uri)
        self.experiment = experiment
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.params = dict(params or {})
        self.log_models = log_models
        # Under `mlflow run`, that run is the parent unless told otherwise.
        env_run = os.environ.get("MLFLOW_RUN_ID") or None
        self.parent_run_id = parent_run_id or env_run
        self._from_env = parent_run_id is None and env_run is not None
        self._owns_parent = False  # set when start() creates the run
        self.fallback_dir = str(fallback_dir) if fallback_dir is not None else None
        # Per-trial figures repeat what the UI charts from the metrics; studies run many trials.
        callback_kwargs.setdefault("log_figures", False)
        self.callback_kwargs = callback_kwargs

    @classmethod
    def for_study(cls, study: Any, **kwargs: Any) -> StudyTracker | None:
        """The tracker of a worker that joins ``study`` (None if the study is not tracked)."""
        parent = parent_run_id(study)
        if parent is None:
            return None
        attrs = study.user_attrs
        kwargs.setdefault("tracking_uri", attrs.get(TRACKING_URI_ATTR))
        kwargs.setdefault("experiment", attrs.get(EXPERIMENT_ATTR) or DEFAULT_EXPERIMENT)
        return cls(kind="study", parent_run_id=parent, **kwargs)

    # ------------------------------------------------------------ parent runs
    def start(self, study: Any = None) -> str:
        """Create (or find) the parent run; with ``study``, record it in the study for workers."""
        if study is not None and self.kind == "study":
            existing = parent_run_id(study)
            if existing is not None:
                self.parent_run_id = existing
                return existing
            if self.parent_run_id is not None and not self._from_env:
                study.set_user_attr(PARENT_RUN_ATTR, self.parent_run_id)
                study.set_user_attr(TRACKING_URI_ATTR, self.tracking_uri)
                study.set_user_attr(EXPERIMENT_ATTR, self.experiment)
                return self.parent_run_id
        elif self.parent_run_id is not None and not self._from_env:
            return self.parent_run_id
        # Creates the run, or (under `mlflow run`) logs the tags and params on that run.
        self.parent_run_id = start_parent_run(
            study if self.kind == "study" else None,
            name=self.name,
            kind=self.kind,
            tracking_uri=self.tracking_uri,
            experiment=self.experiment,
            tags=self.tags,
            params=self.params,
            fallback_dir=self.fallback_dir,
        )
        self._owns_parent = self.parent_run_id != os.environ.get("MLFLOW_RUN_ID")
        self._from_env = False
        return self.parent_run_id

    def end(self, status: str = "FINISHED") -> None:
        """End the parent run (if this tracker created it); replay it if it went to the fallback."""
        if self.parent_run_id is not None and self._owns_parent:
            end_parent_run(
                self.parent_run_id, status, tracking_uri=self.tracking_uri, fallback_dir=self.fallback_dir
            )
            if self.parent_run_id.startswith(_OFFLINE_PREFIX):
                # Try once to replay the study now; `snopt tracking sync` does it later otherwise.
                try:
                    sync_fallback(self.fallback_dir)
                except Exception as exc:  # noqa: BLE001 - the journals stay for a later sync
                    _logger.info("Sync of the fallback failed: %s", _describe(exc))

    def __enter__(self) -> StudyTracker:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # ---------------------------------------------------------- study hooks
    def on_study_start(self, study: Any) -> None:
        """A comparison: a child run for ``study``; a single study: the parent run itself."""
        if self.kind == "study":
            self.start(study)
            return
        if parent_run_id(study) is not None:
            return  # resumed study: keep its run
        parent = self.start()
        desc = study.user_attrs.get("snopt", {}) if hasattr(study, "user_attrs") else {}
        tags = dict(self.tags)
        for key in ("strategy", "seed"):
            value = getattr(study, key, None) if getattr(study, key, None) is not None else desc.get(key)
            if value is not None:
                tags[key] = str(value)
        start_parent_run(
            study,
            name=study.study_name,
            kind="study",
            tracking_uri=self.tracking_uri,
            experiment=self.experiment,
            tags=tags,
            params={k: desc[k] for k in ("budget", "sampler", "pruner") if desc.get(k) is not None},
            fallback_dir=self.fallback_dir,
            nest_under=parent,
        )

    def on_study_end(self, study: Any) -> None:
        """Log the study's outcome on its run; end it when it is a comparison's child."""
        run_id = parent_run_id(study)
        if run_id is None:
            return
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = {
            "trials": len(trials),
            "trials_complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "trials_failed": sum(t.state == TrialState.FAIL for t in trials),
        }
        metrics: dict[str, float] = {k: float(v) for k, v in counts.items()}
        tags: dict[str, str] = {}
        if counts["trials_complete"]:
            best = study.best_trial
            metrics["best_value"] = float(best.value)
            tags["best_trial"] = str(best.number)
            tags["best_params"] = _truncate(json.dumps(best.params, default=str), _MAX_TAG_LENGTH)
        log_report(run_id, metrics=metrics, tags=tags, tracking_uri=self.tracking_uri,
                   fallback_dir=self.fallback_dir)  # fmt: skip
        if self.kind == "comparison" and run_id != self.parent_run_id:
            end_parent_run(
                run_id, "FINISHED", tracking_uri=self.tracking_uri, fallback_dir=self.fallback_dir, quiet=True
            )

    def on_report(self, report: Any) -> None:
        """Log the comparison report (table, figures, Markdown/JSON files) on the parent run."""
        log_report(self.start(), report, tracking_uri=self.tracking_uri, fallback_dir=self.fallback_dir)

    # --------------------------------------------------------------- trials
    def callback(self, trial: Any = None, config: Mapping[str, Any] | Any = None) -> MlflowCallback:
        """A fresh :class:`MlflowCallback` for one trial, nested under its study's run.

        A study that records its parent run (see :func:`start_parent_run`) also records where
        that run lives; the trial run goes there, whichever worker runs the trial.
        """
        parent = self.parent_run_id
        uri, experiment = self.tracking_uri, self.experiment
        tags = dict(self.tags)
        tags["snopt.kind"] = "trial"
        kwargs = dict(self.callback_kwargs)
        run_name = kwargs.pop("run_name", None)
        cfg: dict[str, Any] | None = None
        if config is not None:
            cfg = dict(config.to_dict() if hasattr(config, "to_dict") else config)
            for key, name in (("task", "task"), ("optimizer", "optimizer")):
                if cfg.get(key) is not None:
                    tags.setdefault(name, str(cfg[key]))
        if trial is not None:
            tags["optuna.trial_number"] = str(trial.number)
            strategy = (getattr(trial, "user_attrs", None) or {}).get("strategy")
            if strategy:
                tags["strategy"] = str(strategy)
            study = getattr(trial, "study", None)
            if study is not None:
                tags["optuna.study_name"] = study.study_name
                recorded = parent_run_id(study)
                if recorded is not None:
                    attrs = study.user_attrs
                    parent = recorded
                    uri = attrs.get(TRACKING_URI_ATTR) or uri
                    experiment = attrs.get(EXPERIMENT_ATTR) or experiment
                if _is_mlflow_storage(_study_storage(study)):
                    kwargs["run_id"] = str(trial._trial_id)
                    kwargs.setdefault("end_run", False)
            if getattr(trial, "params", None):
                cfg = dict(cfg or {})
                cfg["trial"] = dict(trial.params)
            prefix = tags.get("strategy")
            run_name = run_name or (f"{prefix}-trial-{trial.number}" if prefix else f"trial-{trial.number}")
        return MlflowCallback(
            cfg,
            tracking_uri=uri,
            experiment=experiment,
            run_name=run_name,
            tags=tags,
            parent_run_id=parent,
            log_model=self.log_models,
            fallback_dir=self.fallback_dir,
            **kwargs,
        )

    def __call__(self, trial: Any = None, config: Mapping[str, Any] | Any = None) -> list[Callback]:
        """``trial_callbacks_factory(trial, config)`` of :mod:`snopt.search`: ``[callback]``."""
        return [self.callback(trial, config)]

    def hooks(self) -> dict[str, Any]:
        """The keyword arguments that make :func:`snopt.search.compare` log to this tracker."""
        return {
            "trial_callbacks_factory": self,
            "on_study_start": self.on_study_start,
            "on_study_end": self.on_study_end,
            "on_report": self.on_report,
        }


def study_tracker(
    args: argparse.Namespace,
    *,
    kind: str = "study",
    name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> StudyTracker | None:
    """The :class:`StudyTracker` that parsed CLI ``args`` ask for (None with ``--no-tracking``).

    Args:
        args: parsed arguments with the flags of :func:`add_tracking_arguments`.
        kind: ``"study"`` (``snopt search``, ``snopt worker``) or ``"comparison"``.
        name: name of the parent run (``--run-name`` wins).
        tags: tags of the parent run and of every trial run.
        params: params of the parent run (strategies, budget, base configuration...).
    """
    if not tracking_enabled(args):
        return None
    return StudyTracker(
        kind=kind,
        name=getattr(args, "run_name", None) or name,
        tracking_uri=getattr(args, "tracking_uri", None),
        experiment=getattr(args, "experiment", None) or DEFAULT_EXPERIMENT,
        tags=tags,
        params=params,
    )


def tracking_callback_factory(
    parent_run_id: str | None,
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tags: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> StudyTracker:
    """A picklable factory of fresh per-trial callbacks nested under ``parent_run_id``.

    Args:
        parent_run_id: the parent run (from :func:`start_parent_run` or :func:`parent_run_id`).
        tracking_uri: as for :class:`MlflowCallback`.
        experiment: experiment name.
        tags: tags of every trial run.
        **kwargs: further :class:`StudyTracker` arguments (``log_models=True``...).

    Returns:
        A :class:`StudyTracker`: ``factory(trial, config)`` gives ``[MlflowCallback]`` (the form
        ``snopt.search`` expects) and ``factory.callback(trial, config)`` the callback itself.
        A trial of a study that records its own parent run (a comparison's study) nests under
        that run; a trial of a study stored in ``mlflow.optuna.MlflowStorage`` logs into the
        trial's own run.
    """
    return StudyTracker(
        kind="study",
        parent_run_id=parent_run_id,
        tracking_uri=tracking_uri,
        experiment=experiment,
        tags=tags,
        **kwargs,
    )


def _report_part(report: Any, key: str) -> Any:
    if report is None:
        return None
    if isinstance(report, Mapping):
        return report.get(key)
    return getattr(report, key, None)


def log_report(
    parent_run_id: str,
    report: Any = None,
    *,
    table: Any = None,
    figures: Mapping[str, Any] | None = None,
    files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    artifact_dir: str = "report",
    fallback_dir: str | os.PathLike | None = None,
) -> None:
    """Log a comparison or study report on its parent run.

    The parts come from the keyword arguments or, where those are None, from ``report``
    (a mapping or an object with the same names: ``table``/``rows``, ``figures``, ``files``
    (a list, or a mapping of names to paths), ``metrics``; a ``snopt.search.ComparisonReport``
    gives its ``summary()`` rows, its studies, its ``target`` and each strategy's best as
    ``best/<strategy>``).  A table (a list of row dicts, a dict of columns or a DataFrame) goes
    through ``MlflowClient.log_table`` as ``<artifact_dir>/summary.json`` (shown in the UI's
    artifact view and usable with ``mlflow.load_table``); figures (matplotlib figures or image
    paths, by file name) go to ``<artifact_dir>/figures``; files (Markdown, JSON, folders) to
    ``<artifact_dir>``; metrics are logged on the parent.  A report with ``to_dict()`` is also
    saved as ``<artifact_dir>/report.json``.

    Args:
        parent_run_id: the parent run.
        report: the report object or mapping.
        table, figures, files, metrics, tags: the parts (see above).
        tracking_uri: as for :class:`MlflowCallback`.
        artifact_dir: artifact folder of the report.
        fallback_dir: where the report goes if MLflow is unreachable.
    """
    table = table if table is not None else (_report_part(report, "table") or _report_part(report, "rows"))
    studies = None
    if table is None and callable(getattr(report, "summary", None)):
        # A snopt.search.ComparisonReport: one row per strategy, and one per study.
        table = report.summary()
        # Per-trial curves stay in report.json; the table keeps one line per study.
        studies = [
            {k: v for k, v in _jsonable(getattr(s, "__dict__", s)).items() if k not in ("curve", "trials")}
            for s in getattr(report, "studies", [])
        ] or None
        if metrics is None:
            metrics = {}
            if isinstance(getattr(report, "target", None), (int, float)):
                metrics["target"] = float(report.target)
            for row in table:
                if isinstance(row.get("best"), (int, float)) and row.get("strategy"):
                    metrics[f"best/{row['strategy']}"] = float(row["best"])
    figures = figures if figures is not None else _report_part(report, "figures")
    files = files if files is not None else _report_part(report, "files")
    metrics = metrics if metrics is not None else _report_part(report, "metrics")
    if isinstance(files, Mapping):  # e.g. ComparisonReport.files: name -> path
        files = list(files.values())
    paths = [Path(p) for p in (files or ())]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"`files` names paths that do not exist: {missing}.")
    sink = _parent_sink(parent_run_id, tracking_uri, fallback_dir)
    with _short_http_retries(), tempfile.TemporaryDirectory(prefix="snopt-report-") as tmp:
        try:
            folder = Path(tmp)
            if table is not None:
                data = _table_data(table)
                sink.submit(
                    {"op": "log_table", "data": data, "artifact_file": f"{artifact_dir}/summary.json"}
                )
            if studies:
                data = _table_data(studies)
                sink.submit(
                    {"op": "log_table", "data": data, "artifact_file": f"{artifact_dir}/studies.json"}
                )
            if hasattr(report, "to_dict"):
                text = json.dumps(_jsonable(report.to_dict()), indent=2, default=str)
                (folder / "report.json").write_text(text)
                sink.submit(
                    {"op": "log_artifact", "path": str(folder / "report.json"), "artifact_path": artifact_dir}
                )
            if figures:
                fig_dir = folder / "figures"
                fig_dir.mkdir()
                for fname, fig in dict(figures).items():
                    target = fig_dir / Path(fname if Path(fname).suffix else f"{fname}.png").name
                    if isinstance(fig, (str, os.PathLike)):
                        shutil.copy2(fig, target)
                    else:
                        fig.savefig(target)
                sink.submit(
                    {"op": "log_artifact", "path": str(fig_dir), "artifact_path": f"{artifact_dir}/figures"}
                )
            for path in paths:
                sink.submit({"op": "log_artifact", "path": str(path), "artifact_path": artifact_dir})
            if metrics or tags:
                ts = _now_ms()
                rows = [(_metric_key(k), float(v), ts, 0) for k, v in (metrics or {}).items()]
                sink.log_batch(rows, tags={str(k): str(v) for k, v in (tags or {}).items()})
        finally:
            sink.close()


def _table_data(table: Any) -> dict[str, list[Any]]:
    """A table as a dict of columns, the form ``log_table`` accepts without pandas tricks."""
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # a DataFrame
        table = table.to_dict(orient="list")

    def cell(value: Any) -> Any:
        value = _jsonable(value)
        return json.dumps(value, default=str) if isinstance(value, (dict, list)) else value

    if isinstance(table, Mapping):
        return {str(k): [cell(v) for v in col] for k, col in table.items()}
    rows = [dict(r) for r in table]
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    return {c: [cell(r.get(c)) for r in rows] for c in cols}


# --------------------------------------------------------------------------- CLI
def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--tracking-uri``, ``--experiment``, ``--run-name`` and ``--no-tracking``."""
    g = parser.add_argument_group("MLflow tracking")
    g.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    g.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    g.add_argument("--run-name", default=None, help="MLflow run name (default: task-optimizer-strategy)")
    g.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def tracking_enabled(args: argparse.Namespace) -> bool:
    """Whether the parsed arguments ask for tracking."""
    return not getattr(args, "no_tracking", False)


def tracking_callbacks(
    args: argparse.Namespace, config_dict: Mapping[str, Any] | Any, tags: Mapping[str, Any] | None = None
) -> list[Callback]:
    """The tracking callbacks that the parsed ``args`` ask for (empty with ``--no-tracking``).

    Args:
        args: parsed arguments with the flags of :func:`add_tracking_arguments`.
        config_dict: the resolved configuration (a mapping or :class:`snopt.RunConfig`).
        tags: run tags, e.g. ``{"task": ..., "strategy": ..., "optimizer": ...}``.
    """
    if not tracking_enabled(args):
        return []
    return [
        MlflowCallback(
            config_dict,
            tracking_uri=getattr(args, "tracking_uri", None),
            experiment=getattr(args, "experiment", None) or DEFAULT_EXPERIMENT,
            run_name=getattr(args, "run_name", None),
            tags=tags,
        )
    ]


class UiCommand(Command):
    """``snopt ui``: start the MLflow UI on the local store and print its URL."""

    name = "ui"
    help = "start the MLflow UI for the local tracking store (127.0.0.1 unless --host)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare ``--backend-store-uri``, ``--host``, ``--port`` and ``--artifacts-destination``."""
        parser.add_argument(
            "--backend-store-uri",
            "--tracking-uri",
            dest="backend_store_uri",
            default=None,
            metavar="URI",
            help="store to show (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
        )
        parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it)")
        parser.add_argument("--port", type=int, default=5000, help="port")
        parser.add_argument(
            "--artifacts-destination",
            default=None,
            metavar="URI",
            help="artifact store of runs created through this UI's server",
        )

    def command_line(self, args: argparse.Namespace) -> list[str]:
        """The ``mlflow ui`` command this runs."""
        store = _resolve_uri(args.backend_store_uri)
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            store,
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--workers",
            "1",
        ]
        if args.artifacts_destination:
            cmd += ["--artifacts-destination", args.artifacts_destination]
        return cmd

    def run(self, args: argparse.Namespace) -> int:
        """Run the UI until Ctrl-C; returns its exit code."""
        from .cli import UsageError

        if not 0 < args.port < 65536:
            raise UsageError(f"`--port` must be in 1..65535, but got --port={args.port}.")
        store = _resolve_uri(args.backend_store_uri)
        if store.startswith(("http://", "https://")):
            print(f"{store} is a tracking server; it serves its own UI: open {store}")
            return 0
        _mlflow()
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{args.port}"
        env = dict(os.environ)
        # The job runner serves GenAI features snopt does not use; it doubles the start-up time.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        print(f"MLflow UI for {store}: {url}  (Ctrl-C stops it)", flush=True)
        proc = subprocess.Popen(self.command_line(args), env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            return 0


class TrackingCommand(Command):
    """``snopt tracking sync|status``: replay or list runs kept in the local fallback."""

    name = "tracking"
    help = "replay (sync) or list (status) runs kept locally while MLflow was unreachable"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the ``sync`` and ``status`` actions."""
        parser.add_argument(
            "action", choices=["sync", "status"], help="sync: replay into MLflow; status: list"
        )
        parser.add_argument(
            "--dir", default=None, metavar="PATH", help="fallback folder (default: ./snopt_runs/fallback)"
        )
        parser.add_argument(
            "--tracking-uri",
            default=None,
            metavar="URI",
            help="replay into this tracking URI instead of each run's own",
        )

    def run(self, args: argparse.Namespace) -> int:
        """Sync or list; returns 1 when some journal could not be replayed."""
        from .cli import print_table

        directory = Path(args.dir) if args.dir else default_fallback_dir()
        if args.action == "status":
            rows = pending_journals(directory)
            if not rows:
                print(f"nothing to sync in {directory}")
                return 0
            print_table(rows, title=f"runs waiting in {directory}")
            return 0
        results = sync_fallback(directory, tracking_uri=args.tracking_uri)
        if not results:
            print(f"nothing to sync in {directory}")
            return 0
        print_table(
            [
                {
                    "journal": Path(r.journal).name,
                    "status": r.status,
                    "run_id": r.run_id,
                    "operations": r.operations,
                    "error": r.error,
                }
                for r in results
            ],
            title="snopt tracking sync",
        )
        for r in results:
            for note in r.notes:
                print(f"{Path(r.journal).name}: {note}")
        return 0 if all(r.status == "synced" for r in results) else 1


#: The command classes ``snopt.cli`` registers.
TRACKING_COMMANDS = (UiCommand, TrackingCommand)
