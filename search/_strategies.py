"""Search strategies: which parameters a sampler picks and who sets the horizons T.

* ``feedback`` / ``gradient``: in-training, tuning everything.  A real sampler (TPE by
  default; ``sampler_kwargs={"sampler": "gp"}`` picks another) samples every parameter
  that is not a horizon (learning rate, width, tolerance, ...), and in each trial the
  controller (the second-order feedback policy, or the first-order gradient baseline)
  moves every block's horizon inside the declared range.  Each trial starts its horizons
  from the final horizons (per block) of the best trial so far; the first from the defaults.
* ``tpe``, ``gp``, ``cmaes``, ``random``, ``grid``: black-box.  An Optuna sampler picks
  every parameter of the space, the horizons included (one ``t1``, or one ``t1/<block>``
  per block), which stay fixed during training.
* ``hybrid``: as ``feedback``, but every trial starts T from its default.
* ``feedback-only`` / ``gradient-only``: ablations (the old ``feedback``): only the
  controller tunes, the other parameters keep their defaults; the first trial starts from
  the default T, later ones from a T drawn log-uniformly in its range (recorded as the
  user attribute ``t1_initial``, not as a parameter).

Every sampler's arguments are written out here and stored with the study, because their
defaults move between Optuna releases (Optuna 5 changed TPE's).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from ._choices import BLACK_BOX, HORIZON, IN_TRAINING, PRUNERS, STRATEGIES
from ._choices import STRATEGY_HELP as STRATEGY_HELP  # re-exported: benchmarks/search.py reads it here
from ._space import SearchSpace

#: Where each in-training strategy starts the horizons of a trial.
START: dict[str, str] = {
    "feedback": "best",
    "gradient": "best",
    "hybrid": "default",
    "feedback-only": "random",
    "gradient-only": "random",
}

# The sampler class behind each strategy and its explicit arguments (seed excluded).
_TPE: tuple[str, dict[str, Any]] = (
    "TPESampler",
    {
        "n_startup_trials": 4,
        "n_ei_candidates": 24,
        "multivariate": True,
        "group": False,
        "constant_liar": True,
    },
)
_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "feedback": _TPE,
    "gradient": _TPE,
    "hybrid": _TPE,
    "feedback-only": ("RandomSampler", {}),
    "gradient-only": ("RandomSampler", {}),
    "random": ("RandomSampler", {}),
    "tpe": _TPE,
    "gp": (
        "GPSampler",
        {"n_startup_trials": 4, "deterministic_objective": False, "warn_independent_sampling": False},
    ),
    "cmaes": (
        "CmaEsSampler",
        {
            "n_startup_trials": 1,
            "sigma0": None,
            "popsize": None,
            "use_separable_cma": False,
            "with_margin": False,
            "lr_adapt": False,
            "consider_pruned_trials": False,
            "warn_independent_sampling": False,
        },
    ),
    "grid": ("GridSampler", {"grid_size": 3}),
    "nsga2": (
        "NSGAIISampler",
        {"population_size": 8, "mutation_prob": None, "crossover_prob": 0.9, "swapping_prob": 0.5},
    ),
}

_PRUNERS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("NopPruner", {}),
    "median": ("MedianPruner", {"n_startup_trials": 2, "n_warmup_steps": 0, "interval_steps": 1}),
    "hyperband": ("HyperbandPruner", {"min_resource": 1, "max_resource": "auto", "reduction_factor": 3}),
}


def check_strategy(strategy: str) -> str:
    """Return ``strategy`` or raise a ``ValueError`` listing the valid names."""
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}, but got strategy={strategy!r}.")
    return strategy


def control_of(strategy: str) -> str:
    """The RunConfig ``control`` of a strategy: ``feedback``, ``gradient`` or ``fixed``."""
    check_strategy(strategy)
    if strategy in ("feedback", "hybrid", "feedback-only"):
        return "feedback"
    if strategy in ("gradient", "gradient-only"):
        return "gradient"
    return "fixed"


def is_horizon(name: str) -> bool:
    """Whether a parameter name is a horizon: ``t1`` (every block) or ``t1/<block>``."""
    return name == HORIZON or name.startswith(HORIZON + "/")


def sampled_names(strategy: str, space: SearchSpace) -> list[str]:
    """The parameters the strategy's sampler picks; the others keep their defaults."""
    check_strategy(strategy)
    if strategy in ("feedback-only", "gradient-only"):
        return []
    if strategy in IN_TRAINING:
        return [n for n in space.names if not is_horizon(n)]
    return space.names


