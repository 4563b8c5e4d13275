"""``compare`` and its report: every number recomputed independently from the Optuna storage."""

import json
import statistics
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from snopt.search import Budget, ComparisonReport, Float, SearchSpace, compare, report_from_storage

SPACE = SearchSpace({"t1": Float(0.5, 2.0, log=True, default=1.0), "lr": Float(1e-3, 1e-1, log=True)})


def _independent(storage, name, strategies, seeds, epsilon):
    """Recompute the report's figures from the raw trials, with no code from snopt.search."""
    per = {}
    for strategy in strategies:
        for seed in seeds:
            trials = optuna.load_study(study_name=f"{name}-{strategy}-s{seed}", storage=storage).trials
            done = [
                t
                for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                or (t.state == TrialState.FAIL and "snopt_status" in t.user_attrs)
            ]
            done.sort(key=lambda t: (t.datetime_complete, t.number))
            secs = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
            nfes = [t.user_attrs["nfe_total"] for t in done]
            works = [t.user_attrs["work"] for t in done]
            values = [t.value for t in done if t.state == TrialState.COMPLETE]
            cum_t = [sum(secs[: i + 1]) for i in range(len(done))]
            cum_n = [sum(nfes[: i + 1]) for i in range(len(done))]
            best_so_far, b = [], None
            for t in done:
                if t.state == TrialState.COMPLETE and (b is None or t.value > b):
                    b = t.value
                best_so_far.append(b)
            per[strategy, seed] = {
                "n": len(done),
                "pruned": sum(t.state == TrialState.PRUNED for t in done),
                "wall": sum(secs),
                "nfe": sum(nfes),
                "work": sum(works),
                "best": max(values) if values else None,
                "best_so_far": best_so_far,
                "cum_t": cum_t,
                "cum_n": cum_n,
            }
    # the target of a seed: the best black-box value with that seed (both strategies here are)
    targets = {
        seed: max(per[s, seed]["best"] for s in strategies if per[s, seed]["best"] is not None)
        for seed in seeds
    }
    for (_, seed), p in per.items():
        hit = [i for i, b in enumerate(p["best_so_far"]) if b is not None and b >= targets[seed] - epsilon]
        p["nfe_to_target"] = p["cum_n"][hit[0]] if hit else None
        p["time_to_target"] = p["cum_t"][hit[0]] if hit else None
    return targets, per


#: Two RK4 steps a trial (18 NFE) and 30 NFE a study: a complete trial, then one the budget cuts.
STEPS, NFE = 2, 30


