"""``create_study`` / ``load_study``: an ``optuna.Study`` plus a search space, a strategy and a budget.

The :class:`Study` wraps an ``optuna.Study`` (available as ``.study``), so Optuna's
samplers, pruners, storages and optuna-dashboard all work on it.  What a worker on
another machine needs to rebuild the objective (base run, space, strategy, budget,
sampler and pruner arguments, seed) is stored with the study as the user attribute
``snopt``; ``load_study`` reads it back.

Re-runs follow Optuna's convention: each :meth:`Study.optimize` call starts a *session*
that runs the study's budget again (as ``optuna.Study.optimize(n_trials=N)`` runs N more
trials), recorded in the study attribute ``snopt_session`` so that workers can join it;
``total`` caps the study over every session.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from snopt._checks import text
from snopt._progress import progress_bar
from snopt._redact import redact_url
from snopt._run import RunConfig

from ._budget import SKIPPED, STATUS_ATTR, Budget, Spent, counts, spent
from ._objective import (
    CustomObjective,
    TrainingObjective,
    TrialCallbacksFactory,
    TrialFailed,
    check_objectives,
    check_study_config,
    check_trial_budget,
    record_interrupt,
    study_config,
)
from ._space import SearchSpace, block_names, default_space
from ._storage import (
    DEFAULT_STORAGE,
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    fail_interrupted_trials,
    owner_attrs,
    resolve_storage,
    storage_url,
)
from ._strategies import (
    IN_TRAINING,
    check_strategy,
    derive_seed,
    make_pruner,
    make_sampler,
    pruner_spec,
    sampled_names,
    sampler_spec,
)

#: Study user attribute that holds the snopt description of a study.
STUDY_ATTR = "snopt"
#: Study user attribute of the current session: ``{"first_trial": n, "index": k}``.
SESSION_ATTR = "snopt_session"
_FORMAT = 1

Objective = Callable[[optuna.trial.BaseTrial], "float | Sequence[float]"]


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, but got seed={seed!r}.")
    return seed


def _as_budget(budget: Budget | Mapping[str, Any] | None) -> Budget:
    if budget is None:
        return Budget()
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, Mapping):
        unknown = sorted(set(budget) - {"n_trials", "timeout", "nfe", "work"})
        if unknown:
            raise ValueError(
                f"Unknown budget keys {unknown}; valid keys are ['n_trials', 'nfe', 'timeout', 'work']."
            )
        return Budget(**budget)
    raise TypeError(f"`budget` must be a Budget, a dict or None, but got {type(budget).__name__}.")


class Study:
    """A study of one strategy over one search space, wrapping an ``optuna.Study``.

    Build one with :func:`create_study` or :func:`load_study`.  Attributes that Optuna's
    study has and this class does not define (``ask``, ``tell``, ``enqueue_trial``,
    ``trials_dataframe``, ...) are forwarded to it.

    Attributes:
        study: the underlying ``optuna.Study``.
        strategy: the strategy name.
        space: the :class:`SearchSpace`.
        config: the base :class:`snopt.RunConfig` (None for a custom objective).
        budget: the :class:`Budget` of one session (one :meth:`optimize` call and the
            workers that join it).
        total: the :class:`Budget` of the study as a whole, over every session.
        seed: the study seed (sampler and training runs).
        objective: the objective used by :meth:`optimize` when none is passed.
    """

    def __init__(
        self,
        study: optuna.Study,
        *,
        strategy: str,
        space: SearchSpace,
        config: RunConfig | None,
        budget: Budget,
        seed: int,
        objective: Objective | None,
        storage: str | BaseStorage | None,
        metric_name: str = "value",
        progress: bool = False,
        total: Budget | None = None,
    ) -> None:
        self.study = study
        self.total = total if total is not None else Budget()
        self.strategy = strategy
        self.space = space
        self.config = config
        self.budget = budget
        self.seed = seed
        self.objective = objective
        self.metric_name = metric_name
        self.progress = progress
        self._storage = storage

    # ----------------------------------------------------------- Optuna's surface
    @property
    def study_name(self) -> str:
        """The study's name in its storage."""
        return self.study.study_name

    @property
    def storage(self) -> str | BaseStorage | None:
        """The storage this study was opened with: a URL, a storage object, or None (in memory)."""
        return self._storage

    @property
    def storage_url(self) -> str | None:
        """The storage URL (None for in-memory storage)."""
        return storage_url(self._storage)

    @property
    def direction(self) -> optuna.study.StudyDirection:
        """``StudyDirection.MAXIMIZE`` or ``MINIMIZE``."""
        return self.study.direction

    @property
    def trials(self) -> list[FrozenTrial]:
        """Every trial of the study, in creation order."""
        return self.study.trials

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        """Trials, optionally only those in ``states`` (as ``optuna.Study.get_trials``)."""
        return self.study.get_trials(deepcopy=deepcopy, states=states)

    @property
    def best_trial(self) -> FrozenTrial:
        """The best complete trial (``ValueError`` if none completed)."""
        return self.study.best_trial

    @property
    def best_value(self) -> float:
        """Value of :attr:`best_trial`."""
        return self.study.best_value

    @property
    def best_params(self) -> dict[str, Any]:
        """Parameters of :attr:`best_trial` (sampled ones; see ``user_attrs['hyperparams']``)."""
        return self.study.best_params

    @property
    def user_attrs(self) -> dict[str, Any]:
        """The study's user attributes (``snopt`` holds its description)."""
        return self.study.user_attrs

    def __getattr__(self, name: str) -> Any:
        if name == "study":  # not yet set during unpickling
            raise AttributeError(name)
        return getattr(self.study, name)

    def __repr__(self) -> str:
        return (
            f"Study(name={self.study_name!r}, strategy={self.strategy!r}, "
            f"storage={redact_url(self.storage_url)!r}, "
            f"budget={self.budget.describe()!r}, trials={len(self.study.trials)})"
        )

    # ----------------------------------------------------------- budget
    @property
    def session(self) -> dict[str, Any]:
        """The current session: ``first_trial`` (its first trial number) and ``index`` (0, 1, ...)."""
        return dict(self.study.user_attrs.get(SESSION_ATTR) or {"first_trial": 0, "index": 0})

    def begin_session(self) -> dict[str, Any]:
        """Start a session: the budget counts from the next trial on (workers that join share it)."""
        old = self.study.user_attrs.get(SESSION_ATTR)
        index = 0 if old is None else int(old["index"]) + 1
        trials = self.study.get_trials(deepcopy=False)
        # Trials enqueued before this session (WAITING) already have numbers but run in it.
        waiting = [t.number for t in trials if t.state == TrialState.WAITING]
        session = {"first_trial": min(waiting, default=len(trials)), "index": index}
        self.study.set_user_attr(SESSION_ATTR, session)
        return session

    def spent(self, *, session: bool = False, exclude: int | None = None) -> Spent:
        """What the study (or its current session) has spent, running trials included, over every process."""
        since = int(self.session["first_trial"]) if session else 0
        return spent(self.study.get_trials(deepcopy=False), since=since, exclude=exclude)

    def limits(self, exclude: int | None = None) -> list[tuple[Budget, Spent]]:
        """``(budget, spent by trials other than exclude)`` for the session budget and the total."""
        out = []
        if self.budget.limited:
            out.append((self.budget, self.spent(session=True, exclude=exclude)))
        if self.total.limited:
            out.append((self.total, self.spent(exclude=exclude)))
        return out

    def exhausted(self) -> bool:
        """Whether the session's budget or the study's total is spent."""
        return any(budget.exhausted(used) for budget, used in self.limits())

    def _over_trial_budget(self, number: int) -> bool:
        """Whether trials numbered below ``number`` (running ones included) already fill a trial budget."""
        trials = self.study.get_trials(deepcopy=False)
        first = int(self.session["first_trial"])
        for budget, since in ((self.budget, first), (self.total, 0)):
            if budget.n_trials is None:
                continue
            taken = sum(
                1
                for t in trials
                if since <= t.number < number and (t.state == TrialState.RUNNING or counts(t))
            )
            if taken >= budget.n_trials:
                return True
        return False

    def _guarded(self, func: Objective) -> Objective:
        """``func`` behind a check that the trial budget is not taken by running trials.

        The trial records its owner (host and pid) first, so that a resumed study can fail it
        at once if this process dies, and an interrupt (SIGTERM, Ctrl-C) fails it with a reason.
        """

        def objective(trial: optuna.trial.BaseTrial) -> Any:
            try:
                for key, value in owner_attrs().items():
                    trial.set_user_attr(key, value)
                number = getattr(trial, "number", None)
                if number is not None and self._over_trial_budget(int(number)):
                    trial.set_user_attr(STATUS_ATTR, SKIPPED)
                    trial.set_user_attr(
                        "stop_reason", "not run: running trials already took the study's trial budget"
                    )
                    self.study.stop()
                    raise TrialFailed("not run: running trials already took the study's trial budget")
                return func(trial)
            except KeyboardInterrupt as exc:
                record_interrupt(trial, exc)
                raise

        return objective

    # ----------------------------------------------------------- optimize
    def optimize(
        self,
        objective: Objective | None = None,
        n_trials: int | None = None,
        timeout: float | None = None,
        callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
        catch: Iterable[type[Exception]] | type[Exception] = (),
        gc_after_trial: bool = False,
        show_progress_bar: bool | None = None,
        join: bool = False,
    ) -> None:
        """Run the study's budget (again), or until ``n_trials``/``timeout`` of this call or ``total``.

        Over 60 lines only for this docstring (Optuna's arguments and ours); the body is 30.

        Optuna's convention: every call starts a session that may spend the study's
        :attr:`budget` anew, as ``optuna.Study.optimize(n_trials=N)`` runs N more trials
        each time; :attr:`total` caps the study as a whole (so ``total`` = ``budget``
        resumes an interrupted study up to its budget and no further).  Interrupted
        trials left by killed processes are marked failed first, with a ``fail_reason``: at
        once when their process ran on this machine and has ended, else after their
        heartbeat's grace period; finished trials are kept.

        Args:
            objective: ``f(trial) -> float``; default: the study's training objective.
            n_trials: at most this many trials in this call (Optuna's meaning).
            timeout: stop starting trials after this many seconds of this call.
            callbacks: Optuna callbacks ``f(study, frozen_trial)`` after each trial.
            catch: further exception types that fail a trial without stopping the study
                (training errors always do).
            gc_after_trial: run the garbage collector after each trial.
            show_progress_bar: an overall bar over the budget (default: the study's ``progress``).
            join: join the current session instead of starting one (a worker of a session
                that another process started, see :func:`run_workers`).

        Raises:
            ValueError: on ``n_trials``/``timeout`` <= 0, or no objective for a study
                created from a custom objective and loaded without it.
        """
        _check_call_limits(n_trials, timeout)
        func = self._objective_for(objective)
        catch = (catch,) if isinstance(catch, type) else tuple(catch)
        fail_interrupted_trials(self.study)
        if not join:
            self.begin_session()
        if self.exhausted():
            return
        n_trials, timeout = self._within_limits(n_trials, timeout)
        func = self._guarded(func)
        show = self.progress if show_progress_bar is None else show_progress_bar
        bar = _BudgetBar(self, self.spent(session=True)) if show else None
        all_callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [self._after_trial]
        if bar is not None:
            all_callbacks.append(bar)
        all_callbacks.extend(callbacks or ())
        try:
            self.study.optimize(
                func,
                n_trials=n_trials,
                timeout=timeout,
                callbacks=all_callbacks,
                catch=(TrialFailed, *catch),
                gc_after_trial=gc_after_trial,
                show_progress_bar=False,
            )
        finally:
            if bar is not None:
                bar.close()
        fail_interrupted_trials(self.study)

    def _objective_for(self, objective: Objective | None) -> Objective:
        """``objective`` as this study's objective, else the study's training objective."""
        if objective is not None:
            return CustomObjective(objective, self.strategy)
        if self.objective is not None:
            return self.objective
        raise ValueError(
            f"Study {self.study_name!r} was created with a custom objective; "
            "pass it: study.optimize(objective)."
        )

    def _within_limits(self, n_trials: int | None, timeout: float | None) -> tuple[int | None, float | None]:
        """``n_trials`` and ``timeout`` of one ``optimize`` call, cut to what the budgets leave."""
        for budget, used in self.limits():
            if budget.n_trials is not None:
                left = budget.n_trials - used.trials
                n_trials = left if n_trials is None else min(n_trials, left)
            if budget.timeout is not None:
                left_s = budget.timeout - used.wall_time
                timeout = left_s if timeout is None else min(timeout, left_s)
        return n_trials, timeout

    def _after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.exhausted():
            study.stop()


