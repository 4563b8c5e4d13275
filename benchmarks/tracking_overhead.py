"""The CPU cost of MLflow tracking per ``snopt train`` run (not a test).

Issue 11's goal: tracking costs less than 2 s of CPU beyond the run itself.

Method: the same training run with and without :class:`snopt.MlflowCallback`, paired on the
seed, CPU seconds by ``time.process_time`` (every thread of the process: the system-metrics
sampler counts).  The run is ``snopt train``'s defaults on digits (conv ODE classifier,
width 16, dopri5 at rtol = atol = 1e-3, adjoint mode, Adam, batch 64), cut to ``--steps``
steps and evaluated at the end; the tracked run gets the callback ``snopt train`` builds
(model and figures logged, system metrics on, an SQLite store), its construction included.
One torch thread, so that the CPU seconds are the work, not spinning threads.

Three settings:

- ``first run, new store`` (what ``snopt train`` pays in a new folder): a fresh subprocess per
  seed trains once untracked as a warm-up (torch, the data, the solver), then the untracked
  run, then the tracked run into a new store in a new folder.  The tracked run is the
  process's first: it pays for importing MLflow (and matplotlib, for the figures) and for
  creating the store (MLflow's schema migrations).
- ``first run, existing store`` (what every later ``snopt train`` in that folder pays): the
  same, into one store that an earlier process created.
- ``later runs in one process``: one process, one store, after a warm-up pair; tracked and
  untracked runs alternate (ABBA) so that drift cancels.  What tracking costs once its
  imports and its store exist.

Reported per setting: the median over pairs of the extra CPU seconds (tracked - untracked),
with a bootstrap 95% interval of the median, and the median untracked run for scale.  A
cProfile of one more first tracked run (new store; not counted in the figures, as profiling
costs CPU itself) lists what the extra time goes to.

Usage::

    python benchmarks/tracking_overhead.py                # 4 + 4 + 6 pairs of 10 steps, ~8 min on 2 shared cores
    python benchmarks/tracking_overhead.py --pairs 2 --processes 2 --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL_S = 2.0
EXPERIMENT = "snopt"


def _config(seed: int, steps: int) -> Any:
    from snopt import RunConfig

    return RunConfig(task="digits", epochs=None, max_steps=steps, seed=seed)


def _callback(config: Any, store: Path) -> Any:
    """The callback ``snopt train`` builds (snopt.cli._tracking.tracking_callbacks), into ``store``."""
    from snopt import MlflowCallback

    return MlflowCallback(
        config,
        log_model=True,
        log_figures=True,
        tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
        experiment=EXPERIMENT,
        tags={"task": config.task, "optimizer": config.optimizer, "strategy": config.control},
    )


def _cpu_of_run(config: Any, store: Path | None) -> float:
    """CPU seconds of one run (building the callback, the model and data included)."""
    from snopt import build_run, run_training

    start = time.process_time()
    callbacks = [_callback(config, store)] if store is not None else []
    result = run_training(config, callbacks=callbacks, progress=False, run=build_run(config))
    spent = time.process_time() - start
    if result.status != "completed":
        raise RuntimeError(f"the run ended {result.status}: {result.message}")
    return spent


def _quiet() -> None:
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import torch

    torch.set_num_threads(1)


def first_run(seed: int, steps: int, store: Path | None, profile: Path | None) -> dict[str, float]:
    """In this (fresh) process: a warm-up, the untracked run, then the tracked run (the first),
    into ``store`` (None: a new store in a new folder)."""
    _quiet()
    _cpu_of_run(_config(seed, 2), None)  # warm-up: torch, the data, the solver
    untracked = _cpu_of_run(_config(seed, steps), None)
    with tempfile.TemporaryDirectory(prefix="snopt-bench-") as tmp:
        profiler = cProfile.Profile() if profile is not None else None
        if profiler is not None:
            profiler.enable()
        tracked = _cpu_of_run(_config(seed, steps), store or Path(tmp))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile))
    return {"seed": seed, "untracked": untracked, "tracked": tracked, "extra": tracked - untracked}


def later_runs(pairs: int, steps: int) -> list[dict[str, float]]:
    """In this process: after a warm-up pair, ``pairs`` pairs into one store, in ABBA order."""
    _quiet()
    out = []
    with tempfile.TemporaryDirectory(prefix="snopt-bench-") as tmp:
        store = Path(tmp)
        _cpu_of_run(_config(0, 2), None)
        _cpu_of_run(_config(0, 2), store)
        for i in range(pairs):
            seed = 100 + i
            if i % 2 == 0:
                untracked = _cpu_of_run(_config(seed, steps), None)
                tracked = _cpu_of_run(_config(seed, steps), store)
            else:
                tracked = _cpu_of_run(_config(seed, steps), store)
                untracked = _cpu_of_run(_config(seed, steps), None)
            out.append(
                {"seed": seed, "untracked": untracked, "tracked": tracked, "extra": tracked - untracked}
            )
            print(f"  later run {i + 1}/{pairs}: extra {tracked - untracked:+.2f} s CPU", flush=True)
    return out


def _summary(pairs: list[dict[str, float]]) -> dict[str, Any]:
    from snopt.search import bootstrap_ci

    extra = [p["extra"] for p in pairs]
    ci = bootstrap_ci(extra, statistics.median)
    return {
        "pairs": pairs,
        "n": len(extra),
        "extra_median_s": statistics.median(extra),
        "extra_ci95_s": list(ci) if ci is not None else None,
        "untracked_median_s": statistics.median(p["untracked"] for p in pairs),
        "tracked_median_s": statistics.median(p["tracked"] for p in pairs),
    }


def _profile_table(path: Path, limit: int = 20) -> list[dict[str, Any]]:
    """The functions of snopt's tracking, MLflow and matplotlib with the most cumulative time."""
    stats = pstats.Stats(str(path), stream=io.StringIO())
    rows = []
    for (file, line, name), (_, calls, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if any(part in file for part in ("/snopt/tracking/", "/mlflow/", "/matplotlib/")):
            where = file.split("/site-packages/")[-1].split("/snopt/")[-1]
            rows.append({"function": f"{where}:{line}({name})", "calls": calls, "cumulative_s": cumulative})
    rows.sort(key=lambda r: -r["cumulative_s"])
    return rows[:limit]


def _subprocess_first_run(
    seed: int, steps: int, store: Path | None, profile: Path | None
) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--first-run", str(seed), "--steps", str(steps)]
    if store is not None:
        cmd += ["--store", str(store)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the first-run subprocess failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(report: dict[str, Any]) -> str:
    def ci(s: dict[str, Any]) -> str:
        return f"[{s['extra_ci95_s'][0]:.2f}, {s['extra_ci95_s'][1]:.2f}]" if s["extra_ci95_s"] else "–"

    lines = [
        "# Tracking overhead per `snopt train` run",
        "",
        f"Digits with `snopt train`'s defaults, {report['steps']} steps, one torch thread; CPU seconds "
        "(`time.process_time`) of the same run with and without `MlflowCallback` (SQLite store, model and "
        f"figures logged, system metrics on), paired on the seed. Goal: under {GOAL_S:g} s of CPU beyond the run.",
        "",
        "| setting | pairs | extra CPU, median | 95% interval | untracked run | tracked run | goal met |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in report["settings"].items():
        met = "yes" if s["extra_median_s"] < GOAL_S else f"no (+{s['extra_median_s'] - GOAL_S:.2f} s)"
        lines.append(
            f"| {name} | {s['n']} | {s['extra_median_s']:.2f} s | {ci(s)} | {s['untracked_median_s']:.2f} s "
            f"| {s['tracked_median_s']:.2f} s | {met} |"
        )
    lines += [
        "",
        "*First run*: a fresh process, as each `snopt train` is: it imports MLflow and matplotlib, and "
        "in a new folder creates the store (MLflow's schema migrations). *Later runs in one process*: "
        "the cost once both exist.",
        "",
        "## Where a first tracked run with a new store spends its time (cProfile, cumulative seconds)",
        "",
        "| function | calls | cumulative |",
        "|---|---|---|",
    ]
    for row in report["profile"]:
        lines.append(f"| `{row['function']}` | {row['calls']} | {row['cumulative_s']:.2f} s |")
    lines += ["", f"Machine: {report['machine']}; {report['date']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--processes", type=int, default=4, help="fresh processes per first-run setting")
    parser.add_argument("--pairs", type=int, default=6, help="pairs of later runs in one process")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--first-run", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first_run is not None:  # the subprocess of one first-run pair
        print(json.dumps(first_run(args.first_run, args.steps, args.store, args.profile)))
        return 0
    new_store, old_store = [], []
    with tempfile.TemporaryDirectory(prefix="snopt-bench-") as tmp:
        profile, store = Path(tmp) / "first_run.prof", Path(tmp) / "store"
        store.mkdir()
        for i in range(args.processes):
            pair = _subprocess_first_run(i, args.steps, None, None)
            new_store.append(pair)
            print(
                f"  first run, new store {i + 1}/{args.processes}: extra {pair['extra']:+.2f} s CPU",
                flush=True,
            )
        _subprocess_first_run(0, args.steps, None, profile)  # profiled apart: cProfile costs CPU too
        profile_rows = _profile_table(profile)
        _subprocess_first_run(99, 2, store, None)  # creates the store the next processes find
        for i in range(args.processes):
            pair = _subprocess_first_run(i, args.steps, store, None)
            old_store.append(pair)
            print(f"  first run, existing store {i + 1}/{args.processes}: extra {pair['extra']:+.2f} s CPU")
    later = later_runs(args.pairs, args.steps)
    report = {
        "goal_s": GOAL_S,
        "steps": args.steps,
        "settings": {
            "first run, new store": _summary(new_store),
            "first run, existing store": _summary(old_store),
            "later runs in one process": _summary(later),
        },
        "profile": profile_rows,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracking_overhead.json").write_text(json.dumps(report, indent=1))
    (args.out / "tracking_overhead.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
