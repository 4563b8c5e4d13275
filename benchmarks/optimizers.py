"""Benchmark SNOpt against Adam and SGD on the built-in tasks (not a test).

For each task (``digits``, ``toy2d``, ``timeseries``) and optimizer:

1. **Learning rate** from a small grid (:data:`LR_GRID`, the same for every task): one run
   per grid value with seed 0, keeping the value with the best final validation metric.
2. **Three seeds** with that learning rate, the same number of epochs for every optimizer
   (seed 0 is the grid run).  SNOpt runs with its defaults (eps 0.05, update_freq 100,
   alpha 0.75, sample_step 0.01, full preconditioning); SGD with momentum 0.9.
3. **Time to target**: the target is, over the three optimizers, the least good of the
   median (over seeds) best validation metric, so that every optimizer reaches it in at
   least two of three seeds.  A run's time is the training wall-clock (evaluation
   excluded: ``FitResult.history[...]["wall_time"]``) at the first evaluation that
   reaches the target; the figure is the median over seeds.
4. **Per-iteration wall-clock**, two ways: (a) in those training runs, the median step
   time (step 1 excluded as warm-up) and the time per function evaluation, which
   removes the effect of different NFE; (b) a controlled side-by-side measurement in one
   process: the three optimizers each own a copy of the same model, every iteration
   reloads the same parameters into each copy and steps on the same batch, in rotating
   order, so NFE are identical and only the optimizer's own work differs.  SNOpt runs
   there with ``update_freq=5`` so that refresh iterations (curvature collection plus
   eigendecomposition) and normal ones can be timed separately; the amortized cost at
   the default ``update_freq=100`` is ``(99 normal + 1 refresh) / 100``.
5. **Peak memory** of a few training steps (the first SNOpt step is a refresh), each
   configuration in a fresh subprocess.  CPU: peak resident set size (``VmHWM`` of
   ``/proc/self/status``, reset through ``/proc/self/clear_refs`` after the model, the
   data and the batches are built and ``malloc_trim`` returned free heap pages) minus the
   resident size at that point.  CUDA: ``torch.cuda.max_memory_allocated`` minus the
   allocation before the steps.  Also SNOpt in adjoint vs direct mode at ``t1 = 1`` and
   ``t1 = 4``.

Timings use ``torch.set_num_threads(--threads)`` (default 1: stable figures on a small
shared machine).  Results go to ``benchmarks/results/optimizers.json`` and ``.md``.

Usage::

    python benchmarks/optimizers.py            # full run (about 15-20 min on 2 CPU cores)
    python benchmarks/optimizers.py --quick    # smoke run: 1 seed, 1 learning rate, 1 epoch
    python benchmarks/optimizers.py --ablation-update-freq 10   # plus SNOpt with update_freq=10
    python benchmarks/optimizers.py --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from snopt import RunConfig, build_run, run_training
from snopt._ode import ode_blocks
from snopt._training import Callback, TrainingError

OPTIMIZERS = ("snopt", "adam", "sgd")
#: Learning-rate grid per optimizer, the same for every task.
LR_GRID = {"snopt": [0.003, 0.01, 0.03], "adam": [0.003, 0.01, 0.03], "sgd": [0.03, 0.1, 0.3]}
#: Task settings: small models so that the full benchmark fits in ~20 minutes on 2 CPU cores.
TASKS: dict[str, dict[str, Any]] = {
    "digits": dict(
        task_kwargs={},
        model_kwargs={"width": 8},
        solver=dict(method="dopri5", rtol=1e-3, atol=1e-3),
        epochs=4,
        eval_every=5,
    ),
    "toy2d": dict(
        task_kwargs={"dataset": "eight_gaussians"},
        model_kwargs={"hidden": 32},
        # rtol/atol 1e-3 instead of the task's 1e-4 default, for time.
        solver=dict(method="dopri5", rtol=1e-3, atol=1e-3),
        epochs=8,
        eval_every=8,
    ),
    "timeseries": dict(
        task_kwargs={},
        model_kwargs={"hidden_dim": 16},
        solver=dict(method="dopri5", rtol=1e-3, atol=1e-3),
        epochs=8,
        eval_every=4,
    ),
}
BATCH_SIZE = 64
SNOPT_UPDATE_FREQ = 100  # SNOpt's default, used in the training runs
CONTROLLED_UPDATE_FREQ = 5
GOALS = {
    "time_to_target_vs_adam": 0.6,
    "amortized_vs_sgd": 1.15,
    "refresh_vs_normal": 3.0,
    "memory_vs_adam": 1.3,
    "adjoint_t4_vs_t1": 1.05,
}


# --------------------------------------------------------------------------- runs
def _config(
    task: str, optimizer: str, lr: float, seed: int, epochs: int, device: str, **over: Any
) -> RunConfig:
    spec = TASKS[task]
    kwargs: dict[str, Any] = dict(
        task=task,
        task_kwargs=dict(spec["task_kwargs"]),
        model_kwargs=dict(spec["model_kwargs"]),
        optimizer=optimizer,
        lr=lr,
        epochs=epochs,
        batch_size=BATCH_SIZE,
        eval_every=spec["eval_every"],
        seed=seed,
        device=device,
        **spec["solver"],
    )
    kwargs.update(over)
    return RunConfig(**kwargs)


class _DivergenceGuard(Callback):
    """Stops a run whose training loss exceeds ``factor`` times its first loss (a diverged lr)."""

    def __init__(self, factor: float = 10.0) -> None:
        self.factor = factor
        self.first: float | None = None

    def on_step_end(self, trainer: Any, record: dict[str, float]) -> None:
        loss = record["train_loss"]
        if self.first is None:
            self.first = abs(loss)
        elif not math.isfinite(loss) or abs(loss) > self.factor * max(self.first, 1e-12):
            raise TrainingError(f"diverged: train loss {loss:.4g} at step {record['step']}")


def train_once(
    task: str, optimizer: str, lr: float, seed: int, epochs: int, device: str, **over: Any
) -> dict[str, Any]:
    """One training run, reduced to what the report needs."""
    cfg = _config(task, optimizer, lr, seed, epochs, device, **over)
    start = time.perf_counter()
    try:
        result = run_training(cfg, callbacks=[_DivergenceGuard()], progress=False)
        status, history, stats = result.status, result.history, result.stats
    except TrainingError as exc:
        status = "failed"
        history = exc.result.history if exc.result is not None else []
        stats = exc.result.stats if exc.result is not None else {}
    steps = [
        {
            "step": int(h["step"]),
            "wall_time": float(h["wall_time"]),
            "nfe": int(h["nfe_forward"] + h["nfe_backward"]),
            **({"metric": float(h["metric"])} if "metric" in h else {}),
        }
        for h in history
    ]
    return {
        "task": task,
        "optimizer": optimizer,
        "lr": lr,
        "seed": seed,
        "status": status,
        "elapsed": time.perf_counter() - start,
        "history": steps,
        "optimizer_stats": stats.get("optimizer"),
    }


def _metric_ok(value: float) -> bool:
    return value is not None and math.isfinite(value)


def final_metric(run: dict[str, Any]) -> float | None:
    evals = [h["metric"] for h in run["history"] if "metric" in h]
    return evals[-1] if evals and run["status"] == "completed" else None


def best_metric(run: dict[str, Any], higher: bool) -> float | None:
    evals = [h["metric"] for h in run["history"] if "metric" in h and math.isfinite(h["metric"])]
    if not evals:
        return None
    return max(evals) if higher else min(evals)


def time_to_target(run: dict[str, Any], target: float, higher: bool) -> tuple[float, float, float]:
    """(training wall-clock, steps, NFE) at the first evaluation that reaches ``target``."""
    nfe = 0
    for h in run["history"]:
        nfe += h["nfe"]
        if "metric" in h and (h["metric"] >= target if higher else h["metric"] <= target):
            return h["wall_time"], float(h["step"]), float(nfe)
    return math.inf, math.inf, math.inf


def step_times(run: dict[str, Any]) -> list[tuple[int, float, int]]:
    """(step, seconds, nfe) per step, from the cumulative wall_time."""
    out, previous = [], 0.0
    for h in run["history"]:
        out.append((h["step"], h["wall_time"] - previous, h["nfe"]))
        previous = h["wall_time"]
    return out


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else math.nan


# ------------------------------------------------------------ controlled timing
def controlled_timing(task: str, lrs: dict[str, float], iterations: int, device: str) -> dict[str, Any]:
    """Side-by-side per-iteration times with identical parameters, batches and NFE."""
    from snopt._optimizer import SNOpt

    runs = {}
    for name in OPTIMIZERS:
        cfg = _config(task, name, lrs[name], 0, 1, device)
        run = build_run(cfg)
        model = run.model.to(cfg.device)
        if name == "snopt":
            run.optimizer.collector.remove()
            opt = SNOpt(
                model,
                lr=lrs[name],
                momentum=cfg.momentum,
                update_freq=CONTROLLED_UPDATE_FREQ,
            )
        else:
            opt = run.optimizer
        runs[name] = (run, model, opt)
    task_obj, loader = runs["sgd"][0].task, runs["sgd"][0].train_loader
    batches = [task_obj.batch_to(b, torch.device(device)) for _, b in zip(range(4), loader)]
    snapshot = {k: v.clone() for k, v in runs["sgd"][1].state_dict().items()}
    times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    nfe: dict[str, list[int]] = {name: [] for name in OPTIMIZERS}
    for it in range(iterations):
        order = OPTIMIZERS[it % 3 :] + OPTIMIZERS[: it % 3]
        batch = batches[it % len(batches)]
        for name in order:
            run, model, opt = runs[name]
            model.load_state_dict(snapshot)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            for _, block in ode_blocks(model):
                block.zero_t1_grad()
            loss = run.task.loss(model, batch)
            loss.backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            nfe[name].append(sum(b.stats.nfe_forward + b.stats.nfe_backward for _, b in ode_blocks(model)))
    refresh = [i for i in range(iterations) if i % CONTROLLED_UPDATE_FREQ == 0 and i > 0]
    normal = [i for i in range(2, iterations) if i % CONTROLLED_UPDATE_FREQ != 0]
    out: dict[str, Any] = {"iterations": iterations, "update_freq": CONTROLLED_UPDATE_FREQ}
    for name in OPTIMIZERS:
        out[name] = {
            "normal_s": _median([times[name][i] for i in normal]),
            "refresh_s": _median([times[name][i] for i in refresh]) if name == "snopt" else None,
            "nfe": _median([nfe[name][i] for i in normal]),
        }
    sn, sgd, adam = out["snopt"], out["sgd"], out["adam"]
    out["snopt_normal_vs_sgd"] = sn["normal_s"] / sgd["normal_s"]
    out["snopt_normal_vs_adam"] = sn["normal_s"] / adam["normal_s"]
    out["refresh_vs_normal"] = sn["refresh_s"] / sn["normal_s"]
    amortized = ((SNOPT_UPDATE_FREQ - 1) * sn["normal_s"] + sn["refresh_s"]) / SNOPT_UPDATE_FREQ
    out["amortized_vs_sgd"] = amortized / sgd["normal_s"]
    amortized5 = ((CONTROLLED_UPDATE_FREQ - 1) * sn["normal_s"] + sn["refresh_s"]) / CONTROLLED_UPDATE_FREQ
    out["amortized_freq5_vs_sgd"] = amortized5 / sgd["normal_s"]
    samples = runs["snopt"][2].stats["samples"]
    out["samples_per_refresh"] = samples / max(runs["snopt"][2].stats["refreshes"], 1)
    for _, _model, opt in runs.values():
        if hasattr(opt, "collector"):
            opt.collector.remove()
    return out


# ------------------------------------------------------------------------ memory
def _vm_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: peak memory of ``spec['steps']`` training steps."""
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cfg = _config(
        spec["task"],
        spec["optimizer"],
        spec["lr"],
        0,
        1,
        device,
        t1=spec["t1"],
        adjoint=spec["adjoint"],
    )
    run = build_run(cfg)
    model = run.model.to(device)
    batches = [
        run.task.batch_to(b, torch.device(device)) for _, b in zip(range(spec["steps"]), run.train_loader)
    ]
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        method = "torch.cuda.max_memory_allocated - memory_allocated before the steps"
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        base = _vm_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        method = "VmHWM - VmRSS before the steps (/proc/self/clear_refs reset)"
    nfe = 0
    for batch in batches:
        run.optimizer.zero_grad(set_to_none=True)
        for _, block in ode_blocks(model):
            block.zero_t1_grad()
        loss = run.task.loss(model, batch)
        loss.backward()
        run.optimizer.step()
        nfe += sum(b.stats.nfe_forward + b.stats.nfe_backward for _, b in ode_blocks(model))
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _vm_status("VmHWM") - base
    return {**spec, "peak_mb": peak / 2**20, "method": method, "nfe": nfe}


