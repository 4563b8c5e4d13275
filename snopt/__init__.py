"""snopt: second-order training of Neural ODEs (SNOpt) and control of their horizons.

The public face of the library; the implementation lives in private modules.
"""

from importlib.metadata import PackageNotFoundError, version

from ._checkpoint import CheckpointError
from ._control import (
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
from .tracking import MlflowCallback, StudyTracker, TrackingWarning, sync_fallback

try:
    __version__ = version("snopt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "CNF",
    "METHODS",
    "ODERNN",
    "TASKS",
    "TOY2D_DATASETS",
    "BaseCost",
    "BasePolicy",
    "CNFField",
    "Callback",
    "ConcatConv2d",
    "ConcatLinear",
    "CheckpointError",
    "ControlParameter",
    "Controller",
    "ConvField",
    "CurvatureCollector",
    "DigitsTask",
    "FeedbackPolicy",
    "FitResult",
    "FixedPolicy",
    "GradientPolicy",
    "LinearCost",
    "MLPField",
    "MlflowCallback",
    "NonFiniteLossError",
    "ODEBlock",
    "ODEClassifier",
    "QuadraticCost",
    "RunConfig",
    "SNOpt",
    "SNOptPreconditioner",
    "SolverError",
    "SolverStats",
    "Status",
    "StopTraining",
    "StudyTracker",
    "Task",
    "TimeSeriesTask",
    "Toy2DTask",
    "TrackingWarning",
    "Trainer",
    "TrainingError",
    "build_run",
    "fit",
    "get_task",
    "ode_blocks",
    "run_training",
    "sync_fallback",
]