def _check_call_limits(n_trials: Any, timeout: Any) -> None:
    """The ``n_trials`` and ``timeout`` of :meth:`Study.optimize`: positive, or None."""
    if n_trials is not None and (
        isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials <= 0
    ):
        raise ValueError(f"`n_trials` must be a positive integer or None, but got n_trials={n_trials!r}.")
    if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
        raise ValueError(
            f"`timeout` must be a positive number of seconds or None, but got timeout={timeout!r}."
        )


class _BudgetBar:
    """Overall progress bar over the study's budget (NFE, trials or seconds)."""

    def __init__(self, study: Study, before: Spent) -> None:
        b = study.budget
        total: float | None
        initial: float
        if b.work is not None:
            self.unit, total, initial = "work", b.work, before.work
        elif b.nfe is not None:
            self.unit, total, initial = "NFE", b.nfe, before.nfe
        elif b.n_trials is not None:
            self.unit, total, initial = "trial", b.n_trials, before.trials
        elif b.timeout is not None:
            self.unit, total, initial = "s", b.timeout, before.wall_time
        else:
            self.unit, total, initial = "trial", None, before.trials
        self.study = study
        self.bar = progress_bar(total, initial, desc=study.study_name, unit=self.unit)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        now = self.study.spent(session=True)
        value = {"work": now.work, "NFE": now.nfe, "trial": now.trials, "s": now.wall_time}[self.unit]
        if self.bar.total is not None:
            value = min(value, self.bar.total)
        self.bar.n = value
        post = {"trial": trial.number, "state": trial.state.name.lower()}
        try:
            post["best"] = f"{study.best_value:.4g}"
        except (ValueError, RuntimeError):  # none complete yet, or a multi-objective study
            pass
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _description(
    *,
    strategy: str,
    space: SearchSpace,
    config: RunConfig | None,
    budget: Budget,
    seed: int,
    sampler: dict[str, Any],
    pruner: dict[str, Any],
    metric_name: str,
    total: Budget | None = None,
    objectives: Sequence[str] = ("metric",),
    trial_budget: Budget | None = None,
) -> dict[str, Any]:
    from snopt import __version__

    return {
        "format": _FORMAT,
        "snopt_version": __version__,
        "optuna_version": optuna.__version__,
        "strategy": strategy,
        "space": space.to_dict(),
        "config": config.to_dict() if config is not None else None,
        "objective": "training" if config is not None else "custom",
        "budget": budget.to_dict(),
        "total": (total or Budget()).to_dict(),
        "trial_budget": (trial_budget or Budget()).to_dict(),
        "objectives": list(objectives),
        "seed": seed,
        "sampler": sampler,
        "pruner": pruner,
        "metric_name": metric_name,
    }


