"""The training loop: ``fit`` and the ``Trainer`` behind it.

One step is: forward solve -> loss -> backward (adjoint solve, which also feeds any
curvature collector) -> optional preconditioner -> optimizer step -> optional
controller step (horizons and other control variables).  Evaluation time is kept out
of the wall-clock; checkpoints hold everything needed to resume exactly (model,
optimizer, controller, scheduler, RNG states and the position in the data order).
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec

import numpy as np
import torch
from torch import Tensor, nn

from ._checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    check_matches,
    read_checkpoint,
    write_checkpoint,
)
from ._checks import device as check_device
from ._checks import writable_file
from ._ode import SolverError, as_solver_error, ode_blocks
from ._progress import progress_bar
from ._signals import Terminated as Terminated  # re-exported: it was defined here first
from ._signals import signal_name, terminate_as_interrupt

_P = ParamSpec("_P")


class Status(str, enum.Enum):
    """How a training run ended; :attr:`FitResult.status` holds one.

    A ``str`` enum, so ``result.status == "completed"`` and JSON both work.  The MLflow and
    Optuna callbacks map these in one place each.
    """

    COMPLETED = "completed"
    """Every planned step ran."""
    INTERRUPTED = "interrupted"
    """Stopped by Ctrl-C or SIGTERM; a checkpoint was saved."""
    FAILED = "failed"
    """A solver failure, a non-finite loss or an exception in the loop."""
    PRUNED = "pruned"
    """A callback stopped it as not promising (an Optuna pruner, say)."""
    BUDGET = "budget"
    """A callback stopped it because a budget (work, NFE, time) ran out."""

    @property
    def description(self) -> str:
        """One line on what the status means."""
        return _STATUS_DESCRIPTIONS[self]

    def __str__(self) -> str:
        return self.value


_STATUS_DESCRIPTIONS = {
    Status.COMPLETED: "every planned step ran",
    Status.INTERRUPTED: "stopped by Ctrl-C or SIGTERM; a checkpoint was saved",
    Status.FAILED: "a solver failure, a non-finite loss or an error in the loop",
    Status.PRUNED: "stopped by a callback as not promising",
    Status.BUDGET: "stopped by a callback because a budget ran out",
}


class StopTraining(Exception):
    """Raised by a callback to end training early, with a status and a reason.

    The trainer catches it, ends the run with ``status`` (the result is returned, not
    raised) and calls every callback's ``on_fit_end``.  Optuna's pruning callback raises it
    with :attr:`Status.PRUNED` and turns the result into ``optuna.TrialPruned`` outside the
    loop, so that training knows nothing of Optuna.

    Args:
        status: :attr:`Status.PRUNED` or :attr:`Status.BUDGET`.
        message: why training stopped.
    """

    def __init__(self, status: Status | str, message: str = "") -> None:
        status = Status(status)
        if status not in (Status.PRUNED, Status.BUDGET):
            raise ValueError(
                f"`status` of StopTraining must be 'pruned' or 'budget', but got {status.value!r}."
            )
        super().__init__(message)
        self.status = status
        self.message = message


class TrainingError(RuntimeError):
    """Training stopped on an error; ``result`` holds what was done until then."""

    def __init__(self, message: str, result: FitResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite."""


@dataclass
class FitResult:
    """What a training run produced.

    Attributes:
        status: how the run ended, a :class:`Status` (``"completed"``, ``"interrupted"``,
            ``"failed"``, ``"pruned"`` or ``"budget"``).
        message: why the run ended, when it did not complete.
        history: one dict per step (step, epoch, wall_time, train_loss, lr, nfe_forward,
            nfe_backward, ``t1/<block>`` for every ODE block, controller values) with
            ``val_loss`` and ``metric`` on evaluation steps.
        final: the last evaluation (``val_loss``, ``metric``) and the last train loss.
        stats: totals (steps, NFE forward/backward, wall-clock without evaluation,
            evaluation time) and the optimizer's and controller's own stats.
        checkpoint: path of the last checkpoint written, if any.
        signal: the signal that interrupted the run (``"SIGTERM"``, ``"SIGINT"``), else None.
    """

    status: Status
    message: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    signal: str | None = None

    def to_dict(self, metric_name: str = "metric") -> dict[str, Any]:
        """A JSON-serialisable dict of the result.

        Args:
            metric_name: the name of ``metric`` in ``final`` and ``history``: the task's
                (``task.metric_name``: ``"accuracy"``, ``"mse"``, ``"nll"``); the dict says
                it again as ``"metric_name"``.
        """

        def named(record: dict[str, Any]) -> dict[str, Any]:
            return {metric_name if key == "metric" else key: value for key, value in record.items()}

        return {
            "status": str(self.status),
            "message": self.message,
            "metric_name": metric_name,
            "final": named(self.final),
            "stats": jsonable(self.stats),
            "checkpoint": self.checkpoint,
            "signal": self.signal,
            "history": [named(record) for record in self.history],
        }


