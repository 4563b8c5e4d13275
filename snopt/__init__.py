"""snopt: second-order training of Neural ODEs (SNOpt) and control of their horizons.

The public face of the library; the implementation lives in private modules.
"""

from importlib.metadata import PackageNotFoundError, version

from ._layers import ConcatConv2d, ConcatLinear, ConvField, MLPField
from ._models import CNF, ODERNN, CNFField, ODEClassifier
from ._ode import METHODS, ODEBlock, SolverError, SolverStats, ode_blocks
from ._run import RunConfig, build_run, run_training
from ._tasks import TASKS, DigitsTask, Task, TimeSeriesTask, Toy2DTask, get_task
from ._training import Callback, FitResult, NonFiniteLossError, Trainer, TrainingError, fit

try:
    __version__ = version("snopt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "CNF",
    "CNFField",
    "TASKS",
    "METHODS",
    "ODERNN",
    "Callback",
    "ConcatConv2d",
    "ConcatLinear",
    "ConvField",
    "DigitsTask",
    "FitResult",
    "MLPField",
    "NonFiniteLossError",
    "ODEBlock",
    "ODEClassifier",
    "RunConfig",
    "SolverError",
    "SolverStats",
    "Task",
    "TimeSeriesTask",
    "Toy2DTask",
    "Trainer",
    "TrainingError",
    "build_run",
    "fit",
    "get_task",
    "ode_blocks",
    "run_training",
]
