"""The cost of horizon control on digits: the Gauss-Newton passes at ``every=5`` (not a test).

Issue 13's goal: the Gauss-Newton curvature (and its feedback term), computed on update steps
only, costs at most 10% of a training step amortized over ``every=5`` steps.

Method, side by side in one process with paired work:

- One digits run per configuration, built by :func:`snopt.build_run` from the same seed (the
  task's default model: conv ODE classifier, width 16, dopri5 at rtol = atol = 1e-3, adjoint
  mode, Adam, batch 64), ``t1_warmup=0`` so that the fifth step of every window is an update:

  - ``fixed T`` (no controller): the baseline;
  - ``feedback (gauss_newton)`` with the defaults (curvature and feedback term);
  - ``feedback (gauss_newton, no feedback term)``;
  - ``feedback (fisher)``: the outer product read from the backward pass; its feedback term
    (on by default) still takes the Gauss-Newton passes;
  - ``feedback (fisher, no feedback term)``: no extra passes at all (the controller's hooks
    and reads only).

- A *round* is one controller window: 5 training steps (zero_grad, loss, backward, optimizer
  step, controller step with the loss closure).  At the start of every round each run is
  loaded with the same model and optimizer state (the baseline's, so T is the same for all)
  and trained on the same 5 batches, so every run solves the same ODEs and the only extra
  work is the controller's.  The order of the runs rotates from round to round.
- Reported per configuration: the median over rounds of its round time over the baseline's
  round time, minus 1 (the amortized overhead per training step, everything the controller
  does included), with a bootstrap 95% interval of that median; and the time in the
  Gauss-Newton passes alone (``Controller.curvature_time``) over the baseline's time.

Usage::

    python benchmarks/horizon_overhead.py              # 60 rounds, about 6 min on 2 shared cores
    python benchmarks/horizon_overhead.py --rounds 10  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snopt import RunConfig, build_run, ode_blocks

EVERY = 5
GOAL = 0.10
BASELINE = "fixed T"
CONFIGS: dict[str, dict[str, Any]] = {
    BASELINE: dict(control="fixed"),
    "feedback (gauss_newton)": dict(control="feedback"),
    "feedback (gauss_newton, no feedback term)": dict(control="feedback", t1_feedback=False),
    "feedback (fisher)": dict(control="feedback", t1_curvature="fisher"),
    "feedback (fisher, no feedback term)": dict(control="feedback", t1_curvature="fisher", t1_feedback=False),
}


def _bootstrap_median(values: list[float], seed: int = 0, draws: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    medians = np.median(rng.choice(data, size=(draws, data.size), replace=True), axis=1)
    return float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))


def _round(run: Any, batches: list[Any]) -> float:
    """Train ``run`` on ``batches`` (one controller window); returns the seconds it took."""
    model, optimizer, controller, task = run.model, run.optimizer, run.controller, run.task
    model.train()
    blocks = [block for _, block in ode_blocks(model)]
    start = time.perf_counter()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        for block in blocks:  # as snopt.fit does: without a controller nothing consumes dL/dT
            block.zero_t1_grad()
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        if controller is not None:
            controller.step(lambda batch=batch: task.loss(model, batch))
    return time.perf_counter() - start


def measure(rounds: int, seed: int = 0) -> dict[str, Any]:
    """Run the paired rounds and return the figures (see the module docstring)."""
    runs = {
        name: build_run(RunConfig(task="digits", seed=seed, t1_every=EVERY, t1_warmup=0, **settings))
        for name, settings in CONFIGS.items()
    }
    base = runs[BASELINE]
    data = list(islice(cycle(base.train_loader), EVERY * (rounds + 1)))
    _round(base, data[:EVERY])  # warm-up round: first-call costs stay out of the figures
    times: dict[str, list[float]] = {name: [] for name in runs}
    passes: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        model_state = copy.deepcopy(base.model.state_dict())
        optimizer_state = copy.deepcopy(base.optimizer.state_dict())
        batches = data[EVERY * (r + 1) : EVERY * (r + 2)]
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            run.model.load_state_dict(model_state)
            run.optimizer.load_state_dict(optimizer_state)
            before = 0.0 if run.controller is None else run.controller.curvature_time
            times[name].append(_round(run, batches))
            passes[name].append(0.0 if run.controller is None else run.controller.curvature_time - before)
        # The baseline's end state is where every run starts the next round.
    return _summarise(runs, times, passes, rounds)


def _summarise(
    runs: dict[str, Any], times: dict[str, list[float]], passes: dict[str, list[float]], rounds: int
) -> dict[str, Any]:
    """Medians and bootstrap intervals per configuration, relative to the baseline."""
    baseline = times[BASELINE]
    rows = {}
    for name in runs:
        overhead = [t / b - 1.0 for t, b in zip(times[name], baseline)]
        in_passes = [p / b for p, b in zip(passes[name], baseline)]
        controller = runs[name].controller
        rows[name] = {
            "round_s_median": statistics.median(times[name]),
            "overhead_median": statistics.median(overhead),
            "overhead_ci95": list(_bootstrap_median(overhead)),
            "passes_fraction_median": statistics.median(in_passes),
            "passes_fraction_ci95": list(_bootstrap_median(in_passes)),
            "updates": 0 if controller is None else int(controller.stats["updates"]),
            "limited": 0
            if controller is None
            else int(sum(controller.stats.get(f"{n}/limited", 0) for n in controller.names)),
        }
    return {
        "task": "digits",
        "every": EVERY,
        "rounds": rounds,
        "steps_per_round": EVERY,
        "goal": GOAL,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    lines = [
        f"# Cost of horizon control on digits (every={report['every']})",
        "",
        f"{report['rounds']} paired rounds of {report['steps_per_round']} training steps (one update each), "
        f"every run from the same state on the same batches, {report['threads']} torch thread; run time "
        f"{report.get('run_time_s', 0):.0f} s on 2 shared CPU cores.  Overhead: median over rounds of a run's "
        "round time over the fixed-T run's, minus 1 (95% bootstrap interval), i.e. per training step "
        f"amortized over the window.  Goal: the Gauss-Newton curvature costs <= {report['goal']:.0%}.",
        "",
        "| configuration | round (s) | overhead per step | of which Gauss-Newton passes | goal |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["rows"].items():
        low, high = r["overhead_ci95"]
        plow, phigh = r["passes_fraction_ci95"]
        goal = "" if name == BASELINE else ("met" if r["overhead_median"] <= report["goal"] else "missed")
        lines.append(
            f"| {name} | {r['round_s_median']:.3f} | {r['overhead_median']:+.1%} [{low:+.1%}, {high:+.1%}] | "
            f"{r['passes_fraction_median']:.1%} [{plow:.1%}, {phigh:.1%}] | {goal} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="paired rounds (default 60)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2, but got {args.rounds}.")
    torch.set_num_threads(1)
    begin = time.perf_counter()
    report = measure(args.rounds)
    report["run_time_s"] = time.perf_counter() - begin
    args.out.mkdir(parents=True, exist_ok=True)
    name = "horizon_overhead" if args.rounds >= 40 else "horizon_overhead_quick"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
