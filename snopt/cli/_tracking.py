"""Tracking flags and the ``snopt ui`` and ``snopt tracking`` subcommands."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._redact import redact_url
from .._training import Callback
from ..tracking._callback import MlflowCallback
from ..tracking._common import DEFAULT_EXPERIMENT, _mlflow, _resolve_uri, default_fallback_dir
from ..tracking._journal import pending_journals, sync_fallback
from ..tracking._studies import StudyTracker
from ._base import Command, UsageError, print_table


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

        if not 0 < args.port < 65536:
            raise UsageError(f"`--port` must be in 1..65535, but got --port={args.port}.")
        store = _resolve_uri(args.backend_store_uri)
        if store.startswith(("http://", "https://")):
            print(f"{redact_url(store)} is a tracking server; it serves its own UI: open {redact_url(store)}")
            return 0
        _mlflow()
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{args.port}"
        env = dict(os.environ)
        # The job runner serves GenAI features snopt does not use; it doubles the start-up time.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        print(f"MLflow UI for {redact_url(store)}: {url}  (Ctrl-C stops it)", flush=True)
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
