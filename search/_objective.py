"""The objective of a study: one training run per trial, with pruning and budget cut-off.

:class:`TrainingObjective` turns an Optuna trial into a :class:`snopt.RunConfig`, trains
it with :func:`snopt.run_training`, reports every validation metric to the trial (so that
Optuna's pruners work for every strategy) and records what the run cost as user
attributes of the trial:

``snopt_status``  completed, pruned, failed or budget (stopped where the budget ran out)
``fail_reason``   why a failed trial failed (solver error, non-finite loss)
``nfe_total``     forward plus backward function evaluations (also ``nfe_forward``, ``nfe_backward``)
``train_time``    training wall-clock, evaluation excluded (also ``eval_time``, ``steps``)
``t1_initial``, ``t1_final``  the horizon at the start and end of training (mean over blocks)
``t1_trajectory`` ``{"step", "nfe", "t1"}`` lists, at most 64 points
``curve``         ``{"step", "nfe", "metric"}`` at every evaluation
``hyperparams``   every searched value, sampled or default
``strategy``      the strategy of the study
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna

from snopt._ode import SolverError
from snopt._run import RunConfig, build_run, run_training
from snopt._training import Callback, FitResult, Status, StopTraining, TrainingError, jsonable

from ._budget import STATUS_ATTR, Budget, Spent
from ._space import HORIZON, SearchSpace
from ._strategies import check_strategy, control_of, sampled_names

#: ``factory(trial, config) -> callbacks`` attached to the training run of each trial
#: (e.g. an MLflow logger that opens one nested run per trial).
TrialCallbacksFactory = Callable[[optuna.trial.BaseTrial, RunConfig], Sequence[Callback]]

_MAX_POINTS = 64


class TrialFailed(RuntimeError):
    """A trial's training failed (solver error or non-finite loss); the study goes on."""


class PruningCallback(Callback):
    """Report each validation metric to an Optuna trial and prune when its pruner says so.

    Usable on its own with :func:`snopt.fit`: ``result = fit(..., callbacks=[PruningCallback(trial)])``
    ends with ``result.status == "pruned"`` when the pruner stops it (training raises its own
    :class:`snopt.StopTraining`, not Optuna's exception); :meth:`raise_if_pruned` then raises
    ``optuna.TrialPruned`` for Optuna.

    Args:
        trial: the Optuna trial (a ``FixedTrial`` never prunes).
        key: the record key reported (``"metric"``, or ``"val_loss"``).
    """

    def __init__(self, trial: optuna.trial.BaseTrial, key: str = "metric") -> None:
        self.trial = trial
        self.key = key

    def on_evaluate(self, trainer: Any, record: dict[str, float]) -> None:
        """Report ``record[key]`` at the current step; stop training if the pruner says so."""
        value = record.get(self.key)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), int(trainer.step))
        total = getattr(trainer, "total_steps", None)
        if total is not None and trainer.step >= total:
            return  # the run is over: pruning now would discard a finished result
        if self.trial.should_prune():
            raise StopTraining(Status.PRUNED, f"pruned at step {trainer.step} with {self.key}={value:.6g}")

    @staticmethod
    def raise_if_pruned(result: FitResult) -> FitResult:
        """Raise ``optuna.TrialPruned`` for a pruned ``result``; return any other result."""
        if result.status == Status.PRUNED:
            raise optuna.TrialPruned(result.message)
        return result


