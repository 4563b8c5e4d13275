"""One set of defaults: the class signatures, :class:`snopt.RunConfig` and the command line
all read ``snopt/_defaults.py``, and a configuration file or flag overrides them in order."""

from __future__ import annotations

import inspect
import json
import shlex
from pathlib import Path

import pytest
import torch

import snopt
from snopt import _defaults as D
from snopt._config import RunConfig
from snopt._control import FeedbackPolicy, GradientPolicy
from snopt.cli import build_parser
from snopt.cli._base import config_from_args


def _defaults_of(cls) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_class_signatures_take_their_defaults_from_one_place():
    block = _defaults_of(snopt.ODEBlock)
    assert {k: block[k] for k in D.ODE} == dict(D.ODE)
    assert {k: _defaults_of(snopt.SNOpt)[k] for k in D.SNOPT} == dict(D.SNOPT)
    assert {k: _defaults_of(snopt.Controller)[k] for k in D.CONTROL} == dict(D.CONTROL)
    assert _defaults_of(GradientPolicy)["lr"] == D.POLICY_LR["gradient"]
    assert _defaults_of(FeedbackPolicy)["lr"] == D.POLICY_LR["feedback"]


def test_run_config_defaults_match_the_library():
    config = RunConfig()
    assert (config.t1, config.method, config.rtol, config.atol, config.adjoint) == tuple(
        D.ODE[k] for k in ("t1", "method", "rtol", "atol", "adjoint")
    )
    assert (config.snopt_eps, config.snopt_update_freq, config.snopt_alpha) == (
        D.SNOPT["eps"],
        D.SNOPT["update_freq"],
        D.SNOPT["alpha"],
    )
    assert (config.optimizer, config.control) == (D.RUN["optimizer"], D.RUN["control"])
    assert (config.t1_penalty, config.t1_every, config.t1_max_step, config.t1_warmup) == (
        D.CONTROL["penalty"],
        D.CONTROL["every"],
        D.CONTROL["max_step"],
        D.CONTROL["warmup"],
    )
    # None means "the optimizer's own default", resolved for tracking and reports.
    for name in D.OPTIMIZERS:
        resolved = RunConfig(optimizer=name).resolved()
        assert resolved.lr == D.LR[name]
        assert resolved.momentum == D.MOMENTUM.get(name)


def _parse(argv):
    args = build_parser()[0].parse_args(["train", *argv])
    return config_from_args(args)


def test_flags_override_the_file_and_the_file_overrides_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('optimizer = "adam"\nlr = 0.003\nt1 = 2.5\nmodel_kwargs = { width = 4 }\n')
    config = _parse(["--config", str(path), "--t1", "0.7"])
    assert config.optimizer == "adam" and config.lr == 0.003
    assert config.t1 == 0.7  # the flag wins over the file
    assert config.model_kwargs == {"width": 4}
    assert config.rtol == D.ODE["rtol"]  # neither file nor flag: the default


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_yaml_and_json_files_give_the_same_config(tmp_path, suffix):
    data = {"optimizer": "sgd", "momentum": 0.5, "t1_bounds": [0.1, 3.0], "epochs": 2}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        path.write_text("optimizer: sgd\nmomentum: 0.5\nt1_bounds: [0.1, 3.0]\nepochs: 2\n")
    config = RunConfig.from_file(path)
    assert (config.optimizer, config.momentum, config.t1_bounds, config.epochs) == ("sgd", 0.5, (0.1, 3.0), 2)


def test_yaml_file_cannot_build_python_objects(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="run.yaml"):
        RunConfig.from_file(path)


@pytest.mark.parametrize(
    "text,message",
    [
        ("bach_size = 3\n", "unknown setting 'bach_size': did you mean 'batch_size'?"),
        ("lr = -1\n", "`lr` must be a positive number or None, but got lr=-1"),
        ('method = "rk45"\n', "`method` must be one of"),
        ("epochs = [\n", "run.toml"),
    ],
)
def test_bad_file_names_the_setting_and_the_file(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        RunConfig.from_file(path)


def test_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "run.ini"
    path.write_text("[x]\n")
    with pytest.raises(ValueError, match=r"must be a \.toml, \.yaml, \.yml or \.json file"):
        RunConfig.from_file(path)


class _Decay(torch.nn.Module):
    def forward(self, t, x):
        return -x


_SETTINGS = ("every", "momentum", "max_step", "warmup", "curvature", "feedback")


def _controller_settings(controller) -> dict:
    settings = {k: getattr(controller, k) for k in _SETTINGS}
    return {"policy": repr(controller.policy), "cost": repr(controller.cost), **settings}


@pytest.mark.parametrize("command", ["train", "search", "compare"])
def test_every_command_builds_the_librarys_default_controller(command):
    """`snopt.Controller(model)`, `snopt train`, and the studies' trials get the same controller."""
    from snopt._run import build_controller

    def model():
        return torch.nn.Sequential(snopt.ODEBlock(_Decay(), 0.0, 1.0), torch.nn.Linear(1, 1))

    library = model()
    reference = snopt.Controller(library, optimizer=torch.optim.Adam(library.parameters()))
    args = build_parser()[0].parse_args([command, "--control", "feedback"])
    cli = model()
    built = build_controller(config_from_args(args), cli, torch.optim.Adam(cli.parameters()))
    assert _controller_settings(built) == _controller_settings(reference)


@pytest.mark.parametrize("command", ["train", "search", "compare"])
def test_the_mlflow_project_runs_what_the_command_line_runs(command):
    """An entry point without -P parses to the bare `snopt <command>`: the MLproject repeats no default."""
    spec = pytest.importorskip("mlflow.projects._project_spec")
    entry = spec.load_project(str(Path(__file__).parents[2] / "mlflow")).get_entry_point(command)
    parser = build_parser()[0]

    def parsed(user_parameters: dict[str, str]):
        line = entry.compute_command(user_parameters, "unused")  # what `mlflow run` executes
        argv = shlex.split(line.rpartition("&&")[2])
        assert argv[:2] == ["snopt", command], line
        return parser.parse_args(argv[1:])

    assert vars(parsed({})) == vars(parser.parse_args([command, "--no-progress"]))
    assert parsed({"seed": "7"}).seed == 7  # a -P name is passed through as --name value
    if command == "train":
        config = config_from_args(parsed({}))
        assert (config.optimizer, config.control) == (D.RUN["optimizer"], D.RUN["control"])
