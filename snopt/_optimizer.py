"""SNOpt: the eigenvalue-corrected Kronecker-factored optimizer of Neural ODEs.

The math is a functional core of pure tensor functions (:func:`eigenbasis`,
:func:`initial_moment`, :func:`precondition`); :class:`SNOpt` (a
``torch.optim.Optimizer``) and :class:`SNOptPreconditioner` (in front of any torch
optimizer) wrap it around a :class:`~snopt._curvature.CurvatureCollector`.

For each tracked layer with factors ``A = U_A diag(a) U_A^T`` and ``B = U_B diag(b) U_B^T``
(see :mod:`snopt._curvature` for their normalisation) and gradient ``G = [dW | db]``::

    G' = U_B^T G U_A
    m  <- alpha m + (1 - alpha) n G' * G'          (m = L b a^T right after a refresh)
    G  <- U_B (G' / (m + eps)) U_A^T

with ``n`` the batch size and ``L`` the number of locations of a conv layer (1 for a
linear layer).  With ``alpha = 1`` the step is exactly ``(L A ⊗ B + eps I)^-1 vec(G)``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
from torch import Tensor, nn

from . import _defaults as D
from ._curvature import CurvatureCollector, TrackedLayer

Schedule = Union[float, Callable[[int], float]]  # noqa: UP007 - a runtime alias

_TORCH_DIR = os.path.dirname(torch.__file__)


def _warn(message: str) -> None:
    """Warn at the caller of ``step()``: the first frame outside this module and torch's wrappers."""
    frame: Any = sys._getframe(0)
    level = 1
    while frame is not None and (
        frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith(_TORCH_DIR)
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


# ----------------------------------------------------------------- functional core
def eigenbasis(factor: Tensor) -> tuple[Tensor, Tensor] | None:
    """Eigenvalues and eigenvectors of a symmetric positive semi-definite factor.

    The factor is symmetrised and decomposed in float64 with ``torch.linalg.eigh``;
    round-off negative eigenvalues are clipped to 0.

    Args:
        factor: a square matrix.

    Returns:
        ``(eigenvalues, eigenvectors)`` in the factor's dtype and device, or None when the
        factor is not finite or the decomposition fails.
    """
    f64 = factor.detach().to(torch.float64)
    sym = 0.5 * (f64 + f64.T)
    if not bool(torch.isfinite(sym).all()):
        return None
    try:
        values, vectors = torch.linalg.eigh(sym)
    except RuntimeError:  # torch.linalg.LinAlgError: no convergence
        return None
    if not (bool(torch.isfinite(values).all()) and bool(torch.isfinite(vectors).all())):
        return None
    return values.clamp_min(0).to(factor.dtype), vectors.to(factor.dtype)


def initial_moment(eigenvalues_a: Tensor, eigenvalues_b: Tensor, locations: int = 1) -> Tensor:
    """The second moment right after a refresh: ``L b a^T`` (shape ``[out, in (+1)]``)."""
    return torch.outer(eigenvalues_b, eigenvalues_a) * locations


def precondition(
    grad: Tensor,
    basis_a: Tensor,
    basis_b: Tensor,
    moment: Tensor,
    *,
    eps: float,
    alpha: float,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """One eigenvalue-corrected Kronecker-factored preconditioning.

    Args:
        grad: the gradient matrix ``G = [dW | db]``, ``[out, in (+1)]``.
        basis_a: eigenvectors of the input factor, ``[in (+1), in (+1)]``.
        basis_b: eigenvectors of the output-gradient factor, ``[out, out]``.
        moment: the running second moment in the eigenbasis, shaped like ``grad``.
        eps: damping (> 0).
        alpha: decay of the second moment, in [0, 1].
        batch_size: ``n``, which turns the batch gradient's square into a per-sample moment.

    Returns:
        ``(direction, new_moment)``: the preconditioned gradient (shaped like ``grad``) and
        the updated moment.  The inputs are not modified.
    """
    projected = basis_b.T @ grad @ basis_a
    moment = alpha * moment + ((1.0 - alpha) * batch_size) * projected.square()
    direction = basis_b @ (projected / (moment + eps)) @ basis_a.T
    return direction, moment


# ------------------------------------------------------------------ validation
def _check_value(name: str, value: Any, rule: str, ok: Callable[[float], bool]) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"`{name}` must be {rule}, but got {name}={value!r}.")
    return float(value)


_RULES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "lr": ("a positive number", lambda v: v > 0),
    "momentum": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "weight_decay": ("a non-negative number", lambda v: v >= 0),
    "eps": ("a positive number", lambda v: v > 0),
    "alpha": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "sample_step": ("a number in (0, 1] (a fraction of the horizon)", lambda v: 0 < v <= 1),
}
# A scheduler may anneal the learning rate to 0; a negative one is still an error.
_STEP_RULES = dict(_RULES, lr=("a non-negative number", lambda v: v >= 0))