def _base_config(task: str | RunConfig, seed: int) -> RunConfig:
    if isinstance(task, RunConfig):
        return check_study_config(task)
    from snopt._tasks import TASKS

    if task not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}, a RunConfig or a callable, but got {task!r}.")
    return RunConfig(task=task, seed=seed)


def create_study(
    task: str | RunConfig | Objective = "digits",
    *,
    strategy: str = "tpe",
    space: SearchSpace | None = None,
    budget: Budget | Mapping[str, Any] | None = None,
    storage: str | BaseStorage | None = DEFAULT_STORAGE,
    study_name: str | None = None,
    seed: int = 0,
    pruner: str | None = "median",
    pruner_kwargs: Mapping[str, Any] | None = None,
    sampler_kwargs: Mapping[str, Any] | None = None,
    direction: str | None = None,
    load_if_exists: bool = True,
    worker: int = 0,
    heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
    grace_period: int | None = GRACE_PERIOD,
    trial_callbacks_factory: TrialCallbacksFactory | None = None,
    progress: bool = False,
    total: Budget | Mapping[str, Any] | None = None,
    objectives: Sequence[str] = ("metric",),
    trial_budget: Budget | Mapping[str, Any] | None = None,
) -> Study:
    """Create (or reopen) a study of one strategy over a search space.

    Over 60 lines because it resolves and stores 25 settings, one per line; the rules are
    in ``_check_create_args``, ``_study_target`` and ``_check_existing``.

    Args:
        task: a built-in task name, a base :class:`snopt.RunConfig`, or a custom
            objective ``f(trial) -> float`` (black-box strategies only; it may record
            ``trial.set_user_attr("nfe_total", n)`` for NFE budgets).
        strategy: ``feedback``, ``gradient``, ``tpe``, ``gp``, ``cmaes``, ``random``,
            ``grid`` or ``hybrid`` (see :data:`STRATEGIES`).
        space: the :class:`SearchSpace` (default: :func:`default_space` of the task).
        budget: a :class:`Budget` (or a dict of its fields) for each session: every
            :meth:`Study.optimize` call runs it again (Optuna's convention).
        storage: a database URL (default ``sqlite:///snopt.db``), an Optuna storage, or
            None for in-memory.
        study_name: default ``f"{task}-{strategy}-s{seed}"``.
        seed: seeds the sampler and (for a task) the training runs.
        pruner: ``"median"``, ``"hyperband"`` or ``"none"``/None.
        pruner_kwargs: arguments overriding the pruner's recorded defaults.
        sampler_kwargs: arguments overriding the strategy sampler's recorded defaults
            (e.g. ``{"n_startup_trials": 10}`` for ``tpe``, ``{"grid_size": 4}`` for ``grid``).
        direction: ``"maximize"``/``"minimize"``; default from the task's metric
            (``"minimize"`` for a custom objective).
        load_if_exists: reopen a study of that name (it must have the same strategy,
            space and base run; a new ``budget`` replaces the stored one).
        worker: index of this process among the workers of the study (decorrelates
            their samplers).
        heartbeat_interval: seconds between heartbeats of running trials (RDB storages).
        grace_period: seconds without heartbeat after which a trial counts as interrupted.
        trial_callbacks_factory: ``factory(trial, config) -> callbacks`` attached to each
            training run, e.g. to log every trial to MLflow.
        progress: progress bars (per trial and over the budget).
        total: a :class:`Budget` for the study as a whole, over every session (None: no cap).
        objectives: ``("metric",)``, or ``("metric", "nfe")`` for a multi-objective (Pareto)
            study of the validation metric against the inference NFE.  Optuna cannot prune
            or record intermediate values in a multi-objective study, so the pruner is then
            ``none`` and a budget-cut trial is pruned without an intermediate value.
        trial_budget: a :class:`Budget` (NFE, work, seconds; no ``n_trials``) that each
            trial may spend; a trial that crosses it is stopped inside its solve and pruned.
            Stored with the study, so that its workers enforce it too.

    Returns:
        The :class:`Study`.

    Raises:
        ValueError: on an unknown strategy, pruner, storage scheme or task; a bad space or
            budget; an in-training strategy with a custom objective; or an existing study
            of that name that differs.
    """
    strategy = check_strategy(strategy)
    seed = _check_seed(seed)
    budget = _as_budget(budget)
    total_budget = _as_budget(total)
    per_trial = check_trial_budget(_as_budget(trial_budget))
    objectives = check_objectives(objectives)
    if len(objectives) > 1:
        pruner = None  # Optuna cannot prune multi-objective trials
    custom = callable(task) and not isinstance(task, (str, RunConfig))
    _check_create_args(worker, direction, study_name, custom, per_trial, strategy)
    if space is None:
        if custom:
            raise ValueError("A custom objective needs an explicit `space`.")
        base = _base_config(task, seed)  # type: ignore[arg-type]
        space = default_space(base.task, block_names(base))
    if not isinstance(space, SearchSpace):
        raise TypeError(f"`space` must be a SearchSpace, but got {type(space).__name__}.")
    s_spec = sampler_spec(strategy, sampler_kwargs)
    p_spec = pruner_spec(pruner, pruner_kwargs)
    config, metric_name, default_direction, label = _study_target(task, seed, custom, space)
    direction = direction or default_direction
    study_name = study_name or f"{label}-{strategy}-s{seed}"
    desc = _description(
        strategy=strategy,
        space=space,
        config=config,
        budget=budget,
        seed=seed,
        sampler=s_spec.to_dict(),
        pruner=p_spec.to_dict(),
        metric_name=metric_name,
        total=total_budget,
        objectives=objectives,
        trial_budget=per_trial,
    )
    resolved = resolve_storage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    existing = _existing(study_name, resolved)
    if existing is not None and not load_if_exists:
        raise ValueError(
            f"Study {study_name!r} already exists in {redact_url(storage_url(storage))!r}; "
            "use load_if_exists=True."
        )
    n_existing = (
        0 if existing is None else _check_existing(existing, study_name, desc, direction, len(objectives))
    )
    names = sampled_names(strategy, space)
    sampler = make_sampler(s_spec, space, names, derive_seed(seed, strategy, worker, n_existing))
    directions = [direction] + ["minimize"] * (len(objectives) - 1)
    study = optuna.create_study(
        storage=resolved,
        sampler=sampler,
        pruner=make_pruner(p_spec),
        study_name=study_name,
        directions=directions,  # type: ignore[arg-type]
        load_if_exists=True,
    )
    study.set_user_attr(STUDY_ATTR, desc)
    with warnings.catch_warnings():  # experimental in Optuna, but what optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric_name if o == "metric" else "inference_nfe" for o in objectives])
    wrapper = Study(
        study,
        strategy=strategy,
        space=space,
        config=config,
        budget=budget,
        seed=seed,
        objective=None,
        storage=storage if storage is not None else resolved,
        metric_name=metric_name,
        progress=progress,
        total=total_budget,
    )
    if config is not None:
        wrapper.objective = TrainingObjective(
            config,
            space,
            strategy,
            trial_callbacks_factory=trial_callbacks_factory,
            progress=progress,
            objectives=objectives,
            limits=wrapper.limits if (budget.limited or total_budget.limited) else None,
            trial_budget=per_trial,
        )
    else:
        wrapper.objective = CustomObjective(task, strategy)  # type: ignore[arg-type]
    return wrapper


