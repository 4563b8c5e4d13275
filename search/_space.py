"""The search space: declared once, used by every strategy of a study or a comparison.

Each parameter is a :class:`Float`, :class:`Int` or :class:`Categorical`; the space maps
its names to :class:`snopt.RunConfig` fields (``t1``, ``lr``, ``rtol``, ``atol``,
``t1_lr``, ...) or, for any other name, to an argument of the task's ``build_model``
(``width`` for digits, ``hidden_dim`` for the time series, ``hidden`` for the flows);
``tol`` sets both ``rtol`` and ``atol``.
``t1`` is the integration horizon T of every block; ``t1/<block>`` (e.g. ``t1/blocks.0``)
the horizon of one block, the default for models with several blocks.  Black-box
strategies sample the horizons; in-training strategies start from the best trial's final
horizons (or the defaults) and let the controller move them inside their range.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from snopt._run import RunConfig

from ._choices import HORIZON

#: Prefix of a per-block horizon parameter: ``t1/<block name>``.
HORIZON_PREFIX = HORIZON + "/"


def _is_horizon(name: str) -> bool:
    return name == HORIZON or name.startswith(HORIZON_PREFIX)


# RunConfig fields a search space may set: numbers, plus the solver method. Fields that
# describe the run rather than the model (epochs, seed, device, ...) are budget, not search.
_CONFIG_FIELDS = (
    "t1",
    "lr",
    "rtol",
    "atol",
    "method",
    "optimizer",
    "momentum",
    "weight_decay",
    "batch_size",
    "t1_lr",
    "t1_penalty",
    "t1_every",
    "snopt_eps",
    "snopt_alpha",
    "snopt_update_freq",
    "max_grad_norm",
)
#: The check of every RunConfig field, which a searched value must also pass.
_RULES = {f.name: f.metadata["rule"] for f in dataclasses.fields(RunConfig)}
#: Sets both ``rtol`` and ``atol`` of the solver.
TOLERANCE = "tol"


def _check_number(name: str, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{what}` of parameter {name!r} must be a finite number, but got {what}={value!r}.")
    return value


@dataclass(frozen=True)
class Float:
    """A real parameter in ``[low, high]``.

    Args:
        low: lower bound.
        high: upper bound (``low <= high``).
        log: sample on a log scale (needs ``low > 0``).
        step: discretisation step (not with ``log``).
        default: the value used where a strategy does not sample this parameter
            (None: the midpoint, geometric when ``log``).
    """

    low: float
    high: float
    log: bool = False
    step: float | None = None
    default: float | None = None

    kind = "float"

    def check(self, name: str) -> None:
        """Raise ``ValueError`` if the bounds are not a valid range."""
        _check_number(name, "low", self.low)
        _check_number(name, "high", self.high)
        if self.low > self.high:
            raise ValueError(
                f"`low <= high` must hold for parameter {name!r}, but got low={self.low}, high={self.high}."
            )
        if self.log and self.low <= 0:
            raise ValueError(f"A log-scale parameter needs `low > 0`, but {name!r} has low={self.low}.")
        if self.step is not None and (self.log or not self.step > 0):
            raise ValueError(
                f"`step` of {name!r} must be positive and not combined with log, got step={self.step}."
            )
        if (
            self.default is not None
            and not self.low <= _check_number(name, "default", self.default) <= self.high
        ):
            raise ValueError(
                f"`default` of {name!r} must lie in [{self.low}, {self.high}], "
                f"but got default={self.default}."
            )

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The equivalent Optuna distribution."""
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def default_value(self) -> float:
        """:attr:`default`, or the (geometric when ``log``) midpoint."""
        if self.default is not None:
            return float(self.default)
        if self.log:
            return float(math.sqrt(self.low * self.high))
        return (self.low + self.high) / 2.0

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> float:
        """Ask ``trial`` for a value."""
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def grid(self, size: int) -> list[float]:
        """``size`` evenly spaced values (log-spaced when ``log``), bounds included."""
        if size == 1 or self.low == self.high:
            return [self.default_value()]
        if self.log:
            values = np.geomspace(self.low, self.high, size)
        else:
            values = np.linspace(self.low, self.high, size)
        return [float(v) for v in values]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description."""
        return {
            "type": "float",
            "low": self.low,
            "high": self.high,
            "log": self.log,
            "step": self.step,
            "default": self.default,
        }


@dataclass(frozen=True)
class Int:
    """An integer parameter in ``[low, high]``.

    Args:
        low: lower bound.
        high: upper bound (``low <= high``).
        log: sample on a log scale (needs ``low >= 1``).
        step: spacing of the values.
        default: the value used where a strategy does not sample this parameter
            (None: the rounded midpoint, geometric when ``log``).
    """

    low: int
    high: int
    log: bool = False
    step: int = 1
    default: int | None = None

    kind = "int"

    def check(self, name: str) -> None:
        """Raise ``ValueError`` if the bounds are not a valid range."""
        for what in ("low", "high", "step"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(
                    f"`{what}` of integer parameter {name!r} must be an int, but got {what}={value!r}."
                )
        if self.low > self.high:
            raise ValueError(
                f"`low <= high` must hold for parameter {name!r}, but got low={self.low}, high={self.high}."
            )
        if self.log and self.low < 1:
            raise ValueError(
                f"A log-scale integer parameter needs `low >= 1`, but {name!r} has low={self.low}."
            )
        if self.step < 1 or (self.log and self.step != 1):
            raise ValueError(f"`step` of {name!r} must be >= 1 (and 1 with log), but got step={self.step}.")
        if self.default is not None and not self.low <= self.default <= self.high:
            raise ValueError(
                f"`default` of {name!r} must lie in [{self.low}, {self.high}], "
                f"but got default={self.default}."
            )

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The equivalent Optuna distribution."""
        return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def default_value(self) -> int:
        """:attr:`default`, or the (geometric when ``log``) midpoint on the step grid."""
        if self.default is not None:
            return int(self.default)
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2.0
        return int(self.low + round((mid - self.low) / self.step) * self.step)

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> int:
        """Ask ``trial`` for a value."""
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)

    def grid(self, size: int) -> list[int]:
        """Up to ``size`` distinct values spread over the range, bounds included."""
        if size == 1 or self.low == self.high:
            return [self.default_value()]
        raw = np.geomspace(self.low, self.high, size) if self.log else np.linspace(self.low, self.high, size)
        values = sorted({int(self.low + round((v - self.low) / self.step) * self.step) for v in raw})
        return [min(v, self.high) for v in values]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description."""
        return {
            "type": "int",
            "low": self.low,
            "high": self.high,
            "log": self.log,
            "step": self.step,
            "default": self.default,
        }


@dataclass(frozen=True)
class Categorical:
    """A parameter taking one of ``choices`` (strings, numbers, booleans).

    Args:
        choices: the values (at least one).
        default: the value used where a strategy does not sample this parameter
            (None: the first choice).
    """

    choices: tuple[Any, ...]
    default: Any = None

    kind = "categorical"

    def __init__(self, choices: Sequence[Any], default: Any = None) -> None:
        object.__setattr__(self, "choices", tuple(choices))
        object.__setattr__(self, "default", default)

    def check(self, name: str) -> None:
        """Raise ``ValueError`` on an empty list of choices or a default outside it."""
        if not self.choices:
            raise ValueError(f"Categorical parameter {name!r} needs at least one choice, but got choices=().")
        if self.default is not None and self.default not in self.choices:
            raise ValueError(
                f"`default` of {name!r} must be one of {list(self.choices)}, got {self.default!r}."
            )

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The equivalent Optuna distribution."""
        return optuna.distributions.CategoricalDistribution(self.choices)

    def default_value(self) -> Any:
        """:attr:`default`, or the first choice."""
        return self.default if self.default is not None else self.choices[0]

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> Any:
        """Ask ``trial`` for a value."""
        return trial.suggest_categorical(name, self.choices)

    def grid(self, size: int) -> list[Any]:
        """Every choice (``size`` is ignored)."""
        return list(self.choices)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description."""
        return {"type": "categorical", "choices": list(self.choices), "default": self.default}


Param = Float | Int | Categorical
_PARAM_TYPES: dict[str, Any] = {"float": Float, "int": Int, "categorical": Categorical}


def _check_aliases(names: Sequence[str]) -> None:
    """Refuse two parameters that set the same setting (``tol`` and ``rtol``, ``t1`` and ``t1/<block>``)."""
    clashes = [(TOLERANCE, n) for n in ("rtol", "atol") if TOLERANCE in names and n in names]
    if HORIZON in names:
        clashes += [(HORIZON, n) for n in names if n.startswith(HORIZON_PREFIX)]
    if clashes:
        first, second = clashes[0]
        what = "rtol and atol" if first == TOLERANCE else "the horizon of every block"
        raise ValueError(
            f"Search parameters {first!r} and {second!r} set the same setting ({first!r} sets {what}); "
            f"keep one of them, but got both in {list(names)}."
        )


@dataclass(frozen=True)
class SearchSpace:
    """Named parameters searched by every strategy.

    Example::

        space = SearchSpace({
            "t1": Float(0.25, 4.0, log=True),      # the horizon T
            "lr": Float(1e-3, 5e-2, log=True),
            "width": Int(4, 32, log=True),          # an argument of task.build_model
            "rtol": Float(1e-4, 1e-2, log=True),
        })

    Args:
        params: parameter name -> :class:`Float`, :class:`Int` or :class:`Categorical`.
            Names are :class:`snopt.RunConfig` fields or arguments of the task's
            ``build_model`` (checked against a task by :meth:`validate_for`).

    Raises:
        ValueError: on an empty space, a malformed parameter or ``low > high``.
    """

    params: Mapping[str, Param] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.params, Mapping):
            raise TypeError(
                f"`params` must be a mapping of name -> parameter, but got {type(self.params).__name__}."
            )
        if not self.params:
            raise ValueError(
                "The search space is empty: declare at least one parameter, e.g. "
                "SearchSpace({'t1': Float(0.25, 4.0, log=True)})."
            )
        for name, param in self.params.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Parameter names must be non-empty strings, but got {name!r}.")
            if not isinstance(param, (Float, Int, Categorical)):
                raise TypeError(
                    f"Parameter {name!r} must be a Float, Int or Categorical, but got {type(param).__name__}."
                )
            param.check(name)
        _check_aliases(list(self.params))
        object.__setattr__(self, "params", dict(self.params))

    # ------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        """The parameter names, in declaration order."""
        return list(self.params)

    def __contains__(self, name: object) -> bool:
        return name in self.params

    def __getitem__(self, name: str) -> Param:
        return self.params[name]

    def __len__(self) -> int:
        return len(self.params)

    def defaults(self) -> dict[str, Any]:
        """Name -> default value of every parameter."""
        return {name: p.default_value() for name, p in self.params.items()}

    def distributions(
        self, names: Iterable[str] | None = None
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        """Name -> Optuna distribution (all parameters, or ``names``)."""
        names = self.names if names is None else list(names)
        return {name: self.params[name].distribution() for name in names}

    def horizon_names(self) -> list[str]:
        """The horizon parameters: ``t1`` and every ``t1/<block>``."""
        return [n for n in self.names if _is_horizon(n)]

    def horizon_bounds(self) -> tuple[float, float] | None:
        """``(low, high)`` covering the horizon parameters (``t1``, ``t1/<block>``), if numeric."""
        ps = [p for n, p in self.params.items() if _is_horizon(n) and isinstance(p, (Float, Int))]
        if not ps:
            return None
        return float(min(p.low for p in ps)), float(max(p.high for p in ps))

    def block_horizons(self, values: Mapping[str, Any], blocks: Sequence[str]) -> dict[str, float]:
        """Block name -> horizon set by ``values`` (``t1/<block>`` over ``t1``); others are absent."""
        out: dict[str, float] = {}
        for block in blocks:
            key = HORIZON_PREFIX + block
            if key in values:
                out[block] = float(values[key])
            elif HORIZON in values:
                out[block] = float(values[HORIZON])
        return out

    def grid(self, size: int = 3, names: Iterable[str] | None = None) -> dict[str, list[Any]]:
        """The grid of Optuna's ``GridSampler``: ``size`` values per numeric parameter."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"`grid_size` must be a positive integer, but got grid_size={size!r}.")
        names = self.names if names is None else list(names)
        return {name: self.params[name].grid(size) for name in names}

    def suggest(self, trial: optuna.trial.BaseTrial, names: Iterable[str] | None = None) -> dict[str, Any]:
        """Ask ``trial`` for the parameters in ``names`` (default: all); the others keep their defaults."""
        values = self.defaults()
        for name in self.names if names is None else names:
            values[name] = self.params[name].suggest(trial, name)
        return values

    # ------------------------------------------------------------ mapping to a run
    def validate_for(self, config: RunConfig) -> None:
        """Check that every name is a searchable RunConfig field or a ``build_model`` argument of the task.

        Raises:
            ValueError: naming the unknown parameters and listing the valid names.
        """
        from snopt._tasks import get_task

        task = get_task(config.task, **config.task_kwargs)
        model_args = [
            n
            for n, p in inspect.signature(task.build_model).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and n not in {"t1", "method", "rtol", "atol", "adjoint"}
        ]
        valid = [*_CONFIG_FIELDS, TOLERANCE]
        unknown = [n for n in self.names if n not in valid and n not in model_args and not _is_horizon(n)]
        if unknown:
            raise ValueError(
                f"Unknown search parameters {unknown} for task {config.task!r}; valid names are "
                f"RunConfig fields {valid} (`tol` sets rtol and atol), model arguments {model_args} "
                f"and per-block horizons t1/<block>."
            )
        for name in self.names:
            self._check_values(name, "rtol" if name == TOLERANCE else name)
        self._check_model_args(config, task, [n for n in self.names if n in model_args])
        self._check_runs(config)
        per_block = [n[len(HORIZON_PREFIX) :] for n in self.names if n.startswith(HORIZON_PREFIX)]
        if per_block:
            blocks = block_names(config)
            bad = [b for b in per_block if b not in blocks]
            if bad:
                raise ValueError(
                    f"Unknown blocks {bad} in per-block horizons of task {config.task!r}; "
                    f"its blocks are {blocks} (parameters t1/<block>)."
                )

    def _check_values(self, name: str, setting: str) -> None:
        """The ends (or choices) of a parameter that sets a RunConfig field obey that field's rule."""
        rule = _RULES.get("t1" if _is_horizon(setting) else setting)
        if rule is None:
            return  # a model argument: the model checks it
        param = self.params[name]
        values = param.choices if isinstance(param, Categorical) else (param.low, param.high)
        for value in values:
            try:
                rule(setting, value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"Search parameter {name!r} reaches a value a run refuses: {exc}") from None

    def _check_runs(self, config: RunConfig) -> None:
        """The runs at the defaults and at every choice of a categorical setting are valid configurations.

        Rules between settings (``momentum`` only with SGD and SNOpt, say) hold for the run as a
        whole, so they are checked on whole runs, not on each parameter's range.
        """
        defaults = self.defaults()
        tries = [defaults]
        for name, param in self.params.items():
            if isinstance(param, Categorical) and name in _CONFIG_FIELDS:
                tries += [{**defaults, name: choice} for choice in param.choices]
        for values in tries:
            try:
                self.apply(config, values)
            except (TypeError, ValueError) as exc:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise ValueError(f"Search space ({shown}) reaches a run a RunConfig refuses: {exc}") from None

    def _check_model_args(self, config: RunConfig, task: Any, names: Sequence[str]) -> None:
        """The model builds at the low and at the high ends of the model arguments, and at every choice.

        Built on torch's meta device, so a huge ``width`` is refused (see
        :data:`snopt._run.MAX_PARAMETERS`) instead of allocated by the first trial.
        """
        from snopt._run import check_model_size

        ranged = [n for n in names if not isinstance(self.params[n], Categorical)]
        tries = [{n: getattr(self.params[n], end) for n in ranged} for end in ("low", "high")]
        for name in names:
            param = self.params[name]
            if isinstance(param, Categorical):
                tries += [{name: choice} for choice in param.choices]
        for values in tries:
            try:
                check_model_size(config, task, {**config.model_kwargs, **values})
            except ValueError as exc:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise ValueError(f"Search space ({shown}) reaches a model a run refuses: {exc}") from None

    def apply(self, config: RunConfig, values: Mapping[str, Any]) -> RunConfig:
        """A copy of ``config`` with ``values`` set (config fields directly, the rest as model arguments)."""
        data = config.to_dict()
        model_kwargs = dict(config.model_kwargs)
        for name, value in values.items():
            if name.startswith(HORIZON_PREFIX):
                continue  # set on the built model's block (see TrainingObjective)
            if name == TOLERANCE:
                data["rtol"] = data["atol"] = value
            elif name in _CONFIG_FIELDS:
                data[name] = value
            else:
                model_kwargs[name] = value
        data["model_kwargs"] = model_kwargs
        return RunConfig.from_dict(data)

    # ------------------------------------------------------------ serialisation
    @classmethod
    def parse(cls, text: str) -> SearchSpace:
        """Parse the command-line form ``name=low:high[:log][:int],name=a|b|c``.

        Example: ``"t1=0.25:4:log,lr=1e-3:5e-2:log,width=4:32:int:log,method=dopri5|rk4"``.

        Raises:
            ValueError: on a malformed item (the message shows the accepted form).
        """
        params: dict[str, Param] = {}
        form = "name=low:high[:log][:int] or name=a|b|c"
        for item in filter(None, (part.strip() for part in text.split(","))):
            if "=" not in item:
                raise ValueError(f"Search space item {item!r} must look like {form}.")
            name, spec = (x.strip() for x in item.split("=", 1))
            if name in params:
                raise ValueError(
                    f"Search space parameter {name!r} is given twice ({item!r} and an earlier item); "
                    "give each parameter once."
                )
            if "|" in spec or ":" not in spec:
                choices = spec.split("|")
                if not all(c.strip() for c in choices):
                    raise ValueError(f"Search space item {item!r} has an empty choice; use {form}.")
                params[name] = Categorical([_scalar(c) for c in choices])
                continue
            parts = spec.split(":")
            flags = {p.lower() for p in parts[2:]}
            if not flags <= {"log", "int"}:
                raise ValueError(
                    f"Search space item {item!r}: unknown flags {sorted(flags - {'log', 'int'})}; use {form}."
                )
            try:
                low, high = float(parts[0]), float(parts[1])
            except ValueError:
                raise ValueError(f"Search space item {item!r}: bounds must be numbers; use {form}.") from None
            if "int" in flags:
                if low != int(low) or high != int(high):
                    raise ValueError(f"Search space item {item!r}: integer bounds expected.")
                params[name] = Int(int(low), int(high), log="log" in flags)
            else:
                params[name] = Float(low, high, log="log" in flags)
        return cls(params)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """A JSON-serialisable description (stored with every study)."""
        return {name: p.to_dict() for name, p in self.params.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> SearchSpace:
        """Rebuild a space from :meth:`to_dict`."""
        params: dict[str, Param] = {}
        for name, spec in data.items():
            spec = dict(spec)
            kind = spec.pop("type", None)
            if kind not in _PARAM_TYPES:
                raise ValueError(
                    f"Parameter {name!r} has unknown type {kind!r}; valid types are {list(_PARAM_TYPES)}."
                )
            params[name] = _PARAM_TYPES[kind](**spec)
        return cls(params)


def _scalar(text: str) -> Any:
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


_WIDTH_ARG = {"digits": "width", "timeseries": "hidden_dim", "toy2d": "hidden", "multiblock": "width"}


def block_names(config: RunConfig) -> list[str]:
    """Names of the ODE blocks of the model ``config`` builds (``blocks.0``, ...), in order."""
    from snopt._ode import ode_blocks
    from snopt._tasks import get_task

    task = get_task(config.task, **config.task_kwargs)
    model = task.build_model(**config.model_kwargs)
    return [name for name, _ in ode_blocks(model)]


def default_space(task: str = "digits", blocks: Sequence[str] | None = None) -> SearchSpace:
    """The space searched when none is given: horizons, learning rate, width and tolerance.

    Args:
        task: the built-in task (names its width argument).
        blocks: the model's ODE block names; with more than one, every block gets its own
            horizon ``t1/<block>`` instead of one ``t1`` for all.

    Returns:
        ``t1`` (or ``t1/<block>`` each) in [0.25, 4] (log, default 1), ``lr`` in
        [1e-3, 5e-2] (log), the width in [4, 32] (log, default 8) and the solver tolerance
        ``tol`` (rtol = atol) in [1e-3, 1e-1] (log, default 1e-2).
    """
    if task not in _WIDTH_ARG:
        raise ValueError(f"`task` must be one of {list(_WIDTH_ARG)}, but got task={task!r}.")
    horizon = Float(0.25, 4.0, log=True, default=1.0)
    blocks = list(blocks or [])
    horizons = {HORIZON_PREFIX + b: horizon for b in blocks} if len(blocks) > 1 else {HORIZON: horizon}
    return SearchSpace(
        {
            **horizons,
            "lr": Float(1e-3, 5e-2, log=True, default=1e-2),
            _WIDTH_ARG[task]: Int(4, 32, log=True, default=8),
            TOLERANCE: Float(1e-3, 1e-1, log=True, default=1e-2),
        }
    )
