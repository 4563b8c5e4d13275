"""Statistics of comparisons against brute-force computations."""

import itertools
import random

import numpy as np
import pytest
from snopt.search._stats import bootstrap_ci, describe, hypervolume_2d, paired_differences, pareto_front


def _brute_bootstrap(values, stat, level=0.95):
    """Every resample of the n values with replacement, equally weighted; percentile interval."""
    stats = [stat(list(r)) for r in itertools.product(values, repeat=len(values))]
    a = (1 - level) / 2
    return float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))


@pytest.mark.parametrize("values", [[0.91, 0.95, 0.93], [1.0, -2.0, 0.5, 3.0], [0.1, 0.1]])
def test_exact_bootstrap_matches_brute_force(values):
    expected = _brute_bootstrap(values, lambda r: sum(r) / len(r))
    assert bootstrap_ci(values, np.mean) == pytest.approx(expected, abs=1e-12)
    expected_median = _brute_bootstrap(values, lambda r: float(np.median(r)))
    assert bootstrap_ci(values, np.median) == pytest.approx(expected_median, abs=1e-12)


def test_drawn_bootstrap_is_close_to_brute_force():
    rs = random.Random(0)
    values = [rs.gauss(0, 1) for _ in range(7)]
    # 6^6 = 46,656 resamples > 20,000: bootstrap_ci draws; the brute force enumerates them all
    low, high = _brute_bootstrap(values[:6], lambda r: sum(r) / len(r))
    got = bootstrap_ci(values[:6], np.mean, n_resamples=20_000)
    assert got == pytest.approx((low, high), abs=0.03)
    assert bootstrap_ci(values, np.mean)[0] < np.mean(values) < bootstrap_ci(values, np.mean)[1]


def test_one_value_has_no_interval_and_prints_n_1():
    assert bootstrap_ci([0.9], np.mean) is None
    assert describe(0.9, None, 1) == "0.9 (n = 1)"
    assert "±" not in describe(0.9, None, 1)
    assert describe(0.9, (0.8, 0.95), 3) == "0.9 [0.8, 0.95] (n = 3)"


def test_paired_differences_sign_and_seeds():
    a = {0: 0.9, 1: 0.8, 2: 0.85}
    b = {0: 0.85, 1: 0.82, 3: 0.99}
    out = paired_differences(a, b, maximize=True)
    assert out["seeds"] == [0, 1] and out["diffs"] == pytest.approx([0.05, -0.02])
    assert out["mean"] == pytest.approx(0.015)
    assert out["ci"] == pytest.approx(_brute_bootstrap([0.05, -0.02], lambda r: sum(r) / len(r)))
    low = paired_differences({0: 1.0}, {0: 2.0}, maximize=False)
    assert low["diffs"] == [1.0] and low["ci"] is None  # lower is better: a is better by 1


def test_hypervolume_against_a_grid_count():
    rs = np.random.default_rng(0)
    pts = [(float(m), float(c)) for m, c in zip(rs.uniform(0.2, 1.0, 12), rs.uniform(1, 10, 12))]
    ref = (0.0, 12.0)
    hv = hypervolume_2d(pts, ref, maximize_first=True)
    # brute force: the fraction of a fine grid over [0, 1] x [0, 12] dominated by some point
    ms = (np.arange(1000) + 0.5) / 1000
    cs = (np.arange(1200) + 0.5) / 100
    mm, cc = np.meshgrid(ms, cs)
    dominated = np.zeros_like(mm, dtype=bool)
    for m, c in pts:
        dominated |= (mm <= m) & (cc >= c)
    assert hv == pytest.approx(dominated.mean() * 1.0 * 12.0, rel=2e-3)
    front = pareto_front(pts, maximize_first=True)
    assert hypervolume_2d(front, ref, maximize_first=True) == pytest.approx(hv)
    for m, c in pts:  # nothing on the front is dominated, everything else is
        dom = any(m2 >= m and c2 <= c and (m2, c2) != (m, c) for m2, c2 in pts)
        assert ((m, c) in front) == (not dom)
    # a minimised metric mirrors it
    mirrored = [(-m, c) for m, c in pts]
    assert hypervolume_2d(mirrored, (0.0, 12.0), maximize_first=False) == pytest.approx(hv)