def jsonable(value: Any) -> Any:
    """``value`` with tensors, numpy scalars and tuples made plain JSON data (dict keys as str)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


class Callback:
    """Hooks into the training loop; override what you need.

    A callback stops training early by raising :class:`StopTraining` with a status.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once before the first step (also when resuming)."""

    def on_step_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        """Called after every optimizer (and controller) step with the step's record."""

    def on_evaluate(self, trainer: Trainer, record: dict[str, float]) -> None:
        """Called after an evaluation; ``record`` holds ``val_loss`` and ``metric``."""

    def on_checkpoint(self, trainer: Trainer, path: str) -> None:
        """Called after a checkpoint was written to ``path``."""

    def on_solve(self, trainer: Trainer) -> None:
        """Called every :data:`SOLVE_CHECK_EVERY` field evaluations inside the ODE solves.

        In the forward solve and in the adjoint backward, of training steps and evaluations
        alike: raise :class:`StopTraining` here to stop a long solve where a budget runs out,
        instead of after the step.  :attr:`Trainer.nfe_so_far` counts the step's evaluations
        so far.  It runs inside the solver, so keep it cheap (no host syncs).
        """

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        """Called once at the end, whatever the status."""


#: Field evaluations between two :meth:`Callback.on_solve` calls.
SOLVE_CHECK_EVERY = 8


class _Objective:
    """Loss and evaluation, from a task or from ``loss_fn``/``metric_fn``."""

    def __init__(self, task: Any, loss_fn: Callable | None, metric_fn: Callable | None) -> None:
        if task is None and loss_fn is None:
            raise ValueError("Either `task` or `loss_fn` must be given.")
        if task is not None and loss_fn is not None:
            raise ValueError("Give either `task` or `loss_fn`, not both.")
        self.task = task
        self.loss_fn = loss_fn
        self.metric_fn = metric_fn

    def to(self, batch: Any, device: torch.device) -> Any:
        if self.task is not None:
            return self.task.batch_to(batch, device)
        return [b.to(device) if isinstance(b, Tensor) else b for b in batch]

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        if self.task is not None:
            return self.task.loss(model, batch)
        x, y = batch[0], batch[1]
        return self.loss_fn(model(x), y)  # type: ignore[misc]

    def evaluate(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        if self.task is not None:
            return dict(self.task.evaluate(model, loader))
        was_training = model.training
        model.eval()
        total, metric, n = 0.0, 0.0, 0
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for batch in loader:
                    x, y = (b.to(device) for b in batch[:2])
                    out = model(x)
                    k = len(y)
                    total += float(self.loss_fn(out, y)) * k  # type: ignore[misc]
                    if self.metric_fn is not None:
                        metric += float(self.metric_fn(out, y)) * k
                    n += k
        finally:
            model.train(was_training)
        if n == 0:
            raise ValueError("`val_loader` yielded no samples; give a loader with data or None.")
        result = {"val_loss": total / n}
        result["metric"] = metric / n if self.metric_fn is not None else total / n
        return result


def _check_positive_int(name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, but got {name}={value!r}.")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None picks CUDA when available; otherwise the named device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(check_device("device", device))
    missing = _missing_device(dev)
    if missing:
        raise ValueError(
            f"`device` must be a device this machine has, but got device={str(device)!r} ({missing}); "
            "use 'cpu' or 'auto'."
        )
    return dev


def _missing_device(dev: torch.device) -> str:
    """Why ``dev`` is not on this machine ("" when it is)."""
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA devices"
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available"
    return ""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors and plain data (a checkpoint loads with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in mt.tolist()), gauss))
    npy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npy["bit_generator"],
            "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _loader_generator(loader: Any) -> torch.Generator | None:
    gen = getattr(loader, "generator", None)
    if gen is None:
        gen = getattr(getattr(loader, "sampler", None), "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


def _check_trainer_args(
    train_loader: Iterable,
    val_loader: Iterable | None,
    optimizer: Any,
    epochs: int | None,
    max_steps: int | None,
    eval_every: int | None,
    checkpoint: str | os.PathLike | None,
    checkpoint_every: int | None,
    resume: bool,
    max_grad_norm: float | None,
) -> None:
    """The :class:`Trainer`'s arguments, checked before any work (the checkpoint path writable)."""
    if epochs is None and max_steps is None:
        raise ValueError("One of `epochs` or `max_steps` must be given.")
    _check_positive_int("epochs", epochs)
    _check_positive_int("max_steps", max_steps)
    _check_positive_int("eval_every", eval_every)
    _check_positive_int("checkpoint_every", checkpoint_every)
    if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"`max_grad_norm` must be a positive number, but got max_grad_norm={max_grad_norm}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, but got {type(optimizer).__name__}.")
    if resume and checkpoint is None:
        raise ValueError("`resume=True` needs a `checkpoint` path.")
    if checkpoint_every is not None and checkpoint is None:
        raise ValueError("`checkpoint_every` needs a `checkpoint` path, but checkpoint is None.")
    if checkpoint is not None:
        writable_file("checkpoint", checkpoint)
    for name, loader in (("train_loader", train_loader), ("val_loader", val_loader)):
        if loader is not None and _safe_len(loader) == 0:
            raise ValueError(f"`{name}` must yield at least one batch, but it is empty (len({name}) == 0).")


