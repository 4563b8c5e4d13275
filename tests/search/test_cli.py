"""``snopt search``, ``snopt compare`` and ``snopt worker``, run as the installed command in a subprocess."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

pytestmark = pytest.mark.integration  # every test here runs the installed command

TINY = [
    "--task",
    "digits",
    "--task-kwargs",
    "val_fraction=0.05",
    "--model-kwargs",
    "width=4",
    "--method",
    "rk4",
    "--max-steps",
    "3",
    "--batch-size",
    "32",
    "--eval-every",
    "1",
    "--space",
    "t1=0.5:2:log,lr=1e-3:1e-1:log",
    "--no-progress",
]


def _snopt(*args, cwd):
    exe = shutil.which("snopt")
    # Without an installed entry point, call main() the way the console script does (`-m` would load
    # snopt.cli twice, as __main__ and as snopt.cli).
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from snopt.cli import main; sys.exit(main())"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=280)


def test_compare_writes_the_report_and_prints_where(tmp_path):
    res = _snopt(
        "compare",
        *TINY,
        "--strategies",
        "random,tpe",
        "--n-trials",
        "2",
        "--storage",
        "sqlite:///cmp.db",
        "--output-dir",
        "out",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = tmp_path / "out" / "report.md"
    assert f"report written to {report}" in res.stdout
    assert "strategy" in res.stdout and "random" in res.stdout and "tpe" in res.stdout
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["strategies"] == ["random", "tpe"] and data["budget"]["n_trials"] == 2
    for name in ("digits-random-s0", "digits-tpe-s0"):
        assert len(optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'cmp.db'}").trials) == 2


def test_search_then_worker_on_the_same_study(tmp_path):
    res = _snopt(
        "search",
        *TINY,
        "--strategy",
        "random",
        "--n-trials",
        "2",
        "--storage",
        "sqlite:///s.db",
        "--study-name",
        "mine",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "best: trial" in res.stdout and "study mine (random)" in res.stdout
    # The study's budget (2 trials) is stored with it and caps every worker that joins later.
    res = _snopt("worker", "--storage", "sqlite:///s.db", "--study", "mine", "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path / 's.db'}").trials) == 2


def test_search_again_on_the_same_study_runs_its_budget_again_and_says_so(tmp_path):
    args = ("search", *TINY, "--strategy", "random", "--n-trials", "2", "--storage", "sqlite:///s.db")
    args = (*args, "--study-name", "again", "--no-tracking")
    first = _snopt(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "0 trials there before this run" in first.stdout
    assert "trials: 2 ran now, 0 were there before" in first.stdout
    second = _snopt(*args, cwd=tmp_path)  # Optuna's convention: optimize(n_trials=2) runs 2 more
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 trials there before this run" in second.stdout
    assert "trials: 2 ran now, 2 were there before" in second.stdout
    trials = optuna.load_study(study_name="again", storage=f"sqlite:///{tmp_path / 's.db'}").trials
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    # The table lists every trial of the study, the earlier run's too.
    rows = re.findall(r"^(\d+) +(complete|pruned) ", second.stdout, flags=re.MULTILINE)
    assert [int(n) for n, _ in rows] == [0, 1, 2, 3]


def test_pareto_compare_writes_a_front_and_hypervolumes(tmp_path):
    res = _snopt(
        "compare",
        *TINY,
        "--strategies",
        "feedback,nsga2",
        "--objectives",
        "metric,nfe",
        "--n-trials",
        "2",
        "--storage",
        "sqlite:///p.db",
        "--output-dir",
        "out",
        "--no-tracking",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["objectives"] == ["metric", "nfe"]
    for study in data["studies"]:
        front = study["front"]
        assert front, study["strategy"]
        complete = [t["values"] for t in study["trials"] if t["state"] == "COMPLETE"]
        for m, nfe in front:  # each front point is a trial's (accuracy, inference NFE), none dominated
            assert [m, nfe] in complete and nfe > 0
            assert not any(o[0] >= m and o[1] <= nfe and o != [m, nfe] for o in complete)
    assert data["hypervolume_references"] == {"0": [0.1, 10000.0]}  # chance, max_nfe x 1 block
    assert set(data["hypervolumes"]) == {"feedback/s0", "nsga2/s0"}
    assert "Pareto fronts" in (tmp_path / "out" / "report.md").read_text()


def test_compare_caps_each_trial_by_default_unless_told(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    caps = {}
    for name, extra in (("auto", ()), ("none", ("--trial-budget", "none"))):
        res = _snopt(
            "compare",
            *TINY,
            "--strategies",
            "random",
            "--n-trials",
            "1",
            "--budget-work",
            "1e15",
            *extra,
            "--storage",
            url,
            "--study-name",
            name,
            "--output-dir",
            name,
            "--no-tracking",
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        caps[name] = optuna.load_study(study_name=f"{name}-random-s0", storage=url).user_attrs["snopt"]
    # 3 trials of the default configuration (3 RK4 steps of a width-4 model): far below the budget
    assert 0 < caps["auto"]["trial_budget"]["work"] < 1e12
    assert caps["none"]["trial_budget"]["work"] is None


def test_a_trial_budget_stops_a_minutes_long_solve_and_prunes_the_trial(tmp_path):
    # rtol 1e-12 and no evaluation cap: one training step takes minutes; the trial's 2 s do not.
    res = _snopt(
        "search",
        *TINY,
        "--method",
        "dopri5",
        "--rtol",
        "1e-12",
        "--atol",
        "1e-12",
        "--max-nfe",
        "none",
        "--n-trials",
        "1",
        "--trial-budget",
        "timeout=2",
        "--storage",
        "sqlite:///s.db",
        "--study-name",
        "tight",
        "--no-tracking",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    trial = optuna.load_study(study_name="tight", storage=f"sqlite:///{tmp_path / 's.db'}").trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs["steps"] == 0
    assert "the trial's budget ran out (wall-clock" in trial.user_attrs["stop_reason"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--strategies", "tpe,bayes"], "unknown strategies ['bayes']"),
        (["compare", "--n-trials", "0"], "expected a positive integer"),
        (["compare", "--budget-nfe", "-5"], "expected a positive integer"),
        (
            ["compare", "--storage", "redis://localhost:6379"],
            "one of the schemes ['sqlite', 'postgresql', 'mysql']",
        ),
        (["search", "--space", "t1=4:1"], "`low <= high` must hold"),
        (["search", "--space", "depth=1:3:int"], "Unknown search parameters ['depth']"),
        (
            ["worker", "--storage", "sqlite:///none.db", "--study", "nope"],
            "`storage` must name an existing SQLite file",
        ),
        (
            ["search", "--trial-budget", "n_trials=3"],
            "--trial-budget items must be nfe=N, timeout=S or work=W",
        ),
        (["search", "--trial-budget", "nfe=-1"], "--trial-budget: Budget `nfe` must be a positive integer"),
    ],
)
def test_bad_input_is_a_usage_error(tmp_path, args, message):
    res = _snopt(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr
    assert "usage: snopt" in res.stderr
    assert not Path(tmp_path / "compare_report").exists()  # a refused command leaves nothing behind
    assert not Path(tmp_path / "none.db").exists()
