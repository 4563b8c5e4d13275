"""The objective of a study: one training run per trial, with pruning and budget cut-off.

:class:`TrainingObjective` turns an Optuna trial into a :class:`snopt.RunConfig`, trains
it with :func:`snopt.run_training`, reports every validation metric to the trial (so that
Optuna's pruners work for every strategy) and records what the run cost as user
attributes of the trial:

``snopt_status``  completed, pruned, failed or budget (stopped where the budget ran out)
``fail_reason``   why a failed trial failed: the solver's or the loop's own message, the
                  signal that interrupted it (SIGTERM, SIGINT), or why a resumed study
                  failed it (its process is gone, or its heartbeat stopped)
``stop_reason``   why a pruned trial stopped (the pruner, or which budget ran out)
``nfe_total``     forward plus backward function evaluations (also ``nfe_forward``, ``nfe_backward``)
``work``          multiply-adds of the fields' layers over those evaluations (:mod:`snopt._work`)
``train_time``    training wall-clock, evaluation excluded (also ``eval_time``, ``steps``)
``t1_initial``, ``t1_final``  the horizon at the start and end of training (mean over blocks)
``t1_final/<block>``, ``t1_initial/<block>``  the same per ODE block
``inference_nfe`` forward NFE of the trained model on one validation batch (the cost side)
``t1_trajectory`` ``{"step", "nfe", "work", "t1"}`` lists (``t1`` the block mean, plus
                  ``t1/<block>`` per block), at most 64 points
``curve``         ``{"step", "nfe", "work", "metric"}`` at every evaluation
``hyperparams``   every searched value, sampled or default
``strategy``      the strategy of the study

Trial states are honest: a run stopped by the budget is *pruned* (Optuna's ``PRUNED``;
its truncated metric is reported as an intermediate value and kept as ``metric``, never
as a result), a solver failure or non-finite loss is ``FAIL`` with the solver's message,
and only a run that trained every planned step is ``COMPLETE``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from snopt._ode import SolverError, ode_blocks
from snopt._run import RunConfig, build_run, run_training
from snopt._signals import Terminated, deferred_signals, interrupt_reason
from snopt._training import Callback, FitResult, Status, StopTraining, TrainingError, jsonable
from snopt._work import WorkCounter

from ._budget import STATUS_ATTR, Budget, Spent
from ._space import HORIZON, HORIZON_PREFIX, SearchSpace
from ._strategies import START, check_strategy, control_of, sampled_names

#: ``factory(trial, config) -> callbacks`` attached to the training run of each trial
#: (e.g. an MLflow logger that opens one nested run per trial).
TrialCallbacksFactory = Callable[[optuna.trial.BaseTrial, RunConfig], Sequence[Callback]]
#: ``limits(own_trial_number) -> [(budget, spent by the other trials), ...]``.
LimitsFn = Callable[[int | None], Sequence[tuple[Budget, Spent]]]
#: The objectives a study may optimise: the validation metric, and the inference NFE.
OBJECTIVES = ("metric", "nfe")
#: Controller updates an in-training trial gets before a pruner judges it.
PRUNE_AFTER_UPDATES = 3

_MAX_POINTS = 64


class TrialFailed(RuntimeError):
    """A trial's training failed (solver error or non-finite loss); the study goes on."""


def record_interrupt(trial: optuna.trial.BaseTrial, exc: BaseException) -> None:
    """Record in ``fail_reason`` why an interrupted trial fails: the signal, and where it stopped.

    An interrupted trial keeps no ``snopt_status``, so that it does not count against the
    budget and a resumed study runs it again.  A reason recorded first (the trainer's, which
    names the checkpoint) is kept.
    """
    try:
        if not getattr(trial, "user_attrs", {}).get("fail_reason"):
            trial.set_user_attr("fail_reason", interrupt_reason(exc))
    except Exception:  # noqa: BLE001 - the storage may be what failed; the trial fails either way
        pass


#: Settings of a run that say where it checkpoints: a study's trials never take them from the
#: study (its database may be shared or planted); each trial has its own interrupt checkpoint.
CHECKPOINT_SETTINGS = ("checkpoint", "resume", "checkpoint_every")
#: The folder, under the working directory of the process that runs a trial, of its checkpoint.
CHECKPOINT_DIR = "snopt_checkpoints"