def test_report_numbers_match_the_storage(tiny_config, tmp_path):
    url = f"sqlite:///{tmp_path / 'cmp.db'}"
    storage = optuna.storages.RDBStorage(url)  # one connection for the independent reads
    strategies, seeds, eps = ["random", "tpe"], [0, 1], 0.02
    out = tmp_path / "report"
    hooks = []
    report = compare(
        tiny_config(max_steps=STEPS),
        strategies=strategies,
        budget=Budget(nfe=NFE),
        seeds=seeds,
        space=SPACE,
        storage=url,
        output_dir=out,
        epsilon=eps,
        progress=False,
        pruner="median",
        on_study_start=lambda s: hooks.append(("start", s.study_name)),
        on_study_end=lambda s: hooks.append(("end", s.study_name)),
        on_report=lambda r: hooks.append(("report", r.name)),
    )
    assert hooks[0] == ("start", "digits-random-s0") and hooks[-1] == ("report", "digits")
    assert len(hooks) == 2 * 4 + 1
    targets, per = _independent(storage, "digits", strategies, seeds, eps)
    assert report.targets == targets and report.target == statistics.median(targets.values())
    for s in report.studies:
        p = per[s.strategy, s.seed]
        assert s.study_name == f"digits-{s.strategy}-s{s.seed}"
        assert (s.n_trials, s.n_pruned, s.nfe) == (p["n"], p["pruned"], p["nfe"])
        assert s.work == pytest.approx(p["work"]) and s.work > 0
        assert (s.n_now, s.n_before) == (p["n"], 0)
        assert s.wall_time == pytest.approx(p["wall"])
        assert s.best_value == p["best"]
        assert s.nfe_to_target == p["nfe_to_target"]
        assert (
            s.time_to_target == pytest.approx(p["time_to_target"])
            if p["time_to_target"]
            else s.time_to_target is None
        )
        assert [c["best"] for c in s.curve] == p["best_so_far"]
        # Equal budget: no study spent more than its NFE budget plus the last step of one trial.
        assert NFE <= s.nfe < NFE + 2 * 8
    rows = {r["strategy"]: r for r in report.summary()}
    for strategy in strategies:
        bests = [per[strategy, seed]["best"] for seed in seeds]
        assert rows[strategy]["best"] == pytest.approx(statistics.median(bests))  # medians, not maxima
        # the 4 bootstrap resamples of two seeds have medians a, (a+b)/2 twice, b
        a, b = sorted(bests)
        resampled = tuple(np.quantile([a, (a + b) / 2, (a + b) / 2, b], [0.025, 0.975]))
        assert rows[strategy]["n"] == 2 and rows[strategy]["best_ci"] == pytest.approx(resampled)
        assert rows[strategy]["trials"] == sum(per[strategy, seed]["n"] for seed in seeds)
        for axis in ("nfe", "work"):
            assert rows[strategy][axis] == pytest.approx(
                statistics.median(per[strategy, seed][axis] for seed in seeds)
            )
        reached = [
            per[strategy, seed]["nfe_to_target"] for seed in seeds if per[strategy, seed]["nfe_to_target"]
        ]
        assert rows[strategy]["reached"] == f"{len(reached)}/2"
        assert rows[strategy]["nfe_to_target"] == (statistics.median(reached) if reached else None)
    # paired differences against each black-box strategy, per seed
    pair = next(p for p in report.paired() if (p["strategy"], p["baseline"]) == ("tpe", "random"))
    assert pair["val"]["diffs"] == pytest.approx(
        [per["tpe", seed]["best"] - per["random", seed]["best"] for seed in seeds]
    )
    # Files: Markdown, JSON (the same numbers), four figures.
    files = {k: Path(v) for k, v in report.files.items()}
    assert set(files) == {
        "markdown",
        "json",
        "best_vs_work",
        "best_vs_wallclock",
        "best_vs_nfe",
        "t1_trajectories",
        "final_t1_vs_metric",
    }
    assert all(f.exists() and f.stat().st_size > 0 for f in files.values())
    assert all(f.read_bytes()[:4] == b"\x89PNG" for k, f in files.items() if k not in ("markdown", "json"))
    data = json.loads(files["json"].read_text())
    assert data["target"] == report.target and data["budget"] == {
        "n_trials": None,
        "timeout": None,
        "nfe": NFE,
        "work": None,
    }
    assert [s["nfe"] for s in data["studies"]] == [s.nfe for s in report.studies]
    md = files["markdown"].read_text()
    assert (
        "| random |" in md
        and "TPESampler(n_startup_trials=4" in md
        and "![best_vs_nfe](best_vs_nfe.png)" in md
    )
    # The report can be rebuilt from the storage alone.
    again = report_from_storage("digits", strategies, seeds, url, epsilon=eps)
    assert again.summary() == report.summary()
    # Running the comparison again continues every study and runs its budget again (Optuna's
    # convention); the report says what ran now and what was there before.
    n_before = sum(
        len(optuna.load_study(study_name=s.study_name, storage=storage).trials) for s in report.studies
    )
    second = compare(
        tiny_config(max_steps=STEPS),
        strategies=strategies,
        budget=Budget(nfe=NFE),
        seeds=seeds,
        space=SPACE,
        storage=url,
        output_dir=None,
        epsilon=eps,
        progress=False,
        warm_up=False,
    )
    n_after = sum(
        len(optuna.load_study(study_name=s.study_name, storage=storage).trials) for s in report.studies
    )
    assert n_after > n_before
    for first, again in zip(report.studies, second.studies):
        assert again.n_before == first.n_trials and again.n_now == again.n_trials - first.n_trials > 0
        assert NFE <= again.spent_now["nfe"] < NFE + 2 * 8