class Trainer:
    """Runs the training loop; :func:`fit` is the usual way in.

    See :func:`fit` for the arguments.  During training the attributes ``step``,
    ``epoch``, ``history``, ``model``, ``optimizer`` and ``controller`` are readable by
    callbacks.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        *,
        optimizer: torch.optim.Optimizer,
        task: Any = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        metric_fn: Callable[[Any, Any], Any] | None = None,
        epochs: int | None = None,
        max_steps: int | None = None,
        controller: Any = None,
        preconditioner: Any = None,
        scheduler: Any = None,
        callbacks: Sequence[Callback] = (),
        eval_every: int | None = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
        seed: int | None = None,
        device: str | torch.device | None = "cpu",
        max_grad_norm: float | None = None,
        progress: bool = True,
        interrupt_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        """Store the arguments (checked by ``_check_trainer_args``) and zero the run's counters.

        Over 60 lines only because it stores 21 arguments and 15 counters, one per line.
        """
        _check_trainer_args(
            train_loader,
            val_loader,
            optimizer,
            epochs,
            max_steps,
            eval_every,
            checkpoint,
            checkpoint_every,
            resume,
            max_grad_norm,
        )
        self.objective = _Objective(task, loss_fn, metric_fn)
        self.model = model
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.optimizer = optimizer
        self.controller = controller
        self.preconditioner = preconditioner
        self.scheduler = scheduler
        self.callbacks = list(callbacks)
        self.epochs = epochs
        self.max_steps = max_steps
        self.eval_every = eval_every
        self.checkpoint_path = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.seed = seed
        self.device = resolve_device(device)
        self.max_grad_norm = max_grad_norm
        self.progress = progress
        self.interrupt_path = Path(interrupt_checkpoint) if interrupt_checkpoint is not None else None

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, float]] = []
        self.train_time = 0.0
        self.eval_time = 0.0
        self.totals = {"nfe_forward": 0, "nfe_backward": 0, "steps_forward": 0, "steps_backward": 0}
        self.last_eval: dict[str, float] = {}
        self.last_checkpoint: str | None = None
        self._epoch_rng: dict[str, Any] | None = None
        # Field evaluations of the training step under way, and its blocks' counts at its start.
        self._live_nfe = 0
        self._step_start: list[tuple[Any, dict[str, int]]] | None = None
        self._solve_calls = 0

    # ----------------------------------------------------------------- helpers
    @property
    def total_steps(self) -> int | None:
        """Steps the run will take, where known."""
        per_epoch = _safe_len(self.train_loader)
        by_epochs = self.epochs * per_epoch if (self.epochs and per_epoch) else None
        if self.max_steps is None:
            return by_epochs
        return self.max_steps if by_epochs is None else min(self.max_steps, by_epochs)

    @property
    def nfe_so_far(self) -> int:
        """Training NFE (forward plus backward) of the run so far, the step under way included."""
        return self.totals["nfe_forward"] + self.totals["nfe_backward"] + self._live_nfe

    def _stop_check(self, block: Any) -> None:
        """The blocks' ``stop_check`` while training: count, and ask the callbacks now and then."""
        if block.training:
            self._live_nfe += 1
        self._solve_calls += 1
        if self._solve_calls % SOLVE_CHECK_EVERY == 0:
            for cb in self.callbacks:
                cb.on_solve(self)

    @property
    def metric_name(self) -> str:
        """The task's name for ``metric`` (``accuracy``, ``mse``, ``nll``); ``metric`` without a task."""
        return str(getattr(self.objective.task, "metric_name", None) or "metric")

    def horizons(self) -> dict[str, float]:
        """``t1/<block name>`` -> current horizon, for every ODE block of the model."""
        return {_t1_key(name): block.t1 for name, block in ode_blocks(self.model)}

    def _done(self) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            return True
        return self.epochs is not None and self.epoch >= self.epochs

    def _batches(self) -> Iterator[Any]:
        """Yields batches epoch after epoch, recording the RNG needed to replay an epoch."""
        skip = self.batch_in_epoch
        while not self._done():
            if skip and self._epoch_rng is not None:
                resume_rng = _rng_state()
                _set_rng_state(self._epoch_rng["rng"])
                gen = _loader_generator(self.train_loader)
                if gen is not None and self._epoch_rng.get("loader") is not None:
                    gen.set_state(self._epoch_rng["loader"])
                iterator = iter(self.train_loader)
                for _ in range(skip):
                    next(iterator)
                _set_rng_state(resume_rng)
            else:
                gen = _loader_generator(self.train_loader)
                self._epoch_rng = {
                    "rng": _rng_state(),
                    "loader": gen.get_state() if gen is not None else None,
                }
                self.batch_in_epoch = 0
                iterator = iter(self.train_loader)
            skip = 0
            yielded = False
            for batch in iterator:
                yielded = True
                yield batch
                if self._done():
                    return
            if not yielded and self.batch_in_epoch == 0:
                raise ValueError("`train_loader` yielded no batch in an epoch; give a loader with data.")
            self.epoch += 1
            self.batch_in_epoch = 0
            self._on_epoch_end()

    def _on_epoch_end(self) -> None:
        if self.val_loader is not None and self.eval_every is None and self.history:
            self._evaluate(self.history[-1])
        if self.checkpoint_path is not None:
            self.save_checkpoint(self.checkpoint_path)

    def _evaluate(self, record: dict[str, float]) -> None:
        if self.val_loader is None or "val_loss" in record:
            return
        start = time.perf_counter()
        # Evaluation must not move the training RNG, or a resumed run would diverge.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            metrics = self.objective.evaluate(self.model, self.val_loader)
        self.eval_time += time.perf_counter() - start
        record.update(metrics)
        self.last_eval = dict(metrics)
        for cb in self.callbacks:
            cb.on_evaluate(self, record)

    # ------------------------------------------------------------- one step
    def _train_step(self, batch: Any) -> dict[str, float]:
        model, optimizer = self.model, self.optimizer
        model.train()
        batch = self.objective.to(batch, self.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for _, block in ode_blocks(model):
            block.zero_t1_grad()
        self._step_start = [(b, {k: getattr(b.totals, k) for k in _COUNTED}) for _, b in ode_blocks(model)]
        self._live_nfe = 0
        loss = self.objective.loss(model, batch)
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"The training loss became {float(loss)} at step {self.step + 1} (epoch {self.epoch + 1}). "
                "Lower the learning rate, clip gradients (`max_grad_norm`), tighten rtol/atol or bound t1."
            )
        loss.backward()
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
        if self.preconditioner is not None:
            self.preconditioner.step()
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.controller is not None:
            # The closure recomputes this batch's loss; the controller calls it on update steps.
            self.controller.step(lambda: self.objective.loss(model, batch))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_time += time.perf_counter() - start
        self.step += 1
        self.batch_in_epoch += 1
        record: dict[str, float] = {
            "step": self.step,
            "epoch": self.epoch + self.batch_in_epoch / max(_safe_len(self.train_loader) or 1, 1),
            "wall_time": self.train_time,
            "train_loss": float(loss.detach()),
            "lr": lr,
        }
        nfe = self._settle_step_counts()
        record["nfe_forward"] = nfe["nfe_forward"]
        record["nfe_backward"] = nfe["nfe_backward"]
        record["nfe_total"] = self.totals["nfe_forward"] + self.totals["nfe_backward"]
        record.update(self.horizons())
        if self.controller is not None:
            record.update({k: float(v) for k, v in self.controller.values.items()})
        return record

    def _settle_step_counts(self) -> dict[str, int]:
        """Add the step's counts to :attr:`totals` (also for a step stopped mid-solve); return them.

        The blocks' cumulative counts over the step: every call of a block counts (an ODE-RNN
        calls its block once per observation; ``block.stats`` holds the last call).
        """
        nfe = dict.fromkeys(_COUNTED, 0)
        for block, start_counts in self._step_start or ():
            for key in _COUNTED:
                nfe[key] += getattr(block.totals, key) - start_counts[key]
        for key, value in nfe.items():
            self.totals[key] += value
        self._step_start = None
        self._live_nfe = 0
        return nfe

    # ------------------------------------------------------------- the loop
    def run(self) -> FitResult:
        """Train until the step/epoch budget is spent; see :func:`fit`."""
        self.model.to(self.device)
        if self.resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
        elif self.seed is not None:
            seed_everything(self.seed)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        bar = progress_bar(
            self.total_steps, self.step, desc="train", unit="step", enabled=self.progress, leave=False
        )
        status, message, error = Status.COMPLETED, "", None
        stop_signal: str | None = None
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(terminate_as_interrupt())
            stack.enter_context(self._checking_solves())
            self._train_loop(bar)
        except StopTraining as exc:
            status, message = exc.status, f"Stopped at step {self.step}: {exc.message}"
        except KeyboardInterrupt as exc:
            status, stop_signal = Status.INTERRUPTED, signal_name(exc)
            message = self._save_interrupted(stop_signal)
        except BaseException as exc:  # noqa: BLE001 - re-raised below with the partial result
            error = exc
            solver = as_solver_error(exc)
            if solver is not None:
                error = solver
            status, message = Status.FAILED, f"{type(error).__name__}: {error}"
        finally:
            stack.close()
            if bar is not None:
                bar.close()
        self._settle_step_counts()  # a step stopped mid-solve still spent its evaluations
        result = self._result(status, message, stop_signal)
        for cb in self.callbacks:
            cb.on_fit_end(self, result)
        if error is not None:
            if not isinstance(error, (TrainingError, SolverError)):
                raise error
            if isinstance(error, TrainingError):
                error.result = result
                raise error
            raise TrainingError(str(error), result) from error
        return result

    def _train_loop(self, bar: Any) -> None:
        """The steps: train, evaluate, callbacks, checkpoints; a final evaluation and checkpoint."""
        for batch in self._batches():
            record = self._train_step(batch)
            self.history.append(record)
            if self.eval_every is not None and self.step % self.eval_every == 0:
                self._evaluate(record)
            for cb in self.callbacks:
                cb.on_step_end(self, record)
            if (
                self.checkpoint_path is not None
                and self.checkpoint_every is not None
                and self.step % self.checkpoint_every == 0
            ):
                self.save_checkpoint(self.checkpoint_path)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(_postfix(record, self.last_eval, self.metric_name), refresh=False)
        if self.history and "val_loss" not in self.history[-1]:
            self._evaluate(self.history[-1])
        if self.checkpoint_path is not None:
            self.save_checkpoint(self.checkpoint_path)

    def _save_interrupted(self, stop_signal: str | None) -> str:
        """Checkpoint an interrupted run; the message (also warned) says where and how to resume."""
        path = self.checkpoint_path or self.interrupt_path or Path("snopt-interrupted.pt")
        self.save_checkpoint(path)
        what = "by Ctrl-C (SIGINT)" if stop_signal == "SIGINT" else f"by {stop_signal}"
        message = (
            f"Interrupted at step {self.step} {what}; checkpoint saved to {path} "
            "(resume with resume=True, or --resume)."
        )
        warnings.warn(message, stacklevel=3)
        return message

    @contextlib.contextmanager
    def _checking_solves(self) -> Iterator[None]:
        """Install :meth:`_stop_check` on every ODE block for the run (the previous checks restored)."""
        blocks = [b for _, b in ode_blocks(self.model)]
        previous = [b.stop_check for b in blocks]
        self._solve_calls = 0
        for block in blocks:
            block.stop_check = self._stop_check
        try:
            yield
        finally:
            for block, check in zip(blocks, previous):
                block.stop_check = check

    def _result(self, status: Status, message: str, stop_signal: str | None = None) -> FitResult:
        final = dict(self.last_eval)
        if self.history:
            final["train_loss"] = self.history[-1]["train_loss"]
        final.update(self.horizons())
        stats: dict[str, Any] = dict(self.totals)
        stats.update(
            steps=self.step,
            epochs=self.epoch,
            wall_time=self.train_time,
            eval_time=self.eval_time,
            nfe_total=self.totals["nfe_forward"] + self.totals["nfe_backward"],
        )
        for name, owner in (("optimizer", self.optimizer), ("controller", self.controller)):
            own = getattr(owner, "stats", None)
            if own is not None:
                stats[name] = dict(own.as_dict() if hasattr(own, "as_dict") else own)
        return FitResult(status, message, self.history, final, stats, self.last_checkpoint, stop_signal)

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this run exactly, as tensors and plain data.

        The loader's generator state is saved as it is now, so that a run resumed at an epoch
        end draws the same order for the next epoch as the uninterrupted run.
        """
        gen = _loader_generator(self.train_loader)
        owners = {name: getattr(self, name) for name in _OWNERS}
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "classes": {
                "model": type(self.model).__qualname__,
                **{k: None if v is None else type(v).__qualname__ for k, v in owners.items()},
            },
            "model": self.model.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "history": self.history,
            "train_time": self.train_time,
            "eval_time": self.eval_time,
            "totals": self.totals,
            "last_eval": self.last_eval,
            "rng": _rng_state(),
            "loader_rng": gen.get_state() if gen is not None else None,
            "epoch_rng": self._epoch_rng,
        }
        for name, owner in owners.items():
            if owner is not None:
                state[name] = owner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        for name in _OWNERS:
            owner = getattr(self, name)
            if owner is not None and name in state:
                owner.load_state_dict(state[name])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.history = list(state["history"])
        self.train_time = float(state["train_time"])
        self.eval_time = float(state["eval_time"])
        self.totals = dict(state["totals"])
        self.last_eval = dict(state["last_eval"])
        self._epoch_rng = state["epoch_rng"]
        _set_rng_state(state["rng"])
        gen = _loader_generator(self.train_loader)
        if gen is not None and state.get("loader_rng") is not None:
            gen.set_state(state["loader_rng"])

    def save_checkpoint(self, path: str | os.PathLike) -> str:
        """Write :meth:`state_dict` atomically to ``path``."""
        written = str(write_checkpoint(self.state_dict(), path))
        self.last_checkpoint = written
        for cb in self.callbacks:
            cb.on_checkpoint(self, written)
        return written

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (tensors and plain data only).

        Raises:
            CheckpointError: the file is empty, truncated, corrupt, holds anything but tensors
                and plain data, or was written for another model, optimizer or controller.
        """
        state = read_checkpoint(path, self.device)
        check_matches(path, state, self.model, {name: getattr(self, name) for name in _OWNERS})
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(
                f"`checkpoint` file {str(path)!r} does not match this run: {type(exc).__name__}: {exc}"
            ) from None


