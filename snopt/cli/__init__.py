"""The ``snopt`` command line: ``train``, ``search``, ``compare``, ``worker``, ``ui``, ``tracking``.

Every subcommand is a :class:`Command` with ``add_arguments`` and ``run``, registered once in
:data:`COMMANDS`; usage errors print the subcommand's help, ``--debug`` shows tracebacks.
This package is the only user of argparse in snopt.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._base import Command, UsageError, format_table, print_table, write_json

__all__ = [
    "COMMANDS",
    "Command",
    "UsageError",
    "build_parser",
    "format_table",
    "main",
    "print_table",
    "write_json",
]


#: Every subcommand, by name: the module of ``snopt.cli`` and the class that implements it.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("._train", "TrainCommand"),
    "search": ("._search", "SearchCommand"),
    "compare": ("._search", "CompareCommand"),
    "worker": ("._search", "WorkerCommand"),
    "ui": ("._tracking", "UiCommand"),
    "tracking": ("._tracking", "TrackingCommand"),
}


def _commands() -> list[Command]:
    from importlib import import_module

    return [getattr(import_module(module, __name__), cls)() for module, cls in COMMANDS.values()]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser], dict[str, Command]]:
    """The top-level parser, its subparsers and commands by name."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="snopt",
        description="Second-order training of Neural ODEs (SNOpt), horizon control and studies, "
        "tracked in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"snopt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers: dict[str, argparse.ArgumentParser] = {}
    commands: dict[str, Command] = {}
    for command in _commands():
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        command.add_arguments(p)
        subparsers[command.name] = p
        commands[command.name] = command
    return parser, subparsers, commands


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``snopt`` command; returns the exit code."""
    parser, subparsers, commands = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return commands[args.command].run(args)
    except UsageError as exc:
        subparsers[args.command].print_usage(sys.stderr)
        print(f"snopt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI reports errors instead of tracebacks
        if getattr(args, "debug", False):
            raise
        print(
            f"snopt {args.command}: error: {type(exc).__name__}: {exc} (use --debug for a traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
