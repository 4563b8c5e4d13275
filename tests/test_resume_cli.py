"""``snopt train`` stopped and resumed repeats the uninterrupted run exactly, from the command line.

Two epochs of 14 steps, run straight, and stopped at the end of the first epoch or in the
middle of the second (checkpointed every 5 steps), then resumed with ``--resume``: every
later record of the ``--output-json`` history and the final evaluation are equal, bit for bit
(CPU, float32: the CLI trains in the default dtype, so equality is exact, not approximate).
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # every test here runs the installed command

#: Digits at width 4 with RK4: 1707 training images in batches of 128 make 14 steps an epoch.
RUN = (
    "train --task digits --task-kwargs val_fraction=0.05 --model-kwargs width=4 --method rk4 "
    "--batch-size 128 --eval-every 7 --seed 3 --no-tracking --no-progress"
)
STEPS_PER_EPOCH = 14
#: What differs between two runs of the same steps: the clock.
CLOCK = ("wall_time",)


def _train(cwd: Path, *args: str) -> dict:
    exe = Path(sys.executable).parent / "snopt"
    out = cwd / f"run{len(list(cwd.glob('run*.json')))}.json"
    cmd = [str(exe), *shlex.split(RUN), *args, "--output-json", str(out)]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _steps(result: dict) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in CLOCK} for record in result["history"]]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    return _train(tmp_path_factory.mktemp("straight"), "--epochs", "2")


def test_resumed_at_an_epoch_end_repeats_every_later_step(straight, tmp_path):
    first = _train(tmp_path, "--epochs", "1", "--checkpoint", "c.pt")
    assert first["stats"]["steps"] == STEPS_PER_EPOCH
    resumed = _train(tmp_path, "--epochs", "2", "--checkpoint", "c.pt", "--resume")
    assert resumed["status"] == "completed" and len(resumed["history"]) == 2 * STEPS_PER_EPOCH
    assert _steps(resumed) == _steps(straight)
    assert resumed["final"] == straight["final"]


def test_resumed_mid_epoch_from_a_config_file_repeats_every_later_step(straight, tmp_path):
    # The checkpoint settings come from --config: the file's checkpoint and checkpoint_every count.
    (tmp_path / "run.toml").write_text('checkpoint = "c.pt"\ncheckpoint_every = 5\n')
    first = _train(tmp_path, "--config", "run.toml", "--epochs", "2", "--max-steps", "20")
    assert first["stats"]["steps"] == 20 and (tmp_path / "c.pt").exists()
    resumed = _train(tmp_path, "--config", "run.toml", "--epochs", "2", "--resume")
    # The stopped run evaluated at its last step, 20, as every run does at its end: the one record
    # with more keys than the straight run's. Every value the straight run has is equal.
    mine, theirs = _steps(resumed), _steps(straight)
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]
    assert [{k: r[k] for k in t} for r, t in zip(mine, theirs)] == theirs
    assert [r["step"] for r, t in zip(mine, theirs) if set(r) - set(t)] == [20]
    assert resumed["final"] == straight["final"]


def test_resuming_another_models_checkpoint_is_a_usage_error(tmp_path):
    _train(tmp_path, "--max-steps", "2", "--checkpoint", "c.pt")
    exe = Path(sys.executable).parent / "snopt"
    cmd = [str(exe), *shlex.split(RUN.replace("width=4", "width=6")), "--max-steps", "4"]
    done = subprocess.run(
        [*cmd, "--checkpoint", "c.pt", "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert "--checkpoint: `checkpoint` file 'c.pt' does not match this model" in done.stderr
    assert "Traceback" not in done.stderr
