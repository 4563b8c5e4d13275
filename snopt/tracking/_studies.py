"""MLflow runs of studies and comparisons: parent runs, nested trial runs, reports."""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .._checks import text as check_text
from .._checks import writable_store
from .._redact import is_redacted, redact_url
from .._signals import interrupt_reason, signal_name
from .._training import Callback, jsonable
from ._callback import MlflowCallback
from ._common import (
    _MAX_TAG_LENGTH,
    _OFFLINE_PREFIX,
    _PARENT_TAG,
    _TERMINAL,
    DEFAULT_EXPERIMENT,
    EXPERIMENT_ATTR,
    PARENT_RUN_ATTR,
    RUN_ID_ATTR,
    TRACKING_URI_ATTR,
    _describe,
    _logger,
    _metric_key,
    _now_ms,
    _resolve_uri,
    _short_http_retries,
    _truncate,
    config_dict,
    default_fallback_dir,
    flatten_params,
    git_commit,
    package_versions,
)
from ._journal import (
    _Journal,
    sync_fallback,
)
from ._ops import (
    _mlflow_run_env,
)
from ._sink import _RunSink


# ---------------------------------------------------------------------- studies
def _study_storage(study: Any) -> Any:
    """The storage of a :class:`snopt.search.Study` or an ``optuna.Study`` (a URL, object or None)."""
    if hasattr(study, "storage"):
        return study.storage
    # optuna.Study has no public accessor for its storage (Optuna 5.0); only an MlflowStorage
    # object matters here, and Optuna never wraps one.
    return getattr(study, "_storage", None)


def _is_mlflow_storage(storage: Any) -> bool:
    return any(
        cls.__name__ == "MlflowStorage" and cls.__module__.startswith("mlflow.")
        for cls in type(storage).__mro__
    )


def parent_run_id(study: Any) -> str | None:
    """The MLflow parent run of an Optuna study (set by :func:`start_parent_run`), or None."""
    if _is_mlflow_storage(_study_storage(study)):
        return str(_study_storage(study).get_study_id_from_name(study.study_name))
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
    all_tags = _parent_tags(kind, study, nest_under, tags)
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
    return run_id if study is None else _record_parent(study, run_id, uri, experiment)


def _parent_tags(
    kind: str, study: Any, nest_under: str | None, tags: Mapping[str, Any] | None
) -> dict[str, str]:
    """The tags of a parent run: its kind, source, commit, study and parent, then ``tags``."""
    all_tags = {"snopt.kind": kind, "mlflow.source.name": "snopt", "mlflow.source.type": "LOCAL"}
    if nest_under:
        all_tags[_PARENT_TAG] = nest_under
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    if study is not None:
        all_tags["optuna.study_name"] = study.study_name
    all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    return all_tags