def check_study_config(config: RunConfig) -> RunConfig:
    """A study's base run: without a checkpoint path or resume (every trial has its own path)."""
    if config.checkpoint is not None or config.resume:
        raise ValueError(
            "`checkpoint` and `resume` of a study's RunConfig must be left unset: every trial checkpoints "
            f"on its own (on Ctrl-C or SIGTERM, to ./{CHECKPOINT_DIR}/<study>/trial-<n>.pt), but got "
            f"checkpoint={config.checkpoint!r}, resume={config.resume}."
        )
    return config


def study_config(data: Mapping[str, Any]) -> RunConfig:
    """The base run a study stored, without any checkpoint setting (a database says nothing of files)."""
    return RunConfig.from_dict({k: v for k, v in data.items() if k not in CHECKPOINT_SETTINGS})


def interrupt_checkpoint(trial: optuna.trial.BaseTrial) -> Path:
    """Where ``trial`` saves itself when interrupted: ``./snopt_checkpoints/<study>/trial-<n>.pt``.

    Under this process's working directory, by study and trial number, so that workers never
    share a file, and never derived from what the study's database holds but its name.
    """
    study = getattr(getattr(trial, "study", None), "study_name", None) or "no-study"
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", str(study)).lstrip(".") or "study"
    return Path.cwd() / CHECKPOINT_DIR / folder / f"trial-{_number(trial) or 0}.pt"


def check_objectives(objectives: Sequence[str] | str) -> tuple[str, ...]:
    """Validate ``objectives`` (names from :data:`OBJECTIVES`, the metric first)."""
    if isinstance(objectives, str):
        objectives = [s.strip() for s in objectives.split(",") if s.strip()]
    names = tuple(objectives)
    if not names or names[0] != "metric" or len(set(names)) != len(names):
        raise ValueError(
            f"`objectives` must start with 'metric' and name each of {list(OBJECTIVES)} at most once, "
            f"but got objectives={list(names)}."
        )
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ValueError(f"Unknown objectives {unknown}; valid ones are {list(OBJECTIVES)}.")
    return names


def check_trial_budget(budget: Budget | None) -> Budget | None:
    """Validate a per-trial budget: a :class:`Budget` without ``n_trials``, or None."""
    if budget is None:
        return None
    if not isinstance(budget, Budget):
        raise TypeError(f"`trial_budget` must be a Budget or None, but got {type(budget).__name__}.")
    if budget.n_trials is not None:
        raise ValueError(
            "`trial_budget` limits one trial's NFE, work or seconds; it takes no n_trials, "
            f"but got n_trials={budget.n_trials}."
        )
    return budget


class PruningCallback(Callback):
    """Report each validation metric to an Optuna trial and prune when its pruner says so.

    Usable on its own with :func:`snopt.fit`: ``result = fit(..., callbacks=[PruningCallback(trial)])``
    ends with ``result.status == "pruned"`` when the pruner stops it (training raises its own
    :class:`snopt.StopTraining`, not Optuna's exception); :meth:`raise_if_pruned` then raises
    ``optuna.TrialPruned`` for Optuna.

    Args:
        trial: the Optuna trial (a ``FixedTrial`` never prunes).
        key: the record key reported (``"metric"``, or ``"val_loss"``).
        min_step: the pruner is not asked before this training step (an in-training trial
            waits for its controller's warm-up and first updates); values are still reported.
    """

    def __init__(self, trial: optuna.trial.BaseTrial, key: str = "metric", min_step: int = 0) -> None:
        self.trial = trial
        self.key = key
        self.min_step = int(min_step)

    def on_evaluate(self, trainer: Any, record: dict[str, float]) -> None:
        """Report ``record[key]`` at the current step; stop training if the pruner says so."""
        value = record.get(self.key)
        if value is None or not math.isfinite(value):
            return
        with deferred_signals():  # a stop waits for the storage write under way
            self.trial.report(float(value), int(trainer.step))
        total = getattr(trainer, "total_steps", None)
        if total is not None and trainer.step >= total:
            return  # the run is over: pruning now would discard a finished result
        if trainer.step < self.min_step:
            return
        with deferred_signals():
            prune = self.trial.should_prune()
        if prune:
            raise StopTraining(Status.PRUNED, f"pruned at step {trainer.step} with {self.key}={value:.6g}")

    @staticmethod
    def raise_if_pruned(result: FitResult) -> FitResult:
        """Raise ``optuna.TrialPruned`` for a pruned ``result``; return any other result."""
        if result.status == Status.PRUNED:
            raise optuna.TrialPruned(result.message)
        return result


def _block_t1(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k == HORIZON or k.startswith(HORIZON_PREFIX)}


