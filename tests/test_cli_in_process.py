"""``snopt`` subcommands run in this process through ``snopt.cli.main`` (fast; tests/test_cli.py
runs the installed command in a subprocess)."""

from __future__ import annotations

import json

from snopt.cli import main

#: A digits run of two steps of a width-4 model with fixed-step RK4, evaluated every step.
TINY_TRAIN = [
    "--task",
    "digits",
    "--model-kwargs",
    "width=4",
    "--method",
    "rk4",
    "--max-steps",
    "2",
    "--eval-every",
    "1",
    "--batch-size",
    "32",
    "--no-tracking",
]


def test_train_names_the_metric_in_its_table_json_and_progress(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["train", *TINY_TRAIN, "--output-json", str(path)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    header = lines[lines.index("snopt train: completed") + 1].split()
    assert "accuracy" in header and "metric" not in header
    assert "accuracy=" in err and "metric=" not in err  # the progress line (not a terminal here)
    data = json.loads(path.read_text())
    assert data["metric_name"] == "accuracy"
    assert 0.0 <= data["final"]["accuracy"] <= 1.0 and "metric" not in data["final"]
    assert [("accuracy" in r, "metric" in r) for r in data["history"]] == [(True, False)] * 2
