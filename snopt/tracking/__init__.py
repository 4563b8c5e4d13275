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
  evaluation steps, ``val_loss`` and the task's metric under its name (``accuracy``,
  ``mse``, ``nll``).  They are buffered and sent with
  ``log_batch`` every ``flush_every`` steps, every ``flush_interval`` seconds, at every
  evaluation and checkpoint, and at the end.  The final totals are tags ``summary.<name>``
  and a ``summary.json`` artifact (not single-point metric charts);
* **system metrics** (``system/cpu_utilization_percentage``, memory, disk, network, GPU)
  sampled by MLflow's own monitors where psutil is installed, sent through the same buffer;
* **tags**: ``task``, ``strategy``, ``optimizer`` (and whatever else the caller passes),
  ``metric_name``, ``snopt.status`` and ``snopt.message``;
* **artifacts** at the end: ``config.json``, ``result.json`` (final values, stats, history),
  ``figures/`` (loss, metric, horizon T and NFE curves), ``checkpoint/`` (the last checkpoint)
  and the final model through ``mlflow.pytorch.log_model`` (pickle format: ODE solvers cannot
  be traced to ``pt2``; requirements are written explicitly, so nothing is looked up online).

The run ends ``FINISHED`` when training completed, ``FAILED`` when it failed (solver failure,
non-finite loss), ``KILLED`` when it was interrupted (Ctrl-C, or SIGTERM from ``kill``,
``timeout`` or a scheduler; the tag ``snopt.signal`` names which, on the parent runs of a
study or comparison too) and ``KILLED`` with the tag ``snopt.status=pruned`` when Optuna
pruned it (the same mapping as MLflow's own Optuna storage uses: a pruned trial is a run
stopped on purpose, not a failure).

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

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the same names as _EXPORTS, for type checkers and IDEs
    from ._callback import MlflowCallback
    from ._common import (
        DEFAULT_EXPERIMENT,
        PARENT_RUN_ATTR,
        TrackingWarning,
        default_fallback_dir,
        default_tracking_uri,
        flatten_params,
    )
    from ._journal import SyncResult, pending_journals, sync_fallback
    from ._studies import (
        StudyTracker,
        end_parent_run,
        log_report,
        parent_run_id,
        start_parent_run,
        tracking_callback_factory,
    )

#: Every public name, by the module that defines it; imported on first use, so that the CLI
#: can read a constant without loading MLflow.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "._callback": ("MlflowCallback",),
    "._common": (
        "DEFAULT_EXPERIMENT",
        "PARENT_RUN_ATTR",
        "TrackingWarning",
        "default_fallback_dir",
        "default_tracking_uri",
        "flatten_params",
    ),
    "._journal": ("SyncResult", "pending_journals", "sync_fallback"),
    "._studies": (
        "StudyTracker",
        "end_parent_run",
        "log_report",
        "parent_run_id",
        "start_parent_run",
        "tracking_callback_factory",
    ),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