def measure_memory(spec: dict[str, Any], repeats: int = 3) -> dict[str, Any]:
    """The median peak over ``repeats`` fresh processes."""
    results = [_memory_once(spec) for _ in range(repeats)]
    ok = [r for r in results if "peak_mb" in r]
    if not ok:
        return results[0]
    peaks = [r["peak_mb"] for r in ok]
    return {**ok[0], "peak_mb": statistics.median(peaks), "repeats": peaks}


def _memory_once(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ report
def analyse_task(task: str, runs: list[dict[str, Any]], chosen: dict[str, float]) -> dict[str, Any]:
    from snopt import get_task

    spec_task = get_task(task, **TASKS[task]["task_kwargs"])
    higher = spec_task.higher_is_better
    final = {opt: [r for r in runs if r["optimizer"] == opt and r["lr"] == chosen[opt]] for opt in OPTIMIZERS}
    med_best = {}
    for opt, rs in final.items():
        bests = [best_metric(r, higher) for r in rs]
        med_best[opt] = _median([b for b in bests if b is not None])
    valid = [v for v in med_best.values() if math.isfinite(v)]
    target = (min(valid) if higher else max(valid)) if valid else math.nan
    out: dict[str, Any] = {
        "metric": spec_task.metric_name,
        "higher_is_better": higher,
        "target": target,
        "chosen_lr": chosen,
        "median_best_metric": med_best,
    }
    per_opt = {}
    for opt, rs in final.items():
        reached = [time_to_target(r, target, higher) for r in rs]
        ttt = [x[0] for x in reached]
        normal, refresh, per_nfe = [], [], []
        for r in rs:
            st = step_times(r)
            is_refresh = {s for s, _, _ in st if opt == "snopt" and (s - 1) % SNOPT_UPDATE_FREQ == 0}
            normal.append(_median([dt for s, dt, _ in st if s > 1 and s not in is_refresh]))
            refresh.append(_median([dt for s, dt, _ in st if s > 1 and s in is_refresh]))
            per_nfe.append(_median([dt / n for s, dt, n in st if s > 1 and s not in is_refresh and n > 0]))
        per_opt[opt] = {
            "time_to_target_s": ttt,
            "median_time_to_target_s": statistics.median(ttt),
            "median_steps_to_target": statistics.median([x[1] for x in reached]),
            "median_nfe_to_target": statistics.median([x[2] for x in reached]),
            "final_metric": [final_metric(r) for r in rs],
            "best_metric": [best_metric(r, higher) for r in rs],
            "median_normal_step_s": _median(normal),
            "median_refresh_step_s": _median([v for v in refresh if math.isfinite(v)])
            if opt == "snopt"
            else None,
            "median_time_per_nfe_ms": 1e3 * _median(per_nfe),
            "median_nfe_per_step": _median([_median([n for _, _, n in step_times(r)]) for r in rs]),
            "train_wall_s": [r["history"][-1]["wall_time"] if r["history"] else math.nan for r in rs],
        }
    out["optimizers"] = per_opt
    ta = per_opt["adam"]["median_time_to_target_s"]
    ts = per_opt["snopt"]["median_time_to_target_s"]
    out["snopt_vs_adam_time_to_target"] = ts / ta if ta > 0 and math.isfinite(ta) else math.nan
    na = per_opt["adam"]["median_nfe_to_target"]
    out["snopt_vs_adam_nfe_to_target"] = (
        per_opt["snopt"]["median_nfe_to_target"] / na if math.isfinite(na) else math.nan
    )
    out["snopt_vs_sgd_step_time"] = (
        per_opt["snopt"]["median_normal_step_s"] / per_opt["sgd"]["median_normal_step_s"]
    )
    out["snopt_vs_sgd_time_per_nfe"] = (
        per_opt["snopt"]["median_time_per_nfe_ms"] / per_opt["sgd"]["median_time_per_nfe_ms"]
    )
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "not reached"
        return f"{value:.{digits}g}"
    return str(value)


def _goal(value: float, limit: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return "met" if value <= limit else "missed"


def _with_goal(value: float, limit: float) -> str:
    return f"{_fmt(value)} ({_goal(value, limit)})"


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*names: str) -> list[str]:
    return [_row(*names), _row(*["---"] * len(names))]


def write_markdown(report: dict[str, Any], path: Path) -> None:
    env = report["environment"]
    tasks = report["tasks"]
    script = "benchmarks/optimizers.py" + (" --quick" if report["quick"] else "")
    lines = [
        "# SNOpt vs Adam vs SGD",
        "",
        f"Generated by `{script}` on {env['device']} ({env['platform']}, torch {env['torch']}, "
        f"{env['threads']} torch thread(s); load average at start {env['load_start']}, "
        f"at end {env['load_end']}); total {report['elapsed_s'] / 60:.1f} min.",
        "",
        f"Learning-rate grids: {json.dumps(LR_GRID)} (seed 0 picks the best final validation metric). "
        f"Seeds: {report['seeds']}. Batch size {BATCH_SIZE}. SNOpt: defaults (eps 0.05, update_freq "
        f"{SNOPT_UPDATE_FREQ}, alpha 0.75, sample_step 0.01, full_precond); SGD momentum 0.9.",
        "",
        *_header("task", "settings", "epochs"),
    ]
    for task, t in tasks.items():
        spec = TASKS[task]
        settings = f"model {spec['model_kwargs']}, task {spec['task_kwargs']}, solver {spec['solver']}"
        lines.append(_row(task, settings, t["epochs"]))

    lines += ["", "## Time to target (training wall-clock, evaluation excluded; median over seeds)", ""]
    lines += _header(
        "task", "target", "lr S/A/G", "SNOpt s", "Adam s", "SGD s", "SNOpt / Adam", "goal <= 0.6"
    )
    for task, t in tasks.items():
        a, o = t["analysis"], t["analysis"]["optimizers"]
        sense = ">=" if a["higher_is_better"] else "<="
        ratio = a["snopt_vs_adam_time_to_target"]
        lines.append(
            _row(
                task,
                f"{a['metric']} {sense} {_fmt(a['target'], 4)}",
                "/".join(str(a["chosen_lr"][k]) for k in OPTIMIZERS),
                *(_fmt(o[k]["median_time_to_target_s"]) for k in OPTIMIZERS),
                _fmt(ratio),
                _goal(ratio, GOALS["time_to_target_vs_adam"]),
            )
        )
    lines += [
        "",
        "Load-independent view of the same runs: median steps and function evaluations "
        "(forward + backward) to the target.",
        "",
        *_header(
            "task",
            "SNOpt steps",
            "Adam steps",
            "SGD steps",
            "SNOpt NFE",
            "Adam NFE",
            "SGD NFE",
            "SNOpt / Adam NFE",
        ),
    ]
    for task, t in tasks.items():
        a, o = t["analysis"], t["analysis"]["optimizers"]
        lines.append(
            _row(
                task,
                *(_fmt(o[k]["median_steps_to_target"]) for k in OPTIMIZERS),
                *(_fmt(o[k]["median_nfe_to_target"]) for k in OPTIMIZERS),
                _fmt(a["snopt_vs_adam_nfe_to_target"]),
            )
        )
    lines += [
        "",
        "Final validation metric per seed (chosen lr):",
        "",
        *_header("task", "SNOpt", "Adam", "SGD"),
    ]
    for task, t in tasks.items():
        o = t["analysis"]["optimizers"]
        lines.append(_row(task, *(", ".join(_fmt(v, 4) for v in o[k]["final_metric"]) for k in OPTIMIZERS)))

    lines += ["", "## Per-iteration wall-clock in the training runs (step 1 excluded; medians)", ""]
    lines += _header(
        "task", "step s S/A/G", "SNOpt / SGD", "NFE per step S/A/G", "ms per NFE S/A/G", "SNOpt / SGD per NFE"
    )
    for task, t in tasks.items():
        a, o = t["analysis"], t["analysis"]["optimizers"]
        lines.append(
            _row(
                task,
                "/".join(_fmt(o[k]["median_normal_step_s"]) for k in OPTIMIZERS),
                _fmt(a["snopt_vs_sgd_step_time"]),
                "/".join(_fmt(o[k]["median_nfe_per_step"]) for k in OPTIMIZERS),
                "/".join(_fmt(o[k]["median_time_per_nfe_ms"]) for k in OPTIMIZERS),
                _fmt(a["snopt_vs_sgd_time_per_nfe"]),
            )
        )

    lines += [
        "",
        "## Controlled per-iteration wall-clock (same parameters, batch and NFE; SNOpt update_freq "
        f"{CONTROLLED_UPDATE_FREQ})",
        "",
        *_header(
            "task",
            "NFE",
            "SGD s",
            "Adam s",
            "SNOpt normal s",
            "SNOpt refresh s",
            "samples / refresh",
            "normal / SGD",
            "refresh / normal (goal <= 3)",
            "amortized@100 / SGD (goal <= 1.15)",
            "amortized@5 / SGD",
        ),
    ]
    for task, t in tasks.items():
        c = t["controlled"]
        lines.append(
            _row(
                task,
                _fmt(c["sgd"]["nfe"]),
                _fmt(c["sgd"]["normal_s"]),
                _fmt(c["adam"]["normal_s"]),
                _fmt(c["snopt"]["normal_s"]),
                _fmt(c["snopt"]["refresh_s"]),
                _fmt(c["samples_per_refresh"]),
                _fmt(c["snopt_normal_vs_sgd"]),
                _with_goal(c["refresh_vs_normal"], GOALS["refresh_vs_normal"]),
                _with_goal(c["amortized_vs_sgd"], GOALS["amortized_vs_sgd"]),
                _fmt(c["amortized_freq5_vs_sgd"]),
            )
        )

    mem = report["memory"]
    lines += [
        "",
        f"## Peak memory ({mem['method']}; {mem['steps']} steps, batch {BATCH_SIZE}; "
        "median of 3 fresh processes)",
        "",
        *_header("task", "SNOpt MB", "Adam MB", "SGD MB", "SNOpt / Adam (goal <= 1.3)"),
    ]
    for task, row in mem["optimizers"].items():
        ratio = row.get("snopt_vs_adam", math.nan)
        lines.append(
            _row(
                task,
                *(_fmt(row[k]) for k in OPTIMIZERS),
                f"{_fmt(ratio)} ({_goal(ratio, GOALS['memory_vs_adam'])})",
            )
        )
    lines += [
        "",
        "SNOpt, adjoint vs direct mode:",
        "",
        *_header(
            "task",
            "adjoint t1=1 MB",
            "adjoint t1=4 MB",
            "direct t1=1 MB",
            "direct t1=4 MB",
            "adjoint t1=4 / t1=1 (goal <= 1.05)",
            "direct t1=4 / t1=1",
        ),
    ]
    for task, row in mem["horizon"].items():
        ratio = row["adjoint_ratio"]
        lines.append(
            _row(
                task,
                *(_fmt(row[k]) for k in ("adjoint_1", "adjoint_4", "direct_1", "direct_4")),
                f"{_fmt(ratio)} ({_goal(ratio, GOALS['adjoint_t4_vs_t1'])})",
                _fmt(row["direct_ratio"]),
            )
        )
    ablations = {task: t["ablation"] for task, t in tasks.items() if t.get("ablation")}
    if ablations:
        lines += [
            "",
            "## Ablation: SNOpt's update_freq (same lr, seeds and target as above)",
            "",
            *_header(
                "task", "update_freq", "time s", "steps", "NFE", "vs Adam time", "final metric", "refreshes"
            ),
        ]
        for task, by_freq in ablations.items():
            o = tasks[task]["analysis"]["optimizers"]
            base = {
                "median_time_to_target_s": o["snopt"]["median_time_to_target_s"],
                "median_steps_to_target": o["snopt"]["median_steps_to_target"],
                "median_nfe_to_target": o["snopt"]["median_nfe_to_target"],
                "final_metric": o["snopt"]["final_metric"],
                "refreshes": [],
            }
            adam = o["adam"]["median_time_to_target_s"]
            for freq, row in [(str(SNOPT_UPDATE_FREQ), base), *by_freq.items()]:
                lines.append(
                    _row(
                        task,
                        freq,
                        _fmt(row["median_time_to_target_s"]),
                        _fmt(row["median_steps_to_target"]),
                        _fmt(row["median_nfe_to_target"]),
                        _fmt(row["median_time_to_target_s"] / adam if math.isfinite(adam) else math.nan),
                        ", ".join(_fmt(v, 4) for v in row["final_metric"]),
                        ", ".join(_fmt(v) for v in row["refreshes"]) or "–",
                    )
                )
    lines += ["", "## Goals", "", *(f"- {line}" for line in report["goals"])]
    path.write_text("\n".join(lines) + "\n")


def _goal_line(text: str, values: dict[str, float], limit: float, need: int | None = None) -> str:
    ok = [math.isfinite(v) and v <= limit for v in values.values()]
    met = sum(ok) >= need if need is not None else all(ok)
    figures = ", ".join(f"{task} {_fmt(v)}x" for task, v in values.items())
    return f"{text}: {'met' if met else 'missed'} ({figures})."


def summarise_goals(report: dict[str, Any]) -> list[str]:
    tasks = report["tasks"]
    mem = report["memory"]
    return [
        _goal_line(
            "Time to target <= 0.6x Adam on at least two tasks",
            {t: v["analysis"]["snopt_vs_adam_time_to_target"] for t, v in tasks.items()},
            GOALS["time_to_target_vs_adam"],
            need=min(2, len(tasks)),
        ),
        _goal_line(
            "Amortized per-iteration <= 1.15x SGD (controlled, update_freq 100)",
            {t: v["controlled"]["amortized_vs_sgd"] for t, v in tasks.items()},
            GOALS["amortized_vs_sgd"],
        ),
        _goal_line(
            "Refresh iteration <= 3x a normal one (controlled)",
            {t: v["controlled"]["refresh_vs_normal"] for t, v in tasks.items()},
            GOALS["refresh_vs_normal"],
        ),
        _goal_line(
            "Peak memory <= 1.3x Adam",
            {t: row.get("snopt_vs_adam", math.nan) for t, row in mem["optimizers"].items()},
            GOALS["memory_vs_adam"],
        ),
        _goal_line(
            "Adjoint peak memory at t1=4 <= 1.05x t1=1 (SNOpt)",
            {t: row["adjoint_ratio"] for t, row in mem["horizon"].items()},
            GOALS["adjoint_t4_vs_t1"],
        ),
    ]


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per optimizer and task (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, middle lr, 1 epoch, fewer steps"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
    parser.add_argument(
        "--ablation-update-freq",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also train SNOpt with update_freq N (chosen lr, same seeds); time to the same target",
    )
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0
    if args.seeds < 1:
        parser.error("--seeds must be a positive integer")
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(range(1 if args.quick else args.seeds))
    start = time.perf_counter()
    load_start = _load()
    report: dict[str, Any] = {
        "quick": args.quick,
        "seeds": seeds,
        "lr_grid": LR_GRID,
        "goals": [],
        "tasks": {},
    }
    for task in args.tasks:
        epochs = 1 if args.quick else TASKS[task]["epochs"]
        runs: list[dict[str, Any]] = []
        chosen: dict[str, float] = {}
        for opt in OPTIMIZERS:
            grid = [LR_GRID[opt][1]] if args.quick else LR_GRID[opt]
            grid_runs = [train_once(task, opt, lr, 0, epochs, args.device) for lr in grid]
            runs += grid_runs
            higher = _higher(task)
            scored = [(final_metric(r), r["lr"]) for r in grid_runs if _metric_ok(final_metric(r))]
            if scored:
                chosen[opt] = (max if higher else min)(scored)[1]
            else:
                chosen[opt] = grid[0]
            for seed in seeds[1:]:
                runs.append(train_once(task, opt, chosen[opt], seed, epochs, args.device))
            print(f"[{time.perf_counter() - start:6.0f}s] {task} {opt}: lr {chosen[opt]}", flush=True)
        analysis = analyse_task(task, runs, chosen)
        controlled = controlled_timing(task, chosen, 8 if args.quick else 22, args.device)
        report["tasks"][task] = {
            "epochs": epochs,
            "runs": runs,
            "analysis": analysis,
            "controlled": controlled,
        }
        ablation = {}
        for freq in args.ablation_update_freq:
            extra = [
                train_once(task, "snopt", chosen["snopt"], seed, epochs, args.device, snopt_update_freq=freq)
                for seed in seeds
            ]
            reached = [time_to_target(r, analysis["target"], analysis["higher_is_better"]) for r in extra]
            ablation[str(freq)] = {
                "runs": extra,
                "median_time_to_target_s": statistics.median(x[0] for x in reached),
                "median_steps_to_target": statistics.median(x[1] for x in reached),
                "median_nfe_to_target": statistics.median(x[2] for x in reached),
                "final_metric": [final_metric(r) for r in extra],
                "refreshes": [(r["optimizer_stats"] or {}).get("refreshes") for r in extra],
            }
        if ablation:
            report["tasks"][task]["ablation"] = ablation
        print(
            f"[{time.perf_counter() - start:6.0f}s] {task}: target {analysis['target']:.4g}, SNOpt/Adam "
            f"time-to-target {analysis['snopt_vs_adam_time_to_target']:.3g}, refresh/normal "
            f"{controlled['refresh_vs_normal']:.3g}, amortized/SGD {controlled['amortized_vs_sgd']:.3g}",
            flush=True,
        )
    steps = 2 if args.quick else 3
    memory: dict[str, Any] = {"steps": steps, "optimizers": {}, "horizon": {}, "raw": []}
    for task in args.tasks:
        lrs = report["tasks"][task]["analysis"]["chosen_lr"]
        row: dict[str, Any] = {}
        for opt in OPTIMIZERS:
            spec = dict(
                task=task,
                optimizer=opt,
                lr=lrs[opt],
                t1=1.0,
                adjoint=True,
                steps=steps,
                device=args.device,
                threads=args.threads,
            )
            res = measure_memory(spec)
            memory["raw"].append(res)
            memory["method"] = res.get("method", memory.get("method", ""))
            row[opt] = res.get("peak_mb", math.nan)
        row["snopt_vs_adam"] = row["snopt"] / row["adam"] if row["adam"] else math.nan
        memory["optimizers"][task] = row
    for task in [t for t in ("digits", "toy2d") if t in args.tasks]:
        lr = report["tasks"][task]["analysis"]["chosen_lr"]["snopt"]
        row = {}
        for adjoint in (True, False):
            for t1 in (1.0, 4.0):
                spec = dict(
                    task=task,
                    optimizer="snopt",
                    lr=lr,
                    t1=t1,
                    adjoint=adjoint,
                    steps=steps,
                    device=args.device,
                    threads=args.threads,
                )
                res = measure_memory(spec)
                memory["raw"].append(res)
                row[f"{'adjoint' if adjoint else 'direct'}_{int(t1)}"] = res.get("peak_mb", math.nan)
        row["adjoint_ratio"] = row["adjoint_4"] / row["adjoint_1"]
        row["direct_ratio"] = row["direct_4"] / row["direct_1"]
        memory["horizon"][task] = row
    report["memory"] = memory
    report["goals"] = summarise_goals(report)
    report["elapsed_s"] = time.perf_counter() - start
    report["environment"] = {
        "device": args.device if args.device != "cpu" else f"CPU ({os.cpu_count()} cores visible)",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_start": load_start,
        "load_end": _load(),
    }
    name = "optimizers_quick" if args.quick else "optimizers"
    (out_dir / f"{name}.json").write_text(json.dumps(_clean(report), separators=(",", ":")) + "\n")
    write_markdown(report, out_dir / f"{name}.md")
    print("\n".join(report["goals"]))
    print(f"wrote {out_dir / (name + '.json')} and {out_dir / (name + '.md')}")
    return 0


def _higher(task: str) -> bool:
    from snopt import get_task

    return get_task(task, **TASKS[task]["task_kwargs"]).higher_is_better


def _clean(value: Any) -> Any:
    """JSON-safe copy: floats rounded to 6 significant digits, non-finite ones as "inf", "-inf", "nan"."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    if torch.is_tensor(value):
        return _clean(value.tolist())
    return value


if __name__ == "__main__":
    sys.exit(main())
