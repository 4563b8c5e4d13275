"""``snopt train``: train one model on a built-in task."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from .. import _defaults as D
from .._config import RunConfig
from ._base import (
    Command,
    UsageError,
    _positive_int,
    _shown,
    add_run_arguments,
    config_from_args,
    flag_of,
    name_the_flag,
    print_table,
    write_json,
)
from ._tracking import add_tracking_arguments, tracking_callbacks, where_logged


class TrainCommand(Command):
    """``snopt train``: train one model and print a summary."""

    name = "train"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_run_arguments(parser)
        parser.add_argument(
            "--checkpoint",
            default=None,
            help="checkpoint file (written each epoch, every --checkpoint-every steps, on Ctrl-C/SIGTERM)",
        )
        parser.add_argument(
            "--checkpoint-every",
            type=_positive_int,
            default=None,
            metavar="N",
            help="also checkpoint every N steps, so a kill loses at most N steps (default: at epoch ends)",
        )
        parser.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists")
        parser.add_argument(
            "--output-json",
            default=None,
            metavar="PATH",
            help="write final metrics, history and stats as JSON",
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        add_tracking_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        config = _train_config(args)
        print(
            f"snopt train: {config.task}, optimizer {config.optimizer}, control {config.control}; "
            "building the model...",
            flush=True,
        )
        _check_resumable(config)  # before anything is built; it loads torch, after the first line
        # Imported after the first line: loading torch takes seconds.
        from .._checkpoint import CheckpointError
        from .._run import build_run, run_training
        from .._signals import Terminated, exit_status
        from .._training import TrainingError

        callbacks = _tracking_callbacks(args, config)  # an unwritable tracking store fails here
        try:
            run = build_run(config)
        except ValueError as exc:  # e.g. a --model-kwargs key the model does not take
            raise UsageError(name_the_flag(str(exc))) from exc
        try:
            result = run_training(config, callbacks=callbacks, progress=not args.no_progress, run=run)
        except CheckpointError as exc:  # written for another model or optimizer
            raise UsageError(f"--checkpoint: {exc}") from None
        except TrainingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if args.output_json and exc.result is not None:
                write_json(args.output_json, _json_summary(config, exc.result, run.task.metric_name))
            return 1
        metric_name = run.task.metric_name
        summary: dict[str, Any] = {"task": config.task, "optimizer": config.optimizer}
        summary["control"] = config.control
        summary.update({metric_name if k == "metric" else k: v for k, v in result.final.items()})
        summary["steps"] = result.stats["steps"]
        summary["wall_time_s"] = result.stats["wall_time"]
        summary["nfe_total"] = result.stats["nfe_total"]
        print_table([summary], title=f"snopt train: {result.status}")
        if result.message:
            print(result.message)
        if args.output_json:
            write_json(args.output_json, _json_summary(config, result, metric_name))
            print(f"summary written to {os.path.abspath(args.output_json)}")
        for cb in callbacks:
            if isinstance(getattr(cb, "run_id", None), str):
                print(where_logged(cb.run_id, cb.tracking_uri, experiment=cb.experiment, journal=cb.journal))
        if result.status == "interrupted":
            return exit_status(Terminated(result.signal or "SIGINT"))
        return 0 if result.status == "completed" else 130


def _json_summary(config: RunConfig, result: Any, metric_name: str) -> dict[str, Any]:
    """What ``--output-json`` writes: the resolved configuration and the result, with ``metric``
    under the task's name for it (``accuracy``, ``mse``, ``nll``)."""
    return {"config": config.resolved().to_dict(), **result.to_dict(metric_name)}


def _ignored(name: str, config: RunConfig) -> tuple[str, str] | None:
    """``(setting, what uses the field)`` when ``config`` ignores its field ``name``, else None."""
    if name == "momentum" and config.optimizer not in D.MOMENTUM:
        return "optimizer", f"--optimizer {' or '.join(D.MOMENTUM)}"
    if name.startswith("snopt_") and config.optimizer != "snopt":
        return "optimizer", "--optimizer snopt"
    if name.startswith("t1_") and config.control == "fixed":
        return "control", "--control gradient or feedback"
    return None


def _check_used(args: argparse.Namespace, config: RunConfig) -> None:
    """Refuse a flag the run would ignore (``--momentum`` with Adam, ``--t1-lr`` with a fixed T)."""
    for f in dataclasses.fields(RunConfig):
        # Flags default to SUPPRESS: only the given ones are attributes of args.
        ignored = _ignored(f.name, config) if hasattr(args, f.name) else None
        if ignored is not None:
            setting, users = ignored
            flag = flag_of(f.name)
            raise UsageError(
                f"{flag} is only used with {users}, but got {flag}={_shown(getattr(args, f.name))} "
                f"with --{setting} {getattr(config, setting)}; drop {flag} or change --{setting}."
            )


def _train_config(args: argparse.Namespace) -> RunConfig:
    """The run of ``args``, checked before anything is built (nothing heavy is imported here)."""
    # The flags given override a --config file's checkpoint, resume and checkpoint_every.
    given = {"checkpoint": args.checkpoint, "resume": args.resume or None}
    given["checkpoint_every"] = args.checkpoint_every
    config = config_from_args(args, **{k: v for k, v in given.items() if v is not None})
    _check_used(args, config)
    for flag, path in (("--checkpoint", config.checkpoint), ("--output-json", args.output_json)):
        if path is not None:
            _writable(flag, path)
    return config


def _check_resumable(config: RunConfig) -> None:
    """A checkpoint to resume from is read before any work: an empty, corrupt or crafted file is refused."""
    if not (config.resume and config.checkpoint and os.path.exists(config.checkpoint)):
        return
    from .._checkpoint import CheckpointError, read_checkpoint

    try:
        read_checkpoint(config.checkpoint)
    except CheckpointError as exc:
        raise UsageError(f"--checkpoint: {exc}") from None


def _writable(flag: str, path: str) -> None:
    from .._checks import writable_file

    try:
        writable_file(flag.lstrip("-").replace("-", "_"), path)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _tracking_callbacks(args: argparse.Namespace, config: RunConfig) -> list[Any]:
    tags = {"task": config.task, "optimizer": config.optimizer, "strategy": config.control}
    return list(tracking_callbacks(args, config, tags))
