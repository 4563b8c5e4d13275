"""The comparison report: per strategy what was found, at what cost, how fast, and how sure.

Everything is computed from the trials in the Optuna storage.  Trials are put in the
order they finished; a study's cumulative cost on each of the four budget axes is summed
over its trials: *work* (multiply-adds of the fields' layers, :mod:`snopt._work`), *NFE*,
*wall-clock* (each trial from its start to its end, sampling and evaluation included; with
one worker this is the elapsed time) and *trials*.  Only trials that count against the
budget are used (interrupted or skipped ones are not); a re-run's report says how many of
them ran in this session ("now") and how many were there before.

The *target* of a seed is the best value any black-box strategy found with that seed (the
best of all strategies when none is black-box); a study *reaches* it when its best-so-far
comes within ``epsilon`` of it, and the report gives the work, NFE and wall-clock spent up
to and including the trial that did.  Over seeds the report gives medians with percentile
bootstrap 95% intervals, per-seed paired differences against each black-box strategy (with
a bootstrap interval of their mean) and, where the best configurations were retrained,
their score on the held-out test split next to the validation score.  One seed prints
"n = 1", never a spread of zero.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from ._budget import STATUS_ATTR, counts, trial_nfe, trial_seconds, trial_work
from ._choices import BLACK_BOX, HORIZON, STRATEGY_HELP
from ._figures import FIGURES
from ._stats import bootstrap_ci, describe, hypervolume_2d, paired_differences, pareto_front


@dataclass
class StudyResult:
    """One study (one strategy, one seed) of a comparison.

    Attributes:
        strategy, seed, study_name: what ran.
        n_trials, n_complete, n_pruned, n_failed: trials that count, by state.
        n_budget: the pruned trials that the budget cut (status ``budget``); a study whose
            every trial was pruned, failed or cut has no ``best_value``.
        n_before, n_now: counted trials from earlier sessions, and from this one.
        wall_time: summed trial wall-clock in seconds; nfe: summed NFE; work: summed work.
        spent_now: ``{"work", "nfe", "wall_time", "trials"}`` of this session alone.
        best_value: best value of a complete trial (None if none completed).
        best_trial: its number; best_t1: its (final) horizon, the mean over blocks;
            best_t1_blocks: ``block -> final horizon``; best_params: its hyperparameters;
            best_inference_nfe: the forward NFE of its model on one validation batch.
        target: the seed's target; time_to_target, nfe_to_target, work_to_target: cost
            until the best-so-far came within epsilon of it (None if it never did).
        retrained: ``{"val", "test"}`` of the best configuration retrained (None: not done).
        front: the Pareto front ``[(metric, inference NFE), ...]`` of a multi-objective study.
        curve: per counted trial in finishing order: ``trial``, ``state``, ``value``,
            ``cum_time``, ``cum_nfe``, ``cum_work``, ``best`` (best-so-far, None before the first).
        trials: per counted trial: ``number``, ``state``, ``value``, ``t1_initial``,
            ``t1_final``, ``nfe``, ``work``, ``seconds``, ``status``, ``t1_trajectory``.
    """

    strategy: str
    seed: int
    study_name: str
    n_trials: int = 0
    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    n_budget: int = 0
    n_before: int = 0
    n_now: int = 0
    wall_time: float = 0.0
    nfe: int = 0
    work: float = 0.0
    spent_now: dict[str, float] = field(default_factory=dict)
    best_value: float | None = None
    best_trial: int | None = None
    best_t1: float | None = None
    best_t1_blocks: dict[str, float] = field(default_factory=dict)
    best_params: dict[str, Any] = field(default_factory=dict)
    best_inference_nfe: float | None = None
    target: float | None = None
    time_to_target: float | None = None
    nfe_to_target: int | None = None
    work_to_target: float | None = None
    retrained: dict[str, float] | None = None
    front: list[tuple[float, float]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)

    def reach(
        self, target: float, epsilon: float, maximize: bool
    ) -> tuple[float | None, int | None, float | None]:
        """Wall-clock, NFE and work until the best-so-far came within ``epsilon`` of ``target``."""
        for point in self.curve:
            best = point["best"]
            if best is not None and (best >= target - epsilon if maximize else best <= target + epsilon):
                return point["cum_time"], point["cum_nfe"], point.get("cum_work")
        return None, None, None


def _first_value(t: FrozenTrial) -> float | None:
    values = t.values
    return float(values[0]) if values else None


def study_result(
    strategy: str,
    seed: int,
    study_name: str,
    trials: Iterable[FrozenTrial],
    maximize: bool,
    first_trial: int = 0,
) -> StudyResult:
    """Summarise the trials of one study; trials numbered from ``first_trial`` on ran "now"."""
    res = StudyResult(strategy, seed, study_name)
    finished = [t for t in trials if counts(t)]
    finished.sort(key=lambda t: (t.datetime_complete, t.number))
    best: float | None = None
    best_trial: FrozenTrial | None = None
    now = {"work": 0.0, "nfe": 0.0, "wall_time": 0.0, "trials": 0.0}
    points = []
    for t in finished:
        value = _first_value(t)
        res.n_trials += 1
        res.n_complete += t.state == TrialState.COMPLETE
        res.n_pruned += t.state == TrialState.PRUNED
        res.n_failed += t.state == TrialState.FAIL
        res.n_budget += t.state == TrialState.PRUNED and t.user_attrs.get(STATUS_ATTR) == "budget"
        res.wall_time += trial_seconds(t)
        res.nfe += trial_nfe(t)
        res.work += trial_work(t)
        if t.number >= first_trial:
            res.n_now += 1
            now["work"] += trial_work(t)
            now["nfe"] += trial_nfe(t)
            now["wall_time"] += trial_seconds(t)
            now["trials"] += 1
        else:
            res.n_before += 1
        complete = t.state == TrialState.COMPLETE and value is not None and math.isfinite(value)
        if complete and (best is None or (value > best if maximize else value < best)):  # type: ignore[operator]
            best, best_trial = value, t
        if complete and t.values is not None and len(t.values) > 1:
            points.append((float(t.values[0]), float(t.values[1])))
        res.curve.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": value,
                "cum_time": res.wall_time,
                "cum_nfe": res.nfe,
                "cum_work": res.work,
                "best": best,
            }
        )
        res.trials.append(_trial_record(t, value))
    res.spent_now = now
    if best_trial is not None:
        _set_best(res, best, best_trial)
    if points:
        res.front = pareto_front(points, maximize_first=maximize)
    return res


def _trial_record(t: FrozenTrial, value: float | None) -> dict[str, Any]:
    """One counted trial as the report keeps it (``StudyResult.trials``)."""
    return {
        "number": t.number,
        "state": t.state.name,
        "value": value,
        "values": list(t.values) if t.values else None,
        "status": t.user_attrs.get(STATUS_ATTR),
        "t1_initial": t.user_attrs.get("t1_initial", t.params.get(HORIZON)),
        "t1_final": _t1_final(t),
        "t1_final_blocks": _t1_blocks(t),
        "nfe": trial_nfe(t),
        "work": trial_work(t),
        "seconds": trial_seconds(t),
        "inference_nfe": t.user_attrs.get("inference_nfe"),
        "t1_trajectory": t.user_attrs.get("t1_trajectory"),
        "fail_reason": t.user_attrs.get("fail_reason"),
        "stop_reason": t.user_attrs.get("stop_reason"),
    }


def _set_best(res: StudyResult, best: float | None, trial: FrozenTrial) -> None:
    res.best_value = best
    res.best_trial = trial.number
    res.best_t1 = _t1_final(trial)
    res.best_t1_blocks = _t1_blocks(trial)
    res.best_params = dict(trial.user_attrs.get("hyperparams", trial.params))
    inference = trial.user_attrs.get("inference_nfe")
    res.best_inference_nfe = float(inference) if inference is not None else None


def _t1_final(trial: FrozenTrial) -> float | None:
    value = trial.user_attrs.get("t1_final", trial.params.get(HORIZON))
    return None if value is None else float(value)


def _t1_blocks(trial: FrozenTrial) -> dict[str, float]:
    prefix = "t1_final/"
    return {k[len(prefix) :]: float(v) for k, v in trial.user_attrs.items() if k.startswith(prefix)}


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


@dataclass
class ComparisonReport:
    """What every strategy of a comparison found, at what cost, and how sure that is.

    Attributes:
        name: the comparison's name (prefix of its study names).
        metric_name: the validation metric; direction: ``maximize`` or ``minimize``.
        budget: the budget every study got per session; epsilon: the tolerance of "reached".
        targets: seed -> target (best black-box value of that seed); target: their median.
        strategies, seeds: what ran; storage: where the studies are.
        studies: one :class:`StudyResult` per strategy and seed.
        settings: samplers, pruner, base run and space, as recorded in the studies.
        objectives: ``["metric"]`` or ``["metric", "nfe"]`` (a Pareto comparison).
        references: seed -> the fixed reference point ``(metric, inference NFE)`` of its
            hypervolumes (Pareto comparisons of a built-in task; see :meth:`hypervolumes`).
        files: paths written by :meth:`write`.
    """

    name: str
    metric_name: str
    direction: str
    budget: dict[str, Any]
    epsilon: float
    strategies: list[str]
    seeds: list[int]
    storage: str | None
    studies: list[StudyResult]
    target: float | None = None
    targets: dict[int, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    objectives: list[str] = field(default_factory=lambda: ["metric"])
    references: dict[int, tuple[float, float]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def maximize(self) -> bool:
        """Whether larger values are better."""
        return self.direction == "maximize"

    @classmethod
    def build(
        cls,
        *,
        name: str,
        metric_name: str,
        direction: str,
        budget: Mapping[str, Any],
        epsilon: float,
        studies: Sequence[StudyResult],
        storage: str | None,
        settings: Mapping[str, Any] | None = None,
        objectives: Sequence[str] = ("metric",),
        references: Mapping[int, tuple[float, float]] | None = None,
    ) -> ComparisonReport:
        """Fill in each seed's target and each study's cost to reach it."""
        if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and math.isfinite(epsilon)):
            raise ValueError(f"`epsilon` must be a finite number >= 0, but got epsilon={epsilon!r}.")
        maximize = direction == "maximize"
        pick = max if maximize else min
        targets: dict[int, float] = {}
        for seed in sorted({s.seed for s in studies}):
            mine = [s for s in studies if s.seed == seed and s.best_value is not None]
            black = [s for s in mine if s.strategy in BLACK_BOX] or mine
            if black:
                targets[seed] = pick(float(s.best_value) for s in black)  # type: ignore[arg-type]
        for s in studies:
            s.target = targets.get(s.seed)
            if s.target is not None:
                s.time_to_target, s.nfe_to_target, s.work_to_target = s.reach(s.target, epsilon, maximize)
        strategies = list(dict.fromkeys(s.strategy for s in studies))
        seeds = sorted({s.seed for s in studies})
        return cls(
            name=name,
            metric_name=metric_name,
            direction=direction,
            budget=dict(budget),
            epsilon=float(epsilon),
            strategies=strategies,
            seeds=seeds,
            storage=storage,
            studies=list(studies),
            target=_median(list(targets.values())),
            targets=targets,
            settings=dict(settings or {}),
            objectives=list(objectives),
            references={int(k): (float(v[0]), float(v[1])) for k, v in (references or {}).items()},
        )

    # ----------------------------------------------------------- summaries
    def study(self, strategy: str, seed: int) -> StudyResult:
        """The result of one strategy and seed."""
        for s in self.studies:
            if s.strategy == strategy and s.seed == seed:
                return s
        raise KeyError(f"No study for strategy={strategy!r}, seed={seed}.")

    def _runs(self, strategy: str) -> list[StudyResult]:
        return [s for s in self.studies if s.strategy == strategy]

    def summary(self) -> list[dict[str, Any]]:
        """One row per strategy, aggregated over seeds (medians, with bootstrap 95% intervals).

        ``best``: median over seeds of each seed's best validation value, ``best_ci`` its
        interval (None with one seed), ``n`` the seeds with a complete trial (``results``
        ``"n/seeds"``, ``no_result_seeds`` the others); ``test``/
        ``test_ci`` the same for the retrained best configurations on the test split (and
        ``val_retrained`` their validation score); ``T`` the final horizons per block of the
        median seed's best trial; ``work``/``nfe``/``wall_time_s``/``trials_per_seed``
        medians per seed of the four budget axes, and ``trials``/``pruned``/``failed``/
        ``now``/``before``/``budget_cut`` totals; ``reached`` counts seeds that came within epsilon of
        their target, and ``work_to_target``/``nfe_to_target``/``time_to_target_s`` are
        medians over those seeds; ``hypervolume``/``hv_per_work`` the median Pareto
        hypervolume (multi-objective comparisons).
        """
        hv = self.hypervolumes()
        return [self._summary_row(strategy, hv) for strategy in self.strategies]

    def _summary_row(self, strategy: str, hv: Mapping[tuple[str, int], float]) -> dict[str, Any]:
        """The :meth:`summary` row of one strategy (``hv``: :meth:`hypervolumes`)."""
        runs = self._runs(strategy)
        scored = [s for s in runs if s.best_value is not None]
        values = [float(s.best_value) for s in scored]  # type: ignore[arg-type]
        sign = 1.0 if self.maximize else -1.0
        ranked = sorted(scored, key=lambda s: sign * float(s.best_value))  # type: ignore[arg-type]
        median_run = ranked[(len(ranked) - 1) // 2] if ranked else None
        tests = [s.retrained["test"] for s in runs if s.retrained and s.retrained.get("test") is not None]
        vals = [s.retrained["val"] for s in runs if s.retrained and s.retrained.get("val") is not None]
        reached = [s for s in runs if s.work_to_target is not None or s.nfe_to_target is not None]
        hvs = [hv[(strategy, s.seed)] for s in runs if (strategy, s.seed) in hv]
        per_work = [
            h / s.work for s in runs for h in [hv.get((strategy, s.seed))] if h is not None and s.work > 0
        ]
        return {
            "strategy": strategy,
            "n": len(values),
            "results": f"{len(values)}/{len(runs)}",
            "no_result_seeds": [s.seed for s in runs if s.best_value is None],
            "best": _median(values),
            "best_ci": bootstrap_ci(values, np.median),
            "test": _median(tests),
            "test_ci": bootstrap_ci(tests, np.median),
            "n_test": len(tests),
            "val_retrained": _median(vals),
            "T": dict(median_run.best_t1_blocks) if median_run else {},
            "hyperparams": median_run.best_params if median_run else {},
            "inference_nfe": median_run.best_inference_nfe if median_run else None,
            "trials": sum(s.n_trials for s in runs),
            "now": sum(s.n_now for s in runs),
            "before": sum(s.n_before for s in runs),
            "pruned": sum(s.n_pruned for s in runs),
            "failed": sum(s.n_failed for s in runs),
            "budget_cut": sum(s.n_budget for s in runs),
            "work": _median([s.work for s in runs]),
            "nfe": _median([float(s.nfe) for s in runs]),
            "wall_time_s": _median([s.wall_time for s in runs]),
            "trials_per_seed": _median([float(s.n_trials) for s in runs]),
            "reached": f"{len(reached)}/{len(runs)}",
            "work_to_target": _median([float(s.work_to_target) for s in reached if s.work_to_target]),
            "nfe_to_target": _median([float(s.nfe_to_target or 0) for s in reached]),
            "time_to_target_s": _median([float(s.time_to_target or 0.0) for s in reached]),
            "hypervolume": _median(hvs),
            "hv_per_work": _median(per_work),
        }

    def paired(self) -> list[dict[str, Any]]:
        """Per-seed paired differences of every strategy against every black-box one.

        For each pair (``strategy``, ``baseline``): the differences of their best
        validation values over the seeds both have (positive: ``strategy`` is better),
        their mean with a bootstrap 95% interval, and the same for the test scores where
        the best configurations were retrained.
        """
        best = {
            st: {s.seed: float(s.best_value) for s in self._runs(st) if s.best_value is not None}
            for st in self.strategies
        }
        test = {
            st: {s.seed: float(s.retrained["test"]) for s in self._runs(st) if s.retrained}
            for st in self.strategies
        }
        rows = []
        for baseline in [b for b in self.strategies if b in BLACK_BOX]:
            for strategy in [s for s in self.strategies if s != baseline]:
                row: dict[str, Any] = {"strategy": strategy, "baseline": baseline}
                row["val"] = paired_differences(best[strategy], best[baseline], maximize=self.maximize)
                row["test"] = paired_differences(test[strategy], test[baseline], maximize=self.maximize)
                rows.append(row)
        return rows

    def hypervolumes(self) -> dict[tuple[str, int], float]:
        """(strategy, seed) -> hypervolume of its Pareto front against the seed's fixed reference.

        The reference point (:attr:`references`, set by :func:`compare` for a built-in task)
        depends on the task alone, never on what a strategy found: the metric of a model that
        learned nothing (:meth:`snopt._tasks.Task.null_metric`: chance accuracy for a
        classifier) and the most NFE one inference pass can take (``max_nfe`` per solve times
        the model's ODE blocks; a solve over it fails its trial).  The cost axis is
        ``log10`` of the inference NFE: NFE spans orders of magnitude, and on a linear axis up
        to the cap (30,000 on ``multiblock``) fronts at 42 and at 132 NFE would differ by
        0.3%.  Units: metric x decades of NFE.  Points beyond the reference add nothing.  A
        seed without a reference (a custom objective) gets no hypervolume.
        """
        out: dict[tuple[str, int], float] = {}
        if len(self.objectives) < 2:
            return out
        for seed in self.seeds:
            if seed not in self.references:
                continue
            metric_ref, nfe_ref = self.references[seed]
            ref = (metric_ref, math.log10(nfe_ref))
            for s in self.studies:
                if s.seed == seed:
                    points = [(m, math.log10(max(c, 1.0))) for m, c in s.front]
                    out[(s.strategy, seed)] = hypervolume_2d(points, ref, maximize_first=self.maximize)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: settings, targets, summaries and per-study details."""
        return {
            "name": self.name,
            "metric_name": self.metric_name,
            "direction": self.direction,
            "budget": self.budget,
            "epsilon": self.epsilon,
            "target": self.target,
            "targets": {str(k): v for k, v in self.targets.items()},
            "strategies": self.strategies,
            "seeds": self.seeds,
            "storage": self.storage,
            "objectives": self.objectives,
            "settings": self.settings,
            "summary": self.summary(),
            "paired": self.paired(),
            "hypervolumes": {f"{k[0]}/s{k[1]}": v for k, v in self.hypervolumes().items()},
            "hypervolume_references": {str(k): list(v) for k, v in self.references.items()},
            "studies": [asdict(s) for s in self.studies],
            "files": self.files,
        }

    def to_markdown(self) -> str:
        """The report as Markdown: settings, strategies, summary, paired differences, per seed, figures."""
        sections = (self._md_settings, self._md_summary, self._md_paired, self._md_pareto, self._md_per_seed)
        lines = [line for section in sections for line in section()]
        lines += self._md_samplers_and_figures()
        return "\n".join(lines) + "\n"

    def _md_settings(self) -> list[str]:
        b = ", ".join(f"{k}={_fmt(v)}" for k, v in self.budget.items() if v is not None) or "unlimited"
        n = len(self.seeds)
        lines = [
            f"# Comparison `{self.name}`",
            "",
            f"- metric: **{self.metric_name}** ({self.direction})"
            + (", against the inference NFE (minimised)" if len(self.objectives) > 1 else ""),
            f"- budget per strategy, seed and session: {b}",
            f"- seeds: {', '.join(map(str, self.seeds))} (n = {n})",
            f"- target of a seed: the best value of any black-box strategy with that seed "
            f"(median {_fmt(self.target)}); reached = within epsilon = {self.epsilon:g}",
            f"- storage: `{self.storage}` (studies `{self.name}-<strategy>-s<seed>`)",
            "",
            "## Strategies",
            "",
        ]
        lines += [f"- `{s}`: {STRATEGY_HELP.get(s, '')}" for s in self.strategies]
        return lines

    def _md_summary(self) -> list[str]:
        lines = [
            "",
            "## Summary",
            "",
            "Medians over seeds with bootstrap 95% intervals (none with one seed). Validation: each "
            "seed's best complete trial; test: that configuration retrained and scored on the held-out "
            "test split. *results*: the seeds with a complete trial; a seed whose every trial was "
            "pruned, failed or cut by the budget has no result ('–' in the per-seed table) and is left "
            "out of the medians. Work, NFE and wall-clock: medians per seed; trials (counted this "
            "session (now) and before it), pruned (of them cut by the budget) and failed: totals over "
            "seeds.",
            "",
            "| strategy | best validation | test (retrained) | results | T per block | work | NFE "
            "| wall-clock (s) | trials (now/before) | pruned (budget) | failed | reached "
            "| work to target | NFE to target | time to target (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.summary():
            horizons = ", ".join(f"{k or 'T'}={v:.3g}" for k, v in r["T"].items()) or "–"
            lines.append(
                f"| {r['strategy']} | {describe(r['best'], r['best_ci'], r['n'])} "
                f"| {describe(r['test'], r['test_ci'], r['n_test'])} | {_results(r)} | {horizons} "
                f"| {_fmt(r['work'])} | {_fmt(r['nfe'])} | {_fmt(r['wall_time_s'])} "
                f"| {r['trials']} ({r['now']}/{r['before']}) | {r['pruned']} ({r['budget_cut']}) "
                f"| {r['failed']} "
                f"| {r['reached']} | {_fmt(r['work_to_target'])} | {_fmt(r['nfe_to_target'])} "
                f"| {_fmt(r['time_to_target_s'])} |"
            )
        return lines

    def _md_paired(self) -> list[str]:
        lines: list[str] = []
        paired = self.paired()
        if paired:
            lines += [
                "",
                "## Paired differences against each black-box strategy",
                "",
                "Per seed: strategy minus baseline (positive: the strategy is better); the mean over "
                "seeds with a bootstrap 95% interval. Only seeds where both have a result are paired.",
                "",
                "| strategy | baseline | validation: mean [95% CI] | per seed "
                "| test: mean [95% CI] | per seed |",
                "|---|---|---|---|---|---|",
            ]
            for p in paired:
                v, t = p["val"], p["test"]
                lines.append(
                    f"| {p['strategy']} | {p['baseline']} | {describe(v['mean'], v['ci'], v['n'])} "
                    f"| {_diffs(v)} | {describe(t['mean'], t['ci'], t['n'])} "
                    f"| {_diffs(t)} |"
                )
        return lines

    def _md_pareto(self) -> list[str]:
        lines: list[str] = []
        if len(self.objectives) > 1:
            lines += [
                "",
                "## Pareto fronts (metric against inference NFE)",
                "",
                "Hypervolume of each seed's front in (metric, log10 inference NFE), against a fixed "
                "reference point that no strategy's result sets: the metric of a model that learned "
                "nothing (chance accuracy for a classifier) and the most NFE one inference pass can take "
                f"(max_nfe per solve x ODE blocks); {self._md_references()}. Units: metric x decades "
                "of NFE; also per unit of work spent. Optuna cannot prune or record intermediate values "
                "in multi-objective studies: these run without a pruner, and a trial cut by the budget "
                "is pruned without a value.",
                "",
                "| strategy | hypervolume (median) | hypervolume per work | front size (median) |",
                "|---|---|---|---|",
            ]
            for r in self.summary():
                sizes = [float(len(s.front)) for s in self._runs(r["strategy"])]
                lines.append(
                    f"| {r['strategy']} | {_fmt(r['hypervolume'])} | {_fmt(r['hv_per_work'])} "
                    f"| {_fmt(_median(sizes))} |"
                )
        return lines

    def _md_references(self) -> str:
        if not self.references:
            return "no reference point (a custom objective), so no hypervolume"
        points = {(_fmt(m), _fmt(c)) for m, c in self.references.values()}
        if len(points) == 1:
            m, c = points.pop()
            return f"reference ({m}, {c} NFE)"
        return "references " + ", ".join(
            f"s{seed} ({_fmt(m)}, {_fmt(c)} NFE)" for seed, (m, c) in sorted(self.references.items())
        )

    def _md_per_seed(self) -> list[str]:
        lines: list[str] = []
        lines += [
            "",
            "## Per seed",
            "",
            "best '–': the study has no complete trial (every trial was pruned, failed or cut by the "
            "budget: a single trial of an expensive configuration can cost more than the whole budget).",
            "",
            "| strategy | seed | study | best | test | T per block | trials (now/before) | pruned (budget) "
            "| failed | work | NFE | wall-clock (s) | work to target |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in self.studies:
            horizons = ", ".join(f"{k or 'T'}={v:.3g}" for k, v in s.best_t1_blocks.items()) or _fmt(
                s.best_t1
            )
            test = _fmt(s.retrained.get("test")) if s.retrained else "–"
            lines.append(
                f"| {s.strategy} | {s.seed} | `{s.study_name}` | {_fmt(s.best_value)} | {test} | {horizons} "
                f"| {s.n_trials} ({s.n_now}/{s.n_before}) | {s.n_pruned} ({s.n_budget}) | {s.n_failed} "
                f"| {_fmt(s.work)} "
                f"| {s.nfe} | {_fmt(s.wall_time)} | {_fmt(s.work_to_target)} |"
            )
        return lines

    def _md_samplers_and_figures(self) -> list[str]:
        lines: list[str] = []
        samplers = self.settings.get("samplers")
        if samplers:
            lines += ["", "## Samplers and pruner", ""]
            for strategy, spec in samplers.items():
                lines.append(f"- `{strategy}`: `{spec['class']}({_kwargs(spec['kwargs'])})`")
            pruner = self.settings.get("pruner")
            if pruner:
                lines.append(
                    f"- pruner: `{pruner['class']}({_kwargs(pruner['kwargs'])})`; in-training trials are "
                    "first judged after the controller's warm-up plus 3 updates"
                )
        if self.files:
            lines += ["", "## Figures", ""]
            for key, path in self.files.items():
                if path.endswith(".png"):
                    lines.append(f"![{key}]({Path(path).name})")
        return lines

    # ----------------------------------------------------------- files
    def write(self, output_dir: str | Path) -> dict[str, str]:
        """Write ``report.md``, ``report.json`` and the PNG figures into ``output_dir``.

        Returns:
            Name -> path of every file written (also kept in :attr:`files`).
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        keys = [k for k in FIGURES if k != "pareto_fronts" or len(self.objectives) > 1]
        files = {key: str(out / f"{key}.png") for key in keys}
        self.files = dict(files)
        self.files["markdown"] = str(out / "report.md")
        self.files["json"] = str(out / "report.json")
        for key, path in files.items():
            FIGURES[key](self, path)
        Path(self.files["json"]).write_text(json.dumps(self.to_dict(), indent=2, default=str))
        Path(self.files["markdown"]).write_text(self.to_markdown())
        return dict(self.files)


def _diffs(paired: Mapping[str, Any]) -> str:
    """``"s0 +0.0139, s2 -0.0833"``: each paired difference named by its seed."""
    return ", ".join(f"s{seed} {d:+.3g}" for seed, d in zip(paired["seeds"], paired["diffs"])) or "–"


def _results(row: Mapping[str, Any]) -> str:
    """``"2/3 (none in s2)"``: the seeds with a complete trial, naming those without."""
    missing = row["no_result_seeds"]
    return row["results"] + (f" (none in {', '.join(f's{s}' for s in missing)})" if missing else "")


def _kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
