"""Benchmark SNOpt against Adam and SGD on the built-in tasks (not a test).

Protocol (issue 12), per task, each task in its own process (``--task NAME``):

1. **Learning rate**: every optimizer runs its grid (:data:`LR_GRID`, three values each) on
   the selection seeds (:data:`LR_SEEDS`, disjoint from the paired seeds); the value with
   the lowest median final smoothed training loss wins.  SNOpt also runs its default
   learning rate (:data:`snopt._defaults.LR`).
2. **Paired seeds**: Adam and SGD at their chosen learning rate, SNOpt with its defaults
   (``snopt``) and SNOpt at its chosen learning rate (``snopt-best``), all on the same
   seeds; a seed fixes the initialisation, the data split and the batch order, which
   :func:`snopt.build_run` seeds identically for every optimizer.  On digits, the paper's
   reference form with its former defaults (``snopt-reference``: lr 0.01, momentum 0.9,
   eps 0.05, update_freq 100, Adam-free) runs as well.
3. **Targets**, from Adam: the median over the paired seeds of Adam's value at 75% of
   the budget, for the smoothed training loss (EMA 0.9 of the batch losses), the
   validation loss and the validation metric; so Adam's median run reaches each target
   before its end, and a target is not the noise ceiling of the final steps.
4. **Time to target** of a run: the function evaluations (forward + backward) and the
   training CPU time (``wall_time``, evaluation excluded; the benchmark runs one torch
   thread) up to the first step (training loss) or evaluation (validation) that reaches
   the target; ``inf`` when it never does.  Per seed, the ratio SNOpt / Adam; reported:
   the median, a bootstrap 95% interval of the median (2000 resamples of the seeds), and
   the seeds won (ratio < 1).
5. **Per iteration**: median seconds per step and per function evaluation over the run
   (refresh steps included, so amortised), and peak memory (``VmHWM`` of a fresh
   subprocess, reset after building the run) of a few steps, as SNOpt / Adam.

Usage::

    python benchmarks/optimizers.py --all            # every task, then the report
    python benchmarks/optimizers.py --task digits    # one task -> benchmarks/results/parts/
    python benchmarks/optimizers.py --report         # merge parts -> optimizers.json / .md
    python benchmarks/optimizers.py --task toy2d --seeds 2 --quick   # smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from snopt import RunConfig, build_run, run_training
from snopt import _defaults as D
from snopt._training import Callback, TrainingError

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = RESULTS / "parts"
LR_GRID = {"adam": [0.003, 0.01, 0.03], "sgd": [0.03, 0.1, 0.3], "snopt": [0.03, 0.1, 0.3]}
LR_SEEDS = [100, 101]
#: Damping values tried against the default on digits' selection seeds (at the default lr).
DAMPING_GRID = [0.03, 0.3]
#: The paper's reference form with the defaults SNOpt had before issue 12.
REFERENCE = dict(
    lr=0.01,
    momentum=0.9,
    snopt_curvature="reference",
    snopt_update_freq=100,
    snopt_update_growth=0.0,
    snopt_eps=0.05,
)
TASKS: dict[str, dict[str, Any]] = {
    "digits": dict(
        task="digits",
        model_kwargs={"width": 8},
        epochs=4,
        batch_size=64,
        eval_every=5,
        reference=True,
        seeds=8,
    ),
    "digits512": dict(
        task="digits", model_kwargs={"width": 8}, epochs=24, batch_size=512, eval_every=2, seeds=2
    ),
    "toy2d": dict(
        task="toy2d",
        task_kwargs={"dataset": "eight_gaussians"},
        model_kwargs={"hidden": 32},
        epochs=8,
        batch_size=64,
        eval_every=8,
        seeds=6,
    ),
    "timeseries": dict(
        task="timeseries", model_kwargs={"hidden_dim": 16}, epochs=8, batch_size=64, eval_every=4, seeds=6
    ),
}
#: The issue asks for 8 paired seeds everywhere in under 60 min on 2 cores; the shared machine
#: (2 cores, up to 6 sessions) gives this benchmark about 35 min, so toy2d and the time series
#: run 6 paired seeds and digits at batch 512 runs 2 (its lr is digits' selection, not re-run).
SIZE_NOTE = (
    "Size: digits 8 paired seeds, toy2d and timeseries 6, digits512 2 (the issue asks 8 for every "
    "task; reduced to fit about 35 min on 2 shared cores). Intervals over 2 seeds are not meaningful. "
    "In the committed run digits512 is missing: its 8 runs (about 7 min) finished but the memory "
    "step crashed before its part was written (fixed since; not re-run for lack of time)."
)
GOALS = {"digits": 0.6, "digits512": 0.5, "toy2d": 0.8, "timeseries": 0.8, "step": 1.1, "memory": 1.2}


# --------------------------------------------------------------------------- runs
def _config(task: str, variant: str, lr: float | None, seed: int, **over: Any) -> RunConfig:
    spec = dict(TASKS[task])
    spec.pop("reference", None)
    spec.pop("seeds", None)
    optimizer = "snopt" if variant.startswith("snopt") else variant
    kwargs: dict[str, Any] = dict(spec, optimizer=optimizer, seed=seed, rtol=1e-3, atol=1e-3, method="dopri5")
    if variant == "snopt-reference":
        kwargs.update(REFERENCE)
    elif lr is not None:
        kwargs["lr"] = lr
    kwargs.update(over)
    return RunConfig(**kwargs)


class _Guard(Callback):
    """Stops a run whose training loss exceeds 10x its first (a diverged learning rate)."""

    def __init__(self) -> None:
        self.first: float | None = None

    def on_step_end(self, trainer: Any, record: dict[str, float]) -> None:
        loss = record["train_loss"]
        if self.first is None:
            self.first = abs(loss)
        elif not math.isfinite(loss) or abs(loss) > 10 * max(self.first, 1e-12):
            raise TrainingError(f"diverged: train loss {loss:.4g} at step {record['step']}")


def train_once(task: str, variant: str, lr: float | None, seed: int, **over: Any) -> dict[str, Any]:
    """One training run, reduced to its per-step curve."""
    cfg = _config(task, variant, lr, seed, **over)
    start = time.perf_counter()
    try:
        result = run_training(cfg, callbacks=[_Guard()], progress=False)
        status, history = str(result.status), result.history
    except TrainingError as exc:
        status = "diverged"
        history = exc.result.history if exc.result is not None else []
    steps, ema = [], None
    for h in history:
        ema = h["train_loss"] if ema is None else 0.9 * ema + 0.1 * h["train_loss"]
        row = {
            "wall": float(h["wall_time"]),
            "nfe": int(h["nfe_forward"] + h["nfe_backward"]),
            "smooth": float(ema) if math.isfinite(ema) else math.inf,
        }
        for key in ("val_loss", "metric"):
            if key in h:
                row[key] = float(h[key])
        steps.append(row)
    return {
        "variant": variant,
        "lr": cfg.resolved().lr,
        "seed": seed,
        "status": status,
        "elapsed": time.perf_counter() - start,
        "steps": steps,
    }


# ----------------------------------------------------------------------- analysis
def _better(key: str, higher: bool) -> Any:
    if key == "metric" and higher:
        return lambda value, target: value >= target
    return lambda value, target: value <= target


def value_at(run: dict[str, Any], key: str, fraction: float) -> float:
    """The last value of ``key`` at or before ``fraction`` of the run's planned steps."""
    rows = [r for r in run["steps"] if key in r]
    if not rows:
        return math.nan
    index = max(0, min(len(rows) - 1, math.ceil(fraction * len(rows)) - 1))
    return rows[index][key]


