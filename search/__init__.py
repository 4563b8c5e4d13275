"""snopt.search: Optuna studies that compare in-training horizon control with black-box search.

Built on Optuna: :func:`create_study` wraps an ``optuna.Study`` (its samplers, pruners,
storages and optuna-dashboard all work), :func:`compare` runs every strategy under one
budget and writes a :class:`ComparisonReport`.

Example::

    from snopt.search import Budget, compare

    report = compare("multiblock", strategies=["feedback", "tpe", "random"],
                     budget=Budget(work=1e11), seeds=[0, 1, 2], test=True)
    print(report.to_markdown())

Strategies (:data:`STRATEGY_HELP`): ``feedback``/``gradient`` tune every hyperparameter
(TPE for the others, the controller for every block's horizon, starting from the best
trial's final horizons); ``tpe``, ``gp``, ``cmaes``, ``random``, ``grid``, ``nsga2`` are
black-box; ``hybrid`` restarts T at its default; ``feedback-only``/``gradient-only`` are
the ablations in which only the controller tunes.

Names are imported on first use (PEP 562), as in :mod:`snopt`: the command line reads the
strategy names and defaults (``_choices``) without loading Optuna or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snopt._lazy import lazy_exports

if TYPE_CHECKING:  # the same names as _EXPORTS, for type checkers and IDEs
    from ._budget import Budget, Spent
    from ._choices import (
        BLACK_BOX,
        DEFAULT_EPSILON,
        DEFAULT_STORAGE,
        DEFAULT_STRATEGIES,
        HORIZON,
        IN_TRAINING,
        PRUNERS,
        STRATEGIES,
        STRATEGY_HELP,
        TRIAL_FACTOR,
    )
    from ._compare import (
        COST_WEIGHT,
        compare,
        default_trial_budget,
        report_from_storage,
        retrain_best,
        run_workers,
    )
    from ._objective import OBJECTIVES, CustomObjective, PruningCallback, TrainingObjective, TrialFailed
    from ._report import ComparisonReport, StudyResult
    from ._space import Categorical, Float, Int, SearchSpace, block_names, default_space
    from ._stats import bootstrap_ci, hypervolume_2d, paired_differences, pareto_front
    from ._storage import SUPPORTED_SCHEMES, resolve_storage
    from ._study import Study, create_study, load_study

#: Every public name, by the module that defines it.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "._budget": ("Budget", "Spent"),
    "._choices": (
        "BLACK_BOX",
        "DEFAULT_EPSILON",
        "DEFAULT_STORAGE",
        "DEFAULT_STRATEGIES",
        "HORIZON",
        "IN_TRAINING",
        "PRUNERS",
        "STRATEGIES",
        "STRATEGY_HELP",
        "TRIAL_FACTOR",
    ),
    "._compare": (
        "COST_WEIGHT",
        "compare",
        "default_trial_budget",
        "report_from_storage",
        "retrain_best",
        "run_workers",
    ),
    "._objective": ("OBJECTIVES", "CustomObjective", "PruningCallback", "TrainingObjective", "TrialFailed"),
    "._report": ("ComparisonReport", "StudyResult"),
    "._space": ("Categorical", "Float", "Int", "SearchSpace", "block_names", "default_space"),
    "._stats": ("bootstrap_ci", "hypervolume_2d", "paired_differences", "pareto_front"),
    "._storage": ("SUPPORTED_SCHEMES", "resolve_storage"),
    "._study": ("Study", "create_study", "load_study"),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
