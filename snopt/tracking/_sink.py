"""Delivery of one run's operations to MLflow, or to the fallback journal once MLflow fails."""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._redact import redact_url
from .._signals import deferred_signals
from ._common import (
    _MAX_METRICS_PER_BATCH,
    _MAX_PARAMS_TAGS_PER_BATCH,
    _MAX_TAG_LENGTH,
    _OFFLINE_PREFIX,
    _PARENT_TAG,
    _check_database,
    _describe,
    _is_rejection,
    _logger,
    _mark_reachable,
    _mlflow,
    _now_ms,
    _truncate,
    _warn_once,
)
from ._journal import (
    _Journal,
)
from ._ops import (
    WEIGHTS_FILE,
    _apply,
    _experiment_for,
    _log_model,
    _model_requirements,
    _picklable,
)


class _RunSink:
    """Delivers one run's operations to MLflow, or to a journal once MLflow fails.

    Every write runs inside :func:`~snopt._signals.deferred_signals`: a SIGTERM or Ctrl-C that
    arrives during one raises after it, so no write is cut in half with its database lock held.
    """

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
            _check_database(self.tracking_uri)  # seconds, not MLflow's 100 s of retries
            self._client = _mlflow().MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def create_run(self, run_name: str | None, tags: dict[str, str]) -> str:
        """Create the run (online, or as the journal's first operation)."""
        tags = {k: _truncate(str(v), _MAX_TAG_LENGTH) for k, v in tags.items()}
        start = _now_ms()
        with self._lock, deferred_signals():  # a stop waits for the write under way
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
                f"MLflow tracking at {redact_url(self.tracking_uri)} failed ({_describe(exc)}). "
                "Training goes on; "
                f"this run is logged to the local fallback {self.journal.path} from now on. Replay it into "
                f"MLflow with `snopt tracking sync --dir {self.fallback_dir}` once the server is reachable.",
            )

    def submit(self, op: dict[str, Any]) -> None:
        """Apply ``op`` online, or journal it (files are copied next to the journal)."""
        with self._lock, deferred_signals():  # a stop waits for the write under way
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
        """Send metrics/params/tags in chunks within MLflow's per-request limits.

        A stop that arrives meanwhile waits for the last chunk: a batch lands whole.
        """
        params = dict(params or {})
        tags = {k: _truncate(str(v), _MAX_TAG_LENGTH) for k, v in (tags or {}).items()}
        p_keys, t_keys, metrics = list(params), list(tags), list(metrics)
        step = _MAX_PARAMS_TAGS_PER_BATCH
        with deferred_signals():
            for i in range(0, len(p_keys), step):
                self.submit({"op": "log_batch", "params": {k: params[k] for k in p_keys[i : i + step]}})
            for i in range(0, len(t_keys), step):
                self.submit({"op": "log_batch", "tags": {k: tags[k] for k in t_keys[i : i + step]}})
            for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
                chunk = metrics[i : i + _MAX_METRICS_PER_BATCH]
                self.submit({"op": "log_batch", "metrics": [list(m) for m in chunk]})

    def close(self) -> None:
        """Close the journal, if the run went offline (it is then ready for a sync)."""
        if self.journal is not None:
            self.journal.close()

    def log_model(self, model: Any, name: str = "model", config: Mapping[str, Any] | None = None) -> None:
        """Log ``model`` online; offline, journal its weights (a file of tensors, never a pickle).

        Args:
            model: the trained model.
            name: the logged model's name (MLflow's model list shows it; the journal keeps it).
            config: the run's configuration: it lets a sync rebuild a built-in task's model from
                the weights and log it as an MLflow model; other models are synced as a weights
                file.
        """
        requirements = _model_requirements()
        with self._lock, deferred_signals():  # a stop waits for the write under way
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
            import torch

            dest, rel = self.journal.new_dir(name)
            dest.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, dest / WEIGHTS_FILE)
            self.journal.append(
                {
                    "op": "log_model_weights",
                    "path": f"{rel}/{WEIGHTS_FILE}",
                    "name": name,
                    "pip_requirements": requirements,
                    "config": dict(config) if config is not None else None,
                }
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
