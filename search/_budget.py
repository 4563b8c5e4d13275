"""Budgets of a study: trials, trial wall-clock, cumulative NFE and cumulative work.

Four units, reported side by side: *trials*; *wall-clock* (seconds from a trial's start to
its end, summed); *NFE* (forward plus backward function evaluations of the ODE solvers);
and *work*, the NFE weighted by what an evaluation costs: the multiply-adds of the field's
Linear/Conv layers for the batch (see :mod:`snopt._work`), so that a strategy that searches
the width gets no more compute than one that does not.  ``compare`` budgets in work.

Optuna's convention for re-runs: a budget is what one session (one ``optimize`` call, with
the workers that join it) may spend, as ``study.optimize(n_trials=N)`` runs N more trials
each time it is called; a second budget, ``total``, caps the study as a whole, over every
session.  Running trials count: their trial against a trial budget, and the NFE, work and
seconds they reported so far against the others, so several workers never overshoot.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

#: User attribute holding how a trial ended, written by every snopt objective.
STATUS_ATTR = "snopt_status"
#: Status of a trial that never ran because running trials had taken the trial budget.
SKIPPED = "skipped"
#: The budget axes, in the order reports show them.
AXES = ("work", "nfe", "wall_time", "trials")
_FIELDS = ("n_trials", "timeout", "nfe", "work")


def _check_limit(name: str, value: Any, integer: bool) -> None:
    if value is None:
        return
    what = "a positive integer" if integer else "a positive number"
    if name == "timeout":
        what = "a positive number of seconds"
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"Budget `{name}` must be {what} or None, but got {name}={value!r}.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"Budget `{name}` must be {what} or None, but got {name}={value!r}.")


@dataclass(frozen=True)
class Budget:
    """What a study may spend; None means unlimited on that axis.

    Args:
        n_trials: trials (complete, pruned, failed on a solver error, or still running;
            trials interrupted by a killed process do not count).
        timeout: seconds of trial wall-clock summed over those trials (the time from a
            trial's start to its end, sampling and evaluation included).
        nfe: function evaluations of the ODE solvers (forward plus backward) summed
            over those trials.
        work: multiply-adds of the fields' Linear/Conv layers for the batch, summed over
            every function evaluation of those trials (see :mod:`snopt._work`).  The trial
            that crosses an NFE, work or time budget is stopped there and pruned, so no
            strategy overspends.

    Raises:
        ValueError: if a limit is not a positive number.
    """

    n_trials: int | None = None
    timeout: float | None = None
    nfe: int | None = None
    work: float | None = None

    def __post_init__(self) -> None:
        _check_limit("n_trials", self.n_trials, True)
        _check_limit("nfe", self.nfe, True)
        _check_limit("timeout", self.timeout, False)
        _check_limit("work", self.work, False)

    @property
    def limited(self) -> bool:
        """Whether any limit is set."""
        return any(getattr(self, f) is not None for f in _FIELDS)

    def exhausted(self, spent: Spent) -> bool:
        """Whether ``spent`` reached any limit."""
        return (
            (self.n_trials is not None and spent.trials >= self.n_trials)
            or (self.timeout is not None and spent.wall_time >= self.timeout)
            or (self.nfe is not None and spent.nfe >= self.nfe)
            or (self.work is not None and spent.work >= self.work)
        )

    def crossed(self, spent: Spent) -> str | None:
        """The first continuous limit (work, NFE, seconds) that ``spent`` reached, as text, or None."""
        if self.work is not None and spent.work >= self.work:
            return f"work {spent.work:.4g} >= {self.work:.4g}"
        if self.nfe is not None and spent.nfe >= self.nfe:
            return f"NFE {spent.nfe} >= {self.nfe}"
        if self.timeout is not None and spent.wall_time >= self.timeout:
            return f"wall-clock {spent.wall_time:.1f} s >= {self.timeout:g} s"
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description."""
        return {f: getattr(self, f) for f in _FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Budget:
        """Rebuild from :meth:`to_dict`."""
        return cls(**dict(data or {}))

    def describe(self) -> str:
        """``"8 trials, 4000 NFE"``-style text."""
        parts = []
        if self.n_trials is not None:
            parts.append(f"{self.n_trials} trials")
        if self.work is not None:
            parts.append(f"{self.work:.3g} work")
        if self.nfe is not None:
            parts.append(f"{self.nfe} NFE")
        if self.timeout is not None:
            parts.append(f"{self.timeout:g} s")
        return ", ".join(parts) or "unlimited"


@dataclass(frozen=True)
class Spent:
    """What a study has spent so far (see :func:`spent`); ``running`` of ``trials`` still run."""

    trials: int = 0
    nfe: int = 0
    wall_time: float = 0.0
    work: float = 0.0
    running: int = 0

    def __add__(self, other: Spent) -> Spent:
        return Spent(
            self.trials + other.trials,
            self.nfe + other.nfe,
            self.wall_time + other.wall_time,
            self.work + other.work,
            self.running + other.running,
        )

    def to_dict(self) -> dict[str, Any]:
        """The four axes (and running trials) as a dict."""
        return {
            "trials": self.trials,
            "nfe": self.nfe,
            "wall_time": self.wall_time,
            "work": self.work,
            "running": self.running,
        }


def counts(trial: FrozenTrial) -> bool:
    """Whether a finished trial counts against a budget.

    Complete and pruned trials count; a failed trial counts when the objective recorded
    why it failed (a solver error), not when a killed process left it to be failed, nor
    when it was skipped because running trials had taken the trial budget.
    """
    from optuna.trial import TrialState  # here: Budget itself is built by `--help` without Optuna

    status = trial.user_attrs.get(STATUS_ATTR)
    if status == SKIPPED:
        return False
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and status is not None


def trial_seconds(trial: FrozenTrial) -> float:
    """Wall-clock of a trial from its start to its end (to now for a running one)."""
    from optuna.trial import TrialState

    if trial.datetime_start is None:
        return 0.0
    end = trial.datetime_complete
    if end is None:
        if trial.state != TrialState.RUNNING:
            return 0.0
        end = datetime.datetime.now()
    return max((end - trial.datetime_start).total_seconds(), 0.0)


def trial_nfe(trial: FrozenTrial) -> int:
    """NFE the trial recorded (0 for objectives that record none; so far for a running one)."""
    return int(trial.user_attrs.get("nfe_total", 0) or 0)


def trial_work(trial: FrozenTrial) -> float:
    """Work the trial recorded (0 for objectives that record none; so far for a running one)."""
    return float(trial.user_attrs.get("work", 0) or 0)


def spent(
    trials: Iterable[FrozenTrial],
    *,
    since: int = 0,
    exclude: int | None = None,
    running: bool = True,
) -> Spent:
    """Sum trials, NFE, work and wall-clock over the trials that count (see :func:`counts`).

    Args:
        trials: the study's trials.
        since: only trials numbered ``since`` or later (one session of the study).
        exclude: leave out the trial with this number (the caller's own).
        running: count running trials too, with what they reported so far.
    """
    from optuna.trial import TrialState

    total = Spent()
    for trial in trials:
        if (since > 0 and trial.number < since) or (exclude is not None and trial.number == exclude):
            continue
        is_running = trial.state == TrialState.RUNNING
        if (is_running and running) or counts(trial):
            total = total + Spent(
                1, trial_nfe(trial), trial_seconds(trial), trial_work(trial), int(is_running)
            )
    return total
