"""The comparison report's figures: best value against each cost axis, horizons, Pareto fronts.

Each figure is drawn with matplotlib's object API on an Agg canvas (no pyplot state) from a
:class:`~snopt.search._report.ComparisonReport` and saved to a path; :data:`FIGURES` maps the
figure's name (the file's stem) to its function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._choices import IN_TRAINING

if TYPE_CHECKING:
    from ._report import ComparisonReport


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


_AXIS_LABELS = {
    "cum_time": "cumulative trial wall-clock (s)",
    "cum_nfe": "cumulative NFE",
    "cum_work": "cumulative work (multiply-adds)",
}


def _best_so_far(report: ComparisonReport, path: str, axis: str) -> None:
    xlabel = _AXIS_LABELS[axis]
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
        ax.axhline(report.target, color="grey", linestyle=":", linewidth=1, label="target (median)")
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


def _pareto_fronts(report: ComparisonReport, path: str) -> None:
    fig, ax = _figure(
        f"{report.name}: Pareto fronts ({report.metric_name} against inference NFE)",
        "inference NFE (one validation batch)",
        report.metric_name,
    )
    colors = _colors(report.strategies)
    labelled: set[str] = set()
    for s in report.studies:
        if not s.front:
            continue
        cs, ms = [c for _, c in s.front], [m for m, _ in s.front]
        label = s.strategy if s.strategy not in labelled else None
        labelled.add(s.strategy)
        ax.step(cs, ms, where="post", color=colors[s.strategy], marker="o", alpha=0.8, label=label)
    if labelled:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


#: Figure name -> function(report, path) that draws and saves it.
FIGURES = {
    "best_vs_work": lambda r, p: _best_so_far(r, p, "cum_work"),
    "best_vs_wallclock": lambda r, p: _best_so_far(r, p, "cum_time"),
    "best_vs_nfe": lambda r, p: _best_so_far(r, p, "cum_nfe"),
    "t1_trajectories": _t1_trajectories,
    "final_t1_vs_metric": _final_t1_vs_metric,
    "pareto_fronts": _pareto_fronts,
}
