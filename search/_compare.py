"""``compare``: every strategy on one task, under one budget, over seeds; then the report.

One Optuna study per strategy and seed, named ``f"{name}-{strategy}-s{seed}"``, in the
given storage.  Running ``compare`` again with the same name continues the studies and runs
their budget again (Optuna's convention for ``optimize``); ``total`` caps each study as a
whole (``total=budget`` resumes an interrupted comparison up to its budget and no further).
The report says what ran in this session and what was there before.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from optuna.storages import BaseStorage

from snopt._checks import text, writable_dir
from snopt._progress import progress_bar
from snopt._redact import redact_url
from snopt._run import RunConfig
from snopt._signals import exit_status, terminate_as_interrupt

from ._budget import Budget
from ._choices import DEFAULT_EPSILON, DEFAULT_STRATEGIES, TRIAL_FACTOR
from ._objective import TrainingObjective, TrialCallbacksFactory, check_objectives
from ._report import ComparisonReport, StudyResult, study_result
from ._space import Float, SearchSpace, block_names, default_space
from ._storage import DEFAULT_STORAGE, GRACE_PERIOD, HEARTBEAT_INTERVAL, storage_url
from ._strategies import IN_TRAINING, STRATEGIES, check_strategy
from ._study import SESSION_ATTR, Objective, Study, _as_budget, create_study, load_study

#: Seconds a stopped worker process gets to fail its trial and end its runs before it is killed.
_WORKER_STOP_S = 60
#: The feedback policy's cost weight swept by in-training strategies in a Pareto comparison.
COST_WEIGHT = Float(1e-3, 1.0, log=True, default=0.1)


def _check_seeds(seeds: Any) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    seeds = list(seeds)
    if not seeds:
        raise ValueError("`seeds` must name at least one seed, but got an empty list.")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"`seeds` must be non-negative integers, but got {s!r} in seeds={seeds}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` must be distinct, but got seeds={seeds}.")
    return seeds


def _check_strategies(strategies: Iterable[str]) -> list[str]:
    if isinstance(strategies, str):
        strategies = [s.strip() for s in strategies.split(",") if s.strip()]
    strategies = list(strategies)
    if not strategies:
        raise ValueError(f"`strategies` must name at least one of {list(STRATEGIES)}, but got an empty list.")
    for s in strategies:
        check_strategy(s)
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"`strategies` must be distinct, but got strategies={strategies}.")
    return strategies


def _check_workers(workers: Any, storage: Any) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be a positive integer, but got workers={workers!r}.")
    if workers > 1 and not isinstance(storage, str):
        raise ValueError(
            "`workers > 1` needs a storage URL that every worker process can open (e.g. sqlite:///x.db)."
        )
    return workers


def compare(
    task_or_objective: str | RunConfig | Objective = "digits",
    strategies: Sequence[str] | str = DEFAULT_STRATEGIES,
    budget: Budget | Mapping[str, Any] | None = None,
    seeds: Sequence[int] | int = (0,),
    *,
    space: SearchSpace | None = None,
    storage: str | BaseStorage | None = DEFAULT_STORAGE,
    output_dir: str | os.PathLike | None = "compare_report",
    name: str | None = None,
    epsilon: float = DEFAULT_EPSILON,
    pruner: str | None = "median",
    pruner_kwargs: Mapping[str, Any] | None = None,
    sampler_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    direction: str | None = None,
    workers: int = 1,
    progress: bool = True,
    heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
    grace_period: int | None = GRACE_PERIOD,
    trial_callbacks_factory: TrialCallbacksFactory | None = None,
    on_study_start: Callable[[Study], None] | None = None,
    on_study_end: Callable[[Study], None] | None = None,
    on_report: Callable[[ComparisonReport], None] | None = None,
    warm_up: bool = True,
    total: Budget | Mapping[str, Any] | None = None,
    objectives: Sequence[str] | str = ("metric",),
    test: bool = False,
    trial_budget: Budget | Mapping[str, Any] | str | None = "auto",
) -> ComparisonReport:
    """Run every strategy under the same budget for every seed and report which found what, at what cost.

    Over 60 lines because it hands 18 settings on to :func:`create_study` for every study,
    one per line; the parts are in ``_check_*``, ``_run_study`` and ``ComparisonReport``.

    Args:
        task_or_objective: a built-in task name, a base :class:`snopt.RunConfig`, or a
            custom objective ``f(trial) -> float`` (black-box strategies only).
        strategies: names from :data:`STRATEGIES` (or one comma-separated string).
        budget: the :class:`Budget` of every study (trials, NFE and/or seconds); required.
        seeds: one study per strategy and seed.
        space: the search space shared by every strategy (default: :func:`default_space`).
        storage: database URL of the studies (default ``sqlite:///snopt.db``), an Optuna
            storage, or None (in-memory).
        output_dir: where ``report.md``, ``report.json`` and the figures go (None: not written).
        name: prefix of the study names (default: the task's name).
        epsilon: tolerance of "came within epsilon of the best value" (metric units).
        pruner, pruner_kwargs: the pruner of every study (``median``, ``hyperband``, ``none``).
        sampler_kwargs: strategy -> arguments overriding its recorded sampler defaults.
        direction: for a custom objective (default ``minimize``).
        workers: processes per study sharing it through the storage (needs a URL).
        progress: progress bars: overall, per study (budget) and per trial (training).
        heartbeat_interval, grace_period: see :func:`create_study`.
        trial_callbacks_factory: ``factory(trial, config) -> callbacks`` for each training
            run (e.g. MLflow nested runs; must be picklable when ``workers > 1``).
        on_study_start, on_study_end: called with each :class:`Study` around its optimization.
        on_report: called with the finished report (after the files are written).  To
            wrap a whole comparison (e.g. in an MLflow parent run), call ``compare`` inside
            that context.
        warm_up: train one step before the first study, so that one-time start-up costs
            (data loading, library initialisation) do not land on the first strategy's clock.
        total: caps each study as a whole over every session (None: no cap; each call runs
            ``budget`` again).
        trial_budget: what each trial of every study may spend (NFE, work, seconds), see
            :func:`create_study`; ``"auto"`` (default): :func:`default_trial_budget`,
            :data:`TRIAL_FACTOR` times what one trial of the space's default configuration
            costs; None: no cap.
        objectives: ``("metric",)``, or ``("metric", "nfe")`` for a Pareto comparison of the
            metric against the inference NFE: black-box strategies (``nsga2`` is NSGA-II,
            ``tpe`` multi-objective TPE) search hyperparameters and horizons; in-training ones
            also sample the feedback policy's cost weight ``t1_penalty`` (a sweep of it,
            :data:`COST_WEIGHT`).  Optuna cannot prune or record intermediate values in
            multi-objective studies, so these run with no pruner.
        test: retrain the best configuration of each study (same seed) and score it on the
            task's held-out test split (:func:`snopt._tasks.test_loader`); not counted in
            the budget.

    Returns:
        The :class:`ComparisonReport` (also written to ``output_dir``).

    Raises:
        ValueError: on unknown strategies, empty or invalid seeds, an unlimited or
            non-positive budget, a bad space, storage scheme or worker count.
    """
    strategies = _check_strategies(strategies)
    seeds = _check_seeds(seeds)
    budget = _as_budget(budget)
    objectives = check_objectives(objectives)
    if not budget.limited:
        raise ValueError(
            "`budget` must set at least one of n_trials, nfe or timeout, "
            "so that every strategy gets the same."
        )
    if isinstance(trial_budget, str) and trial_budget != "auto":
        raise ValueError(
            f"`trial_budget` must be a Budget, a dict, None or 'auto', but got trial_budget={trial_budget!r}."
        )
    workers = _check_workers(workers, storage)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < math.inf:
        raise ValueError(f"`epsilon` must be a finite number >= 0, but got epsilon={epsilon!r}.")
    if output_dir is not None:  # a report folder that cannot be written fails now, not after every study
        writable_dir("output_dir", output_dir)
    if name is not None:
        text("name", name)
    sampler_kwargs = dict(sampler_kwargs or {})
    unknown = sorted(set(sampler_kwargs) - set(strategies))
    if unknown:
        raise ValueError(
            f"`sampler_kwargs` names strategies {unknown} that are not compared; compared: {strategies}."
        )
    name = name if name is not None else _default_name(task_or_objective)

    if warm_up and isinstance(task_or_objective, (str, RunConfig)):
        _warm_up(task_or_objective)
    per_trial = (
        default_trial_budget(task_or_objective, budget, space=space, seed=seeds[0])
        if isinstance(trial_budget, str)  # "auto", checked above
        else trial_budget
    )
    overall = None
    if progress:
        overall = progress_bar(len(seeds) * len(strategies), desc=f"compare {name}", unit="study")
    results = []
    settings: dict[str, Any] = {"samplers": {}}
    metric_name, study_direction = "value", "minimize"
    try:
        for seed in seeds:
            for strategy in strategies:
                study = create_study(
                    task_or_objective,
                    strategy=strategy,
                    space=_strategy_space(task_or_objective, space, strategy, objectives),
                    budget=budget,
                    total=total,
                    trial_budget=per_trial,
                    objectives=objectives,
                    storage=storage,
                    study_name=f"{name}-{strategy}-s{seed}",
                    seed=seed,
                    pruner=pruner,
                    pruner_kwargs=pruner_kwargs,
                    sampler_kwargs=sampler_kwargs.get(strategy),
                    direction=direction,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    trial_callbacks_factory=trial_callbacks_factory,
                    progress=progress,
                )
                if overall is not None:
                    overall.set_postfix({"study": study.study_name}, refresh=True)
                results.append(
                    _run_study(
                        study,
                        strategy,
                        seed,
                        settings,
                        workers,
                        test,
                        progress,
                        trial_callbacks_factory,
                        on_study_start,
                        on_study_end,
                    )
                )
                metric_name, study_direction = study.metric_name, study.directions[0].name.lower()
                if overall is not None:
                    overall.update(1)
    finally:
        if overall is not None:
            overall.close()
    report = ComparisonReport.build(
        name=name,
        metric_name=metric_name,
        direction=study_direction,
        budget=budget.to_dict(),
        epsilon=epsilon,
        studies=results,
        storage=redact_url(storage_url(storage)),
        settings=settings,
        objectives=objectives,
        references=reference_points(task_or_objective, seeds, objectives),
    )
    if output_dir is not None:
        report.write(os.fspath(output_dir))
    if on_report is not None:
        on_report(report)
    return report


def default_trial_budget(
    task: str | RunConfig | Objective,
    budget: Budget | Mapping[str, Any],
    *,
    space: SearchSpace | None = None,
    seed: int = 0,
) -> Budget | None:
    """:data:`TRIAL_FACTOR` times what one trial of the space's default configuration costs.

    The trial runs once, in memory, before the studies, and counts against no budget; the cap is
    set on the axes ``budget`` limits (work, NFE, seconds).

    Returns:
        The per-trial :class:`Budget`; None for a budget in trials alone, a custom objective, or
        a default trial that did not complete (with a warning: there is nothing to scale).
    """
    from optuna.trial import TrialState

    from ._budget import trial_nfe, trial_seconds, trial_work

    budget = _as_budget(budget)
    if not isinstance(task, (str, RunConfig)) or (budget.work, budget.nfe, budget.timeout) == (None,) * 3:
        return None
    config = RunConfig(task=task) if isinstance(task, str) else task
    space = space if space is not None else default_space(config.task, block_names(config))
    probe = create_study(
        config,
        strategy="random",
        space=space,
        budget=Budget(n_trials=1),
        storage=None,
        pruner="none",
        seed=seed,
    )
    probe.enqueue_trial(space.defaults())
    probe.optimize()
    trial = probe.trials[0]
    if trial.state != TrialState.COMPLETE:
        reason = (
            trial.user_attrs.get("fail_reason") or trial.user_attrs.get("stop_reason") or trial.state.name
        )
        warnings.warn(
            f"One trial of the default configuration did not complete ({reason}); "
            "compare runs without a per-trial cap.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None

    def scaled(limit: Any, used: float) -> float | None:
        return TRIAL_FACTOR * used if limit is not None and used > 0 else None

    nfe = scaled(budget.nfe, trial_nfe(trial))
    return Budget(
        work=scaled(budget.work, trial_work(trial)),
        nfe=None if nfe is None else math.ceil(nfe),
        timeout=scaled(budget.timeout, trial_seconds(trial)),
    )


def reference_points(
    task: str | RunConfig | Objective, seeds: Sequence[int], objectives: Sequence[str]
) -> dict[int, tuple[float, float]]:
    """Seed -> the fixed reference point ``(metric, inference NFE)`` of a Pareto comparison.

    It depends on the task alone, so that no strategy's result moves it: the metric of a model
    that learned nothing from its inputs (:meth:`snopt._tasks.Task.null_metric`: chance
    accuracy for a classifier, the variance of the targets for the time series) and the most
    NFE one inference pass can take: ``max_nfe`` per solve (its default when the run sets no
    cap) times the model's ODE blocks.  Empty for a single objective or a custom objective.
    """
    if len(objectives) < 2 or not isinstance(task, (str, RunConfig)):
        return {}
    from snopt._defaults import ODE
    from snopt._tasks import get_task

    config = RunConfig(task=task) if isinstance(task, str) else task
    runner = get_task(config.task, **config.task_kwargs)
    cap = float((config.max_nfe or ODE["max_nfe"]) * len(block_names(config)))
    return {seed: (runner.null_metric(seed=seed), cap) for seed in seeds}


def _default_name(task_or_objective: Any) -> str:
    """A comparison's name: the task's, or the objective function's."""
    if isinstance(task_or_objective, RunConfig):
        return task_or_objective.task
    if isinstance(task_or_objective, str):
        return task_or_objective
    return getattr(task_or_objective, "__name__", "objective")


def _run_study(
    study: Study,
    strategy: str,
    seed: int,
    settings: dict[str, Any],
    workers: int,
    test: bool,
    progress: bool,
    trial_callbacks_factory: Any,
    on_study_start: Callable[[Study], None] | None,
    on_study_end: Callable[[Study], None] | None,
) -> StudyResult:
    """Run one study of a comparison (its settings noted in ``settings``) and summarise it."""
    if on_study_start is not None:
        on_study_start(study)
    if workers > 1:
        run_workers(study, workers, progress=progress, trial_callbacks_factory=trial_callbacks_factory)
    else:
        study.optimize()
    if on_study_end is not None:
        on_study_end(study)
    desc = study.user_attrs["snopt"]
    settings["samplers"][strategy] = desc["sampler"]
    settings["pruner"] = desc["pruner"]
    settings["config"] = desc["config"]
    settings["space"] = desc["space"]
    result = study_result(
        strategy,
        seed,
        study.study_name,
        study.get_trials(),
        study.directions[0].name.lower() == "maximize",
        first_trial=int(study.session["first_trial"]),
    )
    if test and study.config is not None:
        result.retrained = retrain_best(study)
    return result


def _strategy_space(
    task: Any, space: SearchSpace | None, strategy: str, objectives: Sequence[str]
) -> SearchSpace | None:
    """The space of one strategy: in a Pareto comparison in-training ones also sweep the cost weight."""
    if len(objectives) < 2 or strategy not in IN_TRAINING or not isinstance(task, (str, RunConfig)):
        return space
    config = RunConfig(task=task) if isinstance(task, str) else task
    base = space if space is not None else default_space(config.task, block_names(config))
    if "t1_penalty" in base:
        return base
    return SearchSpace({**base.params, "t1_penalty": COST_WEIGHT})


def retrain_best(study: Study) -> dict[str, float] | None:
    """Retrain the best complete trial's configuration (same seed, same start) and score it.

    Returns:
        ``{"val": ..., "test": ...}``: the retrained model's validation metric and its
        metric on the task's held-out test split; None if no trial completed or the task
        has no test split.
    """
    from optuna.trial import TrialState

    from snopt._tasks import test_loader

    objective = study.objective
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    if not complete or not isinstance(objective, TrainingObjective):
        return None
    sign = 1.0 if study.directions[0].name == "MAXIMIZE" else -1.0
    best = max(complete, key=lambda t: sign * t.values[0])
    values = dict(best.user_attrs.get("hyperparams", best.params))
    config = objective.config_for(values)
    try:
        loader = test_loader(objective.task, config.batch_size, seed=config.seed)
    except ValueError:
        return None
    from snopt._ode import ode_blocks
    from snopt._run import build_run, run_training

    run = build_run(config)
    prefix = "t1_initial/"
    starts = {k[len(prefix) :]: float(v) for k, v in best.user_attrs.items() if k.startswith(prefix)}
    for name, block in ode_blocks(run.model):
        if name in starts:
            block.set_t1(starts[name])
    result = run_training(config, progress=False, run=run)
    test = run.task.evaluate(run.model, loader)
    return {"val": float(result.final.get("metric", math.nan)), "test": float(test["metric"])}


def _warm_up(task: str | RunConfig) -> None:
    from snopt._run import run_training

    config = RunConfig(task=task) if isinstance(task, str) else task
    data = config.to_dict()
    data.update(
        lr=config.lr,
        control="fixed",
        max_steps=1,
        epochs=None,
        eval_every=None,
        checkpoint=None,
        resume=False,
    )
    run_training(RunConfig.from_dict(data), progress=False)


def report_from_storage(
    name: str,
    strategies: Sequence[str],
    seeds: Sequence[int],
    storage: str | BaseStorage = DEFAULT_STORAGE,
    *,
    epsilon: float = DEFAULT_EPSILON,
) -> ComparisonReport:
    """Rebuild a comparison's report from its studies in ``storage`` (no training)."""
    import optuna

    strategies = _check_strategies(strategies)
    seeds = _check_seeds(seeds)
    results = []
    settings: dict[str, Any] = {"samplers": {}}
    metric_name, direction = "value", "minimize"
    budget: dict[str, Any] = {}
    objectives: list[str] = ["metric"]
    config: dict[str, Any] | None = None
    for seed in seeds:
        for strategy in strategies:
            study = optuna.load_study(study_name=f"{name}-{strategy}-s{seed}", storage=storage)
            desc = study.user_attrs.get("snopt", {})
            metric_name = desc.get("metric_name", metric_name)
            budget = desc.get("budget", budget)
            objectives = desc.get("objectives", ["metric"])
            config = desc.get("config")
            settings["samplers"][strategy] = desc.get("sampler")
            settings["pruner"] = desc.get("pruner")
            direction = study.directions[0].name.lower()
            session = study.user_attrs.get(SESSION_ATTR) or {"first_trial": 0}
            results.append(
                study_result(
                    strategy,
                    seed,
                    study.study_name,
                    study.get_trials(),
                    direction == "maximize",
                    first_trial=int(session["first_trial"]),
                )
            )
    return ComparisonReport.build(
        name=name,
        metric_name=metric_name,
        direction=direction,
        budget=budget,
        epsilon=epsilon,
        studies=results,
        storage=redact_url(storage_url(storage)),
        settings=settings,
        objectives=objectives,
        references=reference_points(RunConfig.from_dict(config), seeds, objectives) if config else {},
    )


# ------------------------------------------------------------------ workers
def _worker_main(
    study_name: str,
    storage: str,
    worker: int,
    threads: int,
    heartbeat_interval: int | None,
    grace_period: int | None,
    n_trials: int | None,
    timeout: float | None,
    trial_callbacks_factory: TrialCallbacksFactory | None,
) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        with terminate_as_interrupt():
            study = load_study(
                study_name,
                storage,
                worker=worker,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                trial_callbacks_factory=trial_callbacks_factory,
            )
            study.optimize(n_trials=n_trials, timeout=timeout, join=True)
    except KeyboardInterrupt as exc:  # its trial failed with the reason; no traceback
        sys.exit(exit_status(exc))


def run_workers(
    study: Study,
    workers: int,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = False,
    trial_callbacks_factory: TrialCallbacksFactory | None = None,
    heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
    grace_period: int | None = GRACE_PERIOD,
) -> None:
    """Optimize ``study`` with ``workers`` processes on this machine sharing it through its storage.

    This process starts a session (the study's budget runs again, see
    :meth:`Study.optimize`) and is worker 0; ``workers - 1`` more are spawned, each loading
    the study by name and joining that session until its budget (or their own
    ``n_trials``/``timeout``) is spent; running trials count, so they never overshoot a
    trial budget.  The CPU threads are split between them.

    Raises:
        ValueError: if the study has no storage URL.
        RuntimeError: if a worker process exits with an error.
    """
    url = study.storage_url
    workers = _check_workers(workers, url)
    import torch

    threads = max(1, (os.cpu_count() or 1) // workers)
    study.begin_session()
    args = (heartbeat_interval, grace_period, n_trials, timeout, trial_callbacks_factory)
    procs = _spawn_workers(study.study_name, url, workers - 1, threads, args)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    stopping = False
    try:
        study.optimize(n_trials=n_trials, timeout=timeout, show_progress_bar=progress, join=True)
    except KeyboardInterrupt:
        # SIGTERM reaches this process alone: pass it on, so each worker fails its own trial
        # with a reason and ends its MLflow run before this process exits.
        stopping = True
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        torch.set_num_threads(old_threads)
        for p in procs:
            p.join(_WORKER_STOP_S if stopping else None)
            if p.is_alive():
                p.kill()
                p.join()
    bad = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"Worker processes failed: {bad}; see their output above.")


def _spawn_workers(
    study_name: str, url: str | None, count: int, threads: int, args: tuple[Any, ...]
) -> list[Any]:
    """Start ``count`` worker processes (numbered from 1) on the study; ``args`` go to ``_worker_main``."""
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(study_name, url, i, threads, *args), name=f"snopt-worker-{i}")
        for i in range(1, count + 1)
    ]
    for p in procs:
        p.start()
    return procs