def _record_parent(study: Any, run_id: str, uri: str, experiment: str) -> str:
    """Store the parent run in the study's attributes; the run id every worker then uses."""
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    study.set_user_attr(TRACKING_URI_ATTR, redact_url(uri))
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
    tags: Mapping[str, str] | None = None,
) -> None:
    """End a parent run with ``status`` (``FINISHED``, ``FAILED`` or ``KILLED``).

    Args:
        run_id: the run.
        status: its final status.
        tracking_uri: as for :class:`MlflowCallback`.
        fallback_dir: where the status goes if MLflow is unreachable.
        quiet: do not print MLflow's link to the run.
        tags: tags set on the run just before it ends (why it ended, say).
    """
    if status not in _TERMINAL:
        raise ValueError(f"`status` must be one of {list(_TERMINAL)}, but got status={status!r}.")
    if os.environ.get("MLFLOW_RUN_ID") == run_id:
        return  # `mlflow run` ends its own run from the exit code
    with _short_http_retries():
        sink = _parent_sink(run_id, tracking_uri, fallback_dir)
        if tags:
            sink.log_batch(tags=dict(tags))
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
        log_models: which trials keep their final model and figures: ``"best"`` (default:
            every trial that beats the study's best so far when it ends, so the study's best
            trial always has them), ``"all"`` or ``"none"``.
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
        log_models: str = "best",
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
        self.tracking_uri = writable_store("tracking_uri", _resolve_uri(tracking_uri))
        # A URI given here wins over the one a study recorded (see callback()).
        self._explicit_uri = tracking_uri is not None
        self.experiment = check_text("experiment", experiment)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.params = dict(params or {})
        if log_models not in LOG_MODELS:
            raise ValueError(
                f"`log_models` must be one of {list(LOG_MODELS)}, but got log_models={log_models!r}."
            )
        self.log_models = log_models
        # Under `mlflow run`, that run is the parent unless told otherwise.
        env_run = os.environ.get("MLFLOW_RUN_ID") or None
        self.parent_run_id = parent_run_id or env_run
        self._from_env = parent_run_id is None and env_run is not None
        self._owns_parent = False  # set when start() creates the run
        self._open_runs: list[str] = []  # a comparison's study runs not yet ended
        self.fallback_dir = str(fallback_dir) if fallback_dir is not None else None
        self.callback_kwargs = callback_kwargs

    @classmethod
    def for_study(cls, study: Any, **kwargs: Any) -> StudyTracker | None:
        """The tracker of a worker that joins ``study`` (None if the study is not tracked)."""
        parent = parent_run_id(study)
        if parent is None:
            return None
        attrs = study.user_attrs
        kwargs.setdefault("tracking_uri", _recorded_uri(attrs, None))
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
                study.set_user_attr(TRACKING_URI_ATTR, redact_url(self.tracking_uri))
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

    def end(self, status: str = "FINISHED", tags: Mapping[str, str] | None = None) -> None:
        """End the parent run (if this tracker created it); replay it if it went to the fallback.

        A comparison's study runs still open (the study was stopped) end first, with the same
        ``status`` and ``tags``.
        """
        for run_id in self._open_runs:
            end_parent_run(
                run_id,
                status,
                tracking_uri=self.tracking_uri,
                fallback_dir=self.fallback_dir,
                quiet=True,
                tags=tags,
            )
        self._open_runs.clear()
        if self.parent_run_id is not None and self._owns_parent:
            end_parent_run(
                self.parent_run_id,
                status,
                tracking_uri=self.tracking_uri,
                fallback_dir=self.fallback_dir,
                tags=tags,
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
        elif issubclass(exc_type, KeyboardInterrupt):
            # SIGTERM or Ctrl-C: say which, on the run and in its note in the UI.
            reason = interrupt_reason(exc)
            tags = {
                "snopt.signal": signal_name(exc),
                "snopt.message": reason,
                "mlflow.note.content": f"**killed**: {reason}",
            }
            self.end("KILLED", tags)
        else:
            self.end("FAILED")

    # ---------------------------------------------------------- study hooks
    def on_study_start(self, study: Any) -> None:
        """A comparison: a child run for ``study``; a single study: the parent run itself."""
        if self.kind == "study":
            self.start(study)
            return
        if parent_run_id(study) is not None:
            if _is_mlflow_storage(_study_storage(study)):
                return  # the study is its own run
            # A re-run continues the study (a new session): this comparison's parent gets a run
            # of its own for this session's trials, instead of staying an empty duplicate.
            study.set_user_attr(PARENT_RUN_ATTR, "")
        parent = self.start()
        desc = study.user_attrs.get("snopt", {}) if hasattr(study, "user_attrs") else {}
        tags = dict(self.tags)
        for key in ("strategy", "seed"):
            value = getattr(study, key, None) if getattr(study, key, None) is not None else desc.get(key)
            if value is not None:
                tags[key] = str(value)
        run_id = start_parent_run(
            study,
            name=_study_run_name(study, tags, desc),
            kind="study",
            tracking_uri=self.tracking_uri,
            experiment=self.experiment,
            tags=tags,
            params={k: desc[k] for k in ("budget", "sampler", "pruner") if desc.get(k) is not None},
            fallback_dir=self.fallback_dir,
            nest_under=parent,
        )
        self._open_runs.append(run_id)

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
            if run_id in self._open_runs:
                self._open_runs.remove(run_id)
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
            cfg = config_dict(config)
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
                    uri = _recorded_uri(attrs, uri) or uri
                    if self._explicit_uri and redact_url(uri) != redact_url(self.tracking_uri):
                        # The worker was told where to log: the study's database does not override
                        # it, and the study's parent run lives elsewhere.
                        uri, parent = self.tracking_uri, self.parent_run_id
                    experiment = attrs.get(EXPERIMENT_ATTR) or experiment
                if _is_mlflow_storage(_study_storage(study)):
                    # MlflowStorage's trial id is the trial's run id. Optuna has no public trial id
                    # and MlflowStorage lacks get_trial_id_from_study_id_trial_number (MLflow 3.17).
                    kwargs["run_id"] = str(trial._trial_id)
                    kwargs.setdefault("end_run", False)
            prefix = tags.get("strategy")
            run_name = run_name or (f"{prefix} #{trial.number}" if prefix else f"trial #{trial.number}")
        keep = _keep_artifacts(self.log_models, trial)
        kwargs.setdefault("log_figures", keep)
        return MlflowCallback(
            cfg,
            tracking_uri=uri,
            experiment=experiment,
            run_name=run_name,
            tags=tags,
            parent_run_id=parent,
            log_model=keep,
            fallback_dir=self.fallback_dir,
            **kwargs,
        )

    def __call__(self, trial: Any = None, config: Mapping[str, Any] | Any = None) -> list[Callback]:
        """``trial_callbacks_factory(trial, config)`` of :mod:`snopt.search`: the trial's run
        callback, and one that records the run id in the trial (user attr ``mlflow_run_id``)."""
        callback = self.callback(trial, config)
        if trial is None or not hasattr(trial, "set_user_attr"):
            return [callback]
        return [callback, _RecordRunId(trial, callback)]

    def hooks(self) -> dict[str, Any]:
        """The keyword arguments that make :func:`snopt.search.compare` log to this tracker."""
        return {
            "trial_callbacks_factory": self,
            "on_study_start": self.on_study_start,
            "on_study_end": self.on_study_end,
            "on_report": self.on_report,
        }


def _study_run_name(study: Any, tags: Mapping[str, str], desc: Mapping[str, Any]) -> str:
    """``digits · tpe · seed 0``: a study's run inside a comparison."""
    task = tags.get("task") or (desc.get("config") or {}).get("task")
    parts = [str(p) for p in (task, tags.get("strategy")) if p]
    if "seed" in tags:
        parts.append(f"seed {tags['seed']}")
    return " · ".join(parts) or str(study.study_name)


#: What ``StudyTracker(log_models=...)`` accepts.
LOG_MODELS = ("best", "all", "none")


def _keep_artifacts(mode: str, trial: Any) -> bool | Callable[[Any], bool]:
    """``log_model``/``log_figures`` of a trial's callback for ``mode`` (see :class:`StudyTracker`)."""
    if mode != "best":
        return mode == "all"
    study = getattr(trial, "study", None)
    if study is None:
        return True

    def beats_the_best(result: Any) -> bool:
        value = result.final.get("metric")
        if value is None or not math.isfinite(float(value)):
            return False
        try:
            best = float(study.best_value)
        except (ValueError, RuntimeError):  # no completed trial yet (or a multi-objective study)
            return True
        direction = getattr(study, "direction", None)
        maximize = str(getattr(direction, "name", direction)).upper().endswith("MAXIMIZE")
        return float(value) > best if maximize else float(value) < best

    return beats_the_best


class _RecordRunId(Callback):
    """Writes the MLflow run id of a trial into the trial (``mlflow_run_id``) once it exists."""

    def __init__(self, trial: Any, callback: MlflowCallback) -> None:
        self.trial, self.callback = trial, callback

    def on_fit_start(self, trainer: Any) -> None:
        run_id = self.callback.run_id
        if run_id and not run_id.startswith(_OFFLINE_PREFIX):
            self.trial.set_user_attr(RUN_ID_ATTR, run_id)

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        self.on_fit_start(trainer)  # an offline run that was replayed has its real id now


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


#: The parts of a report given as a mapping (``rows`` is another name for ``table``).
_REPORT_KEYS = ("table", "figures", "files", "metrics")


def _report_parts(report: Any) -> dict[str, Any]:
    """The table, studies, figures, files, metrics and JSON of ``report`` (see :func:`log_report`)."""
    if report is None:
        return {}
    if isinstance(report, Mapping):
        parts = {key: report.get(key) for key in _REPORT_KEYS}
        if parts["table"] is None:
            parts["table"] = report.get("rows")
        return parts
    from ..search._report import ComparisonReport  # here: only a report of snopt.search needs it

    if not isinstance(report, ComparisonReport):
        raise TypeError(
            "`report` must be a snopt.search.ComparisonReport or a mapping of "
            f"{', '.join(_REPORT_KEYS)}, but got {type(report).__name__}."
        )
    return _comparison_parts(report)


def _comparison_parts(report: Any) -> dict[str, Any]:
    """A ``ComparisonReport``'s table (one row per strategy), studies (one row per study;
    per-trial curves stay in report.json), files, metrics (the target and each strategy's best)
    and the report itself as JSON."""
    table = report.summary()
    studies = [
        {k: v for k, v in jsonable(vars(s)).items() if k not in ("curve", "trials")} for s in report.studies
    ]
    metrics: dict[str, float] = {}
    if isinstance(report.target, (int, float)):
        metrics["target"] = float(report.target)
    for row in table:
        if isinstance(row.get("best"), (int, float)):
            metrics[f"best/{row['strategy']}"] = float(row["best"])
    return {
        "table": table,
        "studies": studies or None,
        "files": report.files,
        "metrics": metrics,
        "json": report.to_dict(),
    }


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

    ``report`` is a :class:`snopt.search.ComparisonReport` (its ``summary()`` rows as the
    table, its studies, its files, its ``target`` and each strategy's best as ``best/<strategy>``
    metrics, and ``to_dict()`` as ``report.json``) or a mapping with any of the keys ``table``
    (or ``rows``), ``figures``, ``files`` and ``metrics``; the keyword arguments win over both.
    A table (a list of row dicts, a dict of columns or a DataFrame) goes through
    ``MlflowClient.log_table`` as ``<artifact_dir>/summary.json`` (shown in the UI's artifact
    view and usable with ``mlflow.load_table``); figures (matplotlib figures or image paths, by
    file name) go to ``<artifact_dir>/figures``; files (Markdown, JSON, folders; a list, or a
    mapping of names to paths) to ``<artifact_dir>``; metrics are logged on the parent.

    Args:
        parent_run_id: the parent run.
        report: the report (see above).
        table, figures, files, metrics, tags: the parts (see above).
        tracking_uri: as for :class:`MlflowCallback`.
        artifact_dir: artifact folder of the report.
        fallback_dir: where the report goes if MLflow is unreachable.

    Raises:
        TypeError: ``report`` is neither a ``ComparisonReport`` nor a mapping.
        FileNotFoundError: ``files`` names a path that does not exist.
    """
    given = {"table": table, "figures": figures, "files": files, "metrics": metrics}
    parts = {**_report_parts(report), **{k: v for k, v in given.items() if v is not None}}
    listed = parts.get("files") or ()
    paths = [Path(p) for p in (listed.values() if isinstance(listed, Mapping) else listed)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"`files` names paths that do not exist: {missing}.")
    sink = _parent_sink(parent_run_id, tracking_uri, fallback_dir)
    with _short_http_retries(), tempfile.TemporaryDirectory(prefix="snopt-report-") as tmp:
        try:
            _submit_report(sink, Path(tmp), artifact_dir, parts, paths)
            if parts.get("metrics") or tags:
                ts = _now_ms()
                rows = [(_metric_key(k), float(v), ts, 0) for k, v in (parts.get("metrics") or {}).items()]
                sink.log_batch(rows, tags={str(k): str(v) for k, v in (tags or {}).items()})
        finally:
            sink.close()


def _submit_report(
    sink: _RunSink, folder: Path, artifact_dir: str, parts: Mapping[str, Any], paths: list[Path]
) -> None:
    """Send a report's tables, JSON, figures and files (written to ``folder`` first where needed)."""
    for key, name in (("table", "summary.json"), ("studies", "studies.json")):
        if parts.get(key) is not None:
            data = _table_data(parts[key])
            sink.submit({"op": "log_table", "data": data, "artifact_file": f"{artifact_dir}/{name}"})
    if parts.get("json") is not None:
        path = folder / "report.json"
        path.write_text(json.dumps(jsonable(parts["json"]), indent=2, default=str))
        sink.submit({"op": "log_artifact", "path": str(path), "artifact_path": artifact_dir})
    if parts.get("figures"):
        fig_dir = folder / "figures"
        fig_dir.mkdir()
        for fname, fig in dict(parts["figures"]).items():
            target = fig_dir / Path(fname if Path(fname).suffix else f"{fname}.png").name
            if isinstance(fig, (str, os.PathLike)):
                shutil.copy2(fig, target)
            else:
                fig.savefig(target)
        sink.submit({"op": "log_artifact", "path": str(fig_dir), "artifact_path": f"{artifact_dir}/figures"})
    for path in paths:
        sink.submit({"op": "log_artifact", "path": str(path), "artifact_path": artifact_dir})


def _table_data(table: Any) -> dict[str, list[Any]]:
    """A table as a dict of columns, the form ``log_table`` accepts without pandas tricks."""
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # a DataFrame
        table = table.to_dict(orient="list")

    def cell(value: Any) -> Any:
        value = jsonable(value)
        return json.dumps(value, default=str) if isinstance(value, (dict, list)) else value

    if isinstance(table, Mapping):
        return {str(k): [cell(v) for v in col] for k, col in table.items()}
    rows = [dict(r) for r in table]
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    return {c: [cell(r.get(c)) for r in rows] for c in cols}


def _recorded_uri(attrs: Mapping[str, Any], own: str | None) -> str | None:
    """The tracking URI a study recorded, unless it was stored without its credentials.

    Study attributes hold URIs redacted (``user:***@``); a worker then uses its own
    (``--tracking-uri`` or ``MLFLOW_TRACKING_URI``), which holds the credentials.
    """
    recorded = attrs.get(TRACKING_URI_ATTR)
    if not recorded or is_redacted(recorded):
        return own
    return str(recorded)
