"""Every script in examples/ runs to its end with tiny settings (a subprocess each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: Script -> (tiny arguments, a word its output must contain).
RUNS = {
    "train_snopt_digits.py": (["--epochs", "1"], "snopt"),
    "cnf_toy2d.py": (["--epochs", "1"], "validation NLL"),
    "horizon_feedback.py": (["--epochs", "1"], "final T="),
    "timeseries_odernn.py": (["--epochs", "1"], "validation MSE"),
    "custom_model.py": ([], "validation MSE"),
    "compare_search.py": (["--nfe", "1500"], "feedback"),
}


def test_every_example_is_covered():
    assert sorted(RUNS) == sorted(p.name for p in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_runs(script, tmp_path):
    args, expected = RUNS[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert expected in out.stdout, out.stdout[-2000:]
