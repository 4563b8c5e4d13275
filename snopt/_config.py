"""``RunConfig``: one training run, described by validated plain values (importable without torch).

It is the single description of a run shared by the command line, the studies of
``snopt.search``, the MLflow project and the benchmarks.  Its defaults come from
:mod:`snopt._defaults`, the same values the classes it configures use in their signatures;
settings left at ``None`` mean "the optimizer's (or policy's) own default" and are filled in
by :meth:`RunConfig.resolved`.  Every field declares its group, help text and check in its
metadata, so the command line builds its flags from the fields (``snopt.cli``) and a TOML or
YAML file (:meth:`RunConfig.from_file`) gets exactly the same validation as the flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

from . import _checks as check
from . import _defaults as D

#: The groups of fields, in the order the command line shows them.
GROUPS = ("task and model", "ODE solver", "optimizer", "horizon control", "training")


def _setting(
    default: Any,
    group: str,
    help: str,
    rule: check.Check,
    *,
    choices: tuple[str, ...] | None = None,
    default_text: str | None = None,
    cli: bool = True,
    metavar: str | None = None,
) -> Any:
    """A dataclass field with what the command line and the checks need in its metadata."""
    meta = {
        "group": group,
        "help": help,
        "rule": rule,
        "choices": choices,
        "default_text": default_text,
        "cli": cli,
        "metavar": metavar,
    }
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _listed(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


_pos_int = partial(check.integer, low=1)
_nonneg_int = partial(check.integer, low=0)
_pos_int.__doc__ = "a positive integer"  # type: ignore[attr-defined]
_nonneg_int.__doc__ = "an integer >= 0"  # type: ignore[attr-defined]


def _choice(choices: tuple[str, ...]) -> check.Check:
    return lambda name, value: check.one_of(name, value, choices)


_TASK, _ODE, _OPT, _CTRL, _TRAIN = GROUPS


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run, with validated values.

    A frozen dataclass: make a variant with ``dataclasses.replace(config, lr=0.1)`` (checked
    again).  Fields left at None take the optimizer's or policy's own default
    (:mod:`snopt._defaults`); :meth:`resolved` fills them in.

    Attributes:
        task: built-in task name (``digits``, ``toy2d``, ``timeseries``).
        task_kwargs: extra arguments of the task (e.g. ``{"dataset": "two_moons"}``).
        model_kwargs: extra arguments of ``task.build_model`` (e.g. ``{"width": 32}``).
        t1: initial integration horizon of every ODE block.
        method, rtol, atol, adjoint, max_nfe: solver settings of every ODE block (``max_nfe``:
            the cap on field evaluations per solve, see :class:`snopt.ODEBlock`).
        optimizer: ``adam``, ``sgd`` or ``snopt`` (default ``adam``, :data:`snopt._defaults.RUN`).
        lr: learning rate (None: the optimizer's default, :data:`snopt._defaults.LR`).
        momentum: SGD's and SNOpt's momentum (None: the optimizer's default).
        weight_decay: L2 penalty (every optimizer).
        snopt_curvature, snopt_damping, snopt_update_growth, snopt_eps, snopt_update_freq, snopt_alpha,
        snopt_sample_step, snopt_full_precond:
            SNOpt's hyperparameters.
        control: ``fixed``, ``gradient`` or ``feedback`` policy for the horizons (default ``fixed``,
            :data:`snopt._defaults.RUN`, which says why).
        t1_lr: the policy's step size (None: the policy's own default).
        t1_penalty, t1_cost, t1_every, t1_bounds, t1_momentum, t1_max_step, t1_warmup: the
            controller's cost weight and shape, update interval, bounds, running-average
            momentum, trust region (None: none) and warm-up steps (see :class:`snopt.Controller`).
        t1_curvature, t1_feedback: the feedback policy's curvature (``gauss_newton`` or
            ``fisher``) and whether it uses the feedback term.
        epochs, max_steps, batch_size, eval_every: the training budget.
        seed, device, max_grad_norm: run settings.
        checkpoint, resume: where the run checkpoints, and whether it resumes from there.
        checkpoint_every: steps between checkpoints (None: at every epoch end).
    """

    task: str = _setting("digits", _TASK, "built-in task", _choice(D.TASKS), choices=D.TASKS)
    task_kwargs: dict[str, Any] = _setting(
        {}, _TASK, "task arguments, e.g. dataset=two_moons", check.mapping, metavar="K=V,..."
    )
    model_kwargs: dict[str, Any] = _setting(
        {}, _TASK, "model arguments, e.g. width=32 (at most 1e8 parameters)", check.mapping, metavar="K=V,..."
    )
    t1: float = _setting(D.ODE["t1"], _ODE, "initial horizon T of every ODE block", check.positive)
    method: str = _setting(D.ODE["method"], _ODE, "torchdiffeq method", _choice(D.METHODS), choices=D.METHODS)
    rtol: float = _setting(D.ODE["rtol"], _ODE, "relative tolerance of adaptive methods", check.positive)
    atol: float = _setting(D.ODE["atol"], _ODE, "absolute tolerance of adaptive methods", check.positive)
    adjoint: bool = _setting(
        D.ODE["adjoint"], _ODE, "adjoint solve (O(1) memory) or backprop through the solver", check.flag
    )
    max_nfe: int | None = _setting(
        D.ODE["max_nfe"],
        _ODE,
        "cap on field evaluations per solve (forward and backward each); a solve that needs more "
        "fails the run ('none': no cap)",
        check.optional(_pos_int),
    )
    optimizer: str = _setting(
        D.RUN["optimizer"], _OPT, "parameter optimizer", _choice(D.OPTIMIZERS), choices=D.OPTIMIZERS
    )
    lr: float | None = _setting(
        None,
        _OPT,
        "learning rate",
        check.optional(check.positive),
        default_text=f"per optimizer: {_listed(D.LR)}",
    )
    momentum: float | None = _setting(
        None,
        _OPT,
        "momentum of SGD and SNOpt, in [0, 1)",
        check.optional(partial(check.fraction, closed_high=False)),
        default_text=f"per optimizer: {_listed(D.MOMENTUM)}",
    )
    weight_decay: float = _setting(0.0, _OPT, "weight decay", check.nonnegative)
    snopt_curvature: str = _setting(
        D.SNOPT["curvature"],
        _OPT,
        "SNOpt: curvature strategy",
        _choice(("kfac", "reference")),
        choices=("kfac", "reference"),
    )
    snopt_damping: float = _setting(
        D.SNOPT["damping"], _OPT, "SNOpt (kfac): damping as a fraction of the mean eigenvalue", check.positive
    )
    snopt_update_growth: float = _setting(
        D.SNOPT["update_growth"],
        _OPT,
        "SNOpt: growth of the refresh interval per refresh, in units of update_freq",
        check.nonnegative,
    )
    snopt_eps: float = _setting(D.SNOPT["eps"], _OPT, "SNOpt (reference): damping eps", check.positive)
    snopt_update_freq: int = _setting(
        D.SNOPT["update_freq"], _OPT, "SNOpt: steps to the second curvature refresh", _pos_int
    )
    snopt_alpha: float = _setting(
        D.SNOPT["alpha"], _OPT, "SNOpt (reference): decay of the second moment, in [0, 1]", check.fraction
    )
    snopt_sample_step: float = _setting(
        D.SNOPT["sample_step"],
        _OPT,
        "SNOpt: sampling grid spacing as a fraction of the horizon, in (0, 1]",
        partial(check.fraction, closed_low=False),
    )
    snopt_full_precond: bool = _setting(
        D.SNOPT["full_precond"], _OPT, "SNOpt: also precondition layers outside the ODE blocks", check.flag
    )
    control: str = _setting(
        D.RUN["control"], _CTRL, "policy that moves T in training", _choice(D.POLICIES), choices=D.POLICIES
    )
    t1_lr: float | None = _setting(
        None,
        _CTRL,
        "step size eta of the T policy",
        check.optional(check.positive),
        default_text=f"per policy: {_listed(D.POLICY_LR)}",
    )
    t1_penalty: float = _setting(D.CONTROL["penalty"], _CTRL, "weight of the cost on T", check.nonnegative)
    t1_cost: str = _setting(
        D.CONTROL["cost"], _CTRL, "shape of the cost on T", _choice(D.COSTS), choices=D.COSTS
    )
    t1_every: int = _setting(D.CONTROL["every"], _CTRL, "steps between T updates", _pos_int)
    t1_bounds: tuple[float, float] | None = _setting(
        None, _CTRL, "bounds on T (a projection; clipping is counted)", check.bounds, metavar="LOW HIGH"
    )
    t1_momentum: float = _setting(
        D.CONTROL["momentum"],
        _CTRL,
        "weight of older steps in the running estimates between T updates, in [0, 1]",
        check.fraction,
    )
    t1_max_step: float | None = _setting(
        D.CONTROL["max_step"],
        _CTRL,
        "trust region: one update multiplies or divides T by at most 1 + this ('none': no limit)",
        check.optional(check.positive),
    )
    t1_warmup: int = _setting(
        D.CONTROL["warmup"], _CTRL, "training steps before the controller's first estimate", _nonneg_int
    )
    t1_curvature: str = _setting(
        D.CONTROL["curvature"],
        _CTRL,
        "curvature of the feedback policy: gauss_newton (invariant to the loss scale) or fisher",
        _choice(D.CURVATURES),
        choices=D.CURVATURES,
    )
    t1_feedback: bool = _setting(
        D.CONTROL["feedback"], _CTRL, "feedback term Q_Ttheta dtheta of the feedback policy", check.flag
    )
    epochs: int | None = _setting(
        D.TRAINING["epochs"], _TRAIN, "passes over the training data", check.optional(_pos_int)
    )
    max_steps: int | None = _setting(
        None, _TRAIN, "cap on optimizer steps (the smaller budget wins)", check.optional(_pos_int)
    )
    batch_size: int = _setting(D.TRAINING["batch_size"], _TRAIN, "batch size", _pos_int)
    eval_every: int | None = _setting(
        None,
        _TRAIN,
        "evaluate every N steps",
        check.optional(_pos_int),
        default_text="at the end of every epoch",
    )
    seed: int = _setting(D.TRAINING["seed"], _TRAIN, "random seed, in [0, 2**32 - 1]", check.seed)
    device: str = _setting(D.TRAINING["device"], _TRAIN, "cpu, cuda, cuda:N, mps or auto", check.device)
    max_grad_norm: float | None = _setting(
        None, _TRAIN, "clip the gradient norm to this value", check.optional(check.positive)
    )
    checkpoint: str | None = _setting(None, _TRAIN, "checkpoint file", check.optional(check.text), cli=False)
    resume: bool = _setting(False, _TRAIN, "resume from the checkpoint if it exists", check.flag, cli=False)
    checkpoint_every: int | None = _setting(
        None,
        _TRAIN,
        "steps between checkpoints",
        check.optional(_pos_int),
        default_text="at every epoch end",
        cli=False,
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = f.metadata["rule"](f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        if self.epochs is None and self.max_steps is None:
            raise ValueError("One of `epochs` or `max_steps` must be set, but both are None.")
        if self.resume and self.checkpoint is None:
            raise ValueError("`resume=True` needs a `checkpoint` path, but checkpoint is None.")
        if self.checkpoint_every is not None and self.checkpoint is None:
            raise ValueError(
                "`checkpoint_every` needs a `checkpoint` path, but got "
                f"checkpoint_every={self.checkpoint_every} and checkpoint=None."
            )
        if self.momentum is not None and self.optimizer not in D.MOMENTUM:
            raise ValueError(
                f"`momentum` is only used by the optimizers {list(D.MOMENTUM)}, but got "
                f"momentum={self.momentum} with optimizer={self.optimizer!r}; "
                "drop momentum or change the optimizer."
            )

    # ------------------------------------------------------------------ values
    @property
    def resolved_lr(self) -> float:
        """The learning rate the run uses."""
        return self.lr if self.lr is not None else D.LR[self.optimizer]

    def resolved(self) -> RunConfig:
        """This configuration with every None that stands for a class default filled in.

        The learning rate and momentum of the optimizer and the step size of the policy;
        what a run uses, and what MLflow logs.
        """
        momentum = self.momentum
        if momentum is None and self.optimizer in D.MOMENTUM:
            momentum = D.MOMENTUM[self.optimizer]
        t1_lr = self.t1_lr
        if t1_lr is None and self.control in D.POLICY_LR:
            t1_lr = D.POLICY_LR[self.control]
        return dataclasses.replace(self, lr=self.resolved_lr, momentum=momentum, t1_lr=t1_lr)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict (None stays None; see :meth:`resolved`)."""
        data = dataclasses.asdict(self)
        if self.t1_bounds is not None:
            data["t1_bounds"] = list(self.t1_bounds)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: RunConfig | None = None) -> RunConfig:
        """Build from a mapping of field values, over ``base`` (default: the defaults).

        Unknown keys are an error that suggests the closest valid name.
        """
        valid = [f.name for f in fields(cls)]
        for key in sorted(set(data) - set(valid)):
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid settings are {sorted(valid)}."
            raise ValueError(f"unknown setting {key!r}: {hint}")
        values = dict(data)
        if values.get("t1_bounds") is not None:
            values["t1_bounds"] = tuple(values["t1_bounds"])
        return dataclasses.replace(base if base is not None else cls(), **values)

    @classmethod
    def from_file(cls, path: str | Path, *, base: RunConfig | None = None) -> RunConfig:
        """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file of field values.

        The file holds field names at its top level, e.g. ``optimizer = "snopt"`` and
        ``model_kwargs = {width = 16}`` in TOML.  Values get the same checks as in Python
        and on the command line; unknown keys are an error that lists the valid ones.

        Args:
            path: the file.
            base: the values the file overrides (default: the defaults).
        """
        data = load_settings(path)
        try:
            return cls.from_dict(data, base=base)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None


def load_settings(path: str | Path) -> dict[str, Any]:
    """The top-level table of a TOML or YAML settings file, as a dict (never executes code)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(
            f"`config` must be a .toml, .yaml, .yml or .json file, but got config={str(path)!r}."
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"`config` file {str(path)!r} cannot be read: {exc.strerror or exc}.") from None
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(raw.decode("utf-8"))
        elif suffix == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw)  # plain data only: no Python objects from the file
    except Exception as exc:  # noqa: BLE001 - every parser error becomes one message
        raise ValueError(f"`config` file {str(path)!r} is not valid {suffix[1:].upper()}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(
            f"`config` file {str(path)!r} must hold a table of settings at its top level, "
            f"but holds a {type(data).__name__}."
        )
    return data
