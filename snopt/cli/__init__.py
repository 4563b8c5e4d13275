"""The ``snopt`` command line: ``train``, ``search``, ``compare``, ``worker``, ``ui``, ``tracking``.

Every subcommand is a :class:`Command` with ``add_arguments`` and ``run``, registered once in
:data:`COMMANDS`; usage errors print the subcommand's help, ``--debug`` shows tracebacks.
Only the module of the subcommand that runs is imported, so ``snopt --help`` and
``snopt --version`` answer without loading torch, Optuna or MLflow.  Misspelled subcommands
and flags get a "did you mean" suggestion.  This package is the only user of argparse in snopt.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module

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


@dataclass(frozen=True)
class CommandSpec:
    """Where a subcommand lives (module of ``snopt.cli`` and class) and its one-line help."""

    module: str
    cls: str
    help: str

    def load(self) -> Command:
        """Import the subcommand's module and instantiate its :class:`Command`."""
        command: Command = getattr(import_module(self.module, __name__), self.cls)()
        return command


#: Every subcommand, by name.
COMMANDS: dict[str, CommandSpec] = {
    "train": CommandSpec("._train", "TrainCommand", "train a Neural ODE on a built-in task"),
    "search": CommandSpec(
        "._search", "SearchCommand", "search T and hyperparameters with one strategy (an Optuna study)"
    ),
    "compare": CommandSpec(
        "._search",
        "CompareCommand",
        "compare in-training feedback with black-box search under one budget and write a report",
    ),
    "worker": CommandSpec(
        "._search",
        "WorkerCommand",
        "run trials of an existing study from its storage (one more worker, on any machine)",
    ),
    "ui": CommandSpec(
        "._tracking",
        "UiCommand",
        "start the MLflow UI for the local tracking store (127.0.0.1 unless --host)",
    ),
    "tracking": CommandSpec(
        "._tracking",
        "TrackingCommand",
        "replay (sync) or list (status) runs kept locally while MLflow was unreachable",
    ),
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors show a one-line usage (the full one is in ``--help``)."""

    def print_usage(self, file=None):  # type: ignore[no-untyped-def]
        has_options = any(a.option_strings for a in self._actions if a.dest != "help")
        tail = " [options]" if has_options else ""
        self._print_message(f"usage: {self.prog}{tail} ... (see {self.prog} --help)\n", file or sys.stderr)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once.

    argparse's own formatter appends ``(default: ...)`` to every option, also to one whose help
    already says its default in words (``(default: at epoch ends)``, then ``(default: None)``)
    and to switches (``(default: False)``).  Here a default is appended only where the help
    states none and there is a value to show.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def _suggest_flags(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if flag.startswith("-"):
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{flag}: did you mean {close[0]}?")
    return f" ({'; '.join(hints)})" if hints else ""


def _top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    from .. import __version__

    parser = _Parser(
        prog="snopt",
        description="Second-order training of Neural ODEs (SNOpt), horizon control and studies, "
        "tracked in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"snopt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    return parser, sub


def build_parser(
    commands: Sequence[str] | None = None,
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser], dict[str, Command]]:
    """The top-level parser, its subparsers and commands by name.

    Args:
        commands: the subcommands whose arguments to declare (their modules are imported);
            ``None`` declares all of them.  The others are listed with their help only.
    """
    wanted = list(COMMANDS) if commands is None else list(commands)
    parser, sub = _top_parser()
    subparsers: dict[str, argparse.ArgumentParser] = {}
    loaded: dict[str, Command] = {}
    for name, spec in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=spec.help,
            description=spec.help,
            formatter_class=_HelpFormatter,
        )
        if name not in wanted:
            continue
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        loaded[name] = spec.load()
        loaded[name].add_arguments(p)
        subparsers[name] = p
    return parser, subparsers, loaded


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``snopt`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _command_of(argv)
    if name is not None and name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(
            f"snopt: error: unknown command {name!r}{hint} (choose from {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    parser, subparsers, commands = build_parser([] if name is None else [name])
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, with the closest flags it knows
        target = subparsers.get(args.command, parser)
        target.error(f"unrecognized arguments: {' '.join(unknown)}{_suggest_flags(target, unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    return _run(commands[args.command], subparsers[args.command], args)


def _run(command: Command, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .._redact import redact_text
    from .._signals import exit_status, interrupt_reason, terminate_as_interrupt

    try:
        # SIGTERM (kill, timeout, a scheduler) stops as Ctrl-C does, wherever it lands: the
        # checkpoint is written, MLflow runs end KILLED and the Optuna trial fails with a reason.
        with terminate_as_interrupt():
            return command.run(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"snopt {args.command}: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"snopt {args.command}: stopped ({interrupt_reason(exc)})", file=sys.stderr)
        return exit_status(exc)
    except Exception as exc:  # noqa: BLE001 - the CLI reports errors instead of tracebacks
        if getattr(args, "debug", False):
            raise
        print(
            f"snopt {args.command}: error: {type(exc).__name__}: {redact_text(str(exc))} "
            "(use --debug for a traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