def _final(run: dict[str, Any]) -> float:
    """Final smoothed training loss for the lr selection; inf for a run that diverged (its
    truncated curve would otherwise compete with complete ones)."""
    return math.inf if run["status"] == "diverged" else value_at(run, "smooth", 1.0)


def to_target(run: dict[str, Any], key: str, target: float, higher: bool) -> tuple[float, float]:
    """(NFE, CPU seconds) up to the first row whose ``key`` reaches ``target``; inf if none."""
    ok = _better(key, higher)
    nfe = 0
    for row in run["steps"]:
        nfe += row["nfe"]
        if key in row and math.isfinite(row[key]) and ok(row[key], target):
            return float(nfe), row["wall"]
    return math.inf, math.inf


def bootstrap_median(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the median of ``values`` (resampled with replacement)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[min(resamples - 1, int(0.975 * resamples))]


def _ratio(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b):
        return math.nan
    if math.isinf(b):
        return 0.0
    return a / b if b > 0 else math.inf


def compare(runs: dict[str, list[dict[str, Any]]], variant: str, targets: dict[str, float], higher: bool):
    """Per target: per-seed ratios of ``variant`` to Adam (NFE and CPU), median, interval, seeds won."""
    out = {}
    adam = {r["seed"]: r for r in runs["adam"]}
    for key, target in targets.items():
        nfe_r, cpu_r = [], []
        for run in runs[variant]:
            base = adam[run["seed"]]
            (n1, c1), (n0, c0) = to_target(run, key, target, higher), to_target(base, key, target, higher)
            nfe_r.append(_ratio(n1, n0))
            cpu_r.append(_ratio(c1, c0))
        entry: dict[str, Any] = {"target": target, "nfe_ratios": nfe_r, "cpu_ratios": cpu_r}
        for name, values in (("nfe", nfe_r), ("cpu", cpu_r)):
            finite = [v if not math.isnan(v) else math.inf for v in values]
            entry[f"{name}_median"] = statistics.median(finite)
            entry[f"{name}_ci"] = bootstrap_median(finite)
            entry[f"{name}_won"] = sum(v < 1 for v in finite)
        out[key] = entry
    return out


def per_iteration(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median over runs of seconds per step and per NFE (all steps but the first: amortised)."""
    per_step, per_nfe = [], []
    for run in runs:
        rows = run["steps"][1:]
        if len(rows) < 2:
            continue
        seconds = rows[-1]["wall"] - run["steps"][0]["wall"]
        per_step.append(seconds / len(rows))
        per_nfe.append(seconds / max(sum(r["nfe"] for r in rows), 1))
    return {"s_per_step": statistics.median(per_step), "s_per_nfe": statistics.median(per_nfe)}


# ------------------------------------------------------------------------ memory
def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def memory_worker(task: str, variant: str, lr: float | None, steps: int) -> float:
    """Peak resident memory (MB) of ``steps`` training steps above the memory after building."""
    torch.set_num_threads(1)
    run = build_run(_config(task, variant, lr, 0))
    # Full batches only: a short last batch would meet the per-sample horizon-gradient
    # buffers of the previous one (the trainer resets them; this bare loop does not).
    size = run.config.batch_size
    batches = [b for b in run.train_loader if len(b[0]) == size][:steps]
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for batch in batches:
        run.optimizer.zero_grad()
        run.task.loss(run.model, batch).backward()
        run.optimizer.step()
    return (_vm("VmHWM") - base) / 2**20


def measure_memory(task: str, variant: str, lr: float | None, repeats: int = 3) -> float:
    values = []
    for _ in range(repeats):
        code = (
            f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import optimizers as o; "
            f"print(json.dumps(o.memory_worker({task!r}, {variant!r}, {lr!r}, 3)))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        values.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(values)


# --------------------------------------------------------------------------- task
def run_task(task: str, seeds: list[int], quick: bool) -> dict[str, Any]:
    """Learning-rate selection, paired seeds, targets and ratios for one task."""
    from snopt._tasks import get_task

    higher = get_task(TASKS[task]["task"], **TASKS[task].get("task_kwargs", {})).higher_is_better
    start = time.perf_counter()
    grid = {k: v[1:2] for k, v in LR_GRID.items()} if quick else LR_GRID
    lr_seeds = LR_SEEDS[:1] if quick else LR_SEEDS
    selection: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    if task == "digits512":  # the grid of batch 64 is not re-run: the lr of digits' selection
        chosen = json.loads((PARTS / "digits.json").read_text())["chosen"]
    else:
        for name, values in grid.items():
            selection[name] = {}
            for lr in values:
                finals = [_final(train_once(task, name, lr, s)) for s in lr_seeds]
                selection[name][str(lr)] = statistics.median(finals)
                print(f"[{task}] select {name} lr={lr}: {selection[name][str(lr)]:.4g}", flush=True)
            chosen[name] = float(min(selection[name], key=lambda k: selection[name][k]))
        if TASKS[task].get("reference") and not quick:  # damping of SNOpt's defaults, at its default lr
            selection["snopt-damping"] = {str(D.SNOPT["damping"]): selection["snopt"].get(str(D.LR["snopt"]))}
            for damping in DAMPING_GRID:
                finals = [_final(train_once(task, "snopt", None, s, snopt_damping=damping)) for s in lr_seeds]
                selection["snopt-damping"][str(damping)] = statistics.median(finals)
                print(f"[{task}] select snopt damping={damping}: {statistics.median(finals):.4g}", flush=True)
    variants = {"adam": chosen["adam"], "sgd": chosen["sgd"], "snopt": None, "snopt-best": chosen["snopt"]}
    if TASKS[task].get("reference"):
        variants["snopt-reference"] = None
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for seed in seeds:
        for variant, lr in variants.items():
            if variant == "snopt-best" and chosen["snopt"] == D.LR["snopt"]:
                runs[variant].append(runs["snopt"][-1])  # the same run
                continue
            runs[variant].append(train_once(task, variant, lr, seed))
            print(f"[{task}] seed {seed} {variant}: {runs[variant][-1]['elapsed']:.1f}s", flush=True)
    targets = {
        key: statistics.median(value_at(r, key, 0.75) for r in runs["adam"])
        for key in ("smooth", "val_loss", "metric")
    }
    report: dict[str, Any] = {
        "task": task,
        "spec": {k: v for k, v in TASKS[task].items() if k not in ("reference", "seeds")},
        "higher_is_better": higher,
        "seeds": seeds,
        "lr_seeds": lr_seeds,
        "selection": selection,
        "chosen": chosen,
        "targets": targets,
        "comparisons": {v: compare(runs, v, targets, higher) for v in variants if v != "adam"},
        "per_iteration": {v: per_iteration(runs[v]) for v in variants},
        "status": {v: [r["status"] for r in runs[v]] for v in variants},
        "final": {v: [value_at(r, "metric", 1.0) for r in runs[v]] for v in variants},
    }
    report["memory_mb"] = {v: measure_memory(task, v, variants[v]) for v in ("adam", "snopt")}
    report["minutes"] = (time.perf_counter() - start) / 60
    report["runs"] = runs
    return report


# ------------------------------------------------------------------------- report
def _f(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}"
    return str(value)


def write_markdown(parts: dict[str, dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    lines = [
        "# SNOpt vs Adam vs SGD (issue 12 protocol)",
        "",
        f"Generated by `benchmarks/optimizers.py` on {meta['machine']}; one torch thread; "
        f"tasks run as separate processes; total {meta['minutes']:.1f} min of compute "
        f"(load average at the start {meta['load']}).",
        "",
        f"Learning-rate grids {json.dumps(LR_GRID)} on selection seeds {LR_SEEDS} (lowest median "
        "final smoothed training loss wins); `snopt` = SNOpt with its defaults "
        f"({json.dumps({k: v for k, v in D.SNOPT.items()})}, lr {D.LR['snopt']}); `snopt-best` = "
        "SNOpt at its chosen lr; `snopt-reference` = the paper's form with the former defaults "
        f"({json.dumps(REFERENCE)}). Targets: median over seeds of Adam's value at 75% of the budget.",
        "",
        SIZE_NOTE,
        "",
        "Ratios are SNOpt / Adam per seed (paired); median [bootstrap 95% interval]; won = seeds "
        "with ratio < 1; inf = the target was not reached by SNOpt (0 = reached by SNOpt but not Adam).",
        "",
    ]
    for task, rep in parts.items():
        goal = GOALS.get(task)
        lines += [
            f"## {task}",
            "",
            f"Settings {json.dumps(rep['spec'])}; paired seeds {rep['seeds']} ({len(rep['seeds'])}); "
            f"chosen lr {json.dumps(rep['chosen'])}; {rep['minutes']:.1f} min.",
            "",
            f"Targets: {json.dumps({k: round(v, 4) for k, v in rep['targets'].items()})}",
            "",
            "| variant | target | NFE ratio | CPU ratio | won NFE / CPU | goal <= " + _f(goal) + " |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for variant, comp in rep["comparisons"].items():
            for key, e in comp.items():
                met = e["nfe_median"] <= goal and e["cpu_median"] <= goal if goal else False
                lines.append(
                    f"| {variant} | {key} | {_f(e['nfe_median'])} [{_f(e['nfe_ci'][0])}, {_f(e['nfe_ci'][1])}] "
                    f"| {_f(e['cpu_median'])} [{_f(e['cpu_ci'][0])}, {_f(e['cpu_ci'][1])}] "
                    f"| {e['nfe_won']} / {e['cpu_won']} of {len(e['nfe_ratios'])} | {'met' if met else 'missed'} |"
                )
        it = rep["per_iteration"]
        mem = rep["memory_mb"]
        lines += [
            "",
            "| variant | s / step | ms / NFE | step vs Adam | per NFE vs Adam | final metric per seed |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for variant, v in it.items():
            lines.append(
                f"| {variant} | {_f(v['s_per_step'])} | {_f(1e3 * v['s_per_nfe'])} "
                f"| {_f(v['s_per_step'] / it['adam']['s_per_step'])} "
                f"| {_f(v['s_per_nfe'] / it['adam']['s_per_nfe'])} "
                f"| {', '.join(_f(x, 4) for x in rep['final'][variant])} |"
            )
        diverged = {v: sum(x == "diverged" for x in st) for v, st in rep["status"].items()}
        lines += [
            "",
            "Runs stopped as diverged (train loss > 10x its first), of "
            f"{len(rep['seeds'])}: {json.dumps(diverged)}.",
            "",
            f"Peak memory of 3 steps (median of 3 processes): SNOpt {_f(mem['snopt'])} MB, Adam "
            f"{_f(mem['adam'])} MB, ratio {_f(mem['snopt'] / mem['adam'])} (goal <= {GOALS['memory']}).",
            "",
        ]
        if rep["selection"]:
            lines += ["Selection (median final smoothed train loss on the selection seeds):", ""]
            for name, sel in rep["selection"].items():
                label = "damping" if name.endswith("damping") else "lr"
                lines.append(f"- {name}: " + ", ".join(f"{label} {k}: {_f(v, 4)}" for k, v in sel.items()))
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def report(minutes: float | None = None) -> None:
    parts = {}
    for task in TASKS:
        path = PARTS / f"{task}.json"
        if path.exists():
            parts[task] = json.loads(path.read_text())
    meta = {
        "machine": f"{platform.platform()}, torch {torch.__version__}, {os.cpu_count()} CPUs",
        "minutes": minutes if minutes is not None else sum(p["minutes"] for p in parts.values()),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    slim = {t: {k: v for k, v in p.items() if k != "runs"} for t, p in parts.items()}
    (RESULTS / "optimizers.json").write_text(json.dumps({"meta": meta, "tasks": slim}, indent=1, default=str))
    write_markdown(parts, meta, RESULTS / "optimizers.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS))
    parser.add_argument("--all", action="store_true", help="every task (separate processes), then the report")
    order = ["digits", "toy2d", "timeseries", "digits512"]
    parser.add_argument("--tasks", nargs="*", default=order, help="tasks for --all")
    parser.add_argument("--report", action="store_true", help="merge the parts into the report")
    parser.add_argument("--seeds", type=int, default=None, help="paired seeds (default: per task)")
    parser.add_argument("--quick", action="store_true", help="one grid value, one selection seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    PARTS.mkdir(parents=True, exist_ok=True)
    if args.all:
        start = time.perf_counter()
        for task in args.tasks:
            cmd = [sys.executable, __file__, "--task", task]
            cmd += ["--seeds", str(args.seeds)] if args.seeds else []
            subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
        report((time.perf_counter() - start) / 60)
        return 0
    if args.task:
        seeds = args.seeds or TASKS[args.task]["seeds"]
        rep = run_task(args.task, list(range(seeds)), args.quick)
        (PARTS / f"{args.task}.json").write_text(json.dumps(rep, default=str))
    if args.report:
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
