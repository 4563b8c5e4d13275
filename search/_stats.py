"""Statistics of a comparison: bootstrap intervals, paired differences and 2-d hypervolumes.

A comparison has few seeds (3 by default in the benchmark), so intervals are percentile
bootstrap intervals over seeds, computed exactly (every one of the n^n resamples, equally
weighted) when there are at most ``n_resamples`` of them, else from ``n_resamples`` seeded
draws.  With one seed there is no interval: reports print "n = 1", never "± 0".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Resamples of a bootstrap interval (and the bound on exact enumeration).
N_RESAMPLES = 20_000


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], Any] = np.mean,
    *,
    level: float = 0.95,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic(values)``; None for fewer than 2 values.

    Args:
        values: one value per seed.
        statistic: a function of a 1-d array, applied along ``axis=-1`` of a 2-d array of
            resamples when it takes an ``axis`` argument (``np.mean``, ``np.median``).
        level: coverage of the interval, in (0, 1).
        n_resamples: resamples drawn when exact enumeration (n^n resamples) is larger.
        seed: seeds the draws.

    Returns:
        ``(low, high)``, the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles.
    """
    if not 0 < level < 1:
        raise ValueError(f"`level` must lie in (0, 1), but got level={level!r}.")
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    n = x.size
    if n < 2:
        return None
    if n**n <= n_resamples:
        idx = np.array(list(itertools.product(range(n), repeat=n)), dtype=np.int64)
    else:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    samples = x[idx]
    try:
        stats = np.asarray(statistic(samples, axis=-1), dtype=np.float64)  # type: ignore[call-arg]
    except TypeError:
        stats = np.array([float(statistic(row)) for row in samples])
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def paired_differences(
    a: dict[int, float], b: dict[int, float], *, maximize: bool, level: float = 0.95
) -> dict[str, Any]:
    """Per-seed differences ``a - b`` (sign: positive means ``a`` is better) over the seeds both have.

    Returns:
        ``{"n", "seeds", "diffs", "mean", "median", "ci"}``; ``ci`` is the bootstrap
        interval of the mean difference (None with one seed).
    """
    seeds = sorted(set(a) & set(b))
    sign = 1.0 if maximize else -1.0
    diffs = [sign * (float(a[s]) - float(b[s])) for s in seeds]
    return {
        "n": len(diffs),
        "seeds": seeds,
        "diffs": diffs,
        "mean": float(np.mean(diffs)) if diffs else None,
        "median": float(np.median(diffs)) if diffs else None,
        "ci": bootstrap_ci(diffs, np.mean, level=level),
    }


def pareto_front(points: Sequence[tuple[float, float]], *, maximize_first: bool) -> list[tuple[float, float]]:
    """The non-dominated points of (metric, cost): metric maximised (or minimised), cost minimised."""
    sign = -1.0 if maximize_first else 1.0
    front: list[tuple[float, float]] = []
    best_cost = math.inf
    for m, c in sorted(points, key=lambda p: (sign * p[0], p[1])):
        if c < best_cost:
            front.append((m, c))
            best_cost = c
    return front


def hypervolume_2d(
    points: Sequence[tuple[float, float]], ref: tuple[float, float], *, maximize_first: bool
) -> float:
    """Area dominated by ``points`` (metric, cost) and bounded by the reference point ``ref``.

    The reference is the worst corner: a metric below (above, when minimised) every point
    and a cost above every point; points beyond it add nothing.
    """
    sign = 1.0 if maximize_first else -1.0
    # In (gain, saving) coordinates both are maximised and the reference is the origin.
    pts = [(sign * (m - ref[0]), ref[1] - c) for m, c in points]
    pts = [p for p in pts if p[0] > 0 and p[1] > 0]
    area, covered = 0.0, 0.0
    for gain, saving in sorted(pts, key=lambda p: -p[1]):  # largest saving first
        if gain > covered:
            area += (gain - covered) * saving
            covered = gain
    return area


def describe(median: float | None, ci: tuple[float, float] | None, n: int, fmt: str = "{:.4g}") -> str:
    """``"0.95 [0.93, 0.96] (n = 3)"``, or ``"0.95 (n = 1)"`` with one seed; never ``± 0``."""
    if median is None:
        return "–"
    text = fmt.format(median)
    if ci is not None:
        text += f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"
    return f"{text} (n = {n})"
