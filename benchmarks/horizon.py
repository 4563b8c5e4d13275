"""Benchmark in-training horizon control against a grid of fixed horizons (not a test).

For each task (``digits``, ``timeseries``) and seed, with the same number of optimizer
steps for every run (Adam, the tasks' default learning rate):

1. **Fixed grid**: one run per horizon in :data:`GRID` (``control="fixed"``).
2. **Policies**: the first-order ``gradient`` policy and SNOpt's second-order ``feedback``
   policy, each started from every ``T0`` in :data:`STARTS`, with the controller settings
   of :data:`POLICY_SETTINGS` (the defaults recommended for ``RunConfig``).

Reported per run (means and standard deviations over seeds): the final validation metric,
the final horizon ``T``, the function evaluations (forward + backward) per iteration over
the last 10 steps, and the training wall-clock (evaluation excluded).  For the policies
also the *settling step*: the first step after which ``T`` stays within a factor 1.25 of its
final level (the median of its last 20 values).  Plots of ``T`` against the step (every
seed, every start) and of the metric against ``T`` (the grid, with where each policy ended)
go to ``benchmarks/results/``.

Goals (issue 4), checked per task and start: the feedback policy ends within 0.5 points
(0.005 of the metric: accuracy is a fraction, the MSE is on the data's scale) of the best
fixed horizon's metric; one feedback run costs at most 1/4 of the whole grid's wall-clock;
it beats the gradient policy on the final metric or on the settling step.

Runs go to a pool of ``--workers`` processes with ``--threads`` torch threads each
(default 2 x 1, for a 2-core machine); wall-clock figures are taken under that load.

Usage::

    python benchmarks/horizon.py            # full run (about 25 min on 2 idle CPU cores)
    python benchmarks/horizon.py --quick    # smoke run: 1 seed, fewer steps, 2 starts, 3 grid points
    python benchmarks/horizon.py --defaults --tasks digits   # the controller's library defaults
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

#: Fixed horizons of the grid.
GRID = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
#: Initial horizons of the controlled runs.
STARTS = (0.05, 1.0, 4.0)
POLICIES = ("gradient", "feedback")
#: Controller settings per policy (RunConfig fields), the same for both tasks: an update
#: every 5 steps, none in the first 20 (an untrained network's dL/dT says little about the
#: architecture), and a trust region of a factor 1.25 per update.
POLICY_SETTINGS: dict[str, dict[str, Any]] = {
    "gradient": dict(t1_lr=3.0, t1_cost="quadratic", t1_every=5, t1_max_step=0.25, t1_warmup=20),
    "feedback": dict(t1_lr=0.5, t1_cost="quadratic", t1_every=5, t1_max_step=0.25, t1_warmup=20),
}
#: Task settings: small models, 240 steps (about 10 epochs of digits), so that the whole
#: benchmark fits in ~25 minutes on 2 idle CPU cores.
#: The cost weight ``t1_penalty`` is in the units of the task's loss (cross-entropy, MSE).
TASKS: dict[str, dict[str, Any]] = {
    "digits": dict(model_kwargs={"width": 8}, steps=240, t1_penalty=0.1),
    "timeseries": dict(model_kwargs={"hidden_dim": 16}, steps=240, t1_penalty=0.01),
}
SEEDS = (0, 1, 2)
#: Goal: the feedback policy's metric within this of the best fixed horizon's ("0.5 points").
METRIC_TOLERANCE = 0.005
#: Goal: one feedback run costs at most this fraction of the whole grid's wall-clock.
WALL_FRACTION = 0.25
#: Settling: T stays within this factor of its final level (the median of the last SETTLE_TAIL steps).
SETTLE_FACTOR = 1.25
SETTLE_TAIL = 20


def _job_key(job: dict[str, Any]) -> str:
    return f"{job['task']}/{job['mode']}/T0={job['t0']}/seed={job['seed']}"


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration (in a worker process) and summarise it."""
    import torch

    torch.set_num_threads(job["threads"])
    from snopt._run import RunConfig, run_training

    settings: dict[str, Any] = {}
    if job["mode"] != "fixed":
        # --defaults: the library's controller (RunConfig's defaults) with only the task's cost weight.
        tuned = {} if job.get("defaults") else POLICY_SETTINGS[job["mode"]]
        settings = dict(tuned, t1_penalty=TASKS[job["task"]]["t1_penalty"])
    config = RunConfig(
        task=job["task"],
        model_kwargs=dict(TASKS[job["task"]]["model_kwargs"]),
        t1=job["t0"],
        control=job["mode"],
        epochs=None,
        max_steps=job["steps"],
        batch_size=64,
        seed=job["seed"],
        **settings,
    )
    start = time.perf_counter()
    result = run_training(config, progress=False)
    elapsed = time.perf_counter() - start
    history = result.history
    key = next(k for k in history[-1] if k.startswith("t1"))
    trajectory = [float(r[key]) for r in history]
    tail = history[-10:]
    out = {
        "task": job["task"],
        "mode": job["mode"],
        "t0": job["t0"],
        "seed": job["seed"],
        "status": result.status,
        "metric": float(result.final["metric"]),
        "val_loss": float(result.final["val_loss"]),
        "final_t1": trajectory[-1],
        "nfe_per_iter_end": statistics.fmean(r["nfe_forward"] + r["nfe_backward"] for r in tail),
        "wall_time": float(result.stats["wall_time"]),
        "total_time": elapsed,
        "t1_trajectory": trajectory,
        "settle_step": settle_step(trajectory) if job["mode"] != "fixed" else None,
        "config": {k: v for k, v in config.to_dict().items() if k.startswith("t1") or k == "control"},
    }
    if "controller" in result.stats:
        out["controller"] = result.stats["controller"]
    return out