class _TrialMonitor(Callback):
    """Count work, collect the horizons and the curve, stop where a budget ends, report progress."""

    def __init__(
        self,
        trial: optuna.trial.BaseTrial,
        limits: LimitsFn | None,
        refresh_every: int = 5,
        trial_budget: Budget | None = None,
    ) -> None:
        self.trial = trial
        self.trial_budget = trial_budget if trial_budget is not None and trial_budget.limited else None
        self.limits_fn = limits
        self.limits: Sequence[tuple[Budget, Spent]] = limits(_number(trial)) if limits else ()
        self.refresh_every = max(int(refresh_every), 1)
        self.start = time.perf_counter()
        self.trajectory: dict[str, list[float]] = {"step": [], "nfe": [], "work": [], "t1": []}
        self.curve: dict[str, list[float]] = {"step": [], "nfe": [], "work": [], "metric": []}
        self.t1_initial: dict[str, float] = {}
        self.last_t1: dict[str, float] = {}
        self.result: FitResult | None = None
        self.last_record: dict[str, float] = {}
        self.counter: WorkCounter | None = None
        self.stopped = False

    @property
    def work(self) -> float:
        return float(self.counter.total) if self.counter is not None else 0.0

    def on_fit_start(self, trainer: Any) -> None:
        self.counter = WorkCounter(trainer.model).attach()
        horizons = trainer.horizons()
        if horizons:
            self.t1_initial = dict(horizons)
            self._point(0, 0, horizons)

    def on_step_end(self, trainer: Any, record: dict[str, float]) -> None:
        self.last_record = record
        t1 = _block_t1(record)
        if t1:
            self._point(record["step"], record.get("nfe_total", 0), t1)
        if not self.limits and self.trial_budget is None:
            return
        step = int(record["step"])
        nfe = int(record.get("nfe_total", 0))
        if self.limits and step % self.refresh_every == 0:
            self._progress(nfe)
            if self.limits_fn is not None:
                self.limits = self.limits_fn(_number(self.trial))
        self._check_budgets(nfe)

    def on_solve(self, trainer: Any) -> None:
        # Inside a solve: a diverging or very tight solve is stopped where the budget ends.
        if self.limits or self.trial_budget is not None:
            self._check_budgets(trainer.nfe_so_far)

    def _check_budgets(self, nfe: int) -> None:
        """Stop training (status ``budget``) when the trial's or the study's budget is spent."""
        own = Spent(1, nfe, time.perf_counter() - self.start, self.work)
        if self.trial_budget is not None:
            crossed = self.trial_budget.crossed(own)
            if crossed is not None:
                self.stopped = True
                raise StopTraining(Status.BUDGET, f"the trial's budget ran out ({crossed})")
        for budget, others in self.limits:
            crossed = budget.crossed(others + own)
            if crossed is not None:
                self.stopped = True
                raise StopTraining(Status.BUDGET, f"the study's budget ran out ({crossed})")

    def _progress(self, nfe: int) -> None:
        # Other workers count what this running trial spent so far against the budget.
        try:
            with deferred_signals():  # a stop waits for the storage write under way
                self.trial.set_user_attr("nfe_total", nfe)
                self.trial.set_user_attr("work", self.work)
        except Exception:  # noqa: BLE001 - progress is advisory; a storage hiccup must not kill the trial
            pass

    def on_evaluate(self, trainer: Any, record: dict[str, float]) -> None:
        if "metric" in record:
            self.curve["step"].append(int(trainer.step))
            self.curve["nfe"].append(int(record.get("nfe_total", 0)))
            self.curve["work"].append(self.work)
            self.curve["metric"].append(float(record["metric"]))

    def on_fit_end(self, trainer: Any, result: FitResult) -> None:
        self.result = result
        if self.counter is not None:
            self.counter.detach()
        # A run pruned at an evaluation ends before that step's on_step_end: add its last point.
        last = trainer.history[-1] if trainer.history else None
        if last is not None and (not self.trajectory["step"] or self.trajectory["step"][-1] != last["step"]):
            self.last_record = last
            t1 = _block_t1(last)
            if t1:
                self._point(last["step"], last.get("nfe_total", 0), t1)

    def _point(self, step: float, nfe: float, t1: Mapping[str, float]) -> None:
        self.trajectory["step"].append(int(step))
        self.trajectory["nfe"].append(int(nfe))
        self.trajectory["work"].append(self.work)
        self.trajectory["t1"].append(_mean(t1.values()))
        self.last_t1 = dict(t1)
        if len(t1) > 1:
            for key, value in t1.items():
                self.trajectory.setdefault(key, []).append(float(value))

    def final_horizons(self) -> dict[str, float]:
        """``t1/<block>`` (``t1`` for a bare block) -> the last recorded horizon of each block."""
        return dict(self.last_t1)

    def thinned_trajectory(self) -> dict[str, list[float]]:
        """At most 64 points, first and last kept."""
        n = len(self.trajectory["step"])
        if n <= _MAX_POINTS:
            return self.trajectory
        idx = sorted({round(i * (n - 1) / (_MAX_POINTS - 1)) for i in range(_MAX_POINTS)})
        return {k: [v[i] for i in idx] for k, v in self.trajectory.items()}


