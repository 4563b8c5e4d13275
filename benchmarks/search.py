"""Benchmark: in-training horizon control that tunes everything, against black-box search, at equal work.

On ``digits``, ``timeseries`` and the three-block ``multiblock`` task: ``feedback`` (TPE
samples learning rate, width and tolerance; the feedback policy moves every block's
horizon in training, starting from the best trial's final horizons) against ``tpe`` and
``random`` (which sample every parameter, one horizon per block on ``multiblock``), 3
seeds, the same budget of *work* (multiply-adds of the fields' layers, ``snopt._work``)
for every strategy and seed.  The best configuration of every study is retrained and
scored on the task's held-out test split.  On ``multiblock`` a Pareto comparison
(accuracy against inference NFE: ``feedback`` sweeping its cost weight, ``nsga2``,
multi-objective ``tpe``) gives hypervolumes per unit of work.

Goal (issue 14): on ``multiblock`` feedback comes within 0.5 points of the best black-box
result of the seed with <= 1/5 of the work TPE spent to reach it, in every seed; on the
one-horizon tasks it is no worse than TPE at equal work (paired difference of the best
validation values).  TPE's cost to reach the target is its work up to the trial whose
best-so-far came within epsilon of it (its whole budget if it never did).

Writes ``benchmarks/results/search.json``, ``search.md`` and ``search_<task>_*.png``.

Usage::

    python benchmarks/search.py            # 3 tasks + the Pareto comparison, 3 seeds, a process each
    python benchmarks/search.py --quick    # 1 seed, half the budget
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from snopt.search import Budget, compare
from snopt.search._strategies import STRATEGY_HELP

from snopt import RunConfig

STRATEGIES = ["feedback", "tpe", "random"]
PARETO_STRATEGIES = ["feedback", "nsga2", "tpe"]
EPSILON = 0.005  # 0.5 accuracy points; for the MSE of the time series, 0.005 in its own units
#: Trials' worth of the default configuration's work that every study gets: 20, so that a
#: sampler has room to learn (at 6, 8 of 36 studies had their only trial cut and no result) and a
#: study still fits the 90-minute budget of the whole benchmark on 2 cores.
TRIALS_OF_WORK = 20

# One training run per trial: 30 steps, evaluated every 10 for the pruner.  The controller runs
# with the library's defaults (snopt._defaults.CONTROL, as `snopt compare` and snopt.Controller
# do): it waits 10 steps and moves the horizons every 5 (updates at steps 15, 20, 25 and 30), so
# the pruner, which waits for the warm-up plus 3 updates, first judges a feedback trial at its last
# evaluation (never pruned).  Only the cost weight is the task's: it is in the units of the loss.


def _trial(task: str, t1_penalty: float, **task_kwargs: Any) -> RunConfig:
    return RunConfig(
        task=task,
        task_kwargs=task_kwargs,
        epochs=None,
        max_steps=30,
        batch_size=64,
        eval_every=10,
        t1_penalty=t1_penalty,
    )


TASKS: dict[str, dict[str, Any]] = {
    "digits": {"config": _trial("digits", 0.1, test_fraction=0.2)},
    "timeseries": {"config": _trial("timeseries", 0.01)},
    "multiblock": {"config": _trial("multiblock", 0.1)},
    "multiblock-pareto": {"config": _trial("multiblock", 0.1), "objectives": "metric,nfe"},
}


def default_work(config: RunConfig) -> float:
    """Work of one trial of the default configuration (the unit of the budget)."""
    from snopt.search import create_study

    study = create_study(config, strategy="random", storage=None, budget=Budget(n_trials=1), pruner="none")
    defaults = study.space.defaults()
    study.enqueue_trial({k: v for k, v in defaults.items()})
    study.optimize()
    return float(study.trials[0].user_attrs["work"])


def goal_rows(report: Any) -> list[dict[str, Any]]:
    """Per seed: the best black-box value, TPE's and feedback's work to come within epsilon of it."""
    rows = []
    for seed in report.seeds:
        target = report.targets.get(seed)
        if target is None:
            continue
        fb, tpe = report.study("feedback", seed), report.study("tpe", seed)
        tpe_work = tpe.work_to_target if tpe.work_to_target is not None else tpe.work
        row = {
            "seed": seed,
            "target": target,
            "feedback_best": fb.best_value,
            "tpe_best": tpe.best_value,
            "feedback_work": fb.work_to_target,
            "tpe_work": tpe_work,
            "tpe_reached": tpe.work_to_target is not None,
            "work_ratio": None if fb.work_to_target is None else fb.work_to_target / tpe_work,
        }
        row["goal_met"] = bool(row["work_ratio"] is not None and row["work_ratio"] <= 0.2)
        rows.append(row)
    return rows


def run_task(task: str, seeds: list[int], quick: bool, out: Path) -> dict[str, Any]:
    spec = TASKS[task]
    config: RunConfig = spec["config"]
    unit = default_work(config)
    work = unit * TRIALS_OF_WORK / (2 if quick else 1)
    objectives = spec.get("objectives", "metric")
    pareto = objectives != "metric"
    tmp = Path(tempfile.mkdtemp(prefix=f"snopt-bench-{task}-"))
    t0 = time.perf_counter()
    report = compare(
        config,
        strategies=PARETO_STRATEGIES if pareto else STRATEGIES,
        budget=Budget(work=work),
        seeds=seeds,
        storage=f"sqlite:///{tmp / 'search.db'}",
        output_dir=tmp / "report",
        name=f"bench-{task}",
        epsilon=EPSILON,
        pruner="median",
        progress=sys.stderr.isatty(),
        objectives=objectives,
        test=not pareto,
    )
    elapsed = time.perf_counter() - t0
    files = {}
    for key, path in report.files.items():
        if path.endswith(".png"):
            dest = out / f"search_{task}_{key}.png"
            shutil.copyfile(path, dest)
            files[key] = dest.name
    data = report.to_dict()
    for study in data["studies"]:
        for trial in study["trials"]:
            trial.pop("t1_trajectory", None)
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "config": config.to_dict(),
        "objectives": objectives,
        "work_unit": unit,
        "budget_work": work,
        "elapsed_s": elapsed,
        "metric": report.metric_name,
        "direction": report.direction,
        "summary": data["summary"],
        "paired": data["paired"],
        "hypervolumes": data["hypervolumes"],
        "goal": [] if pareto else goal_rows(report),
        "markdown": report.to_markdown(),
        "studies": data["studies"],
        "settings": {k: v for k, v in data["settings"].items() if k != "config"},
        "figures": files,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed and half the budget")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--sequential", action="store_true", help="one task after the other here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tasks = [t for t in args.tasks.split(",") if t]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if len(tasks) > 1 and not args.sequential:
        return run_in_parallel(args, tasks)
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    results = _header(args, seeds)
    start = time.perf_counter()
    for task in tasks:
        results["tasks"][task] = run_task(task, seeds, args.quick, out)
        print(f"{task}: {results['tasks'][task]['elapsed_s']:.0f} s", file=sys.stderr)
    results["elapsed_s"] = time.perf_counter() - start
    results["machine"]["load_average_end"] = os.getloadavg()
    _write(out, results)
    return 0


def _header(args: argparse.Namespace, seeds: list[int]) -> dict[str, Any]:
    return {
        "benchmark": "search",
        "quick": args.quick,
        "strategies": STRATEGIES,
        "pareto_strategies": PARETO_STRATEGIES,
        "seeds": seeds,
        "epsilon": EPSILON,
        "trials_of_work": TRIALS_OF_WORK,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "optuna": optuna.__version__,
            "load_average_start": os.getloadavg(),
        },
        "tasks": {},
    }


def _write(out: Path, results: dict[str, Any]) -> None:
    (out / "search.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "search.md").write_text(markdown(results))
    print((out / "search.md").read_text())


def run_in_parallel(args: argparse.Namespace, tasks: list[str]) -> int:
    """One child process per task, then one merged report."""
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="snopt-bench-search-parts-"))
    start = time.perf_counter()
    load_start = os.getloadavg()
    children = []
    for task in tasks:
        cmd = [sys.executable, __file__, "--tasks", task, "--seeds", args.seeds, "--out", str(work / task)]
        cmd += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        children.append(subprocess.Popen(cmd))
    codes = [child.wait() for child in children]
    results: dict[str, Any] | None = None
    for task, code in zip(tasks, codes):
        part_file = work / task / "search.json"
        if code or not part_file.exists():
            print(f"task {task} failed (exit code {code})", file=sys.stderr)
            continue
        part = json.loads(part_file.read_text())
        for name in part["tasks"][task]["figures"].values():
            shutil.copyfile(work / task / name, out / name)
        if results is None:
            results = part
        else:
            results["tasks"].update(part["tasks"])
    if results is None:
        return 1
    results["elapsed_s"] = time.perf_counter() - start
    results["machine"]["load_average_start"] = load_start
    results["machine"]["load_average_end"] = os.getloadavg()
    results["machine"]["processes"] = len(tasks)
    _write(out, results)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(codes) else 0


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cost_spread(r: dict[str, Any]) -> str:
    """How far one trial's cost ranges against the budget, and how many studies have no result."""
    works = [t["work"] for s in r["studies"] for t in s["trials"] if t.get("work")]
    empty = [f"{s['strategy']} s{s['seed']}" for s in r["studies"] if s["best_value"] is None]
    text = (
        f"One trial (pruned ones too) cost {min(works) / r['work_unit']:.2g} to {max(works) / r['work_unit']:.2g} default "
        f"trials' work (the largest counted up to where the budget cut it)"
        if works
        else ""
    )
    return text + (
        f"; {len(empty)} of {len(r['studies'])} studies have no complete trial ({', '.join(empty)})."
        if empty
        else "; every study has a complete trial."
    )


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    load0 = tuple(round(x, 1) for x in m["load_average_start"])
    load1 = tuple(round(x, 1) for x in m["load_average_end"])
    lines = [
        "# Search benchmark: in-training control that tunes everything vs black-box search, equal work",
        "",
        f"- seeds: {results['seeds']} (n = {len(results['seeds'])}); epsilon {results['epsilon']}",
        f"- budget per strategy and seed: {results['trials_of_work']} trials' worth of the default "
        "configuration's work (multiply-adds of the fields' Linear/Conv layers over every function "
        "evaluation, `snopt._work`); all four axes (work, NFE, wall-clock, trials) reported",
        f"- run time: {results['elapsed_s']:.0f} s, {m.get('processes', 1)} processes of "
        f"{m['torch_threads']} torch thread(s) on {m['cpus']} shared cores (load {load0} -> {load1}); "
        f"torch {m['torch']}, optuna {m['optuna']}",
        "- strategies: " + "; ".join(f"`{s}`: {STRATEGY_HELP[s]}" for s in results["strategies"]),
        "",
    ]
    for task, r in results["tasks"].items():
        lines += [
            f"## {task}",
            "",
            f"Work budget {r['budget_work']:.4g} ({results['trials_of_work']} x {r['work_unit']:.4g}); "
            f"{r['elapsed_s']:.0f} s. {_cost_spread(r)}",
            "",
        ]
        if r["goal"]:
            lines += [
                "Goal rows: per seed, the best black-box value (target), feedback's and TPE's work to come "
                "within epsilon of it (TPE: its whole budget if it never did).",
                "",
                "| seed | target | feedback best | TPE best | feedback work | TPE work | TPE reached "
                "| ratio | goal (<= 1/5) |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for g in r["goal"]:
                lines.append(
                    f"| {g['seed']} | {_fmt(g['target'])} | {_fmt(g['feedback_best'])} | {_fmt(g['tpe_best'])} "
                    f"| {_fmt(g['feedback_work'])} | {_fmt(g['tpe_work'])} | {_fmt(g['tpe_reached'])} "
                    f"| {_fmt(g['work_ratio'])} | {_fmt(g['goal_met'])} |"
                )
            lines.append("")
        # the report without its own title and figure links (the figures are linked below)
        report = r["markdown"].split("\n", 1)[1].split("\n## Figures")[0]
        lines += [
            line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in report.splitlines()
        ]
        lines += [""] + [f"![{k}]({v})" for k, v in r["figures"].items()] + [""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