def _check_create_args(
    worker: Any, direction: Any, study_name: Any, custom: bool, per_trial: Budget | None, strategy: str
) -> None:
    """:func:`create_study`'s argument rules that the helpers it calls do not check."""
    if isinstance(worker, bool) or not isinstance(worker, int) or worker < 0:
        raise ValueError(f"`worker` must be a non-negative integer, but got worker={worker!r}.")
    if direction is not None and direction not in ("maximize", "minimize"):
        raise ValueError(f"`direction` must be 'maximize' or 'minimize', but got direction={direction!r}.")
    if study_name is not None:
        text("study_name", study_name)
    if custom and per_trial is not None and per_trial.limited:
        raise ValueError(
            "`trial_budget` is enforced inside the training solves and needs a task or a RunConfig, "
            "not a custom objective."
        )
    if custom and strategy in IN_TRAINING:
        raise ValueError(
            f"Strategy {strategy!r} controls T inside training and needs a task or a RunConfig, "
            f"not a custom objective; use one of the black-box strategies with it."
        )


def _study_target(
    task: Any, seed: int, custom: bool, space: SearchSpace
) -> tuple[RunConfig | None, str, str, str]:
    """The base run (None for a custom objective), its metric name, default direction and label."""
    config = None if custom else _base_config(task, seed)  # type: ignore[arg-type]
    if config is not None and config.seed != seed:
        # One seed per study: it drives the sampler and every training run.
        data = config.to_dict()
        data["seed"] = seed
        config = RunConfig.from_dict(data)
    if config is not None:
        space.validate_for(config)
        task_obj = _task_of(config)
        metric_name = str(task_obj.metric_name)
        default_direction = "maximize" if task_obj.higher_is_better else "minimize"
        label = config.task
    else:
        metric_name = "value"
        default_direction = "minimize"
        label = getattr(task, "__name__", "objective")
    return config, metric_name, default_direction, label


