"""Subcommands ``snopt search``, ``snopt compare`` and ``snopt worker``.

``snopt compare`` with no arguments compares feedback, TPE, GP and random search on the
digits task with a small budget (a few minutes on 2 CPU cores) and prints where the
report is.  The strategy of a study sets ``--control``: in-training strategies use their
controller, black-box ones a fixed T.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import TYPE_CHECKING, Any

from .._checks import writable_dir
from .._config import RunConfig
from .._redact import redact_url
from ..search._budget import Budget
from ..search._choices import (
    BLACK_BOX,
    DEFAULT_EPSILON,
    DEFAULT_STORAGE,
    DEFAULT_STRATEGIES,
    HORIZON,
    PRUNERS,
    STRATEGIES,
    STRATEGY_HELP,
    TRIAL_FACTOR,
)
from ._base import (
    Command,
    UsageError,
    _nonneg_float,
    _positive_float,
    _positive_int,
    add_run_arguments,
    config_from_args,
    nonempty,
    print_table,
)
from ._tracking import add_tracking_arguments, study_tracker, where_logged

if TYPE_CHECKING:  # imported in run(): `--help` must not load Optuna or torch
    from ..search import SearchSpace, Study

#: In-training strategies whose other hyperparameters a black-box sampler picks (``--sampler``).
TUNING_IN_TRAINING = ("feedback", "gradient", "hybrid")

#: The training run of every trial of ``snopt compare`` unless flags change it: 60 steps of
#: digits, evaluated every 20 steps (the pruner's checkpoints).  The controller runs with the
#: library's defaults (:data:`snopt._defaults.CONTROL`), the same as ``snopt.Controller`` and
#: ``snopt train``.  Shorter runs leave the feedback policy no room to settle (one epoch of 12
#: steps cost it its place in the comparison).
COMPARE_DEFAULTS = RunConfig(
    task="digits",
    epochs=None,
    max_steps=60,
    batch_size=64,
    eval_every=20,
)
#: ``snopt compare``'s default budget per strategy (and seed), in work (multiply-adds of the
#: fields' layers, fair across widths), or 75 s of trials, whichever comes first.  One trial of
#: the default configuration (width 8, tolerance 1e-2, 60 steps) costs 1.34e10 work (2,580
#: NFE), so 1.2e11 is about nine of them, what the old 24,000-NFE budget bought.
COMPARE_BUDGET = {"work": 1.2e11, "timeout": 75.0}
SEARCH_DEFAULTS = COMPARE_DEFAULTS
SEARCH_BUDGET = {"n_trials": 10}


def _strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown strategies {unknown}; choose from {','.join(STRATEGIES)}")
    return names


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def _objectives(text: str) -> str:
    from ..search._objective import check_objectives  # here: `--help` must not load torch

    try:
        check_objectives(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_budget_arguments(
    parser: argparse.ArgumentParser, defaults: dict[str, Any], trial_default: str = "none"
) -> None:
    g = parser.add_argument_group(
        "budget (per study; whichever runs out first)",
        f"default when none is given: {Budget(**defaults).describe()}",
    )
    g.add_argument("--n-trials", type=_positive_int, default=None, help="finished trials")
    g.add_argument(
        "--budget-nfe", type=_positive_int, default=None, help="cumulative NFE (forward + backward)"
    )
    g.add_argument(
        "--timeout", type=_positive_float, default=None, help="cumulative trial wall-clock in seconds"
    )
    g.add_argument(
        "--budget-work",
        type=_positive_float,
        default=None,
        help="cumulative work: multiply-adds of the fields' Linear/Conv layers over every evaluation",
    )
    g.add_argument(
        "--total",
        default=None,
        metavar="SPEC",
        help="cap on each study as a whole over every run, e.g. n_trials=20 or work=1e12,nfe=50000 "
        "(by default every run continues the study and spends its budget again, as Optuna does)",
    )
    auto = (
        f"; 'auto': {TRIAL_FACTOR:g}x what one trial of the space's default configuration costs, on "
        "the axes the budget limits (run once before the studies, not counted), so that one expensive "
        "configuration cannot take a whole budget"
        if trial_default == "auto"
        else ""
    )
    g.add_argument(
        "--trial-budget",
        default=trial_default,
        metavar="SPEC",
        help="cap on each trial, checked inside its ODE solves, e.g. nfe=20000 or timeout=60,work=1e10 "
        f"(a trial that reaches it is pruned); 'none': no cap{auto}",
    )


def _budget(args: argparse.Namespace, defaults: dict[str, Any]) -> Budget:
    if (
        args.n_trials is None
        and args.budget_nfe is None
        and args.timeout is None
        and args.budget_work is None
    ):
        return Budget(**defaults)
    return Budget(n_trials=args.n_trials, nfe=args.budget_nfe, timeout=args.timeout, work=args.budget_work)


def _total(args: argparse.Namespace) -> Budget | None:
    return _budget_spec("--total", args.total, ("n_trials", "nfe", "timeout", "work"))


def _trial_budget(args: argparse.Namespace) -> Budget | None:
    if args.trial_budget == "none":
        return None
    return _budget_spec("--trial-budget", args.trial_budget, ("nfe", "timeout", "work"))


def _compare_trial_budget(args: argparse.Namespace) -> Budget | str | None:
    """Compare's ``--trial-budget``: 'auto' (its default) as is, else as search reads it."""
    return "auto" if args.trial_budget == "auto" else _trial_budget(args)


