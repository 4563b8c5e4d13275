"""What was tried to make SNOpt's defaults reach Adam's targets sooner (not a test, not the library).

`optimizers.py` measures SNOpt at its defaults against Adam.  This script measures the
variants that were tried to close the gap on digits without breaking the time series, on
the same protocol (its :func:`optimizers._config` runs, paired seeds, NFE to Adam's targets)
but with fewer seeds.  None of the variants is in the library: they are small prototypes
defined here, so that the figures in ``results/optimizer_variants.md`` can be reproduced.

Variants (SNOpt keyword arguments, plus one of the prototypes below):

- ``kl_clip`` 1e-2 instead of the default 1e-3 (Ba et al.'s value);
- ``damping`` 0.03 instead of 0.1;
- heavy-ball ``momentum`` 0.9;
- ``factored``: the pi-split Tikhonov damping of Martens & Grosse (2015, section 6.3),
  ``(A + sqrt(g) mean(a) I) ⊗ (B + sqrt(g) mean(b) I)`` with ``g`` = damping, instead of the
  library's ``A ⊗ B + g mean(a) mean(b) I`` (curvature ``"kfac-factored"``);
- ``ema``: a bias-corrected running average (beta 0.9) of the preconditioned, clipped step,
  like Adam's first moment, instead of no momentum;
- ``cap``: the step of every tracked layer limited to 10% of the layer's norm ``|[W | b]|``;
- ``stages``: the field curvature from the adjoint solve's own stage evaluations on refresh
  steps (SNOpt's ``sampling="stages"``, in the library) instead of an explicit evaluation
  per sample at its step starts.

Each part also records, per variant, the share of the run's time spent collecting curvature
and the curvature samples per refresh (medians over seeds, from ``SNOpt.stats``).

Usage::

    python benchmarks/optimizer_variants.py --task digits --seeds 0,1,2
    python benchmarks/optimizer_variants.py --task timeseries --seeds 0,1,2
    python benchmarks/optimizer_variants.py --report     # parts -> results/optimizer_variants.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import optimizers as ob  # noqa: E402  (the protocol of the main benchmark)

from snopt import SNOpt, build_run, run_training  # noqa: E402
from snopt import _optimizer as O  # noqa: E402
from snopt._training import TrainingError  # noqa: E402

RESULTS = ob.RESULTS
PARTS = RESULTS / "parts"


class FactoredCurvature(O.KroneckerCurvature):
    """Running-average factors, with the pi-split damping of each factor instead of the product's."""

    def refresh(self, state: dict[str, Any], a: Any, b: Any, locations: int, hyper: dict[str, Any]) -> bool:
        if not super().refresh(state, a, b, locations, hyper):
            return False
        va, vb, root = state["eigenvalues_a"], state["eigenvalues_b"], hyper["damping"] ** 0.5
        damped = torch.outer(vb + root * vb.mean(), va + root * va.mean()) * locations
        state["scale"] = torch.where(damped > 0, 1.0 / damped.clamp_min(1e-300), torch.ones_like(damped))
        return True


O.CURVATURES.setdefault("kfac-factored", FactoredCurvature())


class VariantSNOpt(SNOpt):
    """SNOpt with the prototypes ``ema`` (beta) and ``cap`` (relative step bound) of this script."""

    def __init__(self, model: Any, *, ema: float | None = None, cap: float | None = None, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.ema, self.cap, self._ema_steps = ema, cap, 0

    def _clip(self, hyper: dict[str, Any], group: dict[str, Any], inner: dict[Any, Any]) -> float:
        terms = [inner[p] for p in group["params"] if p in inner]
        nu = O.kl_clip_factor(torch.stack(terms).sum(), hyper["lr"], hyper["kl_clip"]) if terms else None
        return 1.0 if nu is None else float(nu)

    def _update_group(self, group, hyper, directions, inner, finite):  # type: ignore[no-untyped-def]
        lr, nu = hyper["lr"], self._clip(hyper, group, inner)
        if self.cap is not None:
            for layer in self._engine.collector.layers:
                params = [p for p in (layer.weight, layer.bias) if p is not None and p in directions]
                if not params:
                    continue
                size = math.sqrt(sum(float(directions[p].pow(2).sum()) for p in params))
                norm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in params))
                factor = min(1.0, self.cap * norm / max(lr * nu * size, 1e-30))
                for p in params:
                    directions[p] = directions[p] * factor
        if self.ema is None:
            return super()._update_group(group, hyper, directions, inner, finite)
        if group is self.param_groups[0]:
            self._ema_steps += 1
        correction = 1.0 - self.ema**self._ema_steps
        for p in group["params"]:
            if p.grad is None:
                continue
            d = directions.get(p)
            if d is None:
                self._adam(p, lr * hyper["diag_scale"], hyper["weight_decay"], finite)
                continue
            buf = self.state[p].setdefault("ema_buffer", torch.zeros_like(d))
            buf.mul_(self.ema).add_(d * nu, alpha=1.0 - self.ema)
            p.add_(buf / correction, alpha=-lr)


#: name -> SNOpt keyword arguments (lr 0.1 = the default), plus the prototypes' own.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "kl_clip 1e-2": {"kl_clip": 1e-2},
    "damping 0.03": {"damping": 0.03},
    "kl_clip 1e-2, damping 0.03": {"kl_clip": 1e-2, "damping": 0.03},
    "momentum 0.9": {"momentum": 0.9},
    "factored": {"curvature": "kfac-factored", "kl_clip": 1e-3},
    "factored, kl_clip 1e-2": {"curvature": "kfac-factored", "kl_clip": 1e-2},
    "factored, kl_clip 1e-2, damping 0.03": {"curvature": "kfac-factored", "kl_clip": 1e-2, "damping": 0.03},
    "ema 0.9": {"ema": 0.9},
    "ema 0.9, kl_clip 1e-2": {"ema": 0.9, "kl_clip": 1e-2},
    "cap 0.1, kl_clip 1e-2": {"cap": 0.1, "kl_clip": 1e-2},
    "stages": {"sampling": "stages"},
    "stages, kl_clip 1e-2": {"sampling": "stages", "kl_clip": 1e-2},
}


