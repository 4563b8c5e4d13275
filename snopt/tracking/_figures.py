"""Figures of a training history: loss, metric, horizons and NFE."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


# ---------------------------------------------------------------------- figures
def _history_figures(history: Sequence[Mapping[str, float]], metric_name: str = "metric") -> dict[str, Any]:
    """Loss, metric, horizon and NFE curves of a history, as matplotlib figures (Agg)."""
    from matplotlib.figure import Figure

    figures: dict[str, Any] = {}
    if not history:
        return figures
    steps = [r["step"] for r in history]

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(r["step"], r[key]) for r in history if key in r and isinstance(r[key], (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, [r.get("train_loss", math.nan) for r in history], label="train_loss", lw=1)
    xs, ys = series("val_loss")
    if xs:
        ax.plot(xs, ys, "o-", label="val_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend()
    fig.tight_layout()
    figures["loss.png"] = fig

    xs, ys = series("metric")
    if xs:
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.add_subplot()
        ax.plot(xs, ys, "o-")
        ax.set_xlabel("step")
        ax.set_ylabel(metric_name)
        ax.set_title(f"validation {metric_name}")
        fig.tight_layout()
        figures["metric.png"] = fig

    control = [k for k in history[-1] if k.startswith("t1")]
    known = {
        "step",
        "epoch",
        "wall_time",
        "train_loss",
        "lr",
        "nfe_forward",
        "nfe_backward",
        "nfe_total",
        "steps_forward",
        "steps_backward",
        "val_loss",
        "metric",
    }
    extra = [
        k
        for k in history[-1]
        if k not in known and k not in control and isinstance(history[-1][k], (int, float))
    ]
    if control or extra:
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.add_subplot()
        for key in control + extra:
            xs, ys = series(key)
            ax.plot(xs, ys, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("value")
        ax.set_title("horizons T and control variables")
        ax.legend(fontsize="small")
        fig.tight_layout()
        figures["horizons.png"] = fig

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for key in ("nfe_forward", "nfe_backward"):
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("function evaluations per step")
    ax.set_title("NFE")
    ax.legend()
    fig.tight_layout()
    figures["nfe.png"] = fig
    return figures
