"""Tracking flags and the ``snopt ui`` and ``snopt tracking`` subcommands."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._redact import redact_url
from ..tracking._common import DEFAULT_EXPERIMENT, _mlflow, _resolve_uri, default_fallback_dir
from ._base import Command, UsageError, nonempty, print_table

if TYPE_CHECKING:  # imported where used: `snopt train --help` must not load torch or MLflow
    from .._training import Callback
    from ..tracking._studies import StudyTracker


# --------------------------------------------------------------------------- CLI
def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--tracking-uri``, ``--experiment``, ``--run-name`` and ``--no-tracking``."""
    g = parser.add_argument_group("MLflow tracking")
    g.add_argument(
        "--tracking-uri",
        type=nonempty,
        default=None,
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    g.add_argument("--experiment", type=nonempty, default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    g.add_argument(
        "--run-name",
        type=nonempty,
        default=None,
        help="MLflow run name (default: task · optimizer · control)",
    )
    g.add_argument(
        "--log-models",
        choices=("best", "all", "none"),
        default="best",
        help="which runs keep their model and figures: in a study, best = each trial that beats the "
        "best so far (so the best trial has them); a single run keeps them unless none",
    )
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
    from ..tracking._callback import MlflowCallback

    with _flag_errors():
        callback = MlflowCallback(
            config_dict,
            log_model=getattr(args, "log_models", "best") != "none",
            log_figures=getattr(args, "log_models", "best") != "none",
            tracking_uri=getattr(args, "tracking_uri", None),
            experiment=getattr(args, "experiment", None) or DEFAULT_EXPERIMENT,
            run_name=getattr(args, "run_name", None),
            tags=tags,
        )
    return [callback]


@contextlib.contextmanager
def _flag_errors() -> Iterator[None]:
    """A bad tracking setting (an unwritable store, say) as a usage error that names its flag."""
    try:
        yield
    except ValueError as exc:
        message = str(exc)
        names = message.split("`")[1::2]
        flag = next((f"--{n.replace('_', '-')}: " for n in names if n in ("tracking_uri", "experiment")), "")
        raise UsageError(flag + message) from None


def where_logged(
    run_id: str | None,
    tracking_uri: str | None,
    *,
    what: str = "run",
    experiment: str = DEFAULT_EXPERIMENT,
    journal: Path | None = None,
) -> str:
    """One line that says where a run went and how to look at it (the URI redacted).

    Args:
        run_id: the MLflow run id (None: nothing was logged).
        tracking_uri: where it was logged (None: the default store).
        what: ``"run"``, ``"study"`` or ``"comparison"``.
        experiment: the MLflow experiment.
        journal: the local fallback journal when MLflow was unreachable.
    """
    from .._redact import redact_url

    uri = _resolve_uri(tracking_uri)
    if journal is not None or (run_id or "").startswith("offline:"):
        return (
            f"MLflow at {redact_url(uri)} was unreachable: the {what} is kept in "
            f"{journal or default_fallback_dir()}; replay it with `snopt tracking sync`"
        )
    if run_id is None:
        return f"nothing was logged to MLflow ({redact_url(uri)})"
    if uri.startswith(("http://", "https://")):
        experiment_id = _experiment_of(run_id, uri)
        link = redact_url(uri).rstrip("/")
        link = run_url(link, experiment_id, run_id) if experiment_id is not None else link
        return f"MLflow {what} {run_id} (experiment {experiment!r}): open {link}"
    ui = "snopt ui" if uri == _resolve_uri(None) else f"snopt ui --backend-store-uri {redact_url(uri)}"
    return f"MLflow {what} {run_id} (experiment {experiment!r}) in {redact_url(uri)}; browse it with `{ui}`"


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
    from ..tracking._studies import StudyTracker

    with _flag_errors():
        return StudyTracker(
            kind=kind,
            name=getattr(args, "run_name", None) or name,
            tracking_uri=getattr(args, "tracking_uri", None),
            experiment=getattr(args, "experiment", None) or DEFAULT_EXPERIMENT,
            tags=tags,
            params=params,
            log_models=getattr(args, "log_models", "best"),
        )


def experiment_url(base: str, experiment_id: str) -> str:
    """The UI page of an experiment's runs.

    MLflow 3's UI opens an experiment on its GenAI traces page unless its "Model training"
    toggle was used once in that browser; the ``workflowType`` query selects the runs view.
    """
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """The UI page of one run."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _experiment_of(run_id: str, uri: str) -> str | None:
    """The experiment id of ``run_id`` in ``uri`` (None if the store cannot say)."""
    try:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is a courtesy; the run id is printed anyway
        return None


def _experiment_links(store: str, base: str) -> list[str]:
    """``name: url`` lines for the experiments of a local store that hold runs."""
    try:
        from mlflow.tracking import MlflowClient

        experiments = MlflowClient(tracking_uri=store).search_experiments()
    except Exception:  # noqa: BLE001 - the UI itself reports a store it cannot read
        return []
    return [
        f"  experiment {e.name!r}: {experiment_url(base, e.experiment_id)}"
        for e in experiments
        if e.name != "Default" or e.experiment_id != "0"
    ]


class UiCommand(Command):
    """``snopt ui``: start the MLflow UI on the local store and print its URL."""

    name = "ui"

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
        parser.add_argument(
            "--host", type=nonempty, default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it)"
        )
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

        if not 0 < args.port < 65536:
            raise UsageError(f"`--port` must be in 1..65535, but got --port={args.port}.")
        if args.backend_store_uri is not None:
            from .._checks import tracking_uri

            try:
                tracking_uri("backend_store_uri", args.backend_store_uri)
            except ValueError as exc:
                raise UsageError(f"--backend-store-uri: {exc}") from None
        store = _resolve_uri(args.backend_store_uri)
        if store.startswith(("http://", "https://")):
            print(f"{redact_url(store)} is a tracking server; it serves its own UI: open {redact_url(store)}")
            return 0
        missing = _missing_store(store)
        if missing is not None:
            print(
                f"warning: no MLflow store at {missing}: the UI will show no runs. Run `snopt train` or "
                "`snopt compare` in this folder first, or pass --backend-store-uri.",
                file=sys.stderr,
            )
        _mlflow()
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{args.port}"
        env = dict(os.environ)
        # The job runner serves GenAI features snopt does not use; it doubles the start-up time.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        print(f"MLflow UI for {redact_url(store)}: {url}  (Ctrl-C stops it)", flush=True)
        for line in _experiment_links(store, url) if missing is None else []:
            print(line, flush=True)
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


def _missing_store(store: str) -> Path | None:
    """The local file or folder ``store`` names when it does not exist yet, else None."""
    from urllib.parse import urlparse

    parsed = urlparse(store)
    if parsed.scheme == "sqlite":
        path = Path(store.split(":///", 1)[1]) if ":///" in store else None
    elif parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else store)
    else:
        return None  # a database server: MLflow creates its tables
    return path if path is not None and not path.exists() else None


class TrackingCommand(Command):
    """``snopt tracking sync|status``: replay or list runs kept in the local fallback."""

    name = "tracking"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the ``sync`` and ``status`` actions."""
        parser.add_argument(
            "action", choices=["sync", "status"], help="sync: replay into MLflow; status: list"
        )
        parser.add_argument(
            "--dir",
            type=nonempty,
            default=None,
            metavar="PATH",
            help="fallback folder (default: ./snopt_runs/fallback)",
        )
        parser.add_argument(
            "--tracking-uri",
            default=None,
            metavar="URI",
            help="replay into this tracking URI instead of each run's own",
        )

    def run(self, args: argparse.Namespace) -> int:
        """Sync or list; returns 1 when some journal could not be replayed."""
        from ..tracking._journal import pending_journals, sync_fallback

        directory = Path(args.dir) if args.dir else default_fallback_dir()
        if args.dir is not None and not directory.is_dir():
            what = "is a file" if directory.exists() else "does not exist"
            raise UsageError(f"`--dir` must be the fallback folder, but --dir={args.dir!r} {what}.")
        if args.tracking_uri is not None:
            from .._checks import tracking_uri

            try:
                tracking_uri("tracking_uri", args.tracking_uri)
            except ValueError as exc:
                raise UsageError(f"--tracking-uri: {exc}") from None
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