def _check_hyper(name: str, value: Any) -> Any:
    """Validate a constant, or a schedule (a callable of the step) at step 0."""
    if callable(value):
        _resolve(name, value, 0, rules=_RULES)
        return value
    rule, ok = _RULES[name]
    return _check_value(name, value, rule, ok)


def _resolve(name: str, value: Any, step: int, *, rules: dict[str, Any] = _STEP_RULES) -> float:
    """The value of a hyperparameter at ``step`` (0-based), validated."""
    rule, ok = rules[name]
    if not callable(value):
        return _check_value(name, value, rule, ok)
    result = value(step)
    if isinstance(result, Tensor) and result.numel() == 1:
        result = result.item()
    if (
        isinstance(result, bool)
        or not isinstance(result, (int, float))
        or not math.isfinite(result)
        or not ok(result)
    ):
        raise ValueError(f"`{name}` schedule must return {rule}, but {name}({step}) returned {result!r}.")
    return float(result)


def _check_update_freq(value: Any) -> Any:
    if callable(value):
        _resolve_update_freq(value, 0)
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`update_freq` must be a positive integer, but got update_freq={value!r}.")
    return value


def _resolve_update_freq(value: Any, step: int) -> int:
    if not callable(value):
        return int(value)
    result = value(step)
    if isinstance(result, bool) or not isinstance(result, int) or result <= 0:
        raise ValueError(
            "`update_freq` schedule must return a positive integer, "
            f"but update_freq({step}) returned {result!r}."
        )
    return result


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, but got {name}={value!r}.")
    return value


