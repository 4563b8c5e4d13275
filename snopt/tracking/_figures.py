"""Figures of a training history: loss, metric, horizons and NFE."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# ---------------------------------------------------------------------- figures
# History keys that are neither a horizon nor a control variable (those go on the horizons figure).
_NOT_CONTROL = frozenset(
    {
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
)

_History = Sequence[Mapping[str, float]]


def _history_figures(history: _History, metric_name: str = "metric") -> dict[str, Any]:
    """Loss, metric, horizon and NFE curves of a history, as matplotlib figures (Agg)."""
    if not history:
        return {}
    figures = {"loss.png": _loss_figure(history)}
    if _series(history, "metric")[0]:
        figures["metric.png"] = _metric_figure(history, metric_name)
    last = history[-1]
    control = [k for k in last if k.startswith("t1")]
    control += [
        k for k in last if k not in _NOT_CONTROL and k not in control and isinstance(last[k], (int, float))
    ]
    if control:
        figures["horizons.png"] = _horizons_figure(history, control)
    figures["nfe.png"] = _nfe_figure(history)
    return figures


def _series(history: _History, key: str) -> tuple[list[float], list[float]]:
    """Steps and values of the records that carry a number under ``key``."""
    pts = [(r["step"], r[key]) for r in history if key in r and isinstance(r[key], (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _axes(title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig, ax


def _loss_figure(history: _History) -> Any:
    fig, ax = _axes("loss", "loss")
    ax.plot(
        [r["step"] for r in history],
        [r.get("train_loss", math.nan) for r in history],
        label="train_loss",
        lw=1,
    )
    xs, ys = _series(history, "val_loss")
    if xs:
        ax.plot(xs, ys, "o-", label="val_loss")
    ax.legend()
    fig.tight_layout()
    return fig


def _metric_figure(history: _History, metric_name: str) -> Any:
    fig, ax = _axes(f"validation {metric_name}", metric_name)
    ax.plot(*_series(history, "metric"), "o-")
    fig.tight_layout()
    return fig


def _horizons_figure(history: _History, keys: Sequence[str]) -> Any:
    fig, ax = _axes("horizons T and control variables", "value")
    for key in keys:
        ax.plot(*_series(history, key), label=key)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _nfe_figure(history: _History) -> Any:
    fig, ax = _axes("NFE", "function evaluations per step")
    for key in ("nfe_forward", "nfe_backward"):
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, label=key)
    if ax.lines:  # a history without NFE records (a custom loop) has nothing to label
        ax.legend()
    fig.tight_layout()
    return fig
