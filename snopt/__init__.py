"""snopt: second-order training of Neural ODEs (SNOpt) and control of their horizons.

The public face of the library; the implementation lives in private modules.  Names are
imported on first use (PEP 562), so ``import snopt`` and ``snopt --version`` do not pay for
torch, Optuna or MLflow until something needs them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:  # the same names as _EXPORTS, for type checkers and IDEs
    from ._checkpoint import CheckpointError
    from ._curvature import CurvatureCollector
    from ._layers import ConcatConv2d, ConcatLinear, ConvField, MLPField
    from ._models import CNF, ODERNN, CNFField, ODEClassifier
    from ._ode import METHODS, ODEBlock, SolverError, SolverStats, ode_blocks
    from ._optimizer import SNOpt, SNOptPreconditioner
    from ._run import RunConfig, build_run, run_training
    from ._tasks import TASKS, TOY2D_DATASETS, DigitsTask, Task, TimeSeriesTask, Toy2DTask, get_task
    from ._training import (
        Callback,
        FitResult,
        NonFiniteLossError,
        Status,
        StopTraining,
        Trainer,
        TrainingError,
        fit,
    )
    from .control import (
        BaseCost,
        BasePolicy,
        Controller,
        ControlParameter,
        FeedbackPolicy,
        FixedPolicy,
        GradientPolicy,
        LinearCost,
        QuadraticCost,
    )
    from .tracking import MlflowCallback, StudyTracker, TrackingWarning, sync_fallback

#: Every public name, by the module that defines it.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "._checkpoint": ("CheckpointError",),
    "._curvature": ("CurvatureCollector",),
    "._layers": ("ConcatConv2d", "ConcatLinear", "ConvField", "MLPField"),
    "._models": ("CNF", "ODERNN", "CNFField", "ODEClassifier"),
    "._ode": ("METHODS", "ODEBlock", "SolverError", "SolverStats", "ode_blocks"),
    "._optimizer": ("SNOpt", "SNOptPreconditioner"),
    "._run": ("RunConfig", "build_run", "run_training"),
    "._tasks": ("TASKS", "TOY2D_DATASETS", "DigitsTask", "Task", "TimeSeriesTask", "Toy2DTask", "get_task"),
    "._training": (
        "Callback",
        "FitResult",
        "NonFiniteLossError",
        "Status",
        "StopTraining",
        "Trainer",
        "TrainingError",
        "fit",
    ),
    ".control": (
        "BaseCost",
        "BasePolicy",
        "Controller",
        "ControlParameter",
        "FeedbackPolicy",
        "FixedPolicy",
        "GradientPolicy",
        "LinearCost",
        "QuadraticCost",
    ),
    ".tracking": ("MlflowCallback", "StudyTracker", "TrackingWarning", "sync_fallback"),
}

try:
    __version__ = version("snopt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