def _number(trial: optuna.trial.BaseTrial) -> int | None:
    number = getattr(trial, "number", None)
    return int(number) if number is not None else None


def _mean(values: Any) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


def _truncated_evaluation(run: Any) -> dict[str, float]:
    """The validation metrics of a run cut by a budget; none where its solves fail (SolverError)."""
    try:
        return dict(run.task.evaluate(run.model, run.val_loader))
    except SolverError:
        return {}


def _inference_nfe(run: Any) -> int:
    """Forward NFE of the model on the first validation batch (what one prediction costs)."""
    import torch

    blocks = [b for _, b in ode_blocks(run.model)]
    before = sum(b.totals.nfe_forward for b in blocks)
    batch = next(iter(run.val_loader))
    device = next(run.model.parameters()).device
    was = run.model.training
    run.model.eval()
    try:
        with torch.no_grad():
            run.task.loss(run.model, run.task.batch_to(batch, device))
    finally:
        run.model.train(was)
    return int(sum(b.totals.nfe_forward for b in blocks) - before)


class TrainingObjective:
    """An Optuna objective that trains one model per trial.

    Args:
        config: the base run; the strategy and the sampled parameters override it.
        space: the search space.
        strategy: one of :data:`STRATEGIES`; it decides which parameters the trial
            samples, whether a controller moves the horizons and where they start.
        budget: the study's budget; a trial that crosses its NFE, work or time limit is
            stopped there, evaluated, and pruned with status ``budget``.
        spent_fn: returns what the study had spent before this trial (for ``budget``).
        trial_callbacks_factory: ``factory(trial, config) -> callbacks`` added to each
            training run (e.g. MLflow logging).
        progress: show the training progress bar of each trial.
        objectives: ``("metric",)`` (default), or ``("metric", "nfe")`` for a Pareto
            search of the validation metric against the inference NFE (minimised).
        limits: ``limits(own_trial_number) -> [(budget, spent by other trials), ...]``;
            replaces ``budget``/``spent_fn`` (a :class:`Study` passes its session and total
            budgets, with running trials counted).
        trial_budget: what one trial may spend (NFE, work, seconds; no ``n_trials``); a
            trial that crosses it is stopped there and pruned with status ``budget``.

    Every budget is checked inside the ODE solves too (every few field evaluations, see
    :meth:`snopt.Callback.on_solve`), so a diverging or very tight solve is stopped within
    a few evaluations of the limit, not at the end of its training step.

    Calling the objective with a trial returns the final validation metric of the run
    (with ``objectives=("metric", "nfe")`` the pair (metric, inference NFE)).  Training
    errors (solver failure, non-finite loss) raise :class:`TrialFailed` with the solver's
    message, after recording it.
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
        objectives: Sequence[str] = ("metric",),
        limits: LimitsFn | None = None,
        trial_budget: Budget | None = None,
    ) -> None:
        if not isinstance(config, RunConfig):
            raise TypeError(f"`config` must be a snopt.RunConfig, but got {type(config).__name__}.")
        if not isinstance(space, SearchSpace):
            raise TypeError(f"`space` must be a SearchSpace, but got {type(space).__name__}.")
        check_study_config(config)
        self.strategy = check_strategy(strategy)
        self.trial_budget = check_trial_budget(trial_budget)
        space.validate_for(config)
        self.config = config
        self.space = space
        self.budget = budget
        self.spent_fn = spent_fn
        self.objectives = check_objectives(objectives)
        if limits is None and budget is not None and budget.limited:

            def limits(_number: int | None) -> list[tuple[Budget, Spent]]:
                return [(budget, spent_fn() if spent_fn is not None else Spent())]

        self.limits = limits
        self.trial_callbacks_factory = trial_callbacks_factory
        self.progress = progress
        from snopt._tasks import get_task

        self.task = get_task(config.task, **config.task_kwargs)

    @property
    def direction(self) -> str:
        """``"maximize"`` when the task's metric is higher-is-better, else ``"minimize"``."""
        return "maximize" if self.task.higher_is_better else "minimize"

    @property
    def directions(self) -> list[str]:
        """One direction per objective (the inference NFE is minimised)."""
        return [self.direction if name == "metric" else "minimize" for name in self.objectives]

    @property
    def metric_name(self) -> str:
        """Name of the task's validation metric."""
        return str(self.task.metric_name)

    @property
    def metric_names(self) -> list[str]:
        """The objectives' names, for ``study.set_metric_names``."""
        return [self.metric_name if name == "metric" else "inference_nfe" for name in self.objectives]

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

    def prune_after(self, config: RunConfig) -> int:
        """The first step a pruner may judge: after warm-up plus 3 controller updates (in-training)."""
        if config.control == "fixed":
            return 0
        return int(config.t1_warmup) + PRUNE_AFTER_UPDATES * int(config.t1_every)

    def start_horizons(self, trial: optuna.trial.BaseTrial, blocks: Sequence[str]) -> dict[str, float]:
        """Block name -> the horizon a trial of an in-training strategy starts from.

        ``feedback``/``gradient``: the final horizons of the best complete trial so far
        (per block); ``feedback-only``/``gradient-only``: the defaults for the first trial,
        then a log-uniform draw in the horizon range (seeded by the run seed and the trial
        number); ``hybrid`` and the first trial: the defaults.
        """
        defaults = self.space.block_horizons(self.space.defaults(), blocks)
        start = START.get(self.strategy)
        number = _number(trial) or 0
        bounds = self.space.horizon_bounds()
        if start == "best":
            best = _best_final_horizons(trial, self.directions[0] == "maximize")
            if best:
                low, high = bounds if bounds is not None else (0.0, math.inf)
                return {b: min(max(best.get(b, defaults.get(b, 1.0)), low), high) for b in blocks}
        if start == "random" and number > 0 and bounds is not None:
            rng = np.random.default_rng([int(self.config.seed), number])
            value = float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))
            return dict.fromkeys(blocks, value)
        return defaults

    def __call__(self, trial: optuna.trial.BaseTrial) -> float | tuple[float, ...]:
        values = self.hyperparams(trial)
        config = self.config_for(values)
        trial.set_user_attr("strategy", self.strategy)
        trial.set_user_attr("hyperparams", jsonable(values))
        monitor = _TrialMonitor(trial, self.limits, trial_budget=self.trial_budget)
        single = len(self.objectives) == 1
        callbacks: list[Callback] = [monitor]
        if single:
            callbacks.append(PruningCallback(trial, min_step=self.prune_after(config)))
        if self.trial_callbacks_factory is not None:
            callbacks.extend(self.trial_callbacks_factory(trial, config))
        status, reason = "completed", ""
        final: dict[str, float] = {}
        run = None
        try:
            run = build_run(config)
            self._set_horizons(trial, run, values)
            result = run_training(
                config,
                callbacks=callbacks,
                progress=self.progress,
                run=run,
                interrupt_checkpoint=interrupt_checkpoint(trial),
            )
            if result.status == Status.INTERRUPTED:
                status, reason = "interrupted", result.message
                # Re-raised with its signal, for the trial's reason and the exit status.
                raise Terminated(result.signal or "SIGINT", result.message)
            if result.status == Status.PRUNED:
                status, reason = "pruned", result.message
            elif result.status == Status.BUDGET:
                status, reason = "budget", result.message
            final = dict(result.final)
            if status == "budget" and int(result.stats.get("steps", 0)) > 0:
                final.update(_truncated_evaluation(run))
            if "nfe" in self.objectives or status == "completed":
                final["inference_nfe"] = _inference_nfe(run)
        except (TrainingError, SolverError) as exc:
            status = "failed"
            partial = getattr(exc, "result", None)
            reason = partial.message if partial is not None and partial.message else str(exc)
        except KeyboardInterrupt as exc:
            status = "interrupted"
            record_interrupt(trial, exc)
            raise
        except Exception as exc:  # a bug or bad input, not solver trouble: record it, then stop the study
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if status != "interrupted":
                self._record(trial, status, reason, monitor, final, config)
        return self._outcome(trial, status, reason, final, monitor)

    def _outcome(
        self,
        trial: optuna.trial.BaseTrial,
        status: str,
        reason: str,
        final: Mapping[str, float],
        monitor: _TrialMonitor,
    ) -> float | tuple[float, ...]:
        """The trial's value(s), or the exception that gives it its honest state."""
        if status == "failed":
            raise TrialFailed(reason)
        value = float(final.get("metric", math.nan))
        if status in ("pruned", "budget"):
            if status == "budget" and len(self.objectives) == 1 and math.isfinite(value):
                # The truncated run's score is an intermediate value, never a result.
                step = int(monitor.last_record.get("step", 0))
                if step not in monitor.curve["step"]:
                    trial.report(value, step)
            raise optuna.TrialPruned(reason)
        if not math.isfinite(value):
            reason = f"the validation metric is {value}"
            trial.set_user_attr(STATUS_ATTR, "failed")
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason)
        if len(self.objectives) == 1:
            return value
        return tuple(value if n == "metric" else float(final["inference_nfe"]) for n in self.objectives)

    def _set_horizons(self, trial: optuna.trial.BaseTrial, run: Any, values: Mapping[str, Any]) -> None:
        """Per-block horizons: sampled ``t1/<block>`` (black-box) or the strategy's start (in-training)."""
        blocks = dict(ode_blocks(run.model))
        if run.config.control == "fixed":
            chosen = self.space.block_horizons(values, list(blocks))
            chosen = {b: v for b, v in chosen.items() if HORIZON_PREFIX + b in values}
        else:
            chosen = self.start_horizons(trial, list(blocks))
        for name, value in chosen.items():
            blocks[name].set_t1(float(value))

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
        initial = monitor.t1_initial
        attrs: dict[str, Any] = {
            STATUS_ATTR: status,
            "nfe_total": int(stats.get("nfe_total", monitor.last_record.get("nfe_total", 0))),
            "nfe_forward": int(stats.get("nfe_forward", 0)),
            "nfe_backward": int(stats.get("nfe_backward", 0)),
            "work": monitor.work,
            "steps": int(stats.get("steps", 0)),
            "train_time": float(stats.get("wall_time", 0.0)),
            "eval_time": float(stats.get("eval_time", 0.0)),
            "t1_initial": _mean(initial.values()) if initial else float(config.t1),
            "t1_trajectory": monitor.thinned_trajectory(),
            "curve": monitor.curve,
        }
        traj = monitor.trajectory["t1"]
        attrs["t1_final"] = traj[-1] if traj else float(config.t1)
        for key, value in monitor.final_horizons().items():
            attrs["t1_final/" + _block_of(key)] = value
        for key, value in initial.items():
            attrs["t1_initial/" + _block_of(key)] = value
        for key in ("metric", "val_loss", "inference_nfe"):
            if key in final:
                attrs[key] = float(final[key])
        if reason:
            attrs["fail_reason" if status == "failed" else "stop_reason"] = reason
        for key, value in attrs.items():
            trial.set_user_attr(key, jsonable(value))


