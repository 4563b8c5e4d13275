"""snopt.search: Optuna studies that compare in-training horizon control with black-box search.

Built on Optuna: :func:`create_study` wraps an ``optuna.Study`` (its samplers, pruners,
storages and optuna-dashboard all work), :func:`compare` runs every strategy under one
budget and writes a :class:`ComparisonReport`.

Example::

    from snopt.search import Budget, compare

    report = compare("digits", strategies=["feedback", "tpe", "gp", "random"],
                     budget=Budget(nfe=20_000), seeds=[0, 1, 2])
    print(report.to_markdown())
"""

from ._budget import Budget, Spent
from ._compare import DEFAULT_EPSILON, DEFAULT_STRATEGIES, compare, report_from_storage, run_workers
from ._objective import CustomObjective, PruningCallback, TrainingObjective, TrialFailed
from ._report import ComparisonReport, StudyResult
from ._space import HORIZON, Categorical, Float, Int, SearchSpace, default_space
from ._storage import DEFAULT_STORAGE, SUPPORTED_SCHEMES, resolve_storage
from ._strategies import IN_TRAINING, PRUNERS, STRATEGIES
from ._study import Study, create_study, load_study

__all__ = [
    "DEFAULT_EPSILON",
    "DEFAULT_STORAGE",
    "DEFAULT_STRATEGIES",
    "HORIZON",
    "IN_TRAINING",
    "PRUNERS",
    "STRATEGIES",
    "SUPPORTED_SCHEMES",
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
    "compare",
    "create_study",
    "default_space",
    "load_study",
    "report_from_storage",
    "resolve_storage",
    "run_workers",
]