def test_reach_and_target_on_hand_made_curves():
    from snopt.search._report import StudyResult

    def study(strategy, bests, nfes, times):
        s = StudyResult(strategy, 0, f"x-{strategy}-s0")
        cum_n = cum_t = 0
        for b, n, t in zip(bests, nfes, times):
            cum_n += n
            cum_t += t
            s.curve.append(
                {
                    "trial": len(s.curve),
                    "state": "COMPLETE",
                    "value": b,
                    "cum_time": cum_t,
                    "cum_nfe": cum_n,
                    "best": b,
                }
            )
        s.best_value = bests[-1]  # the curves below are already best-so-far
        return s

    a = study("feedback", [0.90, 0.95], [100, 100], [1.0, 1.0])
    b = study("tpe", [0.80, 0.93, 0.955], [50, 50, 50], [2.0, 2.0, 2.0])
    r = ComparisonReport.build(
        name="x",
        metric_name="accuracy",
        direction="maximize",
        budget={"nfe": 300},
        epsilon=0.01,
        studies=[a, b],
        storage=None,
    )
    assert r.target == 0.955
    assert (a.nfe_to_target, a.time_to_target) == (200, 2.0)  # 0.95 >= 0.955 - 0.01
    assert (b.nfe_to_target, b.time_to_target) == (150, 6.0)
    low = ComparisonReport.build(
        name="x",
        metric_name="mse",
        direction="minimize",
        budget={"nfe": 300},
        epsilon=0.0,
        studies=[study("a", [0.3, 0.2], [1, 1], [1, 1])],
        storage=None,
    )
    assert low.target == 0.2 and low.studies[0].nfe_to_target == 2
    with pytest.raises(KeyError, match="No study for strategy='gp'"):
        r.study("gp", 0)


def test_seeds_without_a_result_are_named_and_budget_cuts_counted():
    # A study whose only trial the budget cut has no result: the summary says "1/2 (none in
    # s1)", the paired differences name the seeds they pair, and the cut is counted.
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial
    from snopt.search._budget import STATUS_ATTR
    from snopt.search._report import study_result

    def trial(number, state, value, status):
        return create_trial(
            state=state,
            value=value if state == TrialState.COMPLETE else None,
            params={"lr": 0.01},
            distributions={"lr": FloatDistribution(1e-3, 1e-1, log=True)},
            user_attrs={STATUS_ATTR: status, "nfe_total": 10, "work": 100.0},
        )

    def study(strategy, seed, trials):
        for i, t in enumerate(trials):
            t.number = i
        return study_result(strategy, seed, f"x-{strategy}-s{seed}", trials, maximize=True)

    studies = [
        study("random", 0, [trial(0, TrialState.COMPLETE, 0.9, "completed")]),
        study("random", 1, [trial(0, TrialState.PRUNED, None, "budget")]),
        study("tpe", 0, [trial(0, TrialState.COMPLETE, 0.8, "completed")]),
        study(
            "tpe",
            1,
            [trial(0, TrialState.COMPLETE, 0.7, "completed"), trial(1, TrialState.PRUNED, None, "pruned")],
        ),
    ]
    assert [(s.n_pruned, s.n_budget) for s in studies] == [(0, 0), (1, 1), (0, 0), (1, 0)]
    assert studies[1].best_value is None
    settings = {"name": "x", "metric_name": "accuracy", "direction": "maximize", "epsilon": 0.0}
    r = ComparisonReport.build(studies=studies, storage=None, budget={"work": 200.0}, **settings)
    rows = {row["strategy"]: row for row in r.summary()}
    assert (rows["random"]["results"], rows["random"]["no_result_seeds"]) == ("1/2", [1])
    assert (rows["tpe"]["results"], rows["tpe"]["no_result_seeds"]) == ("2/2", [])
    assert (rows["random"]["budget_cut"], rows["tpe"]["budget_cut"]) == (1, 0)
    pair = next(p for p in r.paired() if (p["strategy"], p["baseline"]) == ("tpe", "random"))
    assert pair["val"]["seeds"] == [0] and pair["val"]["diffs"] == pytest.approx([-0.1])
    md = r.to_markdown()
    assert "| 1/2 (none in s1) |" in md and "| 2/2 |" in md
    assert "| s0 -0.1 |" in md  # the seed named, seed 1 (no random result) left out
    assert "| random | 1 | `x-random-s1` | – |" in md and "| 1 (1) |" in md