# ---------------------------------------------------------------------- engine
class _Engine:
    """Refresh schedule, decompositions and preconditioning shared by both public forms."""

    def __init__(
        self,
        model: nn.Module,
        *,
        update_freq: Any,
        sample_step: Any,
        full_precond: bool,
        params: Iterable[Tensor] | None = None,
    ) -> None:
        self.update_freq = update_freq
        self.sample_step = sample_step
        self.collector = CurvatureCollector(
            model,
            sample_step=_resolve("sample_step", sample_step, 0),
            full_precond=full_precond,
            params=params,
        )
        self.steps = 0
        self.last_refresh: int | None = None
        self.counts = {"refreshes": 0, "skipped_steps": 0, "skipped_refreshes": 0}
        self.decompose_time = 0.0
        self.collect_time_offset = 0.0
        self.samples_offset = 0
        self.arm()

    # -- schedule
    def is_refresh(self, step: int) -> bool:
        """Whether step ``step`` (0-based) refreshes the eigenbases."""
        if self.last_refresh is None:
            return True
        return step - self.last_refresh >= _resolve_update_freq(self.update_freq, step)

    def arm(self) -> None:
        refresh = self.is_refresh(self.steps)
        sample_step = _resolve("sample_step", self.sample_step, self.steps) if refresh else None
        self.collector.arm(refresh, sample_step=sample_step)

    # -- one step
    def refresh(self, state_for: Callable[[TrackedLayer], dict[str, Any]]) -> list[str]:
        """Decompose the factors gathered in this step; return warnings to raise."""
        messages = []
        start = time.perf_counter()
        for layer in self.collector.layers:
            factors = layer.factors()
            if factors is None:
                continue
            a, b, locations = factors
            dec_a = eigenbasis(a)
            dec_b = eigenbasis(b) if dec_a is not None else None
            if dec_a is None or dec_b is None:
                messages.append(layer.name)
                continue
            state = state_for(layer)
            weight = layer.weight
            state["eigenvalues_a"], state["basis_a"] = (t.to(weight.device, weight.dtype) for t in dec_a)
            state["eigenvalues_b"], state["basis_b"] = (t.to(weight.device, weight.dtype) for t in dec_b)
            state["moment"] = initial_moment(state["eigenvalues_a"], state["eigenvalues_b"], locations)
        self.decompose_time += time.perf_counter() - start
        self.collector.reset()
        self.last_refresh = self.steps
        self.counts["refreshes"] += 1
        if messages:
            self.counts["skipped_refreshes"] += 1
            return [
                f"SNOpt: the curvature factors of layer(s) {messages} are not finite (or could not be "
                f"decomposed) at step {self.steps + 1}; this refresh is skipped for them and their "
                "previous eigenbasis is kept (the identity before the first refresh)."
            ]
        return []

    def directions(
        self,
        state_for: Callable[[TrackedLayer], dict[str, Any]],
        hyper_for: Callable[[TrackedLayer], tuple[float, float] | None],
    ) -> dict[Tensor, Tensor]:
        """Preconditioned gradients of the tracked layers that have a gradient, by parameter."""
        out: dict[Tensor, Tensor] = {}
        for layer in self.collector.layers:
            weight = layer.weight
            if weight.grad is None:
                continue
            hyper = hyper_for(layer)
            if hyper is None:
                continue
            eps, alpha = hyper
            state = state_for(layer)
            grad = layer.adapter.grad_matrix(layer.module)
            if "basis_a" not in state:
                _identity_state(state, grad)
            direction, state["moment"] = precondition(
                grad,
                state["basis_a"],
                state["basis_b"],
                state["moment"],
                eps=eps,
                alpha=alpha,
                batch_size=layer.batch_size,
            )
            dw, db = layer.adapter.split(layer.module, direction)
            out[weight] = dw
            bias = layer.bias
            if db is not None and bias is not None:
                out[bias] = db
        return out

    def discard(self) -> None:
        """Drop this step's statistics (a skipped step)."""
        self.collector.reset()
        self.counts["skipped_steps"] += 1

    def finish(self) -> None:
        self.steps += 1
        self.arm()

    # -- bookkeeping
    @property
    def stats(self) -> dict[str, float]:
        return {
            "refreshes": self.counts["refreshes"],
            "skipped_steps": self.counts["skipped_steps"],
            "skipped_refreshes": self.counts["skipped_refreshes"],
            "collect_time": self.collect_time_offset + self.collector.collect_time,
            "decompose_time": self.decompose_time,
            "samples": self.samples_offset + self.collector.samples,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "last_refresh": self.last_refresh, "stats": self.stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.last_refresh = None if state["last_refresh"] is None else int(state["last_refresh"])
        stats = state.get("stats", {})
        for key in self.counts:
            self.counts[key] = int(stats.get(key, 0))
        self.decompose_time = float(stats.get("decompose_time", 0.0))
        self.collect_time_offset = float(stats.get("collect_time", 0.0)) - self.collector.collect_time
        self.samples_offset = int(stats.get("samples", 0)) - self.collector.samples
        self.collector.reset()
        self.arm()


def _identity_state(state: dict[str, Any], grad: Tensor) -> None:
    """The basis before any refresh: identity factors (unit eigenvalues)."""
    out, inp = grad.shape
    dtype, device = grad.dtype, grad.device
    state["basis_a"] = torch.eye(inp, dtype=dtype, device=device)
    state["basis_b"] = torch.eye(out, dtype=dtype, device=device)
    state["eigenvalues_a"] = torch.ones(inp, dtype=dtype, device=device)
    state["eigenvalues_b"] = torch.ones(out, dtype=dtype, device=device)
    state["moment"] = torch.ones(out, inp, dtype=dtype, device=device)


def _grads_finite(grads: list[Tensor]) -> bool:
    if not grads:
        return True
    norms = torch.stack(
        [torch.linalg.vector_norm(g.detach(), dtype=torch.float64).to(grads[0].device) for g in grads]
    )
    return bool(torch.isfinite(norms).all())


# ---------------------------------------------------------------------- SNOpt
class SNOpt(torch.optim.Optimizer):
    """The Second-order Neural ODE Optimizer (Liu, Chen & Theodorou, NeurIPS 2021).

    An eigenvalue-corrected Kronecker-factored (EKFAC) preconditioner whose factors, for
    the layers of ODE vector fields, are collected along the backward solve (see
    :mod:`snopt._curvature`), followed by SGD with momentum and weight decay.  Every
    ``update_freq`` steps (the first included) the factors of that step are collected and
    eigendecomposed; every step the gradient of each tracked layer is preconditioned in
    that eigenbasis with a running second moment.  Parameters of other modules (norm
    layers, RNN cells, ...) get plain SGD-momentum.

    The optimizer arms its collector at construction and at the end of every
    :meth:`step`, for the forward and backward passes that come before the next step.
    Build it before the first forward pass of training.  Losses are assumed to be
    averaged over the batch (torch's default reductions).

    Every hyperparameter except ``full_precond`` may be a constant or a schedule: a
    callable of the 0-based step index returning the value (validated at step 0 and at
    every use; to save a state with ``torch.save``, use picklable module-level functions).
    LR schedulers work on a constant ``lr`` as with any torch optimizer; a scheduler may
    anneal it to 0.  Parameters added later with :meth:`add_param_group` get plain
    SGD-momentum (their layers have no collector hooks).  A second SNOpt or
    :class:`SNOptPreconditioner` built on the same model takes over its ODE blocks; call
    ``collector.remove()`` on the old one.

    Args:
        model: the model whose layers are preconditioned; its ODE blocks get the collector
            as their sampler.
        lr: learning rate (> 0).
        momentum: momentum factor, in [0, 1).
        weight_decay: L2 penalty added to the preconditioned gradient (>= 0).
        eps: damping added to the second moment (> 0).
        update_freq: steps between refreshes of the eigenbases (positive integer).
        alpha: decay of the running second moment, in [0, 1].
        sample_step: spacing of the curvature samples along the backward solve, as a
            fraction of the horizon, in (0, 1].
        full_precond: also precondition the layers outside the ODE blocks.
        params: the parameters (or param-group dicts) to optimize; defaults to
            ``model.parameters()``.  Only layers whose weight is among them get curvature.

    Attributes:
        collector: the :class:`~snopt._curvature.CurvatureCollector`.

    Example:
        >>> opt = SNOpt(model, lr=0.1)
        >>> loss = task.loss(model, batch); loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule,
        momentum: Schedule = D.SNOPT["momentum"],
        weight_decay: Schedule = D.SNOPT["weight_decay"],
        *,
        eps: Schedule = D.SNOPT["eps"],
        update_freq: int | Callable[[int], int] = D.SNOPT["update_freq"],
        alpha: Schedule = D.SNOPT["alpha"],
        sample_step: Schedule = D.SNOPT["sample_step"],
        full_precond: bool = D.SNOPT["full_precond"],
        params: Iterable[Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, but got {type(model).__name__}.")
        defaults = dict(
            lr=_check_hyper("lr", lr),
            momentum=_check_hyper("momentum", momentum),
            weight_decay=_check_hyper("weight_decay", weight_decay),
            eps=_check_hyper("eps", eps),
            alpha=_check_hyper("alpha", alpha),
        )
        update_freq = _check_update_freq(update_freq)
        sample_step = _check_hyper("sample_step", sample_step)
        full_precond = _check_bool("full_precond", full_precond)
        super().__init__(model.parameters() if params is None else params, defaults)
        optimized = [p for group in self.param_groups for p in group["params"]]
        self.update_freq = update_freq
        self.sample_step = sample_step
        self.full_precond = full_precond
        self._engine = _Engine(
            model,
            update_freq=update_freq,
            sample_step=sample_step,
            full_precond=full_precond,
            params=optimized,
        )
        self.collector = self._engine.collector

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its own hyperparameters are validated like the constructor's."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name, default in self.defaults.items():
            if group[name] is not default:  # a value of the group's own (defaults are checked)
                group[name] = _check_hyper(name, group[name])

    @property
    def stats(self) -> dict[str, float]:
        """Counters: ``refreshes``, ``skipped_steps``, ``skipped_refreshes``, ``samples``, and
        ``collect_time`` / ``decompose_time`` in seconds."""
        return self._engine.stats

    @property
    def steps(self) -> int:
        """Steps taken so far (skipped steps included)."""
        return self._engine.steps

    def _group_of(self) -> dict[int, dict[str, Any]]:
        return {id(p): group for group in self.param_groups for p in group["params"]}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step.

        Args:
            closure: a callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        engine = self._engine
        step = engine.steps
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not _grads_finite(grads):
            engine.discard()
            engine.finish()
            _warn(
                f"SNOpt: non-finite gradients at step {step + 1}; the step is skipped "
                f"({engine.counts['skipped_steps']} skipped so far, see `optimizer.stats`)."
            )
            return loss
        group_of = self._group_of()
        if engine.collector.armed:
            for message in engine.refresh(lambda layer: self.state[layer.weight]):
                _warn(message)

        def hyper_for(layer: TrackedLayer) -> tuple[float, float] | None:
            group = group_of.get(id(layer.weight))
            if group is None:
                return None
            return _resolve("eps", group["eps"], step), _resolve("alpha", group["alpha"], step)

        directions = engine.directions(lambda layer: self.state[layer.weight], hyper_for)
        for group in self.param_groups:
            lr = _resolve("lr", group["lr"], step)
            momentum = _resolve("momentum", group["momentum"], step)
            weight_decay = _resolve("weight_decay", group["weight_decay"], step)
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = directions.get(p, p.grad)
                if weight_decay != 0:
                    d = d.add(p, alpha=weight_decay)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        engine.finish()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer state (eigenbases, eigenvalues, second moments and momentum
        buffers per parameter) plus the step counter, the last refresh and the stats."""
        state = super().state_dict()
        state["snopt"] = self._engine.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the run continues exactly."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("snopt", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._engine.load_state_dict(extra)


# ------------------------------------------------------------- preconditioner
class SNOptPreconditioner:
    """SNOpt's preconditioning in front of any torch optimizer.

    ``step()`` overwrites the ``.grad`` of every tracked layer with its preconditioned
    gradient (see :class:`SNOpt`); the optimizer behind it then takes its own step::

        loss.backward(); precond.step(); optimizer.step()

    With ``torch.optim.SGD(momentum=..., weight_decay=...)`` behind it this is
    :class:`SNOpt`.  On non-finite gradients ``step()`` warns, counts the step in
    :attr:`stats` and sets every gradient of the model to None, so that the optimizer
    behind skips the step.

    Args:
        model: the model (its ODE blocks get the collector as their sampler).
        eps: damping (> 0), constant or schedule.
        update_freq: steps between refreshes (positive integer), constant or schedule.
        alpha: decay of the second moment, in [0, 1], constant or schedule.
        sample_step: spacing of the curvature samples, a fraction of the horizon in (0, 1].
        full_precond: also precondition the layers outside the ODE blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: Schedule = 0.05,
        update_freq: int | Callable[[int], int] = 100,
        alpha: Schedule = 0.75,
        sample_step: Schedule = 0.01,
        full_precond: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, but got {type(model).__name__}.")
        self.model = model
        self.eps = _check_hyper("eps", eps)
        self.alpha = _check_hyper("alpha", alpha)
        self.update_freq = _check_update_freq(update_freq)
        self.sample_step = _check_hyper("sample_step", sample_step)
        self.full_precond = _check_bool("full_precond", full_precond)
        self._engine = _Engine(
            model, update_freq=self.update_freq, sample_step=self.sample_step, full_precond=self.full_precond
        )
        self.collector = self._engine.collector
        self.state: dict[str, dict[str, Tensor]] = {}

    @property
    def stats(self) -> dict[str, float]:
        """The same counters as :attr:`SNOpt.stats`."""
        return self._engine.stats

    def _state_for(self, layer: TrackedLayer) -> dict[str, Any]:
        return self.state.setdefault(layer.name, {})

    @torch.no_grad()
    def step(self) -> None:
        """Replace the gradients of the tracked layers by their preconditioned gradients."""
        engine = self._engine
        step = engine.steps
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not _grads_finite([p.grad for p in params if p.grad is not None]):
            for p in params:
                p.grad = None
            engine.discard()
            engine.finish()
            _warn(
                f"SNOptPreconditioner: non-finite gradients at step {step + 1}; the gradients are set "
                "to None so that the optimizer skips the step."
            )
            return
        if engine.collector.armed:
            for message in engine.refresh(self._state_for):
                _warn(message)
        hyper = (_resolve("eps", self.eps, step), _resolve("alpha", self.alpha, step))
        directions = engine.directions(self._state_for, lambda layer: hyper)
        param: Any
        for param, d in directions.items():
            if param.grad is None:  # a bias without gradient: its column was preconditioned as zeros
                param.grad = d.clone()
            else:
                param.grad.copy_(d)
        engine.finish()

    def state_dict(self) -> dict[str, Any]:
        """Step counter, last refresh, stats and every layer's eigenbases, eigenvalues and moment."""
        state = self._engine.state_dict()
        state["layers"] = {name: {k: v.clone() for k, v in s.items()} for name, s in self.state.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        layers = {layer.name: layer for layer in self.collector.layers}
        unknown = sorted(set(state.get("layers", {})) - set(layers))
        if unknown:
            raise ValueError(
                f"Unknown layers {unknown} in the state; this model's tracked layers are {sorted(layers)}."
            )
        self.state = {}
        for name, values in state.get("layers", {}).items():
            weight = layers[name].weight
            self.state[name] = {k: v.to(device=weight.device, dtype=weight.dtype) for k, v in values.items()}
        self._engine.load_state_dict(state)