def train(task: str, seed: int, variant: str | None) -> dict[str, Any]:
    """One run (Adam at the benchmark's chosen lr 0.03 when ``variant`` is None) as a per-step curve."""
    cfg = ob._config(task, "adam" if variant is None else "snopt", 0.03 if variant is None else None, seed)
    run = build_run(cfg)
    if variant is not None:
        run.optimizer.collector.remove()  # type: ignore[attr-defined]
        run.optimizer = VariantSNOpt(run.model, lr=0.1, **VARIANTS[variant])
    start = time.perf_counter()
    try:
        result = run_training(cfg, callbacks=[ob._Guard()], progress=False, run=run)
        history, status = result.history, str(result.status)
    except TrainingError as exc:
        history, status = (exc.result.history if exc.result is not None else []), "diverged"
    steps, ema = [], None
    for h in history:
        ema = h["train_loss"] if ema is None else 0.9 * ema + 0.1 * h["train_loss"]
        row = {"wall": float(h["wall_time"]), "nfe": int(h["nfe_forward"] + h["nfe_backward"])}
        row["smooth"] = float(ema) if math.isfinite(ema) else math.inf
        row.update({k: float(h[k]) for k in ("val_loss", "metric") if k in h})
        steps.append(row)
    name = "adam" if variant is None else variant
    stats = dict(run.optimizer.stats) if variant is not None else {}  # type: ignore[attr-defined]
    return {
        "variant": name,
        "seed": seed,
        "status": status,
        "elapsed": time.perf_counter() - start,
        "steps": steps,
        "stats": stats,
    }


def collection(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over runs of the share of the run's time spent collecting curvature and of the
    curvature samples per refresh (``SNOpt.stats``)."""
    shares = [r["stats"]["collect_time"] / r["elapsed"] for r in runs]
    per_refresh = [r["stats"]["samples"] / max(r["stats"]["refreshes"], 1) for r in runs]
    return {
        "collect_share": statistics.median(shares),
        "samples_per_refresh": statistics.median(per_refresh),
        "refreshes": statistics.median(r["stats"]["refreshes"] for r in runs),
    }


def run_task(task: str, seeds: list[int], variants: list[str]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"adam": [], **{v: [] for v in variants}}
    for seed in seeds:
        for variant in [None, *variants]:
            run = train(task, seed, variant)
            runs[run["variant"]].append(run)
            stats = run["stats"]
            extra = (
                f" collect {stats['collect_time']:.2f}s, {stats['samples']} samples, {stats['refreshes']} refreshes"
                if stats
                else ""
            )
            print(
                f"[{task}] seed {seed} {run['variant']}: {run['status']} {run['elapsed']:.0f}s{extra}",
                flush=True,
            )
    higher = task == "digits"
    targets = {
        k: statistics.median(ob.value_at(r, k, 0.75) for r in runs["adam"])
        for k in ("smooth", "val_loss", "metric")
    }
    comparisons = {v: ob.compare(runs, v, targets, higher) for v in variants}
    diverged = {v: sum(r["status"] == "diverged" for r in runs[v]) for v in variants}
    return {
        "task": task,
        "seeds": seeds,
        "targets": targets,
        "comparisons": comparisons,
        "diverged": diverged,
        "collection": {v: collection(runs[v]) for v in variants},
    }


def report() -> None:
    lines = [
        "# SNOpt variants tried against Adam (exploration, `benchmarks/optimizer_variants.py`)",
        "",
        "NFE to Adam's targets (Adam at lr 0.03; targets: median of Adam's value at 75% of the run), "
        "per-seed ratio variant / Adam, median and the per-seed ratios; inf = never reached or diverged. "
        "Settings of `optimizers.py` (digits width 8, 4 epochs, batch 64; time series hidden 16, "
        "8 epochs); every variant at SNOpt's default lr 0.1. Few seeds: these figures choose what to "
        "benchmark, they are not the benchmark.",
        "",
    ]
    for path in sorted(PARTS.glob("variants_*.json")):
        part = json.loads(path.read_text())
        lines += [
            f"## {part['task']} (seeds {part['seeds']}; `parts/{path.name}`)",
            "",
            f"Targets: {json.dumps({k: round(v, 4) for k, v in part['targets'].items()})}",
            "",
            "| variant | smoothed train loss | val loss | metric | diverged |",
            "| --- | --- | --- | --- | --- |",
        ]
        for variant, comp in part["comparisons"].items():
            cells = [
                f"{ob._f(e['nfe_median'])} ({', '.join(ob._f(r, 2) for r in e['nfe_ratios'])})"
                for e in comp.values()
            ]
            lines.append(
                f"| {variant} | {' | '.join(cells)} | {part['diverged'][variant]} of {len(part['seeds'])} |"
            )
        lines.append("")
    (RESULTS / "optimizer_variants.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["digits", "timeseries"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=";".join(VARIANTS), help="names of VARIANTS, separated by ';'")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    PARTS.mkdir(parents=True, exist_ok=True)
    if args.task:
        variants = [v.strip() for v in args.variants.split(";")]
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
        part = run_task(args.task, [int(s) for s in args.seeds.split(",")], variants)
        (PARTS / f"variants_{args.task}.json").write_text(json.dumps(part, default=str))
    if args.report:
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
