"""The old home of the control code, kept so that ``snopt._control`` imports still work.

The code lives in :mod:`snopt.control` (costs, policies, estimators, controller).
"""

from .control import *  # noqa: F403 - a re-export shim
from .control import __all__  # noqa: F401
