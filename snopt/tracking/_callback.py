"""The training-loop callback that logs one run to MLflow."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._checks import writable_store
from .._redact import redact_url
from .._training import Callback, FitResult, jsonable
from ._common import (
    _OFFLINE_PREFIX,
    _OPTUNA_STATE,
    _PARENT_TAG,
    _STATUS,
    DEFAULT_EXPERIMENT,
    TrackingWarning,
    _describe,
    _logger,
    _metric_key,
    _mlflow,
    _now_ms,
    _param_value,
    _resolve_uri,
    _short_http_retries,
    config_dict,
    default_fallback_dir,
    flatten_params,
    git_commit,
    package_versions,
)
from ._figures import _history_figures
from ._journal import (
    sync_fallback,
)
from ._ops import (
    _mlflow_run_env,
)
from ._sink import _RunSink
from ._system import _psutil_available, _SystemSampler

if TYPE_CHECKING:
    from .._training import Trainer


# --------------------------------------------------------------------- callback
#: Optimizer settings that are implementation switches, not hyperparameters (never logged).
_TORCH_INTERNALS = frozenset({"foreach", "fused", "capturable", "differentiable", "maximize"})


def _wanted(option: bool | Callable[[FitResult], bool], result: FitResult) -> bool:
    return bool(option(result)) if callable(option) else bool(option)


def _check_callback_args(
    config: Any, experiment: Any, flush_every: Any, flush_interval: Any, system_metrics_interval: Any
) -> None:
    """:class:`MlflowCallback`'s arguments, checked before any run starts."""
    if experiment is not None and (not isinstance(experiment, str) or not experiment.strip()):
        raise ValueError(f"`experiment` must be a non-empty string, but got experiment={experiment!r}.")
    if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
        raise ValueError(f"`flush_every` must be a positive integer, but got flush_every={flush_every!r}.")
    for name, value in (
        ("flush_interval", flush_interval),
        ("system_metrics_interval", system_metrics_interval),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"`{name}` must be a positive number of seconds, but got {name}={value!r}.")
    if config is not None and not isinstance(config, Mapping) and not hasattr(config, "to_dict"):
        raise TypeError(f"`config` must be a mapping or have to_dict(), but got {type(config).__name__}.")


