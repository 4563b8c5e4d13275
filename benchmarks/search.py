"""Benchmark: in-training feedback control of T against black-box search, under one NFE budget.

On ``digits`` and ``timeseries``: ``feedback`` vs ``tpe`` vs ``gp`` vs ``random``, 3 seeds,
the same budget of function evaluations (NFE) for every strategy and seed.  The question
is the one users ask: does the feedback policy find a good horizon faster than search?

Goal (issue 5): feedback comes within 0.5 points (epsilon) of the best metric that any
black-box strategy found, spending <= 1/5 of the NFE and of the wall-clock that the
black-box strategy needed to reach it.

Per task and seed: ``B`` is the best value of tpe, gp and random; the black-box cost is
the NFE (and trial wall-clock) that the first of them to reach ``B`` spent until it did;
the feedback cost is what feedback spent until its best-so-far came within epsilon of
``B``.  Costs are counted per finished trial (a trial's whole NFE counts once it ends).

Writes ``benchmarks/results/search.json``, ``search.md`` and ``search_<task>_*.png``.

Usage::

    python benchmarks/search.py            # 2 tasks x 4 strategies x 3 seeds, one process per task
                                           # (about 20 min on 2 idle cores)
    python benchmarks/search.py --quick    # 1 seed, half the budget
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from snopt.search import Budget, Float, SearchSpace, compare

from snopt import RunConfig

STRATEGIES = ["feedback", "tpe", "gp", "random"]
BLACK_BOX = ["tpe", "gp", "random"]
EPSILON = 0.005  # 0.5 accuracy points; for the MSE of the time series, 0.005 in its own units

# One training run per trial, as in benchmarks/horizon.py but half as long (60 steps), so that
# a study holds about eight black-box trials.  The feedback policy has horizon.py's settings,
# with the warm-up scaled to the shorter run; the cost weight is in the units of the loss.
CONTROL: dict[str, Any] = dict(t1_lr=0.5, t1_cost="quadratic", t1_every=5, t1_max_step=0.25, t1_warmup=10)


def _trial(task: str, model_kwargs: dict[str, Any], t1_penalty: float) -> RunConfig:
    """One trial's training run: 60 steps of ``task``, evaluated every 20 for the pruner."""
    return RunConfig(
        task=task,
        model_kwargs=model_kwargs,
        epochs=None,
        max_steps=60,
        batch_size=64,
        eval_every=20,
        t1_penalty=t1_penalty,
        **CONTROL,
    )


TASKS: dict[str, dict[str, Any]] = {
    "digits": {"config": _trial("digits", {"width": 8}, t1_penalty=0.1), "nfe": 24000},
    "timeseries": {"config": _trial("timeseries", {"hidden_dim": 16}, t1_penalty=0.01), "nfe": 160000},
}
# The horizon is what is searched, over the range of horizon.py's grid: who finds a good T, at what cost.
SPACE = SearchSpace({"t1": Float(0.1, 4.0, log=True, default=1.0)})


