"""Building and training the run a :class:`~snopt._config.RunConfig` describes.

``build_run`` turns a configuration into the task, the data, the model, the optimizer and
the controller; ``run_training`` trains it with :func:`snopt.fit`.  The configuration itself
lives in :mod:`snopt._config` (importable without torch).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._config import RunConfig
from ._ode import ode_blocks
from ._training import Callback, FitResult, fit
from .control import Controller

__all__ = [
    "MAX_PARAMETERS",
    "Run",
    "RunConfig",
    "build_controller",
    "build_optimizer",
    "build_run",
    "check_model_size",
    "run_training",
]


def build_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The parameter optimizer named by ``config.optimizer``."""
    config = config.resolved()
    lr = config.resolved_lr
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=_momentum(config), weight_decay=config.weight_decay
        )
    from ._optimizer import SNOpt

    return SNOpt(
        model,
        lr=lr,
        momentum=_momentum(config),
        weight_decay=config.weight_decay,
        curvature=config.snopt_curvature,
        damping=config.snopt_damping,
        eps=config.snopt_eps,
        update_freq=config.snopt_update_freq,
        update_growth=config.snopt_update_growth,
        alpha=config.snopt_alpha,
        sample_step=config.snopt_sample_step,
        full_precond=config.snopt_full_precond,
    )


def _momentum(config: RunConfig) -> float:
    momentum = config.resolved().momentum
    if momentum is None:
        raise ValueError(f"The optimizer {config.optimizer!r} takes no momentum.")
    return momentum


def build_controller(config: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """The horizon controller, or None for a fixed horizon."""
    if config.control == "fixed":
        return None
    return Controller(
        model,
        policy=config.control,
        lr=config.t1_lr,
        penalty=config.t1_penalty,
        cost=config.t1_cost,
        every=config.t1_every,
        bounds=config.t1_bounds,
        optimizer=optimizer,
        momentum=config.t1_momentum,
        max_step=config.t1_max_step,
        warmup=config.t1_warmup,
        curvature=config.t1_curvature,
        feedback=config.t1_feedback,
    )


@dataclass
class Run:
    """The objects a :class:`RunConfig` resolves to, before training."""

    config: RunConfig
    task: Any
    model: torch.nn.Module
    train_loader: Any
    val_loader: Any
    optimizer: torch.optim.Optimizer
    controller: Any


#: Model arguments that have a RunConfig setting of their own (``--t1``, ``--method``...).
_MODEL_SETTINGS = ("t1", "method", "rtol", "atol", "adjoint", "max_nfe")


#: The most parameters a model of a built-in task may have: 1e8 is 400 MB of float32 weights,
#: about 1.6 GB with gradients and Adam's moments, and thousands of times the default models
#: (digits at width 1024 has 1.9e7).  A larger size is a typo, not a model this tool trains well.
MAX_PARAMETERS = 10**8


def check_model_size(config: RunConfig, task: Any, model_kwargs: Mapping[str, Any] | None = None) -> int:
    """Build the model on torch's meta device (no memory, no random draws) and return its size.

    Args:
        config: the run (its solver settings and, unless ``model_kwargs``, its model arguments).
        task: the built task.
        model_kwargs: model arguments to try instead of ``config.model_kwargs``.

    Raises:
        ValueError: the model refuses the arguments, or would have more than
            :data:`MAX_PARAMETERS` parameters (the message names ``model_kwargs``).
    """
    kwargs = dict(config.model_kwargs if model_kwargs is None else model_kwargs)
    settings = {name: getattr(config, name) for name in _MODEL_SETTINGS if name != "max_nfe"}
    try:
        with torch.device("meta"):
            model = task.build_model(**settings, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`model_kwargs` {kwargs} do not build the {config.task} model: {exc}") from None
    except RuntimeError:  # torch cannot even size it (a tensor of more than 2**63 bytes)
        size = math.inf
    else:
        size = sum(p.numel() for p in model.parameters())
    if size > MAX_PARAMETERS:
        count = "more than torch can count" if math.isinf(size) else f"{size:.3g}"
        raise ValueError(
            f"`model_kwargs` must give a model of at most {MAX_PARAMETERS:.0e} parameters, but "
            f"model_kwargs={kwargs} gives the {config.task} model {count} parameters; choose a smaller size."
        )
    return int(size)


def build_run(config: RunConfig) -> Run:
    """Build task, data, model, optimizer and controller of ``config`` (seeded).

    Raises:
        ValueError: ``task_kwargs`` or ``model_kwargs`` name an argument the task or its model
            does not take, or give a model larger than :data:`MAX_PARAMETERS` (checked before
            anything is built).
    """
    from . import _checks as check
    from ._tasks import _TASK_CLASSES, get_task
    from ._training import seed_everything

    check.keywords(
        "task_kwargs", config.task_kwargs, _TASK_CLASSES[config.task], owner=f"the {config.task} task"
    )
    seed_everything(config.seed)
    task = get_task(config.task, **config.task_kwargs)
    check.keywords(
        "model_kwargs",
        config.model_kwargs,
        task.build_model,
        reserved=_MODEL_SETTINGS,
        owner=f"the {config.task} model",
    )
    check_model_size(config, task)
    model = task.build_model(
        t1=config.t1,
        method=config.method,
        rtol=config.rtol,
        atol=config.atol,
        adjoint=config.adjoint,
        **config.model_kwargs,
    )
    for _, block in ode_blocks(model):
        block.max_nfe = config.max_nfe
    train_loader, val_loader = task.loaders(config.batch_size, seed=config.seed)
    optimizer = build_optimizer(config, model)
    controller = build_controller(config, model, optimizer)
    return Run(config, task, model, train_loader, val_loader, optimizer, controller)


def run_training(
    config: RunConfig,
    *,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    run: Run | None = None,
    interrupt_checkpoint: str | os.PathLike | None = None,
) -> FitResult:
    """Train the run described by ``config`` and return its :class:`FitResult`.

    ``interrupt_checkpoint``: where the run saves itself on Ctrl-C or SIGTERM when
    ``config.checkpoint`` is None (see :func:`snopt.fit`).
    """
    run = run or build_run(config)
    return fit(
        run.model,
        run.train_loader,
        run.val_loader,
        optimizer=run.optimizer,
        task=run.task,
        epochs=config.epochs,
        max_steps=config.max_steps,
        controller=run.controller,
        callbacks=callbacks,
        eval_every=config.eval_every,
        checkpoint=config.checkpoint,
        checkpoint_every=config.checkpoint_every,
        resume=config.resume,
        seed=None,
        device=config.device,
        max_grad_norm=config.max_grad_norm,
        progress=progress,
        interrupt_checkpoint=interrupt_checkpoint,
    )