def _budget_spec(flag: str, spec: str | None, keys: tuple[str, ...]) -> Budget | None:
    """A :class:`Budget` from ``key=value,...`` (None when the flag is not given)."""
    if spec is None:
        return None
    values: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, _, text = item.partition("=")
        if key not in keys or not text:
            forms = {"n_trials": "n_trials=N", "nfe": "nfe=N", "timeout": "timeout=S", "work": "work=W"}
            listed = ", ".join(forms[k] for k in keys[:-1]) + f" or {forms[keys[-1]]}"
            raise UsageError(f"{flag} items must be {listed}, but got {item!r}.")
        try:
            values[key] = int(text) if key in ("n_trials", "nfe") else float(text)
        except ValueError:
            raise UsageError(f"{flag} item {item!r} must have a number.") from None
    try:
        return Budget(**values)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from exc


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("study")
    g.add_argument(
        "--space",
        default=None,
        metavar="SPEC",
        help="search space, e.g. t1=0.25:4:log,lr=1e-3:5e-2:log,width=4:32:int:log,tol=1e-3:1e-1:log "
        "(default: T, learning rate, width and tolerance of the task)",
    )
    g.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help="Optuna storage URL (sqlite:///file.db, postgresql://user:pw@host/db, mysql://...)",
    )
    g.add_argument("--pruner", choices=PRUNERS, default="median", help="pruner of every study")
    g.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="processes per study on this machine, sharing it through --storage",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--sampler",
        choices=BLACK_BOX,
        default=None,
        help="the sampler that picks the other hyperparameters of the in-training strategies "
        f"({', '.join(TUNING_IN_TRAINING)}; default tpe); black-box strategies keep their own",
    )


def _sampler_kwargs(sampler: str | None, strategy: str) -> dict[str, Any] | None:
    """``{"sampler": name}`` for an in-training strategy when ``--sampler`` is given, else None."""
    return {"sampler": sampler} if sampler is not None and strategy in TUNING_IN_TRAINING else None


def _task_config(args: argparse.Namespace) -> RunConfig:
    from ..search._objective import check_study_config

    _quiet_optuna()
    config = config_from_args(args)
    try:  # only a --config file can set them here
        return check_study_config(config)
    except ValueError as exc:
        raise UsageError(f"--config: {exc}") from None


def _check_storage(args: argparse.Namespace) -> None:
    """A bad storage URL is a usage error, reported before any work (nothing is created here)."""
    from ..search._storage import check_storage

    try:
        check_storage(args.storage)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _quiet_optuna() -> None:
    # Optuna logs every trial at INFO; the progress bars and the final table say it better.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space_for(args: argparse.Namespace, config: RunConfig) -> SearchSpace:
    """The ``--space`` of ``args`` (default: the task's), parsed and checked against ``config``."""
    from ..search import SearchSpace, default_space

    try:
        space = SearchSpace.parse(args.space) if args.space is not None else default_space(config.task)
    except ValueError as exc:
        raise UsageError(f"--space: {exc}") from exc
    try:
        space.validate_for(config)
    except ValueError as exc:
        raise UsageError(f"--space: {exc}") from exc
    return space


