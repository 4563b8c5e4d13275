"""One resolved run configuration and the function that trains it.

``RunConfig`` is the single description of a training run shared by the CLI, the
studies in ``snopt.search`` and the benchmarks; ``run_training`` builds the task, the
model, the optimizer and the controller from it and calls :func:`snopt.fit`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ._control import COSTS, POLICIES, Controller, check_max_step, check_momentum, check_warmup
from ._training import Callback, FitResult, fit

OPTIMIZERS = ("adam", "sgd", "snopt")
CONTROL_POLICIES = POLICIES
#: Learning rates used when ``RunConfig.lr`` is None.
DEFAULT_LR = {"adam": 1e-2, "sgd": 0.1, "snopt": 1e-2}


@dataclass
class RunConfig:
    """Everything that defines a training run, with validated values.

    Attributes:
        task: built-in task name (``digits``, ``toy2d``, ``timeseries``).
        task_kwargs: extra arguments of the task (e.g. ``{"dataset": "two_moons"}``).
        model_kwargs: extra arguments of ``task.build_model`` (e.g. ``{"width": 32}``).
        t1: initial integration horizon of every ODE block.
        method, rtol, atol, adjoint: solver settings of every ODE block.
        optimizer: ``adam``, ``sgd`` or ``snopt``.
        lr: learning rate (None: :data:`DEFAULT_LR` of the optimizer).
        momentum, weight_decay: for SGD and SNOpt (weight decay for Adam too).
        snopt_eps, snopt_update_freq, snopt_alpha, snopt_sample_step, snopt_full_precond:
            SNOpt's hyperparameters.
        control: ``fixed``, ``gradient`` or ``feedback`` policy for the horizons.
        t1_lr, t1_penalty, t1_cost, t1_every, t1_bounds: the controller's settings
            (``t1_lr`` None: the policy's own default, :data:`snopt._control.DEFAULT_LR`).
        t1_momentum, t1_max_step, t1_warmup: the controller's running-average momentum, its
            trust region (None: none) and the steps before its first estimate (see
            :class:`snopt.Controller`).
        epochs, max_steps, batch_size, eval_every: the training budget.
        seed, device, checkpoint, resume, max_grad_norm: run settings.
    """

    task: str = "digits"
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    t1: float = 1.0
    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-3
    adjoint: bool = True
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    snopt_eps: float = 0.05
    snopt_update_freq: int = 100
    snopt_alpha: float = 0.75
    snopt_sample_step: float = 0.01
    snopt_full_precond: bool = True
    control: str = "fixed"
    t1_lr: float | None = None
    t1_penalty: float = 1e-3
    t1_cost: str = "quadratic"
    t1_every: int = 50
    t1_bounds: tuple[float, float] | None = None
    t1_momentum: float = 0.9
    t1_max_step: float | None = 1.0
    t1_warmup: int = 0
    epochs: int | None = 3
    max_steps: int | None = None
    batch_size: int = 64
    eval_every: int | None = None
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    resume: bool = False
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {list(OPTIMIZERS)}, but got {self.optimizer!r}.")
        if self.control not in CONTROL_POLICIES:
            raise ValueError(f"`control` must be one of {list(CONTROL_POLICIES)}, but got {self.control!r}.")
        if self.t1_cost not in COSTS:
            raise ValueError(f"`t1_cost` must be one of {list(COSTS)}, but got {self.t1_cost!r}.")
        if self.t1_lr is not None and not (math.isfinite(self.t1_lr) and self.t1_lr > 0):
            raise ValueError(f"`t1_lr` must be a positive number or None, but got t1_lr={self.t1_lr}.")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`lr` must be a positive number, but got lr={self.lr}.")
        if not (math.isfinite(self.t1) and self.t1 > 0):
            raise ValueError(f"`t1` must be a positive number, but got t1={self.t1}.")
        for name in ("batch_size",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, but got {name}={value!r}.")
        if self.t1_bounds is not None:
            self.t1_bounds = (float(self.t1_bounds[0]), float(self.t1_bounds[1]))
        # The controller's own checks, under this config's names, so that a bad setting fails
        # before any data is loaded.
        self.t1_momentum = check_momentum("t1_momentum", self.t1_momentum)
        self.t1_max_step = check_max_step("t1_max_step", self.t1_max_step)
        self.t1_warmup = check_warmup("t1_warmup", self.t1_warmup)

    @property
    def resolved_lr(self) -> float:
        """The learning rate actually used."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (with the resolved learning rate)."""
        data = asdict(self)
        data["lr"] = self.resolved_lr
        if self.t1_bounds is not None:
            data["t1_bounds"] = list(self.t1_bounds)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a dict; unknown keys are an error that lists the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"Unknown RunConfig keys {unknown}; valid keys are {sorted(valid)}.")
        data = dict(data)
        if data.get("t1_bounds") is not None:
            data["t1_bounds"] = tuple(data["t1_bounds"])
        return cls(**data)


def build_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The parameter optimizer named by ``config.optimizer``."""
    lr = config.resolved_lr
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    from ._optimizer import SNOpt

    return SNOpt(
        model,
        lr=lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        eps=config.snopt_eps,
        update_freq=config.snopt_update_freq,
        alpha=config.snopt_alpha,
        sample_step=config.snopt_sample_step,
        full_precond=config.snopt_full_precond,
    )


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


def build_run(config: RunConfig) -> Run:
    """Build task, data, model, optimizer and controller of ``config`` (seeded)."""
    from ._tasks import get_task
    from ._training import seed_everything

    seed_everything(config.seed)
    task = get_task(config.task, **config.task_kwargs)
    model = task.build_model(
        t1=config.t1,
        method=config.method,
        rtol=config.rtol,
        atol=config.atol,
        adjoint=config.adjoint,
        **config.model_kwargs,
    )
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
) -> FitResult:
    """Train the run described by ``config`` and return its :class:`FitResult`."""
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
        resume=config.resume,
        seed=None,
        device=config.device,
        max_grad_norm=config.max_grad_norm,
        progress=progress,
    )