#: The per-step counts of the blocks that the trainer sums into :attr:`Trainer.totals`.
_COUNTED = ("nfe_forward", "nfe_backward", "steps_forward", "steps_backward")
#: What a checkpoint holds besides the model, by trainer attribute.
_OWNERS = ("optimizer", "controller", "preconditioner", "scheduler")


def _t1_key(name: str) -> str:
    return f"t1/{name}" if name else "t1"


def _safe_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _postfix(record: dict[str, float], last_eval: dict[str, float], metric_name: str) -> dict[str, str]:
    post = {"loss": f"{record['train_loss']:.4g}"}
    if "metric" in last_eval:
        post[metric_name] = f"{last_eval['metric']:.4g}"
    t1 = [v for k, v in record.items() if k.startswith("t1")]
    if t1:
        post["T"] = ",".join(f"{v:.3g}" for v in t1)
    return post


def _takes_the_arguments_of(
    cls: Callable[_P, Any],
) -> Callable[[Callable[..., FitResult]], Callable[_P, FitResult]]:
    """Give the decorated function the parameters of ``cls``'s constructor.

    Type checkers see them through the ``ParamSpec``; ``help()``, IDEs and
    ``inspect.signature`` through ``__signature__``.  The parameters are written once, in
    :class:`Trainer`, and ``fit`` forwards them.
    """

    def decorate(function: Callable[..., FitResult]) -> Callable[_P, FitResult]:
        signature = inspect.signature(cls)
        function.__signature__ = signature.replace(return_annotation="FitResult")  # type: ignore[attr-defined]
        return function

    return decorate


