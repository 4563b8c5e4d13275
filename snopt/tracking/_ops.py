"""Tracking operations as JSON-able dicts, applied the same way online and on replay."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .._redact import redact_url
from ._common import (
    _EXPERIMENT_KIND,
    _OFFLINE_PREFIX,
    _PARENT_TAG,
    TrackingWarning,
    _describe,
    _is_rejection,
    _mlflow,
    package_versions,
)


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
            f"MLFLOW_RUN_ID={run_id} is not a run of {redact_url(tracking_uri)}; "
            "logging to a new run instead. "
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
    elif kind == "log_model_weights":
        path = Path(op["path"]) if base is None else base / op["path"]
        name = str(op.get("name", "model"))
        model = _rebuild_model(op.get("config"), path)
        if model is None:
            client.log_artifact(run_id, str(path), name)
            notes.append(f"model synced as the weights file {name}/{path.name} (not a built-in task's model)")
        else:
            with _picklable(model):
                _log_model(client, tracking_uri, run_id, model, name, op.get("pip_requirements"))
    elif kind == "log_model":
        # Journals of older versions held pickled models: loading one could run any code.
        notes.append("a pickled model was not loaded (journals never unpickle); the model was skipped")
    elif kind == "terminate":
        # MLflow prints a "View run" link for runs on a server: one per trial is noise.
        quiet = contextlib.redirect_stdout(io.StringIO()) if op.get("quiet") else contextlib.nullcontext()
        with quiet:
            client.set_terminated(run_id, status=op["status"], end_time=op.get("end_time"))
    else:
        raise ValueError(
            f"Unknown tracking operation {kind!r}; valid ones are log_batch, log_artifact, "
            "log_table, log_model_weights, terminate."
        )
    return notes


class JournalRefused(ValueError):
    """A journal (or one of its entries) breaks a rule of the format and is not replayed."""


#: The name of a journaled model's weights file (a ``state_dict`` of tensors).
WEIGHTS_FILE = "weights.pt"


def _rebuild_model(config: Any, weights: Path) -> Any:
    """A built-in task's model rebuilt from its run configuration and weights (None otherwise).

    The weights load with ``weights_only=True``: a journal never runs code from a file.
    """
    import torch

    from .._config import RunConfig
    from .._defaults import TASKS

    if not isinstance(config, Mapping) or config.get("task") not in TASKS:
        return None
    known = set(RunConfig.__dataclass_fields__) - {"checkpoint", "resume"}
    try:
        run = RunConfig.from_dict({k: v for k, v in config.items() if k in known})
    except (TypeError, ValueError):
        return None
    from .._tasks import get_task

    model = get_task(run.task, **run.task_kwargs).build_model(
        t1=run.t1, method=run.method, rtol=run.rtol, atol=run.atol, adjoint=run.adjoint, **run.model_kwargs
    )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise JournalRefused(
            f"the weights file {weights} holds objects other than tensors; it was not loaded"
        ) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise JournalRefused(f"the weights file {weights} does not fit the run's model: {exc}") from None
    return model


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
    """Log ``model`` as an MLflow logged model of ``run_id``, through ``client`` only.

    ``mlflow.pytorch.log_model`` writes to the process-wide tracking URI; saving locally and
    uploading through the client's logged-model API keeps the user's global MLflow state as it is.
    """
    import tempfile

    mlflow = _mlflow()
    experiment_id = client.get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory(prefix="snopt-model-") as tmp, _quiet_mlflow():
        local = Path(tmp) / name
        mlflow.pytorch.save_model(
            model,
            str(local),
            pip_requirements=pip_requirements or _model_requirements(),
            serialization_format="pickle",
        )
        logged = client.create_logged_model(experiment_id=experiment_id, name=name, source_run_id=run_id)
        try:
            client.log_model_artifacts(logged.model_id, str(local))
        except BaseException:
            client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        client.finalize_logged_model(logged.model_id, "READY")
    from mlflow.entities import LoggedModelOutput

    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])


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