def settle_step(trajectory: list[float], factor: float = SETTLE_FACTOR, tail: int = SETTLE_TAIL) -> int:
    """The first step (1-based) after which T stays within ``factor`` of its final level.

    The final level is the median of the last ``tail`` steps, so that the noise of the last
    update does not decide it.
    """
    level = statistics.median(trajectory[-tail:])
    step = len(trajectory)
    for i in range(len(trajectory) - 1, -1, -1):
        if not level / factor <= trajectory[i] <= level * factor:
            break
        step = i + 1
    return step


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]], higher_is_better: dict[str, bool]) -> dict[str, Any]:
    """Means over seeds per (task, mode, T0), and the goals."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["mode"], r["t0"]), []).append(r)
    rows = []
    for (task, mode, t0), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "fixed", kv[0][1], kv[0][2])
    ):
        row: dict[str, Any] = {"task": task, "mode": mode, "t0": t0, "seeds": len(rs)}
        for field in ("metric", "final_t1", "nfe_per_iter_end", "wall_time", "settle_step", "limited"):
            mean, std = _mean_std([r[field] for r in rs])
            row[field] = mean
            row[field + "_std"] = std
        rows.append(row)
    goals = []
    for task in sorted({r["task"] for r in rows}):
        sign = 1.0 if higher_is_better[task] else -1.0
        fixed = [r for r in rows if r["task"] == task and r["mode"] == "fixed"]
        if not fixed:
            continue
        best = max(fixed, key=lambda r: sign * r["metric"])
        grid_wall = sum(r["wall_time"] for r in fixed)
        for t0 in sorted({r["t0"] for r in rows if r["task"] == task and r["mode"] != "fixed"}):
            fb = next((r for r in rows if (r["task"], r["mode"], r["t0"]) == (task, "feedback", t0)), None)
            gr = next((r for r in rows if (r["task"], r["mode"], r["t0"]) == (task, "gradient", t0)), None)
            if fb is None:
                continue
            gap = sign * (best["metric"] - fb["metric"])  # > 0: feedback worse than the best fixed T
            paired = _paired_gaps(runs, task, best["t0"], t0, sign)
            goal = {
                "task": task,
                "t0": t0,
                "best_fixed_t1": best["t0"],
                "best_fixed_metric": best["metric"],
                "feedback_metric": fb["metric"],
                "gap_points": 100 * gap,
                "gap_se_points": 100 * statistics.stdev(paired) / math.sqrt(len(paired))
                if len(paired) > 1
                else None,
                "within_tolerance": gap <= METRIC_TOLERANCE,
                "wall_fraction_of_grid": fb["wall_time"] / grid_wall,
                "within_wall_budget": fb["wall_time"] <= WALL_FRACTION * grid_wall,
            }
            if gr is not None:
                better_metric = sign * (fb["metric"] - gr["metric"]) > 0
                faster = fb["settle_step"] < gr["settle_step"]
                goal.update(
                    gradient_metric=gr["metric"],
                    feedback_settle_step=fb["settle_step"],
                    gradient_settle_step=gr["settle_step"],
                    beats_gradient=bool(better_metric or faster),
                )
            goals.append(goal)
    return {"rows": rows, "goals": goals}


def _paired_gaps(
    runs: list[dict[str, Any]], task: str, best_t0: float, t0: float, sign: float
) -> list[float]:
    """Per seed: the best fixed horizon's metric minus feedback's (signed so that > 0 is worse)."""
    fixed = {
        r["seed"]: r["metric"] for r in runs if (r["task"], r["mode"], r["t0"]) == (task, "fixed", best_t0)
    }
    fb = {r["seed"]: r["metric"] for r in runs if (r["task"], r["mode"], r["t0"]) == (task, "feedback", t0)}
    return [sign * (fixed[s] - fb[s]) for s in sorted(set(fixed) & set(fb))]


def plot(
    runs: list[dict[str, Any]], summary: dict[str, Any], out: Path, suffix: str, metric_names: dict[str, str]
) -> list[str]:
    """T against step for the policies, and metric against T for the grid; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    colors = {0.05: "tab:blue", 1.0: "tab:orange", 4.0: "tab:green"}
    for task in sorted({r["task"] for r in runs}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        fixed = [r for r in summary["rows"] if r["task"] == task and r["mode"] == "fixed"]
        for ax, mode in zip(axes, POLICIES):
            for r in runs:
                if r["task"] != task or r["mode"] != mode:
                    continue
                steps = range(1, len(r["t1_trajectory"]) + 1)
                label = f"T0={r['t0']}" if r["seed"] == min(x["seed"] for x in runs) else None
                ax.plot(
                    steps, r["t1_trajectory"], color=colors.get(r["t0"], "k"), alpha=0.8, lw=1.2, label=label
                )
            if fixed:
                higher = summary["higher_is_better"][task]
                best = max(fixed, key=lambda r: r["metric"] if higher else -r["metric"])
                ax.axhline(best["t0"], color="k", ls="--", lw=1, label=f"best fixed T={best['t0']}")
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(f"{task}: {mode} policy")
            ax.legend(fontsize=8)
        axes[0].set_ylabel("horizon T")
        fig.tight_layout()
        name = f"horizon_{task}_t1{suffix}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

        fig, ax = plt.subplots(figsize=(6, 4))
        if fixed:
            ax.errorbar(
                [r["t0"] for r in fixed],
                [r["metric"] for r in fixed],
                yerr=[r["metric_std"] for r in fixed],
                color="k",
                marker="o",
                capsize=3,
                label="fixed T (mean +- std)",
            )
        markers = {"gradient": "s", "feedback": "*"}
        for r in summary["rows"]:
            if r["task"] == task and r["mode"] in markers:
                ax.errorbar(
                    r["final_t1"],
                    r["metric"],
                    xerr=r["final_t1_std"],
                    yerr=r["metric_std"],
                    marker=markers[r["mode"]],
                    ms=9 if r["mode"] == "feedback" else 6,
                    color=colors.get(r["t0"], "k"),
                    ls="none",
                    capsize=2,
                    label=f"{r['mode']} from T0={r['t0']}",
                )
        ax.set_xscale("log")
        ax.set_xlabel("final horizon T")
        ax.set_ylabel(metric_names[task])
        ax.set_title(f"{task}: metric against T")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"horizon_{task}_metric{suffix}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}g} +- {std:.2g}"


def markdown(report: dict[str, Any]) -> str:
    """The Markdown report."""
    env, summary = report["environment"], report["summary"]
    lines = [
        "# Horizon control: fixed grid vs gradient and feedback policies",
        "",
        f"Generated by `benchmarks/horizon.py{' --quick' if report['quick'] else ''}` on {env['platform']}, "
        f"torch {env['torch']}, {env['cpus']} CPU cores visible, {report['workers']} worker process(es) x "
        f"{report['threads']} torch thread(s); load average at start {env['load_start']}, at end {env['load_end']}; "
        f"total {report['total_minutes']:.1f} min.",
        "",
        f"Seeds {report['seeds']}; Adam with the task's default learning rate, batch size 64; every run takes the "
        f"same number of steps per task ({', '.join(f'{t}: {s}' for t, s in report['steps'].items())}). "
        "Models: "
        + ", ".join(
            f"{t} {report['tasks'][t]['model_kwargs']} (t1_penalty={report['tasks'][t].get('t1_penalty')})"
            for t in report["steps"]
        )
        + "; dopri5, rtol = atol = 1e-3, adjoint mode.",
        "",
        "Controller settings (RunConfig fields):",
        "",
    ]
    for mode, settings in report["policy_settings"].items():
        lines.append(f"- `{mode}`: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    lines += [
        "",
        "Metric: validation accuracy for digits (higher is better), validation MSE for timeseries "
        "(lower is better). NFE/iter: forward + backward function evaluations per iteration, mean of the "
        "last 10 steps. Wall: training wall-clock in seconds, evaluation excluded. Settling step: first "
        f"step after which T stays within a factor {SETTLE_FACTOR} of its final level (the median of the last "
        f"{SETTLE_TAIL} steps). Updates cut by max_step: control updates (of steps / t1_every) limited by the trust region "
        "(one update changes T by at most the factor 1 + t1_max_step either way), a sign of oscillation. "
        "Mean +- std over seeds.",
        "",
    ]
    for task in sorted({r["task"] for r in summary["rows"]}):
        lines += [
            f"## {task}",
            "",
            "| run | T0 | final metric | final T | NFE/iter (end) | wall s | settling step | updates cut by max_step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in summary["rows"]:
            if r["task"] != task:
                continue
            lines.append(
                f"| {r['mode']} | {r['t0']} | {_fmt(r['metric'], r['metric_std'])} | "
                f"{_fmt(r['final_t1'], r['final_t1_std'], 3)} | {_fmt(r['nfe_per_iter_end'], r['nfe_per_iter_end_std'], 3)} | "
                f"{_fmt(r['wall_time'], r['wall_time_std'], 3)} | {_fmt(r['settle_step'], r['settle_step_std'], 3)} | "
                f"{_fmt(r['limited'], r['limited_std'], 3)} |"
            )
        lines += [
            "",
            f"![T against step](horizon_{task}_t1{report['suffix']}.png)",
            f"![metric against T](horizon_{task}_metric{report['suffix']}.png)",
            "",
        ]
    lines += [
        "## Goals",
        "",
        f"Feedback within {100 * METRIC_TOLERANCE:g} points ({METRIC_TOLERANCE} of the metric) of the best fixed "
        f"horizon; one feedback run <= {WALL_FRACTION:g} of the grid's wall-clock (sum of the {len(report['grid'])} fixed runs); "
        "beats the gradient policy on final metric or settling step. SE: standard error of the gap over "
        "seeds, from the per-seed differences (same seed: same data, initialization and batch order).",
        "",
        "| task | T0 | best fixed T (metric) | feedback metric | gap (points) +- SE | within 0.5 | wall / grid | "
        "<= 1/4 | gradient metric | settling fb / gr | beats gradient |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g in summary["goals"]:
        lines.append(
            f"| {g['task']} | {g['t0']} | {g['best_fixed_t1']} ({g['best_fixed_metric']:.4g}) | {g['feedback_metric']:.4g} | "
            f"{g['gap_points']:+.2f}{_se(g.get('gap_se_points'))} | {'yes' if g['within_tolerance'] else 'no'} | {g['wall_fraction_of_grid']:.3f} | "
            f"{'yes' if g['within_wall_budget'] else 'no'} | {g.get('gradient_metric', math.nan):.4g} | "
            f"{g.get('feedback_settle_step', math.nan):.0f} / {g.get('gradient_settle_step', math.nan):.0f} | "
            f"{'yes' if g.get('beats_gradient') else 'no'} |"
        )
    lines.append("")
    return "\n".join(lines)


def _se(value: float | None) -> str:
    return "" if value is None else f" +- {value:.2f}"


def finish(report: dict[str, Any], runs: list[dict[str, Any]], out: Path) -> None:
    """Summarise ``runs`` into ``report`` and write the JSON, the Markdown and the plots."""
    from snopt._tasks import get_task

    tasks = sorted({r["task"] for r in runs})
    higher = {t: get_task(t).higher_is_better for t in tasks}
    metric_names = {t: get_task(t).metric_name for t in tasks}
    for run in runs:
        if run["mode"] != "fixed":
            run["settle_step"] = settle_step(run["t1_trajectory"])
        stats = run.get("controller") or {}
        run["limited"] = sum(v for k, v in stats.items() if k.endswith("/limited")) if stats else None
    summary = aggregate(runs, higher)
    summary["higher_is_better"] = higher
    out.mkdir(parents=True, exist_ok=True)
    report["figures"] = plot(runs, summary, out, report["suffix"], metric_names)
    report["summary"] = summary
    report["runs"] = runs
    (out / f"horizon{report['suffix']}.json").write_text(json.dumps(report, indent=1))
    (out / f"horizon{report['suffix']}.md").write_text(markdown(report))
    print(markdown(report))


def rebuild(path: Path, out: Path) -> int:
    """Recompute the summary of a finished run (e.g. after changing a definition)."""
    report = json.loads(path.read_text())
    finish(report, report["runs"], out)
    return 0


def _library_settings() -> dict[str, dict[str, Any]]:
    """The controller settings of ``--defaults``: the library's, as RunConfig fields."""
    from snopt import _defaults as D

    shared = {f"t1_{k}": v for k, v in D.CONTROL.items() if k not in ("policy", "penalty")}
    return {mode: dict(t1_lr=D.POLICY_LR[mode], **shared) for mode in POLICIES}


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 40 steps, starts 0.05 and 4, grid 0.1/1/4"
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="policies with the library's controller defaults instead of POLICY_SETTINGS (suffix _defaults)",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: per task)")
    parser.add_argument("--workers", type=int, default=2, help="parallel worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--report-from", type=Path, default=None, help="rebuild the summary, plots and Markdown from a JSON"
    )
    args = parser.parse_args(argv)
    if args.report_from is not None:
        return rebuild(args.report_from, args.out)

    seeds = tuple(args.seeds) if args.seeds else ((0,) if args.quick else SEEDS)
    grid = (0.1, 1.0, 4.0) if args.quick else GRID
    starts = (0.05, 4.0) if args.quick else STARTS
    steps = {t: args.steps or (40 if args.quick else TASKS[t]["steps"]) for t in args.tasks}
    suffix = ("_quick" if args.quick else "") + ("_defaults" if args.defaults else "")
    jobs = []
    for task in args.tasks:
        for seed in seeds:
            for t1 in grid:
                jobs.append(dict(task=task, mode="fixed", t0=t1, seed=seed))
            for mode in POLICIES:
                for t0 in starts:
                    jobs.append(dict(task=task, mode=mode, t0=t0, seed=seed))
    for job in jobs:
        job.update(steps=steps[job["task"]], threads=args.threads, defaults=args.defaults)
    # Longest first (large horizons cost more), for a balanced pool.
    jobs.sort(key=lambda j: -j["t0"])

    import torch

    env = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_start": _load(),
    }
    started = time.perf_counter()
    runs = []
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        for i, run in enumerate(pool.map(run_job, jobs), 1):
            runs.append(run)
            print(
                f"[{i}/{len(jobs)}] {_job_key(run)}: metric={run['metric']:.4f} T={run['final_t1']:.3g} "
                f"wall={run['wall_time']:.1f}s",
                flush=True,
            )
    env["load_end"] = _load()
    report = {
        "quick": args.quick,
        "suffix": suffix,
        "environment": env,
        "workers": args.workers,
        "threads": args.threads,
        "seeds": list(seeds),
        "grid": list(grid),
        "starts": list(starts),
        "steps": steps,
        "tasks": {t: TASKS[t] for t in args.tasks},
        "policy_settings": _library_settings() if args.defaults else POLICY_SETTINGS,
        "total_minutes": (time.perf_counter() - started) / 60,
    }
    finish(report, runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
