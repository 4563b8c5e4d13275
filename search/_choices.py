"""Names and defaults of studies that the command line shows in ``--help``.

Plain constants, with no Optuna, NumPy or torch import, so that ``snopt search --help``,
``compare --help`` and ``worker --help`` answer without loading them.  The modules that
use these names (``_strategies``, ``_space``, ``_storage``) import them from here.
"""

from __future__ import annotations

#: Name of the horizon parameter, the one in-training strategies control.
HORIZON = "t1"
#: The storage used when none is given: an SQLite file in the working directory.
DEFAULT_STORAGE = "sqlite:///snopt.db"
#: The strategies ``compare`` runs unless told otherwise.
DEFAULT_STRATEGIES = ("feedback", "tpe", "gp", "random")
#: "Reached the target" means within this of the seed's best black-box value.
DEFAULT_EPSILON = 0.005
#: What one trial of a comparison may spend unless ``trial_budget`` says otherwise, in trials of the
#: search space's default configuration (``snopt.search.default_trial_budget``).  A trial's cost spans
#: two orders of magnitude across the default space (width 32 costs about 15x the work per evaluation
#: of width 8; larger T and tighter tolerances take more steps): without a cap one wide trial can
#: take a whole budget and leave its strategy with no result, as it did for ``random`` in the
#: README's main job.  With ``snopt compare``'s budget (about nine default trials) a trial may take
#: a third of it; a trial that reaches the cap is pruned and the rest goes to other trials.  A share
#: of the budget instead would cut every trial of a budget of a few trials.
TRIAL_FACTOR = 3.0
#: Every strategy name.
STRATEGIES = (
    "feedback",
    "gradient",
    "tpe",
    "gp",
    "cmaes",
    "random",
    "grid",
    "hybrid",
    "feedback-only",
    "gradient-only",
    "nsga2",
)
#: Strategies in which a controller moves T during training.
IN_TRAINING = ("feedback", "gradient", "hybrid", "feedback-only", "gradient-only")
#: Black-box strategies (a sampler picks every parameter, T fixed in training).
BLACK_BOX = ("tpe", "gp", "cmaes", "random", "grid", "nsga2")
#: One line per strategy, for reports and ``--help``.
STRATEGY_HELP: dict[str, str] = {
    "feedback": "TPE samples the other hyperparameters; the second-order feedback policy moves every "
    "horizon in training, starting from the best trial's final horizons",
    "gradient": "as feedback, with the first-order gradient policy",
    "tpe": "black-box: TPE samples every parameter, horizons fixed in training",
    "gp": "black-box: Gaussian-process Bayesian optimisation of every parameter",
    "cmaes": "black-box: CMA-ES over every parameter",
    "random": "black-box: random search over every parameter",
    "grid": "black-box: grid search over every parameter",
    "nsga2": "black-box: NSGA-II over every parameter (for Pareto comparisons)",
    "hybrid": "as feedback, but every trial starts T from its default",
    "feedback-only": "ablation: only the feedback policy tunes (T); other hyperparameters at defaults",
    "gradient-only": "ablation: only the gradient policy tunes (T); other hyperparameters at defaults",
}
#: Pruner names (``snopt.search._strategies.make_pruner`` builds them).
PRUNERS = ("none", "median", "hyperband")