def _grid_hypervolume(front, ref_metric, ref_nfe, n=1500):
    """Area in (accuracy, log10 NFE) dominated by ``front`` inside the reference box, counted on a grid."""
    ms = ref_metric + (1.0 - ref_metric) * (np.arange(n) + 0.5) / n
    cs = np.log10(ref_nfe) * (np.arange(n) + 0.5) / n
    mm, cc = np.meshgrid(ms, cs)
    dominated = np.zeros_like(mm, dtype=bool)
    for m, nfe in front:
        dominated |= (mm <= m) & (cc >= np.log10(nfe))
    return dominated.mean() * (1.0 - ref_metric) * np.log10(ref_nfe)


def test_hypervolume_uses_a_fixed_reference_so_the_worst_front_is_not_zero():
    from snopt.search._report import StudyResult

    fronts = {
        "feedback": [(0.95, 42.0), (0.90, 30.0)],
        "nsga2": [(0.86, 72.0), (0.82, 42.0)],
        "tpe": [(0.45, 66.0)],  # the worst front of the seed
    }
    studies = []
    for strategy, front in fronts.items():
        s = StudyResult(strategy, 0, f"x-{strategy}-s0", work=1e9, best_value=max(m for m, _ in front))
        s.front = front
        studies.append(s)
    settings = dict(
        name="x", metric_name="accuracy", direction="maximize", budget={}, epsilon=0.0, storage=None
    )
    reference = {0: (0.1, 30000.0)}
    report = ComparisonReport.build(
        studies=studies, objectives=["metric", "nfe"], references=reference, **settings
    )
    hv = report.hypervolumes()
    for strategy, front in fronts.items():
        assert hv[(strategy, 0)] == pytest.approx(_grid_hypervolume(front, 0.1, 30000.0), rel=3e-3)
    assert hv[("tpe", 0)] > 0  # a reference at the seed's worst metric would give it 0 by construction
    # The reference is the task's, not the results': dropping a strategy changes no other value.
    fewer = ComparisonReport.build(
        studies=studies[:2], objectives=["metric", "nfe"], references=reference, **settings
    )
    assert fewer.hypervolumes() == {k: v for k, v in hv.items() if k[0] != "tpe"}
    assert "reference (0.1, 3e+04 NFE)" in report.to_markdown()
    assert report.to_dict()["hypervolume_references"] == {"0": [0.1, 30000.0]}


def test_reference_points_come_from_the_task():
    from snopt.search._compare import reference_points

    from snopt import RunConfig
    from snopt._tasks import get_task

    assert reference_points("multiblock", [0, 1], ["metric", "nfe"]) == {0: (0.1, 30000.0), 1: (0.1, 30000.0)}
    config = RunConfig(task="timeseries", max_nfe=500)
    assert reference_points(config, [2], ["metric", "nfe"]) == {
        2: (get_task("timeseries").null_metric(seed=2), 500.0)
    }
    assert reference_points(RunConfig(max_nfe=None), [0], ["metric", "nfe"]) == {0: (0.1, 10000.0)}
    assert reference_points("digits", [0], ["metric"]) == {}  # one objective: no hypervolume
