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


def test_a_misspelled_model_argument_is_refused_before_training(tmp_path, capsys):
    path = tmp_path / "out.json"
    code = main(["train", *TINY_TRAIN, "--model-kwargs", "widht=4", "--output-json", str(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "snopt train: error: --model-kwargs: `model_kwargs` has an unknown argument 'widht'" in err
    assert "did you mean 'width'?" in err and "widht': 4}" in err  # the rule, the fix and the value
    assert not [line for line in err.splitlines() if line.startswith("train ")]  # no step ran
    assert "snopt train: completed" not in out and not path.exists()


def test_ui_warns_when_the_folder_holds_no_store(tmp_path, monkeypatch, capsys, mlflow_store):
    import subprocess
    import types

    from snopt.cli import _tracking

    started = []

    class _NoServer:  # `mlflow ui` itself is not started: its command line is all that matters
        def __init__(self, cmd, **kwargs):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake = types.SimpleNamespace(Popen=_NoServer, TimeoutExpired=subprocess.TimeoutExpired)
    monkeypatch.setattr(_tracking, "subprocess", fake)
    assert main(["ui", "--port", "5123"]) == 0
    err = capsys.readouterr().err
    assert f"warning: no MLflow store at {tmp_path / 'mlflow.db'}: the UI will show no runs" in err
    assert "--backend-store-uri" in err and len(started) == 1
    mlflow_store(tmp_path / "mlflow.db")  # a store is there: no warning
    assert main(["ui", "--port", "5123"]) == 0
    assert "warning" not in capsys.readouterr().err and len(started) == 2


#: A run configuration file: the tiny run of TINY_TRAIN, one step, for the study commands.
CONFIG_TOML = """
task = "digits"
method = "rk4"
max_steps = 1
eval_every = 1
batch_size = 32
task_kwargs = { val_fraction = 0.05 }
model_kwargs = { width = 4 }
"""
STUDY_FLAGS = ["--space", "lr=1e-3:1e-1:log", "--n-trials", "1", "--no-tracking", "--no-progress"]


def _stored_config(storage, name):
    import optuna
    from snopt.search._study import STUDY_ATTR

    return optuna.load_study(study_name=name, storage=storage).user_attrs[STUDY_ATTR]["config"]


def test_search_and_compare_read_config_files(tmp_path, capsys):
    (tmp_path / "run.toml").write_text(CONFIG_TOML)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    common = ["--config", "run.toml", "--storage", storage, *STUDY_FLAGS, "--strategy"]
    assert main(["search", *common, "random", "--study-name", "mine", "--batch-size", "16"]) == 0
    config = _stored_config(storage, "mine")
    assert (config["max_steps"], config["model_kwargs"], config["method"]) == (1, {"width": 4}, "rk4")
    assert config["batch_size"] == 16  # a flag given with --config wins over the file
    compare = ["compare", "--config", "run.toml", "--storage", storage, *STUDY_FLAGS]
    assert main([*compare, "--strategies", "random", "--study-name", "cmp", "--output-dir", "out"]) == 0
    config = _stored_config(storage, "cmp-random-s0")
    assert (config["max_steps"], config["model_kwargs"], config["batch_size"]) == (1, {"width": 4}, 32)
    assert (tmp_path / "out" / "report.json").exists()
    capsys.readouterr()
    # The same checks as the flags: a bad value in the file is a usage error naming the field.
    (tmp_path / "bad.toml").write_text(CONFIG_TOML.replace("max_steps = 1", "max_steps = 0"))
    assert main(["compare", "--config", "bad.toml", "--storage", storage, *STUDY_FLAGS]) == 2
    assert "--max-steps: bad.toml: `max_steps` must be a positive integer" in capsys.readouterr().err
