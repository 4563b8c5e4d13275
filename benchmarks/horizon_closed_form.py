"""Horizon control on problems with a known optimum T* (not a test).

Part of the horizon benchmark (``benchmarks/horizon.py`` runs the built-in tasks).  Problems:

- ``velocity/noise=s``: one block ``dx/dt = 1`` (frozen) into ``tanh`` and a trained linear
  head, MSE against ``2 tanh(x0 + 1.5) - 0.5 + s * noise`` (s = 0.05, 1, 3), from T0 = 0.3
  and T0 = 4; T* from the profile (least squares for the head inside, a bounded 1-D search
  outside) with a quadratic cost 0.01.
- ``three-blocks``: three rotation blocks (rate 1/2, :data:`RATE`; RK4, backprop through the
  steps, which halves the run time on fields this small) in sequence on separate coordinate pairs
  and one trained input scale, targets made with horizons 0.2, 1 and 2 (noise 0.3); T* per block
  from full-batch L-BFGS on the closed form; from T0 = 0.3, 1 and 4 (every block starts there).

Policies, each on the same data and seeds (paired): the feedback policy with the library's
defaults (Gauss-Newton curvature), the same with ``curvature="fisher"``, the same without the
feedback term, and the gradient policy at every step of a small grid (its default,
:data:`snopt._defaults.POLICY_LR`, is one of them; the best one is reported too).  The gradient
policy's default step is chosen from this grid: the step that settles on the most problems and
starts (then in the fewest updates), shown in the step table of the report.  Reported: final
error to T* (worst block), updates until T stays within 5% of T* (worst block; ``inf`` when it
never settles), and the fraction of updates cut by the trust region, as medians over seeds with
their range.

On the velocity problem the head is trained with T, so T* is the optimum of the *joint*
problem, and the head adapts to the T it is trained at.  Two references show what limits the
settling count there: each update records the conditional optimum ``T*(w, b)`` of the current
head (a grid and a bounded 1-D search) and reports the median gap ``|T - T*(w, b)| / T*(w, b)``
(``tracking``: how well a policy solves its own one-step problem); and an ``oracle`` run sets T
to ``T*(w, b)`` at every update (no trust region), the best that any policy which moves T for
the current head can do.

Goals (issue 13): feedback with the defaults settles within 5% of T* in <= 10 updates on every
problem and start, with <= 10% of its updates cut by the trust region, and in fewer updates
than the gradient policy at its default step.  Checked in the goal table of the report, which
also compares feedback with the gradient policy at its best step of the grid for each problem
(a step tuned per problem, which no default can be).

Usage::

    python benchmarks/horizon_closed_form.py            # about 12 min on 2 shared cores

The Gauss-Newton overhead on digits is measured by ``benchmarks/horizon_overhead.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import nn

from snopt import Controller, ODEBlock
from snopt._defaults import POLICY_LR

NOISES = (0.05, 1.0, 3.0)
STARTS = (0.3, 4.0)
SEEDS = (0, 1)
THREE_STARTS = (0.3, 1.0, 4.0)
#: The gradient policy's steps (its default, POLICY_LR["gradient"], is added if missing).
GRADIENT_GRID = tuple(sorted({0.3, 1.0, 3.0, 10.0, POLICY_LR["gradient"]}))
VELOCITY_STEPS, THREE_STEPS = 1000, 300
SETTLE = 0.05
MAX_SETTLE_UPDATES, MAX_CUT_FRACTION = 10, 0.10  # the goals
DEFAULT = "feedback (gauss_newton)"
ORACLE = "oracle (T = T*(w, b))"
POLICIES: dict[str, dict[str, Any]] = {
    "feedback (gauss_newton)": dict(policy="feedback"),
    "feedback (fisher)": dict(policy="feedback", curvature="fisher"),
    "feedback (gauss_newton, no feedback term)": dict(policy="feedback", feedback=False),
    **{f"gradient (lr={lr})": dict(policy="gradient", lr=lr) for lr in GRADIENT_GRID},
    ORACLE: dict(policy="fixed"),  # T set to the current head's optimum at every update
}


class Velocity(nn.Module):
    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)


def velocity_problem(noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(256, 1, generator=g) * 2.0 - 2.0
    y = 2.0 * torch.tanh(x0 + 1.5) - 0.5 + noise * torch.randn(256, 1, generator=g)

    def profile(t: float) -> float:
        features = torch.cat([torch.tanh(x0 + t), torch.ones_like(x0)], 1)
        coef = torch.linalg.lstsq(features, y).solution
        return float(((features @ coef - y) ** 2).mean()) + 0.005 * t * t

    best = min((0.05 * k for k in range(1, 200)), key=profile)
    t_star = minimize_scalar(profile, bounds=(best - 0.05, best + 0.05), method="bounded").x
    return x0, y, [float(t_star)]


def conditional_optimum(x0: torch.Tensor, y: torch.Tensor, head: nn.Linear) -> float:
    """argmin_T of the velocity loss plus cost for the head's current weight and bias."""
    w, b = float(head.weight.detach()), float(head.bias.detach())
    x, target = x0.detach().double().numpy()[:, 0], y.detach().double().numpy()[:, 0]

    def objective(t: float) -> float:
        return float(((w * np.tanh(x + t) + b - target) ** 2).mean()) + 0.005 * t * t

    best = min((0.05 * k for k in range(1, 200)), key=objective)
    return float(minimize_scalar(objective, bounds=(best - 0.05, best + 0.05), method="bounded").x)


