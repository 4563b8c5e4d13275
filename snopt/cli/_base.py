"""Pieces every subcommand shares: the Command interface, argument parsers, tables and JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .._config import GROUPS, RunConfig


class Command(ABC):
    """A subcommand of ``snopt``."""

    name: str = ""
    help: str = ""

    @abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the subcommand's arguments."""

    @abstractmethod
    def run(self, args: argparse.Namespace) -> int:
        """Run the subcommand; return the process exit code."""


class UsageError(ValueError):
    """Bad command-line input: the subcommand's help is printed with the message."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _nonneg_int(text: str) -> int:
    return _int_at_least(text, 0, "a non-negative integer")


def nonempty(text: str) -> str:
    """A name that is not empty (an empty one would quietly fall back to the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty name, got {text!r}")
    return text


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _key_values(text: str) -> dict[str, Any]:
    """``width=32,n_blocks=2`` -> {"width": 32, "n_blocks": 2} (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs separated by commas, got {item!r}")
        key, value = item.split("=", 1)
        if key.strip() in out:
            raise argparse.ArgumentTypeError(
                f"{key.strip()!r} is given twice in {text!r}; give each key once"
            )
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _kind(f: dataclasses.Field) -> tuple[str, bool]:
    """The value kind of a RunConfig field (bool, int, float, str, dict, pair) and whether None is allowed."""
    text = str(f.type).replace(" ", "")
    optional = text.endswith("|None")
    text = text.removesuffix("|None")
    for prefix, kind in (
        ("dict", "dict"),
        ("tuple", "pair"),
        ("bool", "bool"),
        ("int", "int"),
        ("float", "float"),
    ):
        if text.startswith(prefix):
            return kind, optional
    return "str", optional


def _number(kind: str, optional: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        try:
            return int(text) if kind == "int" else float(text)
        except ValueError:
            what = "an integer" if kind == "int" else "a number"
            raise argparse.ArgumentTypeError(
                f"expected {what}{' or none' if optional else ''}, got {text!r}"
            ) from None

    return parse


def _text(optional: bool) -> Callable[[str], Any]:
    return lambda text: None if optional and text.strip().lower() == "none" else text


def _shown(value: Any) -> str:
    if value is None or value == {}:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return f"{value:g}" if isinstance(value, float) else str(value)


def flag_of(name: str) -> str:
    """The command-line flag of a RunConfig field: ``t1_lr`` -> ``--t1-lr``."""
    return "--" + name.replace("_", "-")


def add_run_arguments(parser: argparse.ArgumentParser, *, defaults: RunConfig | None = None) -> None:
    """Add a flag for every :class:`RunConfig` field, and ``--config FILE``.

    The flags are generated from the fields (their type, check, help and group live in the
    field metadata, see :mod:`snopt._config`); each help line shows the default once, from
    ``defaults`` (a command's own base configuration) or the field's default.  Values given on
    the command line override a ``--config`` file, which overrides ``defaults``; all of them get
    RunConfig's checks in :func:`config_from_args`.
    """
    base = defaults or RunConfig()
    parser.set_defaults(_run_base=base)
    g = parser.add_argument_group("configuration")
    g.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help='TOML, YAML or JSON file of run settings (field names as keys, e.g. optimizer = "snopt"); '
        "flags given here override it",
    )
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        kind, optional = _kind(f)
        default = meta.get("default_text") or _shown(getattr(base, f.name))
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{meta['help']} (default: {default})".replace("%", "%%"),
        }
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind == "dict":
            kwargs.update(type=_key_values, metavar=meta.get("metavar") or "K=V,...")
        elif kind == "pair":
            kwargs.update(type=_number("float", False), nargs=2, metavar=tuple(meta["metavar"].split()))
        elif kind in ("int", "float"):
            kwargs["type"] = _number(kind, optional)
        else:
            kwargs["type"] = _text(optional)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
        groups[meta["group"]].add_argument(flag_of(f.name), **kwargs)


def name_the_flag(message: str) -> str:
    """Point a RunConfig message at the flag: "`t1_lr` must ..." -> "--t1-lr: `t1_lr` must ..."."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    for word in message.split("`")[1::2]:
        if word in names:
            return f"{flag_of(word)}: {message}"
    return message


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    """The :class:`RunConfig` of parsed ``args``: the command's base, then ``--config``, then flags.

    Raises:
        UsageError: a value breaks a field's rule (the message names the flag), the config
            file cannot be read, or the device is not on this machine.
    """
    base: RunConfig = getattr(args, "_run_base", None) or RunConfig()
    # Only the generated flags: a command's own flag of a field (train's --checkpoint) is an override.
    names = [f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("cli", True)]
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    given.update(overrides)
    try:
        if getattr(args, "config", None):
            base = RunConfig.from_file(args.config, base=base)
        config = RunConfig.from_dict(given, base=base)
    except (TypeError, ValueError) as exc:
        raise UsageError(name_the_flag(str(exc))) from exc
    _check_device(config)
    return config


def _check_device(config: RunConfig) -> None:
    """The run's device exists on this machine (``cuda:99``, ``mps`` without MPS), before any work."""
    from .._training import resolve_device

    try:
        resolve_device(config.device)
    except ValueError as exc:
        raise UsageError(name_the_flag(str(exc))) from None


def format_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Rows of dicts as an aligned plain-text table (floats to 4 significant digits)."""
    if not rows:
        return ""
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    body = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body)
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> None:
    """Print :func:`format_table` to stdout."""
    text = format_table(rows, title)
    if text:
        print(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
