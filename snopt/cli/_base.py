"""Pieces every subcommand shares: the Command interface, argument parsers, tables and JSON."""

from __future__ import annotations

import argparse
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._control import DEFAULT_LR as CONTROL_DEFAULT_LR
from .._run import CONTROL_POLICIES, COSTS, DEFAULT_LR, OPTIMIZERS, RunConfig


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


def _nonneg_float(text: str) -> float:
    value = float(text)
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
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def add_run_arguments(parser: argparse.ArgumentParser, *, defaults: RunConfig | None = None) -> None:
    """Add the flags of every :class:`RunConfig` field to ``parser``."""
    d = defaults or RunConfig()
    g = parser.add_argument_group("task and model")
    g.add_argument("--task", default=d.task, choices=["digits", "toy2d", "timeseries"], help="built-in task")
    g.add_argument(
        "--task-kwargs",
        type=_key_values,
        default=d.task_kwargs,
        metavar="K=V,...",
        help="task arguments, e.g. dataset=two_moons",
    )
    g.add_argument(
        "--model-kwargs",
        type=_key_values,
        default=d.model_kwargs,
        metavar="K=V,...",
        help="model arguments, e.g. width=32,n_blocks=2",
    )
    g = parser.add_argument_group("ODE solver")
    g.add_argument("--t1", type=_positive_float, default=d.t1, help="initial horizon T of every ODE block")
    g.add_argument("--method", default=d.method, help="torchdiffeq method (dopri5, rk4, euler, ...)")
    g.add_argument("--rtol", type=_positive_float, default=d.rtol, help="relative tolerance")
    g.add_argument("--atol", type=_positive_float, default=d.atol, help="absolute tolerance")
    g.add_argument(
        "--adjoint",
        action=argparse.BooleanOptionalAction,
        default=d.adjoint,
        help="adjoint (O(1) memory) or direct backprop through the solver",
    )
    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="parameter optimizer")
    g.add_argument(
        "--lr",
        type=_positive_float,
        default=d.lr,
        help=f"learning rate (default per optimizer: {DEFAULT_LR})",
    )
    g.add_argument("--momentum", type=_nonneg_float, default=d.momentum, help="momentum (SGD, SNOpt)")
    g.add_argument("--weight-decay", type=_nonneg_float, default=d.weight_decay, help="weight decay")
    g.add_argument("--snopt-eps", type=_positive_float, default=d.snopt_eps, help="SNOpt damping eps")
    g.add_argument(
        "--snopt-update-freq",
        type=_positive_int,
        default=d.snopt_update_freq,
        help="SNOpt: steps between curvature refreshes",
    )
    g.add_argument(
        "--snopt-alpha", type=float, default=d.snopt_alpha, help="SNOpt second-moment decay in [0, 1)"
    )
    g.add_argument(
        "--snopt-sample-step",
        type=_positive_float,
        default=d.snopt_sample_step,
        help="SNOpt: sampling grid spacing as a fraction of the horizon",
    )
    g.add_argument(
        "--snopt-full-precond",
        action=argparse.BooleanOptionalAction,
        default=d.snopt_full_precond,
        help="SNOpt: also precondition layers outside the ODE blocks",
    )
    g = parser.add_argument_group("horizon control")
    g.add_argument(
        "--control", choices=CONTROL_POLICIES, default=d.control, help="policy that updates T in training"
    )
    g.add_argument(
        "--t1-lr",
        type=_positive_float,
        default=d.t1_lr,
        help=f"step size eta of the T policy (default per policy: {CONTROL_DEFAULT_LR})",
    )
    g.add_argument("--t1-penalty", type=_nonneg_float, default=d.t1_penalty, help="weight of the cost on T")
    g.add_argument("--t1-cost", choices=COSTS, default=d.t1_cost, help="shape of the cost on T")
    g.add_argument("--t1-every", type=_positive_int, default=d.t1_every, help="steps between T updates")
    g.add_argument(
        "--t1-bounds",
        type=_positive_float,
        nargs=2,
        default=d.t1_bounds,
        metavar=("LOW", "HIGH"),
        help="bounds on T (a projection; clipping is counted)",
    )
    g.add_argument(
        "--t1-momentum",
        type=_nonneg_float,
        default=d.t1_momentum,
        help="weight of older steps in the running estimates between T updates, in [0, 1]",
    )
    g.add_argument(
        "--t1-max-step",
        type=_positive_float,
        default=d.t1_max_step,
        help="trust region: one update multiplies or divides T by at most 1 + this",
    )
    g.add_argument(
        "--t1-warmup",
        type=_nonneg_int,
        default=d.t1_warmup,
        help="training steps before the controller's first estimate",
    )
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs, help="passes over the training data")
    g.add_argument("--max-steps", type=_positive_int, default=d.max_steps, help="cap on optimizer steps")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="batch size")
    g.add_argument(
        "--eval-every",
        type=_positive_int,
        default=d.eval_every,
        help="evaluate every N steps (default: each epoch)",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="random seed")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    g.add_argument("--max-grad-norm", type=_positive_float, default=d.max_grad_norm, help="gradient clipping")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    """The :class:`RunConfig` described by parsed ``args`` (plus ``overrides``)."""
    from dataclasses import fields

    values = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    values.update(overrides)
    if values.get("t1_bounds") is not None:
        values["t1_bounds"] = tuple(values["t1_bounds"])
    try:
        return RunConfig(**values)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


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
