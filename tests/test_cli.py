"""The installed ``snopt`` command, run in a subprocess."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # every test here runs the installed command


def snopt_command() -> list[str]:
    exe = Path(sys.executable).parent / "snopt"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("snopt")
    if found is None:
        pytest.fail("the `snopt` console script is not installed (pip install the package first)")
    return [found]


def run(*args, timeout=300):
    return subprocess.run([*snopt_command(), *args], capture_output=True, text=True, timeout=timeout)


def _listed(text, pattern):
    """The names a help text lists at the start of its entries (``pattern`` matches one)."""
    return {m.group(1) for m in re.finditer(rf"^\s{{2,}}({pattern})(?:[ ,=]|$)", text, re.MULTILINE)}


def test_help_lists_every_command():
    from snopt.cli import COMMANDS

    out = run("--help")
    assert out.returncode == 0
    listed = _listed(out.stdout, r"[a-z]+")
    assert set(COMMANDS) <= listed and {"train", "search", "compare", "worker", "ui", "tracking"} <= listed
    for name, spec in COMMANDS.items():  # each with its own help line
        assert re.search(rf"^\s+{name}\s+{re.escape(spec.help.split()[0])}", out.stdout, re.MULTILINE), name


def test_train_help_describes_flags():
    out = run("train", "--help")
    assert out.returncode == 0
    assert out.stdout.startswith("usage: snopt train ")
    # The flags an option entry declares: its invocation, before the gap that starts its help.
    entries = [m.group(1) for m in re.finditer(r"^\s{2}(-.*?)(?:\s{2,}|$)", out.stdout, re.MULTILINE)]
    listed = {flag for entry in entries for flag in re.findall(r"--[a-z0-9-]+", entry)}
    for flag in (
        "--task",
        "--optimizer",
        "--epochs",
        "--t1",
        "--method",
        "--no-adjoint",
        "--control",
        "--output-json",
        "--snopt-update-freq",
        "--t1-bounds",
        "--no-tracking",
    ):
        assert flag in listed, flag


def test_train_writes_a_json_summary(tmp_path):
    path = tmp_path / "summary.json"
    out = run(
        "train",
        "--task",
        "digits",
        "--optimizer",
        "adam",
        "--max-steps",
        "6",
        "--eval-every",
        "3",
        "--method",
        "rk4",
        "--model-kwargs",
        "width=8",
        "--no-tracking",
        "--no-progress",
        "--output-json",
        str(path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "snopt train: completed" in out.stdout and "accuracy" in out.stdout
    data = json.loads(path.read_text())
    assert data["status"] == "completed" and data["metric_name"] == "accuracy"
    assert data["config"]["optimizer"] == "adam" and data["config"]["lr"] == 0.01
    assert len(data["history"]) == 6 and data["stats"]["steps"] == 6
    assert 0.0 <= data["final"]["accuracy"] <= 1.0 and "t1/blocks.0" in data["final"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--t1", "-1"], "--t1: `t1` must be a positive number, but got t1=-1.0."),
        (["--lr=-1"], "--lr: `lr` must be a positive number or None, but got lr=-1.0."),
        (["--task", "mnist"], "invalid choice: 'mnist'"),
        (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
        (["--epochs", "0"], "--epochs: `epochs` must be a positive integer"),
        (["--method", "rk5"], "argument --method: invalid choice: 'rk5'"),
        (["--t1-warmup", "-2"], "--t1-warmup: `t1_warmup` must be an integer >= 0"),
        (["--t1-momentum", "1.5"], "`t1_momentum` must be in [0, 1]"),
    ],
)
def test_bad_input_is_reported_without_a_traceback(args, message):
    out = run("train", "--no-tracking", "--no-progress", *args)
    assert out.returncode in (1, 2)
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["trian"], "snopt: error: unknown command 'trian'; did you mean 'train'?"),
        (["comapre", "--help"], "unknown command 'comapre'; did you mean 'compare'?"),
        (["train", "--optimzer", "adam"], "snopt train: error: unrecognized arguments: --optimzer adam "),
        (["train", "--optimzer=adam"], "(--optimzer: did you mean --optimizer?)"),
        (["compare", "--strategys", "tpe"], "(--strategys: did you mean --strategies?)"),
    ],
)
def test_a_misspelled_command_or_flag_gets_a_suggestion(args, message):
    out = run(*args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