def goal_rows(report: Any, epsilon: float) -> list[dict[str, Any]]:
    """Per seed: the best black-box value, who reached it at what cost, and feedback's cost."""
    rows = []
    maximize = report.maximize
    for seed in report.seeds:
        bb = [report.study(s, seed) for s in BLACK_BOX if s in report.strategies]
        bests = [s.best_value for s in bb if s.best_value is not None]
        if not bests:
            continue
        target = max(bests) if maximize else min(bests)
        reached = []
        for s in bb:
            t, n = s.reach(target, 0.0, maximize)
            if n is not None:
                reached.append((n, t, s.strategy))
        bb_nfe, bb_time, who = min(reached)
        fb = report.study("feedback", seed)
        fb_time, fb_nfe = fb.reach(target, epsilon, maximize)
        row = {
            "seed": seed,
            "black_box_best": target,
            "found_by": who,
            "black_box_nfe": bb_nfe,
            "black_box_time_s": bb_time,
            "feedback_best": fb.best_value,
            "feedback_nfe": fb_nfe,
            "feedback_time_s": fb_time,
            "nfe_ratio": None if fb_nfe is None else fb_nfe / bb_nfe,
            "time_ratio": None if fb_time is None else fb_time / bb_time,
        }
        row["goal_met"] = bool(
            row["nfe_ratio"] is not None and row["nfe_ratio"] <= 0.2 and row["time_ratio"] <= 0.2
        )
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed and half the budget")
    parser.add_argument("--tasks", default="digits,timeseries")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--storage", default=None, help="Optuna storage (default: a fresh SQLite file)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one task after the other in this process (default: a process each)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: cores / processes)"
    )
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tasks = [t for t in args.tasks.split(",") if t]
    if len(tasks) > 1 and not args.sequential:
        return run_in_parallel(args, tasks)
    torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="snopt-bench-search-"))
    storage = args.storage or f"sqlite:///{work / 'search.db'}"
    results: dict[str, Any] = {
        "benchmark": "search",
        "quick": args.quick,
        "strategies": STRATEGIES,
        "seeds": seeds,
        "epsilon": EPSILON,
        "space": SPACE.to_dict(),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "optuna": optuna.__version__,
            "load_average_start": os.getloadavg(),
        },
        "tasks": {},
    }
    start = time.perf_counter()
    for task in tasks:
        spec = TASKS[task]
        nfe = spec["nfe"] // (2 if args.quick else 1)
        t0 = time.perf_counter()
        report = compare(
            spec["config"],
            strategies=STRATEGIES,
            budget=Budget(nfe=nfe),
            seeds=seeds,
            space=SPACE,
            storage=storage,
            output_dir=work / task,
            name=f"bench-{task}",
            epsilon=EPSILON,
            pruner="median",
            progress=sys.stderr.isatty(),
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
                trial.pop("t1_trajectory", None)  # in the figures; keeps the JSON small
        results["tasks"][task] = {
            "config": spec["config"].to_dict(),
            "budget_nfe": nfe,
            "elapsed_s": elapsed,
            "metric": report.metric_name,
            "direction": report.direction,
            "summary": report.summary(),
            "goal": goal_rows(report, EPSILON),
            "studies": data["studies"],
            "settings": {k: v for k, v in data["settings"].items() if k != "config"},
            "figures": files,
        }
        print(f"{task}: {elapsed:.0f} s", file=sys.stderr)
    results["elapsed_s"] = time.perf_counter() - start
    results["machine"]["load_average_end"] = os.getloadavg()
    (out / "search.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "search.md").write_text(markdown(results))
    print((out / "search.md").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _trial_line(config: dict[str, Any]) -> str:
    control = ", ".join(
        f"{k}={config[k]}" for k in ("t1_lr", "t1_penalty", "t1_cost", "t1_every", "t1_max_step", "t1_warmup")
    )
    return (
        f"Each trial trains {config['task']} {config['model_kwargs']} for {config['max_steps']} steps "
        f"(batch {config['batch_size']}, {config['optimizer']} lr {config['lr']}, {config['method']} "
        f"rtol {config['rtol']}, evaluated every {config['eval_every']} steps for the median pruner). "
        f"Black-box strategies train at the sampled fixed T; feedback's first trial starts from the "
        f"default T and its later ones from a random T, with the controller set to {control}. "
        "Wall-clock: the sum of the trials' durations."
    )


def run_in_parallel(args: argparse.Namespace, tasks: list[str]) -> int:
    """One child process per task (each with its share of the cores), then one merged report."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(tasks))
    work = Path(tempfile.mkdtemp(prefix="snopt-bench-search-parts-"))
    start = time.perf_counter()
    load_start = os.getloadavg()
    children = []
    for task in tasks:
        cmd = [sys.executable, __file__, "--tasks", task, "--seeds", args.seeds, "--out", str(work / task)]
        cmd += ["--threads", str(threads)] + (["--quick"] if args.quick else [])
        children.append(subprocess.Popen(cmd))
    codes = [child.wait() for child in children]
    if any(codes):
        print(f"a task's process failed (exit codes {codes}); parts kept in {work}", file=sys.stderr)
        return 1
    results: dict[str, Any] | None = None
    for task in tasks:
        part = json.loads((work / task / "search.json").read_text())
        for name in part["tasks"][task]["figures"].values():
            shutil.copyfile(work / task / name, out / name)
        if results is None:
            results = part
        else:
            results["tasks"].update(part["tasks"])
    assert results is not None
    results["elapsed_s"] = time.perf_counter() - start
    results["machine"]["load_average_start"] = load_start
    results["machine"]["load_average_end"] = os.getloadavg()
    results["machine"]["processes"] = len(tasks)
    (out / "search.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "search.md").write_text(markdown(results))
    print((out / "search.md").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return 0


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    load0 = tuple(round(x, 1) for x in m["load_average_start"])
    load1 = tuple(round(x, 1) for x in m["load_average_end"])
    quick = " (--quick)" if results["quick"] else ""
    lines = [
        "# Search benchmark: feedback vs black-box search of T, equal NFE budget",
        "",
        f"Strategies {', '.join(results['strategies'])}; seeds {results['seeds']}; "
        f"epsilon {results['epsilon']}; search space {json.dumps(results['space'])}.",
        f"Machine: {m['cpus']} CPUs, {m.get('processes', 1)} process(es) x {m['torch_threads']} torch thread(s), Python {m['python']}, "
        f"torch {m['torch']}, Optuna {m['optuna']}; load average {load0} at the start, {load1} at the end "
        f"(wall-clock is shared-machine time). Total {results['elapsed_s'] / 60:.1f} min{quick}.",
        "",
        "Goal: feedback within epsilon of the best black-box value, with <= 1/5 of the NFE and of the "
        "wall-clock that the black-box strategy needed to reach that value.",
    ]
    for task, r in results["tasks"].items():
        lines += [
            "",
            f"## {task} ({r['metric']}, {r['direction']}; "
            f"budget {r['budget_nfe']} NFE per strategy and seed)",
            "",
            _trial_line(r["config"]),
            "",
            "| strategy | best | mean ± std | T of best | trials | pruned | failed | wall-clock (s) | NFE |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in r["summary"]:
            lines.append(
                f"| {s['strategy']} | {_fmt(s['best'])} | {_fmt(s['best_mean'])} ± {_fmt(s['best_std'])} "
                f"| {_fmt(s['T'])} | {s['trials']} | {s['pruned']} | {s['failed']} "
                f"| {_fmt(s['wall_time_s'])} | {_fmt(s['nfe'])} |"
            )
        lines += [
            "",
            "| seed | best black-box | found by | its NFE | its time (s) | feedback best | feedback NFE "
            "| feedback time (s) | NFE ratio | time ratio | goal met |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in r["goal"]:
            lines.append(
                f"| {g['seed']} | {_fmt(g['black_box_best'])} | {g['found_by']} | {_fmt(g['black_box_nfe'])} "
                f"| {_fmt(g['black_box_time_s'])} | {_fmt(g['feedback_best'])} | {_fmt(g['feedback_nfe'])} "
                f"| {_fmt(g['feedback_time_s'])} | {_fmt(g['nfe_ratio'])} | {_fmt(g['time_ratio'])} "
                f"| {_fmt(g['goal_met'])} |"
            )
        met = sum(g["goal_met"] for g in r["goal"])
        ratios = [g["nfe_ratio"] for g in r["goal"] if g["nfe_ratio"] is not None]
        tail = (
            f"; median NFE ratio {statistics.median(ratios):.3g}."
            if ratios
            else "; feedback never got within epsilon."
        )
        lines += ["", f"Goal met on {met}/{len(r['goal'])} seeds{tail}", ""]
        for key, name in r["figures"].items():
            lines.append(f"![{task} {key}]({name})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