class _TrialMonitor(Callback):
    """Collect the horizon trajectory and the evaluation curve; stop where the budget ends."""

    def __init__(self, budget: Budget | None, spent: Spent | None) -> None:
        self.budget = budget
        self.spent = spent or Spent()
        self.start = time.perf_counter()
        self.trajectory: dict[str, list[float]] = {"step": [], "nfe": [], "t1": []}
        self.curve: dict[str, list[float]] = {"step": [], "nfe": [], "metric": []}
        self.t1_initial: float | None = None
        self.result: FitResult | None = None
        self.last_record: dict[str, float] = {}
        self.stopped = False

    def on_fit_start(self, trainer: Any) -> None:
        horizons = trainer.horizons()
        if horizons:
            self.t1_initial = _mean(horizons.values())
            self._point(0, 0, self.t1_initial)

    def on_step_end(self, trainer: Any, record: dict[str, float]) -> None:
        self.last_record = record
        t1 = [v for k, v in record.items() if k == "t1" or k.startswith("t1/")]
        if t1:
            self._point(record["step"], record.get("nfe_total", 0), _mean(t1))
        b = self.budget
        if b is None:
            return
        nfe = self.spent.nfe + int(record.get("nfe_total", 0))
        seconds = self.spent.wall_time + (time.perf_counter() - self.start)
        if (b.nfe is not None and nfe >= b.nfe) or (b.timeout is not None and seconds >= b.timeout):
            self.stopped = True
            raise StopTraining(Status.BUDGET, f"budget ({b.describe()}) exhausted at step {record['step']}")

    def on_evaluate(self, trainer: Any, record: dict[str, float]) -> None:
        if "metric" in record:
            self.curve["step"].append(int(trainer.step))
            self.curve["nfe"].append(int(record.get("nfe_total", 0)))
            self.curve["metric"].append(float(record["metric"]))

    def on_fit_end(self, trainer: Any, result: FitResult) -> None:
        self.result = result
        # A run pruned at an evaluation ends before that step's on_step_end: add its last point.
        last = trainer.history[-1] if trainer.history else None
        if last is not None and (not self.trajectory["step"] or self.trajectory["step"][-1] != last["step"]):
            self.last_record = last
            t1 = [v for k, v in last.items() if k == "t1" or k.startswith("t1/")]
            if t1:
                self._point(last["step"], last.get("nfe_total", 0), _mean(t1))

    def _point(self, step: float, nfe: float, t1: float) -> None:
        self.trajectory["step"].append(int(step))
        self.trajectory["nfe"].append(int(nfe))
        self.trajectory["t1"].append(float(t1))

    def thinned_trajectory(self) -> dict[str, list[float]]:
        """At most 64 points, first and last kept."""
        n = len(self.trajectory["step"])
        if n <= _MAX_POINTS:
            return self.trajectory
        idx = sorted({round(i * (n - 1) / (_MAX_POINTS - 1)) for i in range(_MAX_POINTS)})
        return {k: [v[i] for i in idx] for k, v in self.trajectory.items()}


def _evaluate(run: Any) -> dict[str, float]:
    """Validation metrics of a run stopped mid-training (the trainer only evaluates at its checkpoints)."""
    return dict(run.task.evaluate(run.model, run.val_loader))


def _mean(values: Any) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


