"""Budgets of a study: trials, trial wall-clock, or cumulative NFE, whichever runs out first.

A budget belongs to the *study*, not to one ``optimize`` call: it counts what every
process that worked on the study (earlier runs that were interrupted, parallel workers)
has spent, as recorded in the Optuna storage.  Every strategy of a comparison gets the
same budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

#: User attribute holding how a trial ended, written by every snopt objective.
STATUS_ATTR = "snopt_status"


@dataclass(frozen=True)
class Budget:
    """What a study may spend; None means unlimited on that axis.

    Args:
        n_trials: finished trials (complete, pruned, or failed on a solver error;
            trials interrupted by a killed process do not count).
        timeout: seconds of trial wall-clock summed over those trials (the time from a
            trial's start to its end, sampling and evaluation included).
        nfe: function evaluations of the ODE solvers (forward plus backward) summed
            over those trials.  The trial that crosses an NFE or time budget is stopped
            there and evaluated, so no strategy overspends.

    Raises:
        ValueError: if a limit is not a positive number.
    """

    n_trials: int | None = None
    timeout: float | None = None
    nfe: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_trials", "nfe"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(
                    f"Budget `{name}` must be a positive integer or None, but got {name}={value!r}."
                )
        t = self.timeout
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < math.inf)
        ):
            raise ValueError(
                f"Budget `timeout` must be a positive number of seconds or None, but got timeout={t!r}."
            )

    @property
    def limited(self) -> bool:
        """Whether any limit is set."""
        return any(v is not None for v in (self.n_trials, self.timeout, self.nfe))

    def exhausted(self, spent: Spent) -> bool:
        """Whether ``spent`` reached any limit."""
        return (
            (self.n_trials is not None and spent.trials >= self.n_trials)
            or (self.timeout is not None and spent.wall_time >= self.timeout)
            or (self.nfe is not None and spent.nfe >= self.nfe)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description."""
        return {"n_trials": self.n_trials, "timeout": self.timeout, "nfe": self.nfe}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Budget:
        """Rebuild from :meth:`to_dict`."""
        return cls(**dict(data or {}))

    def describe(self) -> str:
        """``"8 trials, 4000 NFE"``-style text."""
        parts = []
        if self.n_trials is not None:
            parts.append(f"{self.n_trials} trials")
        if self.nfe is not None:
            parts.append(f"{self.nfe} NFE")
        if self.timeout is not None:
            parts.append(f"{self.timeout:g} s")
        return ", ".join(parts) or "unlimited"


@dataclass(frozen=True)
class Spent:
    """What a study has spent so far (see :func:`spent`)."""

    trials: int = 0
    nfe: int = 0
    wall_time: float = 0.0


def counts(trial: FrozenTrial) -> bool:
    """Whether a finished trial counts against a budget.

    Complete and pruned trials count; a failed trial counts when the objective recorded
    why it failed (a solver error), not when a killed process left it to be failed.
    """
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and STATUS_ATTR in trial.user_attrs


def trial_seconds(trial: FrozenTrial) -> float:
    """Wall-clock of a finished trial, from its start to its end."""
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def trial_nfe(trial: FrozenTrial) -> int:
    """NFE the trial recorded (0 for objectives that record none)."""
    return int(trial.user_attrs.get("nfe_total", 0) or 0)


def spent(trials: Iterable[FrozenTrial]) -> Spent:
    """Sum trials, NFE and wall-clock over the trials that count (see :func:`counts`)."""
    n, nfe, wall = 0, 0, 0.0
    for trial in trials:
        if counts(trial):
            n += 1
            nfe += trial_nfe(trial)
            wall += trial_seconds(trial)
    return Spent(n, nfe, wall)