class MlflowCallback(Callback):
    """Log a training run to MLflow (see the module documentation for what is logged).

    Tracking failures never stop training: after one :class:`TrackingWarning` the run is
    kept in a local journal that :func:`sync_fallback` (``snopt tracking sync``) replays.

    Args:
        config: the resolved configuration (a :class:`snopt.RunConfig`, or any mapping),
            logged as params and as ``config.json``.
        tracking_uri: where to log (default: MLflow's own, ``mlflow.get_tracking_uri()``: the
            URI of ``mlflow.set_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else
            ``sqlite:///<cwd>/mlflow.db``).
        experiment: experiment name, created when missing (default: the experiment of
            ``mlflow.set_experiment`` or ``MLFLOW_EXPERIMENT_NAME``, else ``"snopt"``).  Inside
            ``with mlflow.start_run():`` the run nests under that active run, in its experiment.
        run_name: name of the run (default ``<task>-<optimizer>-<strategy>`` from the tags).
        tags: run tags, e.g. ``{"task": ..., "strategy": ..., "optimizer": ...}``.
        parent_run_id: nest the run under this run (a study or comparison).
        run_id: log into this existing run instead of creating one (default: the run of
            ``mlflow run`` when ``MLFLOW_RUN_ID`` is set).
        end_run: set the run's final status; default True, False for a run owned by
            ``mlflow.optuna.MlflowStorage``.
        log_model: log the final model with ``mlflow.pytorch.log_model``; a callable
            ``keep(result) -> bool`` decides at the end of the run (a study's "best so far").
        log_checkpoint: log the last checkpoint file.
        log_figures: log loss/metric/T/NFE figures (a bool, or a callable as for ``log_model``).
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
        experiment: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        end_run: bool = True,
        log_model: bool | Callable[[FitResult], bool] = True,
        log_checkpoint: bool = True,
        log_figures: bool | Callable[[FitResult], bool] = True,
        system_metrics: bool | None = None,
        system_metrics_interval: float = 10.0,
        flush_every: int = 100,
        flush_interval: float = 15.0,
        fallback_dir: str | os.PathLike | None = None,
        sync_on_end: bool = True,
    ) -> None:
        _check_callback_args(config, experiment, flush_every, flush_interval, system_metrics_interval)
        self.config: dict[str, Any] | None = None if config is None else config_dict(config)
        self._uri_given = tracking_uri is not None and tracking_uri != ""
        self.tracking_uri = writable_store("tracking_uri", _resolve_uri(tracking_uri))
        self._experiment_given = experiment is not None
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        #: The task's metric name (``accuracy``, ``mse``, ``nll``): ``metric`` is logged under it.
        self.metric_name = "metric"
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
            if trainer.controller is not None:
                params["controller.class"] = type(trainer.controller).__name__
        # A run configuration (one with the solver settings) says all of this once already.
        if trainer is not None and not {"method", "optimizer"} <= set(self.config or {}):
            group = trainer.optimizer.param_groups[0]
            for key, value in group.items():
                if key not in _TORCH_INTERNALS and isinstance(value, (int, float, str, bool, tuple)):
                    params[f"optimizer.{key}"] = _param_value(value)
            from .._ode import ode_blocks

            for name, block in ode_blocks(trainer.model):
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

    def _summary(self, result: FitResult) -> dict[str, Any]:
        """The run's totals: final values and statistics, flat (``nfe/forward``), metric renamed."""
        out: dict[str, Any] = {}
        for key, value in {**result.final, **result.stats}.items():
            key = self.metric_name if key == "metric" else key
            if isinstance(value, Mapping):
                out.update({f"{key}/{sub}": v for sub, v in value.items()})
            else:
                out[key] = value
        out["status"] = str(result.status)
        return out

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
        return " · ".join(names) if names else None

    def _model_name(self) -> str:
        """The logged model's name, readable in MLflow's model list.

        A study's trial: ``<study>-trial-<n>`` (``digits-tpe-s0-trial-3``); another run: its
        name with the task in front (``digits-adam-fixed``).  MLflow refuses ``/ : . %`` and
        quotes in model names, so anything but letters, digits, ``_`` and ``-`` becomes ``-``.
        """
        study, number = self.tags.get("optuna.study_name"), self.tags.get("optuna.trial_number")
        if study and number is not None:
            name = f"{study} trial {number}"
        else:
            name = self._run_name() or ""
            task = self.tags.get("task") or (self.config or {}).get("task")
            if task and str(task) not in name:
                name = f"{task} {name}"
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")
        return slug[:200] or "model"

    def _add_metrics(self, values: Mapping[str, Any], step: int, timestamp: int | None = None) -> None:
        ts = _now_ms() if timestamp is None else timestamp
        rows = []
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                try:
                    value = float(value)  # 0-dim tensors, numpy scalars
                except (TypeError, ValueError):
                    continue
            name = self.metric_name if key == "metric" else key
            rows.append((_metric_key(name), float(value), ts, int(step)))
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
        self._follow_mlflow_state()
        self.metric_name = trainer.metric_name
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

    def _follow_mlflow_state(self) -> None:
        """Honour ``mlflow.set_tracking_uri``, ``mlflow.set_experiment`` and an active run."""
        mlflow = _mlflow()
        if not self._uri_given:
            self.tracking_uri = mlflow.get_tracking_uri()
        if self.tracking_uri != mlflow.get_tracking_uri():
            return  # another store than MLflow's current one: its experiment and run live elsewhere
        if not self._experiment_given:
            # MLflow has no public getter for the experiment chosen with mlflow.set_experiment.
            from mlflow.tracking import fluent

            chosen = getattr(fluent, "_active_experiment_id", None) or os.environ.get("MLFLOW_EXPERIMENT_ID")
            if chosen:
                with contextlib.suppress(Exception):  # a stale id: keep the default experiment
                    self.experiment = mlflow.MlflowClient(self.tracking_uri).get_experiment(chosen).name
        active = mlflow.active_run()
        if active is not None and self.parent_run_id is None and self._attach_to is None:
            self.parent_run_id = active.info.run_id  # the child goes into its parent's experiment

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
        # The file holds the URI redacted (older files: as given); compare what both say.
        if redact_url(info.get("tracking_uri")) == redact_url(self.tracking_uri) and info.get("run_id"):
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
                    json.dumps({"run_id": self.sink.run_id, "tracking_uri": redact_url(self.tracking_uri)})
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
            if _wanted(self.log_model, result) and result.status in ("completed", "interrupted"):
                self._safely(
                    "log the model",
                    lambda: self.sink.log_model(  # type: ignore[union-attr]
                        trainer.model, self._model_name(), config=self.config
                    ),
                )
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
        # Totals are one value each: a summary (tags, shown in the run's overview and as columns
        # of the runs table, and summary.json), not single-point metric charts.
        summary = self._summary(result)
        tags = {
            f"summary.{k}": _param_value(f"{v:.6g}" if isinstance(v, float) else v)
            for k, v in summary.items()
        }
        tags["snopt.status"] = str(result.status)
        if self.parent_run_id is not None:  # a study's trial: the state Optuna gives it
            tags["snopt.trial_state"] = _OPTUNA_STATE.get(str(result.status), "FAIL")
        if result.message:
            tags["snopt.message"] = result.message
            tags["mlflow.note.content"] = f"**{result.status}**: {result.message}"
        if result.signal:
            tags["snopt.signal"] = result.signal
        self.sink.log_batch(tags=tags)

    def _log_artifacts(self, trainer: Trainer, result: FitResult) -> None:
        assert self.sink is not None
        with tempfile.TemporaryDirectory(prefix="snopt-mlflow-") as tmp:
            folder = Path(tmp)
            config = {"config": self.config, "versions": package_versions(), "git_commit": git_commit()}
            (folder / "config.json").write_text(json.dumps(jsonable(config), indent=2, default=str))
            self.sink.submit(
                {"op": "log_artifact", "path": str(folder / "config.json"), "artifact_path": None}
            )
            (folder / "summary.json").write_text(json.dumps(jsonable(self._summary(result)), indent=2))
            self.sink.submit(
                {"op": "log_artifact", "path": str(folder / "summary.json"), "artifact_path": None}
            )
            (folder / "result.json").write_text(
                json.dumps(jsonable(result.to_dict(self.metric_name)), indent=2, default=str)
            )
            self.sink.submit(
                {"op": "log_artifact", "path": str(folder / "result.json"), "artifact_path": None}
            )
            if _wanted(self.log_figures, result) and result.history:
                figures = _history_figures(result.history, self.metric_name)
                fig_dir = folder / "figures"
                fig_dir.mkdir()
                for name, fig in figures.items():
                    fig.savefig(fig_dir / name)
                self.sink.submit({"op": "log_artifact", "path": str(fig_dir), "artifact_path": "figures"})
            checkpoint = self.checkpoint or result.checkpoint
            if self.log_checkpoint and checkpoint and Path(checkpoint).exists():
                self.sink.submit({"op": "log_artifact", "path": checkpoint, "artifact_path": "checkpoint"})
