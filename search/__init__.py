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
"""

from ._budget import Budget, Spent
from ._compare import (
    COST_WEIGHT,
    DEFAULT_EPSILON,
    DEFAULT_STRATEGIES,
    TRIAL_FACTOR,
    compare,
    default_trial_budget,
    report_from_storage,
    retrain_best,
    run_workers,
)
from ._objective import OBJECTIVES, CustomObjective, PruningCallback, TrainingObjective, TrialFailed
from ._report import ComparisonReport, StudyResult
from ._space import HORIZON, Categorical, Float, Int, SearchSpace, block_names, default_space
from ._stats import bootstrap_ci, hypervolume_2d, paired_differences, pareto_front
from ._storage import DEFAULT_STORAGE, SUPPORTED_SCHEMES, resolve_storage
from ._strategies import BLACK_BOX, IN_TRAINING, PRUNERS, STRATEGIES, STRATEGY_HELP
from ._study import Study, create_study, load_study

__all__ = [
    "BLACK_BOX",
    "COST_WEIGHT",
    "DEFAULT_EPSILON",
    "DEFAULT_STORAGE",
    "DEFAULT_STRATEGIES",
    "HORIZON",
    "IN_TRAINING",
    "OBJECTIVES",
    "PRUNERS",
    "STRATEGIES",
    "STRATEGY_HELP",
    "SUPPORTED_SCHEMES",
    "TRIAL_FACTOR",
    "Budget",
    "Categorical",
    "ComparisonReport",
    "CustomObjective",
    "Float",
    "Int",
    "PruningCallback",
    "SearchSpace",
    "Spent",
    "Study",
    "StudyResult",
    "TrainingObjective",
    "TrialFailed",
    "block_names",
    "bootstrap_ci",
    "compare",
    "create_study",
    "default_space",
    "default_trial_budget",
    "hypervolume_2d",
    "load_study",
    "paired_differences",
    "pareto_front",
    "report_from_storage",
    "resolve_storage",
    "retrain_best",
    "run_workers",
]
