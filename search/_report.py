"""The comparison report: per strategy what was found, at what cost, and how fast.

Everything is computed from the trials in the Optuna storage.  Trials are put in the
order they finished; the cumulative wall-clock of a study is the sum of its trials'
durations (start to end, sampling and evaluation included; with one worker this is the
elapsed time) and its cumulative NFE the sum of their recorded NFE.  Only trials that
count against the budget are used (interrupted ones are not).  ``target`` is the best
value any strategy found over every seed; a study *reaches* it when its best-so-far
comes within ``epsilon`` of it, and the report gives the wall-clock and NFE spent up to
and including the trial that did.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from ._budget import STATUS_ATTR, counts, trial_nfe, trial_seconds
from ._space import HORIZON
from ._strategies import IN_TRAINING


@dataclass
class StudyResult:
    """One study (one strategy, one seed) of a comparison.

    Attributes:
        strategy, seed, study_name: what ran.
        n_trials, n_complete, n_pruned, n_failed: trials that count, by state.
        wall_time: summed trial wall-clock in seconds; nfe: summed NFE.
        best_value: best value of a complete trial (None if none completed).
        best_trial: its number; best_t1: its (final) horizon; best_params: its hyperparameters.
        time_to_target, nfe_to_target: cost until the best-so-far came within epsilon of
            the comparison's target (None if it never did).
        curve: per counted trial in finishing order: ``trial``, ``state``, ``value``,
            ``cum_time``, ``cum_nfe``, ``best`` (best-so-far, None before the first complete).
        trials: per counted trial: ``number``, ``state``, ``value``, ``t1_initial``,
            ``t1_final``, ``nfe``, ``seconds``, ``status``, ``t1_trajectory``.
    """

    strategy: str
    seed: int
    study_name: str
    n_trials: int = 0
    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    wall_time: float = 0.0
    nfe: int = 0
    best_value: float | None = None
    best_trial: int | None = None
    best_t1: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    time_to_target: float | None = None
    nfe_to_target: int | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)

    def reach(self, target: float, epsilon: float, maximize: bool) -> tuple[float | None, int | None]:
        """Wall-clock and NFE until the best-so-far came within ``epsilon`` of ``target``."""
        for point in self.curve:
            best = point["best"]
            if best is not None and (best >= target - epsilon if maximize else best <= target + epsilon):
                return point["cum_time"], point["cum_nfe"]
        return None, None


def study_result(
    strategy: str, seed: int, study_name: str, trials: Iterable[FrozenTrial], maximize: bool
) -> StudyResult:
    """Summarise the trials of one study (see the module docstring for the definitions)."""
    res = StudyResult(strategy, seed, study_name)
    finished = [t for t in trials if counts(t)]
    finished.sort(key=lambda t: (t.datetime_complete, t.number))
    best: float | None = None
    best_trial: FrozenTrial | None = None
    for t in finished:
        res.n_trials += 1
        res.n_complete += t.state == TrialState.COMPLETE
        res.n_pruned += t.state == TrialState.PRUNED
        res.n_failed += t.state == TrialState.FAIL
        res.wall_time += trial_seconds(t)
        res.nfe += trial_nfe(t)
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
            if best is None or (t.value > best if maximize else t.value < best):
                best, best_trial = t.value, t
        res.curve.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                "cum_time": res.wall_time,
                "cum_nfe": res.nfe,
                "best": best,
            }
        )
        res.trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "status": t.user_attrs.get(STATUS_ATTR),
                "t1_initial": t.user_attrs.get("t1_initial", t.params.get(HORIZON)),
                "t1_final": _t1_final(t),
                "nfe": trial_nfe(t),
                "seconds": trial_seconds(t),
                "t1_trajectory": t.user_attrs.get("t1_trajectory"),
                "fail_reason": t.user_attrs.get("fail_reason"),
            }
        )
    if best_trial is not None:
        res.best_value = best
        res.best_trial = best_trial.number
        res.best_t1 = _t1_final(best_trial)
        res.best_params = dict(best_trial.user_attrs.get("hyperparams", best_trial.params))
    return res


def _t1_final(trial: FrozenTrial) -> float | None:
    value = trial.user_attrs.get("t1_final", trial.params.get(HORIZON))
    return None if value is None else float(value)


@dataclass
class ComparisonReport:
    """What every strategy of a comparison found, at what cost.

    Attributes:
        name: the comparison's name (prefix of its study names).
        metric_name: the validation metric; direction: ``maximize`` or ``minimize``.
        budget: the budget every study got; epsilon: the tolerance of "reached".
        target: best value of any strategy and seed.
        strategies, seeds: what ran; storage: where the studies are.
        studies: one :class:`StudyResult` per strategy and seed.
        settings: samplers, pruner, base run and space, as recorded in the studies.
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
    settings: dict[str, Any] = field(default_factory=dict)
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
    ) -> ComparisonReport:
        """Fill in the target and each study's cost to reach it."""
        if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and math.isfinite(epsilon)):
            raise ValueError(f"`epsilon` must be a finite number >= 0, but got epsilon={epsilon!r}.")
        maximize = direction == "maximize"
        bests = [s.best_value for s in studies if s.best_value is not None]
        target = (max(bests) if maximize else min(bests)) if bests else None
        for s in studies:
            if target is not None:
                s.time_to_target, s.nfe_to_target = s.reach(target, epsilon, maximize)
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
            target=target,
            settings=dict(settings or {}),
        )

    # ----------------------------------------------------------- summaries
    def study(self, strategy: str, seed: int) -> StudyResult:
        """The result of one strategy and seed."""
        for s in self.studies:
            if s.strategy == strategy and s.seed == seed:
                return s
        raise KeyError(f"No study for strategy={strategy!r}, seed={seed}.")

    def summary(self) -> list[dict[str, Any]]:
        """One row per strategy, aggregated over seeds.

        ``best`` is the best value over seeds and ``best_mean``/``best_std`` their mean and
        standard deviation; ``T`` and the hyperparameters are those of the best trial;
        ``trials``/``pruned``/``failed`` are totals, ``wall_time_s`` and ``nfe`` means per
        seed; ``reached`` counts seeds that came within epsilon of the target, and
        ``time_to_target_s``/``nfe_to_target`` are medians over those seeds.
        """
        rows = []
        for strategy in self.strategies:
            runs = [s for s in self.studies if s.strategy == strategy]
            values = [s.best_value for s in runs if s.best_value is not None]
            scored = [s for s in runs if s.best_value is not None]
            sign = 1.0 if self.maximize else -1.0
            best_run = max(scored, key=lambda s: sign * float(s.best_value or 0.0)) if scored else None
            reached = [s for s in runs if s.nfe_to_target is not None]
            times = [float(s.time_to_target or 0.0) for s in reached]
            nfes = [int(s.nfe_to_target or 0) for s in reached]
            rows.append(
                {
                    "strategy": strategy,
                    "best": (max(values) if self.maximize else min(values)) if values else None,
                    "best_mean": statistics.fmean(values) if values else None,
                    "best_std": statistics.pstdev(values) if len(values) > 1 else 0.0 if values else None,
                    "T": best_run.best_t1 if best_run else None,
                    "hyperparams": best_run.best_params if best_run else {},
                    "trials": sum(s.n_trials for s in runs),
                    "pruned": sum(s.n_pruned for s in runs),
                    "failed": sum(s.n_failed for s in runs),
                    "wall_time_s": statistics.fmean(s.wall_time for s in runs) if runs else 0.0,
                    "nfe": statistics.fmean(s.nfe for s in runs) if runs else 0.0,
                    "reached": f"{len(reached)}/{len(runs)}",
                    "time_to_target_s": statistics.median(times) if times else None,
                    "nfe_to_target": statistics.median(nfes) if nfes else None,
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: settings, target, per-strategy summary and per-study details."""
        return {
            "name": self.name,
            "metric_name": self.metric_name,
            "direction": self.direction,
            "budget": self.budget,
            "epsilon": self.epsilon,
            "target": self.target,
            "strategies": self.strategies,
            "seeds": self.seeds,
            "storage": self.storage,
            "settings": self.settings,
            "summary": self.summary(),
            "studies": [asdict(s) for s in self.studies],
            "files": self.files,
        }

    def to_markdown(self) -> str:
        """The report as Markdown: settings, the summary table, per-seed table, figures."""
        b = ", ".join(f"{k}={v}" for k, v in self.budget.items() if v is not None) or "unlimited"
        lines = [
            f"# Comparison `{self.name}`",
            "",
            f"- metric: **{self.metric_name}** ({self.direction})",
            f"- budget per strategy and seed: {b}",
            f"- seeds: {', '.join(map(str, self.seeds))}",
            f"- target (best of any strategy): {_fmt(self.target)}; "
            f"reached = within epsilon = {self.epsilon:g}",
            f"- storage: `{self.storage}` (studies `{self.name}-<strategy>-s<seed>`)",
            "",
            "## Summary",
            "",
            "Best over seeds (mean ± std), the T and hyperparameters of the best trial, trials run, "
            "mean wall-clock and NFE per seed, and the median cost to come within epsilon of the target.",
            "",
            "| strategy | best | mean ± std | T | hyperparameters | trials | pruned | failed "
            "| wall-clock (s) "
            "| NFE | reached | time to target (s) | NFE to target |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.summary():
            hp = ", ".join(f"{k}={_fmt(v)}" for k, v in r["hyperparams"].items() if k != HORIZON)
            lines.append(
                f"| {r['strategy']} | {_fmt(r['best'])} | {_fmt(r['best_mean'])} ± {_fmt(r['best_std'])} "
                f"| {_fmt(r['T'])} | {hp} | {r['trials']} | {r['pruned']} | {r['failed']} "
                f"| {_fmt(r['wall_time_s'])} | {_fmt(r['nfe'])} | {r['reached']} "
                f"| {_fmt(r['time_to_target_s'])} | {_fmt(r['nfe_to_target'])} |"
            )
        lines += [
            "",
            "## Per seed",
            "",
            "| strategy | seed | study | best | T | trials | pruned | failed | wall-clock (s) | NFE "
            "| time to target (s) | NFE to target |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in self.studies:
            lines.append(
                f"| {s.strategy} | {s.seed} | `{s.study_name}` | {_fmt(s.best_value)} | {_fmt(s.best_t1)} "
                f"| {s.n_trials} | {s.n_pruned} | {s.n_failed} | {_fmt(s.wall_time)} | {s.nfe} "
                f"| {_fmt(s.time_to_target)} | {_fmt(s.nfe_to_target)} |"
            )
        samplers = self.settings.get("samplers")
        if samplers:
            lines += ["", "## Samplers and pruner", ""]
            for strategy, spec in samplers.items():
                lines.append(f"- `{strategy}`: `{spec['class']}({_kwargs(spec['kwargs'])})`")
            pruner = self.settings.get("pruner")
            if pruner:
                lines.append(f"- pruner: `{pruner['class']}({_kwargs(pruner['kwargs'])})`")
        if self.files:
            lines += ["", "## Figures", ""]
            for key, path in self.files.items():
                if path.endswith(".png"):
                    lines.append(f"![{key}]({Path(path).name})")
        return "\n".join(lines) + "\n"

    # ----------------------------------------------------------- files
    def write(self, output_dir: str | Path) -> dict[str, str]:
        """Write ``report.md``, ``report.json`` and the PNG figures into ``output_dir``.

        Returns:
            Name -> path of every file written (also kept in :attr:`files`).
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {key: str(out / f"{key}.png") for key in _FIGURES}
        self.files = dict(files)
        self.files["markdown"] = str(out / "report.md")
        self.files["json"] = str(out / "report.json")
        for key, path in files.items():
            _FIGURES[key](self, path)
        Path(self.files["json"]).write_text(json.dumps(self.to_dict(), indent=2, default=str))
        Path(self.files["markdown"]).write_text(self.to_markdown())
        return dict(self.files)


def _kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ------------------------------------------------------------------ figures
def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    # The object API with the Agg canvas: no pyplot state, no backend switch in the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _colors(strategies: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(strategies)}


def _best_so_far(report: ComparisonReport, path: str, axis: str) -> None:
    xlabel = "cumulative trial wall-clock (s)" if axis == "cum_time" else "cumulative NFE"
    fig, ax = _figure(f"{report.name}: best {report.metric_name} so far", xlabel, report.metric_name)
    colors = _colors(report.strategies)
    labelled: set[str] = set()
    for s in report.studies:
        pts = [(p[axis], p["best"]) for p in s.curve if p["best"] is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        label = s.strategy if s.strategy not in labelled else None
        labelled.add(s.strategy)
        ax.step(xs, ys, where="post", color=colors[s.strategy], alpha=0.85, label=label, marker=".")
    if report.target is not None:
        ax.axhline(report.target, color="grey", linestyle=":", linewidth=1, label="target")
        sign = -1 if report.maximize else 1
        ax.axhline(
            report.target + sign * report.epsilon,
            color="grey",
            linestyle="--",
            linewidth=0.8,
            label=f"target {'-' if report.maximize else '+'} ε",
        )
    if labelled:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _t1_trajectories(report: ComparisonReport, path: str) -> None:
    fig, ax = _figure(
        f"{report.name}: horizon T during training (in-training strategies)", "training step", "T"
    )
    colors = _colors(report.strategies)
    labelled: set[str] = set()
    for s in report.studies:
        if s.strategy not in IN_TRAINING:
            continue
        for t in s.trials:
            traj = t.get("t1_trajectory")
            if not traj or not traj.get("step"):
                continue
            label = s.strategy if s.strategy not in labelled else None
            labelled.add(s.strategy)
            ax.plot(traj["step"], traj["t1"], color=colors[s.strategy], alpha=0.7, linewidth=1, label=label)
    if labelled:
        ax.legend(fontsize=8)
    else:
        ax.text(
            0.5,
            0.5,
            "no in-training strategy in this comparison",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    fig.tight_layout()
    fig.savefig(path)


def _final_t1_vs_metric(report: ComparisonReport, path: str) -> None:
    fig, ax = _figure(f"{report.name}: final T against {report.metric_name}", "final T", report.metric_name)
    colors = _colors(report.strategies)
    drawn = False
    for strategy in report.strategies:
        xs, ys = [], []
        for s in report.studies:
            if s.strategy != strategy:
                continue
            for t in s.trials:
                if t["state"] == "COMPLETE" and t["t1_final"] is not None and t["value"] is not None:
                    xs.append(t["t1_final"])
                    ys.append(t["value"])
        if xs:
            ax.scatter(xs, ys, color=colors[strategy], label=strategy, alpha=0.8, s=18)
            drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


_FIGURES = {
    "best_vs_wallclock": lambda r, p: _best_so_far(r, p, "cum_time"),
    "best_vs_nfe": lambda r, p: _best_so_far(r, p, "cum_nfe"),
    "t1_trajectories": _t1_trajectories,
    "final_t1_vs_metric": _final_t1_vs_metric,
}
