"""The bad-input table: every bad input is refused before any work, with a message that names it.

One row per input, for the command line (``CLI``) and for the Python API (``API``); add a row
with every new option.  Each CLI row runs ``snopt.cli.main`` in this process, as the installed
command does (``test_cli_rows_in_a_subprocess`` runs a few rows through the installed command
itself, to show that the two agree), and asserts the exit status, that stderr names the flag,
that no traceback is printed and that no file is left behind (no ``snopt.db``, ``mlflow.db``,
report folder or checkpoint).  Each API row asserts the exception type, that the message names
the argument, and that no file is left behind.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

#: Files every row starts with: a plain file where a folder is expected, and settings files.
FILES = {
    "afile": "not a folder\n",
    "bad_key.toml": "lrr = 1\n",
    "bad_value.toml": 'lr = "x"\n',
    "broken.toml": "lr = [1\n",
    "list.yaml": "- 1\n- 2\n",
    "settings.ini": "[run]\nlr = 1\n",
    "bad_width.toml": "model_kwargs = {widht = 3}\n",
    "checkpoint.toml": 'checkpoint = "ck.pt"\nresume = true\n',
    "empty.pt": "",
    "text.pt": "not a checkpoint\n",
    # A raw pickle that would run os.system("true") if it were unpickled.
    "raw.pt": b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94"
    b"\x93\x94\x8c\x04true\x94\x85\x94R\x94.",
}


@dataclass(frozen=True)
class Cli:
    """A command line (after ``snopt``), what its error must name, and its exit status."""

    args: str
    names: str
    code: int = 2
    skip: str = ""  # a reason to skip the row on this machine


@dataclass(frozen=True)
class Api:
    """A call, the exception it must raise and what the message must name."""

    label: str
    call: Callable[[], Any]
    error: type[BaseException]
    names: str


_CUDA = "this machine has CUDA" if torch.cuda.is_available() else ""
_MPS = "this machine has MPS" if torch.backends.mps.is_available() else ""

# --------------------------------------------------------------------------- the command line
CLI = [
    # snopt train: numbers out of range
    Cli("train --optimizer sgd --momentum 5", "--momentum"),
    Cli("train --optimizer sgd --momentum -0.1", "--momentum"),
    Cli("train --optimizer snopt --momentum 1", "--momentum"),
    Cli("train --lr -1", "--lr"),
    Cli("train --lr inf", "--lr"),
    Cli("train --lr nan", "--lr"),
    Cli("train --lr x", "--lr"),
    Cli("train --batch-size 0", "--batch-size"),
    Cli("train --batch-size 2.5", "--batch-size"),
    Cli("train --rtol 0", "--rtol"),
    Cli("train --atol -1", "--atol"),
    Cli("train --t1 0", "--t1"),
    Cli("train --t1 nan", "--t1"),
    Cli("train --t1 -1", "--t1"),
    Cli("train --max-nfe 0", "--max-nfe"),
    Cli("train --epochs 0", "--epochs"),
    Cli("train --epochs none", "--epochs"),
    Cli("train --max-steps 0", "--max-steps"),
    Cli("train --eval-every 0", "--eval-every"),
    Cli("train --seed -1", "--seed"),
    Cli("train --seed 99999999999", "--seed"),
    Cli("train --max-grad-norm -1", "--max-grad-norm"),
    Cli("train --weight-decay -1", "--weight-decay"),
    Cli("train --optimizer snopt --snopt-damping -1", "--snopt-damping"),
    Cli("train --optimizer snopt --snopt-sample-step 0", "--snopt-sample-step"),
    Cli("train --optimizer snopt --snopt-update-freq 0", "--snopt-update-freq"),
    Cli("train --optimizer snopt --snopt-update-growth -1", "--snopt-update-growth"),
    Cli("train --optimizer snopt --snopt-eps -1", "--snopt-eps"),
    Cli("train --optimizer snopt --snopt-alpha 2", "--snopt-alpha"),
    Cli("train --control feedback --t1-bounds 2 1", "--t1-bounds"),
    Cli("train --control feedback --t1-bounds 1 nan", "--t1-bounds"),
    Cli("train --control feedback --t1-every 0", "--t1-every"),
    Cli("train --control feedback --t1-momentum 1.5", "--t1-momentum"),
    Cli("train --control feedback --t1-lr -1", "--t1-lr"),
    Cli("train --control feedback --t1-warmup -1", "--t1-warmup"),
    Cli("train --control feedback --t1-penalty -1", "--t1-penalty"),
    Cli("train --control gradient --t1-max-step 0", "--t1-max-step"),
    # snopt train: a flag the run would ignore
    Cli("train --momentum 0.5", "--momentum"),
    Cli("train --snopt-alpha 0.5", "--snopt-alpha"),
    Cli("train --t1-lr 0.1", "--t1-lr"),
    # snopt train: unknown names
    Cli("train --task nope", "--task"),
    Cli("train --method nope", "--method"),
    Cli("train --optimizer nope", "--optimizer"),
    Cli("train --control nope", "--control"),
    Cli("train --optimizer snopt --snopt-curvature nope", "--snopt-curvature"),
    Cli("train --control feedback --t1-cost nope", "--t1-cost"),
    Cli("train --control feedback --t1-curvature nope", "--t1-curvature"),
    Cli("train --device tpu", "--device"),
    Cli("train --device cuda:99", "--device"),
    Cli("train --device cuda", "--device", skip=_CUDA),
    Cli("train --device mps", "--device", skip=_MPS),
    Cli("search --device cuda:99", "--device"),
    Cli("compare --device mps", "--device", skip=_MPS),
    Cli("train --log-models some", "--log-models"),
    Cli("train --nope", "--nope"),
    # snopt train: task and model arguments
    Cli("train --model-kwargs widht=8", "--model-kwargs"),
    Cli("train --model-kwargs t1=2", "--model-kwargs"),
    Cli("train --model-kwargs width=0", "--model-kwargs"),
    Cli("train --model-kwargs options=5", "--model-kwargs"),
    Cli("train --model-kwargs width=100000", "--model-kwargs"),
    Cli("train --task-kwargs nope=1", "--task-kwargs"),
    Cli("train --task-kwargs foo", "--task-kwargs"),
    Cli("train --task-kwargs val_fraction=0.5,val_fraction=0.2", "--task-kwargs"),
    Cli("train --model-kwargs width=4,width=8", "--model-kwargs"),
    Cli("train --task-kwargs val_fraction=1.5", "val_fraction"),
    Cli("train --task-kwargs val_fraction=0.999", "val_fraction"),
    Cli("train --task-kwargs val_fraction=0.5,test_fraction=0.995", "test_fraction"),
    Cli("train --task toy2d --task-kwargs dataset=nope", "dataset"),
    # snopt train: tracking
    Cli("train --experiment ''", "--experiment"),
    Cli("train --run-name ''", "--run-name"),
    Cli("train --tracking-uri foo://x", "--tracking-uri"),
    # snopt train: files
    Cli("train --config /nonexistent.toml", "config"),
    Cli("train --config afile", "config"),
    Cli("train --config bad_key.toml", "lrr"),
    Cli("train --config bad_value.toml", "lr"),
    Cli("train --config broken.toml", "config"),
    Cli("train --config list.yaml", "config"),
    Cli("train --config settings.ini", "config"),
    Cli("train --config bad_width.toml", "--model-kwargs"),
    Cli("train --checkpoint /proc/x.pt", "--checkpoint"),
    Cli("train --checkpoint afile/x.pt", "--checkpoint"),
    Cli("train --checkpoint .", "--checkpoint"),
    Cli("train --output-json /proc/x/y.json", "--output-json"),
    Cli("train --output-json afile/y.json", "--output-json"),
    Cli("train --checkpoint-every 5", "--checkpoint-every"),
    Cli("train --checkpoint-every 0 --checkpoint c.pt", "--checkpoint-every"),
    Cli("train --resume", "--checkpoint"),
    Cli("train --checkpoint empty.pt --resume", "--checkpoint"),
    Cli("train --checkpoint text.pt --resume", "--checkpoint"),
    Cli("train --checkpoint raw.pt --resume", "--checkpoint"),
    # snopt search: the space
    Cli("search --space t1=a:b", "--space"),
    Cli("search --space t1=1:2,t1=1:3", "--space"),
    Cli("search --space t1=2:1", "--space"),
    Cli("search --space lr=0:1:log", "--space"),
    Cli("search --space t1=1:2:nope", "--space"),
    Cli("search --space t1", "--space"),
    Cli("search --space ''", "--space"),
    Cli("search --space bogus=1:2", "bogus"),
    Cli("search --space 'method=rk4|nope'", "method"),
    Cli("search --space batch_size=0:10:int", "batch_size"),
    Cli("search --space width=0:10:int", "width"),
    Cli("search --space width=1:1e12:int", "width"),
    Cli("search --space 'width=4|100000'", "width"),
    Cli("search --space tol=1e-3:1e-2:log,rtol=1e-3:1e-2:log", "rtol"),
    Cli("search --space atol=1e-3:1e-2:log,tol=1e-3:1e-2:log", "atol"),
    Cli("search --space momentum=0:0.9", "momentum"),
    Cli("search --optimizer sgd --space 'optimizer=sgd|adam,momentum=0:0.9'", "momentum"),
    Cli("search --space t1=0.5:2,t1/blocks.0=0.5:2", "t1/blocks.0"),
    Cli("search --space t1/nope=0.5:2", "nope"),
    # snopt search: budgets, names and the rest
    Cli("search --n-trials 0", "--n-trials"),
    Cli("search --budget-nfe -5", "--budget-nfe"),
    Cli("search --timeout 0", "--timeout"),
    Cli("search --budget-work nan", "--budget-work"),
    Cli("search --strategy nope", "--strategy"),
    Cli("search --pruner nope", "--pruner"),
    Cli("search --workers 0", "--workers"),
    Cli("search --sampler nope", "--sampler"),
    Cli("search --study-name ''", "--study-name"),
    Cli("search --lr -1", "--lr"),
    Cli("search --tracking-uri foo://x", "--tracking-uri"),
    Cli("search --experiment ''", "--experiment"),
    Cli("search --config checkpoint.toml", "--config"),
    Cli("compare --config checkpoint.toml", "--config"),
    Cli("search --storage foo://x", "storage"),
    Cli("search --storage sqlite:///afile/x.db", "storage"),
    Cli("search --storage ''", "storage"),
    Cli("search --storage sqlite://", "storage"),
    Cli("search --storage postgresql://u:p@localhost:99999/db", "storage"),
    Cli("search --storage postgresql://u:p@localhost:abc/db", "storage"),
    Cli("search --total n_trials=0", "--total"),
    Cli("search --total bogus=1", "--total"),
    Cli("search --total nfe=x", "--total"),
    Cli("search --trial-budget n_trials=3", "--trial-budget"),
    Cli("search --trial-budget timeout=-1", "--trial-budget"),
    # snopt compare
    Cli("compare --strategies nope", "--strategies"),
    Cli("compare --strategies ''", "--strategies"),
    Cli("compare --seeds a", "--seeds"),
    Cli("compare --seeds -1", "--seeds"),
    Cli("compare --epsilon x", "--epsilon"),
    Cli("compare --epsilon -1", "--epsilon"),
    Cli("compare --epsilon nan", "--epsilon"),
    Cli("compare --seeds 1,1", "--seeds"),
    Cli("compare --objectives nope", "--objectives"),
    Cli("compare --objectives nfe", "--objectives"),
    Cli("compare --objectives metric,metric", "--objectives"),
    Cli("compare --total n_trials=0", "--total"),
    Cli("compare --trial-budget bogus=1", "--trial-budget"),
    Cli("compare --storage postgresql://u:p@localhost:0/db", "storage"),
    Cli("compare --output-dir /proc/x", "--output-dir"),
    Cli("compare --output-dir afile", "--output-dir"),
    Cli("compare --output-dir ''", "--output-dir"),
    Cli("compare --storage foo://x", "storage"),
    Cli("compare --space t1=2:1", "--space"),
    Cli("compare --workers 0", "--workers"),
    Cli("compare --momentum 0.5", "--momentum"),
    # snopt worker
    Cli("worker --study x --storage sqlite:///missing.db", "storage"),
    Cli("worker --study x --storage foo://x", "storage"),
    Cli("worker --storage sqlite:///x.db", "--study"),
    Cli("worker --study '' --storage sqlite:///x.db", "--study"),
    Cli("worker --study x --storage sqlite:///x.db --n-trials 0", "--n-trials"),
    Cli("worker --study x --storage sqlite:///x.db --timeout -1", "--timeout"),
    Cli("worker --study x --storage sqlite:///x.db --worker-index x", "--worker-index"),
    # snopt ui and snopt tracking
    Cli("ui --port 0", "--port"),
    Cli("ui --port 70000", "--port"),
    Cli("ui --port x", "--port"),
    Cli("ui --host ''", "--host"),
    Cli("ui --backend-store-uri foo://x", "--backend-store-uri"),
    Cli("ui --backend-store-uri ''", "--backend-store-uri"),
    Cli("train --tracking-uri ''", "--tracking-uri"),
    Cli("tracking sync --dir ''", "--dir"),
    Cli("tracking sync --dir afile", "--dir"),
    Cli("tracking sync --dir /nonexistent", "--dir"),
    Cli("tracking status --dir afile", "--dir"),
    Cli("tracking sync --tracking-uri foo://x", "--tracking-uri"),
    Cli("tracking nope", "action"),
    Cli("tracking", "action"),
    Cli("nope", "unknown command 'nope'"),
]


# --------------------------------------------------------------------------- the Python API
def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 2))


def _block(**kwargs: Any) -> Any:
    from snopt import ODEBlock

    return ODEBlock(torch.nn.Linear(2, 2), **kwargs)


def _run_config(**kwargs: Any) -> Any:
    from snopt import RunConfig

    return RunConfig(**kwargs)


def _build_run(**kwargs: Any) -> Any:
    from snopt import build_run

    return build_run(_run_config(**kwargs))


def _loader(n: int = 8) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.randn(n, 2), torch.zeros(n, dtype=torch.long)), batch_size=4)


def _fit(**kwargs: Any) -> Any:
    from snopt import fit

    model = _model()
    args: dict[str, Any] = dict(
        train_loader=_loader(),
        val_loader=_loader(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.functional.cross_entropy,
        epochs=1,
        progress=False,
    )
    args.update(kwargs)
    return fit(model, **args)


def _snopt(**kwargs: Any) -> Any:
    from snopt import SNOpt

    return SNOpt(_model(), **kwargs)


def _controller(**kwargs: Any) -> Any:
    from snopt import Controller

    return Controller(torch.nn.Sequential(_block()), **kwargs)


def _space(params: dict[str, Any]) -> Any:
    from snopt.search import SearchSpace

    return SearchSpace(params)


def _study(**kwargs: Any) -> Any:
    from snopt.search import create_study

    kwargs.setdefault("storage", None)
    return create_study(kwargs.pop("task", "digits"), **kwargs)


def _float(*args: Any, **kwargs: Any) -> Any:
    from snopt.search import Float

    return Float(*args, **kwargs)


def _int(*args: Any, **kwargs: Any) -> Any:
    from snopt.search import Int

    return Int(*args, **kwargs)


def _budget(**kwargs: Any) -> Any:
    from snopt.search import Budget

    return Budget(**kwargs)


def _compare(**kwargs: Any) -> Any:
    from snopt.search import compare

    kwargs.setdefault("storage", None)
    return compare("digits", strategies=["random"], budget={"n_trials": 1}, progress=False, **kwargs)


def _tracking(name: str, *args: Any, **kwargs: Any) -> Any:
    import snopt.tracking

    return getattr(snopt.tracking, name)(*args, **kwargs)


def _task(name: str, **kwargs: Any) -> Any:
    from snopt import get_task

    return get_task(name, **kwargs)


def _read_checkpoint(name: str, content: bytes) -> Any:
    from snopt._checkpoint import read_checkpoint

    Path(name).write_bytes(content)
    try:
        return read_checkpoint(name)
    finally:
        Path(name).unlink()


API = [
    # RunConfig
    Api("RunConfig(lr=-1)", lambda: _run_config(lr=-1), ValueError, "lr"),
    Api("RunConfig(lr=nan)", lambda: _run_config(lr=float("nan")), ValueError, "lr"),
    Api("RunConfig(batch_size=2.5)", lambda: _run_config(batch_size=2.5), ValueError, "batch_size"),
    Api("RunConfig(batch_size=True)", lambda: _run_config(batch_size=True), ValueError, "batch_size"),
    Api("RunConfig(task='nope')", lambda: _run_config(task="nope"), ValueError, "task"),
    Api("RunConfig(method='nope')", lambda: _run_config(method="nope"), ValueError, "method"),
    Api(
        "RunConfig(optimizer=sgd, momentum=5)",
        lambda: _run_config(optimizer="sgd", momentum=5),
        ValueError,
        "momentum",
    ),
    Api(
        "RunConfig(optimizer=adam, momentum=0.5)",
        lambda: _run_config(optimizer="adam", momentum=0.5),
        ValueError,
        "momentum",
    ),
    Api("RunConfig(checkpoint_every=5)", lambda: _run_config(checkpoint_every=5), ValueError, "checkpoint"),
    Api("RunConfig(weight_decay=-1)", lambda: _run_config(weight_decay=-1), ValueError, "weight_decay"),
    Api("RunConfig(seed=2**40)", lambda: _run_config(seed=2**40), ValueError, "seed"),
    Api("RunConfig(device='tpu')", lambda: _run_config(device="tpu"), ValueError, "device"),
    Api("RunConfig(t1_bounds=(2, 1))", lambda: _run_config(t1_bounds=(2, 1)), ValueError, "t1_bounds"),
    Api("RunConfig(epochs=None)", lambda: _run_config(epochs=None), ValueError, "epochs"),
    Api("RunConfig(resume=True)", lambda: _run_config(resume=True), ValueError, "checkpoint"),
    Api(
        "RunConfig(checkpoint_every=0)",
        lambda: _run_config(checkpoint="c.pt", checkpoint_every=0),
        ValueError,
        "checkpoint_every",
    ),
    Api("RunConfig(model_kwargs=[1])", lambda: _run_config(model_kwargs=[1]), ValueError, "model_kwargs"),
    Api("RunConfig.from_dict({'lrr': 1})", lambda: _run_config().from_dict({"lrr": 1}), ValueError, "lrr"),
    Api(
        "RunConfig.from_file('settings.ini')",
        lambda: _run_config().from_file("settings.ini"),
        ValueError,
        "config",
    ),
    Api(
        "RunConfig.from_file('missing.toml')",
        lambda: _run_config().from_file("missing.toml"),
        ValueError,
        "config",
    ),
    Api(
        "RunConfig.from_file('bad_value.toml')",
        lambda: _run_config().from_file("bad_value.toml"),
        ValueError,
        "lr",
    ),
    # build_run and the tasks
    Api(
        "build_run(model_kwargs={'options': 5})",
        lambda: _build_run(model_kwargs={"options": 5}),
        ValueError,
        "options",
    ),
    Api(
        "build_run(model_kwargs={'width': 10**6})",
        lambda: _build_run(model_kwargs={"width": 10**6}),
        ValueError,
        "model_kwargs",
    ),
    Api(
        "build_run(model_kwargs={'widht': 8})",
        lambda: _build_run(model_kwargs={"widht": 8}),
        ValueError,
        "widht",
    ),
    Api(
        "build_run(task_kwargs={'nope': 1})", lambda: _build_run(task_kwargs={"nope": 1}), ValueError, "nope"
    ),
    Api("get_task('nope')", lambda: _task("nope"), ValueError, "nope"),
    Api(
        "get_task('digits', val_fraction=0.999)",
        lambda: _task("digits", val_fraction=0.999),
        ValueError,
        "val_fraction",
    ),
    Api(
        "get_task('digits', test_fraction=1.5)",
        lambda: _task("digits", test_fraction=1.5),
        ValueError,
        "test_fraction",
    ),
    Api(
        "get_task('digits', test_fraction=0.995)",
        lambda: _task("digits", test_fraction=0.995),
        ValueError,
        "test_fraction",
    ),
    Api("get_task('toy2d', dataset='nope')", lambda: _task("toy2d", dataset="nope"), ValueError, "dataset"),
    # ODEBlock
    Api("ODEBlock(t1=nan)", lambda: _block(t1=float("nan")), ValueError, "t1"),
    Api("ODEBlock(method='nope')", lambda: _block(method="nope"), ValueError, "method"),
    Api("ODEBlock(rtol=0)", lambda: _block(rtol=0.0), ValueError, "rtol"),
    Api("ODEBlock(max_nfe=0)", lambda: _block(max_nfe=0), ValueError, "max_nfe"),
    Api("ODEBlock(options=5)", lambda: _block(options=5), TypeError, "options"),
    Api("ODEBlock(options={'nope': 1})", lambda: _block(options={"nope": 1}), ValueError, "options"),
    Api(
        "ODEBlock(method='rk4', options={'step_size': -1})",
        lambda: _block(method="rk4", options={"step_size": -1}),
        ValueError,
        "step_size",
    ),
    # SNOpt
    Api("SNOpt(lr=-1)", lambda: _snopt(lr=-1), ValueError, "lr"),
    Api("SNOpt(momentum=5)", lambda: _snopt(momentum=5), ValueError, "momentum"),
    Api("SNOpt(weight_decay=-1)", lambda: _snopt(weight_decay=-1), ValueError, "weight_decay"),
    Api("SNOpt(damping=0)", lambda: _snopt(damping=0), ValueError, "damping"),
    Api("SNOpt(curvature='nope')", lambda: _snopt(curvature="nope"), ValueError, "curvature"),
    Api("SNOpt(update_freq=0)", lambda: _snopt(update_freq=0), ValueError, "update_freq"),
    # Controller
    Api("Controller(policy='nope')", lambda: _controller(policy="nope"), ValueError, "policy"),
    Api("Controller(lr=-1)", lambda: _controller(lr=-1.0), ValueError, "lr"),
    Api("Controller(every=0)", lambda: _controller(every=0), ValueError, "every"),
    Api("Controller(bounds=(2, 1))", lambda: _controller(bounds=(2.0, 1.0)), ValueError, "bounds"),
    Api("Controller(momentum=1.5)", lambda: _controller(momentum=1.5), ValueError, "momentum"),
    # fit
    Api("fit(epochs=0)", lambda: _fit(epochs=0), ValueError, "epochs"),
    Api("fit(empty train_loader)", lambda: _fit(train_loader=_loader(0)), ValueError, "train_loader"),
    Api("fit(empty val_loader)", lambda: _fit(val_loader=_loader(0)), ValueError, "val_loader"),
    Api("fit(checkpoint unwritable)", lambda: _fit(checkpoint="/proc/x/y.pt"), ValueError, "checkpoint"),
    Api(
        "fit(checkpoint_every=-1)",
        lambda: _fit(checkpoint="c.pt", checkpoint_every=-1),
        ValueError,
        "checkpoint_every",
    ),
    Api(
        "fit(checkpoint_every without checkpoint)", lambda: _fit(checkpoint_every=2), ValueError, "checkpoint"
    ),
    Api("fit(resume without checkpoint)", lambda: _fit(resume=True), ValueError, "checkpoint"),
    Api("fit(optimizer=None)", lambda: _fit(optimizer=None), TypeError, "optimizer"),
    Api("fit(device='cuda:99')", lambda: _fit(device="cuda:99"), ValueError, "device"),
    Api("fit(max_grad_norm=-1)", lambda: _fit(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    # the search space and budgets
    Api("SearchSpace(Float(2, 1))", lambda: _space({"t1": _float(2.0, 1.0)}), ValueError, "low"),
    Api(
        "SearchSpace(Float(0, 1, log=True))",
        lambda: _space({"lr": _float(0.0, 1.0, log=True)}),
        ValueError,
        "low",
    ),
    Api("Budget(nfe=-1)", lambda: _budget(nfe=-1), ValueError, "nfe"),
    Api("Budget(timeout=nan)", lambda: _budget(timeout=float("nan")), ValueError, "timeout"),
    Api("Budget(n_trials=0)", lambda: _budget(n_trials=0), ValueError, "n_trials"),
    Api("SearchSpace({})", lambda: _space({}), ValueError, "empty"),
    Api(
        "SearchSpace(tol and rtol)",
        lambda: _space({"tol": _float(1e-3, 1e-2), "rtol": _float(1e-3, 1e-2)}),
        ValueError,
        "rtol",
    ),
    Api(
        "SearchSpace(t1 and t1/blocks.0)",
        lambda: _space({"t1": _float(0.5, 1.0), "t1/blocks.0": _float(0.5, 1.0)}),
        ValueError,
        "t1/blocks.0",
    ),
    Api(
        "SearchSpace.parse('t1=a:b')",
        lambda: _space({"t1": _float(1, 2)}).parse("t1=a:b"),
        ValueError,
        "t1=a:b",
    ),
    # create_study, load_study, compare
    Api("create_study(strategy='nope')", lambda: _study(strategy="nope"), ValueError, "strategy"),
    Api("create_study(storage='foo://x')", lambda: _study(storage="foo://x"), ValueError, "storage"),
    Api(
        "create_study(space bogus)",
        lambda: _study(space=_space({"bogus": _float(1, 2)})),
        ValueError,
        "bogus",
    ),
    Api(
        "create_study(space width huge)",
        lambda: _study(space=_space({"width": _int(4, 10**9)})),
        ValueError,
        "width",
    ),
    Api(
        "create_study(space batch_size 0)",
        lambda: _study(space=_space({"batch_size": _int(0, 5)})),
        ValueError,
        "batch_size",
    ),
    Api(
        "create_study(RunConfig(checkpoint=...))",
        lambda: _study(task=_run_config(checkpoint="ck.pt", resume=True)),
        ValueError,
        "checkpoint",
    ),
    Api("create_study(task='nope')", lambda: _study(task="nope"), ValueError, "task"),
    Api("create_study(pruner='nope')", lambda: _study(pruner="nope"), ValueError, "pruner"),
    Api(
        "resolve_storage(port 99999)",
        lambda: _resolve_storage("postgresql://u:p@h:99999/db"),
        ValueError,
        "storage",
    ),
    Api(
        "resolve_storage(bad port)",
        lambda: _resolve_storage("postgresql://u:p@h:x/db"),
        ValueError,
        "storage",
    ),
    Api(
        "resolve_storage(sqlite memory)",
        lambda: _resolve_storage("sqlite:///:memory:"),
        ValueError,
        "storage",
    ),
    Api(
        "load_study(missing SQLite file)",
        lambda: _load_study("x", "sqlite:///missing.db"),
        ValueError,
        "storage",
    ),
    Api("compare(seeds=[1, 1])", lambda: _compare(seeds=[1, 1], output_dir="report"), ValueError, "seeds"),
    Api("compare(epsilon=-1)", lambda: _compare(epsilon=-1.0, output_dir="report"), ValueError, "epsilon"),
    Api("compare(output_dir=a file)", lambda: _compare(output_dir="afile"), ValueError, "output_dir"),
    Api(
        "compare(objectives=['nfe'])",
        lambda: _compare(objectives=["nfe"], output_dir="report"),
        ValueError,
        "objectives",
    ),
    # tracking
    Api("sync_fallback(a file)", lambda: _tracking("sync_fallback", "afile"), ValueError, "directory"),
    Api(
        "MlflowCallback(tracking_uri='foo://x')",
        lambda: _tracking("MlflowCallback", tracking_uri="foo://x"),
        ValueError,
        "tracking_uri",
    ),
    Api(
        "MlflowCallback(experiment='')",
        lambda: _tracking("MlflowCallback", experiment=""),
        ValueError,
        "experiment",
    ),
    Api("StudyTracker(kind='nope')", lambda: _tracking("StudyTracker", kind="nope"), ValueError, "kind"),
    Api(
        "StudyTracker(log_models='some')",
        lambda: _tracking("StudyTracker", log_models="some"),
        ValueError,
        "log_models",
    ),
    # checkpoints: data, never code
    Api(
        "read_checkpoint(raw pickle)",
        lambda: _read_checkpoint_file("raw.pt"),
        ValueError,
        "holds objects other",
    ),
    Api("read_checkpoint(empty file)", lambda: _read_checkpoint("e.pt", b""), ValueError, "checkpoint"),
    Api(
        "read_checkpoint(truncated)",
        lambda: _read_checkpoint("t.pt", b"PK\x03\x04trunc"),
        ValueError,
        "checkpoint",
    ),
    Api("read_checkpoint(missing)", lambda: _read_checkpoint_missing(), ValueError, "checkpoint"),
]


def _load_study(name: str, storage: str) -> Any:
    from snopt.search import load_study

    return load_study(name, storage)


def _resolve_storage(url: str) -> Any:
    from snopt.search import resolve_storage

    return resolve_storage(url)


def _read_checkpoint_file(name: str) -> Any:
    from snopt._checkpoint import read_checkpoint

    return read_checkpoint(name)


def _read_checkpoint_missing() -> Any:
    from snopt._checkpoint import read_checkpoint

    return read_checkpoint("missing.pt")


# --------------------------------------------------------------------------- the checks
@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The test's folder (already the working directory) with :data:`FILES` in it."""
    for name, content in FILES.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return tmp_path