class TrainingObjective:
    """An Optuna objective that trains one model per trial.

    Args:
        config: the base run; the strategy and the sampled parameters override it.
        space: the search space.
        strategy: one of :data:`STRATEGIES`; it decides which parameters the trial
            samples and whether a controller moves T (``feedback``, ``gradient``, ``hybrid``).
        budget: the study's budget; a trial that crosses its NFE or time limit is
            stopped there, evaluated, and recorded with status ``budget``.
        spent_fn: returns what the study had spent before this trial (for ``budget``).
        trial_callbacks_factory: ``factory(trial, config) -> callbacks`` added to each
            training run (e.g. MLflow logging).
        progress: show the training progress bar of each trial.

    Calling the objective with a trial returns the final validation metric of the run
    (its direction is :attr:`direction`).  Training errors (solver failure, non-finite
    loss) raise :class:`TrialFailed` with the reason, after recording it.
    """

    def __init__(
        self,
        config: RunConfig,
        space: SearchSpace,
        strategy: str = "tpe",
        *,
        budget: Budget | None = None,
        spent_fn: Callable[[], Spent] | None = None,
        trial_callbacks_factory: TrialCallbacksFactory | None = None,
        progress: bool = False,
    ) -> None:
        if not isinstance(config, RunConfig):
            raise TypeError(f"`config` must be a snopt.RunConfig, but got {type(config).__name__}.")
        if not isinstance(space, SearchSpace):
            raise TypeError(f"`space` must be a SearchSpace, but got {type(space).__name__}.")
        self.strategy = check_strategy(strategy)
        space.validate_for(config)
        self.config = config
        self.space = space
        self.budget = budget
        self.spent_fn = spent_fn
        self.trial_callbacks_factory = trial_callbacks_factory
        self.progress = progress
        from snopt._tasks import get_task

        self.task = get_task(config.task, **config.task_kwargs)

    @property
    def direction(self) -> str:
        """``"maximize"`` when the task's metric is higher-is-better, else ``"minimize"``."""
        return "maximize" if self.task.higher_is_better else "minimize"

    @property
    def metric_name(self) -> str:
        """Name of the task's validation metric."""
        return str(self.task.metric_name)

    def sampled_names(self) -> list[str]:
        """The parameters this strategy samples."""
        return sampled_names(self.strategy, self.space)

    def hyperparams(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Every parameter of the space for ``trial``: sampled ones asked from it, the rest defaults."""
        return self.space.suggest(trial, self.sampled_names())

    def config_for(self, values: dict[str, Any]) -> RunConfig:
        """The run of a trial with parameter ``values``: the strategy's control and T bounds set."""
        config = self.space.apply(self.config, values)
        control = control_of(self.strategy)
        data = config.to_dict()
        data["control"] = control
        bounds = self.space.horizon_bounds()
        if control != "fixed" and bounds is not None and config.t1_bounds is None:
            data["t1_bounds"] = list(bounds)
        return RunConfig.from_dict(data)

    def __call__(self, trial: optuna.trial.BaseTrial) -> float:
        values = self.hyperparams(trial)
        config = self.config_for(values)
        trial.set_user_attr("strategy", self.strategy)
        trial.set_user_attr("hyperparams", jsonable(values))
        spent = self.spent_fn() if (self.spent_fn is not None and self.budget is not None) else None
        monitor = _TrialMonitor(self.budget, spent)
        callbacks: list[Callback] = [monitor, PruningCallback(trial)]
        if self.trial_callbacks_factory is not None:
            callbacks.extend(self.trial_callbacks_factory(trial, config))
        status, reason, value = "completed", "", math.nan
        final: dict[str, float] = {}
        run = None
        try:
            run = build_run(config)
            result = run_training(config, callbacks=callbacks, progress=self.progress, run=run)
            if result.status == Status.INTERRUPTED:
                status, reason = "interrupted", result.message
                raise KeyboardInterrupt(result.message)
            PruningCallback.raise_if_pruned(result)
            if result.status == Status.BUDGET:
                raise StopTraining(Status.BUDGET, result.message)
            final = dict(result.final)
        except optuna.TrialPruned:
            status = "pruned"
            raise
        except StopTraining as exc:
            status, reason = "budget", exc.message
            try:
                final = _evaluate(run)
            except (SolverError, ValueError, RuntimeError) as err:
                status, reason = (
                    "failed",
                    f"evaluation after the budget stop failed: {type(err).__name__}: {err}",
                )
                raise TrialFailed(reason) from None
        except (TrainingError, SolverError) as exc:
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
            raise TrialFailed(reason) from None
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except Exception as exc:  # a bug or bad input, not solver trouble: record it, then stop the study
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if status != "interrupted":
                self._record(trial, status, reason, monitor, final, config)
        value = float(final.get("metric", math.nan))
        if not math.isfinite(value):
            reason = f"the validation metric is {value}"
            trial.set_user_attr(STATUS_ATTR, "failed")
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason)
        return value

    def _record(
        self,
        trial: optuna.trial.BaseTrial,
        status: str,
        reason: str,
        monitor: _TrialMonitor,
        final: dict[str, float],
        config: RunConfig,
    ) -> None:
        stats: dict[str, Any] = dict(monitor.result.stats) if monitor.result is not None else {}
        attrs: dict[str, Any] = {
            STATUS_ATTR: status,
            "nfe_total": int(stats.get("nfe_total", monitor.last_record.get("nfe_total", 0))),
            "nfe_forward": int(stats.get("nfe_forward", 0)),
            "nfe_backward": int(stats.get("nfe_backward", 0)),
            "steps": int(stats.get("steps", 0)),
            "train_time": float(stats.get("wall_time", 0.0)),
            "eval_time": float(stats.get("eval_time", 0.0)),
            "t1_initial": monitor.t1_initial if monitor.t1_initial is not None else float(config.t1),
            "t1_trajectory": monitor.thinned_trajectory(),
            "curve": monitor.curve,
        }
        traj = monitor.trajectory["t1"]
        attrs["t1_final"] = traj[-1] if traj else float(config.t1)
        if "metric" in final:
            attrs["metric"] = float(final["metric"])
        if "val_loss" in final:
            attrs["val_loss"] = float(final["val_loss"])
        if reason:
            attrs["fail_reason" if status == "failed" else "stop_reason"] = reason
        for key, value in attrs.items():
            trial.set_user_attr(key, jsonable(value))


class CustomObjective:
    """Wrap a user objective ``f(trial) -> float`` so its failures are recorded like training ones.

    The objective may record its cost with ``trial.set_user_attr("nfe_total", n)`` for NFE
    budgets and reports; ``t1_final`` likewise for the horizon plots.
    """

    def __init__(self, func: Callable[[optuna.trial.BaseTrial], float], strategy: str = "tpe") -> None:
        if not callable(func):
            raise TypeError(f"`objective` must be callable, but got {type(func).__name__}.")
        self.func = func
        self.strategy = check_strategy(strategy)

    def __call__(self, trial: optuna.trial.BaseTrial) -> float:
        trial.set_user_attr("strategy", self.strategy)
        try:
            value = self.func(trial)
        except optuna.TrialPruned:
            trial.set_user_attr(STATUS_ATTR, "pruned")
            raise
        except (TrainingError, TrialFailed) as exc:
            trial.set_user_attr(STATUS_ATTR, "failed")
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            raise TrialFailed(str(exc)) from None
        trial.set_user_attr(STATUS_ATTR, "completed")
        if HORIZON in trial.params and "t1_final" not in trial.user_attrs:
            trial.set_user_attr("t1_final", float(trial.params[HORIZON]))
        return value