def _block_of(key: str) -> str:
    """``t1/blocks.0`` -> ``blocks.0``; ``t1`` (a bare ODEBlock) -> ``""``."""
    return key[len(HORIZON_PREFIX) :] if key.startswith(HORIZON_PREFIX) else ""


def _best_final_horizons(trial: optuna.trial.BaseTrial, maximize: bool) -> dict[str, float]:
    """Block name -> final horizon of the best complete trial of ``trial``'s study (empty if none)."""
    study = getattr(trial, "study", None)
    if study is None:
        return {}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    scored = [t for t in complete if t.values and math.isfinite(t.values[0])]
    if not scored:
        return {}
    best = max(scored, key=lambda t: t.values[0] if maximize else -t.values[0])
    prefix = "t1_final/"
    out = {k[len(prefix) :]: float(v) for k, v in best.user_attrs.items() if k.startswith(prefix)}
    if not out and "t1_final" in best.user_attrs:
        out[""] = float(best.user_attrs["t1_final"])
    return out


class CustomObjective:
    """Wrap a user objective ``f(trial) -> float`` so its failures are recorded like training ones.

    The objective may record its cost with ``trial.set_user_attr("nfe_total", n)`` for NFE
    budgets and reports; ``t1_final`` likewise for the horizon plots.
    """

    def __init__(self, func: Callable[[optuna.trial.BaseTrial], Any], strategy: str = "tpe") -> None:
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