class WorkStarted(BaseException):
    """A refused input got as far as training, a trial or a server (a BaseException: nothing catches it)."""


@pytest.fixture
def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row must be refused before any work: training, a trial or the UI's server fails the row."""
    import snopt.search._objective

    import snopt._training

    def started(*args: Any, **kwargs: Any) -> None:
        raise WorkStarted("a bad input was not refused before the work started")

    monkeypatch.setattr(snopt._training.Trainer, "run", started)
    monkeypatch.setattr(snopt.search._objective.TrainingObjective, "__call__", started)
    monkeypatch.setattr(subprocess, "Popen", started)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _main(args: str) -> int:
    from snopt.cli import main

    try:
        return main(shlex.split(args))
    except SystemExit as exc:  # argparse's errors exit as the installed command does
        return int(exc.code or 0)


@pytest.mark.usefixtures("_no_work")
@pytest.mark.parametrize("row", CLI, ids=[row.args for row in CLI])
def test_cli_row(row: Cli, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if row.skip:
        pytest.skip(row.skip)
    before = _files(workdir)
    code = _main(row.args)
    out, err = capsys.readouterr()
    assert code == row.code, (out, err)
    assert row.names in err, err
    assert "Traceback" not in out + err
    assert _files(workdir) == before, sorted(_files(workdir) - before)


@pytest.mark.usefixtures("_no_work")
@pytest.mark.parametrize("row", API, ids=[row.label for row in API])
def test_api_row(row: Api, workdir: Path) -> None:
    before = _files(workdir)
    with pytest.raises(row.error) as caught:
        row.call()
    assert row.names in str(caught.value), str(caught.value)
    assert _files(workdir) == before, sorted(_files(workdir) - before)


#: Rows also run through the installed ``snopt`` command (one per subcommand, and the slow paths).
SUBPROCESS = [
    "train --lr -1",
    "train --model-kwargs width=100000",
    "train --checkpoint raw.pt --resume",
    "search --space t1=0.5:2,t1/blocks.0=0.5:2",
    "search --total n_trials=0",
    "compare --seeds 1,1",
    "worker --study x --storage sqlite:///missing.db",
    "tracking sync --dir afile",
    "ui --port 0",
]


@pytest.mark.integration
def test_cli_rows_in_a_subprocess(workdir: Path) -> None:
    exe = Path(sys.executable).parent / "snopt"
    rows = {row.args: row for row in CLI}
    for args in SUBPROCESS:
        row = rows[args]
        before = _files(workdir)
        out = subprocess.run([str(exe), *shlex.split(args)], capture_output=True, text=True, timeout=120)
        assert out.returncode == row.code, (args, out.stderr)
        assert row.names in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stdout + out.stderr, args
        assert _files(workdir) == before, (args, sorted(_files(workdir) - before))


def test_the_table_is_large() -> None:
    assert len(CLI) + len(API) >= 100
    assert len({row.args for row in CLI}) == len(CLI) and len({row.label for row in API}) == len(API)