@dataclass(frozen=True)
class SamplerSpec:
    """An Optuna sampler class and the arguments it is built with (recorded per study)."""

    name: str
    kwargs: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description."""
        return {"class": self.name, "kwargs": dict(self.kwargs)}


def sampler_spec(strategy: str, overrides: Mapping[str, Any] | None = None) -> SamplerSpec:
    """The sampler of ``strategy`` with its default arguments updated by ``overrides``.

    Raises:
        ValueError: on an unknown strategy or an argument the sampler does not take.
    """
    name, kwargs = _SAMPLERS[check_strategy(strategy)]
    kwargs = dict(kwargs)
    if overrides:
        overrides = dict(overrides)
        inner = overrides.pop("sampler", None)
        if inner is not None:
            if strategy not in IN_TRAINING or inner not in BLACK_BOX:
                raise ValueError(
                    f"`sampler_kwargs['sampler']` picks the sampler of an in-training strategy, one of "
                    f"{list(BLACK_BOX)}; got sampler={inner!r} for strategy={strategy!r}."
                )
            name, kwargs = _SAMPLERS[inner]
            kwargs = dict(kwargs)
        if "seed" in overrides:
            raise ValueError("Set the sampler seed through `seed`, not `sampler_kwargs['seed']`.")
        valid = set(kwargs) | _extra_args(name)
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(
                f"Unknown arguments {unknown} for {name} ({strategy}); valid ones are {sorted(valid)}."
            )
        kwargs.update(overrides)
    return SamplerSpec(name, kwargs)


def _extra_args(name: str) -> set[str]:
    import inspect

    if name == "GridSampler":
        return {"grid_size"}
    cls = getattr(optuna.samplers, name)
    return {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "seed")}


def derive_seed(seed: int, strategy: str, worker: int = 0, n_existing: int = 0) -> int:
    """The sampler seed of one process working on one study; deterministic in all its inputs.

    Strategies get independent streams (otherwise TPE, GP and random search would share
    their random start-up trials and look alike on small budgets); workers and resumed
    sessions get streams of their own so that they do not replay parameters already in
    the study.
    """
    key = zlib.crc32(check_strategy(strategy).encode())
    return int(np.random.SeedSequence([int(seed), key, int(worker), int(n_existing)]).generate_state(1)[0])


def make_sampler(
    spec: SamplerSpec, space: SearchSpace, names: list[str], seed: int
) -> optuna.samplers.BaseSampler:
    """Build the sampler described by ``spec`` over the parameters ``names`` of ``space``."""
    kwargs = dict(spec.kwargs)
    if spec.name == "GridSampler":
        grid = space.grid(kwargs.pop("grid_size"), names)
        return optuna.samplers.GridSampler(grid, seed=seed)
    if spec.name == "CmaEsSampler":
        kwargs.setdefault("independent_sampler", optuna.samplers.RandomSampler(seed=seed))
    cls = getattr(optuna.samplers, spec.name)
    return cls(seed=seed, **kwargs)


@dataclass(frozen=True)
class PrunerSpec:
    """An Optuna pruner class and its arguments (recorded per study)."""

    name: str
    kwargs: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description."""
        return {"class": self.name, "kwargs": dict(self.kwargs)}


def pruner_spec(pruner: str | None, overrides: Mapping[str, Any] | None = None) -> PrunerSpec:
    """The pruner called ``pruner`` (None: ``"none"``) with explicit arguments.

    Raises:
        ValueError: on an unknown pruner name or argument.
    """
    key = "none" if pruner is None else pruner
    if key not in _PRUNERS:
        raise ValueError(f"`pruner` must be one of {list(PRUNERS)}, but got pruner={pruner!r}.")
    name, kwargs = _PRUNERS[key]
    kwargs = dict(kwargs)
    if overrides:
        unknown = sorted(set(overrides) - set(kwargs) - _pruner_args(name))
        if unknown:
            raise ValueError(f"Unknown arguments {unknown} for {name}; valid ones are {sorted(kwargs)}.")
        kwargs.update(overrides)
    return PrunerSpec(name, kwargs)


def _pruner_args(name: str) -> set[str]:
    import inspect

    cls = getattr(optuna.pruners, name)
    return {n for n in inspect.signature(cls.__init__).parameters if n != "self"}


def make_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    """Build the pruner described by ``spec``."""
    return getattr(optuna.pruners, spec.name)(**spec.kwargs)