def _check_existing(
    existing: Any, study_name: str, desc: dict[str, Any], direction: str, n_objectives: int
) -> int:
    """An existing study of that name must be snopt's and compatible; its number of trials."""
    old = existing.user_attrs.get(STUDY_ATTR)
    if old is None:
        raise ValueError(
            f"Study {study_name!r} exists but was not created by snopt; choose another study_name."
        )
    _check_compatible(study_name, old, desc)
    old_directions = [d.name.lower() for d in existing.directions]
    if old_directions[0] != direction or len(old_directions) != n_objectives:
        raise ValueError(f"Study {study_name!r} exists with directions {old_directions}.")
    return len(existing.get_trials(deepcopy=False))


def _task_of(config: RunConfig) -> Any:
    from snopt._tasks import get_task

    return get_task(config.task, **config.task_kwargs)


def _existing(study_name: str, storage: BaseStorage) -> optuna.Study | None:
    try:
        return optuna.load_study(
            study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler()
        )
    except KeyError:
        return None


def _check_compatible(study_name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    keys = ("strategy", "space", "config", "objective", "seed", "sampler", "pruner", "objectives")
    if old.get("config") is not None:
        # A study stored before a setting was added (max_nfe, say) has that setting's default.
        with contextlib.suppress(ValueError, TypeError):
            old = {**old, "config": study_config(old["config"]).to_dict()}
    defaults = {"objectives": ["metric"]}
    differ = [
        k for k in keys if _normalise(old.get(k, defaults.get(k))) != _normalise(new.get(k, defaults.get(k)))
    ]
    if differ:
        raise ValueError(
            f"Study {study_name!r} already exists with a different {', '.join(differ)}; "
            "resume it with the same settings (or load_study), or choose another study_name."
        )


def _normalise(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


def load_study(
    study_name: str,
    storage: str | BaseStorage | None = DEFAULT_STORAGE,
    *,
    objective: Objective | None = None,
    budget: Budget | Mapping[str, Any] | None = None,
    worker: int = 0,
    heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
    grace_period: int | None = GRACE_PERIOD,
    trial_callbacks_factory: TrialCallbacksFactory | None = None,
    progress: bool = False,
    total: Budget | Mapping[str, Any] | None = None,
) -> Study:
    """Reopen a study created by :func:`create_study` from its storage (to resume it or to add a worker).

    Args:
        study_name: the study's name.
        storage: its storage URL or object.
        objective: the custom objective, for a study created from one.
        budget: replace the stored budget of a session (default: keep it).
        total: replace the stored cap on the whole study (default: keep it).
        worker: index of this worker (decorrelates samplers of parallel workers).
        heartbeat_interval, grace_period, trial_callbacks_factory, progress: as in
            :func:`create_study`.

    Returns:
        The :class:`Study`.

    Raises:
        ValueError: if the study does not exist or was not created by snopt.
    """
    resolved = resolve_storage(
        storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period, create=False
    )
    existing, desc = _snopt_study(study_name, resolved, storage)
    config = study_config(desc["config"]) if desc.get("config") is not None else None
    if config is None and objective is None:
        raise ValueError(f"Study {study_name!r} runs a custom objective; pass it as `objective`.")
    return create_study(
        config if config is not None else objective,  # type: ignore[arg-type]
        strategy=desc["strategy"],
        space=SearchSpace.from_dict(desc["space"]),
        budget=_as_budget(budget) if budget is not None else Budget.from_dict(desc["budget"]),
        total=_as_budget(total) if total is not None else Budget.from_dict(desc.get("total")),
        trial_budget=Budget.from_dict(desc.get("trial_budget")),
        objectives=desc.get("objectives", ["metric"]),
        storage=storage if isinstance(storage, (str, type(None))) else resolved,
        study_name=study_name,
        seed=desc["seed"],
        pruner=_pruner_name(desc["pruner"]["class"]),
        pruner_kwargs=desc["pruner"]["kwargs"],
        sampler_kwargs=_sampler_overrides(desc),
        direction=existing.directions[0].name.lower(),
        load_if_exists=True,
        worker=worker,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        trial_callbacks_factory=trial_callbacks_factory,
        progress=progress,
    )


def _snopt_study(
    study_name: str, resolved: BaseStorage, storage: str | BaseStorage | None
) -> tuple[optuna.Study, dict[str, Any]]:
    """The stored study and the description snopt stored with it; ValueError naming what is missing."""
    existing = _existing(study_name, resolved)
    if existing is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(resolved)]
        raise ValueError(
            f"No study named {study_name!r} in {redact_url(storage_url(storage))!r}; studies there: {names}."
        )
    desc = existing.user_attrs.get(STUDY_ATTR)
    if desc is None:
        raise ValueError(
            f"Study {study_name!r} was not created by snopt (it has no {STUDY_ATTR!r} attribute)."
        )
    return existing, desc


def _pruner_name(cls_name: str) -> str:
    return {"NopPruner": "none", "MedianPruner": "median", "HyperbandPruner": "hyperband"}[cls_name]


def _sampler_overrides(desc: Mapping[str, Any]) -> dict[str, Any]:
    return dict(desc["sampler"]["kwargs"])