def _trial_rows(study: Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {
            "trial": t.number,
            "state": t.state.name.lower(),
            study.metric_name: t.value,
            "T0": t.user_attrs.get("t1_initial", t.params.get(HORIZON)),
            "T": t.user_attrs.get("t1_final", t.params.get(HORIZON)),
            "nfe": t.user_attrs.get("nfe_total"),
        }
        for k, v in t.user_attrs.get("hyperparams", t.params).items():
            if k != HORIZON:
                row[k] = v
        if t.user_attrs.get("fail_reason"):
            row["reason"] = str(t.user_attrs["fail_reason"])[:60]
        rows.append(row)
    return rows


def _print_study(study: Study) -> None:
    print_table(
        _trial_rows(study),
        title=f"study {study.study_name} ({study.strategy}) in {redact_url(study.storage_url)}",
    )
    try:
        best = study.best_trial
    except ValueError:
        print("no trial completed")
        return
    t1 = best.user_attrs.get("t1_final", best.params.get(HORIZON))
    print(
        f"best: trial {best.number}, {study.metric_name}={best.value:.6g}, T={t1}, "
        f"hyperparameters={best.user_attrs.get('hyperparams', best.params)}"
    )


def _print_where(tracker: Any, what: str, storage: str) -> None:
    """The closing lines of a study command: where the studies and the MLflow runs are."""
    from .._redact import redact_url

    print(
        f"Optuna studies in {redact_url(storage)}; browse them with `optuna-dashboard {redact_url(storage)}`"
    )
    if tracker is not None:
        print(
            where_logged(
                tracker.parent_run_id, tracker.tracking_uri, what=what, experiment=tracker.experiment
            )
        )


class SearchCommand(Command):
    """``snopt search``: one study of one strategy."""

    name = "search"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_run_arguments(parser, defaults=SEARCH_DEFAULTS)
        parser.add_argument(
            "--strategy",
            choices=STRATEGIES,
            default="tpe",
            help="search strategy: " + "; ".join(f"{k}: {v}" for k, v in STRATEGY_HELP.items()),
        )
        parser.add_argument(
            "--study-name",
            type=nonempty,
            default=None,
            help="study name (default: <task>-<strategy>-s<seed>)",
        )
        _add_budget_arguments(parser, SEARCH_BUDGET)
        _add_study_arguments(parser)
        add_tracking_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        from ..search import create_study, run_workers

        config = _task_config(args)
        space = _space_for(args, config)
        try:
            budget = _budget(args, SEARCH_BUDGET)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        total, trial_budget = _total(args), _trial_budget(args)
        _check_storage(args)
        tracker = study_tracker(
            args,
            kind="study",
            name=args.study_name or f"{config.task} · {args.strategy} · seed {config.seed}",
            tags={"task": config.task, "strategy": args.strategy, "optimizer": config.optimizer},
            params={
                "strategy": args.strategy,
                "budget": budget.describe(),
                "config": config.resolved().to_dict(),
            },
        )
        try:
            study = create_study(
                config,
                strategy=args.strategy,
                trial_callbacks_factory=tracker,
                space=space,
                budget=budget,
                storage=args.storage,
                study_name=args.study_name,
                seed=config.seed,
                pruner=args.pruner,
                progress=not args.no_progress,
                total=total,
                trial_budget=trial_budget,
                sampler_kwargs=_sampler_kwargs(args.sampler, args.strategy),
            )
        except ValueError as exc:  # e.g. a study of that name with other settings
            raise UsageError(str(exc)) from exc
        before = len(study.trials)
        print(
            f"study {study.study_name!r} ({args.strategy}, budget {budget.describe()} per run) in "
            f"{redact_url(study.storage_url)}; {before} trials there before this run"
        )
        with tracker or contextlib.nullcontext():
            if tracker is not None:
                tracker.start(study)
            if args.workers > 1:
                run_workers(
                    study, args.workers, progress=not args.no_progress, trial_callbacks_factory=tracker
                )
            else:
                study.optimize()
            if tracker is not None:
                tracker.on_study_end(study)
        _print_study(study)
        print(f"trials: {len(study.trials) - before} ran now, {before} were there before")
        _print_where(tracker, "study", args.storage)
        return 0


class CompareCommand(Command):
    """``snopt compare``: every strategy under one budget, with a report."""

    name = "compare"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_run_arguments(parser, defaults=COMPARE_DEFAULTS)
        parser.add_argument(
            "--strategies",
            type=_strategies,
            default=list(DEFAULT_STRATEGIES),
            help="comma-separated, from "
            + "; ".join(f"{k}: {v}" for k, v in STRATEGY_HELP.items())
            + f" (default: {','.join(DEFAULT_STRATEGIES)})",
        )
        parser.add_argument(
            "--seeds",
            type=_seeds,
            default=None,
            help="comma-separated seeds, one study per strategy and seed (default: --seed)",
        )
        parser.add_argument(
            "--study-name",
            type=nonempty,
            default=None,
            help="prefix of the study names <name>-<strategy>-s<seed> (default: the task)",
        )
        parser.add_argument(
            "--output-dir",
            type=nonempty,
            default="compare_report",
            help="where report.md/.json and PNGs go (checked to be writable before any trial)",
        )
        parser.add_argument(
            "--epsilon",
            type=_nonneg_float,
            default=DEFAULT_EPSILON,
            help="'reached' means within epsilon of the seed's best black-box value",
        )
        parser.add_argument(
            "--objectives",
            type=_objectives,
            default="metric",
            help="'metric' or 'metric,nfe' (Pareto: the metric against the inference NFE; use "
            "strategies such as feedback,nsga2,tpe)",
        )
        parser.add_argument(
            "--test",
            action="store_true",
            help="retrain each study's best configuration and score it on the task's test split",
        )
        _add_budget_arguments(parser, COMPARE_BUDGET, trial_default="auto")
        _add_study_arguments(parser)
        add_tracking_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        config = _task_config(args)
        space = _space_for(args, config)
        try:
            budget = _budget(args, COMPARE_BUDGET)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        seeds = args.seeds if args.seeds is not None else [config.seed]
        _total(args)  # checked now, before anything is made; _compare parses them again
        _compare_trial_budget(args)
        try:  # checked again by compare(); here it is a usage error, before anything is made
            writable_dir("output_dir", args.output_dir)
        except ValueError as exc:
            raise UsageError(f"--output-dir: {exc}") from None
        _check_storage(args)
        print(
            f"comparing {','.join(args.strategies)} on {config.task}, seeds {seeds}, "
            f"budget {budget.describe()} per strategy and seed; studies in {redact_url(args.storage)}"
        )
        tracker = study_tracker(
            args,
            kind="comparison",
            name=f"compare {args.study_name or config.task}",
            tags={"task": config.task, "optimizer": config.optimizer},
            params={
                "strategies": ",".join(args.strategies),
                "seeds": ",".join(map(str, seeds)),
                "budget": budget.describe(),
                "config": config.resolved().to_dict(),
            },
        )
        with tracker or contextlib.nullcontext():
            report = self._compare(args, config, space, budget, seeds, tracker)
        code = self._print(args, report)
        _print_where(tracker, "comparison", args.storage)
        return code

    def _compare(self, args, config, space, budget, seeds, tracker):  # type: ignore[no-untyped-def]
        from ..search import compare

        return compare(
            config,
            strategies=args.strategies,
            budget=budget,
            seeds=seeds,
            space=space,
            storage=args.storage,
            output_dir=args.output_dir,
            name=args.study_name,
            epsilon=args.epsilon,
            pruner=args.pruner,
            workers=args.workers,
            progress=not args.no_progress,
            total=_total(args),
            trial_budget=_compare_trial_budget(args),
            objectives=args.objectives,
            test=args.test,
            sampler_kwargs={
                s: kw for s in args.strategies if (kw := _sampler_kwargs(args.sampler, s)) is not None
            },
            **(tracker.hooks() if tracker is not None else {}),
        )

    def _print(self, args: argparse.Namespace, report: Any) -> int:
        rows = []
        keep = ("strategy", "n", "best", "test", "work", "nfe", "wall_time_s", "trials", "now", "before")
        for r in report.summary():
            rows.append({k: r[k] for k in (*keep, "pruned", "failed", "reached", "work_to_target")})
        print_table(
            rows,
            title=f"{report.metric_name} ({report.direction}), medians over {len(report.seeds)} seed(s) "
            f"(n = {len(report.seeds)}); target: best black-box value per seed, epsilon {report.epsilon:g}; "
            "trials: now ran / before",
        )
        print(
            f"report written to {os.path.abspath(report.files['markdown'])} "
            f"(also report.json and PNG figures in {os.path.abspath(args.output_dir)})"
        )
        return 0


class WorkerCommand(Command):
    """``snopt worker``: join a study stored in a shared database and run its trials."""

    name = "worker"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--storage", required=True, help="the study's storage URL")
        parser.add_argument("--study", type=nonempty, required=True, help="the study's name")
        parser.add_argument(
            "--n-trials",
            type=_positive_int,
            default=None,
            help="at most this many trials from this worker (default: until the study's budget)",
        )
        parser.add_argument(
            "--timeout",
            type=_positive_float,
            default=None,
            help="stop starting trials after this many seconds",
        )
        parser.add_argument(
            "--worker-index",
            type=int,
            default=None,
            help="decorrelates this worker's sampler from the others (default: from the process id)",
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")
        add_tracking_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        from ..search import load_study

        _quiet_optuna()
        worker = args.worker_index if args.worker_index is not None else os.getpid()
        try:
            study = load_study(
                args.study,
                args.storage,
                worker=worker,
                progress=not args.no_progress,
                trial_callbacks_factory=study_tracker(args, kind="study"),
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        study.optimize(n_trials=args.n_trials, timeout=args.timeout, join=True)
        _print_study(study)
        return 0