@_takes_the_arguments_of(Trainer)
def fit(*args: Any, **kwargs: Any) -> FitResult:
    """Train ``model`` and return a :class:`FitResult`.

    Args:
        model: the model (any ``nn.Module``; its ODE blocks are found automatically).
        train_loader: an iterable of batches; with ``loss_fn``, batches are ``(x, y)``.
        val_loader: batches for evaluation (optional).
        optimizer: any ``torch.optim.Optimizer``, :class:`snopt.SNOpt` included.
        task: a :class:`snopt.Task` that supplies the loss and the evaluation.
        loss_fn: instead of ``task``: ``loss_fn(model(x), y) -> loss``.
        metric_fn: with ``loss_fn``: ``metric_fn(model(x), y)`` averaged over batches.
        epochs: number of passes over ``train_loader``.
        max_steps: number of optimizer steps (the smaller budget wins).
        controller: a :class:`snopt.Controller`, stepped after the optimizer with a closure
            that recomputes the step's loss.
        preconditioner: an object with ``step()`` called between backward and the
            optimizer step (SNOpt's preconditioner form).
        scheduler: an LR scheduler, stepped after every optimizer step.
        callbacks: :class:`Callback` instances.
        eval_every: evaluate every N steps (default: at the end of every epoch).
        checkpoint: path of the checkpoint file (tensors and plain data only), written at
            every epoch end, every ``checkpoint_every`` steps, at the end, and on Ctrl-C or
            SIGTERM.  Checked to be writable before training.
        checkpoint_every: steps between checkpoints (besides the epoch ends).
        resume: continue from ``checkpoint`` when the file exists.
        seed: seeds Python, NumPy and torch at the start (not when resuming).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        max_grad_norm: clip the gradient norm to this value.
        progress: show a progress bar.
        interrupt_checkpoint: where a run without ``checkpoint`` saves itself on Ctrl-C or
            SIGTERM (default ``./snopt-interrupted.pt``; a study's trial uses its own).

    Returns:
        The run's :class:`FitResult`; status ``"interrupted"`` after Ctrl-C (a
        checkpoint is saved first).

    Raises:
        CheckpointError: resuming from a file that is corrupt, not a checkpoint, or another
            model's (nothing in a checkpoint is ever executed).
        ValueError: bad arguments, an empty loader or an unwritable ``checkpoint`` path.
        NonFiniteLossError: the loss became NaN/inf (the message names the step).
        TrainingError: the ODE solver failed; ``exc.result`` holds the partial run.
    """
    return Trainer(*args, **kwargs).run()