#: Angular rate of the three-block problem's fields.  At rate 1 a rotation by T + pi with a negated
#: input scale is the same map as one by T, and from T0 = 4 every policy settled on that mirror,
#: T* + pi for every block (3.35, 4.15, 5.14), whose cost is higher; at rate 1/2 the mirror is at
#: T* + 2 pi and every start in [0.3, 4] lies in the basin of T*.
RATE = 0.5


class PairRotation(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        generator = torch.zeros(6, 6)
        generator[2 * k, 2 * k + 1], generator[2 * k + 1, 2 * k] = -RATE, RATE
        self.register_buffer("generator", generator)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x @ self.generator.T


class ThreeBlocks(nn.Module):
    def __init__(self, start: float) -> None:
        super().__init__()
        solver: dict[str, Any] = dict(method="rk4", options={"step_size": 0.2}, adjoint=False)
        self.blocks = nn.ModuleList(ODEBlock(PairRotation(k), 0.0, start, **solver) for k in range(3))
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale
        for block in self.blocks:
            x = block(x)
        return x


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    out = []
    for k in range(3):
        c, s = torch.cos(angles[k]), torch.sin(angles[k])
        u, v = x[:, 2 * k], x[:, 2 * k + 1]
        out += [c * u - s * v, s * u + c * v]
    return torch.stack(out, 1)


def three_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(128, 6, generator=g)
    y = 1.3 * _rotate(x0, RATE * torch.tensor([0.2, 1.0, 2.0])) + 0.3 * torch.randn(128, 6, generator=g)
    z = torch.tensor([0.2, 1.0, 2.0, 1.0], requires_grad=True)
    opt = torch.optim.LBFGS([z], max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15)

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(_rotate(x0 * z[3], RATE * z[:3]), y) + 0.5e-3 * (z[:3] ** 2).sum()
        loss.backward()
        return loss

    opt.step(objective)  # type: ignore[arg-type]
    return x0, y, [float(t) for t in z.detach()[:3]]


def run(  # noqa: C901 - one training loop with its measurements, read top to bottom
    problem: str, noise: float, start: float, seed: int, settings: dict[str, Any], oracle: bool = False
) -> dict[str, Any]:
    torch.manual_seed(seed)
    head: nn.Linear | None = None
    if problem == "velocity":
        x0, y, t_star = velocity_problem(noise, seed)
        block = ODEBlock(Velocity(), 0.0, start, method="dopri5", rtol=1e-7, atol=1e-7)
        head = nn.Linear(1, 1)
        model: nn.Module = nn.Sequential(block, nn.Tanh(), head)
        blocks, penalty, steps = [block], 0.01, VELOCITY_STEPS
    else:
        x0, y, t_star = three_problem(seed)
        model = ThreeBlocks(start)
        blocks, penalty, steps = list(model.blocks), 1e-3, THREE_STEPS
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ctl = Controller(model, penalty=penalty, optimizer=opt, **settings)
    every = ctl.every
    paths: list[list[float]] = [[] for _ in blocks]
    heads: list[float] = []  # the velocity head's conditional optimum at each update
    begin = time.perf_counter()
    wall = 0.0
    for step in range(1, steps + 1):
        opt.zero_grad()
        F.mse_loss(model(x0), y).backward()
        opt.step()
        ctl.step(lambda: F.mse_loss(model(x0), y))
        if step > ctl.warmup and (step - ctl.warmup) % every == 0:
            for path, b in zip(paths, blocks):
                path.append(b.t1)
            if head is not None:
                wall += time.perf_counter() - begin
                heads.append(conditional_optimum(x0, y, head))
                begin = time.perf_counter()
                if oracle:
                    blocks[0].set_t1(heads[-1])
                    paths[0][-1] = heads[-1]
    wall += time.perf_counter() - begin
    errors = [[abs(t - s) / s for t in path] for path, s in zip(paths, t_star)]
    settle = max(_settled(e) for e in errors)
    tracking = [abs(t - h) / h for t, h in zip(paths[0], heads)]
    stats = ctl.stats
    names = ctl.names
    cuts = sum(stats[f"{n}/limited"] for n in names) / max(sum(stats[f"{n}/updates"] for n in names), 1)
    return {
        "final_error": max(e[-1] for e in errors),
        "settle_updates": settle,
        "tracking": statistics.median(tracking) if tracking else math.nan,
        "trust_region_fraction": cuts,
        "updates": len(paths[0]),
        "wall_s": wall,
        "t_star": t_star,
        "final": [p[-1] for p in paths],
    }


def _settled(errors: list[float]) -> float:
    for i in range(len(errors)):
        if all(e <= SETTLE for e in errors[i:]):
            return float(i + 1)
    return math.inf


def _cases() -> list[tuple[str, float, float]]:
    cases = [("velocity", noise, start) for noise in NOISES for start in STARTS]
    return cases + [("three-blocks", 0.3, start) for start in THREE_STARTS]


def closed_form(out: Path) -> dict[str, Any]:
    begin = time.perf_counter()
    load = os.getloadavg()
    rows = []
    for problem, noise, start in _cases():
        for policy, settings in POLICIES.items():
            if policy == ORACLE and problem != "velocity":
                continue
            runs = [run(problem, noise, start, seed, settings, oracle=policy == ORACLE) for seed in SEEDS]
            rows.append(
                {
                    "problem": problem if problem == "three-blocks" else f"velocity/noise={noise}",
                    "start": start,
                    "policy": policy,
                    "final_error": statistics.median(r["final_error"] for r in runs),
                    "settle_updates": statistics.median(r["settle_updates"] for r in runs),
                    "settle_range": [
                        min(r["settle_updates"] for r in runs),
                        max(r["settle_updates"] for r in runs),
                    ],
                    "tracking": statistics.median(r["tracking"] for r in runs),
                    "trust_region_fraction": statistics.median(r["trust_region_fraction"] for r in runs),
                    "updates": runs[0]["updates"],
                    "wall_s": sum(r["wall_s"] for r in runs),
                    "t_star": [r["t_star"] for r in runs],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "rows": rows,
        "seeds": list(SEEDS),
        "gradient_default": POLICY_LR["gradient"],
        "load_average": list(load),
        "run_time_s": time.perf_counter() - begin,
    }
    _write(out, "horizon_closed_form", report, _markdown(report))
    return report


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Horizon control on closed-form problems",
        "",
        f"Medians over seeds {report['seeds']} (range of the settling count in brackets); "
        f"run time {report['run_time_s']:.0f} s on 2 shared CPU cores, one torch thread (load average at "
        f"the start {_load(report)}).  Settling: updates "
        "until T stays within 5% of T* (worst block; inf: never within the run).  Tracking (velocity problems): "
        "the median over updates of |T - T*(w, b)| / T*(w, b), T*(w, b) the optimum for the current head; "
        "oracle: T set to T*(w, b) at every update, the best a policy that moves T for the current head can do.",
        "",
        *_goal_table(report["rows"], report["gradient_default"]),
        "",
        *_step_table(report["rows"], report["gradient_default"]),
        "",
        "## Every policy",
        "",
        "| problem | T0 | policy | final error | updates to settle | tracking | trust-region cuts | updates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        low, high = r["settle_range"]
        lines.append(
            f"| {r['problem']} | {r['start']} | {r['policy']} | {r['final_error']:.2%} | "
            f"{r['settle_updates']:g} [{low:g}, {high:g}] | {_percent(r['tracking'], 2)} | "
            f"{r['trust_region_fraction']:.0%} | {r['updates']} |"
        )
    return "\n".join(lines) + "\n"


def _load(report: dict[str, Any]) -> str:
    return (
        " ".join(f"{x:.1f}" for x in report["load_average"]) if "load_average" in report else "not recorded"
    )


def _percent(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}%}"


def _goal_table(rows: list[dict[str, Any]], default_lr: float) -> list[str]:
    """Per problem and start: the default feedback policy against the goals and the gradient policy."""
    default = f"gradient (lr={default_lr})"
    lines = [
        "## Goals: feedback (gauss_newton, defaults)",
        "",
        f"Goal: settles in <= {MAX_SETTLE_UPDATES} updates, <= {MAX_CUT_FRACTION:.0%} of its updates cut, "
        f"fewer updates than the gradient policy at its default step (lr={default_lr}).  Also shown: the "
        "gradient policy at its best step of the grid for that problem and start (the one that settles "
        "first, then has the smallest final error), a step tuned per problem that no default can be.",
        "",
        "| problem | T0 | feedback: settles, cuts, tracking | oracle: settles | gradient default: settles | "
        "gradient best (lr): settles | fisher: settles | goals | against the best gradient step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((r["problem"], r["start"]) for r in rows):
        by = {r["policy"]: r for r in rows if (r["problem"], r["start"]) == key}
        fb, grad_default = by[DEFAULT], by[default]
        gradients = [r for name, r in by.items() if name.startswith("gradient")]
        oracle = f"{by[ORACLE]['settle_updates']:g}" if ORACLE in by else "-"
        best = min(gradients, key=lambda r: (r["settle_updates"], r["final_error"]))
        met = {
            "settle": fb["settle_updates"] <= MAX_SETTLE_UPDATES,
            "cuts": fb["trust_region_fraction"] <= MAX_CUT_FRACTION,
            "beats default gradient": fb["settle_updates"] < grad_default["settle_updates"],
        }
        verdict = ", ".join(f"{name} {'met' if ok else 'missed'}" for name, ok in met.items())
        lines.append(
            f"| {key[0]} | {key[1]} | {fb['settle_updates']:g}, {fb['trust_region_fraction']:.0%}, "
            f"{_percent(fb['tracking'], 1)} | {oracle} | {grad_default['settle_updates']:g} | "
            f"{best['settle_updates']:g} ({_lr_of(best['policy'])}) | "
            f"{by['feedback (fisher)']['settle_updates']:g} | {verdict} | "
            f"{_against(fb['settle_updates'], best['settle_updates'])} |"
        )
    return lines


def _against(feedback: float, gradient: float) -> str:
    """Which settles in fewer updates (the numbers are in the columns before)."""
    if feedback < gradient:
        return "feedback faster"
    if feedback > gradient:
        return "gradient faster"
    return "neither settles" if math.isinf(feedback) else "tie"


def _lr_of(policy: str) -> str:
    return policy.removeprefix("gradient (").removesuffix(")")


def _step_table(rows: list[dict[str, Any]], default_lr: float) -> list[str]:
    """Per gradient step: on how many problems and starts it settles (how the default was chosen)."""
    cases = list(dict.fromkeys((r["problem"], r["start"]) for r in rows))
    lines = [
        "## The gradient policy's step",
        "",
        f"Settled: problems and starts (of {len(cases)}) where the median over seeds settles within 5% "
        "of T*.  The default step is the one that settles on the most, then in the fewest updates "
        f"(median over the problems where it settles); the library's default is lr={default_lr}.",
        "",
        "| step | settled | median updates where settled | median trust-region cuts |",
        "|---|---|---|---|",
    ]
    for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"].startswith("gradient")):
        mine = [r for r in rows if r["policy"] == policy]
        settled = [r["settle_updates"] for r in mine if math.isfinite(r["settle_updates"])]
        updates = f"{statistics.median(settled):g}" if settled else "-"
        cuts = statistics.median(r["trust_region_fraction"] for r in mine)
        mark = " (default)" if policy == f"gradient (lr={default_lr})" else ""
        lines.append(f"| {_lr_of(policy)}{mark} | {len(settled)} of {len(mine)} | {updates} | {cuts:.0%} |")
    return lines


def _write(out: Path, name: str, report: dict[str, Any], text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{name}.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--report-from", type=Path, help="rebuild the Markdown from a JSON report instead of running"
    )
    args = parser.parse_args(argv)
    if args.report_from is not None:
        report = json.loads(args.report_from.read_text())
        _write(args.out, "horizon_closed_form", report, _markdown(report))
        return 0
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    closed_form(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
